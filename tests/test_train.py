"""train.py end to end: through the Python API and as a real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT

from lightning_quant.app import train


def test_train_returns_the_optimized_metric_and_writes_outputs(fast_cfg, tmp_path):
    value = train(fast_cfg())
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert value == metrics["test/acc"]
    assert 0.0 <= value <= 1.0
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert (tmp_path / "config.yaml").is_file()


def test_train_script_rejects_an_unknown_key_before_training(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "trainer.max_epoch=1", f"hydra.run.dir={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    assert "max_epoch" in result.stderr
    assert not (tmp_path / "checkpoints").exists()
