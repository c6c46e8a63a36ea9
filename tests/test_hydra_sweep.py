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
def approach_sweep(tmp_path_factory):
    """2 approaches x 2 learning rates, one invalid: 4 jobs, the 2 with lr=-1 fail at once."""
    sweep_dir = tmp_path_factory.mktemp("sweep")
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "-m", "callbacks=ptq,dynamic", "model.lr=0.003,-1", *FAST,
         f"hydra.sweep.dir={sweep_dir}"],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    return sweep_dir, result


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_multirun_compares_approaches_and_shows_failed_jobs(approach_sweep):
    sweep_dir, result = approach_sweep
    assert result.returncode != 0  # Hydra reports the failed jobs once the sweep is over
    assert "lr must be positive" in result.stderr
    rows = read_csv(sweep_dir / "comparison.csv")
    assert [(r["job"], r["callbacks"], r["approach"], r["status"]) for r in rows] == [
        ("0", "ptq", "static", "ok"),
        ("1", "ptq", "", "failed"),
        ("2", "dynamic", "dynamic", "ok"),
        ("3", "dynamic", "", "failed"),
    ], result.stderr[-3000:]
    for row in rows:
        job_dir = sweep_dir / row["job"]
        assert row["model"] == "convnet"
        assert row["overrides"] == f"callbacks={row['callbacks']} model.lr={'0.003' if row['status'] == 'ok' else '-1'}"
        if row["status"] == "failed":
            assert "lr must be positive" in row["error"]
            assert not (job_dir / "metrics.json").exists()
            continue
        manifest = json.loads((job_dir / "quantized" / "manifest.json").read_text())
        metrics = json.loads((job_dir / "metrics.json").read_text())
        assert float(row["acc_float"]) == manifest["metrics"]["float"]["val/acc"]
        assert float(row["acc_int8"]) == manifest["metrics"]["quantized"]["val/acc"]
        assert float(row["acc_int8"]) == metrics["quantization/quantized/val/acc"]  # train() read it too
        assert float(row["latency_float_ms"]) == manifest["latency_ms"]["float"] > 0
        assert float(row["latency_int8_ms"]) == manifest["latency_ms"]["quantized"] > 0
        assert float(row["speedup"]) == pytest.approx(
            manifest["latency_ms"]["float"] / manifest["latency_ms"]["quantized"]
        )
        assert int(float(row["size_int8_bytes"])) == manifest["size_bytes"]["quantized"] > 0
        assert float(row["objective"]) == metrics["test/acc"]  # what train() returned
    assert "True" in [r["pareto"] for r in rows]
    table = (sweep_dir / "comparison.md").read_text()
    assert table.count("\n") == 2 + len(rows)
    assert "| 1 | **failed**: InstantiationException" in table
    picture = matplotlib.image.imread(sweep_dir / "comparison.png")
    assert picture.shape[0] > 300 and picture.shape[1] > 600


def test_comparison_is_rebuilt_from_the_folder_alone(approach_sweep):
    sweep_dir, _ = approach_sweep
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


def test_a_job_of_any_app_is_read_from_its_manifest(tmp_path):
    """A user's app writes no metrics.json: the job's row comes from the manifest its callback wrote, with the
    model's name and the recommended file's speed-up."""
    job = tmp_path / "0"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("- lr=0.1\n")
    (job / "quantized").mkdir()
    manifest = {
        "approach": "static",
        "model": "MyClassifier",
        "recommended": "onnx",
        "metrics": {"float": {"val/acc": 0.9}, "quantized": {"val/acc": 0.89}},
        "latency_ms": {"float": 2.0, "quantized": 0.5, "aoti": 0.8, "onnx": 0.5},
        "size_bytes": {"float": 4000, "quantized": 1000, "smallest_artifact": 900},
        "artifacts": [{"format": "aoti", "path": "model_aoti.pt2"}, {"format": "onnx", "path": "model.onnx"}],
    }
    (job / "quantized" / "manifest.json").write_text(json.dumps(manifest))
    [row] = compare_sweep(tmp_path)
    assert row["status"] == "ok" and row["model"] == "MyClassifier" and row["approach"] == "static"
    assert row["acc_int8"] == 0.89 and row["speedup"] == 4.0 and row["shipped_file"] == "model.onnx"
    (job / "quantized" / "manifest.json").unlink()
    [row] = compare_sweep(tmp_path)
    assert row["status"] == "failed" and "neither a manifest.json" in row["error"]
