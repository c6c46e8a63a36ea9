"""One entry point, :func:`quantize`, over torchao (PT2E static int8, ``quantize_`` dynamic int8)."""

from __future__ import annotations

import contextlib
import copy
import functools
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Optional, Union

import torch
from torch import fx, nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear
from torch.utils._pytree import tree_flatten_with_path, tree_unflatten

from lightning_quant.capture import NOTES_KEY, Capture, CaptureError, capture
from lightning_quant.errors import QuantizationError
from lightning_quant.inputs import ModelInputs
from lightning_quant.quantization._torchao import (
    FakeQuantize,
    FusedMovingAvgObsFakeQuantize,
    HistogramObserver,
    Int8DynamicActivationInt8WeightConfig,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    QuantizationConfig,
    QuantizationSpec,
    X86InductorQuantizer,
    convert_pt2e,
    get_default_x86_inductor_quantization_config,
    prepare_pt2e,
    quantize_,
)
from lightning_quant.quantization.config import DynamicQuantConfig, StaticQuantConfig, is_kept_float
from lightning_quant.quantization.graph_ops import COMPUTE_OPS, op_name
from lightning_quant.quantization.layers import replace_transposed_linears, transposed_linears_as_linear
from lightning_quant.quantization.legacy import RECURRENT_TYPES, legacy_quantize_dynamic
from lightning_quant.quantization.weight_only import WeightOnlyConfig, WeightOnlyEmbedding, WeightOnlyLinear
from lightning_quant.quantization.weight_only import convert as weight_only_convert
from lightning_quant.target import resolve_target

if TYPE_CHECKING:
    from lightning_quant.quantization.qat import QATConfig

QuantConfig = Union[StaticQuantConfig, DynamicQuantConfig, WeightOnlyConfig]

_OBSERVERS = {
    "minmax": MinMaxObserver,
    "moving_average": MovingAverageMinMaxObserver,
    "histogram": HistogramObserver,
}


def quantize(
    model: nn.Module,
    config: QuantConfig,
    example_inputs: Any,
    calibration_data: Optional[Iterable[Any]] = None,
) -> nn.Module:
    """Return an int8 copy of ``model`` (``model`` itself is not modified).

    Args:
        model: the float model, in eval mode.
        config: :class:`StaticQuantConfig`, :class:`DynamicQuantConfig` or
            :class:`~lightning_quant.quantization.weight_only.WeightOnlyConfig`.
        example_inputs: an input of ``model.forward`` (tensor, tuple of arguments, dict of keywords or
            :class:`ModelInputs`). Static: its batch dimension is exported as dynamic.
        calibration_data: static, and weight-only with ``method`` ``"clip"``/``"gptq"``: an iterable of inputs in
            the same form (a few dozen real batches).

    Returns:
        Static: the converted PT2E ``GraphModule`` (the q/dq *reference* graph: exact int8 numerics, but
        slow until lowered by AOTInductor with freezing or ONNX Runtime). Dynamic: a copy of ``model`` whose
        Linear (and LSTM/GRU) layers are int8. Weight-only: a copy whose Linear and Embedding layers are ``WeightOnlyLinear``/``WeightOnlyEmbedding``.
        Linears stored transposed (transformers' ``Conv1D``) are quantized as Linears by each.

    Raises:
        QuantizationError: the model cannot be exported (the message says why), or nothing was quantized.

    Example::

        >>> from lightning_quant.demo import MLPNet
        >>> int8 = quantize(MLPNet().eval(), DynamicQuantConfig(), torch.zeros(4, 1, 8, 8))
        >>> sum(count_quantized_ops(int8).values())
        3
    """
    inputs = ModelInputs.from_value(example_inputs).bind(model.forward)
    name = type(model).__name__
    quantized: nn.Module
    if isinstance(config, StaticQuantConfig):
        if calibration_data is None:
            raise ValueError("static quantization needs calibration_data: an iterable of real input batches")
        quantized = _quantize_static(model, config, inputs, calibration_data)
    elif isinstance(config, DynamicQuantConfig):
        quantized = _quantize_dynamic(model, config)
    elif isinstance(config, WeightOnlyConfig):
        calibration = [ModelInputs.from_value(batch).bind(model.forward) for batch in calibration_data or ()]
        quantized = weight_only_convert(model, config, calibration)
    else:
        raise TypeError(
            f"config must be a StaticQuantConfig, DynamicQuantConfig or WeightOnlyConfig, got {type(config).__name__}"
        )
    if sum(count_quantized_ops(quantized).values()) == 0:
        raise QuantizationError(
            f"Quantizing {name} produced no quantized op: nothing would run in int8. "
            f"Check keep_float={list(config.keep_float)} and that {name} has layers this approach quantizes "
            "(static: Conv/Linear/Conv1D; dynamic: Linear, Conv1D, LSTM, GRU; weight-only: Linear, Conv1D and "
            "Embedding whose input width is a multiple of group_size)."
        )
    return quantized


