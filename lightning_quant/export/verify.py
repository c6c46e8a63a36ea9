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
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from lightning_quant.errors import QuantizationError
from lightning_quant.export.formats import get_format
from lightning_quant.inputs import ModelInputs, check_finite, finite, tensors_in
from lightning_quant.target import DEFAULT_TARGET, CpuTarget, cpu_info, emulates_narrower_isa, resolve_target


def verify_artifacts(
    artifacts: Sequence[Any],
    reference: Any,
    inputs: Sequence[ModelInputs],
    dirpath: Union[str, Path],
    timing_inputs: ModelInputs | None = None,
    float_model: Any = None,
    target: Union[str, CpuTarget] = DEFAULT_TARGET,
    data_cases: Optional[Sequence[int]] = None,
) -> dict[str, dict[str, Any]]:
    """Compare each artifact's outputs with the quantized ``reference`` on every input; time it.

    A file running the same int8 program as ``reference`` may still differ from it by a few quantization
    levels: another runtime sums in another order, and a value within float rounding of a tie between two
    levels can round either way. How far that moves the output depends on the model (one level of an
    untrained model's small activations can be several percent of its output), so the tolerance is
    ``max(artifact.tolerance, 2 * noise floor)``, where the noise floor is how far the reference's own output
    moves when the inputs of its quantize ops get :data:`TIE_NOISE` relative noise (:func:`rounding_noise_floor`).
    A miscompile or wrong weights move the output far more than that.
    Files re-quantized by another library (``artifact.compared_with == "float"``) are compared with
    ``float_model`` instead, with tolerance ``max(artifact.tolerance, 2 * reference's own error vs float)``, on
    the cases listed in ``data_cases`` (indices into ``inputs``; default all): another library's scales are only
    comparable on data like the calibration data, and an example input is often synthetic (an all-zero
    ``example_input_array`` put ONNX Runtime's int8 ResNet 25% off float, real batches 1-3%). Every case must
    still run with the right output shapes.

    Files are run on this CPU and, where it is wider than ``target`` (e.g. VNNI for ``"avx2"``), again with
    oneDNN limited to the target's ISA (``ONEDNN_MAX_CPU_ISA``); the worst run counts. An ONNX file must also
    hold its int8 weights within the target's range (ONNX Runtime's kernels have no ISA switch to test with).

    Returns, per format: ``checked_on`` (CPU, flags, runs), ``int8_weight_range`` (ONNX), ``compared_with``,
    ``relative_error`` (max abs error / max abs expected output),
    ``tolerance`` (the one applied), ``tolerance_rule`` (how it was derived, with the numbers),
    ``relative_error_vs_quantized``, ``batch_sizes`` checked and ``latency_ms`` (median, in the fresh
    process, on ``timing_inputs``; ``None`` without them).

    Raises:
        QuantizationError: an artifact does not load or run, or differs beyond its tolerance.
    """
    if not artifacts:
        return {}
    for index, case in enumerate(inputs):
        check_finite(case, f"verification input {index}")
    dirpath = Path(dirpath)
    with torch.no_grad():
        expected = [_tensors(case(reference)) for case in inputs]
    not_finite = [index for index, outputs in enumerate(expected) if not finite(outputs)]
    if not_finite:
        raise QuantizationError(
            f"The model the files are checked against outputs NaN or inf on verification input(s) {not_finite}: "
            "no file can be verified. Check the float model on that input; for int8, the calibration data and "
            "keep_float (a layer whose activations overflow its range)."
        )
    with torch.no_grad():
        if any(a.compared_with == "float" for a in artifacts):
            if float_model is None:
                raise ValueError("files re-quantized from the float model are verified against it: pass float_model")
            on_data = list(range(len(inputs))) if data_cases is None else list(data_cases)
            expected_float = [_tensors(inputs[i](float_model)) for i in on_data]
            reference_vs_float = _relative_error(expected_float, [expected[i] for i in on_data])
        if any(a.compared_with == "quantized" for a in artifacts):
            noise_floor = rounding_noise_floor(reference, inputs, expected)
    target = resolve_target(target)
    # On a CPU wider than the target (VNNI for an "avx2" file), oneDNN's kernels for the target are not the ones
    # running here: run the PyTorch files again with oneDNN limited to the target's ISA. ONNX Runtime has no such
    # switch; its files are checked for the target's weight range instead (what makes its kernels exact).
    narrower = [a for a in artifacts if get_format(a.format).onednn_isa_switch] if emulates_narrower_isa(target) else []
    runs = [(artifacts, {}), *([(narrower, {"ONEDNN_MAX_CPU_ISA": target.onednn_isa})] if narrower else [])]
    outcome, emulated = (*_run_fresh(runs, inputs, timing_inputs, dirpath), {})[:2]
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
        outputs = {"this CPU": ran["outputs"]}
        if artifact.format in emulated:
            if "error" in emulated[artifact.format]:
                failures.append(
                    f"{artifact.format} ({artifact.path}): does not run with oneDNN limited to "
                    f"{target.onednn_isa}: {emulated[artifact.format]['error']}"
                )
                continue
            outputs[f"ONEDNN_MAX_CPU_ISA={target.onednn_isa}"] = emulated[artifact.format]["outputs"]
        nan_runs = [run for run, got in outputs.items() if not all(finite(case) for case in got)]
        if nan_runs:
            failures.append(f"{artifact.format} ({artifact.path}): outputs NaN or inf (runs {nan_runs})")
            continue
        weight_range_of = get_format(artifact.format).int8_weight_range
        weight_range = weight_range_of(dirpath / artifact.path) if weight_range_of is not None else None
        against_quantized = _worst(_relative_error(expected, got) for got in outputs.values())
        if artifact.compared_with == "float":
            relative = _worst(_relative_error(expected_float, [got[i] for i in on_data]) for got in outputs.values())
            tolerance = max(artifact.tolerance, 2 * reference_vs_float)
            rule = (
                f"max({artifact.tolerance:g}, 2 x {reference_vs_float:.4g}): twice the quantized model's own "
                "relative error against the float model, at least the re-quantized minimum"
            )
        else:
            relative = against_quantized
            tolerance = max(artifact.tolerance, 2 * noise_floor)
            rule = (
                f"max({artifact.tolerance:g}, 2 x {noise_floor:.4g}): twice the noise floor (the quantized model's "
                f"relative output change when the inputs of its quantize ops get {TIE_NOISE:g} relative noise, "
                "i.e. rounding ties resolved the other way), at least the same-program minimum"
            )
        report[artifact.format] = {
            "compared_with": artifact.compared_with,
            "relative_error": relative,
            "tolerance": tolerance,
            "tolerance_rule": rule,
            "relative_error_vs_quantized": against_quantized,
            "batch_sizes": [case.batch_size() for case in inputs],
            "checked_on": {"cpu": cpu_info()["model"], "cpu_flags": cpu_info()["flags"], "runs": list(outputs)},
            "latency_ms": ran["latency_ms"],
        }
        if weight_range is not None:
            report[artifact.format]["int8_weight_range"] = list(weight_range)
        if not relative <= tolerance:  # NaN compares false: a NaN error fails
            failures.append(
                f"{artifact.format} ({artifact.path}): relative error {relative:.4f} against the "
                f"{artifact.compared_with} model exceeds the tolerance {tolerance:.4f} "
                f"(worst of runs {list(outputs)})"
            )
        if weight_range is not None and not _fits(weight_range, target):
            failures.append(
                f"{artifact.format} ({artifact.path}): int8 weights span {list(weight_range)}, outside "
                f"the {target.weight_bits}-bit range target {target.name!r} needs "
                f"(|w| <= {-target.weight_range[0]}): CPUs without VNNI would saturate"
            )
    if failures:
        raise QuantizationError("Exported files do not match the quantized model:\n- " + "\n- ".join(failures))
    return report


