"""What the portable default costs: int8 files for ``target="avx2"`` (7-bit weights, AVX2 code) against files
for the CPU at hand (``"native"``, e.g. ``avx512_vnni``: 8-bit weights), measured side by side in one run.

For each target it builds the files lightning-quant ships and times them interleaved with the float
baselines (eager, AOTInductor with freezing, ONNX Runtime), on the same inputs, in one process:

- static int8 of a 5-block conv net, input 16x3x64x64 (issue 13: >= 3x float eager and >= 1.7x the best float
  runtime on AVX2, >= 2x on VNNI);
- dynamic int8 of a 1024-2048-1024-10 MLP, batch 64 (>= 2x float eager, >= 1.5x the best float runtime);
- digits accuracy of static int8 (ConvNet trained on the real digits) for each target.

Every number is written with the CPU's model and ISA flags and the load average::

    python benchmarks/bench_targets.py          # about 3 minutes on an idle 2-core machine
    python benchmarks/bench_targets.py --quick  # fewer calls, for a smoke run
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from bench_ptq import FiveBlockConvNet  # noqa: E402

from lightning_quant.benchmark import compare_latency_ms, quartiles  # noqa: E402
from lightning_quant.demo.data import load_digits_tensors  # noqa: E402
from lightning_quant.export import OrtDynamicQuantization, OrtStaticQuantization, export, load_artifact  # noqa: E402
from lightning_quant.quantization import DynamicQuantConfig, ModelInputs, StaticQuantConfig, quantize  # noqa: E402
from lightning_quant.target import cpu_info, resolve_target  # noqa: E402

RESULTS = Path(__file__).with_name("target_results.md")


class WideMLP(nn.Module):
    """1024-2048-1024-10: the Linear-heavy model of issue 13."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(1024, 2048), nn.ReLU(), nn.Linear(2048, 1024), nn.ReLU(), nn.Linear(1024, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def float_files(model: nn.Module, x: torch.Tensor, target: str, out: Path) -> dict[str, Any]:
    artifacts = export(model, x, ["aoti", "onnx"], out, target=target)
    return {f"float {a.format}": load_artifact(out / a.path, a.format) for a in artifacts}


def case(
    name: str,
    model: nn.Module,
    x: torch.Tensor,
    int8_files: dict[str, dict[str, Any]],
    floats: dict[str, Any],
    repeats: int,
) -> list[str]:
    """Time float eager, the float files and every target's int8 files interleaved; one markdown table."""
    models = {"float eager": model, **floats}
    for target, files in int8_files.items():
        models.update({f"int8 {fmt} ({target})": runner for fmt, runner in files.items()})
    load_before = os.getloadavg()[0]
    with torch.no_grad():
        expected = model(x)
        errors = {label: relative_error(torch.as_tensor(runner(x)), expected) for label, runner in models.items()}
        spread = compare_latency_ms(models, x, warmup=10, repeats=repeats, statistic=quartiles)
    load_after = os.getloadavg()[0]
    eager = spread["float eager"][1]
    best_float = min(v[1] for k, v in spread.items() if k.startswith("float"))
    lines = [
        f"## {name}",
        "",
        f"load average {load_before:.2f} -> {load_after:.2f}; median of {repeats} interleaved "
        "rounds (p25-p75 in brackets)",
        "",
        "| variant | median ms | vs float eager | vs best float | rel. error vs float |",
        "| --- | --- | --- | --- | --- |",
    ]
    for label, (low, median, high) in spread.items():
        lines.append(
            f"| {label} | {median:.3f} [{low:.3f}-{high:.3f}] | {eager / median:.2f}x | "
            f"{best_float / median:.2f}x | {errors[label]:.4f} |"
        )
    return [*lines, ""]


