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
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import sys
import traceback
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from lightning_quant import report
from lightning_quant.files import atomic_write

STATUS_FILE = "job_status.json"
COLUMNS = (
    "job",
    "status",
    "model",
    "callbacks",
    "approach",
    "acc_float",
    "acc_int8",
    "latency_float_ms",
    "latency_int8_ms",
    "speedup",
    "size_float_bytes",
    "size_int8_bytes",
    "smallest_file_bytes",
    "shipped_file",
    "objective",
    "pareto",
    "overrides",
    "error",
    "job_dir",
)


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
        "return_value": job_return._return_value if _is_number(job_return._return_value) else None,
    }
    atomic_write(job_dir / STATUS_FILE, json.dumps(status, indent=2))


def compare_sweep(sweep_dir: str | Path, metric: str = "val/acc") -> list[dict[str, Any]]:
    """One row per job and manifest in ``sweep_dir``, with the Pareto front (accuracy up, latency down) marked.

    ``overrides`` lists only the overrides that differ between jobs (all of a job's are in its ``.hydra/``).
    """
    rows = [row for job_dir in find_jobs(Path(sweep_dir)) for row in read_job(job_dir, metric)]
    overrides = [set(row["overrides"]) for row in rows]
    shared = set.intersection(*overrides) if len(overrides) > 1 else set()
    for row in rows:
        row["overrides"] = " ".join(o for o in row["overrides"] if o not in shared)
    mark_pareto_front(rows)
    return rows


def find_jobs(sweep_dir: Path) -> list[Path]:
    """Folders of the jobs in a sweep: those Hydra wrote ``.hydra/`` into, or that have a status file."""
    found = {p.parent.parent for p in sweep_dir.rglob(".hydra/overrides.yaml")}
    found |= {p.parent for p in sweep_dir.rglob(STATUS_FILE)}
    return sorted(found, key=lambda p: _job_sort_key(p.relative_to(sweep_dir)))


def read_job(job_dir: Path, metric: str = "val/acc") -> list[dict[str, Any]]:
    """The rows one job contributes: one per manifest, or one float row; a failed row if it left no metrics."""
    status = _read_json(job_dir / STATUS_FILE) or {}
    metrics = _read_json(job_dir / "metrics.json")
    hydra_dir = job_dir / ".hydra"
    overrides = status.get("overrides") or _read_yaml(hydra_dir / "overrides.yaml") or []
    choices = _choices(_read_yaml(hydra_dir / "hydra.yaml"))
    base: dict[str, Any] = {
        "job": job_dir.name,
        "model": choices.get("model") or _target_name(_read_yaml(hydra_dir / "config.yaml"), "model"),
        "callbacks": choices.get("callbacks"),
        "overrides": [str(o) for o in overrides],
        "job_dir": str(job_dir),
        "error": status.get("error"),
        "objective": status.get("return_value"),
    }
    manifests = sorted(job_dir.rglob("manifest.json"))
    if status.get("status") == "failed" or (metrics is None and not manifests):
        error = base["error"] or (
            "the job left neither a manifest.json (the quantization callbacks write one) nor a "
            "metrics.json (it was stopped, or never got to write them)"
        )
        return [{**dict.fromkeys(COLUMNS), **base, "status": "failed", "error": error}]
    if not manifests:
        return [
            {**dict.fromkeys(COLUMNS), **base, "status": "ok", "approach": "float", "acc_float": metrics.get(metric)}
        ]
    # the manifests are what the callbacks wrote, in any app; metrics.json (our train.py's) only fills gaps
    return [
        {**dict.fromkeys(COLUMNS), **base, **manifest_row(path, metric, metrics or {}, base["model"])}
        for path in manifests
    ]


def manifest_row(path: Path, metric: str, metrics: Mapping[str, Any], model: str | None = None) -> dict[str, Any]:
    """Columns read from one quantization manifest (float vs int8 accuracy, latency of the fastest shipped file,
    size); ``model`` defaults to the manifest's (the LightningModule's class)."""
    manifest = _read_json(path)
    if manifest is None:
        return {"status": "failed", "error": f"{path} is not readable JSON"}
    acc_float = _side(manifest.get("metrics"), "float", metric)
    latency_float = _side(manifest.get("latency_ms"), "float", metric)
    latency_int8 = _side(manifest.get("latency_ms"), "quantized", metric)
    recommended = [a["path"] for a in manifest.get("artifacts") or [] if a.get("format") == manifest.get("recommended")]
    return {
        "status": "ok",
        "model": model or manifest.get("model"),
        "shipped_file": recommended[0] if recommended else None,
        "approach": manifest.get("approach", "quantized"),
        "acc_float": acc_float if acc_float is not None else metrics.get(metric),
        "acc_int8": _side(manifest.get("metrics"), "quantized", metric),
        "latency_float_ms": latency_float,
        "latency_int8_ms": latency_int8,
        "speedup": latency_float / latency_int8 if latency_float and latency_int8 else None,
        "size_float_bytes": _side(manifest.get("size_bytes"), "float", metric),
        "size_int8_bytes": _side(manifest.get("size_bytes"), "quantized", metric),
        "smallest_file_bytes": _side(manifest, "size_bytes", "smallest_artifact"),
    }


