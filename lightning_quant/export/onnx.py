"""``"onnx"``: an ONNX file that is fast in ONNX Runtime, not just valid.

A PT2E q/dq graph exported as is maps poorly onto ONNX Runtime's kernels (1.7 ms measured on a small CNN);
ONNX Runtime's own ``quantize_static`` (QDQ, per-channel) applied to the *float* ONNX with the same
calibration batches ran at 0.68 ms. So, given an :class:`OrtStaticQuantization` or
:class:`OrtDynamicQuantization`, the float model is exported and ONNX Runtime quantizes it; without one the
model is exported as it is. The file takes the input tensors, flattened in ``ModelInputs.tensors()`` order.
"""

from __future__ import annotations

import ast
import contextlib
import io
import logging
import re
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import nn

from lightning_quant.capture import capture
from lightning_quant.export.bias_correction import correct_biases
from lightning_quant.files import atomic_path
from lightning_quant.inputs import ModelInputs
from lightning_quant.target import TARGETS, CpuTarget
from lightning_quant.weight_packing import onnx_translations

SUFFIX = ".onnx"
# PyTorch observer name -> ONNX Runtime calibration method and its options
_CALIBRATION: dict[str, tuple[str, dict[str, Any]]] = {
    "minmax": ("MinMax", {}),
    "moving_average": ("MinMax", {"CalibMovingAverage": True}),
    "histogram": ("Percentile", {"CalibPercentile": 99.999}),
}


@dataclass(frozen=True)
class OrtStaticQuantization:
    """ONNX Runtime ``quantize_static`` (QDQ, uint8 activations, int8 weights) on the float ONNX.

    Args:
        calibration_inputs: the real batches to calibrate on (the same ones the PyTorch side used).
        per_channel: one weight scale per output channel.
        observer: ``"minmax"``, ``"moving_average"`` or ``"histogram"`` (ONNX Runtime: percentile 99.999).
        keep_float: module names whose ONNX nodes stay in float.
    """

    calibration_inputs: Sequence[ModelInputs]
    per_channel: bool = True
    observer: str = "minmax"
    keep_float: Sequence[str] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.observer not in _CALIBRATION:
            raise ValueError(f"Unknown observer {self.observer!r}; choose one of {list(_CALIBRATION)}")


@dataclass(frozen=True)
class OrtDynamicQuantization:
    """ONNX Runtime ``quantize_dynamic`` (int8 weights, activations quantized at run time) on the float ONNX."""

    keep_float: Sequence[str] = field(default_factory=tuple)


OnnxQuantization = Union[OrtStaticQuantization, OrtDynamicQuantization]


def export_onnx(
    model: nn.Module,
    inputs: ModelInputs,
    path: Path,
    dynamic_batch: bool = True,
    quantization: Optional[OnnxQuantization] = None,
    float_model: Optional[nn.Module] = None,
    target: CpuTarget = TARGETS["avx2"],
) -> dict[str, Any]:
    if quantization is None:
        with _quiet(), atomic_path(path) as temporary:
            captured = _torch_onnx_export(model, inputs, temporary, dynamic_batch)
        return {
            "how": "torch.onnx.export(dynamo=True) of the quantized model as is",
            "load": "onnxruntime.InferenceSession(path)",
            **captured,
        }
    if float_model is None:
        raise ValueError("ONNX Runtime quantization needs the float model (float_model=...)")
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.calibrate import CalibrationMethod
    from onnxruntime.quantization.shape_inference import quant_pre_process

    # reduce_range: ONNX Runtime's 7-bit weights, which its non-VNNI int8 kernels sum without saturating
    bits = target.weight_bits
    reduce_range = bits == 7
    # scratch files next to the output, ONNX Runtime's own too: a full system temp dir must not fail (or be
    # blamed for) this export
    with _quiet(), tempfile.TemporaryDirectory(prefix=".tmp-", dir=path.parent) as scratch, _temp_dir(scratch):
        float_path, prepared_path = Path(scratch) / "float.onnx", Path(scratch) / "prepared.onnx"
        captured = _torch_onnx_export(float_model, inputs, float_path, dynamic_batch)
        quant_pre_process(str(float_path), str(prepared_path), skip_symbolic_shape=True)
        excluded = nodes_in_modules(prepared_path, quantization.keep_float)
        with atomic_path(path) as temporary:
            if isinstance(quantization, OrtStaticQuantization):
                method, options = _CALIBRATION[quantization.observer]
                batches = same_batch_size(quantization.calibration_inputs)
                quantize_static(
                    str(prepared_path),
                    str(temporary),
                    calibration_data_reader=_CalibrationReader(prepared_path, batches),
                    quant_format=QuantFormat.QDQ,
                    per_channel=quantization.per_channel,
                    activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                    nodes_to_exclude=excluded,
                    calibrate_method=getattr(CalibrationMethod, method),
                    # as PT2E does: layers with weights only; attention's activation x activation products
                    # stay float (int8 there put a demo Transformer's outputs 19% off float)
                    extra_options={**options, "MatMulConstBOnly": True},
                    reduce_range=reduce_range,
                )
                corrected = correct_biases(temporary, prepared_path, batches)
                how = (
                    f"float ONNX -> onnxruntime quantize_static (QDQ, {'per-channel' if quantization.per_channel else 'per-tensor'}"
                    f" {bits}-bit int8 weights, uint8 activations, {method} calibration on "
                    f"{len(batches)} batches; {corrected} biases corrected for their weights' rounding)"
                )
            else:
                quantize_dynamic(
                    str(prepared_path),
                    str(temporary),
                    weight_type=QuantType.QInt8,
                    nodes_to_exclude=excluded,
                    reduce_range=reduce_range,
                )
                how = f"float ONNX -> onnxruntime quantize_dynamic ({bits}-bit int8 weights, dynamic activations)"
    return {"how": how, "nodes_kept_float": len(excluded), "load": "onnxruntime.InferenceSession(path)", **captured}