# Relative noise put on the inputs of the reference's quantize ops to find its rounding-tie sensitivity: far
# above float32 rounding (~6e-8), so every tie another summation order could flip is flipped by some trial,
# and far below a real difference (a wrong weight or a miscompiled kernel changes values by percents).
TIE_NOISE = 1e-5
# Trials whose worst change is the floor. A tie another runtime flips is one more draw from the same spread, so the
# floor must be a high quantile of it: with 3 trials, a BERT whose AOTI dynamic-int8 file flipped one tie deep in
# its attention read 0.0107 against a floor under 0.005 in one CI run (over 12 untrained seeds here, at most 0.54 of
# 2 x the 3-trial floor): the max of 3 draws is exceeded by a 4th one time in 4, of 8 one time in 9. 8 trials cost
# 8 eager calls per verification input.
_NOISE_TRIALS = 8
_QUANTIZE_OPS = (
    "quantized_decomposed.quantize_per_tensor",
    "quantized_decomposed.quantize_per_channel",
    "torchao.quantize_affine",
)


def rounding_noise_floor(
    reference: Any, inputs: Sequence[ModelInputs], expected: Optional[list[list[torch.Tensor]]] = None
) -> float:
    """How far ``reference``'s outputs move (relative error, max over a few seeded trials) when every input of
    its quantize ops is multiplied by ``1 + TIE_NOISE * N(0, 1)``: its sensitivity to rounding ties.
    0.0 for a model without such ops (nothing rounds to a grid, or the grid is hidden in a tensor subclass)."""
    with torch.no_grad():
        if expected is None:
            expected = [_tensors(case(reference)) for case in inputs]
        floor = 0.0
        for seed in range(_NOISE_TRIALS):
            mode = _QuantizeInputNoise(torch.Generator().manual_seed(seed))
            with mode:
                noisy = [_tensors(case(reference)) for case in inputs]
            if not mode.calls:
                return 0.0
            floor = max(floor, _relative_error(expected, noisy))
    return floor


