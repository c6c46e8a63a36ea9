"""Quantization-aware training: train with fake-quant from ``start_epoch``, then int8 like the PTQ callbacks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn

from lightning_quant.callbacks.quantization_base import QuantizationCallback
from lightning_quant.inputs import ModelInputs
from lightning_quant.pipeline import float_copy
from lightning_quant.quantization import QuantizationError, single_input_channel_convs
from lightning_quant.quantization.fallback import convert_keeping_float
from lightning_quant.quantization.qat import QATConfig, QATGraph, prepare_qat

STAGES = ("train", "validate", "test", "predict")


class QuantizationAwareTraining(QuantizationCallback):
    r"""Insert fake-quant into the model from ``start_epoch``, keep training, and at fit end convert to int8.

    The LightningModule's ``forward`` is captured with ``torch.export`` (dynamic batch) and fake-quant
    modules are inserted with torchao's ``prepare_qat_pt2e`` and ``X86InductorQuantizer(is_qat=True)``.
    From then on ``self(...)`` in the module's steps runs that graph, computing with the module's own
    parameters and buffers: the optimizer, ``ModelPruning``, checkpoints and DDP keep acting on the module
    as before, and ``state_dict()`` keeps its keys (a checkpoint loads into the float module). The
    fake-quant state (ranges, scales) is the callback's state, saved in and restored from checkpoints,
    also by ``trainer.validate/test/predict(ckpt_path=...)``.

    At fit end the model is converted (``convert_pt2e``) and exported exactly like
    :class:`~lightning_quant.PostTrainingQuantization` (``manifest.json`` with ``approach: "qat"``); the
    LightningModule itself stays the fake-quant model, so ``trainer.validate/test`` afterwards measure what
    the int8 model computes. See
    :class:`~lightning_quant.callbacks.quantization_base.QuantizationCallback` for the shared arguments
    (``dirpath``, ``formats``, ``example_input``, ``keep_float``, ``batch_to_input``, ``dynamic_batch``).
    With ``max_metric_drop`` (an accuracy budget), layers the search returns to float after training are
    converted from the trained graph with their fake-quant bypassed (no retraining).

    Args:
        start_epoch: the epoch at which fake-quant starts; the epochs before train in float (warm-up).
        freeze_bn_epoch: from this epoch BatchNorm normalises with its running statistics and stops
            updating them (the standard last-epochs QAT recipe). ``None``: never.
        freeze_observer_epoch: from this epoch quantization ranges stop moving. ``None``: never.
        observer: how activation ranges are tracked: ``"moving_average"`` (default), ``"minmax"`` or
            ``"histogram"`` (slow), as in :class:`~lightning_quant.PostTrainingQuantization`.
        per_channel: one weight scale per output channel (default) instead of one per tensor.
        observer_enabled_stages: the stages in which ranges may move, from ``"train"``, ``"validate"``,
            ``"test"``, ``"predict"``. Default ``("train",)``: evaluation never moves them.
        quantize_on_fit_end: convert and export at fit end (default). ``False`` leaves a float-in/float-out
            fake-quant model that can be fit again.

    Under DDP, ranges are reduced across processes after every step they move in (exactly what one process
    seeing every rank's batch would hold) and only rank zero exports; the others wait.

    Example::

        >>> import lightning as L
        >>> from lightning_quant.demo import ConvNet, DigitsClassifier, DigitsDataModule
        >>> qat = QuantizationAwareTraining(start_epoch=1, freeze_bn_epoch=3, freeze_observer_epoch=4, formats=["onnx"])
        >>> trainer = L.Trainer(max_epochs=5, callbacks=[qat], logger=False)  # doctest: +SKIP
        >>> trainer.fit(DigitsClassifier(ConvNet()), DigitsDataModule())  # doctest: +SKIP
        >>> qat.manifest["approach"]  # doctest: +SKIP
        'qat'
    """

    approach = "qat"
    backend = "x86_inductor"
    supported_formats = ("aoti", "onnx", "openvino", "torch_export")
    default_formats = ("aoti", "onnx", "openvino")  # "openvino" where installed
    config: QATConfig

    def __init__(
        self,
        start_epoch: int = 0,
        freeze_bn_epoch: Optional[int] = None,
        freeze_observer_epoch: Optional[int] = None,
        observer: str = "moving_average",
        per_channel: bool = True,
        observer_enabled_stages: Sequence[str] = ("train",),
        quantize_on_fit_end: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not _is_epoch(start_epoch):
            raise ValueError(f"start_epoch must be an integer >= 0, got {start_epoch!r}")
        for name, epoch in (("freeze_bn_epoch", freeze_bn_epoch), ("freeze_observer_epoch", freeze_observer_epoch)):
            if epoch is not None and not (_is_epoch(epoch) and epoch >= start_epoch):
                raise ValueError(
                    f"{name} must be None (never) or an integer >= start_epoch ({start_epoch}), got {epoch!r}"
                )
        self.config = QATConfig(
            observer=observer, per_channel=per_channel, keep_float=tuple(self.keep_float), target=self.target
        )
        stages = (observer_enabled_stages,) if isinstance(observer_enabled_stages, str) else observer_enabled_stages
        unknown = [s for s in stages if s not in STAGES]
        if unknown or not stages:
            raise ValueError(
                f"observer_enabled_stages must be a non-empty list from {list(STAGES)}, got {observer_enabled_stages!r}"
            )
        if not isinstance(quantize_on_fit_end, bool):
            raise TypeError(f"quantize_on_fit_end must be True or False, got {quantize_on_fit_end!r}")
        self.start_epoch = start_epoch
        self.freeze_bn_epoch = freeze_bn_epoch
        self.freeze_observer_epoch = freeze_observer_epoch
        self.observer_enabled_stages = tuple(stages)
        self.quantize_on_fit_end = quantize_on_fit_end
        self.qat: Optional[QATGraph] = None
        self._started_epoch: Optional[int] = None
        # fake-quant state read from a checkpoint (None: the checkpoint holds a float model), applied at the
        # next stage start, when the module is at hand
        self._restore_pending = False
        self._restored_state: Optional[dict[str, Any]] = None

    # ------------------------------------------------------------------ fit
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        max_epochs = trainer.max_epochs
        if stage == "fit" and self.qat is None and max_epochs is not None and 0 <= max_epochs <= self.start_epoch:
            raise ValueError(
                f"start_epoch={self.start_epoch} but the Trainer stops after max_epochs={max_epochs}: fake-quant "
                "would never start. Lower start_epoch or raise max_epochs."
            )

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._apply_restored(trainer, pl_module)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._apply_restored(trainer, pl_module)  # strategies that restore checkpoints after on_fit_start
        epoch = trainer.current_epoch
        if self.qat is None and epoch >= self.start_epoch:
            self._start(trainer, pl_module, epoch)
        if self.qat is None:
            return
        if self.freeze_bn_epoch is not None and epoch >= self.freeze_bn_epoch and not self.qat.batchnorm_frozen:
            self.qat.freeze_batchnorm()

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.quantize_on_fit_end:
            return
        if self.qat is None:
            raise QuantizationError(
                f"Fit ended at epoch {trainer.current_epoch} before QAT's start_epoch={self.start_epoch}: there is "
                "no fake-quant model to convert. Lower start_epoch, or use PostTrainingQuantization."
            )
        self.qat.sync_observers()  # every rank, before rank zero converts
        # the shared path copies, binds and evaluates the module's own (float) forward: the graph stays attached
        super().on_fit_end(trainer, pl_module)

    # ------------------------------------------------------------------ ranges move only where allowed
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._enter_stage(trainer, "train")

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._enter_stage(trainer, "validate")

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._enter_stage(trainer, "test")

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._enter_stage(trainer, "predict")

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._leave_stage(trainer)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._leave_stage(trainer)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._leave_stage(trainer)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._leave_stage(trainer)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "qat": self.qat.state_dict() if self.qat is not None else None,
            "started_epoch": self._started_epoch,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._restore_pending, self._restored_state = True, state_dict.get("qat")
        self._started_epoch = state_dict.get("started_epoch")

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        if self.state_key not in checkpoint.get("callbacks", {}):
            self._restore_pending, self._restored_state = True, None  # no QAT state: a float model

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._apply_restored(trainer, pl_module)

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._apply_restored(trainer, pl_module)

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._apply_restored(trainer, pl_module)

    # ------------------------------------------------------------------ QuantizationCallback
    def convert(
        self,
        pl_module: LightningModule,
        inputs: ModelInputs,
        calibration: Sequence[ModelInputs],
        keep_float: Sequence[str],
    ) -> nn.Module:
        if self.qat is None:  # on_fit_end refuses this case first, with the fix
            raise QuantizationError("QuantizationAwareTraining: no fake-quant model to convert")
        # keep_float at prepare time has no fake-quant at all; names added since (the accuracy budget's) are
        # bypassed in a copy of the trained graph
        added = [name for name in keep_float if name not in self.config.keep_float]
        return convert_keeping_float(self._graph_serving(pl_module, inputs), added)

    def manifest_details(
        self, float_model: nn.Module, inputs: ModelInputs, calibration: Sequence[ModelInputs]
    ) -> dict[str, Any]:
        return {
            "qat": {
                "started_epoch": self._started_epoch,
                "start_epoch": self.start_epoch,
                "freeze_bn_epoch": self.freeze_bn_epoch,
                "freeze_observer_epoch": self.freeze_observer_epoch,
                "observer": self.config.observer,
                "per_channel_weights": self.config.per_channel,
                "observer_enabled_stages": list(self.observer_enabled_stages),
                "fake_quant_modules": self.qat.num_fake_quantizers if self.qat is not None else 0,
                # as in static int8: torch 2.13's AOTInductor miscompiles the int8 conv after such a conv
                "kept_float_automatically": single_input_channel_convs(float_model),
            },
            "notes": [
                "'float' metrics are the QAT-trained weights run without fake-quant; 'quantized' is the int8 model "
                "with QAT's ranges ('aoti' is it lowered by AOTInductor with freezing, 'torch_export' unlowered).",
                "'onnx' is the converted PT2E graph exported as is: ONNX Runtime runs QAT's own ranges and grid "
                "(re-quantizing QAT-trained weights with ONNX Runtime's own ranges, as static int8 does, moved the "
                "logits by 13% in the benchmark).",
            ],
        }

    # ------------------------------------------------------------------ internals
    def _start(self, trainer: Trainer, pl_module: LightningModule, epoch: int) -> None:
        self.qat = self._prepare(trainer, pl_module)
        self.qat.attach()
        self._started_epoch = epoch
        rank_zero_info(
            f"QuantizationAwareTraining: fake-quant on from epoch {epoch} ({self.qat.num_fake_quantizers} fake-quant modules)"
        )

    def _prepare(self, trainer: Trainer, pl_module: LightningModule) -> QATGraph:
        inputs = self._resolve_example_inputs(trainer, pl_module)
        qat = prepare_qat(pl_module, self._training_call(trainer, pl_module, inputs), self.config)
        qat.observers_enabled = False  # until a batch of a stage in observer_enabled_stages starts
        return qat

    def _training_call(self, trainer: Trainer, pl_module: LightningModule, inputs: ModelInputs) -> ModelInputs:
        """The call the fake-quant graph is captured on: the example ``inputs``, or the first training batch when
        it passes other arguments (a Hugging Face batch's ``labels`` to ``forward(**inputs)`` or to
        ``forward(input_ids, labels=None)``: the model computes its loss from them), so that training_step's
        ``self(**batch)`` runs the graph. A batch that does not bind to forward leaves the example."""
        batch = self.first_training_batch(trainer)
        if batch is None:
            return inputs
        try:
            call = self._batch_inputs(batch, pl_module, "train")  # every argument the batch passes
        except ValueError:
            return inputs
        return call if call.form() != inputs.form() else inputs

    def _graph_serving(self, pl_module: LightningModule, inputs: ModelInputs) -> QATGraph:
        """The trained graph if it takes ``inputs`` (the example the files serve); else the same model captured on
        ``inputs``, with the trained graph's fake-quant ranges (a graph trained with ``labels`` computes a loss
        the files have no input for)."""
        assert self.qat is not None
        if self.qat.takes(inputs):
            return self.qat
        serving = prepare_qat(float_copy(pl_module), inputs, self.config)
        serving.load_state_dict(self.qat.state_dict())
        return serving

    def _apply_restored(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Make the module match the checkpoint just loaded: fake-quant with its ranges, or float."""
        if not self._restore_pending:
            return
        self._restore_pending = False
        if self.qat is not None and (self._restored_state is None or self.qat.model is not pl_module):
            self.qat.detach()
            self.qat = None
        if self._restored_state is None:
            return
        if self.qat is None:
            self.qat = self._prepare(trainer, pl_module)
        self.qat.load_state_dict(self._restored_state)
        self.qat.observers_enabled = False
        self.qat.attach()

    def _enter_stage(self, trainer: Trainer, stage: str) -> None:
        if self.qat is None:
            return
        frozen = self.freeze_observer_epoch is not None and trainer.current_epoch >= self.freeze_observer_epoch
        self.qat.observers_enabled = stage in self.observer_enabled_stages and not frozen

    def _leave_stage(self, trainer: Trainer) -> None:
        # ranges move only inside batches of an allowed stage: not in forwards elsewhere (model summary,
        # setup checks, the user's own calls)
        if self.qat is not None and self.qat.observers_enabled:
            if trainer.world_size > 1:
                self.qat.sync_observers()
            self.qat.observers_enabled = False


def _is_epoch(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
