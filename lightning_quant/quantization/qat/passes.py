"""The FX passes over PT2E QAT graphs: each works around one trap of ``prepare_qat_pt2e``/``convert_pt2e`` or
drops work the training graph does not need (see :mod:`lightning_quant.quantization.qat`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule, Node

from lightning_quant.quantization._torchao import (
    FakeQuantizeBase,
    move_exported_model_to_eval,
    move_exported_model_to_train,
)
from lightning_quant.quantization.graph_ops import CONVS, is_call

_BATCH_NORM = torch.ops.aten.batch_norm.default
_DROPOUT = torch.ops.aten.dropout.default
_BN_TRAINING, _BN_MOMENTUM, _BN_EPS = 5, 6, 7
_DROPOUT_P = 1


def assign(graph: GraphModule, fqn: str, tensor: torch.Tensor) -> None:
    """Set the parameter or buffer ``fqn`` of ``graph`` to ``tensor`` (a parameter stays one, frozen)."""
    prefix, _, name = fqn.rpartition(".")
    owner = graph.get_submodule(prefix)
    if name in owner._parameters:
        owner._parameters[name] = nn.Parameter(tensor, requires_grad=False)
    else:
        owner._buffers[name] = tensor


def _mode_nodes(graph: GraphModule) -> list[Node]:
    return [n for n in graph.graph.nodes if n.op == "call_function" and n.target in (_BATCH_NORM, _DROPOUT)]


def switch_mode(graph: GraphModule, training: bool) -> None:
    """``move_exported_model_to_train/eval`` (the documented way), keeping BatchNorm momentum/eps and
    dropout p: the helpers' replacement patterns hard-code 0.1, 1e-5 and 0.5."""
    saved = [(n.target, list(n.args)) for n in _mode_nodes(graph)]
    (move_exported_model_to_train if training else move_exported_model_to_eval)(graph)
    nodes = _mode_nodes(graph)
    if [n.target for n in nodes] != [target for target, _ in saved]:
        raise RuntimeError(
            "move_exported_model_to_train/eval changed the graph's BatchNorm/dropout layout; cannot restore "
            "their momentum, eps and p. Please report this with your model."
        )
    for node, (target, old) in zip(nodes, saved):
        args = list(node.args)
        kept = (_BN_MOMENTUM, _BN_EPS) if target == _BATCH_NORM else (_DROPOUT_P,)
        for i in kept:
            args[i] = old[i]
        node.args = tuple(args)
    graph.recompile()


# ops whose outputs are values of their input: applied to values on a quantization grid, they stay on it
_VALUE_SELECTING = (
    torch.ops.aten.max_pool1d.default,
    torch.ops.aten.max_pool2d.default,
    torch.ops.aten.max_pool3d.default,
    torch.ops.aten.flatten.using_ints,
    torch.ops.aten.reshape.default,
    torch.ops.aten.view.default,
    torch.ops.aten.permute.default,
    torch.ops.aten.transpose.int,
    torch.ops.aten.squeeze.dim,
    torch.ops.aten.unsqueeze.default,
)


def fake_quant_in_float32(graph: GraphModule) -> None:
    """Under mixed precision (autocast bf16/fp16) activations reach fake-quant in low precision, which
    torch's fused observer + fake-quant kernel refuses ("expected scalar type Float but found BFloat16").
    Observe and round in float32, as the int8 model's quantize ops will, and hand back the input's dtype."""
    for module in graph.modules():
        if isinstance(module, FakeQuantizeBase):
            module.register_forward_pre_hook(_fake_quant_input_to_float32)
            module.register_forward_hook(_fake_quant_output_to_input_dtype)


