"""The one benchmark: every demo model and approach against the tools a user would pick instead, one run.

For each demo model (ConvNet, MLPNet, LSTMNet, TransformerNet), trained on digits with the same budget, and
each approach (float, static, dynamic, qat where it applies), it measures:

- latency: median of many calls after warm-up, torch variants interleaved round by round (load from other
  processes hits them alike); ONNX Runtime files timed alone after them (ORT's thread pool and PyTorch's
  OpenMP threads slow each other when both are busy in one process); at a small and a large batch, which
  also gives throughput (samples/s);
- artifact size (bytes on disk), digits test accuracy (270 images), export time (quantize + export).

Peers, side by side in the same run: float eager, float ``torch.compile`` with freezing (compiled for each
batch size it runs, its compile seconds in the export column), float AOTInductor with freezing (the same
compiler as a deployable file), legacy ``torch.ao.quantization`` eager int8 (static: fused, x86 qconfig;
dynamic: ``quantize_dynamic``), ONNX Runtime's own ``quantize_static``/``quantize_dynamic`` on the float
ONNX. Writes ``benchmarks/results.json``, ``benchmarks/RESULTS.md`` and ``benchmarks/results.png``::

    python benchmarks/run.py            # full run
    python benchmarks/run.py --quick    # fewer epochs and calls: a smoke run (still every model and peer)

Issue-specific detail lives in ``bench_ptq.py`` (issue 3 targets), ``bench_qat.py`` (issue 4) and
``bench_inference.py`` (issue 5); this script reuses their timing and accuracy helpers.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import platform
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from bench_ptq import median_and_min, test_accuracy  # noqa: E402  (sibling scripts, reused as they are)

from lightning_quant import QuantizationAwareTraining  # noqa: E402
from lightning_quant.benchmark import compare_latency_ms  # noqa: E402
from lightning_quant.demo import ConvNet, DigitsClassifier, DigitsDataModule, LSTMNet, MLPNet, TransformerNet  # noqa: E402
from lightning_quant.export import OrtDynamicQuantization, OrtStaticQuantization, export, load_artifact  # noqa: E402
from lightning_quant.export.aoti import export_aoti  # noqa: E402
from lightning_quant.quantization import DynamicQuantConfig, ModelInputs, StaticQuantConfig, quantize  # noqa: E402
from lightning_quant.quantization.legacy import RECURRENT_TYPES, legacy_api, legacy_quantize_dynamic  # noqa: E402
from lightning_quant.quantization.transformer_fastpath import route_quantized_encoder_layers  # noqa: E402

HERE = Path(__file__).parent
MODELS: dict[str, Callable[[], nn.Module]] = {
    "conv": ConvNet,
    "mlp": MLPNet,
    "lstm": LSTMNet,
    "transformer": TransformerNet,
}
# approaches run per model: static needs Conv/Linear (PT2E does not quantize nn.LSTM / the fused encoder);
# dynamic needs Linear/LSTM; QAT (training with fake-quant) on the conv net, the model it is made for
APPROACHES = {"conv": ["static", "qat"], "mlp": ["static", "dynamic"], "lstm": ["dynamic"], "transformer": ["dynamic"]}
# torch.export cannot capture the legacy int8 LSTM (its packed weights are TorchScript objects), so
# DynamicQuantization refuses "aoti" for recurrent models and ships "onnx" + "torchscript": so does this run
NO_AOTI = {"lstm"}


# ------------------------------------------------------------------------------------------- building
def train(
    name: str, epochs: int, scratch: Path, callback: Optional[L.Callback] = None
) -> tuple[nn.Module, DigitsDataModule]:
    L.seed_everything(0)
    datamodule = DigitsDataModule()
    module = DigitsClassifier(MODELS[name]())
    trainer = L.Trainer(
        max_epochs=epochs,
        callbacks=[callback] if callback else [],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=scratch,
    )
    trainer.fit(module, datamodule=datamodule)
    return module.net.eval() if callback is None else module.eval(), datamodule


class Stubbed(nn.Module):
    """Legacy eager static quantization needs explicit quantize/dequantize stubs around the float net."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.quant, self.net, self.dequant = torch.ao.quantization.QuantStub(), net, torch.ao.quantization.DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dequant(self.net(self.quant(x)))


