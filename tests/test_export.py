"""Export without Lightning: every format written atomically, reloaded in a fresh process and compared."""

from __future__ import annotations

import hashlib

import onnx
import onnxruntime
import pytest
import torch
from test_quantization import TwoInputs, digits_like, two_inputs
from torch import nn

from lightning_quant.demo import ConvNet, MLPNet
from lightning_quant.export import (
    OrtDynamicQuantization,
    OrtStaticQuantization,
    export,
    load_artifact,
    verify_artifacts,
)
from lightning_quant.quantization import DynamicQuantConfig, ModelInputs, QuantizationError, StaticQuantConfig, quantize
from lightning_quant.quantization._legacy import legacy_quantize_dynamic


@pytest.fixture(scope="module")
def static_convnet():
    torch.manual_seed(0)
    model = ConvNet(channels=16).eval()
    calibration = digits_like()
    int8 = quantize(model, StaticQuantConfig(observer="minmax"), calibration[0][:4], calibration)
    return model, int8, calibration


def test_static_int8_in_every_format_reloads_in_a_fresh_process_and_matches(static_convnet, tmp_path):
    model, int8, calibration = static_convnet
    inputs = ModelInputs.from_value(calibration[0][:4])
    onnx_recipe = OrtStaticQuantization([ModelInputs.from_value(b) for b in calibration], observer="minmax")
    artifacts = export(int8, inputs, ["aoti", "onnx", "torch_export"], tmp_path, float_model=model,
                       onnx_quantization=onnx_recipe)
    assert [a.format for a in artifacts] == ["aoti", "onnx", "torch_export"]
    for artifact in artifacts:
        path = tmp_path / artifact.path
        assert artifact.bytes == path.stat().st_size
        assert artifact.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]  # atomic writes leave nothing behind

    # batch sizes 4 (the example) and 64: the batch dimension is dynamic
    report = verify_artifacts(artifacts, int8, [inputs, ModelInputs.from_value(digits_like(1, 64)[0])], tmp_path,
                              float_model=model)
    assert set(report) == {"aoti", "onnx", "torch_export"}
    assert report["aoti"]["relative_error"] < 1e-3  # the lowered int8 kernels compute what the reference does
    for result in report.values():
        assert result["relative_error"] <= result["tolerance"]
        assert result["batch_sizes"] == [4, 64]
        assert result["latency_ms"] > 0
    # ONNX Runtime quantized the float model itself: its file is held to the float model
    assert report["onnx"]["compared_with"] == "float" and report["aoti"]["compared_with"] == "quantized"

    # the ONNX file is ONNX Runtime's own QDQ int8 and runs in onnxruntime
    graph = onnx.load(str(tmp_path / "model.onnx")).graph
    assert {"QuantizeLinear", "DequantizeLinear"} <= {node.op_type for node in graph.node}
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    x = digits_like(1, 7)[0]
    (logits,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert logits.shape == (7, 10)
    assert (torch.from_numpy(logits).argmax(1) == model(x).argmax(1)).float().mean() >= 0.8


def test_verification_catches_an_artifact_that_does_not_match(static_convnet, tmp_path):
    model, int8, calibration = static_convnet
    artifacts = export(int8, calibration[0][:4], ["torch_export"], tmp_path)
    other = ConvNet(channels=16).eval()  # different weights: the file cannot match it
    with pytest.raises(QuantizationError, match="torch_export .* against the quantized model exceeds the tolerance"):
        verify_artifacts(artifacts, other, [ModelInputs.from_value(calibration[0])], tmp_path)


def test_dynamic_int8_exports_to_onnx_torch_export_and_legacy_torchscript(tmp_path):
    torch.manual_seed(0)
    model = MLPNet().eval()
    x = torch.rand(4, 1, 8, 8)
    int8 = quantize(model, DynamicQuantConfig(), x)
    legacy = MLPNet().eval()
    legacy.load_state_dict(model.state_dict())
    legacy_quantize_dynamic(legacy, (nn.Linear,))
    artifacts = export(int8, x, ["onnx", "torch_export", "torchscript"], tmp_path, float_model=model,
                       onnx_quantization=OrtDynamicQuantization(), models={"torchscript": legacy})
    cases = [ModelInputs.from_value(x), ModelInputs.from_value(torch.rand(9, 1, 8, 8))]
    report = verify_artifacts(artifacts, int8, cases, tmp_path, float_model=model)
    assert report["torch_export"]["relative_error"] < 1e-4
    ops = {node.op_type for node in onnx.load(str(tmp_path / "model.onnx")).graph.node}
    assert ops & {"DynamicQuantizeLinear", "MatMulInteger", "DynamicQuantizeMatMul"}
    assert load_artifact(tmp_path / "model.ts", "torchscript")(torch.rand(3, 1, 8, 8)).shape == (3, 10)


def test_several_inputs_and_a_keyword_argument_in_every_format(tmp_path):
    torch.manual_seed(0)
    model = TwoInputs().eval()
    int8 = quantize(model, DynamicQuantConfig(), two_inputs(4))
    artifacts = export(int8, two_inputs(4), ["onnx", "torch_export"], tmp_path, float_model=model,
                       onnx_quantization=OrtDynamicQuantization())
    verify_artifacts(artifacts, int8, [ModelInputs.from_value(two_inputs(6)).bind(model.forward)], tmp_path,
                     float_model=model)
    batch = two_inputs(5)
    for artifact in artifacts:
        out = load_artifact(tmp_path / artifact.path, artifact.format)(batch["image"], batch["side"], scale=batch["scale"])
        assert out.shape == (5, 4)


def test_a_failing_format_names_itself_and_leaves_no_partial_file(tmp_path):
    legacy = MLPNet().eval()
    legacy_quantize_dynamic(legacy, (nn.Linear,))  # legacy packed weights: torch.export cannot capture them
    with pytest.raises(QuantizationError, match="Exporting MLPNet to 'torch_export' failed"):
        export(legacy, torch.rand(4, 1, 8, 8), ["torch_export"], tmp_path)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match=r"Unknown export format\(s\) \['tflite'\]"):
        export(legacy, torch.rand(4, 1, 8, 8), ["tflite"], tmp_path)
