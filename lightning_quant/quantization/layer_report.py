"""The manifest's ``layers``: per layer type, how many layers were quantized and how many stay float (and why), and
which weights are tied and how the quantized model stores them. Measured on the converted model, not restated from
the rules: a layer counts as quantized only if the converted model computes it from quantized weights.

Shape (``layer_report``)::

    {
      "by_type": {"Conv1D": {"quantized": 8, "float": 0}, "Embedding": {"quantized": 1, "float": 1},
                  "Linear": {"quantized": 1, "float": 0}},
      "float": {"model.transformer.wpe": "embedding_dim 24 is not a multiple of group_size 32"},
      "tied_weights": [{"parameters": ["model.lm_head.weight", "model.transformer.wte.weight"],
                        "quantized_layers": ["model.lm_head", "model.transformer.wte"], "float_layers": [],
                        "one_copy": true, "stored": "one quantized copy, shared by ..."}]
    }

``by_type`` counts the layers that hold weights (``nn.Linear`` and its subclasses, transformers' ``Conv1D``,
``nn.Embedding``, convolutions, LSTM/GRU/RNN) by class name; ``float`` names each layer left float with the reason;
``one_copy`` says whether the converted model holds the tied weight once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import fx, nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from lightning_quant.quantization.config import DynamicQuantConfig, is_kept_float
from lightning_quant.quantization.graph_ops import COMPUTE_OPS, op_name
from lightning_quant.quantization.layers import is_transposed_linear, tied_weights, transposed_input_width
from lightning_quant.quantization.weight_only import WeightOnlyConfig
from lightning_quant.weight_packing import is_packed_layer

WEIGHT_LAYERS = (nn.Linear, nn.Embedding, nn.modules.conv._ConvNd, nn.RNNBase)


def weight_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The layers of ``model`` that hold weights a quantizer could quantize, by name (the root excluded)."""
    return {
        name: module
        for name, module in model.named_modules()
        if name and (isinstance(module, WEIGHT_LAYERS) or is_transposed_linear(module))
    }


def quantized_layers(converted: nn.Module) -> set[str]:
    """Names of the layers the converted model computes from quantized weights: packed weight-only layers, layers
    with torchao int8 weights, legacy ``torch.ao`` quantized modules, and in a PT2E graph the modules (from each op's
    ``nn_module_stack``) whose conv/linear/matmul reads a dequantized weight."""
    names: set[str] = set()
    for prefix, module in converted.named_modules():
        if isinstance(module, fx.GraphModule):
            names.update(_join(prefix, path) for path in _graph_quantized_modules(module.graph))
        elif is_packed_layer(module):
            names.add(prefix)
        elif type(module).__module__.startswith("torch.ao.nn.quantized") and "Packed" not in type(module).__name__:
            names.add(prefix)
        else:
            weight = module.__dict__.get("_parameters", {}).get("weight")
            if weight is not None and type(weight).__module__.startswith("torchao"):
                names.add(prefix)
    return names


def _graph_quantized_modules(graph: fx.Graph) -> set[str]:
    modules = set()
    for node in graph.nodes:
        if node.op != "call_function" or op_name(node.target) not in COMPUTE_OPS:
            continue
        weight = node.args[1] if len(node.args) > 1 else None
        if not (isinstance(weight, fx.Node) and op_name(weight.target).startswith("quantized_decomposed.dequantize")):
            continue
        stack = node.meta.get("nn_module_stack")
        if stack:
            path = list(stack.values())[-1][0]
            modules.add(path.removeprefix("L['self'].").partition("@")[0])  # relu@1: the second call of relu
    return modules


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


