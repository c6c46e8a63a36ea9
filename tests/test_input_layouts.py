"""Loaded files take inputs in any memory layout and behave like modules, every format.

An AOTInductor package assumes the strides it was compiled with: a slice of a batch, a transposed view or a
channels-last tensor once gave silently wrong numbers (relative errors 0.02 to 1.6 here).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_quant import load
from lightning_quant.export import export
from lightning_quant.manifest import FORMAT_VERSION, write_manifest
from lightning_quant.pipeline import InferenceModel
from lightning_quant.quantization import WeightOnlyConfig, quantize

FORMATS = ["aoti", "onnx", "torch_export", "torchscript"]


class ImagesAndTokens(nn.Module):
    """A conv net on 3-channel images (channels-last matters) plus an embedding of tokens (slices matter)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 32, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()
        )
        self.embed = nn.Embedding(20, 32)
        self.head = nn.Linear(32, 5)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(images) + self.embed(tokens).mean(1))


def views() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Inputs of the example's shapes ((batch, 3, 8, 8) images, (batch, 6) tokens) that are not contiguous."""
    images, tokens = torch.rand(5, 3, 10, 10), torch.randint(0, 20, (5, 18))
    return {
        "channels-last": (torch.rand(5, 3, 8, 8).to(memory_format=torch.channels_last), tokens[:, :6].contiguous()),
        "transposed": (torch.rand(5, 3, 8, 8).transpose(2, 3), torch.randint(0, 20, (6, 5)).t()),
        "sliced": (images[:, :, 1:9, 1:9], tokens[:, 4:10]),  # tokens[:, i:i+n] of a longer batch, a generation step
    }


def files(model: nn.Module, example: tuple, formats: list[str], dirpath) -> None:
    """``model`` exported in ``formats`` with a manifest ``load`` reads (no verification or timing: only loading)."""
    artifacts = export(model, example, formats, dirpath)
    write_manifest({"format_version": FORMAT_VERSION, "artifacts": [a.to_dict() for a in artifacts]}, dirpath)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = ImagesAndTokens().eval()
    dirpath = tmp_path_factory.mktemp("layouts")
    files(model, (torch.rand(4, 3, 8, 8), torch.randint(0, 20, (4, 6))), FORMATS, dirpath)
    return model, dirpath


def relative_error(expected: torch.Tensor, got: torch.Tensor) -> float:
    return float((expected - got).abs().max() / expected.abs().max())


@pytest.mark.parametrize("format", FORMATS)
def test_every_format_takes_slices_transposes_and_channels_last_inputs(exported, format):
    model, dirpath = exported
    loaded = load(dirpath, format=format)
    for name, (images, tokens) in views().items():
        with torch.no_grad():
            expected = model(images, tokens)
        assert relative_error(expected, loaded(images, tokens)) < 1e-4, name


def test_the_deployed_model_takes_them_too(exported):
    model, dirpath = exported
    deployed = InferenceModel(model.forward, model, load(dirpath, format="aoti"), "aoti", "float")
    for name, (images, tokens) in views().items():
        with torch.no_grad():
            expected = model(images, tokens)
        assert relative_error(expected, deployed(images, tokens)) < 1e-4, name


@pytest.mark.parametrize("format", FORMATS)
def test_what_load_returns_is_a_module_without_a_training_mode(exported, format):
    model, dirpath = exported
    loaded = load(dirpath, format=format)
    images, tokens = torch.rand(3, 3, 8, 8), torch.randint(0, 20, (3, 6))
    with torch.no_grad():
        expected = model(images, tokens)
    assert loaded.eval() is loaded and not loaded.training
    assert loaded.train(False) is loaded and loaded.to("cpu") is loaded
    with torch.no_grad():
        assert relative_error(expected, loaded(images, tokens)) < 1e-4
    with torch.inference_mode():
        assert relative_error(expected, loaded(images, tokens)) < 1e-4
    loaded.train()  # records the flag only: a file computes the same in any mode
    assert loaded.training and relative_error(expected, loaded(images, tokens)) < 1e-4


def test_a_torchao_file_takes_any_layout_and_is_a_module(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(50, 64), nn.Flatten(), nn.Linear(6 * 64, 10)).eval()
    int4 = quantize(model, WeightOnlyConfig(bits=4), torch.randint(0, 50, (4, 6)))
    files(int4, torch.randint(0, 50, (4, 6)), ["torchao"], tmp_path)
    loaded = load(tmp_path).eval().train(False).to("cpu")
    tokens = torch.randint(0, 50, (5, 18))
    for view in (tokens[:, 4:10], torch.randint(0, 50, (6, 5)).t()):
        with torch.inference_mode():
            assert relative_error(int4(view), loaded(view)) < 1e-5