def deployed_point(row: Mapping[str, Any]) -> tuple[float, float] | None:
    """(latency ms, accuracy) of what a row ships: the int8 model if there is one, else the float model."""
    return _point(row, "latency_int8_ms", "acc_int8") or _point(row, "latency_float_ms", "acc_float")


def _point(row: Mapping[str, Any], latency: str, accuracy: str) -> tuple[float, float] | None:
    if _is_number(row.get(latency)) and _is_number(row.get(accuracy)):
        return float(row[latency]), float(row[accuracy])
    return None


def mark_pareto_front(rows: Sequence[dict[str, Any]]) -> None:
    """``pareto`` = True for the rows no other row beats on both latency (lower) and accuracy (higher)."""
    points = {i: deployed_point(row) for i, row in enumerate(rows)}
    for i, row in enumerate(rows):
        p = points[i]
        if p is None:
            row["pareto"] = None
            continue
        row["pareto"] = not any(
            q is not None and q[0] <= p[0] and q[1] >= p[1] and q != p for j, q in points.items() if j != i
        )


def write_comparison(sweep_dir: str | Path, rows: Sequence[Mapping[str, Any]], stem: str = "comparison") -> None:
    """Write ``<stem>.csv``, ``<stem>.md`` and ``<stem>.png`` into ``sweep_dir`` (each atomically)."""
    report.write_table(sweep_dir, stem, rows, COLUMNS, markdown_table(rows), plot_png(rows))


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    header = ["job", "status", "model", "callbacks", "approach", "acc float", "acc int8", "latency float (ms)",
              "latency int8 (ms)", "speedup", "size float (KiB)", "size int8 (KiB)", "smallest file (KiB)",
              "recommended file", "objective", "Pareto", "overrides"]  # fmt: skip
    table = []
    for row in rows:
        table.append(
            [
                row["job"],
                row["status"] if row["status"] == "ok" else f"**{row['status']}**: {row.get('error') or ''}",
                row.get("model"),
                row.get("callbacks"),
                row.get("approach"),
                _fmt(row.get("acc_float"), "{:.4f}"),
                _fmt(row.get("acc_int8"), "{:.4f}"),
                _fmt(row.get("latency_float_ms"), "{:.3f}"),
                _fmt(row.get("latency_int8_ms"), "{:.3f}"),
                _fmt(row.get("speedup"), "{:.2f}x"),
                _fmt(row.get("size_float_bytes"), "{:.1f}", scale=1 / 1024),
                _fmt(row.get("size_int8_bytes"), "{:.1f}", scale=1 / 1024),
                _fmt(row.get("smallest_file_bytes"), "{:.1f}", scale=1 / 1024),
                row.get("shipped_file") or "none faster than float",
                _fmt(row.get("objective"), "{:.4f}"),
                {True: "yes", False: "", None: ""}[row.get("pareto")],
                f"`{row['overrides']}`" if row.get("overrides") else "",
            ]
        )
    return report.markdown_table(header, table)


_LABEL_OFFSETS = ((5, 5), (5, -11), (-11, 5), (-11, -11))  # turn by turn, so close points' labels do not overlap
_MARKERS = "osD^vPXh*"