def legacy_int8(net: nn.Module, approach: str, calibration: list[torch.Tensor]) -> nn.Module:
    """The deprecated ``torch.ao.quantization`` eager int8 a user might still reach for."""
    with legacy_api("torch.ao.quantization (benchmark peer)"):
        if approach == "dynamic":
            quantized = torch.ao.quantization.quantize_dynamic(
                copy.deepcopy(net), {nn.Linear, nn.LSTM}, dtype=torch.qint8
            )
            route_quantized_encoder_layers(quantized)  # else the encoder fast path reads .weight and crashes
            return quantized
        model = Stubbed(copy.deepcopy(net)).eval()
        if isinstance(net, ConvNet):
            blocks = [f"net.features.{i}" for i, m in enumerate(net.features) if isinstance(m, nn.Sequential)]
            torch.ao.quantization.fuse_modules(model, [[f"{b}.0", f"{b}.1", f"{b}.2"] for b in blocks], inplace=True)
        model.qconfig = torch.ao.quantization.get_default_qconfig("x86")
        torch.ao.quantization.prepare(model, inplace=True)
        with torch.no_grad():
            for batch in calibration:
                model(batch)
        return torch.ao.quantization.convert(model, inplace=False)


def compiled_with_freezing(net: nn.Module, batches: list[torch.Tensor]) -> nn.Module:
    """Float ``torch.compile`` with freezing, compiled once per batch shape in ``batches`` (``dynamic=False``).

    Specialised graphs are ``torch.compile`` at its fastest; every shape the run will call it with is compiled
    here, under ``freezing=True`` (an Inductor setting read at compile time), so no compile lands in a timing.
    """
    model = torch.compile(net, dynamic=False)
    with torch._inductor.config.patch(freezing=True), torch.no_grad():
        for batch in batches:
            model(batch)
    return model


def timed_build(build: Callable[[], Any]) -> tuple[Any, float, Optional[str]]:
    started = time.perf_counter()
    try:
        return build(), time.perf_counter() - started, None
    except Exception as err:  # a peer or format that fails is a result, not the end of the run
        traceback.print_exc()
        return None, time.perf_counter() - started, f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"


def variants_for(
    name: str, epochs: int, scratch: Path, batch_sizes: list[int]
) -> tuple[list[dict[str, Any]], DigitsDataModule]:
    """Every runnable variant of model ``name``: label, approach, kind (ours/peer), callable, file, seconds."""
    net, datamodule = train(name, epochs, scratch)
    calibration = [x for x, _ in itertools.islice(datamodule.train_dataloader(), 32)]
    example = calibration[0][:4]
    shapes = {b: batch_of(datamodule, b) for b in batch_sizes} | {len(x): x for x, _ in datamodule.test_dataloader()}
    out = scratch / name
    variants = [dict(label="float eager", approach="float", kind="peer", model=net, path=None, seconds=0.0)]

    def add(label: str, approach: str, kind: str, build: Callable[[], Any], path: Optional[Path] = None) -> None:
        model, seconds, error = timed_build(build)
        variants.append(
            dict(label=label, approach=approach, kind=kind, model=model, path=path, seconds=seconds, error=error)
        )

    add(
        "float AOTInductor (freezing)",
        "float",
        "peer",
        lambda: _file(
            export_aoti(net, ModelInputs.from_value(example), out / "float_aoti.pt2"), out / "float_aoti.pt2", "aoti"
        ),
        out / "float_aoti.pt2",
    )
    add(
        f"float torch.compile (freezing, {len(shapes)} batch sizes)",
        "float",
        "peer",
        lambda: compiled_with_freezing(net, list(shapes.values())),
    )
    for approach in APPROACHES[name]:
        folder = out / approach
        if approach == "qat":
            add(
                "int8 qat -> AOTInductor (ours)",
                "qat",
                "ours",
                lambda: qat(name, epochs, scratch, folder),
                folder / "model_aoti.pt2",
            )
            add(
                "int8 qat -> ONNX Runtime (ours)",
                "qat",
                "ours",
                lambda: load_artifact(folder / "model.onnx", "onnx"),
                folder / "model.onnx",
            )
            variants[-1]["seconds"] = variants[-2]["seconds"]  # one fit-end conversion wrote both files
            continue
        config = StaticQuantConfig() if approach == "static" else DynamicQuantConfig()
        ort = (
            OrtStaticQuantization([ModelInputs.from_value(b) for b in calibration])
            if approach == "static"
            else OrtDynamicQuantization()
        )
        if name in NO_AOTI:  # what DynamicQuantization ships for a recurrent model instead of "aoti"
            add(
                f"int8 {approach} -> TorchScript, legacy LSTM kernel (ours)",
                approach,
                "ours",
                lambda: _exported(legacy_copy(net), example, "torchscript", folder),
                folder / "model.ts",
            )
        else:
            add(
                f"int8 {approach} -> AOTInductor (ours)",
                approach,
                "ours",
                lambda: _exported(quantize(net, config, example, calibration), example, "aoti", folder),
                folder / "model_aoti.pt2",
            )
        # our "onnx" file IS ONNX Runtime's own quantize_static/quantize_dynamic of the float ONNX: the peer
        add(
            f"int8 {approach} -> ONNX Runtime quantize_{approach} (ours = ORT peer)",
            approach,
            "ours",
            lambda: _exported(net, example, "onnx", folder, float_model=net, onnx_quantization=ort),
            folder / "model.onnx",
        )
        add(
            f"legacy torch.ao eager int8 ({approach})",
            approach,
            "peer",
            lambda: legacy_int8(net, approach, calibration),
        )
    return variants, datamodule


