"""Weight-only quantization (int4 or int8 weights in groups, float activations) for ``nn.Linear`` layers.

One grid everywhere: :func:`~lightning_quant.weight_packing.quantize_weight` rounds each group of ``group_size`` input weights to ``bits``-bit
integers with one float scale, the signed element of largest magnitude landing exactly on ``-2**(bits-1)`` (ONNX
Runtime's symmetric block quantization: all 16 int4 levels used, the largest weight kept exactly). Training
with :func:`prepare_qat` fake-quantizes on that grid, :func:`convert` stores it, and the ONNX file runs it in
ONNX Runtime's ``MatMulNBits`` kernel, so the weights a QAT run learned are the weights that ship.

Why not torchao's ``Int4WeightOnlyConfig`` / ``QATConfig`` here: on x86 CPUs torchao 0.18 refuses its CPU int4
packing and its int8 weight-only path ran 7x slower than float (``shared/MEASURED.md``), and its symmetric grid
(``max / 7.5``) is not the one ONNX Runtime's fast kernel stores; one grid keeps training and shipping exact.

Example::

    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    >>> int4 = convert(model, WeightOnlyConfig(bits=4, group_size=32))
    >>> type(int4[0]).__name__, int4[0].packed.dtype, tuple(int4[0].packed.shape)
    ('WeightOnlyLinear', torch.uint8, (32, 2, 16))
    >>> x = torch.rand(3, 64)
    >>> bool(torch.allclose(int4(x), nn.functional.linear(torch.relu(int4[0](x)), dequantize_linear(int4[2]),
    ...      int4[2].bias)))
    True
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from lightning_quant.quantization.config import check_keep_float, is_kept_float
from lightning_quant.weight_packing import dequantize, pack, quantize_weight

BITS = (4, 8)


@dataclass(frozen=True)
class WeightOnlyConfig:
    """Weight-only quantization of ``nn.Linear`` layers: ``bits``-bit weights (4 or 8) in groups of ``group_size``
    input features, one float scale per group; activations stay float.

    Args:
        bits: 4 (default) or 8.
        group_size: input features sharing one scale: a power of two, 16 to 256 (ONNX Runtime's ``MatMulNBits``
            block sizes). Layers whose input width is not a multiple of it stay float.
        keep_float: names of submodules left in float (as in ``model.named_modules()``).

    Example::

        >>> WeightOnlyConfig(bits=4, group_size=32).bits
        4
    """

    bits: int = 4
    group_size: int = 32
    keep_float: Sequence[str] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise ValueError(f"bits must be one of {list(BITS)}, got {self.bits!r}")
        if self.group_size not in (16, 32, 64, 128, 256):
            raise ValueError(
                f"group_size must be 16, 32, 64, 128 or 256 (ONNX Runtime's block sizes), got {self.group_size!r}"
            )
        check_keep_float(self.keep_float)


def fake_quantize_weight(weight: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """``weight`` rounded to the grid of :func:`quantize_weight`, with a straight-through gradient (QAT)."""
    q, scale = quantize_weight(weight, bits, group_size)
    rounded = (q.float().reshape(*scale.shape, group_size) * scale.unsqueeze(2)).reshape(weight.shape)
    return weight + (rounded.to(weight.dtype) - weight).detach()


class FakeQuantizedLinear(nn.Linear):
    """An ``nn.Linear`` whose forward uses its weight rounded to the ``bits``-bit grid (straight-through
    gradient). It holds the original ``weight``/``bias`` parameters, so optimizers and checkpoints see the same
    names and tensors as before."""

    bits: int
    group_size: int

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.linear(input, fake_quantize_weight(self.weight, self.bits, self.group_size), self.bias)


class WeightOnlyLinear(nn.Module):
    """A Linear layer with ``bits``-bit weights packed as ONNX Runtime's ``MatMulNBits`` stores them
    (``packed``: uint8 ``(out_features, groups, group_size * bits // 8)``, value ``q + 2**(bits-1)``;
    ``scales``: float ``(out_features, groups)``). Its forward calls the ``lightning_quant::weight_only_linear``
    op, which the ONNX export writes as one ``MatMulNBits`` node."""

    packed: torch.Tensor
    scales: torch.Tensor

    def __init__(self, linear: nn.Linear, bits: int, group_size: int) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bits, self.group_size = bits, group_size
        q, scale = quantize_weight(linear.weight, bits, group_size)
        self.register_buffer("packed", pack(q, bits, group_size))
        self.register_buffer("scales", scale.to(linear.weight.dtype))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return torch.ops.lightning_quant.weight_only_linear(
            input, self.packed, self.scales, self.bias, self.bits, self.group_size
        )

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, group_size={self.group_size}"


def dequantize_linear(layer: WeightOnlyLinear) -> torch.Tensor:
    """The float weight of a :class:`WeightOnlyLinear`."""
    return dequantize(layer.packed, layer.scales, layer.bits)


def quantizable_linears(model: nn.Module, config: WeightOnlyConfig) -> list[str]:
    """Names of the ``nn.Linear`` layers ``config`` quantizes: outside ``keep_float``, with an input width that is a
    multiple of ``group_size``. Subclasses of ``nn.Linear`` are left alone: attention's output projection
    (``NonDynamicallyQuantizableLinear``) is read as a weight by ``nn.MultiheadAttention``, not called."""
    return [
        name
        for name, module in model.named_modules()
        if type(module) in (nn.Linear, FakeQuantizedLinear)
        and module.in_features % config.group_size == 0
        and not is_kept_float(name, tuple(config.keep_float))
    ]


def prepare_qat(model: nn.Module, config: WeightOnlyConfig) -> list[str]:
    """Make ``model``'s quantizable Linear layers fake-quantize their weights, in place; return their names.
    The layers keep their parameters (the optimizer's and the checkpoint's), only their forward changes."""
    names = quantizable_linears(model, config)
    for name in names:
        layer = model.get_submodule(name)
        layer.__class__ = FakeQuantizedLinear  # the same object: parameters, hooks and state-dict names stay
        vars(layer).update(bits=config.bits, group_size=config.group_size)
    return names


def remove_qat(model: nn.Module) -> None:
    """Undo :func:`prepare_qat` in place (plain ``nn.Linear`` again)."""
    for module in model.modules():
        if isinstance(module, FakeQuantizedLinear):
            module.__class__ = nn.Linear  # type: ignore[assignment]  # back to the plain layer it was
            del module.bits, module.group_size


def convert(model: nn.Module, config: WeightOnlyConfig) -> nn.Module:
    """A copy of ``model`` whose quantizable Linear layers (plain or fake-quantized) are :class:`WeightOnlyLinear`."""
    converted = copy.deepcopy(model).eval()
    remove_qat(converted)
    for name in quantizable_linears(converted, config):
        parent, _, child = name.rpartition(".")
        layer = converted.get_submodule(name)
        assert isinstance(layer, nn.Linear)
        setattr(converted.get_submodule(parent), child, WeightOnlyLinear(layer, config.bits, config.group_size))
    return converted
