"""Leave layers of a QAT-trained model in float at convert time, without training again.

QAT decides which ops are quantized when fake-quant is inserted (``QATConfig.keep_float``), before training.
The accuracy budget's search decides after training. :func:`convert_keeping_float` converts a copy of the
eval graph in which the fake-quant modules feeding the compute ops (conv, linear, matmul) of the named
modules are bypassed: those ops then read float inputs and float weights, and ``convert_pt2e`` leaves
them float. Fake-quant on their *outputs* stays, since it belongs to the next (quantized) layer's input.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from torch.fx import GraphModule, Node

from lightning_quant.quantization._torchao import FakeQuantizeBase
from lightning_quant.quantization.config import is_kept_float
from lightning_quant.quantization.graph_ops import COMPUTE_OPS, op_name
from lightning_quant.quantization.qat import QATGraph


def convert_keeping_float(qat: QATGraph, keep_float: Sequence[str]) -> GraphModule:
    """``qat.convert()`` with the compute ops of ``keep_float`` (module names as in ``qat.model``) in float.

    Nothing of ``qat`` changes: its training graph, eval graph and fake-quant state are left as they are.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> from lightning_quant.quantization.qat import prepare_qat
        >>> model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> qat = prepare_qat(model, torch.randn(4, 8))
        >>> _ = qat(torch.randn(16, 8))  # training step: observers see data
        >>> from lightning_quant.quantization import count_quantized_ops
        >>> sum(count_quantized_ops(convert_keeping_float(qat, ["2"])).values())
        1
    """
    if not keep_float:
        return qat.convert()
    source = qat.eval_graph
    graph = GraphModule(source, copy.deepcopy(source.graph))
    graph.meta.update(source.meta)  # what convert_pt2e reads from prepare
    bypass_fake_quant(graph, keep_float)
    partial = copy.copy(qat)  # shares the model's live tensors and the fake-quant state, reads the new eval graph
    partial._eval_graph = graph
    return partial.convert()


def bypass_fake_quant(graph: GraphModule, keep_float: Sequence[str]) -> list[str]:
    """Rewire, in place, the compute ops of the ``keep_float`` modules to read around their fake-quant
    inputs; fake-quant nodes left without users are removed. Returns the names of the bypassed ops."""
    keep = tuple(keep_float)
    bypassed = []
    for node in graph.graph.nodes:
        if node.op != "call_function" or op_name(node.target) not in COMPUTE_OPS:
            continue
        paths = [path for path, _ in node.meta.get("nn_module_stack", {}).values()]
        if not any(is_kept_float(_normalize(path), keep) for path in paths):
            continue
        node.args = tuple(_around_fake_quant(graph, arg) for arg in node.args)
        bypassed.append(node.name)
    for node in reversed(list(graph.graph.nodes)):
        if _is_fake_quant(graph, node) and not node.users:
            graph.graph.erase_node(node)
    graph.graph.lint()
    graph.recompile()
    return bypassed


def _around_fake_quant(graph: GraphModule, arg: Any) -> Any:
    return arg.args[0] if _is_fake_quant(graph, arg) else arg


def _is_fake_quant(graph: GraphModule, node: object) -> bool:
    return (
        isinstance(node, Node)
        and node.op == "call_module"
        and isinstance(graph.get_submodule(node.target), FakeQuantizeBase)
    )


def _normalize(path: str) -> str:
    return path[len("L['self'].") :] if path.startswith("L['self'].") else path
