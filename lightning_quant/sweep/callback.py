"""The Hydra callback that compares a multirun's jobs, and the status file it leaves in each job's folder.

Hydra stops calling callbacks once a job of the sweep failed (``on_multirun_end`` is skipped when the
sweeper re-raises the job's error), so :class:`SweepComparison` rewrites the comparison after every job
as well as at the end: the files in the sweep folder always describe every job that ended.
"""

from __future__ import annotations

import contextlib
import json
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from lightning_quant.files import atomic_write
from lightning_quant.sweep.comparison import is_number, write_comparison
from lightning_quant.sweep.jobs import STATUS_FILE, compare_sweep


class SweepComparison(Callback):
    """Hydra callback that writes ``<stem>.csv``, ``<stem>.md`` and ``<stem>.png`` into the sweep folder.

    Args:
        metric: the accuracy to compare, as logged. Default ``val/acc``: the quantization callbacks
            evaluate float and int8 side by side on the validation set, so every row (float-only jobs
            too) compares the same data. A manifest metric is found by this name or by its last part.
        stem: file name of the three outputs, without extension.
    """

    def __init__(self, metric: str = "val/acc", stem: str = "comparison") -> None:
        if not metric:
            raise ValueError("metric must name the accuracy to compare, e.g. 'val/acc'")
        if not stem or Path(stem).name != stem:
            raise ValueError(f"stem must be a bare file name such as 'comparison', got {stem!r}")
        self.metric = metric
        self.stem = stem

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        record_job_status(Path(config.hydra.runtime.output_dir), job_return)
        self._write(Path(config.hydra.sweep.dir))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._write(Path(config.hydra.sweep.dir))

    def _write(self, sweep_dir: Path) -> None:
        with _locked(sweep_dir / f".{self.stem}.lock"):
            write_comparison(sweep_dir, compare_sweep(sweep_dir, self.metric), self.stem)


def record_job_status(job_dir: Path, job_return: JobReturn) -> None:
    """Write ``job_status.json``: how the job ended, its overrides, and the error if it failed."""
    failed = job_return.status != JobStatus.COMPLETED
    error = job_return._return_value if failed else None
    status = {
        "status": "failed" if failed else "completed",
        "overrides": list(job_return.overrides or []),
        "error": f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else None,
        "traceback": "".join(traceback.format_exception(error)) if isinstance(error, BaseException) else None,
        "return_value": job_return._return_value if is_number(job_return._return_value) else None,
    }
    atomic_write(job_dir / STATUS_FILE, json.dumps(status, indent=2))


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialise writers of one sweep folder (parallel jobs end at the same time); no-op without fcntl."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
