"""Train, evaluate and export conv nets in channels-last memory format."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from lightning_quant.memory_format import to_channels_last


class ChannelsLast(Callback):
    r"""Converts the model's 2D convolutions and their 4D inputs to channels-last memory format.

    Channels-last (NHWC) lets oneDNN on CPUs and cuDNN/Tensor Cores on GPUs run convolutions without layout
    conversions: on the 2-core CPU this project is measured on, a small conv net ran float inference 1.4x
    faster. The conversion happens in ``setup`` of every stage (fit, validate, test, predict), before the
    optimizers are built and before a checkpoint is loaded (loading keeps the layout), and stays on the
    model after the run, so exports and artifacts made from it (e.g. by
    :class:`~lightning_quant.OptimizeForInference`) see the channels-last model. Inputs are converted by
    a forward pre-hook on each ``nn.Conv2d``, whatever the batch looks like. A model without ``nn.Conv2d``
    gets a warning and is left untouched.

    Example::

        >>> import lightning as L
        >>> from lightning_quant import ChannelsLast
        >>> from lightning_quant.demo import ConvNet, DigitsClassifier, DigitsDataModule
        >>> trainer = L.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1, callbacks=[ChannelsLast()],
        ...                     logger=False, enable_checkpointing=False, enable_progress_bar=False)
        >>> trainer.fit(DigitsClassifier(ConvNet(channels=8)), datamodule=DigitsDataModule())  # doctest: +SKIP
    """

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        converted = to_channels_last(pl_module)
        if not converted:
            rank_zero_warn(
                f"ChannelsLast: {type(pl_module).__name__} has no nn.Conv2d, and channels-last memory format only "
                "speeds up 2D convolutions, so the model is left as it is. Remove the callback for this model."
            )
        else:
            rank_zero_info(f"ChannelsLast: {len(converted)} Conv2d layers and their inputs are channels-last.")
