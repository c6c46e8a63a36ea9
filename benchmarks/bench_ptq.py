"""Static and dynamic int8 (issue 3 targets), measured side by side in one run.

Torch variants are timed interleaved, round by round, so load from other processes hits them alike;
ONNX Runtime files are timed on their own afterwards (ORT's thread pool and PyTorch's OpenMP threads
slow each other down when both are busy in one process). Writes ``benchmarks/ptq_results.md``::

    python benchmarks/bench_ptq.py            # about 5 minutes on 2 busy cores (three AOTInductor compiles)
    python benchmarks/bench_ptq.py --quick    # fewer repeats and epochs, for a smoke run

Targets:
- static int8 of a 5-block conv net on 16x3x64x64: >= 3x faster than float eager, >= 2x faster than float
  AOTInductor (freezing); smallest artifact <= 0.35 of the float parameter bytes;
- dynamic int8 of a Linear-heavy model: >= 2x faster than float eager;
- digits test accuracy drop <= 1 point for static and dynamic.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

from lightning_quant import DynamicQuantization, PostTrainingQuantization
from lightning_quant.benchmark import compare_latency_ms, model_bytes
from lightning_quant.demo import ConvNet, DigitsClassifier, DigitsDataModule, MLPNet
from lightning_quant.export import OrtDynamicQuantization, OrtStaticQuantization, export, load_artifact
from lightning_quant.export.aoti import export_aoti
from lightning_quant.quantization import DynamicQuantConfig, ModelInputs, StaticQuantConfig, quantize
from lightning_quant.target import cpu_info

RESULTS = Path(__file__).with_name("ptq_results.md")


class FiveBlockConvNet(nn.Module):
    """5 conv-BN-ReLU blocks (32-64-128-128-256 channels, pooling after blocks 1, 2, 4) and a linear head."""

    def __init__(self, channels: tuple[int, ...] = (32, 64, 128, 128, 256), num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for i, c_out in enumerate(channels):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
            if i in (0, 1, 3):
                layers.append(nn.MaxPool2d(2))
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class LinearHeavy(nn.Module):
    """MLP 1024-1024-1024-10 (MEASURED.md's dynamic int8 case)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def median_and_min(times: list[float]) -> tuple[float, float]:
    return statistics.median(times), min(times)


def timed(models: dict[str, Any], inputs: torch.Tensor, repeats: int) -> dict[str, tuple[float, float]]:
    return compare_latency_ms(models, inputs, warmup=10, repeats=repeats, statistic=median_and_min)


def onnx_alone(path: Path, inputs: torch.Tensor, repeats: int) -> tuple[float, float]:
    runner = load_artifact(path, "onnx")
    value = timed({"onnx": runner}, inputs, repeats)["onnx"]
    del runner
    return value


def bench_static(scratch: Path, repeats: int) -> dict[str, Any]:
    torch.manual_seed(0)
    model = FiveBlockConvNet().eval()
    for module in model.modules():  # trained-looking BN statistics instead of the identity
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    x = torch.rand(16, 3, 64, 64)
    calibration = [torch.rand(16, 3, 64, 64) for _ in range(8)]
    started = time.perf_counter()
    int8 = quantize(model, StaticQuantConfig(), x, calibration)
    artifacts = export(
        int8,
        x,
        ["aoti", "onnx"],
        scratch / "static",
        float_model=model,
        onnx_quantization=OrtStaticQuantization([ModelInputs.from_value(b) for b in calibration]),
    )
    int8_seconds = time.perf_counter() - started
    started = time.perf_counter()
    export_aoti(model, ModelInputs.from_value(x), scratch / "float_aoti.pt2")
    float_aoti_seconds = time.perf_counter() - started
    models = {
        "float eager": model,
        "float AOTInductor (freezing)": load_artifact(scratch / "float_aoti.pt2", "aoti"),
        "int8 PT2E -> AOTInductor (freezing)": load_artifact(scratch / "static" / "model_aoti.pt2", "aoti"),
    }
    times = timed(models, x, repeats)
    times["int8 ONNX Runtime (quantize_static QDQ)"] = onnx_alone(scratch / "static" / "model.onnx", x, repeats)
    sizes = {a.path: a.bytes for a in artifacts}
    return {
        "times": times,
        "float_bytes": model_bytes(model),
        "sizes": sizes,
        "compile_s": {"int8 (quantize + both exports)": int8_seconds, "float AOTInductor": float_aoti_seconds},
    }


def bench_dynamic(scratch: Path, repeats: int) -> dict[str, Any]:
    torch.manual_seed(0)
    model = LinearHeavy().eval()
    x = torch.rand(128, 1024)
    int8 = quantize(model, DynamicQuantConfig(), x)
    artifacts = export(
        int8, x, ["aoti", "onnx"], scratch / "dynamic", float_model=model, onnx_quantization=OrtDynamicQuantization()
    )
    models = {
        "float eager": model,
        "int8 torchao eager": int8,
        "int8 torchao -> AOTInductor (freezing)": load_artifact(scratch / "dynamic" / "model_aoti.pt2", "aoti"),
    }
    times = timed(models, x, repeats)
    times["int8 ONNX Runtime (quantize_dynamic)"] = onnx_alone(scratch / "dynamic" / "model.onnx", x, repeats)
    return {"times": times, "float_bytes": model_bytes(model), "sizes": {a.path: a.bytes for a in artifacts}}


def test_accuracy(model: Any, datamodule: DigitsDataModule) -> float:
    correct = total = 0
    with torch.no_grad():
        for x, y in datamodule.test_dataloader():
            correct += int((model(x).argmax(1) == y).sum())
            total += len(y)
    return correct / total


def bench_digits(scratch: Path, epochs: int) -> dict[str, Any]:
    results = {}
    for name, net, callback in [
        (
            "static (ConvNet, PostTrainingQuantization)",
            ConvNet(),
            PostTrainingQuantization(formats=["aoti", "onnx"], dirpath=scratch / "digits_static"),
        ),
        (
            "dynamic (MLPNet, DynamicQuantization)",
            MLPNet(),
            DynamicQuantization(formats=["aoti", "onnx"], dirpath=scratch / "digits_dynamic"),
        ),
    ]:
        L.seed_everything(0)
        datamodule = DigitsDataModule()
        module = DigitsClassifier(net)
        trainer = L.Trainer(
            max_epochs=epochs,
            callbacks=[callback],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=scratch,
        )
        trainer.fit(module, datamodule=datamodule)
        module.eval()
        results[name] = {
            "float": test_accuracy(module, datamodule),
            "int8 quantized_model": test_accuracy(callback.quantized_model, datamodule),
            "int8 ONNX": test_accuracy(load_artifact(Path(callback.dirpath) / "model.onnx", "onnx"), datamodule),
            "val": callback.manifest["metrics"],
        }
    return results


def report(static: dict, dynamic: dict, digits: dict, repeats: int, epochs: int) -> str:
    # ratios from the median (the number the manifest uses); the min (least disturbed call) shown beside it
    st = {k: v[0] for k, v in static["times"].items()}
    dy = {k: v[0] for k, v in dynamic["times"].items()}
    st_min = {k: v[1] for k, v in static["times"].items()}
    dy_min = {k: v[1] for k, v in dynamic["times"].items()}
    int8_static = st["int8 PT2E -> AOTInductor (freezing)"]
    smallest = min(static["sizes"].values())
    best_dynamic = min(v for k, v in dy.items() if k.startswith("int8"))
    rows = [
        "# Static and dynamic int8: measured (benchmarks/bench_ptq.py)",
        "",
        f"{cpu_info()['model']} (ISA flags {cpu_info()['flags']}), {torch.get_num_threads()} threads, torch {torch.__version__}; "
        f"median of {repeats} calls after warm-up, torch variants interleaved in one process, ONNX Runtime alone "
        "after them. The machine is shared with other jobs: absolute times drift, ratios hold better.",
        "",
        "## Static int8, 5-block conv net, input 16x3x64x64",
        "| variant | median ms | vs float eager | min ms | vs float eager (min) |",
        "| --- | --- | --- | --- | --- |",
        *(
            f"| {k} | {v:.3f} | {st['float eager'] / v:.2f}x | {st_min[k]:.3f} | {st_min['float eager'] / st_min[k]:.2f}x |"
            for k, v in st.items()
        ),
        "",
        "| file | bytes | / float parameter bytes |",
        "| --- | --- | --- |",
        f"| float parameters (torch.save) | {static['float_bytes']} | 1.00 |",
        *(f"| {k} | {v} | {v / static['float_bytes']:.2f} |" for k, v in static["sizes"].items()),
        "",
        "Compile seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in static["compile_s"].items()),
        "",
        "## Dynamic int8, MLP 1024-1024-1024-10, batch 128",
        "| variant | median ms | vs float eager | min ms | vs float eager (min) |",
        "| --- | --- | --- | --- | --- |",
        *(
            f"| {k} | {v:.3f} | {dy['float eager'] / v:.2f}x | {dy_min[k]:.3f} | {dy_min['float eager'] / dy_min[k]:.2f}x |"
            for k, v in dy.items()
        ),
        "",
        f"## Digits test accuracy ({epochs} epochs, 270 test images)",
        "| approach | float | int8 quantized_model | int8 ONNX | drop (points) |",
        "| --- | --- | --- | --- | --- |",
        *(
            f"| {k} | {v['float']:.4f} | {v['int8 quantized_model']:.4f} | {v['int8 ONNX']:.4f} | "
            f"{100 * (v['float'] - min(v['int8 quantized_model'], v['int8 ONNX'])):.2f} |"
            for k, v in digits.items()
        ),
        "",
        "## Targets",
        "| target | measured | met |",
        "| --- | --- | --- |",
        _target("static int8 >= 3x faster than float eager", st["float eager"] / int8_static, 3.0),
        _target(
            "static int8 >= 2x faster than float AOTInductor (freezing)",
            st["float AOTInductor (freezing)"] / int8_static,
            2.0,
        ),
        f"| smallest static artifact <= 0.35 of float parameter bytes | {smallest / static['float_bytes']:.2f} | "
        f"{'yes' if smallest / static['float_bytes'] <= 0.35 else 'NO'} |",
        _target("dynamic int8 >= 2x faster than float eager", dy["float eager"] / best_dynamic, 2.0),
        *(
            f"| digits accuracy drop <= 1 point, {k.split(' ')[0]} | "
            f"{100 * (v['float'] - min(v['int8 quantized_model'], v['int8 ONNX'])):.2f} | "
            f"{'yes' if v['float'] - min(v['int8 quantized_model'], v['int8 ONNX']) <= 0.01 else 'NO'} |"
            for k, v in digits.items()
        ),
    ]
    return "\n".join(rows) + "\n"


def _target(name: str, ratio: float, needed: float) -> str:
    return f"| {name} | {ratio:.2f}x | {'yes' if ratio >= needed else 'NO'} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and epochs (smoke run)")
    args = parser.parse_args()
    repeats, epochs = (10, 3) if args.quick else (50, 20)
    warnings.filterwarnings("ignore")
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        static = bench_static(scratch, repeats)
        dynamic = bench_dynamic(scratch, repeats)
        digits = bench_digits(scratch, epochs)
    text = report(static, dynamic, digits, repeats, epochs)
    RESULTS.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
