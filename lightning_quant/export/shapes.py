"""The dynamic batch dimension every export uses (``torch.export`` treats a size-1 dimension as constant)."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch.export import Dim
from torch.utils._pytree import tree_map

from lightning_quant.inputs import ModelInputs


def batch_dynamic_shapes(model: Any, inputs: ModelInputs, dynamic_batch: bool = True) -> dict[str, Any] | None:
    """``dynamic_shapes`` for ``torch.export.export(model, inputs.args, inputs.kwargs, ...)``.

    Dimension 0 of every tensor whose leading size equals the batch size is one shared ``Dim("batch")``;
    other tensors and non-tensor arguments stay static. ``None`` when ``dynamic_batch`` is off.
    """
    batch_size = inputs.batch_size()
    if not dynamic_batch or batch_size is None:
        return None
    batch = Dim("batch")

    def spec(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch_size:
            return {0: batch}
        return None

    forward = model.forward if hasattr(model, "forward") else model
    arguments = inspect.signature(forward).bind(*inputs.args, **inputs.kwargs).arguments
    return {name: tree_map(spec, value) for name, value in arguments.items()}
