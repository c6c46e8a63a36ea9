"""The shared Lightning side of the int8 callbacks (static, dynamic, QAT): what happens at fit end.

Subclass contract (``PostTrainingQuantization``, ``DynamicQuantization``, ``QuantizationAwareTraining``, ...)
--------------------------------------------------------------------------------------------------------------
Set three class attributes and, in ``__init__``, ``self.config``:

* ``approach``: ``"static"``, ``"dynamic"``, ``"qat"``, ``"float"``... (written to the manifest).
* ``backend``: what runs the kernels, e.g. ``"x86_inductor"`` (written to the manifest).
* ``supported_formats``: the formats of :data:`lightning_quant.export.FORMATS` this approach can export;
  ``default_formats`` (optional) the ones used when the user passes none.
* ``config``: what :func:`lightning_quant.pipeline.convert` converts with, as :func:`~lightning_quant.deploy`
  takes it (a :class:`~lightning_quant.quantization.StaticQuantConfig`, ``DynamicQuantConfig``,
  ``WeightOnlyConfig``, or ``None``: the float model itself). Each conversion uses it with ``keep_float``
  replaced (the user's names plus those the accuracy budget returned to float).

``__init__`` declares only the subclass's own parameters, then ``**kwargs`` passed on as
``super().__init__(**kwargs)``: the shared ones (``dirpath``, ``formats``, ``keep_float``...) are declared, checked
and documented here once, and the Hydra schemas (:func:`lightning_quant.configs.config_from_signature`) follow
``**kwargs`` up to this signature. A subclass that needs a shared value reads it from ``self`` (``self.target``...)
after ``super().__init__``.

Fit end reads its data once and passes it down (nothing is kept on the callback between hooks): the example
input (``inputs``, a :class:`ModelInputs` of ``pl_module.forward``), the real batches of
``calibration_inputs(trainer, inputs)`` (``calibration``), an eval-mode CPU copy of the module (``float_model``) and the
``keep_float`` of the conversion. Hooks, all optional:

* ``calibration_inputs(trainer, inputs) -> list[ModelInputs]``: the batches conversion calibrates on, calls of
  forward like the example ``inputs`` (default none). Set ``reads_batches = True`` so that batches of another
  form are refused before training.
* ``convert(pl_module, inputs, calibration, keep_float) -> nn.Module``: the converted *reference* model on
  CPU. Default: :func:`lightning_quant.pipeline.convert` of a CPU copy with ``self.config``. It must not
  modify ``pl_module`` and must leave the modules named in ``keep_float`` in float (names relative to
  ``pl_module``). Any exception it raises reaches the user as a :class:`QuantizationError` naming the
  callback, the module and the reason, with the path of the float checkpoint (saved before ``convert``
  runs). Zero quantized ops in an int8 result is such an error.
* ``onnx_quantization(calibration, keep_float)``: how the ``"onnx"`` format is made. ``None`` exports the
  converted model as is; an :class:`~lightning_quant.export.OrtStaticQuantization` /
  :class:`~lightning_quant.export.OrtDynamicQuantization` exports the float model and lets ONNX Runtime
  quantize it (its own QDQ placement is what runs fast in ONNX Runtime). Default: what
  :func:`~lightning_quant.deploy` does for ``self.config`` (:func:`lightning_quant.pipeline.ort_quantization`).
* ``artifact_models(pl_module, keep_float)``: ``{format: model}`` for formats that must be made from another
  model than the converted one (e.g. a legacy-quantized copy for ``"torchscript"``); default ``{}``.
  Those files, like an ONNX Runtime-quantized ``"onnx"``, are verified against the float model.
* ``manifest_details(float_model, inputs, calibration)``: a dict merged into ``manifest.json`` (observer,
  calibration batches, notes...), computed from its arguments.
* ``quantizable_layers(pl_module)``: the module names the accuracy budget's search may return to float
  (default: Conv and Linear modules outside ``keep_float``).
* ``setup`` / ``on_train_start``: validate more, call ``super()`` first.

Helpers available to subclasses: ``self.model_inputs(trainer, "train" | "val", limit)`` (real input batches for
calibration), ``self.cpu_copy(pl_module)`` (an eval-mode CPU deep copy of the float model, safe to modify).

After fit: ``callback.quantized_model`` (the fast int8 model: AOTInductor-lowered when ``"aoti"`` is among
the formats, else the reference model) and ``callback.manifest`` (the dict written to ``manifest.json``).
"""

from __future__ import annotations

import inspect
import os
import time
from abc import ABC
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar, Optional, Union

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.core.module import _jit_is_scripting
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn

