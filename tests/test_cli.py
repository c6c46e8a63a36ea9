"""The ``lightning-quant`` command on a real manifest and real artifacts, run as a subprocess."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import BROKEN_MANIFESTS, break_manifest

from lightning_quant.benchmark import measure_speed, model_bytes
from lightning_quant.cli import main
from lightning_quant.demo import MLPNet
from lightning_quant.export import OrtDynamicQuantization, export, load_artifact, verify_artifacts
from lightning_quant.files import sha256
from lightning_quant.manifest import build_manifest, write_manifest
from lightning_quant.quantization import DynamicQuantConfig, ModelInputs, count_quantized_ops, quantize
from lightning_quant.target import resolve_target


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """The command as a user runs it (a fresh process: ~15 s of imports on this machine, so used sparingly)."""
    return subprocess.run(
        [sys.executable, "-m", "lightning_quant.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )


@pytest.fixture
def cli(capsys):
    """``main(argv)`` in this process: returns (exit status, stdout, stderr)."""

    def run(*args: str) -> tuple[int, str, str]:
        status = main(list(args))
        out, err = capsys.readouterr()
        return status, out, err

    return run


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """Dynamic int8 MLPNet exported to ONNX and torch.export, verified, described in manifest.json."""
    dirpath = tmp_path_factory.mktemp("quantized")
    torch.manual_seed(0)
    model = MLPNet().eval()
    x = torch.rand(4, 1, 8, 8)
    int8 = quantize(model, DynamicQuantConfig(), x)
    inputs = ModelInputs.from_value(x)
    artifacts = export(
        int8, inputs, ["onnx", "torch_export"], dirpath, float_model=model, onnx_quantization=OrtDynamicQuantization()
    )
    checks = verify_artifacts(
        artifacts, int8, [inputs, ModelInputs.from_value(torch.rand(16, 1, 8, 8))], dirpath, float_model=model
    )
    manifest = build_manifest(
        approach="dynamic",
        backend="x86",
        model="MLPNet",
        example_inputs=inputs,
        dynamic_batch=True,
        artifacts=artifacts,
        verification=checks,
        metrics={"float": {"val/acc": 0.9}, "quantized": {"val/acc": 0.89}},
        speed=measure_speed(
            model, int8, {a.format: load_artifact(dirpath / a.path, a.format) for a in artifacts}, inputs
        ),
        latency_input=inputs,
        target=resolve_target("avx2"),
        size_bytes={"float": model_bytes(model), "quantized": model_bytes(int8)},
        quantized_ops=count_quantized_ops(int8),
        dirpath=dirpath,
    )
    write_manifest(manifest, dirpath)
    return dirpath


def test_inspect_shows_approach_artifacts_metrics_and_checks(exported, cli):
    done = run_cli("inspect", str(exported))
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "approach  dynamic" in out
    assert "ok              onnx" in out and "ok              torch_export" in out
    assert "model.onnx" in out and "model_program.pt2" in out
    assert "val/acc" in out and "0.8900" in out  # metrics table
    assert "rel. error" in out  # verification result per artifact

    status, out, _ = cli("inspect", str(exported / "manifest.json"), "--json")
    as_json = json.loads(out)
    assert status == 0
    assert {a["status"] for a in as_json["artifacts"]} == {"ok"}
    assert as_json["approach"] == "dynamic"


def test_inspect_reports_changed_and_missing_files(exported, tmp_path, cli):
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "manifest.json").write_text((exported / "manifest.json").read_text())
    (copy / "model.onnx").write_bytes((exported / "model.onnx").read_bytes() + b"x")  # altered; program missing
    status, out, err = cli("inspect", str(copy))
    assert status == 1
    assert "sha256 mismatch" in out and "missing" in out
    assert "missing, changed since export or refused" in err


def test_inspect_refuses_paths_out_of_the_folder(exported, tmp_path, cli):
    copy = tmp_path / "copy"
    shutil.copytree(exported, copy)
    outside = shutil.copy(exported / "model.onnx", tmp_path / "model.onnx")
    (copy / "model.onnx").unlink()
    (copy / "model.onnx").symlink_to(outside)
    manifest = json.loads((copy / "manifest.json").read_text())
    passwd = {**manifest["artifacts"][0], "path": "/etc/passwd", "sha256": sha256(Path("/etc/passwd"))}
    parent = {**manifest["artifacts"][0], "path": "../model.onnx"}
    (copy / "manifest.json").write_text(json.dumps({**manifest, "artifacts": [*manifest["artifacts"], passwd, parent]}))
    status, out, err = cli("inspect", str(copy), "--json")
    assert status == 1
    assert [(a["path"], a["status"]) for a in json.loads(out)["artifacts"]] == [
        ("model.onnx", "refused"),
        ("model_program.pt2", "ok"),
        ("/etc/passwd", "refused"),
        ("../model.onnx", "refused"),
    ]
    assert "model.onnx is a symlink to" in err and "'/etc/passwd', which is not a plain file name" in err


def test_time_and_compare_refuse_a_changed_or_symlinked_file(exported, tmp_path, cli):
    copy = tmp_path / "copy"
    shutil.copytree(exported, copy)
    with open(copy / "model_program.pt2", "r+b") as file:  # one byte flipped, in the file's middle
        file.seek(file.seek(0, 2) // 2)
        byte = file.read(1)
        file.seek(-1, 1)
        file.write(bytes([byte[0] ^ 0xFF]))
    status, _, err = cli("time", str(copy / "model_program.pt2"), "--runs", "2", "--no-progress")
    assert status != 0 and "model_program.pt2 does not match" in err and "sha256" in err
    status, _, err = cli("compare", str(copy / "model.onnx"), str(copy / "model_program.pt2"), "--runs", "2")
    assert status != 0 and "model_program.pt2 does not match" in err
    outside = shutil.copy(exported / "model.onnx", tmp_path / "model.onnx")
    (copy / "model.onnx").unlink()
    (copy / "model.onnx").symlink_to(outside)
    status, _, err = cli("time", str(copy / "model.onnx"), "--runs", "2", "--no-progress")
    assert status != 0 and "model.onnx is a symlink to" in err


@pytest.mark.parametrize("how", list(BROKEN_MANIFESTS))
def test_a_broken_manifest_is_a_message_naming_it_and_what_is_wrong(exported, tmp_path, cli, how):
    copy = Path(shutil.copytree(exported, tmp_path / "copy"))
    message = break_manifest(copy, how)
    for command in (
        ["inspect", str(copy)],
        ["time", str(copy / "model.onnx"), "--runs", "2", "--no-progress"],
        ["compare", str(copy / "model.onnx"), str(copy / "model_program.pt2"), "--runs", "2", "--no-progress"],
    ):
        status, _, err = cli(*command)
        assert status == 2 and re.search(message, err), (command, err)
        assert err.startswith(f"lightning-quant {command[0]}: error: {copy / 'manifest.json'}")
        assert "Traceback" not in err


def test_time_uses_the_manifest_input_and_batch_size(exported, cli):
    status, out, err = cli("time", str(exported / "model.onnx"), "--batch-size", "32", "--runs", "20", "--json")
    assert status == 0, err
    result = json.loads(out)
    assert result["batch_size"] == 32 and result["runs"] == 20
    assert 0 < result["min_ms"] <= result["median_ms"] <= result["p90_ms"]
    assert result["throughput_per_s"] == pytest.approx(32_000 / result["median_ms"])


def test_time_shows_a_progress_bar(exported):
    done = run_cli("time", str(exported / "model_program.pt2"), "--runs", "30")
    assert done.returncode == 0, done.stderr
    assert "30/30" in done.stderr  # tqdm's bar on stderr
    assert "median" in done.stdout and "batch 4" in done.stdout


def test_compare_two_artifacts_interleaved(exported, cli):
    status, out, err = cli(
        "compare",
        str(exported / "model_program.pt2"),
        str(exported / "model.onnx"),
        "--runs",
        "20",
        "--batch-size",
        "8",
        "--json",
        "--no-progress",
    )
    assert status == 0, err
    result = json.loads(out)
    assert result["a"]["runs"] == result["b"]["runs"] == 20
    assert result["b_speedup_over_a"] == pytest.approx(result["a"]["median_ms"] / result["b"]["median_ms"])
    status, out, _ = cli(
        "compare", str(exported / "model_program.pt2"), str(exported / "model.onnx"), "--runs", "10", "--no-progress"
    )
    assert status == 0 and "x faster" in out


def test_time_without_a_manifest_needs_an_input_shape(exported, tmp_path, cli):
    lonely = tmp_path / "model.onnx"
    lonely.write_bytes((exported / "model.onnx").read_bytes())
    status, _, err = cli("time", str(lonely), "--runs", "5")
    assert status == 2 and "--input-shape" in err
    status, out, err = cli("time", str(lonely), "--runs", "5", "--input-shape", "8,1,8,8", "--json", "--no-progress")
    assert status == 0, err
    assert json.loads(out)["batch_size"] == 8


def test_bad_arguments_name_the_problem(exported, tmp_path, cli):
    status, _, err = cli("inspect", str(tmp_path))
    assert status == 2 and "no manifest.json" in err
    unknown = tmp_path / "weights.bin"
    unknown.write_bytes(b"0")
    status, _, err = cli("time", str(unknown), "--input-shape", "2,64")
    assert status == 2 and "--format" in err
    with pytest.raises(SystemExit) as exit_:  # argparse's own usage error
        cli("time", str(exported / "model.onnx"), "--runs", "0")
    assert exit_.value.code == 2
