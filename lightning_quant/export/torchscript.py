"""``"torchscript"``: legacy ``torch.jit.trace``, for models the deprecated TorchScript still runs.

The traced module takes the input tensors positionally, flattened in ``manifest["input"]["tensors"]``
order; non-tensor arguments are frozen at their example values.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from lightning_quant.deprecated import legacy_api
from lightning_quant.files import atomic_write
from lightning_quant.inputs import ModelInputs

SUFFIX = ".ts"


class _FlatTensors(nn.Module):
    """Calls ``model`` with the example's structure, taking its tensors as flat positional arguments."""

    def __init__(self, model: nn.Module, inputs: ModelInputs) -> None:
        super().__init__()
        self.model = model
        self._leaves, self._spec = tree_flatten((inputs.args, inputs.kwargs))
        self._tensor_slots = [i for i, leaf in enumerate(self._leaves) if isinstance(leaf, torch.Tensor)]

    def forward(self, *tensors: torch.Tensor) -> Any:
        leaves = list(self._leaves)
        for slot, tensor in zip(self._tensor_slots, tensors):
            leaves[slot] = tensor
        args, kwargs = tree_unflatten(leaves, self._spec)
        return self.model(*args, **kwargs)


def export_torchscript(model: nn.Module, inputs: ModelInputs, path: Path, dynamic_batch: bool = True) -> dict[str, Any]:
    with legacy_api("TorchScript (torch.jit.trace)"), torch.no_grad():
        traced = torch.jit.trace(_FlatTensors(model, inputs).eval(), tuple(inputs.tensors()), check_trace=False)
        buffer = io.BytesIO()  # torch.jit.save to a path may abort the process if the disk fills mid-write
        torch.jit.save(traced, buffer)
        atomic_write(path, buffer.getvalue())
    return {"how": "torch.jit.trace (legacy)", "load": "torch.jit.load(path)(*input_tensors)"}


class TorchScriptRunner:
    """A loaded TorchScript file called like the model: ``runner(*args, **kwargs)``."""

    def __init__(self, path: Path) -> None:
        with legacy_api("TorchScript (torch.jit.trace)"):
            self.module = torch.jit.load(str(path))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with legacy_api("TorchScript (torch.jit.trace)"):
            return self.module(*ModelInputs(args, kwargs).tensors())


def load_torchscript(path: Path) -> TorchScriptRunner:
    return TorchScriptRunner(path)