def x86_quantizer(
    config: StaticQuantConfig | QATConfig,
    model: Optional[nn.Module] = None,
    *,
    is_qat: bool = False,
    quantizer: Optional[X86InductorQuantizer] = None,
) -> X86InductorQuantizer:
    """``X86InductorQuantizer`` with the config's observer, weight granularity, float modules and the weight
    range of its target (7-bit for ``"avx2"``: see :mod:`lightning_quant.target`).

    Given ``model``, its convolutions with a single input channel also stay float (see
    :func:`single_input_channel_convs`). With ``is_qat`` (what
    :func:`~lightning_quant.quantization.qat.make_qat_quantizer` asks for), fake-quant modules take the
    observers' place: activations use torchao's QAT default (a moving average fused with fake-quant) unless
    ``config.observer`` names another, per-tensor weights a fused moving-average fake-quant. ``quantizer``:
    the (empty) quantizer to configure, default a new ``X86InductorQuantizer``.
    """
    eps = 2**-12  # torchao's x86 default: keeps the scale of an all-zero tensor finite
    default = get_default_x86_inductor_quantization_config(is_qat=is_qat)
    if not is_qat:
        activation = QuantizationSpec(
            dtype=torch.uint8,
            quant_min=0,
            quant_max=255,
            qscheme=torch.per_tensor_affine,
            observer_or_fake_quant_ctr=_OBSERVERS[config.observer].with_args(eps=eps),
        )
        per_tensor_weight = MinMaxObserver.with_args(eps=eps)
    else:
        activation = default.input_activation  # moving average, fused with fake-quant
        if config.observer != "moving_average":
            observer = _OBSERVERS[config.observer]
            activation = replace(
                activation, observer_or_fake_quant_ctr=FakeQuantize.with_args(observer=observer, eps=eps)
            )
        per_tensor_weight = FusedMovingAvgObsFakeQuantize.with_args(observer=MovingAverageMinMaxObserver, eps=eps)
    quant_min, quant_max = resolve_target(config.target).weight_range
    weight = replace(default.weight, quant_min=quant_min, quant_max=quant_max)
    if not config.per_channel:
        weight = replace(
            weight, qscheme=torch.per_tensor_symmetric, ch_axis=None, observer_or_fake_quant_ctr=per_tensor_weight
        )
    quantizer = X86InductorQuantizer() if quantizer is None else quantizer
    quantizer.set_global(QuantizationConfig(activation, activation, weight, default.bias, is_qat))
    for name in (*config.keep_float, *(single_input_channel_convs(model) if model is not None else ())):
        quantizer.set_module_name_qconfig(name, None)
    return quantizer


def single_input_channel_convs(model: nn.Module) -> list[str]:
    """Convolutions reading one channel (e.g. grayscale input), which static int8 leaves in float.

    torch 2.13's AOTInductor miscompiles the int8 conv that follows an int8 conv with one input channel
    when the batch dimension is dynamic (outputs off by ~60% of their range; ``torch.compile`` and a static
    batch are correct); verification of the exported file caught it. Such a conv does 1/C of the work of
    the next one, so keeping it float costs little.
    """
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.modules.conv._ConvNd) and module.in_channels == 1
    ]


def export_for_quantization(model: nn.Module, inputs: ModelInputs) -> Capture:
    """:func:`lightning_quant.capture.capture` with a dynamic batch dimension; its error says what blocks it."""
    try:
        return capture(model, inputs)
    except CaptureError as err:
        raise CaptureError(f"Quantizing needs the model as a graph. {err}", err.report) from err


