"""The one pipeline, free of Lightning: a converted model -> files -> verification -> timing -> ``manifest.json``.

:func:`deploy` is the whole job for a plain PyTorch model: quantize it (the config's type says how), export
every format, reload and compare each file in a fresh process, time the files against the float model, and
write the manifest that :func:`lightning_quant.load` reads. :func:`ship` is the part after conversion, which
the Lightning callbacks call at fit end with the model they converted and their own evaluation.

Example::

    >>> import tempfile, torch
    >>> from lightning_quant import deploy, load
    >>> from lightning_quant.demo import MLPNet
    >>> from lightning_quant.quantization import DynamicQuantConfig
    >>> folder = tempfile.mkdtemp()
    >>> deployment = deploy(MLPNet().eval(), DynamicQuantConfig(), torch.rand(4, 1, 8, 8), dirpath=folder,
    ...                     formats=["torch_export"])
    >>> deployment.manifest["approach"], [a["format"] for a in deployment.manifest["artifacts"]]
    ('dynamic', ['torch_export'])
    >>> deployment.model(torch.rand(3, 1, 8, 8)).shape  # called like forward, at any batch size
    torch.Size([3, 10])
    >>> load(folder)(torch.rand(5, 1, 8, 8)).shape  # the file, checked against the manifest, without this process's model
    torch.Size([5, 10])
"""

from __future__ import annotations

import copy
import inspect
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from lightning_quant.benchmark import measure_speed, model_bytes
from lightning_quant.checks import (
    check_example,
    check_formats,
    check_keep_float_names,
    check_same_call,
    check_target,
    check_writable,
)
from lightning_quant.errors import QuantizationError, first_lines, write_report
from lightning_quant.export import (
    Artifact,
    ExportError,
    OnnxQuantization,
    OrtDynamicQuantization,
    OrtStaticQuantization,
    export,
    load_artifact,
    verify_artifacts,
)
from lightning_quant.export.api import ERROR_LOG, InferenceOnly
from lightning_quant.inputs import ModelInputs, check_finite, example_inputs_for_export
from lightning_quant.manifest import FILENAME, build_manifest, failed_manifest, write_manifest
from lightning_quant.quantization import count_quantized_ops, quantize
from lightning_quant.quantization.config import DynamicQuantConfig, StaticQuantConfig
from lightning_quant.quantization.layer_report import layer_report
from lightning_quant.quantization.qat import QATGraph
from lightning_quant.quantization.weight_only import WeightOnlyConfig
from lightning_quant.run_folder import claimed, destination, finish, moved, run_files
from lightning_quant.target import DEFAULT_TARGET, check_target_name, resolve_target

NO_EVALUATION = {"float": {}, "quantized": {}, "note": "no evaluation data: nothing to evaluate"}

_PT2E = ("aoti", "onnx", "openvino", "torch_export")
# config type -> (approach, backend, default formats, supported formats, as the callbacks of that approach have
# them); ``None`` is the float model itself, exported for inference. "openvino" is a default only where OpenVINO is
# installed (an optional extra).
_APPROACHES: dict[Any, tuple[str, str, tuple[str, ...], tuple[str, ...]]] = {
    StaticQuantConfig: ("static", "x86_inductor", ("aoti", "onnx", "openvino"), _PT2E),
    DynamicQuantConfig: (
        "dynamic",
        "x86 (torchao int8 dynamic Linear; legacy torch.ao int8 dynamic LSTM/GRU)",
        ("aoti", "onnx"),
        # not "openvino": OpenVINO turns ONNX Runtime's dynamic int8 MatMuls back into float weights
        ("aoti", "onnx", "torch_export", "torchscript"),
    ),
    # ONNX Runtime's MatMulNBits runs the packed weights; the .pt2 program is the compact portable form
    WeightOnlyConfig: (
        "weight_only",
        "ONNX Runtime MatMulNBits (packed int4/int8 weights, float compute)",
        ("onnx", "torch_export"),
        ("aoti", "onnx", "torch_export", "torchao"),
    ),
    # a QAT-trained graph (prepare_qat, then training): converted with the ranges it learned
    QATGraph: ("qat", "x86_inductor", ("aoti", "onnx", "openvino"), _PT2E),
    type(None): ("float", "float (AOTInductor with freezing; ONNX Runtime; OpenVINO)", _PT2E, _PT2E),
}


