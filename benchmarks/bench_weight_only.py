"""Issue 16: int4 weights for a language model: what post-training int4 loses, what QAT recovers, what it costs,
and where the int4 files are faster than float. Writes ``benchmarks/weight_only_results.md`` (and a JSON beside).

Two fits of the byte-level language model (``ByteLanguageModel``, 3.3M parameters, the ``byte_lm`` experiment's
settings) from the same seed, so their first ``--qat-start`` epochs are the same computation:

* float for ``--epochs`` epochs, then ``WeightOnlyQuantization`` (int4, group 32) at fit end: float and int4 PTQ;
* ``WeightOnlyQAT(start_epoch=--qat-start)``: the last epochs fake-quantized, then the same int4 grid stored.

Perplexity per byte on the held-out validation files (what the callbacks measure) and on the test file, for the
float model, int4 PTQ and int4 QAT (the quantized reference models, whose ONNX files agree to 1e-6). Recovered
share = (PTQ - QAT) / (PTQ - float). Training cost: seconds per fake-quantized epoch over the same epochs in float.

Latency (``--latency``, run on an idle machine: it says the load average): eager float, ONNX Runtime float and ONNX
Runtime int4 (``MatMulNBits``), each file timed alone, median of repeated calls; for the generation step with its
key/value cache (what the callbacks export: one new byte per call) and for whole sequences (batch x tokens)::

    python benchmarks/bench_weight_only.py              # two fits of 6 epochs: about 10 min on 2 idle cores
    python benchmarks/bench_weight_only.py --quick      # a smoke run (small data, 2 epochs)
    python benchmarks/bench_weight_only.py --latency    # only the latency table (uses the saved QAT model)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import onnxruntime as ort
import torch

from lightning_quant import WeightOnlyQAT, WeightOnlyQuantization
from lightning_quant.demo import ByteLanguageModel, StdlibTextDataModule
from lightning_quant.export import export
from lightning_quant.inputs import ModelInputs
from lightning_quant.quantization import WeightOnlyConfig, quantize
from lightning_quant.quantization.weight_only import prepare_qat
from lightning_quant.target import cpu_info

HERE = Path(__file__).parent
RESULTS, SAVED = HERE / "weight_only_results.md", HERE / "weight_only_results.json"
SHAPES = [(1, 1), (1, 8), (1, 32), (1, 128), (16, 128)]


class EpochTimer(L.Callback):
    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.started = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.seconds.append(time.perf_counter() - self.started)


def test_perplexity(model: torch.nn.Module, data: StdlibTextDataModule) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for x, y in data.test_dataloader():
            logits = model(x)
            total += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum"))
            count += y.numel()
    return math.exp(total / count)


def fit(callback: L.Callback, epochs: int, max_bytes: int | None, scratch: Path) -> dict[str, Any]:
    L.seed_everything(0)
    model, data = ByteLanguageModel(), StdlibTextDataModule(block_size=128, batch_size=16, max_bytes=max_bytes)
    timer = EpochTimer()
    trainer = L.Trainer(
        max_epochs=epochs,
        callbacks=[callback, timer],
        default_root_dir=scratch,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, data)
    manifest = json.loads((Path(callback.dirpath) / "manifest.json").read_text())
    group_size = callback.config.group_size  # type: ignore[attr-defined]
    int4 = quantize(model, WeightOnlyConfig(bits=4, group_size=group_size), torch.zeros(2, 128, dtype=torch.long))
    return {
        "model": model,
        "val_perplexity": {k: manifest["metrics"][k]["val/perplexity"] for k in ("float", "quantized")},
        "test_perplexity": {"float": test_perplexity(model, data), "quantized": test_perplexity(int4, data)},
        "epoch_seconds": timer.seconds,
    }


def train(args: argparse.Namespace) -> dict[str, Any]:
    max_bytes = 30_000 if args.quick else None
    with tempfile.TemporaryDirectory() as scratch:
        formats = dict(formats=["onnx"], bits=4, group_size=args.group_size)
        ptq = fit(WeightOnlyQuantization(dirpath=f"{scratch}/ptq", **formats), args.epochs, max_bytes, Path(scratch))
        qat = fit(
            WeightOnlyQAT(start_epoch=args.qat_start, dirpath=f"{scratch}/qat", **formats),
            args.epochs,
            max_bytes,
            Path(scratch),
        )
    torch.save(qat.pop("model").state_dict(), Path(tempfile.gettempdir(), "lightning_quant_weight_only_qat_model.pt"))
    ptq.pop("model")
    recovered = {
        split: (ptq[split]["quantized"] - qat[split]["quantized"]) / (ptq[split]["quantized"] - ptq[split]["float"])
        for split in ("val_perplexity", "test_perplexity")
    }
    late = slice(args.qat_start, args.epochs)
    return {
        "group_size": args.group_size,
        "epochs": args.epochs,
        "qat_start": args.qat_start,
        "quick": args.quick,
        "ptq": ptq,
        "qat": qat,
        "recovered_share": recovered,
        "qat_epoch_cost": statistics.mean(qat["epoch_seconds"][late]) / statistics.mean(ptq["epoch_seconds"][late]),
        "train_load_average": os.getloadavg(),
    }


def latency(repeats: int) -> dict[str, Any]:
    torch.set_num_threads(2)
    model = ByteLanguageModel().eval()
    saved = Path(tempfile.gettempdir(), "lightning_quant_weight_only_qat_model.pt")
    if saved.exists():
        model.load_state_dict(torch.load(saved))
    int4 = quantize(model, WeightOnlyConfig(bits=4, group_size=32), torch.zeros(2, 128, dtype=torch.long))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        sizes = {}
        for shape in SHAPES:
            example = torch.zeros(2, shape[1], dtype=torch.long)
            files = {}
            for name, source in (("onnx float", model), ("onnx int4", int4)):
                artifact = export(source, example, ["onnx"], f"{scratch}/{name}-{shape[1]}")[0]
                files[name] = Path(scratch, f"{name}-{shape[1]}", artifact.path)
                sizes[name] = files[name].stat().st_size
            tokens = torch.randint(0, 256, shape)
            row: dict[str, Any] = {"shape": list(shape)}
            with torch.no_grad():
                row["eager float"] = median_ms(lambda: model(tokens), repeats)
            for name, path in files.items():
                session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
                feed = {session.get_inputs()[0].name: tokens.numpy()}
                row[name] = median_ms(lambda: session.run(None, feed), repeats)
            rows.append(row)
        steps = []
        for name, source in (("onnx float", model), ("onnx int4", int4)):
            artifact = export(source, model.example_input_array, ["onnx"], f"{scratch}/{name}-step")[0]
            files[name] = Path(scratch, f"{name}-step", artifact.path)
        for batch in (1, 4):
            step = (torch.randint(0, 256, (batch, 1)), model.empty_cache(batch), torch.tensor(64))
            row = {"shape": [batch, 1]}
            with torch.no_grad():
                row["eager float"] = median_ms(lambda: model(*step), repeats)
            for name, path in files.items():
                session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
                arrays = [t.numpy() for t in ModelInputs(step, {}).tensors()]
                feed = dict(zip([i.name for i in session.get_inputs()], arrays))
                row[name] = median_ms(lambda: session.run(None, feed), repeats)
            steps.append(row)
    return {
        "steps": steps,
        "rows": rows,
        "file_bytes": sizes,
        "load_average": os.getloadavg(),
        "repeats": repeats,
        "train_step_ms": train_step_ms(max(repeats // 10, 5)),
    }


def train_step_ms(rounds: int) -> dict[str, float]:
    """Median forward + backward + AdamW step (batch 16 x 128) of the float and the fake-quantized model, timed
    alternately round by round so that load from other processes hits both alike."""
    models = {"float": ByteLanguageModel(), "fake-quantized int4": ByteLanguageModel()}
    prepare_qat(models["fake-quantized int4"], WeightOnlyConfig(bits=4, group_size=32))
    optimizers = {name: torch.optim.AdamW(model.parameters()) for name, model in models.items()}
    tokens, targets = torch.randint(0, 256, (16, 128)), torch.randint(0, 256, (16, 128))
    times: dict[str, list[float]] = {name: [] for name in models}
    for round_ in range(rounds + 3):
        for name, model in models.items():
            start = time.perf_counter()
            loss = torch.nn.functional.cross_entropy(model(tokens).flatten(0, 1), targets.flatten())
            loss.backward()
            optimizers[name].step()
            optimizers[name].zero_grad()
            if round_ >= 3:  # after warm-up
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values) for name, values in times.items()}


def median_ms(call: Any, repeats: int) -> float:
    for _ in range(10):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def write(results: dict[str, Any]) -> None:
    cpu = cpu_info()
    lines = [
        "# Weight-only int4 for a language model (issue 16)",
        "",
        f"CPU: {cpu['model']} ({', '.join(cpu['flags'])}); 2 threads; torch {torch.__version__}, "
        f"onnxruntime {ort.__version__}. Written by `benchmarks/bench_weight_only.py`.",
    ]
    for key in sorted((k for k in results if k.startswith("train_g")), key=lambda k: int(k[len("train_g") :])):
        trained = results[key]
        ptq, qat = trained["ptq"], trained["qat"]
        lines += [
            "",
            f"## Perplexity per byte, int4 in groups of {trained['group_size']} ({trained['epochs']} epochs; QAT from "
            f"epoch {trained['qat_start']}{'; --quick: 30 KB of training text' if trained['quick'] else ''})",
            "",
            "| | float | int4 PTQ | int4 QAT | PTQ loss | QAT loss | share of PTQ's loss QAT recovers |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for split, name in (
            ("val_perplexity", "validation (shlex.py, fractions.py)"),
            ("test_perplexity", "test (configparser.py)"),
        ):
            f, p, q = ptq[split]["float"], ptq[split]["quantized"], qat[split]["quantized"]
            recovered = f"{trained['recovered_share'][split]:.0%}" if p > f else "n/a: PTQ lost nothing"
            lines.append(f"| {name} | {f:.4f} | {p:.4f} | {q:.4f} | {p - f:+.4f} | {q - f:+.4f} | {recovered} |")
        lines += [
            "",
            '"float" is the float model trained the same epochs as QAT (the PTQ run); QAT\'s own float weights are '
            f"not a separate model. QAT float-model val perplexity (fake quantization removed): {qat['val_perplexity']['float']:.4f}.",
            "",
            f"Epoch wall times (fits run one after the other, so load from other processes can differ; the "
            f"alternated step timing below is the cost measure): fake-quantized epochs {trained['qat_epoch_cost']:.2f}x "
            f"the same epochs in float (epoch seconds float {[round(s, 1) for s in ptq['epoch_seconds']]}, QAT "
            f"{[round(s, 1) for s in qat['epoch_seconds']]}; load average at the end "
            f"{[round(v, 2) for v in trained['train_load_average']]}).",
        ]
    timed = results.get("latency")
    if timed:
        sizes = timed["file_bytes"]
        lines += [
            "",
            f"## Latency, ms per call (median of {timed['repeats']}; load average "
            f"{[round(v, 2) for v in timed['load_average']]})",
            "",
            "The generation step (what the callbacks export and time: one new byte per sequence, the key/value cache "
            "of 128 positions in and out):",
            "",
            "| sequences | eager float | ONNX Runtime float | ONNX Runtime int4 | int4 vs eager float | int4 vs ORT float |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for row in timed.get("steps", []):
            e, f, q = row["eager float"], row["onnx float"], row["onnx int4"]
            lines.append(f"| {row['shape'][0]} | {e:.2f} | {f:.2f} | {q:.2f} | {e / q:.2f}x | {f / q:.2f}x |")
        lines += [
            "",
            "Whole sequences (``forward(tokens)``, no cache: scoring a text, or generating without a cache):",
            "",
            "| batch x tokens | eager float | ONNX Runtime float | ONNX Runtime int4 | int4 vs eager float | int4 vs ORT float |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for row in timed["rows"]:
            e, f, q = row["eager float"], row["onnx float"], row["onnx int4"]
            lines.append(
                f"| {row['shape'][0]} x {row['shape'][1]} | {e:.2f} | {f:.2f} | {q:.2f} | {e / q:.2f}x | {f / q:.2f}x |"
            )
        steps = timed["train_step_ms"]
        lines += [
            "",
            f"Training step (forward, backward, AdamW; batch 16 x 128; float and fake-quantized timed alternately): "
            f"float {steps['float']:.1f} ms, fake-quantized int4 {steps['fake-quantized int4']:.1f} ms: a QAT epoch "
            f"costs {steps['fake-quantized int4'] / steps['float']:.2f}x a float one.",
        ]
        lines += [
            "",
            f"Files: ONNX float {sizes['onnx float'] / 1e6:.2f} MB, ONNX int4 {sizes['onnx int4'] / 1e6:.2f} MB "
            f"({sizes['onnx int4'] / sizes['onnx float']:.2f} of float).",
        ]
    RESULTS.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--qat-start", type=int, default=4)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--group-size", type=int, default=32, help="int4 weights per float scale (PTQ and QAT)")
    parser.add_argument("--latency", action="store_true", help="only the latency table")
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.qat_start, args.repeats = 2, 1, 20
    warnings.filterwarnings("ignore")
    results = json.loads(SAVED.read_text()) if SAVED.exists() else {}
    if not args.latency:
        results[f"train_g{args.group_size}"] = train(args)
    results["latency"] = latency(args.repeats)
    SAVED.write_text(json.dumps(results, indent=1, default=float))
    write(results)
    print(RESULTS.read_text())


if __name__ == "__main__":
    main()