def capture_for_quantization(model: nn.Module, inputs: ModelInputs) -> fx.GraphModule:
    """The graph PT2E annotates: :func:`export_for_quantization`'s module, with every call of a module used more
    than once (torchvision's ResNet blocks call one ``self.relu`` twice) marked as a call of its own.

    ``X86InductorQuantizer`` groups nodes into patterns by the module they came from; two calls of one ReLU module
    make one group with two outputs, which it refuses ("Input partition has more than one output node").
    ``torch.export`` already keys the second call ``...relu@1`` in ``nn_module_stack``; the module name
    becomes ``relu@1`` too, so each call is matched on its own, as if the block had a ReLU per use.

    Linears stored transposed (transformers' ``Conv1D``: ``addmm`` on an ``[in, out]`` weight, which the quantizer
    has no pattern for) are captured as ``linear`` on their transposed weight
    (:func:`~lightning_quant.quantization.layers.transposed_linears_as_linear`) and marked as ``nn.Linear`` calls,
    the module type the quantizer finds Linear patterns by: they are quantized like Linears. Objects in ``forward``'s
    output that are not tensors (a Hugging Face ``DynamicCache``) are None in the graph's (a capture note says so).
    """
    with transposed_linears_as_linear(model) as transposed, _non_tensor_outputs_as_none(model) as dropped:
        captured = export_for_quantization(model, inputs)
    graph = captured.program.module()
    notes = list(captured.notes)
    if dropped:
        notes.append(
            f"forward's output holds objects that are not tensors ({', '.join(dropped)}): the graph returns None "
            "in their place"
        )
    graph.meta[NOTES_KEY] = tuple(notes)  # read by the capture of each exported file (prepare/convert keep meta)
    for node in graph.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if node.op != "call_function" or not stack:
            continue
        key, (fqn, cls) = list(stack.items())[-1]
        if fqn in transposed:
            cls = _LINEAR_TYPE_NAME
        call = key.rpartition("@")[2] if "@" in key else ""
        stack[key] = (f"{fqn}@{call}" if call.isdigit() else fqn, cls)
    return graph


_LINEAR_TYPE_NAME = f"{nn.Linear.__module__}.{nn.Linear.__qualname__}"  # as nn_module_stack names module types


@contextlib.contextmanager
def _non_tensor_outputs_as_none(model: nn.Module) -> Iterator[list[str]]:
    """While inside, ``model``'s output has None in place of objects that are neither tensors nor plain values:
    torch.export refuses them (a Hugging Face model returns its key/value cache as a ``DynamicCache`` in the
    ``ModelOutput``, also in training). The output keeps its structure (``outputs.loss`` and ``outputs.logits`` still
    read), so a QAT graph can stand in for ``forward``. Yields what was dropped (``past_key_values: DynamicCache``)."""
    dropped: list[str] = []
    own = model.forward

    @functools.wraps(own)  # the signature stays forward's: inputs bind and export the same way
    def forward(*args: Any, **kwargs: Any) -> Any:
        leaves, spec = tree_flatten_with_path(own(*args, **kwargs))
        kept = []
        for path, leaf in leaves:
            if isinstance(leaf, (torch.Tensor, int, float, bool, str, type(None))):
                kept.append(leaf)
            else:
                kept.append(None)
                where = ".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)
                dropped.append(f"{where or 'output'}: {type(leaf).__name__}")
        return tree_unflatten(kept, spec)

    model.forward = forward  # on the instance: removed on leaving
    try:
        yield dropped
    finally:
        del model.forward


def _quantize_static(
    model: nn.Module, config: StaticQuantConfig, inputs: ModelInputs, calibration_data: Iterable[Any]
) -> fx.GraphModule:
    prepared = prepare_pt2e(capture_for_quantization(model, inputs), x86_quantizer(config, model))
    batches = 0
    with torch.no_grad():
        for batch in calibration_data:
            ModelInputs.from_value(batch).bind(model.forward)(prepared)
            batches += 1
    if batches == 0:
        raise ValueError("calibration_data yielded no batch: static int8 needs real batches to calibrate on")
    converted = contiguous_constants(convert_pt2e(prepared))
    converted.meta.setdefault(NOTES_KEY, prepared.meta.get(NOTES_KEY, ()))
    return converted


def contiguous_constants(graph: fx.GraphModule) -> fx.GraphModule:
    """``graph`` with every parameter and buffer contiguous, in place. ``convert_pt2e`` folds the int8 weight of a
    transposed Linear (``Conv1D``, captured as ``linear(x, weight.t())``) into a transposed view; AOTInductor's int8
    linear reads such a weight as if it were contiguous and computes with scrambled weights (GPT-2's logits 47% off
    the reference)."""
    for module in graph.modules():
        # new tensors, not .data set in place: a graph made by export shares its float weights with the model
        for name, parameter in module._parameters.items():
            if parameter is not None and _strided_view(parameter):
                module._parameters[name] = nn.Parameter(parameter.detach().contiguous(), parameter.requires_grad)
        for name, buffer in module._buffers.items():
            if buffer is not None and _strided_view(buffer):
                module._buffers[name] = buffer.contiguous()
    return graph


