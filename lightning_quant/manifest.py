"""``manifest.json``: what was quantized, how, into which files, and what it measured."""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Sequence
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

import torch

from lightning_quant.benchmark import TOO_FAST_TO_TIME_MS
from lightning_quant.files import atomic_path
from lightning_quant.inputs import ModelInputs
from lightning_quant.target import CpuTarget, cpu_info

FILENAME = "manifest.json"
# Version of the manifest's (and the callbacks' checkpoint state's) layout. Readers refuse a newer one:
# bump it when a field changes meaning or is removed, not when one is added.
FORMAT_VERSION = 1
_LIBRARIES = ("torch", "torchao", "lightning", "torchmetrics", "onnx", "onnxruntime", "lightning-quant")


def library_versions() -> dict[str, Optional[str]]:
    versions: dict[str, Optional[str]] = {}
    for name in _LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    versions["python"] = platform.python_version()
    return versions


def build_manifest(
    *,
    approach: str,
    backend: str,
    model: str,
    example_inputs: ModelInputs,
    dynamic_batch: bool,
    artifacts: Sequence[Any],
    verification: dict[str, dict[str, Any]],
    metrics: dict[str, Any],
    speed: dict[str, Any],
    latency_input: ModelInputs,
    target: CpuTarget,
    size_bytes: dict[str, int],
    quantized_ops: dict[str, int],
    layers: Optional[dict[str, Any]] = None,
    float_checkpoint: Optional[str] = None,
    keep_float: Sequence[str] = (),
    accuracy_budget: Optional[dict[str, Any]] = None,
    details: Optional[dict[str, Any]] = None,
    seconds: Optional[float] = None,
    dirpath: Optional[Path] = None,
    failures: Optional[dict[str, str]] = None,
) -> dict[str, Any]:
    """The manifest as a JSON-ready dict (see the README for every field).

    ``failures`` maps each format that could not be exported or verified to its error; ``status`` is then
    ``"partial"`` (the listed ``artifacts`` are complete and verified), else ``"ok"``.

    ``accuracy_budget`` (``None`` without ``max_metric_drop``): the budget (``metric``, ``max_drop``,
    ``relative``, ...), the metric for ``float``, fully int8 (``before``) and the exported model (``after``),
    ``drop``, ``within_budget``, ``evaluations`` (validation passes, float included), ``float_layers``
    (``{"name", "reason"}``), ``stopped`` (why the search ended), ``steps`` and ``sensitivity`` (the table's
    file, or ``None`` when the fully int8 model was within budget). ``keep_float`` lists the user's names and
    the budget's float layers.

    ``layers`` (:func:`~lightning_quant.quantization.layer_report.layer_report`; ``None`` for the float model): per
    layer type, how many layers were quantized and how many stay float, why each float one does, and the tied weights.

    ``speed`` is :func:`~lightning_quant.benchmark.measure_speed`'s result: each file's ``latency_ms`` and
    ``speedup_vs_float`` come from it (float and files timed side by side), with ``faster_than_float`` and the
    ``load_average`` they were measured under; every verified file is listed, slower than float or not.
    ``recommended`` is the fastest file if it beats the float model, else ``None``. ``cpu`` is the machine that built and verified the files;
    ``target`` (:class:`~lightning_quant.target.CpuTarget`) the CPUs they are made for.
    """
    latency_ms = speed["latency_ms"]
    entries = []
    for artifact in artifacts:
        entry = artifact.to_dict()
        entry["verification"] = {k: v for k, v in verification.get(artifact.format, {}).items() if k != "latency_ms"}
        entry["latency_ms"] = latency_ms.get(artifact.format)
        entry["speedup_vs_float"] = speed["speedup_vs_float"].get(artifact.format)
        entry["faster_than_float"] = entry["speedup_vs_float"] is not None and entry["speedup_vs_float"] > 1
        entry["load_average"] = speed["load_average"]  # of the machine while it was timed
        entries.append(entry)
    fastest = speed["fastest"]
    recommended = fastest if fastest is not None and speed["speedup_vs_float"][fastest] > 1 else None
    described = example_inputs.describe()
    described["dynamic_batch"] = dynamic_batch
    return {
        **_header("partial" if failures else "ok", approach, backend, model, failures),
        "machine": {"processor": platform.machine(), "threads": torch.get_num_threads()},
        "cpu": cpu_info(),
        "target": target.to_dict(),
        "recommended": recommended,
        "recommended_rule": "the fastest verified file, if it is faster than the float model (eager) on this CPU; "
        "null: no file is",
        "input": described,
        "artifacts": entries,
        "tolerances": {
            a.format: {
                "relative_error_max": verification.get(a.format, {}).get("tolerance", a.tolerance),
                "compared_with": a.compared_with,
            }
            for a in artifacts
        },
        "metrics": metrics,
        "latency_ms": {
            **latency_ms,
            "input_shape": latency_input.describe()["shape"],
            "spread_ms": speed["spread_ms"],
            "load_average": speed["load_average"],
            "too_fast_to_time": speed["too_fast_to_time"],
            "note": f"fastest call of {speed['rounds']} interleaved rounds of {speed.get('block', 1)} calls after "
            "warm-up (each model called once untimed first, so it runs as on its own), the least disturbed by other "
            "processes (spread_ms: p25, median, p75); "
            "float = the float module eager; quantized = the fastest file (what quantized_model runs); "
            "per format = the file loaded in its runtime"
            + (
                f"; too_fast_to_time: the float model runs in under {TOO_FAST_TO_TIME_MS} ms a call, where call "
                "overhead dominates and ratios move by more than 10% from run to run (time a larger batch)"
                if speed["too_fast_to_time"]
                else ""
            ),
        },
        "size_bytes": {
            **size_bytes,
            "smallest_artifact": min((a.bytes for a in artifacts), default=None),
            "note": "float/quantized = torch.save of the weights the model holds",
        },
        "quantized_ops": quantized_ops,
        "layers": layers,
        "keep_float": list(keep_float),
        "accuracy_budget": accuracy_budget,
        "float_checkpoint": _relative(float_checkpoint, dirpath),
        **(details or {}),
        "seconds": round(seconds, 2) if seconds is not None else None,
    }


