"""Dependency noise dropped from the console, message by message, whoever imports the dependency first (a user's
``import transformers`` imports torchao before we do). Nothing else from these loggers is touched.

- torchao 0.18 on a CPU-only machine: "Failed to load .../_C_mxfp8....so" for each of its CUDA kernel libraries.
- torch, when torchao registers its Enums: "<enum ...> is an Enum subclass and is now natively supported ...".
"""

from __future__ import annotations

import logging

_NOISE = {
    "torchao": ("Failed to load",),
    "torch.utils._pytree": ("is an Enum subclass and is now natively supported",),
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
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in logger.filters):
            logger.addFilter(_DropNoise(fragments))
