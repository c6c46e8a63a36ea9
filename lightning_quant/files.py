"""Atomic writes and file fingerprints: an artifact is either complete on disk or absent."""

from __future__ import annotations

import errno
import hashlib
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# errno values that mean "no room for this file": a full disk, a file-size limit (ulimit -f), a quota
NO_SPACE = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT})


class NoSpaceError(OSError):
    """A file could not be written for lack of space; ``errno`` is the system's, the message says what to do."""

    def __str__(self) -> str:
        directory = Path(self.filename).parent if self.filename else "the output directory"
        return (
            f"writing {self.filename} failed: {self.strerror} (the disk is full, or a file-size limit or "
            f"quota was reached). Nothing was left under the final name. Free space in {directory} (or choose "
            "another dirpath) and run again."
        )


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` (same suffix); move it into place only if the block succeeds.

    A write that fails for lack of space raises :class:`NoSpaceError` (an ``OSError`` with the same errno)
    naming the file and the fix. The temporary file is removed either way.

    Writers in C++ that write to a path (``torch.save``, ``torch.export.save``, ``torch.jit.save``) may abort
    the whole process when the disk fills mid-write; serialize those into memory and use
    :func:`atomic_write`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".tmp-{uuid.uuid4().hex[:8]}-{path.name}")
    try:
        yield temporary
        os.replace(temporary, path)
    except OSError as err:
        if err.errno in NO_SPACE and not isinstance(err, NoSpaceError):
            raise NoSpaceError(err.errno, err.strerror or os.strerror(err.errno), str(path)) from err
        raise
    finally:
        if temporary.exists():
            temporary.unlink()


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write ``data`` (text is UTF-8 encoded) to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as temporary:
        temporary.write_bytes(data.encode() if isinstance(data, str) else data)


def sha256(path: Path) -> str:
    """The hex SHA-256 of the file at ``path``, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
