"""``export``: write one verified-to-load file per format; ``load_artifact``: open one to call it."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn
from torch.utils._pytree import tree_map_only

from lightning_quant.capture import CaptureError
from lightning_quant.errors import QuantizationError, first_lines, write_report
from lightning_quant.export.formats import FORMATS, get_format
from lightning_quant.export.onnx import OnnxQuantization
from lightning_quant.files import NO_SPACE, NoSpaceError, sha256
from lightning_quant.inputs import ModelInputs
from lightning_quant.quantization.layers import with_plain_linears
from lightning_quant.target import DEFAULT_TARGET, CpuTarget, resolve_target

ERROR_LOG = "errors.log"  # beside the files: what failed, in full (tracebacks, compiler output, FX graphs)

# Smallest tolerance on the relative error max |file - expected| / max |expected| (see verify_artifacts for
# the tolerance applied). A file holding the same int8 program as the quantized model ("same") must
# reproduce that model's outputs: within this much, or within twice the model's own noise floor (how far
# its outputs move when rounding ties at its quantize ops go the other way), whichever is larger. A file
# another library quantized from the float model ("requantized": ONNX Runtime, legacy torch.ao) has its own
# scales and rounding, so it is compared with the *float* model instead and may deviate from it by this
# much, or by twice as much as the quantized model itself does, whichever is larger.
TOLERANCES = {"same": 0.01, "requantized": 0.1}


@dataclass(frozen=True)
class Artifact:
    """One exported file: ``path`` is relative to the export directory."""

    format: str
    path: str
    bytes: int
    sha256: str
    tolerance: float
    compared_with: str = "quantized"  # "quantized" (the converted model) or "float" (re-quantized files)
    target: str = DEFAULT_TARGET  # the CpuTarget the file was made for
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def export(
    model: nn.Module,
    example_inputs: Any,
    formats: Sequence[str],
    dirpath: Union[str, Path],
    *,
    dynamic_batch: bool = True,
    float_model: Optional[nn.Module] = None,
    onnx_quantization: Optional[OnnxQuantization] = None,
    models: Optional[Mapping[str, nn.Module]] = None,
    target: Union[str, CpuTarget] = DEFAULT_TARGET,
    dtype: str = "float32",
) -> list[Artifact]:
    """Export ``model`` (or ``models[format]`` where given) in every format into ``dirpath``.

    Args:
        model: the quantized model to export (e.g. the PT2E converted graph).
        example_inputs: an input of ``model``: a tensor, tuple of arguments or dict of keywords (put in the
            canonical form of ``model.forward``: positional-or-keyword parameters positionally, keyword-only
            ones by keyword), or a :class:`ModelInputs` taken as given. The files take that same form.
        formats: names from :data:`FORMATS`.
        dirpath: the output directory (created if missing).
        dynamic_batch: accept any batch size (default) or pin the example's.
        float_model: the float model, needed when ``onnx_quantization`` is given.
        onnx_quantization: let ONNX Runtime quantize the float model for ``"onnx"`` (fast in ORT).
        models: a different model for some formats (e.g. a legacy-quantized one for ``"torchscript"``);
            those artifacts, like an ONNX Runtime-quantized ``"onnx"``, are verified against the float model.
        target: the CPUs the files are for (:mod:`lightning_quant.target`): ``"aoti"`` compiles for its ISA,
            ONNX Runtime quantizes weights to its range (7 bits for ``"avx2"``).
        dtype: what ``model`` computes in, ``"float32"`` or ``"bfloat16"``. A format whose runtime picks its
            precision when it loads the file (``"openvino"``, from float32 weights) records it and runs in it.

    Raises:
        ExportError: a format failed (after every format was tried); the message names each failed format,
            the model and the reason; ``error.artifacts`` are the files that were written.
    """
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ValueError(f"Unknown export format(s) {unknown}; choose from {list(FORMATS)}")
    dirpath = Path(dirpath)
    dirpath.mkdir(parents=True, exist_ok=True)
    inputs = (
        example_inputs
        if isinstance(example_inputs, ModelInputs)
        else ModelInputs.from_value(example_inputs).bind(model.forward)
    )
    models = dict(models or {})
    target = resolve_target(target)
    model, output_names = tensor_outputs(model, inputs)
    models = {name: tensor_outputs(source, inputs)[0] for name, source in models.items()}
    if float_model is not None:
        # ONNX Runtime quantizes MatMul nodes whose weight is a constant: transformers' Conv1D exports as Gemm on an
        # [in, out] weight, which its dynamic quantization leaves float; as nn.Linear it is a MatMul
        float_model = tensor_outputs(with_plain_linears(float_model), inputs)[0]
    artifacts = []
    failures: dict[str, str] = {}
    written: dict[str, Artifact] = {}
    # one format failing does not stop the others; a format converted from another's file comes after it
    for name in sorted(formats, key=lambda name: get_format(name).converted_from in formats):
        format = get_format(name)
        filename = format.filename
        source = models.get(name, model)
        kwargs: dict[str, Any] = {"target": target} if format.takes_target else {}
        if format.takes_dtype:
            kwargs["dtype"] = dtype
        requantized = name in models
        if format.from_float_model and onnx_quantization is not None:
            kwargs.update(quantization=onnx_quantization, float_model=float_model)
            requantized = True
        made = written.get(format.converted_from or "")
        if made is not None and models.get(format.converted_from or "", model) is source:
            kwargs.update(source_file=dirpath / made.path, source_details=made.details)  # one export, not two
        try:
            details = format.export(source, inputs, dirpath / filename, dynamic_batch, **kwargs)
        except Exception as err:
            cause = str(err) if isinstance(err, CaptureError) else f"{type(err).__name__}: {first_lines(err, 3)}"
            failures[name] = f"Exporting {type(source).__name__} to {name!r} failed: {cause} {_fix(err)}"
            if not isinstance(err, OSError):  # a full or read-only disk has no room for a report, nor needs one
                failures[name] += f" (full report: {write_report(err, dirpath / ERROR_LOG)})"
            continue
        path = dirpath / filename
        if output_names is not None:
            details = {**details, "outputs": output_names}
        for weights in format.files(path)[1:]:  # checked with the file by load and `lightning-quant inspect`
            details = {**details, "weights_file": weights.name, "weights_sha256": sha256(weights)}
        written[name] = Artifact(
            format=name,
            path=filename,
            bytes=sum(file.stat().st_size for file in format.files(path)),
            sha256=sha256(path),
            tolerance=TOLERANCES["requantized" if requantized else "same"],
            compared_with="float" if requantized else "quantized",
            details=details,
            target=target.name,
        )
        artifacts.append(written[name])
    if failures:
        raise ExportError(artifacts, failures)
    return artifacts


def tensor_outputs(model: nn.Module, inputs: ModelInputs) -> tuple[nn.Module, Optional[list[str]]]:
    """``model`` itself if it returns tensors (one, or a tuple/list of them); else ``model`` wrapped to return the
    tensor fields of its output (a Hugging Face ``ModelOutput``, a dataclass, a dict) as a tuple, or the tensor
    when there is one, with their names. Exported files then load anywhere: an AOTInductor package or program
    that returns a ``ModelOutput`` needs ``transformers`` imported to be read back.

    Example::

        >>> class Classifier(nn.Module):
        ...     def forward(self, x):
        ...         return {"logits": x * 2, "note": "not a tensor"}
        >>> wrapped, names = tensor_outputs(Classifier(), ModelInputs.from_value(torch.zeros(2, 3)))
        >>> names, wrapped(torch.ones(2, 3)).shape
        (['logits'], torch.Size([2, 3]))
    """
    with torch.no_grad():
        output = inputs(model)
    if isinstance(output, torch.Tensor) or (
        isinstance(output, (tuple, list)) and all(isinstance(v, torch.Tensor) for v in output)
    ):
        return model, None
    names = _tensor_fields(output)
    if not names:
        raise TypeError(
            f"{type(model).__name__}.forward returns {type(output).__name__}, which holds no tensor field "
            "to export: return tensors (or a ModelOutput/dataclass/dict of them)"
        )
    return _TensorOutputs(model, names), names


def _tensor_fields(output: Any) -> list[str]:
    if isinstance(output, Mapping):  # dict, and transformers' ModelOutput (an OrderedDict of its set fields)
        return [name for name, value in output.items() if isinstance(value, torch.Tensor)]
    if dataclasses.is_dataclass(output):
        return [f.name for f in dataclasses.fields(output) if isinstance(getattr(output, f.name), torch.Tensor)]
    return []


class _TensorOutputs(nn.Module):
    """Calls ``model`` and returns the named tensor fields of its output (the tensor itself when there is one).
    ``forward`` keeps ``model.forward``'s signature, so inputs bind and export the same way."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.model, self.names = model, list(names)

        @functools.wraps(model.forward)  # inspect.signature(self.forward) is model.forward's
        def forward(*args: Any, **kwargs: Any) -> Any:
            output = model(*args, **kwargs)
            values = [output[name] if isinstance(output, Mapping) else getattr(output, name) for name in names]
            return values[0] if len(values) == 1 else tuple(values)

        self.forward = forward


