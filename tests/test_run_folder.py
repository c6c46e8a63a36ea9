"""A folder belongs to one run at a time, and a run replaces the previous run's files only when it succeeds: a
concurrent run is refused, a failing or interrupted rerun leaves the previous good run loadable and complete, a
successful rerun leaves nothing of the earlier run behind."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, fast_trainer
from torch import nn

from lightning_quant import DynamicQuantization, deploy, load
from lightning_quant.demo import DigitsClassifier, DigitsDataModule, MLPNet
from lightning_quant.files import sha256
from lightning_quant.quantization import DynamicQuantConfig, QuantizationError
from lightning_quant.run_folder import LOCK, FolderInUseError, lock, unlock

# deploy a small MLP into argv[1]: what another process does in the same folder
DEPLOY = """
import sys, torch
from torch import nn
from lightning_quant import deploy
from lightning_quant.quantization import DynamicQuantConfig
torch.manual_seed(int(sys.argv[2]))
model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)).eval()
deploy(model, DynamicQuantConfig(), torch.rand(4, 64), dirpath=sys.argv[1], formats=["onnx"])
print("deployed")
"""


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)).eval()


def start_deploy(folder: Path, seed: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", DEPLOY, str(folder), str(seed)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def wait_for(condition, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def complete(folder: Path) -> dict:
    """The manifest in ``folder``, after checking every file it lists is there with its sha256 and no other file is
    (a failed or interrupted run's own folder may be)."""
    manifest = json.loads((folder / "manifest.json").read_text())
    for artifact in manifest["artifacts"]:
        assert sha256(folder / artifact["path"]) == artifact["sha256"], artifact["path"]
    assert sorted(p.name for p in folder.iterdir() if p.is_file()) == manifest["files"]
    return manifest


def test_a_second_run_into_a_folder_in_use_is_refused_naming_the_first(tmp_path):
    other = start_deploy(tmp_path, seed=0)
    wait_for(lambda: (tmp_path / LOCK).is_file() and (tmp_path / LOCK).read_text(), other)
    with pytest.raises(
        FolderInUseError, match=rf"in use by another run \(deploy, pid {other.pid} on {socket.gethostname()}"
    ):
        deploy(mlp(1), DynamicQuantConfig(), torch.rand(4, 64), dirpath=tmp_path, formats=["onnx"])
    out, err = other.communicate(timeout=300)
    assert other.returncode == 0 and "deployed" in out, err[-3000:]
    manifest = complete(tmp_path)  # the first run's files, all of them, and no lock left behind
    assert manifest["status"] == "ok" and [a["format"] for a in manifest["artifacts"]] == ["onnx"]
    x = torch.rand(3, 64)
    torch.testing.assert_close(load(tmp_path)(x), mlp(0)(x), atol=0.05, rtol=0.05)  # the first run's model


def test_a_failing_rerun_keeps_the_previous_good_run_loadable_and_complete(tmp_path):
    good = deploy(mlp(0), DynamicQuantConfig(), torch.rand(4, 64), dirpath=tmp_path, formats=["onnx"])
    before = (tmp_path / "manifest.json").read_bytes()
    nothing_to_quantize = DynamicQuantConfig(keep_float=("0", "2"))  # every Linear kept float
    with pytest.raises(QuantizationError, match="produced no quantized op") as caught:
        deploy(mlp(1), nothing_to_quantize, torch.rand(4, 64), dirpath=tmp_path, formats=["onnx", "torch_export"])
    assert (tmp_path / "manifest.json").read_bytes() == before and complete(tmp_path)["status"] == "ok"
    x = torch.rand(5, 64)
    torch.testing.assert_close(load(tmp_path)(x), good.model(x))
    # the failed run's manifest and report: beside, where the message says
    [failed] = [p for p in tmp_path.iterdir() if p.is_dir()]
    message = str(caught.value)
    assert f"{tmp_path} still holds the previous run" in message and f"Full report: {failed / 'errors.log'}" in message
    assert json.loads((failed / "manifest.json").read_text())["status"] == "failed"
    assert "produced no quantized op" in (failed / "errors.log").read_text()


def test_ctrl_c_during_a_rerun_keeps_the_previous_good_run(tmp_path):
    deploy(mlp(0), DynamicQuantConfig(), torch.rand(4, 64), dirpath=tmp_path, formats=["onnx"])
    before = complete(tmp_path)
    rerun = start_deploy(tmp_path, seed=1)
    # Ctrl-C once the rerun's new onnx file is written (it is then verified and timed, seconds before it would ship)
    wait_for(lambda: any(tmp_path.glob("unfinished-*/model.onnx")), rerun)
    rerun.send_signal(signal.SIGINT)
    _, err = rerun.communicate(timeout=120)
    assert rerun.returncode != 0 and "KeyboardInterrupt" in err
    assert complete(tmp_path) == before  # the previous run's manifest, and its files, unchanged
    assert not (tmp_path / LOCK).exists()


def test_a_successful_rerun_leaves_nothing_of_the_earlier_runs(tmp_path):
    with pytest.raises(QuantizationError):  # a failed first run: its manifest and report go into the folder
        deploy(mlp(0), DynamicQuantConfig(keep_float=("0", "2")), torch.rand(4, 64), dirpath=tmp_path)
    assert {"manifest.json", "errors.log"} <= {p.name for p in tmp_path.iterdir()}
    deploy(mlp(0), DynamicQuantConfig(), torch.rand(4, 64), dirpath=tmp_path, formats=["onnx"])
    assert complete(tmp_path)["files"] == ["manifest.json", "model.onnx"]  # no errors.log
    deploy(mlp(1), DynamicQuantConfig(), torch.rand(4, 64), dirpath=tmp_path, formats=["torch_export"])
    assert complete(tmp_path)["files"] == ["manifest.json", "model_program.pt2"]  # the earlier model.onnx is gone
    assert not any(p.is_dir() for p in tmp_path.iterdir())


def test_a_fit_into_a_folder_in_use_is_refused_before_training(tmp_path):
    held = lock(tmp_path / "quantized", "deploy")  # another run (here: this process) holds the folder
    try:
        trainer = fast_trainer(tmp_path, [DynamicQuantization(formats=["onnx"])])
        with pytest.raises(FolderInUseError, match=rf"DynamicQuantization: .*quantized is in use .*pid {os.getpid()}"):
            trainer.fit(DigitsClassifier(MLPNet()), datamodule=DigitsDataModule(batch_size=32))
        assert trainer.global_step == 0
    finally:
        unlock(held)
    callback = DynamicQuantization(formats=["onnx"])  # free again: the fit runs, and releases the folder at its end
    fast_trainer(tmp_path, [callback]).fit(DigitsClassifier(MLPNet()), datamodule=DigitsDataModule(batch_size=32))
    manifest = complete(tmp_path / "quantized")
    assert manifest["float_checkpoint"] == "float.ckpt" and "float.ckpt" in manifest["files"]


def test_a_lock_left_by_a_process_that_is_gone_is_taken_over(tmp_path):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    left = {"owner": "deploy", "pid": int(gone.stdout), "host": socket.gethostname(), "started": "earlier"}
    (tmp_path / LOCK).write_text(json.dumps(left))
    held = lock(tmp_path, "PostTrainingQuantization")
    assert json.loads(held.read_text())["pid"] == os.getpid()
    unlock(held)
    assert not held.exists()
