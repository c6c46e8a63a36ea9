"""Reload every artifact in a fresh Python process, run it, compare with the reference, time it.

A fresh process proves the file is self-contained (nothing borrowed from the exporting process's
caches or registrations). It runs ``python -m lightning_quant.export.verify <request>``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence, Union

import torch
from torch.utils._pytree import tree_flatten

from lightning_quant.quantization.inputs import ModelInputs
from lightning_quant.quantization.quantize import QuantizationError


def verify_artifacts(
    artifacts: Sequence[Any],
    reference: Any,
    inputs: Sequence[ModelInputs],
    dirpath: Union[str, Path],
    timing_inputs: ModelInputs | None = None,
    float_model: Any = None,
) -> dict[str, dict[str, Any]]:
    """Compare each artifact's outputs with the quantized ``reference`` on every input; time it.

    Files re-quantized by another library (``artifact.compared_with == "float"``) are compared with
    ``float_model`` instead, with tolerance ``max(artifact.tolerance, 2 * reference's own error vs float)``.

    Returns, per format: ``compared_with``, ``max_abs_error``, ``relative_error`` (max abs error / max abs
    expected output), ``tolerance`` (the one applied), ``relative_error_vs_quantized``, ``batch_sizes``
    checked and ``latency_ms`` (median, in the fresh process, on ``timing_inputs``).

    Raises:
        QuantizationError: an artifact does not load or run, or differs beyond its tolerance.
    """
    if not artifacts:
        return {}
    dirpath = Path(dirpath)
    with torch.no_grad():
        expected = [_tensors(case(reference)) for case in inputs]
        if any(a.compared_with == "float" for a in artifacts):
            if float_model is None:
                raise ValueError("files re-quantized from the float model are verified against it: pass float_model")
            expected_float = [_tensors(case(float_model)) for case in inputs]
            reference_vs_float = _relative_error(expected_float, expected)
    with tempfile.TemporaryDirectory() as scratch:
        request, result = Path(scratch) / "request.pt", Path(scratch) / "result.pt"
        torch.save(
            {
                "artifacts": [(a.format, str(dirpath / a.path)) for a in artifacts],
                "inputs": [tuple(case) for case in inputs],
                "timing_inputs": tuple(timing_inputs or inputs[-1]),
                "threads": torch.get_num_threads(),
                "result": str(result),
            },
            request,
        )
        process = subprocess.run(
            [sys.executable, "-m", "lightning_quant.export.verify", str(request)],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONWARNINGS": "ignore"},
        )
        if process.returncode != 0 or not result.exists():
            raise QuantizationError(
                f"Reloading the exported files in a fresh process failed:\n{process.stderr[-3000:]}"
            )
        outcome = torch.load(result, weights_only=True)
    report = {}
    failures = []
    for artifact in artifacts:
        ran = outcome[artifact.format]
        if "error" in ran:
            failures.append(f"{artifact.format} ({artifact.path}): does not run after reloading: {ran['error']}")
            continue
        shapes = [[tuple(t.shape) for t in case] for case in ran["outputs"]]
        if shapes != [[tuple(t.shape) for t in case] for case in expected]:
            failures.append(f"{artifact.format}: output shapes {shapes} differ from the model's")
            continue
        against_quantized = _relative_error(expected, ran["outputs"])
        if artifact.compared_with == "float":
            relative = _relative_error(expected_float, ran["outputs"])
            tolerance = max(artifact.tolerance, 2 * reference_vs_float)
        else:
            relative, tolerance = against_quantized, artifact.tolerance
        report[artifact.format] = {
            "compared_with": artifact.compared_with,
            "relative_error": relative,
            "tolerance": tolerance,
            "relative_error_vs_quantized": against_quantized,
            "batch_sizes": [case.batch_size() for case in inputs],
            "latency_ms": ran["latency_ms"],
        }
        if relative > tolerance:
            failures.append(f"{artifact.format} ({artifact.path}): relative error {relative:.4f} against the "
                            f"{artifact.compared_with} model exceeds the tolerance {tolerance:.4f}")
    if failures:
        raise QuantizationError("Exported files do not match the quantized model:\n- " + "\n- ".join(failures))
    return report


def _relative_error(expected: list[list[torch.Tensor]], got: list[list[torch.Tensor]]) -> float:
    """max |got - expected| / max |expected| over every output of every case."""
    error = scale = 0.0
    for want_case, got_case in zip(expected, got):
        for want, have in zip(want_case, got_case):
            if want.numel():
                error = max(error, (want.float() - have.float()).abs().max().item())
                scale = max(scale, want.float().abs().max().item())
    return error / max(scale, 1e-12)


def _tensors(output: Any) -> list[torch.Tensor]:
    return [leaf.detach().cpu() for leaf in tree_flatten(output)[0] if isinstance(leaf, torch.Tensor)]


def _main(request_path: str) -> None:
    import lightning_quant.quantization._torchao  # noqa: F401  (torchao tensor types in saved programs)
    from lightning_quant.benchmark import latency_ms
    from lightning_quant.export.api import load_artifact

    request = torch.load(request_path, weights_only=True)
    torch.set_num_threads(request["threads"])
    cases = [ModelInputs(*case) for case in request["inputs"]]
    timing = ModelInputs(*request["timing_inputs"])
    outcome: dict[str, Any] = {}
    # One at a time, ONNX Runtime last: its thread pool and PyTorch's OpenMP threads slow each other
    # down badly when both are busy in one process (an AOTI call went from 0.75 ms to 6.9 ms interleaved).
    for format, path in sorted(request["artifacts"], key=lambda artifact: artifact[0] == "onnx"):
        try:
            model = load_artifact(path, format)
            with torch.no_grad():
                outputs = [_tensors(case(model)) for case in cases]
            outcome[format] = {"outputs": outputs, "latency_ms": latency_ms(model, timing)}
        except Exception as err:  # reported per format by the parent
            outcome[format] = {"error": f"{type(err).__name__}: {str(err)[:2000]}"}
        finally:
            model = None
    torch.save(outcome, request["result"])
    print(json.dumps({k: v.get("latency_ms") for k, v in outcome.items()}))


if __name__ == "__main__":
    _main(sys.argv[1])