def plot_png(rows: Sequence[Mapping[str, Any]]) -> bytes:
    """Accuracy against latency, one point per row (its int8 model, or float if none), Pareto front marked.

    Colour is the approach, marker shape the model, the label the job number (the table has the rest).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    placed = [(row, point) for row in rows if (point := deployed_point(row)) is not None]
    colors = {a: f"C{i % 10}" for i, a in enumerate(sorted({str(r["approach"]) for r, _ in placed}))}
    markers = {m: _MARKERS[i % len(_MARKERS)] for i, m in enumerate(sorted({str(r.get("model")) for r, _ in placed}))}
    figure = Figure(figsize=(8, 5), dpi=120, layout="constrained")
    axes = figure.subplots()
    for i, (row, point) in enumerate(placed):
        color, marker = colors[str(row["approach"])], markers[str(row.get("model"))]
        float_point = _point(row, "latency_float_ms", "acc_float")
        if row.get("acc_int8") is not None and float_point is not None:
            arrow = {"arrowstyle": "->", "color": color, "lw": 0.8, "alpha": 0.6}
            axes.annotate("", xy=point, xytext=float_point, arrowprops=arrow)
            axes.scatter(*float_point, s=30, marker=marker, facecolors="none", edgecolors=color, zorder=2)
        axes.scatter(*point, s=45, marker=marker, color=color, zorder=3)
        axes.annotate(str(row["job"]), point, textcoords="offset points", xytext=_LABEL_OFFSETS[i % 4], fontsize=8)
    front = sorted(point for row, point in placed if row.get("pareto"))
    if front:
        axes.plot(*zip(*front), color="black", lw=1, ls="--", marker="o", markersize=12, markerfacecolor="none",
                  label="Pareto front", zorder=4)  # fmt: skip
    for approach, color in colors.items():
        axes.scatter([], [], color=color, label=approach)
    if len(markers) > 1:
        for model, marker in markers.items():
            axes.scatter([], [], color="0.3", marker=marker, label=f"model {model}")
    if any(r.get("acc_int8") is not None for r, _ in placed):
        axes.scatter([], [], facecolors="none", edgecolors="0.3", label="its float model\n(arrow: to int8)")
    latencies = [p[0] for _, p in placed] + [
        r["latency_float_ms"] for r in rows if _is_number(r.get("latency_float_ms"))
    ]
    if latencies and min(latencies) > 0 and max(latencies) / min(latencies) > 20:
        axes.set_xscale("log")
    failed = [str(r["job"]) for r in rows if r["status"] != "ok"]
    unmeasured = [str(r["job"]) for r in rows if r["status"] == "ok" and deployed_point(r) is None]
    notes = ([f"failed: {_jobs(failed)}"] if failed else []) + (
        [f"no latency measured: {_jobs(unmeasured)}"] if unmeasured else []
    )
    if not placed:
        axes.text(0.5, 0.5, "no job measured latency\n(add a quantization callback)", transform=axes.transAxes,
                  ha="center", va="center", color="0.4")  # fmt: skip
    axes.set_xlabel("latency (ms per batch; int8 if quantized, else float)")
    axes.set_ylabel("accuracy")
    title = f"{len({r['job'] for r in rows})} jobs: accuracy against latency (up and left is better; label = job)"
    axes.set_title(title + ("\n" + "; ".join(notes) if notes else ""), fontsize=10)
    axes.grid(alpha=0.3)
    if placed:
        figure.legend(fontsize=8, loc="outside right upper")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _jobs(names: list[str]) -> str:
    return ("job " if len(names) == 1 else "jobs ") + ", ".join(names)


def _choices(hydra_yaml: Any) -> dict[str, str]:
    """The config group options the job ran with (``model: convnet``, ``callbacks: ptq``), from ``.hydra/hydra.yaml``."""
    try:
        choices = hydra_yaml["hydra"]["runtime"]["choices"]
    except (KeyError, TypeError):
        return {}
    return {str(k): str(v) for k, v in (choices or {}).items() if v is not None}


def _target_name(config_yaml: Any, key: str) -> str | None:
    """Class name of ``config[key]._target_``: the model's name in an app without a ``model`` group."""
    node = config_yaml.get(key) if isinstance(config_yaml, dict) else None
    target = node.get("_target_") if isinstance(node, dict) else None
    return str(target).rsplit(".", 1)[-1] if target else None


def _side(value: Any, side: str, metric: str) -> float | None:
    """``value[side]`` if a number; if a dict of metrics, the metric in it, by full name or by last part
    (``test/acc`` finds ``val/acc`` when that is what the manifest measured)."""
    if not isinstance(value, Mapping):
        return None
    value = value.get(side)
    if isinstance(value, Mapping):
        short = metric.rsplit("/", 1)[-1]
        for name in (metric, *sorted(k for k in value if str(k).rsplit("/", 1)[-1] == short)):
            if _is_number(value.get(name)):
                return float(value[name])
        return None
    return float(value) if _is_number(value) else None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _fmt(value: Any, pattern: str, scale: float = 1.0) -> str:
    return pattern.format(value * scale) if _is_number(value) else ""


def _job_sort_key(relative: Path) -> tuple:
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in relative.parts)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None


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


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m lightning_quant.sweep SWEEP_DIR [METRIC]``: rebuild the comparison of a sweep folder."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or not Path(args[0]).is_dir():
        raise SystemExit("usage: python -m lightning_quant.sweep SWEEP_DIR [METRIC]   (SWEEP_DIR: a multirun folder)")
    sweep_dir, metric = Path(args[0]), (args[1] if len(args) > 1 else "val/acc")
    write_comparison(sweep_dir, compare_sweep(sweep_dir, metric))
    print(f"wrote {sweep_dir / 'comparison.csv'}, .md and .png")
