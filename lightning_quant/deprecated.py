"""Calls into deprecated torch APIs (``torch.ao.quantization``, TorchScript), made where torchao has no answer.

torch 2.13 warns on every call into them; we say it once, in our own words, and silence the repeats.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

_DEPRECATION_MESSAGES = (
    r"torch\.ao\.quantization is deprecated",
    r"torch\.quantize_per_tensor, torch\.quantize_per_channel",
    r".*torch\.jit\..* is deprecated",
    r"`torch\.jit\.",
)
_told: set[str] = set()


@contextmanager
def legacy_api(what: str) -> Iterator[None]:
    """Run ``what`` on a deprecated API: one warning of ours per process, torch's repeats silenced."""
    if what not in _told:
        _told.add(what)
        warnings.warn(
            f"lightning_quant uses the deprecated torch {what} because torchao has no equivalent; "
            "torch warns it will be removed in a future release.",
            FutureWarning,
            stacklevel=3,
        )
    with warnings.catch_warnings():
        for message in _DEPRECATION_MESSAGES:
            warnings.filterwarnings("ignore", message=message)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.(ao|jit)")
        yield