from lightning_quant.callbacks._evaluation import evaluate_validation, evaluated_batches
from lightning_quant.checks import (
    check_example,
    check_formats,
    check_keep_float_names,
    check_target,
    check_writable,
)
from lightning_quant.errors import first_lines
from lightning_quant.export import FORMATS, OnnxQuantization
from lightning_quant.inputs import ModelInputs, check_finite, default_batch_to_input, example_inputs_for_export
from lightning_quant.manifest import FILENAME, FORMAT_VERSION, check_format_version, format_table, manifest_numbers
from lightning_quant.pipeline import (
    DeploymentError,
    InferenceModel,
    Run,
    failure,
    float_copy,
    ort_quantization,
    own_forward,
    raise_failures,
    ship,
)
from lightning_quant.pipeline import convert as pipeline_convert
from lightning_quant.quantization import single_input_channel_convs
from lightning_quant.quantization.budget import MetricBudget, fallback_search
from lightning_quant.quantization.config import check_keep_float
from lightning_quant.quantization.sensitivity import quantizable_layers, save_sensitivity
from lightning_quant.run_folder import lock, new_staging, unlock
from lightning_quant.target import DEFAULT_TARGET, check_target_name

_DATALOADERS = ("train", "val")


def check_calibration_arguments(num_calibration_batches: Any, calibration_dataloader: Any) -> None:
    """The calibration settings of a callback that reads batches: a positive number of them, from ``"train"`` or
    ``"val"``."""
    if (
        isinstance(num_calibration_batches, bool)
        or not isinstance(num_calibration_batches, int)
        or num_calibration_batches < 1
    ):
        raise ValueError(f"num_calibration_batches must be a positive integer, got {num_calibration_batches!r}")
    if calibration_dataloader not in _DATALOADERS:
        raise ValueError(f"calibration_dataloader must be one of {list(_DATALOADERS)}, got {calibration_dataloader!r}")