def _strided_view(tensor: torch.Tensor) -> bool:
    """Neither contiguous nor channels-last: a view (a transposed weight). Channels-last conv weights (the
    ChannelsLast callback's) are a layout the compiled kernels take as they are; made contiguous, AOTInductor's
    int8 conv file of a channels-last ResNet was 7% off its reference."""
    if tensor.is_contiguous():
        return False
    return tensor.dim() != 4 or not tensor.is_contiguous(memory_format=torch.channels_last)


def _quantize_dynamic(model: nn.Module, config: DynamicQuantConfig) -> nn.Module:
    quantized = copy.deepcopy(model).eval()
    replace_transposed_linears(quantized)  # transformers' Conv1D as nn.Linear, which torchao quantizes
    keep = tuple(config.keep_float)
    # reduce_range: 7-bit weights and activations, whose u8 x s8 pair sums fit the int16 of non-VNNI kernels
    int8 = Int8DynamicActivationInt8WeightConfig(reduce_range=resolve_target(config.target).weight_bits == 7)
    quantize_(quantized, int8, filter_fn=_dynamic_linear_filter(keep))
    if config.recurrent:
        legacy_quantize_dynamic(quantized, RECURRENT_TYPES, keep)
    return quantized


def _dynamic_linear_filter(keep_float: tuple[str, ...]) -> Callable[[nn.Module, str], bool]:
    """The ``nn.Linear`` layers dynamic int8 quantizes: all but kept ones and attention output projections.

    ``nn.MultiheadAttention`` never calls its ``out_proj`` module: it passes ``out_proj.weight`` to
    ``F.linear`` itself, which ``torch.export`` decomposes into ``aten.t`` + ``addmm`` on the weight, ops
    torchao's ``Int8Tensor`` does not implement (``NotImplementedError ... aten.t``), so the model could not
    be exported to AOTInductor. PyTorch gives that layer its own type, ``NonDynamicallyQuantizableLinear``,
    because quantizing it in place breaks attention (pytorch#58969); legacy ``quantize_dynamic({nn.Linear})``
    matches exact types and leaves it float too. It is one d_model x d_model matmul per attention layer; the
    input projection (a raw parameter) stays float as well, the feed-forward Linears (most of the work) are int8.
    """
    return lambda module, fqn: (
        isinstance(module, nn.Linear)
        and not isinstance(module, NonDynamicallyQuantizableLinear)
        and not is_kept_float(fqn, keep_float)
    )


def count_quantized_ops(model: nn.Module) -> dict[str, int]:
    """How many layers of ``model`` compute in int8, by kind (empty or all zero: nothing is quantized).

    Counts, in graphs, compute ops (conv, linear, matmul) fed by a dequantized weight and int8 kernels
    (``onednn.q*``, ``aten._int_mm``); in eager modules, layers whose weight is a torchao int8 tensor
    and legacy ``torch.ao.nn.quantized`` modules.

    Example::

        >>> count_quantized_ops(nn.Linear(2, 2))
        {}
    """
    counts: Counter[str] = Counter()
    for module in model.modules():
        if isinstance(module, fx.GraphModule):
            counts.update(_graph_quantized_ops(module.graph))
        elif isinstance(module, (WeightOnlyLinear, WeightOnlyEmbedding)):
            kind = "Linear" if isinstance(module, WeightOnlyLinear) else "Embedding"
            counts[f"{kind} (int{module.bits} weight-only)"] += 1
        elif type(module).__module__.startswith("torch.ao.nn.quantized") and "Packed" not in type(module).__name__:
            counts[f"{type(module).__name__} (legacy torch.ao int8)"] += 1
        else:
            weight = module.__dict__.get("_parameters", {}).get("weight")
            if weight is not None and type(weight).__module__.startswith("torchao"):
                counts[f"{type(module).__name__} ({type(weight).__name__})"] += 1
    return dict(sorted(counts.items()))


def _graph_quantized_ops(graph: fx.Graph) -> Counter[str]:
    counts: Counter[str] = Counter()
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        target = op_name(node.target)
        if target.startswith(("onednn.q", "quantized.", "aten._int_mm", "aten._weight_int8pack_mm")):
            counts[target] += 1
        elif target in COMPUTE_OPS and any(
            isinstance(arg, fx.Node) and op_name(arg.target).startswith("quantized_decomposed.dequantize")
            for arg in node.args[1:2]  # the weight
        ):
            counts[f"{target} (int8 weight)"] += 1
    return counts
