"""``"aoti"``: an AOTInductor package, compiled with freezing so int8 ops become fused oneDNN kernels.

Without ``freezing`` the package keeps the q/dq graph and runs its matmuls in float (3.1 ms vs 0.65 ms
measured on a small CNN): the weights must be constants for Inductor to prepack them as int8. Freezing
applies only to a graph captured without autograd, hence ``torch.no_grad()`` around export and compile.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_quant.export.files import atomic_path
from lightning_quant.export.shapes import batch_dynamic_shapes
from lightning_quant.memory_format import with_contiguous_weights
from lightning_quant.quantization.inputs import ModelInputs

SUFFIX = ".pt2"
INDUCTOR_CONFIGS = {"freezing": True}


def export_aoti(model: nn.Module, inputs: ModelInputs, path: Path, dynamic_batch: bool = True) -> dict[str, Any]:
    model = with_contiguous_weights(model)  # channels-last weights (ChannelsLast) compile wrongly here
    with torch.no_grad(), atomic_path(path) as temporary:
        program = torch.export.export(
            model, inputs.args, inputs.kwargs, dynamic_shapes=batch_dynamic_shapes(model, inputs, dynamic_batch)
        )
        torch._inductor.aoti_compile_and_package(
            program, package_path=str(temporary), inductor_configs=dict(INDUCTOR_CONFIGS)
        )
    return {"how": "torch.export -> torch._inductor.aoti_compile_and_package", "inductor_configs": INDUCTOR_CONFIGS,
            "load": "torch._inductor.aoti_load_package(path)(*args, **kwargs)"}


def load_aoti(path: Path) -> Any:
    return torch._inductor.aoti_load_package(str(path))