def _fake_quant_input_to_float32(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    x = args[0]
    low_precision = isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != torch.float32
    module.__dict__["_input_dtype"] = x.dtype if low_precision else None
    return (x.float(), *args[1:]) if low_precision else None


def _fake_quant_output_to_input_dtype(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
    dtype = module.__dict__.pop("_input_dtype", None)
    return output.to(dtype) if dtype is not None else None


def drop_repeated_fake_quant(graph: GraphModule) -> None:
    """Remove the fake-quant calls that repeat a shared one after a value-selecting op (max-pool, flatten...).

    X86InductorQuantizer gives such an op's output the quantization of its input (``SharedQuantizationSpec``),
    and prepare calls that same fake-quant module again on it: in the int8 model the op runs on int8 values
    and its output keeps the input's scale, so the second call is the identity there. In training it cost a
    fake-quant kernel and its backward per call (3 of 8 activation calls of the digits ConvNet), and its
    observer update pulled a moving-average range toward the narrower range of the pooled values. Without
    it, training computes what the int8 model does and ranges are the producing op's. Training graph only:
    evaluation and convert keep prepare's graph (the same values once observers are off).
    """
    called: dict[int, set[Node]] = {}  # fake-quant module -> its call nodes
    for node in list(graph.graph.nodes):
        if node.op != "call_module" or not isinstance(graph.get_submodule(node.target), FakeQuantizeBase):
            continue
        module = id(graph.get_submodule(node.target))
        source = node.args[0]
        if is_call(source, *_VALUE_SELECTING) and source.args[0] in called.get(module, ()):
            node.replace_all_uses_with(source)
            graph.graph.erase_node(node)
        else:
            called.setdefault(module, set()).add(node)
    graph.graph.lint()
    graph.recompile()


def unfuse_float_conv_batchnorm(graph: GraphModule) -> None:
    """Give a conv kept in float (no fake-quant on its weight) its plain ``batch_norm(conv(x, w, b))`` back.

    ``prepare_qat_pt2e`` rewrites every conv-BN, float ones too, as ``bn(conv(x, w * s) / s + b)`` with
    ``s = gamma / sqrt(running_var + eps)``: scaling the weight only matters when it is fake-quantized,
    for a float weight the pattern is the same function at the cost of a weight product, an activation
    division and their backward (a fifth of the digits ConvNet's QAT overhead came from the float first
    conv). Training graph only: evaluation and convert keep prepare's pattern, which the fold expects.
    """
    for bn in [n for n in graph.graph.nodes if is_call(n, _BATCH_NORM)]:
        match = _match_qat_conv_bn(bn)
        if match is None or match[2] is not match[0].args[1]:  # the conv weight goes through fake-quant
            continue
        conv, weight, _, conv_bias = match
        conv.args = (conv.args[0], weight, conv_bias, *conv.args[3:])
        bn.args = (conv, *bn.args[1:])
    # the scaling nodes are dead now; erase only those (pure), not BatchNorm's in-place step counter
    for node in reversed(list(graph.graph.nodes)):
        if node.op == "call_function" and not node.users and node.target in _SCALING:
            graph.graph.erase_node(node)
    graph.graph.lint()
    graph.recompile()


_SCALING = {
    torch.ops.aten.mul.Tensor,
    torch.ops.aten.div.Tensor,
    torch.ops.aten.add.Tensor,
    torch.ops.aten.sqrt.default,
    torch.ops.aten.reshape.default,
    torch.ops.aten.zeros_like.default,
}


def set_batchnorm_training(graph: GraphModule, training: bool) -> None:
    """The PT2E QAT recipe for freezing BatchNorm statistics: the ``training`` argument of every batch_norm op."""
    for node in graph.graph.nodes:
        if node.op == "call_function" and node.target == _BATCH_NORM:
            args = list(node.args)
            args[_BN_TRAINING] = training
            node.args = tuple(args)


def _running_var_users(graph: GraphModule) -> list[tuple[Node, str]]:
    """(batch_norm node, running_var name) for every batch_norm with running statistics."""
    found: list[tuple[Node, str]] = []
    for node in graph.graph.nodes:
        if node.op == "call_function" and node.target == _BATCH_NORM:
            running_var = node.args[4]
            if isinstance(running_var, Node) and running_var.op == "get_attr":
                found.append((node, str(running_var.target)))
    return found


def _eps_adds(running_var: Node) -> list[Node]:
    # The QAT conv-BN pattern scales the weight by gamma / sqrt(running_var + eps): `add(running_var, eps)`.
    return [
        u
        for u in running_var.users
        if u.op == "call_function" and u.target == torch.ops.aten.add.Tensor and isinstance(u.args[1], float)
    ]


def restore_batchnorm_literals(graph: GraphModule, model: nn.Module) -> None:
    """Give every batch_norm (and the QAT pattern's eps add) its module's momentum and eps back."""
    for node, running_var_name in _running_var_users(graph):
        module = model.get_submodule(running_var_name.rpartition(".")[0])
        args = list(node.args)
        args[_BN_MOMENTUM], args[_BN_EPS] = float(module.momentum), float(module.eps)
        node.args = tuple(args)
        for add in _eps_adds(node.args[4]):
            add.args = (add.args[0], float(module.eps))
    graph.recompile()


def drop_unused_tensors(graph: GraphModule) -> GraphModule:
    """Delete the float weights ``convert_pt2e`` leaves behind once their int8 copies are folded constants."""
    used = {node.target for node in graph.graph.nodes if node.op == "get_attr"}
    for fqn, _ in [*graph.named_parameters(), *graph.named_buffers()]:
        if fqn not in used:
            prefix, _, name = fqn.rpartition(".")
            delattr(graph.get_submodule(prefix), name)
    graph.delete_all_unused_submodules()
    return graph


def fold_conv_batchnorm(graph: GraphModule) -> None:
    """Fold every QAT conv-BN pattern of an eval-mode graph into its conv, with the module's real eps.

    The pattern ``prepare_qat_pt2e`` leaves (``qat_utils._get_qat_conv_bn_pattern``) is
    ``bn(conv(x, fq(w * s), 0) / s + b)`` with ``s = gamma / sqrt(running_var + eps)``; in eval mode that is
    ``conv(x, fq(w * s), (b - running_mean) * s + beta)``. ``convert_pt2e`` would fold it too, but only
    after tracing 96 candidate patterns (tens of seconds here) and with eps 1e-5 whatever the module
    said. A graph without BatchNorm skips that step; a BatchNorm this does not recognise is left to it.
    """
    for bn in [n for n in graph.graph.nodes if is_call(n, _BATCH_NORM)]:
        match = _match_qat_conv_bn(bn)
        if match is None:
            continue
        conv, weight_node, scaled_weight, conv_bias_node = match
        gamma, beta, running_mean, running_var = (_tensor(graph, n) for n in bn.args[1:5])
        scale = gamma / torch.sqrt(running_var + bn.args[_BN_EPS])
        weight = _tensor(graph, weight_node)
        conv_bias = _tensor(graph, conv_bias_node) if conv_bias_node is not None else torch.zeros_like(beta)
        prefix = weight_node.target.rpartition(".")[0]
        assign(graph, weight_node.target, weight * scale.reshape([-1] + [1] * (weight.dim() - 1)))
        assign(graph, f"{prefix}.folded_bias", (conv_bias - running_mean) * scale + beta)
        scaled_weight.replace_all_uses_with(weight_node)
        with graph.graph.inserting_before(conv):
            bias = graph.graph.get_attr(f"{prefix}.folded_bias")
        conv.args = (conv.args[0], conv.args[1], bias, *conv.args[3:])
        bn.replace_all_uses_with(conv)
        graph.graph.erase_node(bn)
    # what torchao's fold also removes: BatchNorm's step counter, meaningless in an inference graph
    for node in list(graph.graph.nodes):
        if is_call(node, torch.ops.aten.add_.Tensor) and _is_attr(node.args[0], "num_batches_tracked"):
            graph.graph.erase_node(node)
    graph.graph.eliminate_dead_code()
    graph.graph.lint()
    graph.recompile()


def _match_qat_conv_bn(bn: Node) -> tuple[Node, Node, Node, Node | None] | None:
    """(conv, conv weight get_attr, ``w * s`` node, conv bias get_attr or None) if ``bn`` ends the QAT pattern."""
    aten = torch.ops.aten
    if not all(_is_attr(n) for n in bn.args[1:5]):
        return None
    x, conv_bias = bn.args[0], None
    if is_call(x, aten.add.Tensor) and is_call(x.args[1], aten.reshape.default) and _is_attr(x.args[1].args[0]):
        x, conv_bias = x.args[0], x.args[1].args[0]
    if not (is_call(x, aten.div.Tensor) and is_call(x.args[0], *CONVS) and is_call(x.args[1], aten.reshape.default)):
        return None
    conv, scale = x.args[0], x.args[1].args[0]
    weight_input, bias = conv.args[1], conv.args[2] if len(conv.args) > 2 else None
    # the weight goes through a fake-quant module, unless the conv is kept in float
    is_fake_quant = isinstance(weight_input, Node) and weight_input.op == "call_module"
    scaled_weight = weight_input.args[0] if is_fake_quant else weight_input
    if not (
        is_call(scale, aten.div.Tensor)
        and scale.args[0] is bn.args[1]
        and is_call(scaled_weight, aten.mul.Tensor)
        and (bias is None or is_call(bias, aten.zeros_like.default))
        and len(conv.users) == 1
    ):
        return None
    weight, weight_scale = scaled_weight.args
    if not (_is_attr(weight) and len(weight.users) == 1 and is_call(weight_scale, aten.reshape.default)):
        return None
    if weight_scale.args[0] is not scale:
        return None
    return conv, weight, scaled_weight, conv_bias  # type: ignore[return-value]  # Nodes, as matched above


def _is_attr(node: Any, suffix: str = "") -> bool:
    return isinstance(node, Node) and node.op == "get_attr" and node.target.endswith(suffix)


def _tensor(graph: GraphModule, node: Node) -> torch.Tensor:
    prefix, _, name = node.target.rpartition(".")
    return getattr(graph.get_submodule(prefix), name)