def batch_of(datamodule: DigitsDataModule, batch: int) -> torch.Tensor:
    """The first ``batch`` test images (repeated when the test set is smaller)."""
    x_all = torch.cat([x for x, _ in datamodule.test_dataloader()])
    return x_all.repeat(batch // len(x_all) + 1, 1, 1, 1)[:batch]


def legacy_copy(net: nn.Module) -> nn.Module:
    """What ``DynamicQuantization`` puts in its ``"torchscript"`` file: legacy int8 Linear and LSTM/GRU."""
    model = copy.deepcopy(net)
    legacy_quantize_dynamic(model, (nn.Linear, *RECURRENT_TYPES))
    return model


def _exported(model: nn.Module, example: torch.Tensor, format: str, folder: Path, **kwargs: Any) -> Any:
    (artifact,) = export(model, example, [format], folder, **kwargs)
    return load_artifact(folder / artifact.path, format)


def _file(_details: Any, path: Path, format: str) -> Any:
    return load_artifact(path, format)


def qat(name: str, epochs: int, scratch: Path, folder: Path) -> Any:
    start = max(1, epochs // 2)
    callback = QuantizationAwareTraining(
        start_epoch=start,
        freeze_bn_epoch=max(start, epochs - 2),
        freeze_observer_epoch=max(start, epochs - 1),
        formats=["aoti", "onnx"],
        dirpath=folder,
    )
    train(name, epochs, scratch, callback)
    return load_artifact(folder / "model_aoti.pt2", "aoti")


# ------------------------------------------------------------------------------------------- measuring
def measure(variants: list[dict[str, Any]], datamodule: DigitsDataModule, batch_sizes: list[int], repeats: int) -> None:
    runnable = [v for v in variants if v["model"] is not None]
    for v in runnable:
        v["accuracy"] = _safe(lambda: 100.0 * test_accuracy(v["model"], datamodule))
        v["bytes"] = v["path"].stat().st_size if v["path"] is not None and v["path"].exists() else None
    for batch in batch_sizes:
        x = batch_of(datamodule, batch)
        torch_side = {v["label"]: v["model"] for v in runnable if not _is_onnx(v)}
        times = compare_latency_ms(torch_side, x, warmup=10, repeats=repeats, statistic=median_and_min)
        for v in runnable:
            if _is_onnx(v):  # alone, after the torch variants
                times[v["label"]] = compare_latency_ms(
                    {"ort": v["model"]}, x, warmup=10, repeats=repeats, statistic=median_and_min
                )["ort"]
            median, minimum = times[v["label"]]
            v.setdefault("latency_ms", {})[batch] = median
            v.setdefault("min_ms", {})[batch] = minimum
            v.setdefault("throughput_per_s", {})[batch] = 1000.0 * batch / median


def _is_onnx(variant: dict[str, Any]) -> bool:
    return variant["path"] is not None and variant["path"].suffix == ".onnx"


def _safe(fn: Callable[[], float]) -> Optional[float]:
    try:
        return fn()
    except Exception as err:
        print(f"accuracy failed: {err}", file=sys.stderr)
        return None


# ------------------------------------------------------------------------------------------- reporting
def machine() -> dict[str, Any]:
    from lightning_quant.target import cpu_info

    cpu = cpu_info()
    return {
        "cpu": cpu["model"],
        "isa_flags": cpu["flags"],
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average": list(os.getloadavg()),
    }


def rows_for(results: dict[str, Any], batch: int) -> list[dict[str, Any]]:
    rows = []
    for name, variants in results["models"].items():
        base = next(v for v in variants if v["label"] == "float eager")["latency_ms"][str(batch)]
        for v in variants:
            ms = v.get("latency_ms", {}).get(str(batch))
            rows.append({"model": name, **v, "speedup": base / ms if ms else None})
    return rows


def verdicts(results: dict[str, Any], batch: int) -> list[str]:
    """Each shipped int8 artifact against the best peer (fastest float or int8 peer) for its model and approach."""
    lines = []
    for name, variants in results["models"].items():
        peers = [v for v in variants if v["kind"] == "peer" and v.get("latency_ms")]
        for v in variants:
            if v["kind"] != "ours":
                continue
            ms = v.get("latency_ms", {}).get(str(batch))
            relevant = [
                p for p in peers if p["approach"] in ("float", v["approach"] if v["approach"] != "qat" else "static")
            ]
            best = min(relevant, key=lambda p: p["latency_ms"][str(batch)], default=None)
            if ms is None:
                lines.append(f"| {name} | {v['label']} | failed: {v.get('error')} | NO (a bug: report it) |")
            elif best is not None:
                ratio = best["latency_ms"][str(batch)] / ms
                lines.append(
                    f"| {name} | {v['label']} | {ratio:.2f}x vs {best['label']} | "
                    f"{'yes' if ratio >= 1 else 'NO (see notes)'} |"
                )
    return lines


# Text under the tables; every NO in the targets table is explained here (measurements named with their machine)
NOTES = [
    "`ours` are the files the callbacks ship (AOTInductor package with freezing; ONNX; TorchScript for an LSTM). "
    "For static and dynamic our ONNX file *is* ONNX Runtime's own `quantize_static`/`quantize_dynamic` of the float "
    "ONNX (measured faster than exporting the PT2E graph), so that peer and our file are one row. For QAT the ONNX "
    "file is the converted PT2E graph as is (QAT's own ranges).",
    "Export seconds = quantize + export of that one file (QAT: the whole fit-end conversion, export and "
    "verification). `float torch.compile` writes no file: its seconds are the compiles of every batch size the run "
    "calls it with (`dynamic=False`, one specialised graph per shape: the two benchmark batches and the test "
    "loader's 64 and 14), paid again in every new process. Legacy eager int8 has no file.",
    "`float torch.compile` with freezing lowers Linear and conv to the same oneDNN kernels as float AOTInductor and "
    "adds dynamo's guard check and Python wrapper to every call, which weigh on these microsecond-scale nets: in the "
    "quick runs it trailed float AOTInductor on all four. It is a peer to beat, not something we ship.",
    "`static` does not apply to LSTMNet/TransformerNet (PT2E leaves nn.LSTM and the fused encoder in float).",
    "**LSTMNet has no AOTInductor file, by design.** torchao has no int8 LSTM, and `torch.export` cannot capture "
    "the legacy `torch.ao` int8 LSTM (its packed weights are TorchScript objects: `CellParamsBase ... does not "
    "have a field with name '__obj_flatten__'`), so `DynamicQuantization` refuses `\"aoti\"` for a recurrent "
    'model and ships `"onnx"` + `"torchscript"`, as this run does. The fast LSTM artifact is the ONNX file '
    "(ONNX Runtime's own `quantize_dynamic`). The TorchScript file runs the legacy int8 LSTM kernel, which is no "
    "faster than float on x86 CPUs (it saves weight memory; a NO for it is that, not a bug). "
    '`DynamicQuantization(recurrent=False)` keeps the LSTM float and allows `"aoti"` for the int8 Linears.',
    "TransformerNet dynamic int8: every Linear is int8 except attention's input and output projections "
    "(`nn.MultiheadAttention` passes their weights to `F.linear` itself, which `torch.export` cannot run on "
    "torchao's int8 tensors; PyTorch's own `quantize_dynamic` leaves `out_proj`, a `NonDynamicallyQuantizableLinear`, "
    "float too). With d_model 64 the demo transformer is too small for int8 to pay much (see "
    "`lightning_quant/quantization/transformer_fastpath.py`).",
    "**MLPNet static int8 -> AOTInductor at the small batch** gains little or nothing over float eager, and that "
    "is the kernels, not a bug. MLPNet (64-256-256-10) at batch 8 is ~0.7 M multiply-adds, microseconds of arithmetic. "
    "Compiled with freezing, both the float and the static int8 graph call oneDNN once per Linear (float "
    "`_linear_pointwise`; int8 `qlinear_pointwise` with requantization fused in, the input quantized once), and a "
    "oneDNN call has a fixed cost of the order of 20 µs at this size, more than the matmul; float eager calls "
    "BLAS `addmm`, with less. Measured alone on the same 2-core AMD EPYC (torch 2.13, 300 interleaved calls, "
    "load average ~6, median µs at batch 1 / 8 / 32 / 64 / 256 / 1024): float eager 67 / 103 / 157 / 172 / 485 / "
    "1546; float AOTInductor 105 / 120 / 171 / 175 / 417 / 1192; static int8 AOTInductor 114 / 119 / 154 / 142 / "
    "251 / 514; dynamic int8 AOTInductor 37 / 59 / 79 / 81 / 242 / 606. Static int8 ties float AOTInductor at "
    "batch 8 and pulls ahead from batch ~32 (2.3x at 1024). Dynamic int8 lowers to `aten._int_mm` plus "
    "Inductor-generated quantize kernels (no oneDNN call) and is the fastest torch file up to batch 256: for a "
    "small MLP served at small batches, ship dynamic int8 or the ONNX file.",
    "At the small batch the demo nets do microseconds of work per op; on an oversubscribed machine PyTorch's "
    "OpenMP threads then wait on descheduled peers (an earlier quick run showed MLP torch batch-8 calls at "
    "30-80 ms, 100x their batch-256 cost), which ONNX Runtime's thread pool suffers less from: check the "
    "small-batch torch-vs-ORT ratios on an idle machine before trusting them. A small-batch NO in a run whose load "
    "average exceeded the core count is that effect until an idle run says otherwise.",
]


def markdown(results: dict[str, Any]) -> str:
    small, large = results["batch_sizes"]
    m = results["machine"]
    lines = [
        f"# Benchmarks: lightning-quant against the tools users would otherwise pick{' (QUICK RUN)' if results['quick'] else ''}",
        "",
        f"`python benchmarks/run.py{' --quick' if results['quick'] else ''}`, {results['date']}. Machine: {m['cpu']} "
        f"(ISA flags {m.get('isa_flags', 'not recorded')}), "
        f"{m['cores']} cores, {m['threads']} torch threads, torch {m['torch']}, Python {m['python']}; load average "
        f"at start {m['load_average'][0]:.1f} (shared with other jobs: absolute times drift, ratios hold better). "
        f"Models trained {results['epochs']} epochs on digits; median of {results['repeats']} calls after 10 warm-up "
        "calls, torch variants interleaved, ONNX Runtime files alone after them"
        + (f"; the whole run took {results['seconds'] / 60:.0f} min." if "seconds" in results else "."),
    ]
    if results["quick"]:
        lines += [
            "",
            "**Quick run on a loaded machine**: few epochs and calls. Treat ratios as indicative only; "
            "run `python benchmarks/run.py` for the full numbers.",
        ]
    lines += [
        "",
        f"## Targets: each shipped int8 artifact vs the best peer for its model and approach (batch {small})",
        "",
        "| model | artifact | speed vs best peer | at least as fast |",
        "| --- | --- | --- | --- |",
        *verdicts(results, small),
        "",
        "## Speed-up over float eager (ratios first), accuracy, size, export time",
        "",
        f"| model | variant | who | x float eager, batch {small} | x float eager, batch {large} | test acc % | "
        f"file KiB | export s | ms batch {small} | samples/s batch {large} |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    large_rows = {(r["model"], r["label"]): r for r in rows_for(results, large)}
    for r in rows_for(results, small):
        big = large_rows[(r["model"], r["label"])]
        if r.get("latency_ms") is None:
            lines.append(f"| {r['model']} | {r['label']} | {r['kind']} | failed: {r.get('error')} | | | | | | |")
            continue
        lines.append(
            f"| {r['model']} | {r['label']} | {r['kind']} | {r['speedup']:.2f}x | {big['speedup']:.2f}x | "
            f"{_fmt(r.get('accuracy'), '.2f')} | {_fmt(r['bytes'] / 1024 if r.get('bytes') else None, '.1f')} | "
            f"{r['seconds']:.1f} | {r['latency_ms'][str(small)]:.3f} | {big['throughput_per_s'][str(large)]:.0f} |"
        )
    lines += [
        "",
        "Notes:",
        "",
        *[f"- {note}" for note in NOTES],
        "",
        "![speed-up over float eager](results.png)",
        "",
    ]
    return "\n".join(lines)


def _fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


def chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    small = results["batch_sizes"][0]
    rows = [r for r in rows_for(results, small) if r.get("speedup")]
    fig, ax = plt.subplots(figsize=(10, 0.32 * len(rows) + 1.5))
    labels = [f"{r['model']}: {r['label']}" for r in rows][::-1]
    values = [r["speedup"] for r in rows][::-1]
    colours = ["tab:blue" if r["kind"] == "ours" else "tab:grey" for r in rows][::-1]
    ax.barh(labels, values, color=colours)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel(f"speed-up over float eager, batch {small} (log scale; blue = lightning-quant, grey = peers)")
    ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 epochs, 20 calls per variant (smoke run)")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--batch-sizes", type=int, nargs=2, default=[8, 256])
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--report-only", action="store_true", help="rewrite RESULTS.md and the chart from results.json")
    args = parser.parse_args()
    if args.report_only:
        results = json.loads((args.out / "results.json").read_text())
        chart(results, args.out / "results.png")
        (args.out / "RESULTS.md").write_text(markdown(results))
        return
    epochs, repeats = (3, 20) if args.quick else (15, 100)
    started = time.perf_counter()
    warnings.filterwarnings("ignore")
    results: dict[str, Any] = {
        "quick": args.quick,
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "epochs": epochs,
        "repeats": repeats,
        "batch_sizes": args.batch_sizes,
        "models": {},
    }
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.models:
            print(f"== {name}", flush=True)
            variants, datamodule = variants_for(name, epochs, Path(scratch), args.batch_sizes)
            measure(variants, datamodule, args.batch_sizes, repeats)
            results["models"][name] = [_jsonable(v) for v in variants]
            print(json.dumps(results["models"][name], indent=1), flush=True)
    results["seconds"] = round(time.perf_counter() - started)
    args.out.mkdir(parents=True, exist_ok=True)
    results = json.loads(json.dumps(results))  # batch-size keys as strings, as read back from the file
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    chart(results, args.out / "results.png")
    (args.out / "RESULTS.md").write_text(markdown(results))
    print(markdown(results))


def _jsonable(variant: dict[str, Any]) -> dict[str, Any]:
    return {k: (str(v.name) if isinstance(v, Path) else v) for k, v in variant.items() if k != "model"}


if __name__ == "__main__":
    main()
