"""``lightning-quant``: inspect a ``manifest.json``, time an exported artifact, or compare two.

Example (shell)::

    lightning-quant inspect quantized/                  # approach, files (sha256 checked), metrics, checks
    lightning-quant time quantized/model_aoti.pt2 --batch-size 64 --runs 200
    lightning-quant compare quantized/model_aoti.pt2 quantized/model.onnx

The input to time with comes from the ``manifest.json`` next to the artifact (its shapes and dtypes, the
batch dimension replaced by ``--batch-size``) or from ``--input-shape 64,1,8,8``. Exit status: 0 on success,
1 when ``inspect`` finds a missing or altered file, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional

import torch

_CHUNK = 10  # timed rounds between progress-bar updates


class CliError(Exception):
    """A problem with the command line or the files it names; printed without a traceback."""


# ------------------------------------------------------------------------------------------- manifest
def find_manifest(path: Path) -> Optional[Path]:
    """``path`` itself if it is a JSON file, else ``manifest.json`` in it (a directory) or next to it (a file)."""
    from lightning_quant.manifest import FILENAME

    if path.is_file() and path.suffix == ".json":
        return path
    candidate = path / FILENAME if path.is_dir() else path.parent / FILENAME
    return candidate if candidate.is_file() else None


def load_manifest(path: Path) -> tuple[Path, dict[str, Any]]:
    manifest_path = find_manifest(path)
    if manifest_path is None:
        raise CliError(f"no manifest.json at {path}: pass a manifest.json or the directory a callback wrote")
    return manifest_path, read_json(manifest_path)


def read_json(manifest_path: Path) -> Any:
    """The manifest at ``manifest_path`` (see :func:`lightning_quant.manifest.read_manifest`); bad JSON is a
    :class:`CliError`."""
    from lightning_quant.manifest import read_manifest

    try:
        return read_manifest(manifest_path, advice="; was it written by lightning-quant?")
    except ValueError as err:
        raise CliError(str(err)) from err


def check_artifacts(manifest: dict[str, Any], manifest_path: Path) -> list[dict[str, Any]]:
    """Each artifact with ``status``: ``ok``, ``missing``, ``sha256 mismatch`` (the file changed since export),
    ``refused`` (its path is not a plain file name in the manifest's folder, or a file read by unpickling holds
    more than tensors; ``why`` says which) or ``does not load`` (``why``: the error)."""
    import lightning_quant.quantization  # noqa: F401  (registers torchao's tensor types, inside saved programs)
    from lightning_quant.export import load_artifact
    from lightning_quant.files import sha256
    from lightning_quant.loading import entry_files

    checked = []
    for artifact in manifest.get("artifacts", []):
        status, why = "ok", None
        try:
            files = entry_files(manifest_path, artifact)
            path = files[0][0]
            if not all(part.is_file() for part, _ in files):
                status = "missing"
            elif any(sha256(part) != recorded for part, recorded in files):
                status = "sha256 mismatch"
            elif _unpickled(artifact.get("format")):  # read as load reads it, tensors only; nothing runs
                load_artifact(path, artifact["format"])
        except ValueError as err:
            status, why = "refused", str(err)
        except Exception as err:
            status, why = "does not load", f"{type(err).__name__}: {err}"
        checked.append({**artifact, "status": status, **({"why": why} if why else {})})
    return checked


def _unpickled(name: Any) -> bool:
    """Files of this format are read by unpickling (tensors only): inspect reads them to find one load would refuse."""
    from lightning_quant.export.formats import FORMATS_BY_NAME

    return name in FORMATS_BY_NAME and FORMATS_BY_NAME[name].unpickled


def describe_manifest(manifest: dict[str, Any], checked: Sequence[dict[str, Any]]) -> str:
    from lightning_quant.manifest import format_table

    shape = manifest.get("input", {}).get("shape")
    lines = [
        f"approach  {manifest.get('approach')}  (backend {manifest.get('backend')}, model {manifest.get('model')})",
        f"created   {manifest.get('created')}  torch {manifest.get('versions', {}).get('torch')}, "
        f"{manifest.get('machine', {}).get('threads')} threads",
        f"input     {shape} {manifest.get('input', {}).get('dtype')}, "
        f"dynamic batch: {manifest.get('input', {}).get('dynamic_batch')}",
        f"target    {(manifest.get('target') or {}).get('name', 'this machine')} "
        f"(needs {(manifest.get('target') or {}).get('requires', '?')}); built and verified on "
        f"{(manifest.get('cpu') or {}).get('model', '?')} {(manifest.get('cpu') or {}).get('flags', '')}",
        f"recommended  {manifest.get('recommended')}",
        "",
        "artifacts",
    ]
    for artifact in checked:
        check = artifact.get("verification", {})
        error = check.get("relative_error")
        speedup = artifact.get("speedup_vs_float")
        lines.append(
            f"  {artifact['status']:<15} {artifact['format']:<13} {artifact['path']}  {artifact['bytes'] / 1024:.1f} KiB"
            + (f", {speedup:.2f}x float" if speedup else "")
            + (
                f", rel. error {error:.4g} <= {check.get('tolerance')} vs {check.get('compared_with', 'quantized')}"
                if error is not None
                else ""
            )
        )
    if not checked:
        lines.append("  (none)")
    lines += ["", "metrics, latency (ms) and size"]
    try:
        lines.append(format_table(manifest))
    except (KeyError, TypeError, ValueError):  # an older or partial manifest: show the raw fields
        lines.append(json.dumps({k: manifest.get(k) for k in ("metrics", "latency_ms", "size_bytes")}, indent=2))
    if manifest.get("quantized_ops"):
        lines += ["", "quantized ops  " + ", ".join(f"{k}: {v}" for k, v in manifest["quantized_ops"].items())]
    if manifest.get("keep_float"):
        lines.append("kept float     " + ", ".join(manifest["keep_float"]))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- timing
def artifact_format(path: Path, given: Optional[str] = None) -> str:
    """The export format of ``path``, a file without a manifest: ``given``, else what its file name says."""
    from lightning_quant.export import FORMATS
    from lightning_quant.export.formats import format_of

    if given is not None:
        if given not in FORMATS:
            raise CliError(f"unknown format {given!r}; choose from {list(FORMATS)}")
        return given
    named = format_of(path)
    if named is not None:
        return named.name
    raise CliError(f"cannot tell the format of {path}: pass --format (one of {list(FORMATS)})")


def timing_inputs(paths: Sequence[Path], batch_size: Optional[int], input_shape: Optional[str]) -> Any:
    """Random inputs of the shape given, or of the first manifest found next to ``paths`` (batch replaced)."""
    from lightning_quant.inputs import ModelInputs

    if input_shape:
        try:
            shape = [int(d) for d in input_shape.split(",")]
        except ValueError as err:
            raise CliError(
                f"--input-shape must be comma-separated integers such as 64,1,8,8, got {input_shape!r}"
            ) from err
        if batch_size is not None:
            shape[0] = batch_size
        return ModelInputs((torch.rand(shape),), {})
    for path in paths:
        manifest_path = find_manifest(path)
        if manifest_path is None:
            continue
        tensors = read_json(manifest_path).get("input", {}).get("tensors", [])
        args, kwargs = [], {}
        for spec in tensors:
            shape = list(spec["shape"])
            if batch_size is not None and shape:
                shape[0] = batch_size
            dtype = getattr(torch, spec["dtype"])
            value = torch.rand(shape).to(dtype) if dtype.is_floating_point else torch.zeros(shape, dtype=dtype)
            name = spec["name"]
            if name.startswith("args["):
                args.append(value)
            elif "[" in name:
                raise CliError(f"the manifest's input {name!r} is nested; pass --input-shape for a single tensor")
            else:
                kwargs[name] = value
        if args or kwargs:
            return ModelInputs(tuple(args), kwargs)
    raise CliError("no manifest.json next to the artifact(s) says the input shape: pass --input-shape, e.g. 64,1,8,8")


def load(path: Path, format: Optional[str]) -> Callable[..., Any]:
    """The file at ``path``, checked as :func:`lightning_quant.load` checks it when a manifest is beside it (listed,
    inside the folder, sha256, format version, this CPU); a file without a manifest is the user's own to run."""
    import lightning_quant.quantization  # noqa: F401  (registers torchao's tensor types, inside saved programs)
    from lightning_quant.export import load_artifact
    from lightning_quant.loading import load as load_checked

    if not path.is_file():
        raise CliError(f"no such file: {path}")
    if find_manifest(path) is None:
        return load_artifact(path, artifact_format(path, format))
    try:
        return load_checked(path, format)
    except (ValueError, RuntimeError, FileNotFoundError) as err:
        raise CliError(str(err)) from err


