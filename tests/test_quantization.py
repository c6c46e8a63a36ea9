"""The int8 core without Lightning: quantize (static PT2E, dynamic), op counting, keep-float, bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_quant.benchmark import model_bytes
from lightning_quant.capture import NOTES_KEY
from lightning_quant.demo import ConvNet, LSTMNet, MLPNet
from lightning_quant.quantization import (
    DynamicQuantConfig,
    ModelInputs,
    QuantizationError,
    StaticQuantConfig,
    count_quantized_ops,
    quantize,
)


class TwoInputs(nn.Module):
    """Several inputs and a keyword-only argument, like a real multi-modal forward."""

    def __init__(self) -> None:
        super().__init__()
        self.image = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.side = nn.Linear(8, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, image: torch.Tensor, side: torch.Tensor, *, scale: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.image(image) + self.side(side)) * scale)


def two_inputs(batch: int) -> dict[str, torch.Tensor]:
    return {"image": torch.rand(batch, 3, 8, 8), "side": torch.rand(batch, 8), "scale": torch.rand(batch, 1) + 0.5}


def digits_like(batches: int = 4, batch: int = 16) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.rand(batch, 1, 8, 8, generator=generator) for _ in range(batches)]


@pytest.fixture(scope="module")
def convnet():
    torch.manual_seed(0)
    return ConvNet(channels=16).eval()


@pytest.fixture(scope="module")
def static_convnet(convnet):
    return quantize(convnet, StaticQuantConfig(observer="minmax"), torch.zeros(4, 1, 8, 8), digits_like())


def test_static_int8_counts_quantized_convs_and_tracks_the_float_model(convnet, static_convnet):
    ops = count_quantized_ops(static_convnet)
    # 4 convs + the head, minus the one-input-channel conv that stays float (AOTInductor bug workaround)
    assert ops == {"aten.conv2d (int8 weight)": 3, "aten.linear (int8 weight)": 1}
    x = digits_like(1, 64)[0]
    with torch.no_grad():
        float_out, int8_out = convnet(x), static_convnet(x)
    assert int8_out.shape == float_out.shape
    assert (int8_out - float_out).abs().max() < 0.1 * float_out.abs().max()
    assert model_bytes(static_convnet) < 0.5 * model_bytes(convnet)


@pytest.mark.parametrize("observer", ["histogram", "moving_average"])
def test_every_observer_calibrates(convnet, observer):
    int8 = quantize(
        convnet, StaticQuantConfig(observer=observer, per_channel=False), torch.zeros(4, 1, 8, 8), digits_like(2)
    )
    assert sum(count_quantized_ops(int8).values()) == 4


def test_keep_float_leaves_named_modules_in_float(convnet):
    int8 = quantize(
        convnet, StaticQuantConfig(observer="minmax", keep_float=("head",)), torch.zeros(4, 1, 8, 8), digits_like(2)
    )
    assert "aten.linear (int8 weight)" not in count_quantized_ops(int8)
    dynamic = quantize(MLPNet().eval(), DynamicQuantConfig(keep_float=("layers.5",)), torch.zeros(4, 1, 8, 8))
    assert count_quantized_ops(dynamic) == {"Linear (Int8Tensor)": 2}
    assert type(dynamic.layers[5].weight) is nn.Parameter


def test_dynamic_int8_quantizes_linear_and_lstm_and_says_the_lstm_kernel_is_legacy(monkeypatch):
    from lightning_quant import deprecated

    monkeypatch.setattr(deprecated, "_told", set())  # the warning is said once per process: forget earlier tests
    model = LSTMNet().eval()
    x = torch.rand(4, 1, 8, 8)
    with pytest.warns(FutureWarning, match="deprecated torch"):
        int8 = quantize(model, DynamicQuantConfig(), x)
    assert count_quantized_ops(int8) == {"LSTM (legacy torch.ao int8)": 1, "Linear (Int8Tensor)": 1}
    assert (int8(x) - model(x)).abs().max() < 0.1 * model(x).abs().max()
    assert isinstance(model.lstm, nn.LSTM)  # the input model is untouched
    float_lstm = quantize(model, DynamicQuantConfig(recurrent=False), x)
    assert count_quantized_ops(float_lstm) == {"Linear (Int8Tensor)": 1}


def test_several_inputs_and_a_keyword_argument():
    torch.manual_seed(0)
    model = TwoInputs().eval()
    example = two_inputs(4)
    static = quantize(model, StaticQuantConfig(observer="minmax"), example, [two_inputs(8) for _ in range(3)])
    dynamic = quantize(model, DynamicQuantConfig(), example)
    batch = two_inputs(5)
    expected = model(**batch)
    for int8 in (static, dynamic):
        out = int8(batch["image"], batch["side"], scale=batch["scale"])
        assert out.shape == (5, 4)
        assert (out - expected).abs().max() < 0.1 * expected.abs().max()
    assert ModelInputs.from_value(example).bind(model.forward).kwargs.keys() == {"scale"}


def test_zero_quantized_ops_is_an_error_naming_the_model():
    with pytest.raises(QuantizationError, match="Sequential produced no quantized op"):
        quantize(nn.Sequential(nn.Flatten(), nn.ReLU()).eval(), DynamicQuantConfig(), torch.zeros(4, 1, 8, 8))
    with pytest.raises(QuantizationError, match="MLPNet produced no quantized op"):
        quantize(MLPNet().eval(), DynamicQuantConfig(keep_float=("layers",)), torch.zeros(4, 1, 8, 8))


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow: torch.export cannot capture it
            return self.linear(x)
        return x


def test_an_unexportable_model_gets_an_error_naming_it_and_the_reason():
    with pytest.raises(
        QuantizationError,
        match=r"DataDependent\.forward: the branch at tests/test_quantization.py:\d+ `if x.sum\(\) > 0:.*` depends on the input's values",
    ):
        quantize(DataDependent().eval(), StaticQuantConfig(), torch.rand(4, 8), [torch.rand(4, 8)])


def test_bad_configs_fail_with_what_is_allowed():
    with pytest.raises(ValueError, match=r"Unknown observer 'percentile'; choose one of \['minmax'"):
        StaticQuantConfig(observer="percentile")
    with pytest.raises(TypeError, match="keep_float must be a list of module names"):
        DynamicQuantConfig(keep_float="head")
    with pytest.raises(ValueError, match="calibration_data yielded no batch"):
        quantize(ConvNet().eval(), StaticQuantConfig(), torch.zeros(4, 1, 8, 8), [])
    with pytest.raises(ValueError, match="needs calibration_data"):
        quantize(ConvNet().eval(), StaticQuantConfig(), torch.zeros(4, 1, 8, 8))


def test_count_quantized_ops_of_a_float_model_is_empty():
    assert count_quantized_ops(ConvNet()) == {}


class KeyValueCache:
    """An object a model returns beside its tensors, as a Hugging Face model returns its ``DynamicCache``."""


class ReturnsACache(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> dict[str, object]:
        return {"logits": self.linear(x), "cache": KeyValueCache()}


def test_static_int8_captures_a_forward_whose_output_holds_an_object_that_is_not_a_tensor():
    x = torch.randn(4, 8)
    int8 = quantize(ReturnsACache().eval(), StaticQuantConfig(), x, [x])
    output = int8(torch.randn(3, 8))
    assert output["cache"] is None and output["logits"].shape == (3, 4)
    assert "forward's output holds objects that are not tensors (cache: KeyValueCache)" in int8.meta[NOTES_KEY][0]
