"""The "openvino" format: an OpenVINO IR (.xml + .bin) converted from the ONNX file the approach makes, with int8
weights in the target's range, verified, timed, listed with both files' sha256, and loadable by plain OpenVINO."""

from __future__ import annotations

import json
import sys

import lightning as L
import pytest
import torch
from conftest import fast_trainer, produced_formats, run_files_alone
from sklearn.datasets import load_digits
from torch import nn

from lightning_quant import PostTrainingQuantization, QuantizationAwareTraining, deploy, load
from lightning_quant.checks import check_formats
from lightning_quant.cli import main as cli_main
from lightning_quant.demo import ConvNet, DigitsClassifier, DigitsDataModule
from lightning_quant.export.formats import FORMATS_BY_NAME
from lightning_quant.export.openvino import int8_weight_range
from lightning_quant.quantization import StaticQuantConfig

IMAGES = torch.tensor(load_digits().images, dtype=torch.float32).unsqueeze(1) / 16


def small_convnet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 64, 10),
    ).eval()


@pytest.fixture(scope="module")
def static_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("static_openvino")
    model = small_convnet()
    deploy(
        model,
        StaticQuantConfig(),
        IMAGES[:4],
        calibration_data=list(IMAGES[:256].split(32)),
        dirpath=folder,
        formats=["onnx", "openvino"],
    )
    return model, folder


def test_static_int8_openvino_file_holds_7_bit_weights_and_matches_float(static_folder):
    model, folder = static_folder
    manifest = json.loads((folder / "manifest.json").read_text())
    assert produced_formats(manifest) == {"onnx", "openvino"}
    entry = next(a for a in manifest["artifacts"] if a["format"] == "openvino")
    xml, weights = folder / "model_openvino.xml", folder / "model_openvino.bin"
    assert entry["path"] == xml.name and entry["details"]["weights_file"] == weights.name
    assert entry["bytes"] == xml.stat().st_size + weights.stat().st_size
    # int8 weights (not folded back to float), 7-bit for the default avx2 target: exact on CPUs without VNNI
    assert int8_weight_range(xml) is not None
    assert entry["verification"]["int8_weight_range"] == list(int8_weight_range(xml))
    assert -64 <= int8_weight_range(xml)[0] and int8_weight_range(xml)[1] <= 64
    assert entry["compared_with"] == "float" and entry["latency_ms"] > 0
    x = IMAGES[1000:1013]  # 13 images: any batch size, not the example's 4
    loaded = load(folder, format="openvino")
    error = (loaded(x) - model(x)).abs().max() / model(x).abs().max()
    assert error < 0.1
    # plain OpenVINO, without lightning_quant, runs the same file to the same numbers
    alone = run_files_alone(folder, x)
    torch.testing.assert_close(alone["openvino"][0], loaded(x))


def test_a_changed_or_missing_weights_file_is_refused(static_folder, tmp_path, capsys):
    import shutil

    _, source = static_folder
    folder = tmp_path / "copy"
    shutil.copytree(source, folder)
    weights = folder / "model_openvino.bin"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"model_openvino.bin does not match .*sha256"):
        load(folder, format="openvino")
    assert cli_main(["inspect", str(folder)]) != 0
    assert "sha256 mismatch" in capsys.readouterr().out
    weights.unlink()
    with pytest.raises(FileNotFoundError, match=r"model_openvino.bin is listed in .* but missing"):
        load(folder, format="openvino")


def test_default_formats_leave_openvino_out_where_it_is_not_installed(monkeypatch):
    supported, default = ("aoti", "onnx", "openvino"), ("aoti", "onnx", "openvino")
    assert check_formats(None, supported, default, "deploy") == ["aoti", "onnx", "openvino"]
    monkeypatch.setitem(sys.modules, "openvino", None)  # what `import openvino` sees where it is not installed
    assert not FORMATS_BY_NAME["openvino"].installed
    assert check_formats(None, supported, default, "deploy") == ["aoti", "onnx"]
    with pytest.raises(ValueError, match=r'needs the openvino package.*pip install "lightning-quant\[openvino\]"'):
        check_formats(["openvino"], supported, default, "PostTrainingQuantization")


@pytest.mark.parametrize("approach", ["static", "qat"])
def test_callbacks_ship_an_int8_openvino_file_by_default(tmp_path, approach):
    callback = (
        PostTrainingQuantization(dirpath=tmp_path / "out", num_calibration_batches=4)
        if approach == "static"
        else QuantizationAwareTraining(dirpath=tmp_path / "out")
    )
    L.seed_everything(0)
    trainer = fast_trainer(tmp_path, [callback])
    trainer.fit(DigitsClassifier(ConvNet(channels=16)), datamodule=DigitsDataModule(batch_size=64))
    manifest = callback.manifest
    assert "openvino" in produced_formats(manifest)
    xml = tmp_path / "out" / "model_openvino.xml"
    # QAT's file is its own int8 graph (QAT's ranges), static's ONNX Runtime's QDQ of the float model: both int8
    assert int8_weight_range(xml) is not None
    entry = next(a for a in manifest["artifacts"] if a["format"] == "openvino")
    assert entry["compared_with"] == ("float" if approach == "static" else "quantized")
    x = IMAGES[:64]
    torch.testing.assert_close(
        load(tmp_path / "out", format="openvino")(x), run_files_alone(tmp_path / "out", x)["openvino"][0]
    )
