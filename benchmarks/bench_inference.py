"""Channels-last, mixed precision, float AOTInductor and the transformer fast path, measured side by side.

Every ratio compares variants timed in one run, interleaved round by round so load from other processes
hits them alike, and keeps each variant's fastest call (load only ever adds time). Writes ``benchmarks/inference_results.md``::

    python benchmarks/bench_inference.py            # about 3 minutes on 2 cores
    python benchmarks/bench_inference.py --quick    # fewer repeats, for a smoke run

Targets (issue 5): channels-last conv net >= 1.3x faster float inference than contiguous;
AutoMixedPrecision(auto) at most 5% slower per training step than the better of float32 and bf16-mixed;
float AOTInductor artifact >= 2x faster than float eager on the conv net.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from torch import nn

from lightning_quant import AutoMixedPrecision
from lightning_quant.demo import ConvNet, DigitsClassifier, DigitsDataModule
from lightning_quant.deprecated import legacy_api
from lightning_quant.export import export, load_artifact
from lightning_quant.memory_format import to_channels_last
from lightning_quant.quantization import DynamicQuantConfig, quantize
from lightning_quant.quantization.transformer_fastpath import (
    FUSED_ATTENTION,
    FUSED_ENCODER_LAYER,
    inference_operators,
    route_quantized_encoder_layers,
)
from lightning_quant.target import cpu_info

RESULTS = Path(__file__).with_name("inference_results.md")


def interleaved_ms(variants: dict[str, Callable[[], Any]], rounds: int, warmup: int = 3) -> dict[str, float]:
    """Milliseconds of each variant's fastest call, timed round-robin (other processes only add time)."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    with torch.inference_mode():
        for call in variants.values():
            for _ in range(warmup):
                call()
        for _ in range(rounds):
            for name, call in variants.items():
                start = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - start)
    return {name: min(t) * 1e3 for name, t in times.items()}


# ---------------------------------------------------------------------------------------------- conv net
def bench_conv_net(rounds: int, workdir: Path) -> tuple[list[list[str]], dict[str, float]]:
    """Float inference of a 4-block conv net on 16x3x32x32: contiguous, channels-last, AOTInductor, ONNX."""
    torch.manual_seed(0)
    model = ConvNet(in_channels=3, channels=32, blocks=4).eval()
    x = torch.rand(16, 3, 32, 32)
    channels_last = copy.deepcopy(model)
    to_channels_last(channels_last)
    artifacts = export(model, x, ["aoti", "onnx"], workdir / "float_convnet")
    aoti = load_artifact(workdir / "float_convnet" / next(a.path for a in artifacts if a.format == "aoti"), "aoti")
    onnx = load_artifact(workdir / "float_convnet" / next(a.path for a in artifacts if a.format == "onnx"), "onnx")
    bf16_model = copy.deepcopy(model).to(torch.bfloat16)
    x_bf16 = x.to(torch.bfloat16)
    (bf16_artifact,) = export(bf16_model, x_bf16, ["aoti"], workdir / "bf16_convnet")
    aoti_bf16 = load_artifact(workdir / "bf16_convnet" / bf16_artifact.path, "aoti")
    ms = interleaved_ms(
        {
            "eager, contiguous": lambda: model(x),
            "eager, channels-last (ChannelsLast)": lambda: channels_last(x),
            "AOTInductor package, freezing (OptimizeForInference)": lambda: aoti(x),
            "ONNX Runtime (OptimizeForInference)": lambda: onnx(x),
            "AOTInductor package, bf16 (OptimizeForInference(dtype='bfloat16'))": lambda: aoti_bf16(x_bf16),
        },
        rounds,
    )
    base = ms["eager, contiguous"]
    rows = [[name, f"{value:.2f}", f"{base / value:.2f}x"] for name, value in ms.items()]
    ratios = {
        "channels_last": base / ms["eager, channels-last (ChannelsLast)"],
        "aoti": base / ms["AOTInductor package, freezing (OptimizeForInference)"],
    }
    return rows, ratios


# ----------------------------------------------------------------------------------------- mixed precision
class AlternatingPrecision(L.Callback):
    """Trains step by step in float32 and bf16-mixed alternately, timing each step (forward, backward,
    optimizer step) under its format: interleaved at step granularity, load from other processes hits both
    alike. Lightning's plugins hold no per-step state in these formats, so swapping them is safe."""

    def __init__(self, device: str = "cpu") -> None:
        self.plugins = {"32-true": Precision(), "bf16-mixed": MixedPrecision("bf16-mixed", device=device)}
        self.seconds: dict[str, list[float]] = {name: [] for name in self.plugins}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._current = list(self.plugins)[batch_idx % len(self.plugins)]
        trainer.strategy.precision_plugin = self.plugins[self._current]
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx > 1 and len(batch[0]) == trainer.datamodule.hparams.batch_size:  # warm, full batches
            self.seconds[self._current].append(time.perf_counter() - self._start)