def interleaved_times(
    models: dict[str, Callable[..., Any]], inputs: Any, runs: int, warmup: int, progress: bool
) -> dict[str, list[float]]:
    """Milliseconds of every call of each model, in interleaved rounds (``compare_latency_ms``), with a bar."""
    from tqdm import tqdm

    from lightning_quant.benchmark import compare_latency_ms

    times: dict[str, list[float]] = {name: [] for name in models}
    order = list(models)
    with tqdm(total=runs, unit="run", disable=not progress, leave=True, file=sys.stderr) as bar:
        done = 0
        while done < runs:
            chunk = min(_CHUNK, runs - done)
            # alternate which model goes first, so neither always runs right after the other
            ordered = {name: models[name] for name in (order if (done // _CHUNK) % 2 == 0 else order[::-1])}
            measured = compare_latency_ms(
                ordered, inputs, warmup=warmup if done == 0 else 0, repeats=chunk, statistic=list
            )
            for name, values in measured.items():
                times[name].extend(values)
            done += chunk
            bar.update(chunk)
    return times


def summary(values: Sequence[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "median_ms": statistics.median(ordered),
        "min_ms": ordered[0],
        "p90_ms": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))],
        "runs": len(ordered),
    }


# ------------------------------------------------------------------------------------------- commands
def cmd_inspect(args: argparse.Namespace) -> int:
    manifest_path, manifest = load_manifest(Path(args.manifest))
    checked = check_artifacts(manifest, manifest_path)
    if args.json:
        print(json.dumps({**manifest, "artifacts": checked}, indent=2, default=str))
    else:
        print(f"{manifest_path}\n")
        print(describe_manifest(manifest, checked))
    bad = [a["path"] for a in checked if a["status"] != "ok"]
    for artifact in checked:
        if "why" in artifact:
            print(artifact["why"], file=sys.stderr)
    if bad:
        print(
            f"\n{len(bad)} artifact(s) missing, changed since export or refused: {bad}. Re-export them, or restore "
            "the files the manifest describes.",
            file=sys.stderr,
        )
    return 1 if bad else 0


def cmd_time(args: argparse.Namespace) -> int:
    path = Path(args.artifact)
    _threads(args.threads)
    model = load(path, args.format)
    inputs = timing_inputs([path], args.batch_size, args.input_shape)
    result: dict[str, Any] = dict(
        summary(interleaved_times({"a": model}, inputs, args.runs, args.warmup, not args.no_progress)["a"])
    )
    batch = inputs.batch_size()
    result.update(
        artifact=str(path),
        batch_size=batch,
        threads=torch.get_num_threads(),
        throughput_per_s=(1000.0 * batch / result["median_ms"]) if batch else None,
    )
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"{path}: median {result['median_ms']:.3f} ms, min {result['min_ms']:.3f} ms, p90 {result['p90_ms']:.3f} ms "
            f"over {result['runs']} runs (batch {batch}, {result['threads']} threads"
            + (f", {result['throughput_per_s']:.0f} samples/s)" if batch else ")")
        )
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    paths = [Path(args.a), Path(args.b)]
    if paths[0].resolve() == paths[1].resolve():
        raise CliError("compare needs two different files")
    _threads(args.threads)
    models = {str(p): load(p, f) for p, f in zip(paths, (args.format_a, args.format_b))}
    inputs = timing_inputs(paths, args.batch_size, args.input_shape)
    times = interleaved_times(models, inputs, args.runs, args.warmup, not args.no_progress)
    a, b = (summary(times[str(p)]) for p in paths)
    result = {
        "a": {"artifact": str(paths[0]), **a},
        "b": {"artifact": str(paths[1]), **b},
        "b_speedup_over_a": a["median_ms"] / b["median_ms"],
        "batch_size": inputs.batch_size(),
        "threads": torch.get_num_threads(),
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for label, path, stats in (("A", paths[0], a), ("B", paths[1], b)):
            print(f"{label} {path}: median {stats['median_ms']:.3f} ms, min {stats['min_ms']:.3f} ms")
        ratio = result["b_speedup_over_a"]
        faster, factor = ("B", ratio) if ratio >= 1 else ("A", 1 / ratio)
        print(
            f"{faster} is {factor:.2f}x faster (median of {args.runs} interleaved runs, batch {inputs.batch_size()}, "
            f"{torch.get_num_threads()} threads)"
        )
    return 0


def _threads(threads: Optional[int]) -> None:
    if threads is not None:
        if threads < 1:
            raise CliError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from lightning_quant.export import FORMATS

    parser = argparse.ArgumentParser(
        prog="lightning-quant", description="Inspect, time and compare lightning-quant artifacts."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    inspect = commands.add_parser("inspect", help="show a manifest.json and check its files' sha256")
    inspect.add_argument("manifest", help="a manifest.json or the directory holding it")
    inspect.add_argument("--json", action="store_true", help="print the manifest with each artifact's status as JSON")
    inspect.set_defaults(run=cmd_inspect)

    def timing_options(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--batch-size", type=_positive, default=None, help="replace the manifest's batch dimension")
        sub.add_argument(
            "--input-shape", default=None, help="shape of one float input, e.g. 64,1,8,8 (no manifest needed)"
        )
        sub.add_argument("--runs", type=_positive, default=100, help="timed calls (default 100)")
        sub.add_argument("--warmup", type=int, default=10, help="untimed calls first (default 10)")
        sub.add_argument("--threads", type=int, default=None, help="torch/ONNX Runtime threads (default: torch's)")
        sub.add_argument("--no-progress", action="store_true", help="no progress bar")
        sub.add_argument("--json", action="store_true", help="print the result as JSON")

    time_ = commands.add_parser("time", help="median latency of one artifact")
    time_.add_argument("artifact")
    time_.add_argument("--format", choices=FORMATS, default=None, help="default: from the manifest or file name")
    timing_options(time_)
    time_.set_defaults(run=cmd_time)

    compare = commands.add_parser("compare", help="two artifacts timed in interleaved rounds, and their ratio")
    compare.add_argument("a")
    compare.add_argument("b")
    compare.add_argument("--format-a", choices=FORMATS, default=None)
    compare.add_argument("--format-b", choices=FORMATS, default=None)
    timing_options(compare)
    compare.set_defaults(run=cmd_compare)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except CliError as err:
        print(f"lightning-quant {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
