"""Quantization-aware training for weight-only quantization: fake-quantized Linear (Conv1D) and Embedding weights from ``start_epoch``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from torch import nn

from lightning_quant.callbacks.weight_only_quantization import WeightOnlyQuantization
from lightning_quant.inputs import ModelInputs
from lightning_quant.quantization.weight_only import prepare_qat, remove_qat


class WeightOnlyQAT(WeightOnlyQuantization):
    r"""Train the last epochs with Linear and Embedding weights rounded to the ``bits``-bit grid (straight-through gradient),
    then ship them like :class:`WeightOnlyQuantization`: the rounding the model learned to absorb is exactly the
    one the files store.

    From epoch ``start_epoch`` on, every quantizable ``nn.Linear`` and ``nn.Embedding`` computes with its weight fake-quantized; the
    parameters themselves (what the optimizer updates and checkpoints hold) stay float and keep their names, so
    checkpoints load into the plain model and a resumed fit fake-quantizes again from ``start_epoch``. At fit end
    the fake quantization is removed from the module (it is the float model again, with the QAT-trained weights)
    and the weights are quantized on the same grid.

    Args:
        start_epoch: the first epoch trained fake-quantized (0: all of training). A few epochs of float training
            first, then one or two quantized, is typical for fine-tuning a trained model.
        bits, group_size and the shared arguments: see :class:`WeightOnlyQuantization`.

    Example::

        >>> WeightOnlyQAT(start_epoch=2, bits=4).start_epoch
        2
    """

    approach = "weight_only_qat"

    def __init__(
        self,
        start_epoch: int = 0,
        **kwargs: Any,
    ) -> None:
        if isinstance(start_epoch, bool) or not isinstance(start_epoch, int) or start_epoch < 0:
            raise ValueError(
                f"start_epoch must be a non-negative integer (the first fake-quantized epoch), got {start_epoch!r}"
            )
        if kwargs.get("method", "rtn") != "rtn":
            raise ValueError(
                f"WeightOnlyQAT trains the weights for round to nearest, the grid its files store: method must be "
                f"'rtn', got {kwargs['method']!r} (the data methods are for WeightOnlyQuantization, after training)"
            )
        super().__init__(**kwargs)
        self.start_epoch = start_epoch

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.current_epoch >= self.start_epoch:
            prepare_qat(pl_module, self.config)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        remove_qat(pl_module)
        super().on_fit_end(trainer, pl_module)

    def manifest_details(
        self, float_model: nn.Module, inputs: ModelInputs, calibration: Sequence[ModelInputs]
    ) -> dict[str, Any]:
        details = super().manifest_details(float_model, inputs, calibration)
        details["qat"] = {"start_epoch": self.start_epoch}
        return details