def quiet_trainer(**kwargs: Any) -> L.Trainer:
    return L.Trainer(
        max_epochs=-1,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def bench_mixed_precision(steps: int, decisions: int) -> tuple[list[list[str]], float, str]:
    """Per-step time of each format, and how often AutoMixedPrecision(auto) picks the faster one.

    AutoMixedPrecision adds nothing to a training step: it installs Lightning's plugin for the format it
    picks and gets out of the way, so its per-step time is that of its pick. The target ratio is therefore
    the mean per-step time of its picks (``decisions`` independent fits) over the better format's.
    """
    L.seed_everything(0)
    alternating = AlternatingPrecision()
    quiet_trainer(max_steps=2 * steps, callbacks=[alternating]).fit(
        DigitsClassifier(ConvNet()), datamodule=DigitsDataModule(batch_size=64)
    )
    # the fastest step of each format: load from other processes only ever adds time
    per_step = {name: min(times) * 1e3 for name, times in alternating.seconds.items()}
    picks, decision_seconds = [], []
    for _ in range(decisions):
        amp = AutoMixedPrecision(dtype="auto")
        trainer = quiet_trainer(max_steps=1, callbacks=[amp])
        started = time.perf_counter()
        trainer.fit(DigitsClassifier(ConvNet()), datamodule=DigitsDataModule(batch_size=64))
        decision_seconds.append(time.perf_counter() - started)
        picks.append(amp.precision)
    best = min(per_step.values())
    auto_ms = statistics.mean(per_step[pick] for pick in picks)
    counts = ", ".join(f"{p} x{picks.count(p)}" for p in sorted(set(picks)))
    rows = [[f"precision={name!r}", f"{ms:.2f}", f"{ms / best:.2f}"] for name, ms in per_step.items()]
    rows.append([f"AutoMixedPrecision(auto): picked {counts}", f"{auto_ms:.2f}", f"{auto_ms / best:.2f}"])
    rows.append(
        [
            "(one fit of 1 step with AutoMixedPrecision, incl. its measurement, s)",
            f"{statistics.median(decision_seconds):.2f}",
            "",
        ]
    )
    return rows, auto_ms / best, counts


# --------------------------------------------------------------------------------------------- transformer
class Encoder(nn.Module):
    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, num_layers: int) -> None:
        super().__init__()
        self.embed = nn.Linear(d_model, d_model)
        layer = nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x)).mean(dim=1))


def bench_transformer(rounds: int) -> list[list[str]]:
    rows = []
    for d_model, ff, layers, batch, seq in [(64, 128, 2, 64, 8), (256, 1024, 4, 32, 64)]:
        torch.manual_seed(0)
        model = Encoder(d_model, 8, ff, layers).eval()
        x = torch.randn(batch, seq, d_model)
        with legacy_api("torch.ao.quantization.quantize_dynamic"):
            legacy = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)
        route_quantized_encoder_layers(legacy)
        torchao = quantize(model, DynamicQuantConfig(), x)
        variants = {
            "float": model,
            "legacy dynamic int8 + route_quantized_encoder_layers": legacy,
            "torchao dynamic int8 (DynamicQuantConfig), eager": torchao,
        }
        ms = interleaved_ms({name: (lambda m=m: m(x)) for name, m in variants.items()}, rounds)
        for name, m in variants.items():
            operators = inference_operators(m, x)
            fused = [
                op
                for op in (FUSED_ENCODER_LAYER, FUSED_ATTENTION, "aten.scaled_dot_product_attention")
                if op in operators
            ]
            rows.append(
                [
                    f"{layers}x{d_model} (ff {ff}), batch {batch}x{seq}",
                    name,
                    f"{ms[name]:.2f}",
                    f"{ms['float'] / ms[name]:.2f}x",
                    ", ".join(fused) or "none",
                ]
            )
    return rows


# --------------------------------------------------------------------------------------------------- report
def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def verdict(value: float, target: float, higher_is_better: bool = True) -> str:
    ok = value >= target if higher_is_better else value <= target
    return "**met**" if ok else "**NOT met**"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run, noisier)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    rounds = 10 if args.quick else 40
    amp_steps, amp_decisions = (10, 2) if args.quick else (40, 8)

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as workdir:
        conv_rows, conv = bench_conv_net(rounds, Path(workdir))
    amp_rows, amp_ratio, amp_chosen = bench_mixed_precision(amp_steps, amp_decisions)
    transformer_rows = bench_transformer(rounds)
    load = f"load average {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"

    report = f"""# Inference and training-speed benchmark (issue 5)

`python benchmarks/bench_inference.py{" --quick" if args.quick else ""}` on {cpu_info()["model"]} (ISA flags {cpu_info()["flags"]}),
torch {torch.__version__}, {torch.get_num_threads()} threads, {load} ({os.cpu_count()} cores). Fastest of
{rounds} interleaved rounds; the machine is shared, so absolute times drift: read the ratios.

## Targets

| target | measured | |
|---|---|---|
| channels-last conv net float inference vs contiguous >= 1.3x | {conv["channels_last"]:.2f}x | {verdict(conv["channels_last"], 1.3)} |
| AutoMixedPrecision(auto) per step / better of float32 and bf16-mixed <= 1.05 | {amp_ratio:.2f} (picked {amp_chosen}) | {verdict(amp_ratio, 1.05, higher_is_better=False)} |
| float AOTInductor artifact vs float eager (conv net) >= 2x | {conv["aoti"]:.2f}x | {verdict(conv["aoti"], 2.0)} |

## Conv net float inference (ConvNet 3->32 channels, 4 blocks, batch 16x3x32x32)

{table(["variant", "ms", "speed-up vs contiguous eager"], conv_rows)}

## Training step, digits ConvNet (32 channels, 4 blocks, batch 64)

float32 and bf16-mixed alternate step by step in one fit ({amp_steps} steps each, the fastest full-batch step);
AutoMixedPrecision(auto) decided in {amp_decisions} separate fits, and its per-step time is that of its pick (it
adds no per-step work).

{table(["setting", "ms per step", "vs the better format"], amp_rows)}

## nn.TransformerEncoder inference (inference_mode), which fused kernels run

{table(["model", "variant", "ms", "speed-up vs float", "fused kernels hit"], transformer_rows)}
"""
    RESULTS.write_text(report)
    print(report)


if __name__ == "__main__":
    main()