class DeploymentError(QuantizationError):
    """A run that produced nothing: ``manifest`` is the ``status: "failed"`` manifest written beside ``errors.log``."""

    def __init__(self, message: str, manifest: dict[str, Any]) -> None:
        super().__init__(message)
        self.manifest = manifest


@dataclass(frozen=True)
class Run:
    """Who ships which model where: what every error and manifest of one run names. ``owner``: ``"deploy"`` or the
    callback's class name; ``float_checkpoint``: where the trained float weights are safe, if on disk; ``staging``:
    the folder inside ``dirpath`` the run writes into until it succeeds (:mod:`lightning_quant.run_folder`;
    ``None``: straight into ``dirpath``)."""

    owner: str
    dirpath: Path
    approach: str
    backend: str
    model_name: str
    float_checkpoint: Optional[str] = None
    staging: Optional[Path] = None


@dataclass
class Deployment:
    """What :func:`ship` made: the manifest (also in ``dirpath/manifest.json``), ``model`` (calls run the fastest
    verified file, with the float model's inputs and output structure) and ``failures`` (formats that could not be
    exported or verified, and why)."""

    manifest: dict[str, Any]
    model: InferenceModel
    dirpath: Path
    failures: dict[str, str] = field(default_factory=dict)


def deploy(
    model: nn.Module,
    config: Union[StaticQuantConfig, DynamicQuantConfig, WeightOnlyConfig, QATGraph, None],
    example_inputs: Any,
    calibration_data: Optional[Iterable[Any]] = None,
    *,
    dirpath: Union[str, Path],
    formats: Optional[Sequence[str]] = None,
    dynamic_batch: bool = True,
    target: Optional[str] = None,
) -> Deployment:
    """Quantize ``model`` by ``config`` and ship it into ``dirpath``: verified files and ``manifest.json``.

    Every argument is checked before any work, as the callbacks check theirs (formats, target and this CPU,
    ``keep_float`` names, the example input and calibration batches).

    Args:
        model: the float model (switched to eval mode, otherwise not modified).
        config: :class:`~lightning_quant.quantization.StaticQuantConfig` (needs ``calibration_data``),
            :class:`~lightning_quant.quantization.DynamicQuantConfig`,
            :class:`~lightning_quant.quantization.WeightOnlyConfig` (int4/int8 weights of Linear layers), the
            :class:`~lightning_quant.quantization.qat.QATGraph` that trained ``model`` (``prepare_qat``, then
            training: converted with its ranges; ``model`` may stay attached to it, the float model is a copy
            without the fake-quant graph), or ``None`` to export the float model itself for inference.
        example_inputs: an input of ``model.forward``: a tensor, a tuple of arguments or a dict of keywords (a
            batch of 2 or more: export treats a dimension of size 1 as a constant).
        calibration_data: static, and weight-only with ``method`` ``"clip"``/``"gptq"``: real input batches, each
            the call the example is (any batch size).
        dirpath: where the files and ``manifest.json`` go.
        formats: from ``"aoti"``, ``"onnx"``, ``"openvino"`` (OpenVINO IR, with the ``openvino`` extra),
            ``"torch_export"``, ``"torchscript"``, ``"torchao"`` (weight-only); default ``aoti``, ``onnx`` and, where
            OpenVINO is installed, ``openvino`` (float: also ``torch_export``; dynamic: ``aoti`` and ``onnx``, no
            ``openvino``;
            weight-only: ``onnx`` and ``torch_export``).
            A listed format that fails is an error; of the default ones, what verified ships, with a warning.
        dynamic_batch: files take any batch size; ``False`` pins the example's.
        target: the CPUs the files are for (:mod:`lightning_quant.target`). Default: the config's ``target``
            (``"avx2"`` for configs without one); a different one than the config's is refused (one target source).

    Raises:
        QuantizationError: quantization, or every format, failed (``manifest.json`` and ``errors.log`` say why);
            or some of the formats listed in ``formats`` failed, after the others were written and verified.
    """
    if type(config) not in _APPROACHES:
        raise TypeError(
            "config must be a WeightOnlyConfig, a trained QATGraph, a StaticQuantConfig, a DynamicQuantConfig or "
            f"None (float), got {type(config).__name__}"
        )
    if isinstance(config, QATGraph) and config.model is not model:
        raise ValueError("the QATGraph was prepared from another model: pass the model it trained (qat.model) with it")
    approach, backend, default_formats, supported = _APPROACHES[type(config)]
    chosen = check_formats(formats, supported, default_formats, "deploy")
    target = _one_target(config, target)
    check_target(target, "deploy")
    started = time.perf_counter()
    float_model = model.eval() if "forward" not in vars(model) else float_copy(model).eval()
    forward = own_forward(model)
    inputs = example_inputs_for_export(example_inputs, forward)
    check_example(float_model, inputs, "deploy", "example_inputs=")
    check_keep_float_names(model, getattr(config, "keep_float", ()), "deploy")
    calibration = _calibration_batches(calibration_data, forward, inputs)
    if isinstance(config, StaticQuantConfig) and not calibration:
        raise ValueError(
            "static int8 needs calibration_data: a few dozen real input batches (the form "
            "example_inputs has) to measure activation ranges on"
        )
    if isinstance(config, WeightOnlyConfig) and config.needs_calibration and not calibration:
        raise ValueError(
            f"WeightOnlyConfig(method={config.method!r}) needs calibration_data: real input batches (the form "
            "example_inputs has) whose Linear inputs choose the weights; method='rtn' needs none"
        )
    dirpath = Path(dirpath)
    check_writable(dirpath, "deploy")
    with claimed(dirpath, "deploy") as staging:
        run = Run("deploy", dirpath, approach, backend, type(model).__name__, staging=staging)
        try:
            with torch.no_grad():
                reference = convert(model, config, inputs, calibration)
        except Exception as err:
            raise failure(err, run) from err
        deployment = ship(
            reference,
            float_model,
            inputs,
            chosen,
            run,
            timing_inputs=calibration[0] if calibration else None,
            dynamic_batch=dynamic_batch,
            target=target,
            onnx_quantization=ort_quantization(config, calibration),
            keep_float=getattr(config, "keep_float", ()),
            config=config,
            details={"bits": config.bits, "group_size": config.group_size, "method": config.method}
            if isinstance(config, WeightOnlyConfig)
            else None,
            started=started,
        )
    raise_failures(deployment, run, formats_listed=formats is not None)
    return deployment


