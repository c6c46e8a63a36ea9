"""bf16 float files (issue 30, item 4): what ``OptimizeForInference(dtype="auto")`` ships for a target with native bf16,
beside the float32 files and OpenVINO's own float runs, on ResNet-50 (transformers' default config, random weights).

Rows (ms, fastest call of interleaved rounds, 3 calls a turn, 2 threads): float eager; our float32 AOTInductor package and OpenVINO IR;
our bf16 files as the callback writes them (the AOTInductor package of ``to_bfloat16(model)``, and the float32 IR
recorded to run in bf16); OpenVINO's default compile of the same ONNX (bf16 inside on CPUs with AVX-512 BF16 or AMX).
Error: max |file - float| / max |float| on the input timed. Needs a CPU with native bf16 (``target="avx512_bf16"``)
and the benchmark extra (``pip install -e ".[benchmark]"``)::

    python benchmarks/bench_bf16_float.py            # ~3 minutes on an idle 2-core machine
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
from pathlib import Path

import openvino
import torch

from lightning_quant.export import export, load_artifact
from lightning_quant.precision import to_bfloat16
from lightning_quant.target import cpu_info

RESULTS = Path(__file__).with_name("bf16_float_results.md")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    from bench_openvino_peer import fastest_of_rounds, resnet50  # the same model and timing as the peer table

    torch.set_num_threads(2)
    torch.manual_seed(0)
    model, make_input = resnet50()
    model.eval()
    lines = []
    for batch in args.batches:
        (x,) = make_input(batch)
        with tempfile.TemporaryDirectory() as scratch, torch.no_grad():
            out = Path(scratch)
            float32 = export(model, x, ["aoti", "onnx", "openvino"], out / "f32", target="avx512_bf16")
            bf16 = export(to_bfloat16(copy.deepcopy(model)), x, ["aoti"], out / "bf16", target="avx512_bf16")
            bf16 += export(model, x, ["openvino"], out / "bf16", target="avx512_bf16", dtype="bfloat16")
            onnx = next(a for a in float32 if a.format == "onnx")
            default = openvino.Core().compile_model(
                str(out / "f32" / onnx.path), "CPU", {"INFERENCE_NUM_THREADS": 2, "PERFORMANCE_HINT": "LATENCY"}
            )
            request = default.create_infer_request()
            runs = {"float eager": model}
            runs.update({f"our float32 {a.format}": load_artifact(out / "f32" / a.path, a.format) for a in float32})
            runs.update({f"our bf16 {a.format}": load_artifact(out / "bf16" / a.path, a.format) for a in bf16})
            runs["OpenVINO default compile (bf16 inside)"] = lambda t: torch.from_numpy(
                request.infer([t.numpy()])[default.outputs[0]].copy()
            )
            expected = model(x)
            errors = {name: float((run(x) - expected).abs().max() / expected.abs().max()) for name, run in runs.items()}
            load_before = os.getloadavg()[0]
            best = fastest_of_rounds(runs, (x,), args.rounds)  # ms; 3 calls a turn, so a file never runs cold
            load = f"{load_before:.2f}-{os.getloadavg()[0]:.2f}"
        for name in runs:
            lines.append(
                f"| {batch} | {name} | {best[name]:.2f} | {best['float eager'] / best[name]:.2f}x | "
                f"{errors[name]:.4f} | {load} |"
            )
            print(lines[-1], flush=True)
    info = cpu_info()
    RESULTS.write_text(
        "# bf16 float files beside float32 and OpenVINO (ResNet-50, 224x224)\n\n"
        f"CPU: {info['vendor']} {info['model']}, ISA flags {info['flags']}; 2 threads; torch {torch.__version__}, "
        f"OpenVINO {openvino.__version__}. Written by `benchmarks/bench_bf16_float.py` on "
        f"{time.strftime('%Y-%m-%d')}; load average before-after each batch's rounds in the last column.\n\n"
        "| batch | file | ms | vs float eager | error vs float | load |\n| --- | --- | --- | --- | --- | --- |\n"
        + "\n".join(lines)
        + "\n"
    )


if __name__ == "__main__":
    main()
