"""Which mixed-precision format is worth trying on a device, and bf16 inference models (plain torch, no Lightning).

Formats are named with Lightning's precision strings (``"32-true"``, ``"bf16-mixed"``, ``"16-mixed"``) so a
callback can hand them straight to Lightning's ``MixedPrecision`` plugin.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

FLOAT32 = "32-true"
BF16_MIXED = "bf16-mixed"
FP16_MIXED = "16-mixed"


def _cpu_has_bf16_instructions() -> bool:
    # Without AVX512-BF16 or AMX, oneDNN emulates bf16 matmuls/convs in float32 plus conversions: slower.
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def preferred_mixed_precision(device: torch.device | str) -> tuple[str | None, str]:
    """The mixed-precision format the hardware of ``device`` supports, and why; ``None`` means float32.

    bf16 where the device computes it natively, fp16 (with gradient scaling) on CUDA devices without fast
    bf16, otherwise float32. Whether the format is also *faster* for a given model is a separate question:
    :class:`~lightning_quant.AutoMixedPrecision` answers it by measuring.

    Example::

        >>> precision, reason = preferred_mixed_precision("cpu")
        >>> precision in (None, "bf16-mixed")
        True
    """
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return BF16_MIXED, f"{name} computes bf16 natively"
        return FP16_MIXED, f"{name} has no fast bf16, so fp16 with gradient scaling"
    if device.type == "cpu":
        if _cpu_has_bf16_instructions():
            return BF16_MIXED, "the CPU has bf16 instructions (AVX512-BF16 or AMX)"
        return None, "the CPU has no bf16 instructions (AVX512-BF16 or AMX), so bf16 would only be emulated"
    return None, f"no mixed-precision format is known to pay off on {device.type!r} devices"


def to_bfloat16(model: nn.Module, keep_float: Sequence[str] = ()) -> nn.Module:
    """``model`` (in place) computing in bfloat16 but called like before: its weights become bf16, floating-point
    inputs are cast to bf16 on the way in and outputs back to float32 on the way out, and the submodules named in
    ``keep_float`` stay float32 (their inputs cast up, their outputs down again). Hooks, not a wrapper: ``forward``
    keeps its signature, and ``torch.export`` traces the casts into the exported program.

    Example::

        >>> model = to_bfloat16(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), keep_float=["2"])
        >>> model[0].weight.dtype, model[2].weight.dtype, model(torch.ones(3, 4)).dtype
        (torch.bfloat16, torch.float32, torch.float32)
    """
    model.to(torch.bfloat16)
    for name in keep_float:
        layer = model.get_submodule(name)
        layer.to(torch.float32)
        layer.register_forward_pre_hook(functools.partial(_cast_inputs, dtype=torch.float32), with_kwargs=True)
        layer.register_forward_hook(functools.partial(_cast_output, dtype=torch.bfloat16))
    model.register_forward_pre_hook(functools.partial(_cast_inputs, dtype=torch.bfloat16), with_kwargs=True)
    model.register_forward_hook(functools.partial(_cast_output, dtype=torch.float32))
    return model


def _cast_floats(value: Any, dtype: torch.dtype) -> Any:
    return tree_map(lambda v: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v, value)


def _cast_inputs(module: nn.Module, args: tuple, kwargs: dict, dtype: torch.dtype) -> tuple[tuple, dict]:
    return _cast_floats((args, kwargs), dtype)


def _cast_output(module: nn.Module, args: tuple, output: Any, dtype: torch.dtype) -> Any:
    return _cast_floats(output, dtype)
