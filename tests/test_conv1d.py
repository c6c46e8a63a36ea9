"""transformers' ``Conv1D`` (GPT-2's attention and MLP projections: weight ``[in, out]``, ``addmm``) quantized like the
Linear it is, by every approach, on a small model without Lightning. The layer is transformers' own class."""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lightning_quant.export import export, load_artifact
from lightning_quant.quantization import DynamicQuantConfig, StaticQuantConfig, WeightOnlyConfig, quantize
from lightning_quant.quantization.layer_report import quantized_layers
from lightning_quant.quantization.layers import is_transposed_linear, linear_from_transposed, replace_transposed_linears
from lightning_quant.quantization.qat import prepare_qat
from lightning_quant.quantization.weight_only import convert, remove_qat
from lightning_quant.quantization.weight_only import prepare_qat as weight_only_qat

WIDTH = 32


class GPT2MLP(nn.Module):
    """GPT-2's MLP block as transformers writes it: Conv1D up, GELU, Conv1D down."""

    def __init__(self) -> None:
        super().__init__()
        self.c_fc = Conv1D(4 * WIDTH, WIDTH)
        self.c_proj = Conv1D(WIDTH, 4 * WIDTH)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.c_proj(nn.functional.gelu(self.c_fc(hidden)))


def hidden_states(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 6, WIDTH, generator=torch.Generator().manual_seed(seed))


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max())


def test_conv1d_is_recognised_as_a_transposed_linear_and_nn_conv1d_is_not():
    layer = Conv1D(8, 4)
    assert is_transposed_linear(layer) and not is_transposed_linear(nn.Conv1d(4, 8, 1))
    x = torch.randn(3, 5, 4)
    assert torch.allclose(linear_from_transposed(layer)(x), layer(x), atol=1e-6)


def with_linears(model: nn.Module) -> nn.Module:
    """``model`` with its Conv1D layers written as the nn.Linear layers they are (same weights, transposed)."""
    linears = copy.deepcopy(model)
    replace_transposed_linears(linears)
    assert type(linears.c_fc) is nn.Linear
    return linears


def test_static_and_dynamic_int8_quantize_conv1d_exactly_as_the_equal_linear():
    torch.manual_seed(0)
    model = GPT2MLP().eval()
    x, batches = hidden_states(4), [hidden_states(4, seed) for seed in range(3)]
    for config in (StaticQuantConfig(), DynamicQuantConfig()):
        int8 = quantize(model, config, x, batches)
        assert quantized_layers(int8) == {"c_fc", "c_proj"}
        assert torch.allclose(int8(x), quantize(with_linears(model), config, x, batches)(x), atol=1e-6)
        assert relative_error(int8(x), model(x)) < 0.05
    assert type(model.c_fc) is Conv1D  # the model itself is left as it was


def test_weight_only_qat_trains_conv1d_on_the_grid_it_ships_and_keeps_its_parameters():
    torch.manual_seed(0)
    model = GPT2MLP()
    names = dict(model.named_parameters())
    config = WeightOnlyConfig(bits=4, group_size=32)
    assert weight_only_qat(model, config) == ["c_fc", "c_proj"]
    assert dict(model.named_parameters()) == names  # same tensors, same names: checkpoints load into the plain model
    x = hidden_states(2)
    model(x).square().mean().backward()
    assert model.c_fc.weight.grad is not None and model.c_fc.weight.grad.abs().sum() > 0
    with torch.no_grad():
        fake_quantized = model(x)
        shipped = convert(model, config)
        # the QAT forward rounds each output's 32 input weights exactly as the stored int4 layer does
        assert torch.allclose(shipped(x), fake_quantized, atol=1e-5)
    assert type(shipped.c_fc).__name__ == "WeightOnlyLinear"
    remove_qat(model)
    assert type(model.c_fc) is Conv1D and not hasattr(model.c_fc, "bits")


def qat_trained(model: nn.Module) -> nn.Module:
    """The int8 model of a few QAT steps on ``model`` (ends in eval mode, the QAT graph attached)."""
    qat = prepare_qat(model, hidden_states(4))
    qat.attach()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for step in range(3):
        model(hidden_states(8, step)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    return qat.convert()


def test_qat_trains_and_converts_conv1d_exactly_as_the_equal_linear():
    torch.manual_seed(0)
    model = GPT2MLP()
    linears = with_linears(model)
    int8 = qat_trained(model)
    assert quantized_layers(int8) == {"c_fc", "c_proj"}
    x = hidden_states(3, seed=7)
    # the same fake-quant (per output channel of the transposed weight), the same steps, the same int8 model
    linear_int8 = qat_trained(linears)
    assert torch.allclose(model.c_fc.weight.t(), linears.c_fc.weight, atol=1e-6)
    assert torch.allclose(int8(x), linear_int8(x), atol=1e-6)


def test_the_aoti_file_of_int8_conv1d_computes_what_the_int8_model_does(tmp_path):
    # convert_pt2e folds a transposed weight into a transposed view, which AOTInductor's int8 linear read as if it
    # were contiguous (outputs 160% off) until the converted weights were made contiguous
    torch.manual_seed(0)
    model = GPT2MLP().eval()
    x = hidden_states(4)
    int8 = quantize(model, StaticQuantConfig(), x, [hidden_states(4, seed) for seed in range(3)])
    export(int8, x, ["aoti"], tmp_path)
    compiled = load_artifact(tmp_path / "model_aoti.pt2", "aoti")
    assert relative_error(compiled(x), int8(x)) < 0.01
