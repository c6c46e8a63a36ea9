"""A separate Hydra app uses lightning-quant's config groups, from a normal (non-editable) install.

The package is installed with pip into a folder of its own (as a wheel is, ``hydra_plugins/`` and all),
and a tiny app outside this repository adds two defaults lines and nothing else: no import of
lightning_quant. Hydra finds the groups through the search-path plugin.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

APP = """
import json
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate


@hydra.main(version_base="1.3", config_path="conf", config_name="{config}")
def main(cfg):
    report = {{"lightning_quant_imported": "lightning_quant" in sys.modules}}
    if "callbacks" in cfg:
        stop = instantiate(cfg.callbacks.stop)
        report.update(type=type(stop).__name__, patience=stop.patience,
                      lightning_quant=sys.modules["lightning_quant"].__file__)
        output_dir = Path(HydraConfig.get().runtime.output_dir)
        (output_dir / "metrics.json").write_text(json.dumps({{"val/acc": 1.0 - stop.patience / 10}}))
    print("REPORT " + json.dumps(report))


main()
"""

# The two lines a user adds to their primary config's defaults list:
USER_CONFIG = """
defaults:
  - lightning_quant/callbacks@callbacks.stop: early_stopping
  - lightning_quant/sweep@hydra.callbacks.comparison: comparison
  - _self_

callbacks:
  stop:
    monitor: val/loss
    patience: 5
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """lightning-quant installed by pip, as from a wheel, into a folder of its own."""
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for package in ("lightning_quant", "hydra_plugins"):
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path_factory.mktemp("site")
    # Built as `pip install .` builds it: in an isolated environment with the build backend pyproject names.
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), str(source)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert (target / "hydra_plugins" / "lightning_quant_plugin" / "__init__.py").is_file()
    return target


@pytest.fixture(scope="module")
def app_dir(tmp_path_factory) -> Path:
    app_dir = tmp_path_factory.mktemp("user_app")
    (app_dir / "conf").mkdir()
    (app_dir / "conf" / "config.yaml").write_text(USER_CONFIG)
    (app_dir / "conf" / "plain.yaml").write_text("greeting: hello\n")
    (app_dir / "my_app.py").write_text(APP.format(config="config"))
    (app_dir / "plain_app.py").write_text(APP.format(config="plain"))
    return app_dir


def run_app(installed: Path, app_dir: Path, script: str, *overrides: str) -> subprocess.CompletedProcess:
    # The installed copy comes first; the repository is not on the path (no cwd entry: `python script`).
    env = {**os.environ, "PYTHONPATH": str(installed), "HYDRA_FULL_ERROR": "0"}
    return subprocess.run(
        [sys.executable, script, *overrides], cwd=app_dir, env=env, capture_output=True, text=True, timeout=300
    )


def report(result: subprocess.CompletedProcess) -> dict:
    lines = [line for line in result.stdout.splitlines() if line.startswith("REPORT ")]
    assert lines, result.stdout[-2000:] + result.stderr[-3000:]
    return json.loads(lines[-1].removeprefix("REPORT "))


def test_user_app_composes_and_instantiates_the_packaged_schema(installed, app_dir):
    result = run_app(installed, app_dir, "my_app.py", f"hydra.run.dir={app_dir / 'run'}")
    assert result.returncode == 0, result.stderr[-3000:]
    got = report(result)
    assert got["type"] == "EarlyStopping" and got["patience"] == 5
    assert got["lightning_quant"].startswith(str(installed))  # the installed copy, not the repository


def test_user_app_gets_hydras_error_for_a_wrong_type(installed, app_dir):
    result = run_app(
        installed, app_dir, "my_app.py", "callbacks.stop.patience=many", f"hydra.run.dir={app_dir / 'bad'}"
    )
    assert result.returncode != 0
    assert "Value 'many' of type 'str' could not be converted to Integer" in result.stderr
    assert "full_key: callbacks.stop.patience" in result.stderr
    assert "REPORT" not in result.stdout  # it failed before the task ran


def test_user_sweep_writes_the_comparison(installed, app_dir):
    sweep_dir = app_dir / "sweep"
    result = run_app(
        installed, app_dir, "my_app.py", "-m", "callbacks.stop.patience=1,2", f"hydra.sweep.dir={sweep_dir}"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with open(sweep_dir / "comparison.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["job"], r["status"], r["approach"], float(r["acc_float"])) for r in rows] == [
        ("0", "ok", "float", 0.9),
        ("1", "ok", "float", 0.8),
    ]
    assert (sweep_dir / "comparison.png").stat().st_size > 0


def test_an_app_that_uses_no_lightning_quant_config_does_not_import_it(installed, app_dir):
    result = run_app(installed, app_dir, "plain_app.py", f"hydra.run.dir={app_dir / 'plain'}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert report(result) == {"lightning_quant_imported": False}