def layer_report(
    float_model: nn.Module,
    converted: nn.Module,
    config: Any,
    keep_float: Sequence[str] = (),
    budget_layers: Sequence[str] = (),
) -> dict[str, Any]:
    """The manifest's ``layers`` (see the module docstring) of ``converted``, made from ``float_model`` by ``config``
    (a ``StaticQuantConfig``, ``QATConfig`` or trained ``QATGraph``, ``DynamicQuantConfig`` or ``WeightOnlyConfig``).
    ``keep_float``: every name kept float; ``budget_layers``: those the accuracy budget returned to float.

    Example::

        >>> from lightning_quant.quantization import DynamicQuantConfig, quantize
        >>> model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8), nn.Linear(8, 2)).eval()
        >>> int8 = quantize(model, DynamicQuantConfig(keep_float=("2",)), torch.zeros(4, 3, dtype=torch.long))
        >>> report = layer_report(model, int8, DynamicQuantConfig(keep_float=("2",)), keep_float=("2",))
        >>> report["by_type"], report["float"]["2"]
        ({'Embedding': {'quantized': 0, 'float': 1}, 'Linear': {'quantized': 1, 'float': 1}}, 'in keep_float')
    """
    quantized = quantized_layers(converted)
    layers = weight_layers(float_model)
    by_type: dict[str, dict[str, int]] = {}
    reasons: dict[str, str] = {}
    for name, module in layers.items():
        counts = by_type.setdefault(type(module).__name__, {"quantized": 0, "float": 0})
        if name in quantized:
            counts["quantized"] += 1
            continue
        counts["float"] += 1
        if name in budget_layers:
            reasons[name] = "returned to float by the accuracy budget"
        elif is_kept_float(name, tuple(keep_float)):
            reasons[name] = "in keep_float"
        else:
            reasons[name] = why_float(config, module)
    return {
        "by_type": dict(sorted(by_type.items())),
        "float": reasons,
        "tied_weights": _tied_report(float_model, converted, quantized),
    }


def why_float(config: Any, module: nn.Module) -> str:
    """Why ``config``'s approach leaves ``module`` (a layer with weights, not in ``keep_float``) float."""
    if isinstance(config, WeightOnlyConfig):
        if isinstance(module, nn.Embedding):
            if module.max_norm is not None:
                return "max_norm rewrites the table on lookup"
            return f"embedding_dim {module.embedding_dim} is not a multiple of group_size {config.group_size}"
        if isinstance(module, NonDynamicallyQuantizableLinear):
            return "attention's output projection: nn.MultiheadAttention reads its weight, never calls it"
        if isinstance(module, nn.Linear) or is_transposed_linear(module):
            width = module.in_features if isinstance(module, nn.Linear) else transposed_input_width(module)
            return f"input width {width} is not a multiple of group_size {config.group_size}"
        return "weight-only quantizes Linear, Conv1D and Embedding layers"
    if isinstance(config, DynamicQuantConfig):
        if isinstance(module, NonDynamicallyQuantizableLinear):
            return "attention's output projection: nn.MultiheadAttention reads its weight, never calls it"
        if isinstance(module, nn.RNNBase) and not config.recurrent:
            return "recurrent=False"
        return "dynamic int8 quantizes Linear, Conv1D, LSTM and GRU layers"
    # static int8 and QAT: X86InductorQuantizer
    if isinstance(module, nn.Embedding):
        return "x86 int8 (X86InductorQuantizer) has no int8 embedding lookup"
    if isinstance(module, nn.modules.conv._ConvNd) and module.in_channels == 1:
        return "one input channel: AOTInductor miscompiles the int8 conv after such a conv (torch 2.13)"
    if isinstance(module, nn.RNNBase):
        return "static int8 and QAT have no int8 LSTM/GRU (DynamicQuantization has)"
    return "the x86 int8 quantizer matched no int8 pattern on it"


def _tied_report(float_model: nn.Module, converted: nn.Module, quantized: set[str]) -> list[dict[str, Any]]:
    report = []
    for parameters in tied_weights(float_model):
        layers = [name.rpartition(".")[0] for name in parameters]
        in_int = [layer for layer in layers if layer in quantized]
        in_float = [layer for layer in layers if layer not in quantized]
        if not in_int:
            one_copy, stored = True, f"one float tensor, read by {', '.join(layers)}"
        else:
            stores = [_stored_tensor(converted, layer) for layer in in_int]
            one_copy = not in_float and all(s is not None and s is stores[0] for s in stores)
            if one_copy:
                stored = f"one quantized copy, shared by {', '.join(layers)}"
            elif in_float:
                stored = f"a quantized copy for {', '.join(in_int)}; the float tensor for {', '.join(in_float)}"
            else:
                stored = f"a quantized copy for each of {', '.join(in_int)}"
        report.append(
            {
                "parameters": parameters,
                "quantized_layers": in_int,
                "float_layers": in_float,
                "one_copy": one_copy,
                "stored": stored,
            }
        )
    return report


def _stored_tensor(converted: nn.Module, layer: str) -> torch.Tensor | None:
    """The tensor an eager quantized layer holds its weight in (packed weight-only layers; torchao weights);
    ``None`` when it cannot be told (a graph)."""
    try:
        module = converted.get_submodule(layer)
    except AttributeError:
        return None
    stored = module.packed if is_packed_layer(module) else module.__dict__.get("_parameters", {}).get("weight")
    return stored if isinstance(stored, torch.Tensor) else None