def _one_target(config: Any, target: Optional[str]) -> str:
    """The one target of a deploy: ``target`` or the config's (they must agree: the config makes the int8 weights
    for its target, deploy the files)."""
    configured = getattr(config, "target", None)
    if target is not None:
        check_target_name(target)
    if target is not None and configured is not None and target != configured:
        raise ValueError(
            f"deploy(target={target!r}) and {type(config).__name__}(target={configured!r}) disagree: the config "
            f"makes the int8 weights for its target and deploy the files, so they must name one. Set it once, in "
            f"the config: {type(config).__name__}(..., target={target!r}), and leave deploy's target out."
        )
    return target or configured or DEFAULT_TARGET


def _calibration_batches(
    data: Optional[Iterable[Any]], forward: Callable[..., Any], example: ModelInputs
) -> list[ModelInputs]:
    """``data`` as calls of ``forward``, each checked: it binds, is the call ``example`` is, holds no NaN/inf."""
    batches = []
    for index, batch in enumerate(data or ()):
        what = f"deploy: calibration_data[{index}]"
        try:
            inputs = ModelInputs.from_value(batch).bind(forward)
        except TypeError as err:
            raise ValueError(
                f"{what} does not fit {forward.__qualname__}: {err}. Pass batches of what forward "
                "takes, as example_inputs."
            ) from err
        check_same_call(inputs, example, what)
        check_finite(inputs, what)
        batches.append(inputs.to("cpu"))
    return batches


