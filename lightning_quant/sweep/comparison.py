"""Write a sweep's comparison: the table (CSV, Markdown) and the picture (accuracy against latency).

The rows are :func:`lightning_quant.sweep.jobs.compare_sweep`'s (one per job and manifest);
:func:`mark_pareto_front` marks the ones no other row beats on both latency and accuracy, and
:func:`write_comparison` writes them through :func:`lightning_quant.report.write_table`.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning_quant import report

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


def deployed_point(row: Mapping[str, Any]) -> tuple[float, float] | None:
    """(latency ms, accuracy) of what a row ships: the int8 model if there is one, else the float model."""
    return _point(row, "latency_int8_ms", "acc_int8") or _point(row, "latency_float_ms", "acc_float")


def _point(row: Mapping[str, Any], latency: str, accuracy: str) -> tuple[float, float] | None:
    if is_number(row.get(latency)) and is_number(row.get(accuracy)):
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
        r["latency_float_ms"] for r in rows if is_number(r.get("latency_float_ms"))
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


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _fmt(value: Any, pattern: str, scale: float = 1.0) -> str:
    return pattern.format(value * scale) if is_number(value) else ""
