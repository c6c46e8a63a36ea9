"""Dependency noise dropped from the console, message by message, whoever imports the dependency first (a user's
``import transformers`` imports torchao before we do). Nothing else from these loggers is touched.

- torchao 0.18 on a CPU-only machine: "Failed to load .../_C_mxfp8....so" for each of its CUDA kernel libraries.
- torch, when torchao registers its Enums: "<enum ...> is an Enum subclass and is now natively supported ...".
- torch, loading a program with a resolved data-dependent branch: "Symbol u1 did not appear in the graph ...".
- ONNX Runtime's per-channel static quantization: "Axis 1 is out-of-range for weight '...norm1.weight' with rank 1"
  (a LayerNorm weight it leaves float, as it should).
"""

from __future__ import annotations

import logging

_NOISE = {
    "torchao": ("Failed to load",),
    "torch.utils._pytree": ("is an Enum subclass and is now natively supported",),
    # loading a program whose capture resolved a data-dependent branch: the branch's unbacked symbol is gone
    "torch._export.serde.serialize": ("did not appear in the graph that was deserialized",),
    # ONNX Runtime's per-channel quantize_static, logged at the root logger for each LayerNorm weight it skips
    "root": ("is out-of-range for weight",),
}


class _DropNoise(logging.Filter):
    def __init__(self, fragments: tuple[str, ...]) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


def install() -> None:
    """Add the filters (once)."""
    for name, fragments in _NOISE.items():
        logger = logging.getLogger(name if name != "root" else None)
        if not any(isinstance(f, _DropNoise) for f in logger.filters):
            logger.addFilter(_DropNoise(fragments))
