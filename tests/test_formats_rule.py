"""Which formats must be made: a format the user listed that fails is an error; of the default formats, what
verified ships, one warning says what failed and the manifest records it (for the callbacks and deploy alike)."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import fast_trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_quant import WeightOnlyQuantization, deploy, load
from lightning_quant.quantization import QuantizationError, WeightOnlyConfig


class RunningProduct(L.LightningModule):
    """A Linear layer, then a running product of its gates: ``torch.cumprod``, which the ONNX exporter cannot
    convert, so of the weight-only default formats (onnx, torch_export) the onnx file fails and the program ships."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(32, 8)
        self.example_input_array = torch.rand(4, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cumprod(torch.sigmoid(self.linear(x)), dim=1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        generator = torch.Generator().manual_seed(0)
        data = TensorDataset(torch.rand(64, 32, generator=generator), torch.rand(64, 8, generator=generator))
        return DataLoader(data, batch_size=16)


def test_with_default_formats_a_callback_ships_what_verified_and_warns_once(tmp_path):
    callback = WeightOnlyQuantization()
    with pytest.warns(UserWarning, match="1 of the default formats failed for RunningProduct") as caught:
        fast_trainer(tmp_path, [callback]).fit(RunningProduct())
    assert sum("default formats failed" in str(w.message) for w in caught) == 1
    manifest = json.loads((tmp_path / "quantized" / "manifest.json").read_text())
    assert manifest["status"] == "partial" and list(manifest["failures"]) == ["onnx"]
    assert [a["format"] for a in manifest["artifacts"]] == ["torch_export"]
    x = torch.rand(3, 32)
    torch.testing.assert_close(load(tmp_path / "quantized")(x), callback.quantized_model(x))


def test_a_format_the_user_listed_that_fails_ends_the_fit_with_an_error(tmp_path):
    callback = WeightOnlyQuantization(formats=["onnx", "torch_export"])
    with pytest.raises(QuantizationError, match="could not produce 1 of 2 format") as error:
        fast_trainer(tmp_path, [callback]).fit(RunningProduct())
    manifest = json.loads((tmp_path / "quantized" / "manifest.json").read_text())
    assert list(manifest["failures"]) == ["onnx"] and [a["format"] for a in manifest["artifacts"]] == ["torch_export"]
    assert f"The trained float model is safe: {tmp_path / 'quantized' / 'float.ckpt'}" in str(error.value)
    assert (tmp_path / "quantized" / "float.ckpt").is_file() and manifest["float_checkpoint"] == "float.ckpt"


def test_deploy_follows_the_same_rule(tmp_path):
    model, x = RunningProduct().eval(), torch.rand(4, 32)
    with pytest.warns(UserWarning, match="1 of the default formats failed"):
        deployment = deploy(model, WeightOnlyConfig(), x, dirpath=tmp_path / "default")
    assert list(deployment.failures) == ["onnx"] and deployment.manifest["recommended"] in ("torch_export", None)
    with pytest.raises(QuantizationError, match="could not produce 1 of 2 format"):
        deploy(model, WeightOnlyConfig(), x, dirpath=tmp_path / "listed", formats=["onnx", "torch_export"])
