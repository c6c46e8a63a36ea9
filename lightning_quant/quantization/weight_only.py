"""Weight-only quantization (int4 or int8 weights in groups, float activations) for ``nn.Linear`` layers (and Linears
stored transposed, transformers' ``Conv1D``) and ``nn.Embedding`` layers.

One grid everywhere: :func:`~lightning_quant.weight_packing.quantize_weight` rounds each group of ``group_size`` input weights to ``bits``-bit
integers with one float scale, the signed element of largest magnitude landing exactly on ``-2**(bits-1)`` (ONNX
Runtime's symmetric block quantization: all 16 int4 levels used, the largest weight kept exactly). Training
with :func:`prepare_qat` fake-quantizes on that grid, :func:`convert` stores it, and the ONNX file runs it in
ONNX Runtime's ``MatMulNBits`` kernel, so the weights a QAT run learned are the weights that ship. An
embedding table is grouped along its rows (``embedding_dim``) on the same grid and looked up packed. A ``Conv1D``
(weight ``[in, out]``) is grouped along its input features like a Linear: trained fake-quantized as it is (same
parameter, same name), stored as a :class:`WeightOnlyLinear`. An output layer tied to its embedding (GPT-2's
``lm_head``) has the same layout as the table, so the two share one packed copy.

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

from lightning_quant.inputs import ModelInputs
from lightning_quant.quantization.config import check_keep_float, is_kept_float
from lightning_quant.quantization.layers import is_transposed_linear, linear_from_transposed, transposed_input_width
from lightning_quant.quantization.weight_calibration import (
    DATA_METHODS,
    METHODS,
    clip_quantize,
    gptq_quantize,
    input_second_moments,
)
from lightning_quant.weight_packing import dequantize, embedding_rows, pack, quantize_weight

BITS = (4, 8)


@dataclass(frozen=True)
class WeightOnlyConfig:
    """Weight-only quantization of ``nn.Linear`` and ``nn.Embedding`` layers: ``bits``-bit weights (4 or 8) in
    groups of ``group_size`` input features (an embedding: of each row), one float scale per group; activations
    stay float.

    Args:
        bits: 4 (default) or 8.
        group_size: input features sharing one scale: a power of two, 16 to 256 (ONNX Runtime's ``MatMulNBits``
            block sizes). Layers whose input width (embedding_dim) is not a multiple of it stay float.
        keep_float: names of submodules left in float (as in ``model.named_modules()``).
        method: how the integers and scales are chosen (:mod:`~lightning_quant.quantization.weight_calibration`):
            ``"rtn"`` (default) round to nearest, the largest weight of each group exact, no data; ``"clip"`` each
            group's scale searched (clipped) for the least output error on calibration inputs (AWQ's clipping
            search); ``"gptq"`` GPTQ's error compensation over calibration inputs, scales searched alike. The two
            data methods need calibration batches; the files are the same either way (one scale per group). On
            the byte LM (``benchmarks/int4_ptq_results.md``) both beat round to nearest and NNCF's data-free
            int4; ``"clip"`` had the lower validation perplexity.

    Example::

        >>> WeightOnlyConfig(bits=4, group_size=32).bits
        4
    """

    bits: int = 4
    group_size: int = 32
    keep_float: Sequence[str] = field(default_factory=tuple)
    method: str = "rtn"

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise ValueError(f"bits must be one of {list(BITS)}, got {self.bits!r}")
        if self.group_size not in (16, 32, 64, 128, 256):
            raise ValueError(
                f"group_size must be 16, 32, 64, 128 or 256 (ONNX Runtime's block sizes), got {self.group_size!r}"
            )
        check_keep_float(self.keep_float)
        if self.method not in METHODS:
            raise ValueError(
                f"method must be one of {list(METHODS)} ('rtn': round to nearest, no data; 'clip' and 'gptq' read "
                f"calibration batches), got {self.method!r}"
            )

    @property
    def needs_calibration(self) -> bool:
        """Whether :func:`convert` reads calibration inputs (``method`` ``"clip"`` or ``"gptq"``)."""
        return self.method in DATA_METHODS


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


class FakeQuantizedTransposedLinear(nn.Module):
    """The forward of a fake-quantized transposed Linear (transformers' ``Conv1D``, weight ``[in, out]``): the weight
    rounded like a Linear's, in groups of ``group_size`` input features per output. Mixed into the layer's own class
    (:func:`_fake_quantized_class`), so the layer keeps its parameters and their names."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    bits: int
    group_size: int

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.linear(input, fake_quantize_weight(self.weight.t(), self.bits, self.group_size), self.bias)


_FAKE_TRANSPOSED: dict[type[nn.Module], type[nn.Module]] = {}


def _fake_quantized_class(plain: type[nn.Module]) -> type[nn.Module]:
    """``plain`` (a ``Conv1D`` class) with :class:`FakeQuantizedTransposedLinear`'s forward; one class per ``plain``."""
    if plain not in _FAKE_TRANSPOSED:
        bases = (FakeQuantizedTransposedLinear, plain)
        _FAKE_TRANSPOSED[plain] = type(f"FakeQuantized{plain.__name__}", bases, {"plain_class": plain})
    return _FAKE_TRANSPOSED[plain]


class PackedWeight(nn.Module):
    """Holds a weight on the ``bits``-bit grid in groups of ``group_size`` (per row), packed as ONNX Runtime's
    ``MatMulNBits`` stores it (``packed``: uint8 ``(rows, groups, group_size * bits // 8)``, value
    ``q + 2**(bits-1)``; ``scales``: float ``(rows, groups)``): what :class:`WeightOnlyLinear` and
    :class:`WeightOnlyEmbedding` share."""

    packed: torch.Tensor
    scales: torch.Tensor

    def __init__(
        self,
        weight: torch.Tensor,
        bits: int,
        group_size: int,
        quantized: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.bits, self.group_size = bits, group_size
        q, scale = quantize_weight(weight, bits, group_size) if quantized is None else quantized
        self.register_buffer("packed", pack(q, bits, group_size))
        self.register_buffer("scales", scale.to(weight.dtype))


class WeightOnlyLinear(PackedWeight):
    """A Linear layer with ``bits``-bit weights packed as ONNX Runtime's ``MatMulNBits`` stores them
    (``packed``: uint8 ``(out_features, groups, group_size * bits // 8)``, value ``q + 2**(bits-1)``;
    ``scales``: float ``(out_features, groups)``). Its forward calls the ``lightning_quant::weight_only_linear``
    op, which the ONNX export writes as one ``MatMulNBits`` node."""

    def __init__(
        self,
        linear: nn.Linear,
        bits: int,
        group_size: int,
        quantized: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        super().__init__(linear.weight, bits, group_size, quantized)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return torch.ops.lightning_quant.weight_only_linear(
            input, self.packed, self.scales, self.bias, self.bits, self.group_size
        )

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, group_size={self.group_size}"


class FakeQuantizedEmbedding(nn.Embedding):
    """An ``nn.Embedding`` that looks up its table rounded to the ``bits``-bit grid (straight-through gradient);
    parameters and state-dict names as before, like :class:`FakeQuantizedLinear`."""

    bits: int
    group_size: int

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        table = fake_quantize_weight(self.weight, self.bits, self.group_size)
        return F.embedding(input, table, self.padding_idx, None, 2.0, self.scale_grad_by_freq, self.sparse)


class WeightOnlyEmbedding(PackedWeight):
    """An embedding table stored like :class:`WeightOnlyLinear`'s weight (each row in groups of ``group_size``),
    looked up packed and dequantized row by row (:func:`~lightning_quant.weight_packing.embedding_rows`)."""

    def __init__(
        self,
        embedding: nn.Embedding,
        bits: int,
        group_size: int,
        quantized: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        super().__init__(embedding.weight, bits, group_size, quantized)
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return embedding_rows(input, self.packed, self.scales, self.bits)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}, group_size={self.group_size}"


_FAKE = {nn.Linear: FakeQuantizedLinear, nn.Embedding: FakeQuantizedEmbedding}
_PLAIN = {fake: plain for plain, fake in _FAKE.items()}


def dequantize_linear(layer: PackedWeight) -> torch.Tensor:
    """The float weight of a :class:`WeightOnlyLinear` (or table of a :class:`WeightOnlyEmbedding`)."""
    return dequantize(layer.packed, layer.scales, layer.bits)


def quantizable_layers(model: nn.Module, config: WeightOnlyConfig) -> list[str]:
    """Names of the ``nn.Linear``, transposed Linear (``Conv1D``) and ``nn.Embedding`` layers ``config`` quantizes:
    outside ``keep_float``, with an input width (``embedding_dim``) that is a multiple of ``group_size``; embeddings
    without ``max_norm`` (which rewrites the table on lookup). Subclasses of ``nn.Linear`` are left alone:
    attention's output projection (``NonDynamicallyQuantizableLinear``) is read as a weight by
    ``nn.MultiheadAttention``, not called."""
    return [
        name
        for name, module in model.named_modules()
        if (
            (type(module) in (nn.Linear, FakeQuantizedLinear) and module.in_features % config.group_size == 0)
            or (is_transposed_linear(module) and transposed_input_width(module) % config.group_size == 0)
            or (
                type(module) in (nn.Embedding, FakeQuantizedEmbedding)
                and module.embedding_dim % config.group_size == 0
                and module.max_norm is None
            )
        )
        and not is_kept_float(name, tuple(config.keep_float))
    ]


def prepare_qat(model: nn.Module, config: WeightOnlyConfig) -> list[str]:
    """Make ``model``'s quantizable Linear, Conv1D and Embedding layers fake-quantize their weights, in place; return
    their names. The layers keep their parameters (the optimizer's and the checkpoint's), only their forward changes."""
    names = quantizable_layers(model, config)
    for name in names:
        layer = model.get_submodule(name)
        # the same object: parameters, hooks and state-dict names stay
        if type(layer) in _FAKE:
            layer.__class__ = _FAKE[type(layer)]
        elif is_transposed_linear(layer) and not isinstance(layer, FakeQuantizedTransposedLinear):
            layer.__class__ = _fake_quantized_class(type(layer))
        vars(layer).update(bits=config.bits, group_size=config.group_size)
    return names


def remove_qat(model: nn.Module) -> None:
    """Undo :func:`prepare_qat` in place (plain ``nn.Linear``/``nn.Embedding``/``Conv1D`` again)."""
    for module in model.modules():
        plain = _PLAIN.get(type(module), getattr(module, "plain_class", None))
        if plain is not None:
            module.__class__ = plain
            del module.bits, module.group_size


def convert(model: nn.Module, config: WeightOnlyConfig, calibration: Sequence[ModelInputs] = ()) -> nn.Module:
    """A copy of ``model`` whose quantizable layers (plain or fake-quantized) are :class:`WeightOnlyLinear` (Linear
    and Conv1D) and :class:`WeightOnlyEmbedding`. Layers that share one weight (tied) share one packed copy.
    ``calibration``: calls of ``model`` (:class:`~lightning_quant.inputs.ModelInputs`) the data methods
    (``config.method`` ``"clip"``, ``"gptq"``) read the Linear layers' inputs from; ignored by ``"rtn"``."""
    if config.needs_calibration and not calibration:
        raise ValueError(
            f"WeightOnlyConfig(method={config.method!r}) chooses the weights on calibration inputs and got none: "
            "pass real input batches (calibration_data= to deploy or quantize), or use method='rtn' (no data)"
        )
    converted = copy.deepcopy(model).eval()
    remove_qat(converted)
    names = quantizable_layers(converted, config)
    chosen = _calibrated_weights(converted, names, config, calibration) if config.needs_calibration else {}
    # the first layer packed from each float weight, by (id, stored transposed): a Linear's weight and an embedding's
    # table are grouped alike ([rows, features]), so tied ones share one packed copy
    packed_weights: dict[tuple[int, bool], PackedWeight] = {}
    for name in names:
        layer = converted.get_submodule(name)
        source = (id(layer.weight), is_transposed_linear(layer))
        if is_transposed_linear(layer):
            layer = linear_from_transposed(layer)
        quantized = chosen.get(name)
        stored: PackedWeight = (
            WeightOnlyLinear(layer, config.bits, config.group_size, quantized)
            if isinstance(layer, nn.Linear)
            else WeightOnlyEmbedding(layer, config.bits, config.group_size, quantized)  # type: ignore[arg-type]  # quantizable_layers
        )
        first = packed_weights.setdefault(source, stored)
        stored.packed, stored.scales = first.packed, first.scales
        if not name:  # the model is the one layer
            return stored
        parent, _, child = name.rpartition(".")
        setattr(converted.get_submodule(parent), child, stored)
    return converted


def _calibrated_weights(
    model: nn.Module,
    names: Sequence[str],
    config: WeightOnlyConfig,
    calibration: Sequence[ModelInputs],
    sequential: bool = False,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{name: (q, scale)}`` by ``config.method`` for the first layer of each weight among ``names`` (a tied weight
    is chosen once). ``sequential`` (GPTQ's way): layers in the order the calibration calls reach them, each one's
    inputs measured with the layers before it already quantized (their weights replaced, in ``model``, by what
    they store), so that each one also makes up for the error the earlier ones left; otherwise (default) all
    measured on the float model in one pass. On the byte LM (``benchmarks/bench_int4_ptq.py``, g32) sequential was
    no better (clip 6.2126 vs 6.2124, gptq 6.2388 vs 6.2332 validation perplexity) and 5x slower (a calibration
    pass per layer). An embedding's rows are chosen by their own squared error, a Linear the calibration
    never calls likewise."""
    first_of_weight: dict[int, str] = {}
    for name in names:
        first_of_weight.setdefault(id(model.get_submodule(name).weight), name)
    chosen_names = list(first_of_weight.values())
    linears = [name for name in chosen_names if not isinstance(model.get_submodule(name), nn.Embedding)]
    moments = {} if sequential else input_second_moments(model, linears, calibration)
    chosen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name in execution_order(model, chosen_names, calibration[0]) if sequential else chosen_names:
        layer = model.get_submodule(name)
        transposed = is_transposed_linear(layer)
        parameter: torch.Tensor = layer.weight  # type: ignore[assignment]  # Linear, Conv1D, Embedding
        weight = parameter.t() if transposed else parameter
        if sequential and name in linears:
            moments = input_second_moments(model, [name], calibration)
        q, scale = _choose_weights(weight, config, moments.get(name))
        chosen[name] = (q, scale)
        if sequential:  # the layers after this one see what it stores
            stored = (q.float().reshape(*scale.shape, -1) * scale.unsqueeze(2)).flatten(1).to(weight.dtype)
            with torch.no_grad():
                parameter.copy_(stored.t() if transposed else stored)
    return chosen


def execution_order(model: nn.Module, names: Sequence[str], inputs: ModelInputs) -> list[str]:
    """``names`` in the order ``model`` first calls them on ``inputs`` (those it does not call last)."""
    order: list[str] = []
    handles = [
        model.get_submodule(name).register_forward_pre_hook(
            lambda module, args, name=name: None if name in order else order.append(name)
        )
        for name in names
    ]
    try:
        with torch.no_grad():
            inputs(model)
    finally:
        for handle in handles:
            handle.remove()
    return order + [name for name in names if name not in order]


def _choose_weights(
    weight: torch.Tensor, config: WeightOnlyConfig, moments: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scale)`` of ``weight`` by ``config.method`` (``"clip"`` or ``"gptq"``); ``moments`` the layer's input
    second moments (``None`` for an embedding, whose rows' own squared error is its output error, and for a Linear the
    calibration never called: its weights' squared error)."""
    if config.method == "gptq" and moments is not None:
        return gptq_quantize(weight, moments, config.bits, config.group_size)
    return clip_quantize(weight, config.bits, config.group_size, moments)
