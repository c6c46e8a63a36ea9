"""Static int8 after training: calibrate activation ranges on real batches, convert, export, verify."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn

from lightning_quant.callbacks.quantization_base import QuantizationCallback, _is_empty, check_calibration_arguments
from lightning_quant.inputs import ModelInputs
from lightning_quant.quantization import StaticQuantConfig, single_input_channel_convs


class PostTrainingQuantization(QuantizationCallback):
    r"""At fit end, turn the model into calibrated static int8 (torchao PT2E, ``X86InductorQuantizer``).

    The trained model is captured with ``torch.export`` (dynamic batch), observers are inserted
    (``prepare_pt2e``), ``num_calibration_batches`` real batches from the fit's ``calibration_dataloader``
    run through it, and ``convert_pt2e`` folds the ranges into int8 quantize/dequantize pairs. The
    ``"aoti"`` file is that graph lowered by AOTInductor with freezing (fused int8 oneDNN kernels); the
    ``"onnx"`` file is ONNX Runtime's own ``quantize_static`` (QDQ) of the float model with the same batches,
    which is what runs fast in ONNX Runtime; ``"torch_export"`` is the unlowered program.
    See :class:`~lightning_quant.callbacks.quantization_base.QuantizationCallback` for the steps after
    conversion and the shared arguments (``dirpath``, ``formats``, ``example_input``, ``keep_float``,
    ``batch_to_input``, ``dynamic_batch``, ``max_metric_drop``: an accuracy budget that returns the most
    sensitive layers to float until the validation metric is close enough to float's).

    Args:
        num_calibration_batches: how many batches to calibrate on (a few dozen is typical).
        calibration_dataloader: ``"train"`` (default) or ``"val"``: which of the fit's dataloaders to read.
        observer: activation range estimate: ``"histogram"`` (default), ``"minmax"`` or ``"moving_average"``.
        per_channel: one scale per output channel of each weight (default) instead of one per tensor.

    Example::

        >>> import lightning as L
        >>> from lightning_quant.demo import ConvNet, DigitsClassifier, DigitsDataModule
        >>> ptq = PostTrainingQuantization(num_calibration_batches=8, formats=["onnx"])
        >>> trainer = L.Trainer(max_epochs=1, callbacks=[ptq], logger=False)  # doctest: +SKIP
        >>> trainer.fit(DigitsClassifier(ConvNet()), DigitsDataModule())  # doctest: +SKIP
        >>> ptq.manifest["artifacts"][0]["format"]  # doctest: +SKIP
        'onnx'
    """

    approach = "static"
    backend = "x86_inductor"
    supported_formats = ("aoti", "onnx", "openvino", "torch_export")
    default_formats = ("aoti", "onnx", "openvino")  # "openvino" where installed
    reads_batches = True  # calibration: batches of another form than the example are refused before training
    config: StaticQuantConfig

    def __init__(
        self,
        num_calibration_batches: int = 32,
        calibration_dataloader: str = "train",
        observer: str = "histogram",
        per_channel: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        check_calibration_arguments(num_calibration_batches, calibration_dataloader)
        self.config = StaticQuantConfig(
            observer=observer, per_channel=per_channel, keep_float=tuple(self.keep_float), target=self.target
        )
        self.num_calibration_batches = num_calibration_batches
        self.calibration_dataloader = calibration_dataloader

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        # the fit's dataloaders exist from here on: check the calibration data before training time is spent
        loaders = self._dataloaders(trainer, self.calibration_dataloader)
        if not loaders:
            raise ValueError(
                f"{type(self).__name__}(calibration_dataloader={self.calibration_dataloader!r}) found no "
                f"{self.calibration_dataloader} dataloader in this fit; pass one to trainer.fit or choose the other"
            )
        if all(_is_empty(loader) for loader in loaders):
            raise ValueError(
                f"The {self.calibration_dataloader} dataloader is empty: static int8 needs real batches to "
                "calibrate activation ranges on"
            )

    def calibration_inputs(self, trainer: Trainer, inputs: ModelInputs) -> list[ModelInputs]:
        # read once per fit end: every conversion of this fit's model (the accuracy budget's too) calibrates alike
        calibration = list(
            self.model_inputs(trainer, self.calibration_dataloader, self.num_calibration_batches, inputs)
        )
        if len(calibration) < self.num_calibration_batches:
            rank_zero_warn(self._short_calibration_note(calibration))
        return calibration

    def _short_calibration_note(self, calibration: Sequence[ModelInputs]) -> str:
        samples = sum(inputs.batch_size() or 0 for inputs in calibration)
        return (
            f"Calibrated on {len(calibration)} batch(es) ({samples} samples) of the {self.calibration_dataloader} "
            f"dataloader, fewer than num_calibration_batches={self.num_calibration_batches}: activation ranges seen "
            "on so little data may clip real inputs. Give the dataloader more data (or "
            "calibration_dataloader='train'/'val', whichever is larger), or lower num_calibration_batches."
        )

    def manifest_details(
        self, float_model: nn.Module, inputs: ModelInputs, calibration: Sequence[ModelInputs]
    ) -> dict[str, Any]:
        notes = []
        onnx_note = (
            "'onnx' is ONNX Runtime quantize_static (QDQ) of the float model on the same calibration batches, "
            "because the PT2E graph exported as is runs slowly in ONNX Runtime; its scales come from ONNX "
            "Runtime's calibrator, so it is verified against the float model."
        )
        if len(calibration) < self.num_calibration_batches:
            notes.append(self._short_calibration_note(calibration))
        kept_float_automatically = single_input_channel_convs(float_model)
        if kept_float_automatically:
            notes.append(
                f"Kept float automatically: {kept_float_automatically} (convolutions with one input channel: "
                "torch 2.13's AOTInductor miscompiles the int8 conv after them with a dynamic batch)."
            )
        return {
            "calibration": {
                "dataloader": self.calibration_dataloader,
                "batches": len(calibration),
                "batches_requested": self.num_calibration_batches,
                "observer": self.config.observer,
                "per_channel_weights": self.config.per_channel,
            },
            "notes": [
                "The PT2E reference graph (q/dq ops) is exact int8 but slow when run eagerly; 'aoti' is it lowered "
                "by AOTInductor with freezing (fused int8 kernels), 'torch_export' is the unlowered program.",
                onnx_note,
                *notes,
            ],
        }
