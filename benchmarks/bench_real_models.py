"""Models users bring (issue 14), sweep-sized: a Hugging Face BERT classifier, a ResNet with torchvision's block
structure and Lightning's demo Transformer, each trained by a real ``Trainer`` with one of our callbacks (float
``OptimizeForInference``, static int8, dynamic int8, QAT; the ResNet with ``ChannelsLast`` too). One table: what
shipped, each shipped file's speed-up over the float model (eager, timed interleaved with the files by the
callback itself), the recommended file, and the validation metric of float against the recommended file (what
``quantized_model`` runs).

Every row's numbers come from the ``manifest.json`` the callback wrote; the CPU's ISA flags and the load average
are printed with them::

    python benchmarks/bench_real_models.py            # about 10 minutes on an idle 2-core machine
    python benchmarks/bench_real_models.py --quick    # one epoch each, for a smoke run
    python benchmarks/bench_real_models.py --families resnet --approaches static qat
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from lightning_quant import (
    ChannelsLast,
    DynamicQuantization,
    OptimizeForInference,
    PostTrainingQuantization,
    QuantizationAwareTraining,
)
from lightning_quant.demo import DigitsClassifier, DigitsDataModule, ResNet
from lightning_quant.demo.third_party import BertClassifier, DemoTransformer, Tokens
from lightning_quant.target import cpu_info

RESULTS = Path(__file__).with_name("real_models_results.md")

APPROACHES: dict[str, Callable[[Path], L.Callback]] = {
    "float": lambda out: OptimizeForInference(dirpath=out),
    "static": lambda out: PostTrainingQuantization(dirpath=out, num_calibration_batches=8),
    "dynamic": lambda out: DynamicQuantization(dirpath=out),
    "qat": lambda out: QuantizationAwareTraining(dirpath=out),
}


def bert() -> tuple[L.LightningModule, dict[str, Any], str]:
    loaders = {
        "train_dataloaders": DataLoader(Tokens(512, 0), batch_size=32, shuffle=True),
        "val_dataloaders": DataLoader(Tokens(256, 1), batch_size=32),
    }
    return BertClassifier(hidden_size=256, layers=2), loaders, "val/acc"


def resnet() -> tuple[L.LightningModule, dict[str, Any], str]:
    return DigitsClassifier(ResNet()), {"datamodule": DigitsDataModule(batch_size=32)}, "val/acc"


def demo_transformer() -> tuple[L.LightningModule, dict[str, Any], str]:
    return DemoTransformer(width=128, layers=2, block_size=64, max_bytes=200_000), {}, "val/loss"


FAMILIES: dict[
    str, tuple[Callable[[], tuple[L.LightningModule, dict[str, Any], str]], list[Callable[[], L.Callback]]]
] = {
    "bert": (bert, []),
    "resnet": (resnet, [ChannelsLast]),
    "demo_transformer": (demo_transformer, []),
}


def run(family: str, approach: str, epochs: int, scratch: Path) -> dict[str, Any]:
    """Fit one model with one callback; the row of the table, read from the manifest it wrote."""
    make_module, extras = FAMILIES[family]
    torch.manual_seed(0)
    module, data, metric = make_module()
    callback = APPROACHES[approach](scratch / f"{family}-{approach}")
    trainer = L.Trainer(
        default_root_dir=scratch,
        callbacks=[*(make() for make in extras), callback],
        logger=False,
        max_epochs=epochs,
        limit_val_batches=8,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    started = time.perf_counter()
    try:
        trainer.fit(module, **data)
    except Exception as err:  # a failed case is a row of the table (a partial one: its files), not the end of the run
        manifest = getattr(callback, "manifest", None)
        if not manifest or manifest["status"] == "failed":
            return {"family": family, "approach": approach, "status": "failed", "error": f"{type(err).__name__}: {err}"}
    manifest = callback.manifest
    return {
        "family": family,
        "approach": approach,
        "status": manifest["status"],
        "metric": metric,
        "float": manifest["metrics"]["float"].get(metric),
        "shipped": manifest["metrics"]["quantized"].get(metric),
        "files": {a["format"]: a["speedup_vs_float"] for a in manifest["artifacts"]},
        "recommended": manifest["recommended"],
        "failures": manifest["failures"],
        "load": manifest["latency_ms"]["load_average"],
        "float_ms": manifest["latency_ms"]["float"],
        "seconds": time.perf_counter() - started,
    }


def table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| model | callback | status | files (speed-up vs float eager) | recommended | metric: float -> "
        "recommended file | float eager ms | load avg | fit + export s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    notes = []
    for row in rows:
        if row["status"] == "failed":
            lines.append(f"| {row['family']} | {row['approach']} | failed | | | | | | |")
            notes.append(f"- {row['family']} / {row['approach']}: {' '.join(row['error'].split())[:1200]}")
            continue
        files = ", ".join(f"{fmt} {speedup:.2f}x" if speedup else fmt for fmt, speedup in row["files"].items())
        metric = (
            f"{row['metric']} {row['float']:.4f} -> {row['shipped']:.4f}"
            if row["float"] is not None and row["shipped"] is not None
            else ""
        )
        lines.append(
            f"| {row['family']} | {row['approach']} | {row['status']} | {files} | {row['recommended']} | "
            f"{metric} | {row['float_ms']:.2f} | {row['load'][0]:.2f}-{row['load'][1]:.2f} | "
            f"{row['seconds']:.0f} |"
        )
        notes += [
            f"- {row['family']} / {row['approach']}, {fmt} not shipped: {' '.join(line.strip() for line in why.splitlines()[:3])[:400]}"
            for fmt, why in row["failures"].items()
        ]
    return [*lines, "", *(["Formats that did not ship, and why:", "", *notes, ""] if notes else [])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--families", nargs="+", choices=list(FAMILIES), default=list(FAMILIES))
    parser.add_argument("--approaches", nargs="+", choices=list(APPROACHES), default=list(APPROACHES))
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    cpu = cpu_info()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        rows = [
            run(family, approach, 1 if args.quick else 3, Path(scratch))
            for family in args.families
            for approach in args.approaches
        ]
    lines = [
        "# Models users bring: every approach, one table (benchmarks/bench_real_models.py)",
        "",
        f"CPU: {cpu['vendor']} {cpu['model']}, ISA flags {cpu['flags']}; {torch.get_num_threads()} threads; "
        f"torch {torch.__version__}. {'1 epoch' if args.quick else '3 epochs'} each; the resnet runs with "
        "ChannelsLast. Speed-ups: fastest of interleaved rounds on a validation batch (bert 32x16 tokens, "
        "resnet 32x1x8x8, demo_transformer 8x64 bytes), timed by the callback; metric: the validation "
        "metric (up to 8 batches) of the float model and of the recommended file (`quantized_model`). "
        "`torch_export` is the portable program users lower themselves, not a runtime (slow as is).",
        "",
        *table(rows),
        f"Run took {time.perf_counter() - started:.0f} s.",
    ]
    RESULTS.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
