"""Compare the jobs of a Hydra multirun: a table (CSV, Markdown) and a picture (accuracy against latency).

Each job leaves files in its own folder: ``metrics.json`` (what ``train`` logged), ``manifest.json``
files (what a quantization callback measured: float and int8 accuracy, latency, size) and
``job_status.json`` (written by :class:`SweepComparison` when the job ends: completed or failed, and
why). :func:`compare_sweep` reads whatever each job left (the manifests first: any app's callbacks write them);
a job with neither a manifest nor metrics is a failed row, and
it hides no other row. One row per (job, manifest); a job that only trained (no manifest) is one
``float`` row with its accuracy.

Hydra stops calling callbacks once a job of the sweep failed (``on_multirun_end`` is skipped when the
sweeper re-raises the job's error), so :class:`SweepComparison` rewrites the comparison after every job
as well as at the end: the files in the sweep folder always describe every job that ended.

Example (configured in ``conf/hydra/default.yaml``; a separate app adds the defaults entry
``lightning_quant/sweep@hydra.callbacks.comparison: comparison``)::

    hydra:
      callbacks:
        comparison:
          _target_: lightning_quant.sweep.SweepComparison

Rebuild the comparison of a sweep folder by hand::

    python -m lightning_quant.sweep outputs/train/multiruns/2025-01-01_12-00-00

The modules: :mod:`~lightning_quant.sweep.callback` (:class:`SweepComparison`, the job status file),
:mod:`~lightning_quant.sweep.jobs` (a sweep's jobs read into rows: :func:`compare_sweep`) and
:mod:`~lightning_quant.sweep.comparison` (the rows written: Pareto front, CSV, Markdown, PNG).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from lightning_quant.sweep.callback import SweepComparison, record_job_status
from lightning_quant.sweep.comparison import (
    COLUMNS,
    deployed_point,
    mark_pareto_front,
    markdown_table,
    plot_png,
    write_comparison,
)
from lightning_quant.sweep.jobs import STATUS_FILE, compare_sweep, find_jobs, manifest_row, read_job

__all__ = [
    "COLUMNS",
    "STATUS_FILE",
    "SweepComparison",
    "compare_sweep",
    "deployed_point",
    "find_jobs",
    "main",
    "manifest_row",
    "mark_pareto_front",
    "markdown_table",
    "plot_png",
    "read_job",
    "record_job_status",
    "write_comparison",
]


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m lightning_quant.sweep SWEEP_DIR [METRIC]``: rebuild the comparison of a sweep folder."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or not Path(args[0]).is_dir():
        raise SystemExit("usage: python -m lightning_quant.sweep SWEEP_DIR [METRIC]   (SWEEP_DIR: a multirun folder)")
    sweep_dir, metric = Path(args[0]), (args[1] if len(args) > 1 else "val/acc")
    write_comparison(sweep_dir, compare_sweep(sweep_dir, metric))
    print(f"wrote {sweep_dir / 'comparison.csv'}, .md and .png")