class QuantizationCallback(Callback, ABC):
    r"""Base of the callbacks that turn the trained float model into verified artifacts at fit end: int8 (or
    weight-only) by ``config``, or the float model itself when ``config`` is ``None``.

    From setup to teardown the fit holds ``dirpath`` (a lock file: another run into it is refused). At fit end
    (rank zero does the work; all ranks wait for it), in a fresh folder inside ``dirpath`` whose files replace the
    previous run's only when this one succeeds (:mod:`lightning_quant.run_folder`):

    1. make sure a float checkpoint is on disk (the trainer's last checkpoint, else ``float.ckpt``),
    2. ``convert`` (subclass) and count the quantized ops (zero is an error),
    3. export every format (atomic writes), reload each in a fresh process and compare it
       with the converted model, time it against float,
    4. evaluate float and int8 with the module's own validation metrics,
    5. write ``manifest.json``, move the files into ``dirpath``, log the numbers to the Trainer's logger and print
       one small table.

    With ``max_metric_drop``, step 2 checks the int8 model against the budget first (one validation pass
    for float, one for int8) and, while it is over, returns the most sensitive layers to float one at a time
    (ranked by output error with each layer quantized alone, no validation pass needed; the table and chart
    are written as ``sensitivity.csv/.md/.png``) until the drop is within budget or a cap is hit. The
    manifest's ``accuracy_budget`` records the budget, the metric for float, fully int8 (``before``) and
    the exported model (``after``), which layers stayed float and why, and the validation passes made. If
    the budget cannot be met, the best model found is exported anyway, ``within_budget: false``, with a
    warning.

    Args:
        dirpath: where artifacts and ``manifest.json`` go. Default: ``<trainer.default_root_dir>/quantized``.
        formats: a list from ``"aoti"``, ``"onnx"``, ``"torch_export"``, ``"torchscript"`` (those the
            approach supports); a listed format that fails ends the fit with an error. Default: the approach's
            ``default_formats``, of which what verified ships (a warning and the manifest say what failed).
        example_input: the call of ``forward`` the files serve, used to export: a tensor, a tuple of positional
            arguments or a dict of keyword arguments. Default: the module's ``example_input_array``. The files
            are timed on the first validation batch, or on this input where batches are a different call
            (a language model's example is one generation step, its batches whole sequences).
        keep_float: names of submodules (as in ``pl_module.named_modules()``) left in float.
        batch_to_input: picks the model input out of a batch (same convention as ``example_input``).
            Default: ``batch[0]`` of a tuple/list batch, else the batch.
        dynamic_batch: export with a dynamic batch dimension (any batch size). ``False`` pins the batch
            size of ``example_input``.
        max_metric_drop: an accuracy budget: a :class:`~lightning_quant.quantization.MetricBudget` or a
            mapping with its fields, e.g. ``{"metric": "val/acc", "max_drop": 0.01}`` (``relative``,
            ``higher_is_better``, ``max_evaluations``, ``max_float_fraction`` optional). The metric must be
            one the module logs in ``validation_step``. ``None`` (default): no check.
        target: the CPUs the files must be right and fast on (:mod:`lightning_quant.target`): ``"avx2"``
            (default: any x86-64 CPU with AVX2; 7-bit int8 weights, which CPUs without VNNI compute exactly, and
            AOTInductor code for AVX2), ``"avx512_vnni"``, ``"avx512_bf16"`` or ``"amx"`` (full 8-bit weights, code
            for that ISA; the files refuse to load elsewhere), or ``"native"`` (the widest of those this CPU has).
            The files are built and verified here, so this CPU must have the target's instructions.

    Example (a subclass)::

        >>> from lightning_quant import PostTrainingQuantization
        >>> callback = PostTrainingQuantization(formats=["onnx"])
        >>> callback.formats
        ['onnx']
    """

    approach: ClassVar[str]
    backend: ClassVar[str]
    supported_formats: ClassVar[tuple[str, ...]] = FORMATS
    default_formats: ClassVar[tuple[str, ...]] = ("aoti", "onnx")
    #: what :func:`lightning_quant.pipeline.convert` converts with (``keep_float`` replaced); ``None``: float
    config: Any = None
    #: conversion reads real batches (static calibration): batches that are not a call of forward like the
    #: example are refused before training instead of verified around
    reads_batches: ClassVar[bool] = False

    def __init__(
        self,
        dirpath: Optional[Union[str, Path]] = None,
        formats: Optional[Sequence[str]] = None,
        example_input: Any = None,
        keep_float: Sequence[str] = (),
        batch_to_input: Optional[Callable[[Any], Any]] = None,
        dynamic_batch: bool = True,
        max_metric_drop: Optional[Union[MetricBudget, Mapping[str, Any]]] = None,
        target: str = DEFAULT_TARGET,
    ) -> None:
        check_target_name(target)
        self.formats_listed = formats is not None  # a listed format that fails is an error; a default one, a warning
        self.formats = check_formats(formats, self.supported_formats, self.default_formats, type(self).__name__)
        check_keep_float(keep_float)
        if batch_to_input is not None and not callable(batch_to_input):
            raise TypeError(f"batch_to_input must be a callable batch -> model input, got {batch_to_input!r}")
        self.dirpath = Path(dirpath) if dirpath is not None else None
        self.example_input = example_input
        self.keep_float = list(keep_float)
        self.batch_to_input = batch_to_input or default_batch_to_input
        self.dynamic_batch = dynamic_batch
        self.target = target
        self.budget = MetricBudget.from_value(max_metric_drop)
        self._budget_metric_checked = False
        self.quantized_model: Optional[nn.Module] = None
        self.manifest: Optional[dict[str, Any]] = None
        self._lock: Optional[Path] = None  # held from setup to teardown (rank zero)
        self._staging: Optional[Path] = None  # this fit end's files until they are published into dirpath

    # ------------------------------------------------------------------ subclass API
    def formats_for(self, model: nn.Module) -> list[str]:
        """The formats to export ``model`` in (default: ``formats``; an approach may adapt its defaults)."""
        return self.formats

    def calibration_inputs(self, trainer: Trainer, inputs: ModelInputs) -> list[ModelInputs]:
        """The real input batches conversion calibrates on, read once per fit end (default: none)."""
        return []

    def convert(
        self,
        pl_module: LightningModule,
        inputs: ModelInputs,
        calibration: Sequence[ModelInputs],
        keep_float: Sequence[str],
    ) -> nn.Module:
        """The converted reference model (CPU, eval mode): :func:`lightning_quant.pipeline.convert` of a CPU copy
        of ``pl_module`` with ``self.config`` (its ``keep_float`` replaced); see the module docstring."""
        return pipeline_convert(self.cpu_copy(pl_module), self.config_keeping_float(keep_float), inputs, calibration)

    def config_keeping_float(self, keep_float: Sequence[str]) -> Any:
        """``self.config`` with ``keep_float`` replaced (``None`` stays ``None``: nothing is quantized)."""
        return None if self.config is None else replace(self.config, keep_float=tuple(keep_float))

    def onnx_quantization(
        self, calibration: Sequence[ModelInputs], keep_float: Sequence[str]
    ) -> Optional[OnnxQuantization]:
        """How the ONNX file is quantized (``None``: the converted model is exported as is). Default: as
        :func:`~lightning_quant.deploy` does for ``self.config``."""
        return ort_quantization(self.config_keeping_float(keep_float), calibration)

    @property
    def runtime_dtype(self) -> str:
        """The precision a format whose runtime picks it at load (OpenVINO) runs the float parts in: ``"float32"``
        (default) or ``"bfloat16"``."""
        return "float32"

    def artifact_models(self, pl_module: LightningModule, keep_float: Sequence[str]) -> dict[str, nn.Module]:
        """Models to export instead of the converted one, by format (default: none)."""
        return {}

    def manifest_details(
        self, float_model: nn.Module, inputs: ModelInputs, calibration: Sequence[ModelInputs]
    ) -> dict[str, Any]:
        """Approach-specific entries for ``manifest.json``, from the fit end's float model (an eval-mode CPU copy),
        example input and calibration batches."""
        return {}

    def quantizable_layers(self, pl_module: LightningModule) -> list[str]:
        """Modules the accuracy budget may return to float (names as in ``pl_module.named_modules()``): convs and
        Linear layers, except convs with one input channel, which stay float anyway (``single_input_channel_convs``)."""
        automatic = set(single_input_channel_convs(pl_module))
        layers = quantizable_layers(pl_module, (nn.modules.conv._ConvNd, nn.Linear), self.keep_float)
        return [name for name in layers if name not in automatic]

    # ------------------------------------------------------------------ hooks
    @property
    def output_dir(self) -> Path:
        """Where the files go: ``dirpath``, or ``<default_root_dir>/quantized`` once ``setup`` has run."""
        if self.dirpath is None:
            raise RuntimeError(f"{type(self).__name__}: dirpath is chosen in setup(), which has not run yet")
        return self.dirpath

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self.dirpath is None:
            self.dirpath = Path(trainer.default_root_dir) / "quantized"
        self._budget_metric_checked = False
        self._check_no_conflicting_callback(trainer)
        owner = type(self).__name__
        check_target(self.target, owner)
        if trainer.is_global_zero:
            check_writable(self.dirpath, owner)
        # run forward once on the example (modules that build their layers in configure_model are not built yet)
        # (without an example the first training batch is the example: checked at train start)
        if (
            type(pl_module).configure_model is LightningModule.configure_model
            and self._given_example(pl_module) is not None
        ):
            example = self._resolve_example_inputs(trainer, pl_module)
            check_example(pl_module, example, owner, "example_input= (or set example_input_array to)")
        check_keep_float_names(pl_module, self.keep_float, owner)
        if trainer.is_global_zero:  # dirpath is this fit's until teardown: another run into it is refused
            self._lock = lock(self.dirpath, owner)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            self._unlock()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._unlock()

    def _unlock(self) -> None:
        if self._lock is not None:
            unlock(self._lock)
            self._lock = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.budget is not None and not self._dataloaders(trainer, "val"):
            raise ValueError(
                f"{type(self).__name__}(max_metric_drop=...) measures {self.budget.metric!r} on the validation "
                "dataloader, and this fit has none: pass val_dataloaders to trainer.fit (or a datamodule with "
                "val_dataloader), or drop max_metric_drop."
            )
        # a batch that does not fit forward, or that is another call than the example, fails now when conversion
        # needs batches, not at fit end after all the training
        inputs = self._resolve_example_inputs(trainer, pl_module)
        if self._given_example(pl_module) is None:
            check_example(pl_module, inputs, type(self).__name__, "example_input_array (or batch_to_input=)")
        if not self.reads_batches:
            return
        for loader in self._dataloaders(trainer, "train"):
            sample = _first_batch(loader, size=1)
            if sample is not None:
                mismatch = self._batch_inputs(sample, pl_module, "train", inputs).mismatch(inputs)
                if mismatch is not None:
                    raise ValueError(self._batch_mismatch_message(pl_module, mismatch, before_training=True))

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # the first validation (the sanity check, else the first epoch's) shows whether the metric is logged
        if self.budget is None or self._budget_metric_checked or not trainer.is_global_zero:
            return
        logged = sorted(trainer.callback_metrics)
        self._budget_metric_checked = True
        if self.budget.metric not in logged:
            raise ValueError(_unknown_metric(type(self).__name__, self.budget.metric, logged))

    def _check_no_conflicting_callback(self, trainer: Trainer) -> None:
        others = [c for c in trainer.callbacks if isinstance(c, QuantizationCallback) and c is not self]  # type: ignore[attr-defined]  # set by Lightning's callback connector
        # config None exports the float model (OptimizeForInference): beside one that quantizes, it is no conflict
        int8 = [c for c in others if c.config is not None] if self.config is not None else []
        same_dir = [
            c for c in others if c.dirpath is not None and Path(c.dirpath).resolve() == self.output_dir.resolve()
        ]
        if int8 or same_dir:
            names = [type(c).__name__ for c in [self, *others]]
            raise ValueError(
                f"Conflicting quantization callbacks on one Trainer: {names}. "
                + (
                    "Two int8 callbacks would quantize the same model twice (QAT's fake-quant model calibrated "
                    "again, or two sets of int8 files): keep one. "
                    if int8
                    else ""
                )
                + (f"They write into the same dirpath {self.dirpath}: give each its own dirpath." if same_dir else "")
            )

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # rank zero writes this run's files (the float checkpoint first) into a fresh folder inside dirpath; they
        # replace the previous run's only when the run succeeds (lightning_quant.run_folder)
        self._staging = new_staging(self.output_dir) if trainer.is_global_zero else None
        try:
            float_checkpoint = self._ensure_float_checkpoint(trainer)  # collective: every rank calls it
            error: Optional[BaseException] = None
            if trainer.is_global_zero:
                try:
                    self._quantize_export_and_report(trainer, pl_module, float_checkpoint)
                except BaseException as err:  # re-raised after the other ranks are released
                    error = err
            trainer.strategy.barrier("lightning_quant.on_fit_end")
            if error is not None:
                raise error
        finally:
            staging, self._staging = self._staging, None
            if staging is not None and staging.is_dir() and not any(staging.iterdir()):
                staging.rmdir()

    def state_dict(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, "manifest": self.manifest}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        check_format_version(state_dict.get("format_version", 1), f"The checkpoint's {type(self).__name__} state")
        # Testing the best checkpoint after fit restores the state saved before fit end (manifest None):
        # keep the manifest this process made.
        if self.manifest is None:
            self.manifest = state_dict.get("manifest")

    # ------------------------------------------------------------------ helpers for subclasses
    def model_inputs(
        self, trainer: Trainer, dataloader: str, limit: Optional[int] = None, example: Optional[ModelInputs] = None
    ) -> Iterator[ModelInputs]:
        """Up to ``limit`` real model inputs from the fit's ``"train"`` or ``"val"`` dataloader, on CPU (a dict
        batch for a ``forward(**inputs)`` bound to the keywords of ``example``, when given)."""
        loaders = self._dataloaders(trainer, dataloader)
        count = 0
        for loader in loaders:
            for batch in loader:
                if limit is not None and count >= limit:
                    return
                inputs = self._batch_inputs(batch, trainer.lightning_module, dataloader, example).to("cpu")
                check_finite(inputs, f"Batch {count} of the {dataloader} dataloader")
                yield inputs
                count += 1

    def _batch_inputs(
        self, batch: Any, pl_module: LightningModule, dataloader: str, example: Optional[ModelInputs] = None
    ) -> ModelInputs:
        """The model input of a batch, bound to ``forward`` (a dict batch by parameter name, extra keys dropped);
        a batch that cannot be bound raises an error naming ``batch_to_input``. By default a tuple batch is
        ``(input, target)``; when ``forward`` needs more than ``batch[0]`` (``forward(inputs, target)`` in
        Lightning's demo Transformer), the whole tuple is its arguments. A ``forward(**inputs)`` gets the
        ``example``'s keywords of a dict batch (the files take those; a batch's ``labels`` are left out)."""
        forward = own_forward(pl_module)
        candidates = [self.batch_to_input(batch)]
        if self.batch_to_input is default_batch_to_input and isinstance(batch, (tuple, list)) and len(batch) > 1:
            candidates.append(tuple(batch))
        errors = []
        for candidate in candidates:
            try:
                return ModelInputs.from_value(candidate).matching(forward, example).bind(forward)
            except TypeError as err:
                errors.append(err)
        kind = type(batch).__name__ + (f" with keys {sorted(batch)}" if isinstance(batch, dict) else "")
        raise ValueError(
            f"{type(self).__name__}: a batch of the {dataloader} dataloader ({kind}) does not fit "
            f"{type(pl_module).__name__}.forward{inspect.signature(forward)}: {errors[0]}. Pass "
            "batch_to_input=lambda batch: ... returning what forward takes (a tensor, a tuple of arguments or a "
            "dict of keywords)."
        ) from errors[0]

    def _real_batches(
        self, trainer: Trainer, inputs: ModelInputs, limit: int
    ) -> tuple[list[ModelInputs], Optional[str]]:
        """Up to ``limit`` validation (else training) batches if they are calls of forward like the example
        ``inputs``; else none, and how they differ."""
        try:
            batches = list(self.model_inputs(trainer, "val", limit, inputs)) or list(
                self.model_inputs(trainer, "train", limit, inputs)
            )
        except ValueError as err:
            if not isinstance(err.__cause__, TypeError):  # a NaN batch, say: not a batch of another form
                raise
            return [], f"a batch does not bind to forward: {err.__cause__}"  # _batch_inputs raises from it
        mismatch = batches[0].mismatch(inputs) if batches else None
        return ([], mismatch) if mismatch is not None else (batches, None)

    def _timing_inputs(self, trainer: Trainer, inputs: ModelInputs) -> tuple[Optional[ModelInputs], list[str]]:
        """The first validation (else training) batch if it is the same call as the example, and no note; else
        ``None`` (the pipeline verifies and times on the example itself) and a note for the manifest saying why."""
        batches, mismatch = self._real_batches(trainer, inputs, limit=1)
        if mismatch is None:
            return next(iter(batches), None), []
        return None, [self._batch_mismatch_message(trainer.lightning_module, mismatch, before_training=False)]

    def _batch_mismatch_message(self, pl_module: LightningModule, mismatch: str, before_training: bool) -> str:
        owner, module = type(self).__name__, type(pl_module).__name__
        if before_training:
            return (
                f"{owner} calibrates on real batches, and a batch of the train dataloader is not a call of "
                f"{module}.forward like its example input: {mismatch}. Pass batch_to_input=lambda batch: ... "
                "returning what forward takes from a batch (as training_step splits it), so that calibration "
                "sees real inputs. Refused before training, so no training is lost."
            )
        return (
            f"The files were verified and timed on the example input: a batch is not a call of {module}.forward like "
            f"the example ({mismatch}). Pass batch_to_input=lambda batch: ... returning what forward takes from a "
            "batch to verify on real batches."
        )

    def first_training_batch(self, trainer: Trainer) -> Any:
        """The first batch of the training dataloader (its first ``batch_size`` samples, collated as the loader
        would, read without iterating the loader: that would move its sampler's generator); ``None`` if there is
        none or its dataset is iterable."""
        batches = (_first_batch(loader) for loader in self._dataloaders(trainer, "train"))
        return next((batch for batch in batches if batch is not None), None)  # a batch may be one tensor: no bool()

    @staticmethod
    def cpu_copy(pl_module: LightningModule) -> LightningModule:
        """An eval-mode CPU deep copy of the float module (detached from the trainer; a ``forward`` set on the
        instance, such as QAT's fake-quant graph, is not copied: the copy runs the class's forward)."""
        return float_copy(pl_module).cpu().eval()  # type: ignore[return-value]  # a copy of a LightningModule

    def _dataloaders(self, trainer: Trainer, which: str) -> list[Any]:
        if which not in _DATALOADERS:
            raise ValueError(f"dataloader must be one of {_DATALOADERS}, got {which!r}")
        loaders = trainer.train_dataloader if which == "train" else trainer.val_dataloaders
        if loaders is None:
            return []
        if isinstance(loaders, dict):
            return list(loaders.values())
        return list(loaders) if isinstance(loaders, (list, tuple)) else [loaders]

    # ------------------------------------------------------------------ fit end, step by step
    def _given_example(self, pl_module: LightningModule) -> Any:
        """The example the user gave: ``example_input``, else the module's ``example_input_array`` (or ``None``)."""
        return self.example_input if self.example_input is not None else pl_module.example_input_array

    def _resolve_example_inputs(self, trainer: Trainer, pl_module: LightningModule) -> ModelInputs:
        """The call of forward the files serve: the example the user gave, else the first training batch (its
        first ``batch_size`` samples, read without iterating the loader) through ``batch_to_input``."""
        value = self._given_example(pl_module)
        if value is not None:
            return example_inputs_for_export(value, own_forward(pl_module))
        batch = self.first_training_batch(trainer)
        if batch is None:
            raise ValueError(
                f"{type(self).__name__} needs an example input to export {type(pl_module).__name__}: set "
                "`self.example_input_array` in the LightningModule, pass `example_input=` (one call of forward), "
                "or give the fit a training dataloader over a map-style dataset (its first batch is the example)."
            )
        return example_inputs_for_export(self._batch_inputs(batch, pl_module, "train"), own_forward(pl_module))

    def _example_notes(self, pl_module: LightningModule) -> list[str]:
        if self._given_example(pl_module) is not None:
            return []
        return [
            f"{type(pl_module).__name__} has no example_input_array: the example input (what the files were "
            "captured on) is the first batch of the training dataloader, through batch_to_input."
        ]

    def _ensure_float_checkpoint(self, trainer: Trainer) -> Optional[str]:
        """The float weights are on disk before anything is tried: reuse the last checkpoint or write one."""
        checkpoint = trainer.checkpoint_callback
        last = getattr(checkpoint, "last_model_path", "") if checkpoint is not None else ""
        # reused only if it holds the weights being quantized: a "last" checkpoint written at an earlier step
        # (ModelCheckpoint saves last only when it saves at all, e.g. when the monitored metric improved) does not
        if (
            last
            and os.path.isfile(last)
            and getattr(checkpoint, "_last_global_step_saved", None) == trainer.global_step
        ):
            return str(last)
        path = (self._staging or self.output_dir) / "float.ckpt"
        temporary = path.with_name(path.name + ".tmp")
        if trainer.is_global_zero:
            path.parent.mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(temporary, weights_only=False)  # a full checkpoint: fit can resume from it
        if trainer.is_global_zero:
            os.replace(temporary, path)
        return str(path)

    def _quantize_export_and_report(
        self, trainer: Trainer, pl_module: LightningModule, float_checkpoint: Optional[str]
    ) -> None:
        """Convert (within the accuracy budget, if any), then hand the converted model to the shared pipeline
        (:func:`lightning_quant.pipeline.ship`): export, verify, time, evaluate, ``manifest.json``. A format that
        fails is recorded in the manifest (``failures``) and reported after the others are written; a failed
        convert writes a manifest with ``status: "failed"``. Either way a :class:`QuantizationError` ends the fit."""
        started = time.perf_counter()
        dirpath = self.output_dir
        dirpath.mkdir(parents=True, exist_ok=True)
        owner, name = type(self).__name__, type(pl_module).__name__
        run = Run(owner, dirpath, self.approach, self.backend, name, float_checkpoint, self._staging)
        was_training = pl_module.training
        pl_module.eval()
        try:
            with torch.no_grad(), _jit_is_scripting():
                try:
                    inputs = self._resolve_example_inputs(trainer, pl_module)
                    float_model = self.cpu_copy(pl_module)
                    calibration = self.calibration_inputs(trainer, inputs)
                    budget_report, float_metrics = None, None
                    keep_float = list(self.keep_float)
                    if self.budget is None:
                        reference = self.convert(pl_module, inputs, calibration, keep_float)
                    else:
                        reference, keep_float, budget_report, float_metrics = self._convert_within_budget(
                            trainer, pl_module, float_model, inputs, calibration, self.budget
                        )
                    onnx = self.onnx_quantization(calibration, keep_float)
                    models = self.artifact_models(pl_module, keep_float)
                    details = self.manifest_details(float_model, inputs, calibration)
                    timing_inputs, notes = self._timing_inputs(trainer, inputs)
                    details = _with_notes(details, [*notes, *self._example_notes(pl_module)])
                except Exception as err:
                    raise failure(err, run) from err
                deployment = ship(
                    reference,
                    float_model,
                    inputs,
                    self.formats_for(pl_module),
                    run,
                    timing_inputs=timing_inputs,
                    dynamic_batch=self.dynamic_batch,
                    target=self.target,
                    dtype=self.runtime_dtype,
                    onnx_quantization=onnx,
                    models=models,
                    keep_float=keep_float,
                    config=self.config_keeping_float(keep_float),
                    evaluate=lambda model: self._evaluate(trainer, pl_module, float_model, model, float_metrics),
                    accuracy_budget=budget_report,
                    details=details,
                    started=started,
                )
        except DeploymentError as err:
            self.manifest = err.manifest
            raise
        finally:
            pl_module.train(was_training)
        self.manifest, self.quantized_model = deployment.manifest, deployment.model
        self._log(trainer, deployment.manifest)
        if budget_report is not None and not budget_report["within_budget"]:
            rank_zero_warn(_over_budget_message(run.owner, budget_report, deployment.dirpath / FILENAME))
        raise_failures(deployment, run, self.formats_listed)

    def _validation_batches(self, trainer: Trainer) -> tuple[list[Any], list[float]]:
        """The fit's validation dataloaders and how many batches of each the Trainer validates;
        ``([], [])`` when there is nothing to validate on (no dataloader, or limit_val_batches=0)."""
        loaders = self._dataloaders(trainer, "val")
        limits = list(trainer.num_val_batches) if loaders else []
        return (loaders, limits) if any(limits) else ([], [])

    def _convert_within_budget(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        float_model: nn.Module,
        inputs: ModelInputs,
        calibration: Sequence[ModelInputs],
        budget: MetricBudget,
    ) -> tuple[nn.Module, list[str], dict[str, Any], dict[str, float]]:
        """Convert, and while the budget's metric dropped too far, convert again with more layers in float.
        Returns the model, its ``keep_float`` (the user's names + the layers the search returned to float), the
        budget's report and the float model's metrics."""
        loaders, limits = self._validation_batches(trainer)
        if not loaders:
            raise ValueError(
                f"max_metric_drop needs validation batches to measure {budget.metric!r}; this fit "
                "has no validation dataloader (or limit_val_batches=0)"
            )
        float_metrics: dict[str, float] = {}

        def evaluate(model: nn.Module) -> float:
            if model is float_model:
                results = evaluate_validation(pl_module, float_model, loaders, limits)
                float_metrics.update(results)
            else:
                reference = InferenceModel(own_forward(pl_module), model, None, None, self.approach)
                results = evaluate_validation(pl_module, reference, loaders, limits)
            if budget.metric not in results:
                raise ValueError(_unknown_metric(type(self).__name__, budget.metric, sorted(results)))
            return results[budget.metric]

        def quantize_with(names: Sequence[str]) -> nn.Module:
            return self.convert(pl_module, inputs, calibration, [*self.keep_float, *names])

        result = fallback_search(
            float_model,
            quantize_with,
            evaluate,
            budget,
            self.quantizable_layers(pl_module),
            inputs=self._real_batches(trainer, inputs, limit=4)[0] or [inputs],
        )
        report = result.report(budget)
        report["sensitivity"] = None
        if result.sensitivity:
            save_sensitivity(
                result.sensitivity,
                self._staging or self.output_dir,
                title=f"{type(pl_module).__name__}, {self.approach}: "
                "relative output error with one layer quantized (most sensitive on top)",
            )
            report["sensitivity"] = "sensitivity.csv"
        keep_float = [*self.keep_float, *(layer["name"] for layer in result.float_layers)]
        return result.model, keep_float, report, float_metrics

    def _evaluate(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        float_model: nn.Module,
        quantized: nn.Module,
        float_metrics: Optional[dict[str, float]] = None,
    ) -> dict[str, Any]:
        loaders, limits = self._validation_batches(trainer)
        if not loaders:
            return {"float": {}, "quantized": {}, "note": "no validation dataloader: nothing to evaluate"}
        evaluation: dict[str, Any] = {
            "float": float_metrics or evaluate_validation(pl_module, float_model, loaders, limits),
            "dataloader": "val",
            "batches": sum(evaluated_batches(loader, limit) for loader, limit in zip(loaders, limits)),
        }
        try:
            evaluation["quantized"] = evaluate_validation(pl_module, quantized, loaders, limits)
        except Exception as err:
            # e.g. validation_step passes the model keywords its files do not take (a Hugging Face batch's labels,
            # for the loss): the files are verified against the float model all the same, so they still ship
            evaluation["quantized"] = {}
            evaluation["note"] = (
                f"validation_step failed on the quantized model ({type(err).__name__}: {first_lines(err, 1)}): no "
                "metrics for it. The files are verified against the float model on the example input. To evaluate "
                "it, have validation_step call forward with what the example input passes, and compute the loss "
                "from its outputs."
            )
            rank_zero_warn(f"{type(self).__name__}: {evaluation['note']}")
        return evaluation

    def _log(self, trainer: Trainer, manifest: dict[str, Any]) -> None:
        flat = manifest_numbers(manifest)
        for logger in trainer.loggers:
            logger.log_metrics(flat, step=trainer.global_step)
            logger.save()
        rank_zero_info(format_table(manifest))


