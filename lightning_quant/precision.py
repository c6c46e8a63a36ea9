"""Which mixed-precision format is worth trying on a device (plain torch, no Lightning).

Formats are named with Lightning's precision strings (``"32-true"``, ``"bf16-mixed"``, ``"16-mixed"``) so a
callback can hand them straight to Lightning's ``MixedPrecision`` plugin.
"""

from __future__ import annotations

import torch

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