def _torch_onnx_export(model: nn.Module, inputs: ModelInputs, path: Path, dynamic_batch: bool) -> dict[str, Any]:
    captured = capture(model, inputs, dynamic_batch)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*different number of inputs than the flatten dynamic_shapes")
        program = torch.onnx.export(
            captured.program,
            dynamo=True,
            verbose=False,
            report=False,
            custom_translation_table={**onnx_translations(), **_attention_translations()},
        )
    assert program is not None  # dynamo=True always returns the program
    program.save(str(path))
    return captured.details()


def _attention_translations() -> dict[Any, Any]:
    """``scaled_dot_product_attention`` with a boolean mask, written as torch.onnx writes it for a float mask.

    torch.onnx turns a boolean mask into an additive one (0 where kept, the dtype's *finite* minimum where masked)
    and then guards the softmax with ``Where(IsNaN(w), 0, w)``. With a finite minimum the softmax never returns
    NaN, so the guard changes no output; but it splits the attention pattern that OpenVINO fuses into one kernel
    (measured on BERT-base int8, batch 1: attention 1.6 ms fused, ~3 ms with the guard). Converting the mask
    first, with the same values, writes the float-mask form: no guard."""
    from onnxscript import ir, opset18
    from onnxscript.function_libs.torch_lib.ops.nn import aten_scaled_dot_product_attention

    op: Any = opset18  # its stubs expect TensorProtos; in a translation it is traced with ir values

    def attention(
        query: Any,
        key: Any,
        value: Any,
        attn_mask: Any = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: Optional[float] = None,
        enable_gqa: bool = False,
    ) -> Any:
        if attn_mask is not None and attn_mask.dtype == ir.DataType.BOOL:
            kept = op.Constant(value=ir.tensor(0.0, dtype=query.dtype))
            masked = op.Constant(value=ir.tensor(query.dtype.min, dtype=query.dtype))
            attn_mask = op.Where(attn_mask, kept, masked)
        return aten_scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)

    return {torch.ops.aten.scaled_dot_product_attention.default: attention}