def _unknown_metric(owner: str, metric: str, logged: Sequence[str]) -> str:
    return (
        f"{owner}(max_metric_drop=...) watches {metric!r}, which the LightningModule does not log in "
        f"validation_step. It logs: {list(logged) or '(nothing)'}. Use one of those names, or log {metric!r} "
        "with self.log in validation_step."
    )


def _over_budget_message(owner: str, report: dict[str, Any], manifest_path: Path) -> str:
    unit = f"{report['max_drop']:.4g}" + (" (relative)" if report["relative"] else "")
    layers = [layer["name"] for layer in report["float_layers"]]
    return (
        f"{owner}: accuracy budget NOT met: {report['metric']} went from {report['float']:.4g} (float) to "
        f"{report['after']:.4g} (quantized), a drop of {report['drop']:.4g} against max_drop={unit}; fully quantized it "
        f"was {report['before']:.4g}. The search stopped: {report['stopped']}, after {report['evaluations']} "
        f"validation passes. The best model found (float layers: {layers}) was exported anyway and marked "
        f"within_budget: false in {manifest_path}. Raise max_float_fraction or max_evaluations, loosen max_drop, "
        "keep_float the layers you know are fragile, or train quantization-aware (QuantizationAwareTraining, WeightOnlyQAT)."
    )


def _first_batch(loader: Any, size: Optional[int] = None) -> Any:
    """The loader's first ``size`` samples (default: its ``batch_size``), collated as the loader would, without
    iterating the loader: iterating would advance its sampler's generator and change the order training sees.
    ``None`` for iterable datasets."""
    dataset: Any = getattr(loader, "dataset", None)
    collate = getattr(loader, "collate_fn", None)
    if collate is None or not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__") or len(dataset) == 0:
        return None
    size = min(len(dataset), size or getattr(loader, "batch_size", None) or 1)
    return collate([dataset[i] for i in range(size)])


def _is_empty(loader: Any) -> bool:
    try:
        return len(loader) == 0
    except TypeError:  # an iterable without a length: look at its first batch
        return next(iter(loader), None) is None


def _with_notes(details: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    """``details`` with ``notes`` added to its ``notes`` list."""
    return {**details, "notes": [*details.get("notes", []), *notes]} if notes else details
