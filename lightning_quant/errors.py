"""The errors lightning-quant raises, importable without torchao or Lightning, and how their text is kept short:
one paragraph for the console, the whole report (compiler dumps, FX graphs, tracebacks) in a log file."""

from __future__ import annotations

import re
import traceback
from pathlib import Path

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class QuantizationError(RuntimeError):
    """A model could not be quantized or exported; the message names the model and the reason."""


def first_lines(err: BaseException, lines: int = 6) -> str:
    """The first ``lines`` non-empty lines of an exception's message, without terminal colour codes (compiler
    errors can run to hundreds of lines).

    Example::

        >>> first_lines(ValueError("\\x1b[93mshape mismatch\\x1b[0m\\n\\n  at line 3\\nthe graph: ..."), lines=2)
        'shape mismatch\\n  at line 3'
    """
    text = _ANSI.sub("", str(err))
    return "\n".join([line for line in text.strip().splitlines() if line.strip()][:lines])


def write_report(err: BaseException, path: Path) -> Path:
    """Write everything about ``err`` (its traceback and, for a :class:`~lightning_quant.capture.CaptureError`,
    torch's full report) to ``path``, appending, so a one-paragraph message can point at it."""
    text = _ANSI.sub("", "".join(traceback.format_exception(type(err), err, err.__traceback__)))
    report = getattr(err, "report", "")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as log:
        log.write(text + (f"\n{_ANSI.sub('', report)}\n" if report else "") + "\n" + "=" * 80 + "\n")
    return path
