"""The Lightning-free pipeline: deploy() quantizes, exports, verifies, times and writes a manifest load() accepts."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, produced_formats
from torch import nn

from lightning_quant import deploy, load
from lightning_quant.quantization import DynamicQuantConfig, QuantizationError, StaticQuantConfig, WeightOnlyConfig

# A process that never imports Lightning: static int8 of a plain nn.Module, digits as calibration data.
WITHOUT_LIGHTNING = """
import json, sys, torch
from sklearn.datasets import load_digits
from lightning_quant import deploy, load
from lightning_quant.quantization import StaticQuantConfig
images = torch.tensor(load_digits().images, dtype=torch.float32).unsqueeze(1) / 16
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                            torch.nn.Linear(16 * 64, 10)).eval()
deployment = deploy(model, StaticQuantConfig(), images[:4], calibration_data=list(images[:256].split(32)),
                    dirpath=sys.argv[1], formats=["onnx", "torch_export"])
fast = load(sys.argv[1], "torch_export")
expected = model(images[:7])
print(json.dumps({
    "lightning": any(name == "lightning" or name.startswith("lightning.") for name in sys.modules),
    "error": float((fast(images[:7]) - expected).abs().max() / expected.abs().max()),
    "deployed_shape": list(deployment.model(images[:7]).shape),
}))
"""


def test_deploy_without_lightning_writes_files_and_a_manifest_that_load_accepts(tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_LIGHTNING, str(tmp_path)], capture_output=True, text=True, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["lightning"] is False
    assert result["error"] < 0.1 and result["deployed_shape"] == [7, 10]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["approach"] == "static" and manifest["model"] == "Sequential"
    assert produced_formats(manifest) == {"onnx", "torch_export"}
    assert manifest["input"]["dynamic_batch"] is True
    assert manifest["latency_ms"]["input_shape"] == [32, 1, 8, 8]  # timed on a calibration batch, not the example
    assert manifest["metrics"]["note"].startswith("no evaluation data")


def test_deploy_the_float_model_for_inference(tmp_path):
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
    deployment = deploy(model, None, torch.rand(4, 1, 8, 8), dirpath=tmp_path, formats=["torch_export"])
    assert deployment.manifest["approach"] == "float" and deployment.manifest["quantized_ops"] == {}
    x = torch.rand(6, 1, 8, 8)
    torch.testing.assert_close(load(tmp_path)(x), model(x))


def test_deploy_names_what_is_wrong_with_its_arguments(tmp_path):
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval()
    with pytest.raises(TypeError, match="StaticQuantConfig, a DynamicQuantConfig or None"):
        deploy(model, "static", torch.rand(4, 1, 8, 8), dirpath=tmp_path)
    with pytest.raises(ValueError, match="example_input does not match"):
        deploy(model, DynamicQuantConfig(), {"inputs": torch.rand(4, 1, 8, 8)}, dirpath=tmp_path)
    with pytest.raises(ValueError, match="static int8 needs calibration_data"):
        deploy(model, StaticQuantConfig(), torch.rand(4, 1, 8, 8), dirpath=tmp_path)
    assert not (tmp_path / "manifest.json").exists()  # refused before anything was tried


def test_deploy_checks_every_argument_before_any_work_as_the_callbacks_do(tmp_path, cpu_lacking_a_target):
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 36, 10)).eval()
    x, out = torch.rand(4, 1, 8, 8), tmp_path / "out"
    refused = [
        (dict(formats="onnx"), TypeError, r"deploy: formats must be a list of strings .* \['onnx'\]"),
        (dict(formats=["onnx", "tflite"]), ValueError, r"deploy cannot export format\(s\) \['tflite'\]"),
        (dict(formats=["torchao"]), ValueError, r"cannot export format\(s\) \['torchao'\]"),  # weight-only only
        (dict(target="avx3"), ValueError, "Unknown target 'avx3'"),
        (
            dict(config=DynamicQuantConfig(target=cpu_lacking_a_target)),  # "amx" here: the README says refused
            RuntimeError,
            rf"deploy\(target={cpu_lacking_a_target!r}\).* lacks .*target='avx2'",
        ),
        (dict(config=DynamicQuantConfig(keep_float=("head",))), ValueError, r"keep_float names modules .*\['head'\]"),
        (
            dict(config=StaticQuantConfig(target="avx512_vnni"), target="avx2"),
            ValueError,
            r"deploy\(target='avx2'\) and StaticQuantConfig\(target='avx512_vnni'\) disagree.*Set it once",
        ),
        (
            dict(example_inputs=torch.randint(0, 9, (4, 1, 8, 8))),  # int64 where the conv takes float
            ValueError,
            r"Sequential.forward fails on the example input \(shape \[4, 1, 8, 8\], dtype int64\).*example_inputs=",
        ),
        (dict(example_inputs=torch.full((4, 1, 8, 8), float("nan"))), ValueError, "example_input holds NaN or inf"),
        (
            dict(config=StaticQuantConfig(), calibration_data=[x, torch.rand(4, 1, 6, 6)]),  # another image size
            ValueError,
            r"calibration_data\[1\] is not the call the example input is",
        ),
        (
            dict(config=StaticQuantConfig(), calibration_data=[(x, x)]),  # two arguments to a forward of one
            ValueError,
            r"calibration_data\[0\] does not fit",
        ),
        (
            dict(config=StaticQuantConfig(), calibration_data=[x.clone().fill_(float("inf"))]),
            ValueError,
            r"calibration_data\[0\] holds NaN or inf",
        ),
        (dict(config=StaticQuantConfig(), calibration_data=[]), ValueError, "static int8 needs calibration_data"),
    ]
    for changes, error, message in refused:
        arguments = {**dict(model=model, config=DynamicQuantConfig(), example_inputs=x, dirpath=out), **changes}
        with pytest.raises(error, match=message):
            deploy(**arguments)
    assert not out.exists()  # nothing was written, not even the folder


def test_a_failed_quantization_writes_a_failed_manifest_and_the_full_report(tmp_path):
    nothing_to_quantize = nn.Sequential(nn.Flatten(), nn.ReLU()).eval()
    with pytest.raises(QuantizationError, match="deploy failed on Sequential.*produced no quantized op") as caught:
        deploy(nothing_to_quantize, DynamicQuantConfig(), torch.rand(4, 1, 8, 8), dirpath=tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["status"] == "failed" and manifest["approach"] == "dynamic"
    assert manifest == caught.value.manifest
    assert "produced no quantized op" in (tmp_path / "errors.log").read_text()


def test_deploy_a_trained_qat_graph_keeps_the_model_attached(tmp_path):
    from lightning_quant.quantization.qat import prepare_qat

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    qat = prepare_qat(model, torch.rand(4, 1, 8, 8))
    qat.attach()
    model.train()
    for _ in range(4):
        model(torch.rand(16, 1, 8, 8))  # training steps: the ranges see data
    with pytest.raises(ValueError, match="prepared from another model"):
        deploy(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), qat, torch.rand(4, 1, 8, 8), dirpath=tmp_path)
    deployment = deploy(model, qat, torch.rand(4, 1, 8, 8), dirpath=tmp_path, formats=["torch_export"])
    assert deployment.manifest["approach"] == "qat" and sum(deployment.manifest["quantized_ops"].values()) > 0
    assert qat.attached  # the model still runs its fake-quant graph
    x = torch.rand(6, 1, 8, 8)
    torch.testing.assert_close(load(tmp_path)(x), qat.convert()(x), rtol=1e-4, atol=1e-4)


class BatchOfFour(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(64, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.reshape(4, 64))  # the batch of 4 is written into the code


def test_files_are_checked_at_a_second_batch_size_unless_the_model_pins_its_batch(tmp_path):
    dynamic = deploy(nn.Linear(64, 8), WeightOnlyConfig(bits=4), torch.rand(1, 64), dirpath=tmp_path / "any")
    assert dynamic.manifest["artifacts"]
    assert all(a["verification"]["batch_sizes"] == [1, 2] for a in dynamic.manifest["artifacts"])
    pinned = deploy(BatchOfFour(), WeightOnlyConfig(bits=4), torch.rand(4, 64), dirpath=tmp_path / "pinned")
    artifacts = pinned.manifest["artifacts"]
    assert artifacts and all(a["details"]["dynamic_batch"] is False for a in artifacts)
    assert all(a["verification"]["batch_sizes"] == [4, 4] for a in artifacts)