def failed_manifest(
    *,
    approach: str,
    backend: str,
    model: str,
    error: str,
    float_checkpoint: Optional[str] = None,
    dirpath: Optional[Path] = None,
    failures: Optional[dict[str, str]] = None,
) -> dict[str, Any]:
    """The manifest of a run that produced no artifact: what failed, why, and where the float weights are."""
    return {
        **_header("failed", approach, backend, model, failures),
        "error": error,
        "cpu": cpu_info(),
        "artifacts": [],
        "float_checkpoint": _relative(float_checkpoint, dirpath),
    }


def _header(status: str, approach: str, backend: str, model: str, failures: Optional[dict[str, str]]) -> dict[str, Any]:
    """The fields every manifest starts with, written or failed."""
    return {
        "format_version": FORMAT_VERSION,
        "status": status,
        "failures": dict(failures or {}),
        "approach": approach,
        "backend": backend,
        "model": model,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "versions": library_versions(),
    }


def _relative(checkpoint: Optional[str], dirpath: Optional[Path]) -> Optional[str]:
    """The float checkpoint's path as seen from the manifest's folder (the two move together)."""
    return os.path.relpath(checkpoint, dirpath) if checkpoint and dirpath is not None else checkpoint


def check_format_version(version: Any, what: str) -> None:
    """Refuse a manifest or checkpoint state whose layout this lightning-quant does not know."""
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ValueError(
            f"{what} has an unknown format_version {version!r}; this lightning-quant reads versions "
            f"1 to {FORMAT_VERSION}. It was not written by lightning-quant, or it is damaged."
        )
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{what} has format_version {version}, newer than this lightning-quant reads "
            f"({FORMAT_VERSION}): upgrade lightning-quant to read it."
        )


# what load and the CLI read from every artifact entry
ARTIFACT_KEYS = {"path": str, "format": str, "sha256": str, "bytes": int}


def read_manifest(path: Path | str, advice: str = ": the file is damaged; export again.") -> Any:
    """The parsed manifest file at ``path``: a JSON object whose ``artifacts`` (if any) are objects with the
    :data:`ARTIFACT_KEYS`.

    Raises:
        ValueError: the file is not UTF-8, not JSON, not a JSON object, or an artifact entry lacks a key (or has
            one of another type); the message names the file and what is wrong, then ``advice``.
    """
    path = Path(path)
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text ({err}){advice}") from err
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}){advice}") from err
    if not isinstance(manifest, dict):
        raise ValueError(f"{path} holds a JSON {type(manifest).__name__}, not the object a manifest is{advice}")
    artifacts = manifest.get("artifacts", [])
    if not isinstance(artifacts, list):
        raise ValueError(f"{path}: 'artifacts' is a {type(artifacts).__name__}, not a list of entries{advice}")
    for index, entry in enumerate(artifacts):
        if not isinstance(entry, dict):
            raise ValueError(f"{path}: artifacts[{index}] is a {type(entry).__name__}, not an object{advice}")
        missing = [key for key in ARTIFACT_KEYS if key not in entry]
        wrong = [
            f"{key!r} is {entry[key]!r}, not of type {kind.__name__}"
            for key, kind in ARTIFACT_KEYS.items()
            if key in entry and (not isinstance(entry[key], kind) or isinstance(entry[key], bool))
        ]
        if missing or wrong:
            problems = ([f"lacks {missing}"] if missing else []) + wrong
            raise ValueError(
                f"{path}: artifacts[{index}] ({entry.get('path', 'no path')!r}) {'; '.join(problems)} (every entry "
                f"has {list(ARTIFACT_KEYS)}){advice}"
            )
    return manifest


