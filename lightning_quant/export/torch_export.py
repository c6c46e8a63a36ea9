"""``"torch_export"``: the ``torch.export`` program, saved with ``torch.export.save``.

This is the portable, unlowered program: loaded and run eagerly it executes the q/dq reference graph
(slower than float for static int8). Lower it with AOTInductor (freezing) or ``torch.compile`` to deploy.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_quant.capture import capture
from lightning_quant.files import atomic_write
from lightning_quant.inputs import ModelInputs
from lightning_quant.weight_packing import weight_only_linear  # noqa: F401  registers the op a weight-only program calls

SUFFIX = ".pt2"


def export_program(model: nn.Module, inputs: ModelInputs, path: Path, dynamic_batch: bool = True) -> dict[str, Any]:
    captured = capture(model, inputs, dynamic_batch)
    # torch.export.save stores the example inputs too (a language model's cache: megabytes); nothing reads them
    captured.program.example_inputs = None
    buffer = io.BytesIO()  # torch.export.save to a path aborts the process if the disk fills mid-write
    torch.export.save(captured.program, buffer)
    atomic_write(path, buffer.getvalue())
    return {
        "how": "torch.export -> torch.export.save (unlowered program)",
        "load": "torch.export.load(path).module()(*args, **kwargs)",
        **captured.details(),
    }


def load_program(path: Path) -> Any:
    return torch.export.load(str(path)).module()
