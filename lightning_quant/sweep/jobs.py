"""Read a sweep's jobs into rows: what each job left in its folder (manifests, metrics, status, ``.hydra/``).

A job with neither a manifest nor metrics is a failed row, and it hides no other row. One row per
(job, manifest); a job that only trained (no manifest) is one ``float`` row with its accuracy.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from lightning_quant.sweep.comparison import COLUMNS, is_number, mark_pareto_front

STATUS_FILE = "job_status.json"


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
            if is_number(value.get(name)):
                return float(value[name])
        return None
    return float(value) if is_number(value) else None


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
