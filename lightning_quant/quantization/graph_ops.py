"""Operators in a captured (``torch.export``/FX) graph: names and matching, shared by op counting, fallback
search and the QAT passes."""

from __future__ import annotations

from typing import Any

import torch
from torch.fx import Node

# the operators that do a layer's arithmetic (what int8 replaces): a quantized weight feeds one of them
COMPUTE_OPS = frozenset(
    {"aten.conv1d", "aten.conv2d", "aten.conv3d", "aten.linear", "aten.matmul", "aten.addmm", "aten.mm"}
)


def op_name(target: Any) -> str:
    """``aten.linear`` for ``torch.ops.aten.linear.default``."""
    name = str(target)
    return name.rsplit(".", 1)[0] if name.count(".") >= 2 else name


CONVS = (torch.ops.aten.conv1d.default, torch.ops.aten.conv2d.default, torch.ops.aten.conv3d.default)


def is_call(node: Any, *targets: Any) -> bool:
    """Whether ``node`` is an FX node calling one of ``targets`` (e.g. ``torch.ops.aten.conv2d.default``)."""
    return isinstance(node, Node) and node.op == "call_function" and node.target in targets