# Loggers that report progress at INFO while we export (Hydra sets the root logger to INFO): the ONNX IR
# passes, onnxscript's optimizer and rewriter, and ONNX Runtime's quantizer, which logs to the root logger.
_QUIET_LOGGERS = {
    "": logging.WARNING,
    "onnx_ir": logging.WARNING,
    "onnxscript": logging.WARNING,
    "onnxscript.optimizer": logging.ERROR,  # "Skipping constant folding for op Split ...": its optimizer's choice
    "onnxruntime": logging.WARNING,
    "torch.onnx": logging.WARNING,
    "torch.onnx._internal.exporter._registration": logging.ERROR,  # "torchvision is not installed"
}
_PRINTED_WARNING = re.compile(r"^\s*(warning|error)\b", re.IGNORECASE)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Raise the exporters' progress loggers to WARNING and capture what ONNX Runtime's calibrator prints
    ("Collecting tensor data and making histogram ...") for the block; restore both afterwards. Printed
    lines that say "Warning"/"Error" are logged as warnings, so nothing real is hidden."""
    levels = {}
    for name, level in _QUIET_LOGGERS.items():
        logger = logging.getLogger(name)
        levels[logger] = logger.level
        if logger.getEffectiveLevel() < level:
            logger.setLevel(level)
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            yield
    finally:
        for logger, level in levels.items():
            logger.setLevel(level)
        for line in printed.getvalue().splitlines():
            if _PRINTED_WARNING.match(line):
                logging.getLogger(__name__).warning(line.strip())


@contextlib.contextmanager
def _temp_dir(directory: str) -> Iterator[None]:
    """Make ``directory`` the default of :mod:`tempfile` for the block: ONNX Runtime's ``quant_pre_process``
    and ``quantize_static`` create their scratch directories there and take no directory argument."""
    saved, tempfile.tempdir = tempfile.tempdir, directory
    try:
        yield
    finally:
        tempfile.tempdir = saved


def same_batch_size(batches: Sequence[ModelInputs]) -> list[ModelInputs]:
    """The batches as large as the first: ONNX Runtime's histogram calibrators stack every batch's
    activations into one array, which fails on a smaller last batch."""
    size = batches[0].batch_size() if batches else None
    return [batch for batch in batches if batch.batch_size() == size]


# ONNX ops that compute elementwise or only move data. ONNX Runtime's QDQ quantizer quantizes such an op's
# output whenever it quantizes the op, so one that feeds a float layer would still hand it int8 input
# (measured: relative error 0.40 when the float layer's input came from a Mul).
_ELEMENTWISE_OPS = frozenset(
    {
        "Abs",
        "Add",
        "Cast",
        "Clip",
        "Div",
        "Elu",
        "Erf",
        "Exp",
        "Flatten",
        "Gelu",
        "HardSigmoid",
        "HardSwish",
        "Identity",
        "LeakyRelu",
        "Max",
        "Min",
        "Mul",
        "Neg",
        "Pow",
        "Relu",
        "Reshape",
        "Sigmoid",
        "Softplus",
        "Sqrt",
        "Squeeze",
        "Sub",
        "Tanh",
        "Transpose",
        "Unsqueeze",
        "Where",
    }
)


def nodes_in_modules(path: Path, module_names: Sequence[str]) -> list[str]:
    """Names of the ONNX nodes the dynamo exporter attributes to any of ``module_names``, plus the elementwise
    nodes (:data:`_ELEMENTWISE_OPS`) whose outputs feed only such nodes: the float layers' inputs stay float."""
    if not module_names:
        return []
    import onnx

    wanted = set(module_names)
    graph = onnx.load(str(path), load_external_data=False).graph
    excluded = set()
    consumers: dict[str, list[str]] = {}
    for node in graph.node:
        for prop in node.metadata_props:
            if prop.key == "pkg.torch.onnx.name_scopes" and wanted & set(ast.literal_eval(prop.value)):
                excluded.add(node.name)
        for name in node.input:
            consumers.setdefault(name, []).append(node.name)
    graph_outputs = {output.name for output in graph.output}
    grown = True
    while grown:  # walk back from the float layers through chains of elementwise ops
        grown = False
        for node in graph.node:
            if node.name in excluded or node.op_type not in _ELEMENTWISE_OPS or graph_outputs & set(node.output):
                continue
            fed = [consumer for output in node.output for consumer in consumers.get(output, [])]
            if fed and all(consumer in excluded for consumer in fed):
                excluded.add(node.name)
                grown = True
    return [node.name for node in graph.node if node.name in excluded]


class _CalibrationReader:
    """Feeds the calibration batches to ONNX Runtime by input name (the ``CalibrationDataReader`` protocol)."""

    def __init__(self, path: Path, batches: Sequence[ModelInputs]) -> None:
        import onnxruntime

        self._names = [i.name for i in onnxruntime.InferenceSession(str(path)).get_inputs()]
        self._batches: Iterator[ModelInputs] = iter(batches)

    def get_next(self) -> Optional[dict[str, np.ndarray]]:
        batch = next(self._batches, None)
        return None if batch is None else onnx_feed(self._names, batch)

    def rewind(self) -> None:  # pragma: no cover - used by ORT's multi-pass calibrators only
        raise NotImplementedError

    def set_range(self, start_index: int, end_index: int) -> None:  # pragma: no cover
        raise NotImplementedError


def onnx_feed(names: Sequence[str], inputs: ModelInputs) -> dict[str, np.ndarray]:
    tensors = inputs.tensors()
    if len(tensors) != len(names):
        raise ValueError(f"the ONNX model takes {len(names)} inputs {list(names)}, got {len(tensors)} tensors")
    return {name: tensor.detach().cpu().numpy() for name, tensor in zip(names, tensors)}


class OnnxRunner:
    """An ONNX Runtime session called like the model: ``runner(*args, **kwargs)`` -> tensor(s)."""

    def __init__(self, path: Path) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        # no busy-waiting between calls: spinning ORT threads slow PyTorch's threads in the same process (and
        # any other process) down; measured no slower alone on the digits conv net (0.57 vs 0.59 ms)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs and set(kwargs) <= set(self.input_names[len(args) :]):  # keywords by name, in any order
            named = dict(zip(self.input_names, args), **kwargs)
            args, kwargs = tuple(named[name] for name in self.input_names if name in named), {}
        outputs = self.session.run(None, onnx_feed(self.input_names, ModelInputs(args, kwargs)))
        tensors = [torch.from_numpy(np.asarray(o)) for o in outputs]
        return tensors[0] if len(tensors) == 1 else tuple(tensors)


def load_onnx(path: Path) -> OnnxRunner:
    return OnnxRunner(path)


def int8_weight_range(path: Path) -> Optional[tuple[int, int]]:
    """Smallest and largest value of the ONNX file's int8 initializers (its int8 weights and their zero points);
    ``None`` when it has none."""
    import onnx
    from onnx import numpy_helper

    low: Optional[int] = None
    high: Optional[int] = None
    for tensor in onnx.load(str(path)).graph.initializer:
        if tensor.data_type == onnx.TensorProto.INT8:
            values = numpy_helper.to_array(tensor)
            if values.size:
                low = int(values.min()) if low is None else min(low, int(values.min()))
                high = int(values.max()) if high is None else max(high, int(values.max()))
    return None if low is None or high is None else (low, high)
