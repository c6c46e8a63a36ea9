"""``"openvino"``: OpenVINO IR (``model_openvino.xml`` + its weights ``model_openvino.bin``) for OpenVINO's CPU
runtime, the fastest int8 runtime measured on these CPUs at real sizes.

The IR is converted from the same ONNX as the ``"onnx"`` format: ONNX Runtime's QDQ quantization of the float model
with the callback's calibration batches (static int8), the converted graph's own quantize/dequantize pairs (QAT),
or the float model (:class:`OptimizeForInference`). OpenVINO turns each quantize/dequantize pair into its int8
kernels, so the int8 scales are ours and no second calibration runs. Measured on ResNet-50 (transformers'
default config, 224x224, batch 1, 2 threads, AVX-512 VNNI EPYC, idle: load 1.6): this file 6.21 ms, the same ONNX
in ONNX Runtime 7.86 ms, OpenVINO + NNCF's own int8 of the float model 6.11 ms (benchmarks/openvino_peer_results.md).

The precision OpenVINO runs the float parts in is the one the file was verified in, written into the IR
(``rt_info``, ``runtime_options/INFERENCE_PRECISION_HINT``) and passed by :func:`load_openvino`: ``f32``, or ``bf16``
for a model that computes in bf16 (``OptimizeForInference`` for a target with native bf16: ResNet-50, batch 1, ran in
10.3 ms as this bf16 IR, 20.2 ms as the f32 IR, 17.1 ms as our bf16 AOTInductor package; 2 threads, AVX-512 BF16
EPYC, load 1.1-1.2, benchmarks/bf16_float_results.md). OpenVINO's own default on CPUs with AVX-512 BF16 or AMX is
bf16 for every file (1.4% off on that ResNet-50's int8 file), so a file verified in f32 must be loaded with f32 asked
for, as :func:`load_openvino` does.
OpenVINO is an optional dependency: ``pip install "lightning-quant[openvino]"``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from lightning_quant.export.onnx import OnnxQuantization, export_onnx
from lightning_quant.inputs import ModelInputs
from lightning_quant.target import TARGETS, CpuTarget

SUFFIX = ".xml"
WEIGHTS_SUFFIX = ".bin"  # OpenVINO writes and reads the weights beside the .xml, under the same stem
# what the model computes in -> OpenVINO's INFERENCE_PRECISION_HINT
PRECISIONS = {"float32": "f32", "bfloat16": "bf16"}
PRECISION_KEY = ["runtime_options", "INFERENCE_PRECISION_HINT"]  # where the IR's rt_info holds it


def _openvino() -> Any:
    try:
        import openvino
    except ImportError as err:
        raise ImportError(
            'The "openvino" format needs OpenVINO: pip install "lightning-quant[openvino]" (or leave "openvino" '
            "out of formats)"
        ) from err
    return openvino


def weights_path(path: Path) -> Path:
    """The ``.bin`` file OpenVINO reads beside the ``.xml`` at ``path``."""
    return Path(path).with_suffix(WEIGHTS_SUFFIX)


def export_openvino(
    model: nn.Module,
    inputs: ModelInputs,
    path: Path,
    dynamic_batch: bool = True,
    quantization: Optional[OnnxQuantization] = None,
    float_model: Optional[nn.Module] = None,
    target: CpuTarget = TARGETS["avx2"],
    source_file: Optional[Path] = None,
    source_details: Optional[dict[str, Any]] = None,
    dtype: str = "float32",
) -> dict[str, Any]:
    """Write ``path`` (``.xml``) and its ``.bin``, converted from the ONNX :func:`export_onnx` makes with the same
    arguments (the int8 weights therefore hold the ``target``'s range), or from ``source_file``, that ONNX file
    already made (with its ``source_details``). Each file is moved into place whole, the weights first, so a reader
    never finds an ``.xml`` without its weights. ``dtype``: what the model computes in; OpenVINO runs the float
    parts in it (the weights stay float32)."""
    if dtype not in PRECISIONS:
        raise ValueError(f"export_openvino(dtype={dtype!r}): use one of {list(PRECISIONS)}")
    ov = _openvino()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".tmp-", dir=path.parent) as scratch:
        if source_file is None:
            source_file = Path(scratch) / "model.onnx"
            source_details = export_onnx(model, inputs, source_file, dynamic_batch, quantization, float_model, target)
        details = dict(source_details or {})
        details.pop("outputs", None)  # export() adds the model's own
        converted = ov.convert_model(str(source_file))
        converted.set_rt_info(PRECISIONS[dtype], PRECISION_KEY)
        staged = Path(scratch) / path.name
        ov.save_model(converted, str(staged), compress_to_fp16=False)  # fp16 weights would change the numbers
        os.replace(weights_path(staged), weights_path(path))
        os.replace(staged, path)
    return {
        **details,
        "how": f"{details['how']} -> openvino.convert_model (int8 kernels from its quantize/dequantize pairs)",
        "weights_file": weights_path(path).name,
        "inference_precision": PRECISIONS[dtype],
        "load": f"openvino.Core().compile_model(path, 'CPU', {{'INFERENCE_PRECISION_HINT': '{PRECISIONS[dtype]}'}})",
        "openvino": ov.__version__,
    }


class OpenVinoRunner:
    """An OpenVINO compiled model called like the model: ``runner(*args, **kwargs)`` -> tensor(s)."""

    def __init__(self, path: Path) -> None:
        ov = _openvino()
        core = ov.Core()
        model = core.read_model(str(path))
        self.precision = inference_precision(model)
        # same thread count as PyTorch, as the ONNX Runtime runner does; latency (not throughput) streams
        self.compiled = core.compile_model(
            model,
            "CPU",
            {
                "INFERENCE_NUM_THREADS": torch.get_num_threads(),
                "PERFORMANCE_HINT": "LATENCY",
                "INFERENCE_PRECISION_HINT": self.precision,
            },
        )
        self.request = self.compiled.create_infer_request()
        self.input_names = [port.get_any_name() for port in self.compiled.inputs]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs and set(kwargs) <= set(self.input_names[len(args) :]):  # keywords by name, in any order
            named = dict(zip(self.input_names, args), **kwargs)
            args, kwargs = tuple(named[name] for name in self.input_names if name in named), {}
        tensors = ModelInputs(args, kwargs).tensors()
        if len(tensors) != len(self.input_names):
            raise ValueError(
                f"the OpenVINO model takes {len(self.input_names)} inputs {self.input_names}, got {len(tensors)} tensors"
            )
        # share_inputs: OpenVINO reads the arrays in place (the call is synchronous) instead of copying them first
        results = self.request.infer([t.detach().cpu().numpy() for t in tensors], share_inputs=True)
        # copies: the request reuses its output buffers on the next call
        outputs = [torch.from_numpy(np.array(results[port])) for port in self.compiled.outputs]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)


def inference_precision(model: Any) -> str:
    """The precision an IR was verified in (its ``rt_info``); ``"f32"`` for IRs written before it was recorded."""
    if model.has_rt_info(PRECISION_KEY):
        precision = str(model.get_rt_info(PRECISION_KEY).astype(str))
        if precision in PRECISIONS.values():
            return precision
    return PRECISIONS["float32"]


def load_openvino(path: Path) -> OpenVinoRunner:
    if not weights_path(path).exists():
        raise FileNotFoundError(f"{path} needs its weights file {weights_path(path)} beside it (copy both)")
    return OpenVinoRunner(path)


def int8_weight_range(path: Path) -> Optional[tuple[int, int]]:
    """The smallest and largest int8 weight in the IR (``None`` without int8 constants)."""
    ov = _openvino()
    low: Optional[int] = None
    high: Optional[int] = None
    for op in ov.Core().read_model(str(path)).get_ordered_ops():
        if op.get_type_name() == "Constant" and op.get_element_type() == ov.Type.i8:
            values = op.get_data()
            if values.size:
                low = int(values.min()) if low is None else min(low, int(values.min()))
                high = int(values.max()) if high is None else max(high, int(values.max()))
    return None if low is None or high is None else (low, high)
