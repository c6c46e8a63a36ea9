"""The folder a run writes its files into (``dirpath``): one run at a time, and a new run's files replace the previous
run's only when it succeeds.

* **One run at a time**: :func:`lock` creates ``dirpath/.lightning-quant.lock`` (the run's pid, host and owner); a
  second run is refused with a message naming the first. A lock whose process is gone (same host) is taken over.
* **Staged**: a run writes into a fresh ``dirpath/unfinished-<time>-<id>/`` (:func:`new_staging`). When it
  succeeds, :func:`publish` moves its files into ``dirpath`` (``manifest.json`` last) and removes the previous
  run's other files; a failure or Ctrl-C leaves the previous run's files and manifest as they were, and this run's
  failed manifest and ``errors.log`` in its ``unfinished-...`` folder (in ``dirpath`` itself when there was no good
  run to keep).

Example::

    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> held = lock(folder, "deploy")
    >>> lock(folder, "deploy")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    lightning_quant.run_folder.FolderInUseError: deploy: ... is in use by another run (deploy, pid ...
    >>> unlock(held)
"""

from __future__ import annotations

import json
import os
import signal
import socket
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Optional

from lightning_quant.export.api import ERROR_LOG
from lightning_quant.manifest import FILENAME

LOCK = ".lightning-quant.lock"
STAGING_PREFIX = "unfinished-"


class FolderInUseError(RuntimeError):
    """Another run holds the folder's lock."""


def lock(dirpath: Path, owner: str) -> Path:
    """Take ``dirpath`` for this run (creating it); return the lock file to :func:`unlock` when the run ends.

    Raises:
        FolderInUseError: another live run holds it; the message names its owner, pid, host and start.
    """
    dirpath = Path(dirpath)
    dirpath.mkdir(parents=True, exist_ok=True)
    path = dirpath / LOCK
    record = {"owner": owner, "pid": os.getpid(), "host": socket.gethostname(), "started": _now()}
    try:
        descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        holder = _read_lock(path)
        if not _is_stale(holder):
            raise FolderInUseError(
                f"{owner}: {dirpath} is in use by another run ({holder.get('owner', '?')}, pid "
                f"{holder.get('pid', '?')} on {holder.get('host', '?')}, since {holder.get('started', '?')}): one run "
                f"writes into a folder at a time. Wait for it to end, or choose another dirpath. If no such run is "
                f"alive (its machine restarted), delete {path}."
            ) from None
        path.unlink(missing_ok=True)  # its process is gone: take the folder over
        return lock(dirpath, owner)
    with os.fdopen(descriptor, "w") as file:
        json.dump(record, file)
    return path


def unlock(path: Path) -> None:
    """Release a lock :func:`lock` returned (only if this process still holds it)."""
    holder = _read_lock(path)
    if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        path.unlink(missing_ok=True)


def new_staging(dirpath: Path) -> Path:
    """A fresh, empty folder inside ``dirpath`` for one run's files."""
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    return Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{stamp}-", dir=dirpath))


@contextmanager
def claimed(dirpath: Path, owner: str) -> Iterator[Path]:
    """Lock ``dirpath`` and yield a staging folder in it; the lock is released however the block ends. The block
    publishes the staging folder (or leaves it, failed); one left empty is removed."""
    held = lock(dirpath, owner)
    try:
        staging = new_staging(Path(dirpath))
        try:
            yield staging
        finally:
            if staging.is_dir() and not any(staging.iterdir()):
                staging.rmdir()
    finally:
        unlock(held)


def destination(staging: Optional[Path], dirpath: Path, succeeded: bool) -> Path:
    """Where a finished run's files and manifest end up: ``dirpath`` when the run succeeded (it has verified files)
    or there is no good run in ``dirpath`` to keep (a manifest listing verified files); else its staging folder,
    left beside the previous run."""
    if staging is None or succeeded:
        return Path(dirpath)
    previous = _manifest(Path(dirpath))
    return staging if previous.get("artifacts") and previous.get("status") != "failed" else Path(dirpath)


def finish(staging: Optional[Path], final: Path) -> None:
    """Publish the staging folder into ``final`` (see :func:`destination`), unless it is to stay where it is."""
    if staging is not None and final != staging:
        publish(staging, final)


def run_files(staging: Path) -> list[str]:
    """The files a run made (recorded in its manifest as ``files``: what the next run replaces)."""
    return sorted([*(p.name for p in Path(staging).iterdir() if p.is_file()), FILENAME])


def publish(staging: Path, dirpath: Path) -> None:
    """Move a finished run's files from ``staging`` into ``dirpath``, ``manifest.json`` last, and remove the files
    of the previous run there that this run did not make. Ctrl-C is held back until that is done."""
    staging, dirpath = Path(staging), Path(dirpath)
    new = [p.name for p in staging.iterdir() if p.is_file()]
    previous = _manifest(dirpath)
    # a manifest written before runs recorded their files: its artifacts and report
    old = set(previous.get("files") or [*(a.get("path") for a in previous.get("artifacts", [])), ERROR_LOG])
    with _interrupts_held():
        for name in sorted(new, key=lambda name: name == FILENAME):
            os.replace(staging / name, dirpath / name)
        for name in old - set(new):
            if isinstance(name, str) and "/" not in name and name not in (LOCK, FILENAME):
                (dirpath / name).unlink(missing_ok=True)
        staging.rmdir()


def moved(text: str, staging: Optional[Path], final: Path) -> str:
    """``text`` with the paths into ``staging`` made paths into ``final``, where its files end up."""
    return text if staging is None or staging == final else text.replace(str(staging), str(final))


def _manifest(dirpath: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((dirpath / FILENAME).read_text())
    except (OSError, ValueError):
        return {}
    return manifest if isinstance(manifest, dict) else {}


def _read_lock(path: Path) -> dict[str, Any]:
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _is_stale(holder: dict[str, Any]) -> bool:
    """The lock's process is gone: same host, and no process has its pid."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@contextmanager
def _interrupts_held() -> Iterator[None]:
    """Hold SIGINT (Ctrl-C) back until the block is done, then raise it: a few renames are not cut in half."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[Any] = []
    previous = signal.signal(signal.SIGINT, lambda *args: received.append(args))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        if callable(previous):
            previous(*received[0])
        raise KeyboardInterrupt
