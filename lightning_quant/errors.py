"""The errors lightning-quant raises, importable without torchao or Lightning."""

from __future__ import annotations


class QuantizationError(RuntimeError):
    """A model could not be quantized or exported; the message names the model and the reason."""


def first_lines(err: BaseException, lines: int = 6) -> str:
    """The first ``lines`` lines of an exception's message (compiler errors can run to hundreds)."""
    return "\n".join(str(err).strip().splitlines()[:lines])
