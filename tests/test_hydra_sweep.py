"""Sweeps: a real `python train.py -m ...` writes a comparison of its jobs; the objective sweepers optimise."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import matplotlib.image
import pytest

from conftest import ROOT

from lightning_quant.app import objective
from lightning_quant.sweep import SweepComparison, compare_sweep, mark_pareto_front

FAST = [
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
]


@pytest.fixture(scope="module")
def model_sweep(tmp_path_factory):
    """2 models x 2 learning rates, one of them invalid: 4 jobs, the 2 with lr=-1 fail at once."""
    sweep_dir = tmp_path_factory.mktemp("sweep")
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "-m", "model=convnet,mlp", "model.lr=0.003,-1", *FAST,
         f"hydra.sweep.dir={sweep_dir}"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    return sweep_dir, result


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_multirun_compares_every_job_and_shows_failures(model_sweep):
    sweep_dir, result = model_sweep
    assert result.returncode != 0  # Hydra reports the failed jobs once the sweep is over
    assert "lr must be positive" in result.stderr
    rows = read_csv(sweep_dir / "comparison.csv")
    assert [(r["job"], r["model"], r["status"]) for r in rows] == [
        ("0", "convnet", "ok"),
        ("1", "convnet", "failed"),
        ("2", "mlp", "ok"),
        ("3", "mlp", "failed"),
    ]
    for row in rows:
        metrics_file = sweep_dir / row["job"] / "metrics.json"
        if row["status"] == "ok":
            assert row["approach"] == "float"  # no quantization callback: the float model's accuracy
            assert float(row["acc_float"]) == json.loads(metrics_file.read_text())["val/acc"]
            assert float(row["objective"]) == json.loads(metrics_file.read_text())["test/acc"]
            assert row["error"] == ""
        else:
            assert not metrics_file.exists()
            assert "lr must be positive" in row["error"]
        assert row["overrides"] == f"model={row['model']} model.lr={'0.003' if row['status'] == 'ok' else '-1'}"
    table = (sweep_dir / "comparison.md").read_text()
    assert table.count("\n") == 2 + len(rows)
    assert "| 1 | **failed**: InstantiationException" in table
    picture = matplotlib.image.imread(sweep_dir / "comparison.png")
    assert picture.shape[0] > 300 and picture.shape[1] > 600


def test_comparison_is_rebuilt_from_the_folder_alone(model_sweep):
    sweep_dir, _ = model_sweep
    before = (sweep_dir / "comparison.csv").read_text()
    (sweep_dir / "comparison.csv").unlink()
    subprocess.run([sys.executable, "-m", "lightning_quant.sweep", str(sweep_dir)], check=True, timeout=120)
    assert (sweep_dir / "comparison.csv").read_text() == before
    assert [r["status"] for r in compare_sweep(sweep_dir)] == ["ok", "failed", "ok", "failed"]


def test_pareto_front():
    rows = [
        {"approach": "static", "acc_int8": 0.95, "latency_int8_ms": 1.0},
        {"approach": "dynamic", "acc_int8": 0.97, "latency_int8_ms": 2.0},
        {"approach": "qat", "acc_int8": 0.94, "latency_int8_ms": 1.5},  # slower and worse than static
        {"approach": "float", "acc_float": 0.97, "latency_float_ms": 2.0},  # ties dynamic: both on the front
        {"approach": "float", "acc_float": 0.98},  # no latency: not placed
        {"approach": "static", "acc_int8": 0.95, "latency_int8_ms": 1.2},  # as accurate as static, slower
    ]
    mark_pareto_front(rows)
    assert [r["pareto"] for r in rows] == [True, True, False, True, None, False]


def test_objective_penalises_latency_over_the_budget():
    metrics = {"quantization/quantized/val/acc": 0.95, "quantization/quantized/latency_ms": 1.2}
    assert objective(metrics, "quantization/quantized/val/acc") == 0.95
    assert objective(metrics, "quantization/quantized/val/acc", latency_budget_ms=1.5) == 0.95
    assert objective(metrics, "quantization/quantized/val/acc", latency_budget_ms=1.0) == pytest.approx(0.75)
    with pytest.raises(KeyError, match="was not logged"):
        objective(metrics, "test/acc")
    with pytest.raises(KeyError, match="no quantization callback measured one"):
        objective({"test/acc": 0.9}, "test/acc", latency_budget_ms=1.0)


def test_sweep_comparison_arguments_are_checked():
    with pytest.raises(ValueError, match="metric"):
        SweepComparison(metric="")
    with pytest.raises(ValueError, match="bare file name"):
        SweepComparison(stem="../elsewhere")