def write_manifest(manifest: dict[str, Any], dirpath: Path | str) -> Path:
    """Write ``manifest.json`` into ``dirpath`` atomically; return its path."""
    path = Path(dirpath) / FILENAME
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    return path


def format_table(manifest: dict[str, Any]) -> str:
    """One small text table: float vs quantized metrics, latency and size, then one row per artifact."""
    metrics = manifest["metrics"]
    names = sorted(set(metrics.get("float", {})) | set(metrics.get("quantized", {})))
    header = ["", *names, "latency ms", "x float", "size KiB"]
    rows = [header]
    approach, bits = manifest["approach"], manifest.get("bits", 8)  # weight-only files record their bits
    latency_ms = manifest["latency_ms"]
    for kind in ("float", "quantized"):
        values = metrics.get(kind, {})
        latency = latency_ms.get(kind)  # no quantized latency when every format failed
        rows.append(
            [
                kind if kind == "float" else ("optimized" if approach == "float" else f"int{bits} ({approach})"),
                *(f"{values[n]:.4f}" if n in values else "-" for n in names),
                "-" if latency is None else f"{latency:.3f}",
                "" if kind == "float" else ("-" if latency is None else f"{latency_ms['float'] / latency:.2f}"),
                f"{manifest['size_bytes'][kind] / 1024:.1f}",
            ]
        )
    for artifact in manifest["artifacts"]:
        latency, speedup = artifact.get("latency_ms"), artifact.get("speedup_vs_float")
        mark = " (recommended)" if artifact["format"] == manifest.get("recommended") else ""
        rows.append(
            [
                artifact["path"] + mark,
                *("" for _ in names),
                f"{latency:.3f}" if latency is not None else "-",
                f"{speedup:.2f}" if speedup is not None else "-",
                f"{artifact['bytes'] / 1024:.1f}",
            ]
        )
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(str(cell).rjust(w) if i else str(cell).ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
        for row in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    budget = manifest.get("accuracy_budget")
    if budget is not None:
        verdict = "within budget" if budget["within_budget"] else "OVER BUDGET"
        relative = " (relative)" if budget["relative"] else ""
        lines.append(
            f"budget {budget['metric']}: drop {budget['drop']:.4g} vs max {budget['max_drop']:.4g}{relative}: {verdict}; "
            f"every layer converted {budget['before']:.4g}, exported {budget['after']:.4g}; "
            f"float layers {[layer['name'] for layer in budget['float_layers']]}; {budget['evaluations']} validation passes"
        )
    return "\n".join(lines)


def manifest_numbers(manifest: Optional[dict[str, Any]]) -> dict[str, float]:
    """The numbers of a manifest as flat, logger-ready names (what the callbacks log and ``train.py`` writes
    into ``metrics.json``): ``quantization/{float,quantized}/<metric>``, ``.../latency_ms``, ``.../size_bytes``,
    ``quantization/<format>/{bytes,latency_ms}`` and ``quantization/budget/...``. A failed manifest has fewer.

    Example::

        >>> manifest_numbers({"metrics": {"float": {"val/acc": 0.9}}, "latency_ms": {"float": 2.0}})
        {'quantization/float/val/acc': 0.9, 'quantization/float/latency_ms': 2.0}
    """
    if not manifest:
        return {}
    flat: dict[str, float] = {}
    for kind in ("float", "quantized"):
        for name, value in (manifest.get("metrics") or {}).get(kind, {}).items():
            flat[f"quantization/{kind}/{name}"] = float(value)
        for measure in ("latency_ms", "size_bytes"):
            value = (manifest.get(measure) or {}).get(kind)
            if value is not None:
                flat[f"quantization/{kind}/{measure}"] = float(value)
    budget = manifest.get("accuracy_budget")
    if budget:
        flat.update(
            {
                "quantization/budget/before": float(budget["before"]),
                "quantization/budget/after": float(budget["after"]),
                "quantization/budget/within_budget": float(budget["within_budget"]),
                "quantization/budget/evaluations": float(budget["evaluations"]),
                "quantization/budget/float_layers": float(len(budget["float_layers"])),
            }
        )
    for artifact in manifest.get("artifacts") or []:
        flat[f"quantization/{artifact['format']}/bytes"] = float(artifact["bytes"])
        if artifact.get("latency_ms") is not None:
            flat[f"quantization/{artifact['format']}/latency_ms"] = float(artifact["latency_ms"])
    return flat
