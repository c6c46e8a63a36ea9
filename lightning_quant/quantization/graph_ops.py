"""Names of the operators in a captured (``torch.export``/FX) graph, shared by op counting and fallback search."""

from __future__ import annotations

from typing import Any

# the operators that do a layer's arithmetic (what int8 replaces): a quantized weight feeds one of them
COMPUTE_OPS = frozenset(
    {"aten.conv1d", "aten.conv2d", "aten.conv3d", "aten.linear", "aten.matmul", "aten.addmm", "aten.mm"}
)


def op_name(target: Any) -> str:
    """``aten.linear`` for ``torch.ops.aten.linear.default``."""
    name = str(target)
    return name.rsplit(".", 1)[0] if name.count(".") >= 2 else name