def static_conv(targets: list[str], repeats: int, scratch: Path) -> list[str]:
    torch.manual_seed(0)
    model = FiveBlockConvNet().eval()
    x = torch.randn(16, 3, 64, 64)
    calibration = [torch.randn(16, 3, 64, 64) for _ in range(8)]
    files: dict[str, dict[str, Any]] = {}
    for target in targets:
        int8 = quantize(model, StaticQuantConfig(observer="minmax", target=target), x, calibration)
        out = scratch / f"conv-{target}"
        recipe = OrtStaticQuantization([ModelInputs.from_value(b) for b in calibration], observer="minmax")
        artifacts = export(int8, x, ["aoti", "onnx"], out, float_model=model, onnx_quantization=recipe, target=target)
        files[target] = {a.format: load_artifact(out / a.path, a.format) for a in artifacts}
    floats = float_files(model, x, targets[0], scratch / "conv-float")
    return case(
        "Static int8, 5-block conv net, 16x3x64x64 (synthetic data: timing only)", model, x, files, floats, repeats
    )


def dynamic_mlp(targets: list[str], repeats: int, scratch: Path) -> list[str]:
    torch.manual_seed(0)
    model = WideMLP().eval()
    x = torch.randn(64, 1024)
    files: dict[str, dict[str, Any]] = {}
    for target in targets:
        int8 = quantize(model, DynamicQuantConfig(target=target), x)
        out = scratch / f"mlp-{target}"
        artifacts = export(
            int8, x, ["aoti", "onnx"], out, float_model=model, onnx_quantization=OrtDynamicQuantization(), target=target
        )
        files[target] = {a.format: load_artifact(out / a.path, a.format) for a in artifacts}
    floats = float_files(model, x, targets[0], scratch / "mlp-float")
    return case(
        "Dynamic int8, MLP 1024-2048-1024-10, batch 64 (synthetic data: timing only)", model, x, files, floats, repeats
    )


def digits_accuracy(targets: list[str], epochs: int) -> list[str]:
    """Static int8 test accuracy of a ConvNet trained on the real digits, per target (the reference int8 model:
    what every verified file computes)."""
    from lightning_quant.demo import ConvNet

    images, labels = load_digits_tensors()
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(len(images), generator=generator)
    train, test = order[:1400], order[1400:]
    torch.manual_seed(0)
    model = ConvNet()
    optimizer = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(epochs):
        for start in range(0, len(train), 64):
            index = train[start : start + 64]
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(images[index]), labels[index]).backward()
            optimizer.step()
    model.eval()
    calibration = [images[train[i : i + 64]] for i in range(0, 64 * 16, 64)]
    with torch.no_grad():
        rows = [("float", (model(images[test]).argmax(1) == labels[test]).float().mean().item(), 0.0)]
        expected = model(images[test])
        for target in targets:
            int8 = quantize(model, StaticQuantConfig(target=target), calibration[0], calibration)
            out = int8(images[test])
            rows.append(
                (
                    f"static int8 ({target})",
                    (out.argmax(1) == labels[test]).float().mean().item(),
                    relative_error(out, expected),
                )
            )
    lines = [
        f"## Digits test accuracy, ConvNet, {epochs} epochs, {len(test)} test images",
        "",
        "| model | accuracy | rel. error of logits vs float |",
        "| --- | --- | --- |",
    ]
    lines += [f"| {name} | {accuracy:.4f} | {error:.4f} |" for name, accuracy, error in rows]
    return [*lines, ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    native = resolve_target("native").name
    targets = ["avx2"] + ([native] if native != "avx2" else [])
    repeats = 10 if args.quick else 60
    cpu = cpu_info()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        lines = [
            "# Deployment targets: what the portable default costs (benchmarks/bench_targets.py)",
            "",
            f"CPU: {cpu['vendor']} {cpu['model']}, ISA flags {cpu['flags']}; {torch.get_num_threads()} threads; "
            f"torch {torch.__version__}. Targets built: {targets}.",
            "",
            "Files for `avx2` hold 7-bit weights and AVX2 code (they run correctly on any AVX2 CPU); files for the "
            "native target hold 8-bit weights and this CPU's ISA. All variants of a table are timed interleaved in "
            "one process on the same input.",
            "",
            *static_conv(targets, repeats, Path(scratch)),
            *dynamic_mlp(targets, repeats, Path(scratch)),
            *digits_accuracy(targets, epochs=3 if args.quick else 10),
        ]
    lines.append(f"Run took {time.perf_counter() - started:.0f} s.")
    RESULTS.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