class _QuantizeInputNoise(TorchFunctionMode):
    def __init__(self, generator: torch.Generator) -> None:
        super().__init__()
        self.generator, self.calls = generator, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (
            args
            and isinstance(args[0], torch.Tensor)
            and args[0].is_floating_point()
            and (str(func).startswith(_QUANTIZE_OPS) or _quantizes_its_input(func, args))
        ):
            self.calls += 1
            x = args[0]
            noise = torch.randn(x.shape, generator=self.generator, dtype=torch.float32).to(x.dtype)
            args = (x + x * TIE_NOISE * noise, *args[1:])
        return func(*args, **kwargs)


def _quantizes_its_input(func: Any, args: tuple[Any, ...]) -> bool:
    """A linear whose weight is a quantized tensor subclass (torchao's dynamic int8): it quantizes its input
    inside the subclass, out of sight of the quantize ops above."""
    return (
        func is torch.nn.functional.linear
        and len(args) > 1
        and isinstance(args[1], torch.Tensor)
        and (type(args[1]) not in (torch.Tensor, nn.Parameter))
    )


def _run_fresh(
    runs: Sequence[tuple[Sequence[Any], dict[str, str]]],
    inputs: Sequence[ModelInputs],
    timing_inputs: Optional[ModelInputs],
    dirpath: Path,
) -> list[dict[str, Any]]:
    """Load and run each run's artifacts in a fresh Python process (with its environment variables added); per
    run and format its ``outputs`` and ``latency_ms`` (first run only, ``None`` without ``timing_inputs``), or
    its ``error``. Without timing the processes run at once (each only computes outputs); with it, one by one,
    so nothing else runs while the first is timed."""
    with tempfile.TemporaryDirectory() as scratch:
        results, started, outcomes = [], [], []
        for index, (artifacts, env) in enumerate(runs):
            request, result = Path(scratch) / f"request{index}.pt", Path(scratch) / f"result{index}.pt"
            torch.save(
                {
                    "artifacts": [(a.format, str(dirpath / a.path)) for a in artifacts],
                    "inputs": [tuple(case) for case in inputs],
                    "timing_inputs": tuple(timing_inputs) if timing_inputs is not None and index == 0 else None,
                    "threads": torch.get_num_threads(),
                    "result": str(result),
                },
                request,
            )
            process = subprocess.Popen(
                [sys.executable, "-m", "lightning_quant.export.verify", str(request)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env={**os.environ, "PYTHONWARNINGS": "ignore", **env},
            )
            if timing_inputs is not None:
                process.communicate()
            results.append(result)
            started.append((process, env))
        for (process, env), result in zip(started, results):
            _, stderr = process.communicate()
            if process.returncode != 0 or not result.exists():
                where = f" (with {env})" if env else ""
                raise QuantizationError(
                    f"Reloading the exported files in a fresh process{where} failed:\n{stderr[-3000:]}"
                )
            outcomes.append(torch.load(result, weights_only=True))
        return outcomes


def _fits(weight_range: tuple[int, int], target: CpuTarget) -> bool:
    """Weights within the target's magnitude bound (ONNX Runtime's 7-bit weights are symmetric [-64, 64]: a pair
    of products 2 x 255 x 64 still fits int16)."""
    bound = -target.weight_range[0]
    return -bound <= weight_range[0] and weight_range[1] <= bound


def _relative_error(expected: list[list[torch.Tensor]], got: list[list[torch.Tensor]]) -> float:
    """max |got - expected| / max |expected| over every output of every case; NaN if any difference is NaN (tensor
    ``max`` propagates NaN, Python's ``max`` drops it)."""
    pairs = [(want.float(), have.float()) for wants, haves in zip(expected, got) for want, have in zip(wants, haves)]
    pairs = [(want, have) for want, have in pairs if want.numel()]
    if not pairs:
        return 0.0
    error = torch.stack([(want - have).abs().max() for want, have in pairs]).max()
    scale = torch.stack([want.abs().max() for want, _ in pairs]).max()
    return float(error / scale.clamp_min(1e-12))


def _worst(errors: Iterable[float]) -> float:
    """The largest error, NaN if any is NaN (Python's ``max`` keeps whichever came first)."""
    return float(torch.tensor(list(errors)).max())


def _tensors(output: Any) -> list[torch.Tensor]:
    return [t.detach().cpu() for t in tensors_in(output)]


def _main(request_path: str) -> None:
    from lightning_quant.benchmark import latency_ms
    from lightning_quant.export.api import load_artifact

    request = torch.load(request_path, weights_only=True)
    torch.set_num_threads(request["threads"])
    cases = [ModelInputs(*case) for case in request["inputs"]]
    timing = ModelInputs(*request["timing_inputs"]) if request["timing_inputs"] is not None else None
    outcome: dict[str, Any] = {}
    model: Any = None
    # One at a time, ONNX Runtime and OpenVINO last: their thread pools and PyTorch's OpenMP threads slow each other
    # down badly when both are busy in one process (an AOTI call went from 0.75 ms to 6.9 ms interleaved).
    for format, path in sorted(request["artifacts"], key=lambda artifact: get_format(artifact[0]).runs_in_own_threads):
        try:
            model = load_artifact(path, format)
            with torch.no_grad():
                outputs = [_tensors(case(model)) for case in cases]
            outcome[format] = {"outputs": outputs, "latency_ms": latency_ms(model, timing) if timing else None}
        except Exception as err:  # reported per format by the parent
            outcome[format] = {"error": f"{type(err).__name__}: {str(err)[:2000]}"}
        finally:
            model = None
    torch.save(outcome, request["result"])
    print(json.dumps({k: v.get("latency_ms") for k, v in outcome.items()}))


if __name__ == "__main__":
    _main(sys.argv[1])