def convert(
    model: nn.Module,
    config: Union[StaticQuantConfig, DynamicQuantConfig, WeightOnlyConfig, QATGraph, None],
    inputs: ModelInputs,
    calibration: Sequence[ModelInputs] = (),
) -> nn.Module:
    """The model :func:`deploy` exports for ``config``: ``model`` itself for ``None`` (float), the converted graph
    of a trained ``QATGraph``, else the quantized copy (:func:`~lightning_quant.quantization.quantize`;
    ``calibration`` is read by static int8 only)."""
    if config is None:
        return model
    if isinstance(config, QATGraph):
        return config.convert()
    return quantize(model, config, inputs, calibration)


def own_forward(model: nn.Module) -> Callable[..., Any]:
    """``model``'s own ``forward`` (its class's), not one set on the instance such as an attached QAT graph."""
    return type(model).forward.__get__(model)


def float_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` that computes with its class's own ``forward``: a ``forward`` set on the instance
    (an attached QAT graph) is neither copied nor kept."""
    override = vars(model).get("forward")
    copied = copy.deepcopy(model, {} if override is None else {id(override): None})
    vars(copied).pop("forward", None)
    return copied


def ort_quantization(config: Any, calibration: Sequence[ModelInputs] = ()) -> Optional[OnnxQuantization]:
    """How the ``"onnx"`` file of ``config`` is made: ONNX Runtime's own quantization of the float model for static
    (on ``calibration``) and dynamic int8, whose QDQ placement is what runs fast there; ``None`` (export the
    converted model as is) for the others."""
    if isinstance(config, StaticQuantConfig):
        return OrtStaticQuantization(
            calibration_inputs=list(calibration),
            per_channel=config.per_channel,
            observer=config.observer,
            keep_float=tuple(config.keep_float),
        )
    if isinstance(config, DynamicQuantConfig):
        return OrtDynamicQuantization(keep_float=tuple(config.keep_float))
    return None


def ship(
    reference: nn.Module,
    float_model: nn.Module,
    inputs: ModelInputs,
    formats: Sequence[str],
    run: Run,
    *,
    timing_inputs: Optional[ModelInputs] = None,
    dynamic_batch: bool = True,
    target: str = DEFAULT_TARGET,
    dtype: str = "float32",
    onnx_quantization: Optional[OnnxQuantization] = None,
    models: Optional[Mapping[str, nn.Module]] = None,
    evaluate: Optional[Callable[[nn.Module], dict[str, Any]]] = None,
    keep_float: Sequence[str] = (),
    config: Any = None,
    accuracy_budget: Optional[dict[str, Any]] = None,
    details: Optional[dict[str, Any]] = None,
    started: Optional[float] = None,
) -> Deployment:
    """Export ``reference`` (the converted model) in ``formats``, verify, time and evaluate the files, and write
    ``manifest.json`` into ``run.dirpath``. A format that fails is deleted and listed in ``failures`` (also the
    manifest's). Every verified file is kept, whatever its speed: a file slower than ``float_model`` is marked
    ``faster_than_float: false`` and is never ``recommended``. Anything else that fails writes a manifest with
    ``status: "failed"`` and ``errors.log``, and raises :class:`QuantizationError` naming ``run.owner``.

    With ``run.staging`` (:mod:`lightning_quant.run_folder`) everything is written there first and moved into
    ``run.dirpath``, replacing the previous run's files, only if the run has verified files (or ``dirpath`` holds no
    good run to keep); otherwise it stays in its staging folder, which the manifest and errors then name.

    ``timing_inputs``: a real batch to time and verify on (default: ``inputs``). ``evaluate``: the metrics of a
    model (called with ``float_model`` and with the deployed model); ``None``: no evaluation.
    ``onnx_quantization``/``models``/``dtype``: as :func:`~lightning_quant.export.export` takes them. ``config``: what
    converted ``reference`` (a quantization config or a ``QATGraph``; ``None``: the float model), for the manifest's
    per-layer report (``layers``)."""
    started = time.perf_counter() if started is None else started
    dirpath, approach = run.dirpath, run.approach
    out = run.staging or dirpath  # where the files are written until the run is published into dirpath
    failures: dict[str, str] = {}
    try:
        quantized_ops = count_quantized_ops(reference)
        if sum(quantized_ops.values()) == 0 and approach != "float":
            raise QuantizationError(
                f"{approach} quantization of {run.model_name} produced no quantized op: nothing would run "
                "in int8. Check keep_float and that the model has layers this approach quantizes."
            )
        budget_layers = [layer["name"] for layer in (accuracy_budget or {}).get("float_layers", [])]
        layers = None if config is None else layer_report(float_model, reference, config, keep_float, budget_layers)
        with torch.no_grad():
            try:
                artifacts = export(
                    reference,
                    inputs,
                    formats,
                    out,
                    dynamic_batch=dynamic_batch,
                    float_model=float_model,
                    onnx_quantization=onnx_quantization,
                    models=models,
                    target=target,
                    dtype=dtype,
                )
            except ExportError as err:
                artifacts, failures = err.artifacts, dict(err.failures)
            real_batch = timing_inputs is not None
            timing_inputs = (timing_inputs or inputs).bind(float_model.forward)
            # without a real batch, the example with twice its batch: files that take any batch are checked at two
            pinned = not dynamic_batch or any(a.details.get("dynamic_batch") is False for a in artifacts)
            second = timing_inputs if real_batch or pinned else inputs.doubled()
            artifacts, verification = _verify(
                artifacts,
                reference,
                [inputs, second],
                out,
                float_model,
                failures,
                data_cases=[1] if real_batch else None,
                target=target,
            )
            runtimes = {a.format: load_artifact(out / a.path, a.format) for a in artifacts}
            speed = measure_speed(float_model, reference, runtimes, timing_inputs)
            model = InferenceModel(
                float_model.forward,
                reference,
                runtimes.get(speed["fastest"]),
                speed["fastest"],
                approach,
                output_template=inputs(reference),
                call_form=inputs.form(),
            )
        metrics = NO_EVALUATION if evaluate is None else evaluate(model)
    except Exception as err:
        raise failure(err, run, failures) from err
    # a run with verified files replaces the previous one; one without leaves a good previous run in place
    final = destination(run.staging, dirpath, succeeded=bool(artifacts))
    failures = {name: moved(why, run.staging, final) for name, why in failures.items()}  # paths once published
    manifest = build_manifest(
        approach=approach,
        backend=run.backend,
        model=run.model_name,
        example_inputs=inputs,
        dynamic_batch=dynamic_batch,
        artifacts=artifacts,
        verification=verification,
        metrics=metrics,
        speed=speed,
        latency_input=timing_inputs,
        target=resolve_target(target),
        size_bytes={"float": model_bytes(float_model), "quantized": model_bytes(reference)},
        quantized_ops=quantized_ops,
        layers=layers,
        float_checkpoint=_published(run.float_checkpoint, run.staging, final),
        keep_float=keep_float,
        accuracy_budget=accuracy_budget,
        details=details,
        seconds=time.perf_counter() - started,
        dirpath=final,
        failures=failures,
    )
    manifest["files"] = run_files(out)  # what the next run in dirpath replaces
    write_manifest(manifest, out)
    finish(run.staging, final)
    if artifacts and manifest["recommended"] is None:
        warnings.warn(_slower_than_float_message(run.owner, manifest, final / FILENAME), stacklevel=2)
    return Deployment(manifest, model, final, failures)


def raise_failures(deployment: Deployment, run: Run, formats_listed: bool = True) -> None:
    """Report the formats that failed, if any (the others are on disk, verified, and the manifest records every
    failure). Formats the user listed (``formats_listed``) must all be made: :class:`QuantizationError`. With the
    default formats, what verified ships and one warning says what failed; none verified is an error either way."""
    failures = deployment.failures
    if not failures:
        return
    shipped = [a["format"] for a in deployment.manifest["artifacts"]]
    listing = "\n- " + "\n- ".join(f"{name}: {error}" for name, error in failures.items())
    recorded = f"{deployment.dirpath / FILENAME} records every failure."
    if deployment.dirpath != run.dirpath:  # nothing verified: the previous run in dirpath was kept
        recorded += f" {run.dirpath} still holds the previous run, unchanged and complete."
    if formats_listed or not shipped:
        checkpoint = _published(run.float_checkpoint, run.staging, deployment.dirpath)
        safe = f" The trained float model is safe: {checkpoint}" if checkpoint else ""
        raise QuantizationError(
            f"{run.owner} could not produce {len(failures)} of {len(failures) + len(shipped)} format(s) for "
            f"{run.model_name}:{listing}\nThe other formats are complete and verified: {shipped}; {recorded}{safe}"
        )
    warnings.warn(
        f"{run.owner}: {len(failures)} of the default formats failed for {run.model_name}; the verified ones ship: "
        f"{shipped}.{listing}\n{recorded} Pass formats=[...] to choose them yourself (a listed format that fails "
        "is an error).",
        stacklevel=2,
    )


def failure(err: BaseException, run: Run, failures: Optional[dict[str, str]] = None) -> DeploymentError:
    """The error that ends a failed run, after ``errors.log`` (the full report) and a ``status: "failed"``
    manifest are written: into ``run.dirpath`` if it holds no good run, else left in the run's staging folder, so
    the previous run stays complete. A manifest that cannot be written (a full disk) is only mentioned."""
    out = run.staging or run.dirpath
    final = destination(run.staging, run.dirpath, succeeded=False)
    write_report(err, out / ERROR_LOG)
    cause = err if isinstance(err, (QuantizationError, ValueError)) else first_lines(err, 3)
    checkpoint = _published(run.float_checkpoint, run.staging, final)
    safe = f" The trained float model is safe: {checkpoint}" if checkpoint else ""
    message = f"{run.owner} failed on {run.model_name}: {type(err).__name__}: {cause}\n"
    message += f"Full report: {final / ERROR_LOG}.{safe}"
    if final != run.dirpath:
        message += (
            f"\n{run.dirpath} still holds the previous run, unchanged and complete; this run's failed manifest and "
            f"report are in {final}."
        )
    message = moved(message, run.staging, final)
    manifest = failed_manifest(
        approach=run.approach,
        backend=run.backend,
        model=run.model_name,
        error=message,
        float_checkpoint=checkpoint,
        dirpath=final,
        failures={name: moved(why, run.staging, final) for name, why in (failures or {}).items()},
    )
    manifest["files"] = run_files(out)
    try:
        write_manifest(manifest, out)
        finish(run.staging, final)
    except OSError as write_error:  # e.g. the disk is full: the error being raised says what failed
        message += f"\n({final / FILENAME} could not be written either: {write_error})"
    return DeploymentError(message, manifest)


def _published(path: Optional[str], staging: Optional[Path], final: Path) -> Optional[str]:
    """Where ``path`` (e.g. the float checkpoint, maybe written into the staging folder) is once the run's files
    are in ``final``."""
    return moved(path, staging, final) if path else path


def _verify(
    artifacts: list[Artifact],
    reference: nn.Module,
    cases: list[ModelInputs],
    dirpath: Path,
    float_model: nn.Module,
    failures: dict[str, str],
    *,
    data_cases: Optional[list[int]],
    target: str,
) -> tuple[list[Artifact], dict[str, dict[str, Any]]]:
    """Verify every artifact in one fresh process; if that fails, one by one to tell which fail.
    A file that fails is deleted (nothing unverified stays under a final name) and recorded in ``failures``."""

    def check(some: list[Artifact]) -> dict[str, dict[str, Any]]:
        return verify_artifacts(
            some, reference, cases, dirpath, float_model=float_model, target=target, data_cases=data_cases
        )

    try:
        return artifacts, check(artifacts)
    except QuantizationError as error:
        if len(artifacts) == 1:
            _discard(artifacts[0], error, dirpath, failures)
            return [], {}
    verified, verification = [], {}
    for artifact in artifacts:
        try:
            verification.update(check([artifact]))
            verified.append(artifact)
        except QuantizationError as error:
            _discard(artifact, error, dirpath, failures)
    return verified, verification


def _discard(artifact: Artifact, error: BaseException, dirpath: Path, failures: dict[str, str]) -> None:
    (Path(dirpath) / artifact.path).unlink(missing_ok=True)
    failures[artifact.format] = f"{artifact.path} failed verification and was deleted: {error}"


def _slower_than_float_message(owner: str, manifest: dict[str, Any], manifest_path: Path) -> str:
    latency = manifest["latency_ms"]
    times = ", ".join(f"{a['path']} {a['latency_ms']:.3g} ms" for a in manifest["artifacts"])
    too_fast = (
        f" At {latency['float']:.2g} ms a call the model is too fast to time reliably (too_fast_to_time: true)."
        if latency["too_fast_to_time"]
        else ""
    )
    return (
        f"{owner}: no exported file is faster than the float model on this CPU ({manifest['cpu']['model']}): "
        f"float {latency['float']:.3g} ms, {times} (input {latency['input_shape']}, load average "
        f"{latency['load_average'][0]}).{too_fast} {manifest_path} says so (recommended: null, faster_than_float: "
        "false); the files are verified and kept. For speed ship the float model, time a larger batch, or try "
        "another approach or format."
    )


class InferenceModel(InferenceOnly):
    """The deployed model: same inputs as the float model's forward, no autograd, no training mode (``.eval()`` and
    ``.train(mode)`` only set the flag; the reference stays in eval mode, an exported program's module refuses both).

    Calls go to the fastest verified file's runtime (``runtime``: its format, e.g. an ONNX Runtime session for
    ``"onnx"``) when there is one, else to the converted reference model. A call of another form than the
    example (``call_form``, see :meth:`ModelInputs.form`: a language model's whole sequences where the files are
    its generation step) runs the converted reference model, which takes every call ``forward`` does.
    """

    def __init__(
        self,
        forward: Callable[..., Any],
        reference: nn.Module,
        lowered: Optional[Callable[..., Any]],
        runtime: Optional[str],
        approach: str,
        output_template: Any = None,
        call_form: Any = None,
    ) -> None:
        super().__init__()
        self.reference = reference
        self._lowered = lowered
        # files return the tensors of forward's output (a ModelOutput's fields, say): calls get its structure back
        self._output_template = output_template
        self.runtime = runtime if lowered is not None else None
        self._signature = inspect.signature(forward)
        self._call_form = call_form
        self.approach = approach

    @property
    def is_lowered(self) -> bool:
        """True when calls run an exported file (AOTInductor, ONNX Runtime, ...), not the eager reference."""
        return self._lowered is not None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        bound = self._signature.bind(*args, **kwargs)
        bound.apply_defaults()
        call = ModelInputs(tuple(bound.args), dict(bound.kwargs))
        with torch.no_grad():
            if self._lowered is None or (self._call_form is not None and call.form() != self._call_form):
                return self.reference(*bound.args, **bound.kwargs)
            return _like(self._output_template, self._lowered(*bound.args, **bound.kwargs))


def _like(template: Any, output: Any) -> Any:
    """``output`` (a file's tensors) in the structure of ``template`` (forward's own output on the example):
    its tensor leaves replaced, in order, by the file's tensors."""
    from torch.utils._pytree import tree_flatten, tree_unflatten

    if template is None or isinstance(template, torch.Tensor):
        return output
    leaves, spec = tree_flatten(template)
    tensors = iter([output] if isinstance(output, torch.Tensor) else list(output))
    return tree_unflatten([next(tensors) if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves], spec)