class ExportError(QuantizationError):
    """Some formats failed. ``artifacts``: the complete files of the others; ``failures``: format -> error."""

    def __init__(self, artifacts: list[Artifact], failures: dict[str, str]) -> None:
        self.artifacts, self.failures = list(artifacts), dict(failures)
        done = f" The other formats were written: {[a.format for a in artifacts]}." if artifacts else ""
        super().__init__("\n".join(failures.values()) + done)


def _fix(err: BaseException) -> str:
    if isinstance(err, NoSpaceError):
        return ""  # its message names the file and the fix already
    if isinstance(err, OSError) and err.errno in NO_SPACE:
        return "No space for the file (full disk, file-size limit or quota): free space or choose another dirpath."
    if isinstance(err, OSError):
        return "Writing the file failed: check that the export directory is writable and has space."
    if isinstance(err, CaptureError):
        return "Or leave this format out of `formats`."
    return "Leave this format out of `formats`, or make the model exportable (torch.export must capture forward)."


def load_artifact(path: Union[str, Path], format: str) -> LoadedFile:
    """Open an exported file as a module taking the model's inputs: ``load_artifact(p, "onnx")(x)``."""
    return LoadedFile(get_format(format).load(Path(path)), format)


class InferenceOnly(nn.Module):
    """A module that only infers: ``train(mode)`` records the flag and reaches no submodule. The modules it calls
    are fixed for inference (an exported program's module even raises on ``train``/``eval``), and user code that
    calls ``.eval()`` or ``.train(False)`` on any model must work."""

    def train(self, mode: bool = True) -> InferenceOnly:
        self.training = mode
        return self


class LoadedFile(InferenceOnly):
    """An exported file, opened: called like the model's ``forward``; ``runtime`` is what runs it (an AOTInductor
    package, an ONNX Runtime session's runner, a program's module...), ``format`` its format.

    Tensor inputs are made contiguous first: an AOTInductor package assumes the strides it was compiled with and
    computes wrong numbers, silently, from a slice (``tokens[:, i:i+1]`` of a batch), a transposed view or a
    channels-last tensor. A contiguous tensor passes as it is."""

    def __init__(self, runtime: Callable[..., Any], format: str) -> None:
        super().__init__()
        self.runtime, self.format = runtime, format

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.runtime(*map(_contiguous, args), **{name: _contiguous(v) for name, v in kwargs.items()})


def _contiguous(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.contiguous()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return tree_map_only(torch.Tensor, torch.Tensor.contiguous, value)  # 40 us even for a lone tensor: only here
