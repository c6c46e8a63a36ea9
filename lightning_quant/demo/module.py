"""The LightningModule the demo app trains: any net from :mod:`lightning_quant.demo.nets` on digits."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy


class DigitsClassifier(L.LightningModule):
    """Trains ``net`` on digits and logs ``{train,val,test}/loss`` and ``{val,test}/acc`` with torchmetrics.

    Example::

        >>> from lightning_quant.demo import ConvNet
        >>> model = DigitsClassifier(ConvNet(channels=8))
        >>> model(model.example_input_array).shape
        torch.Size([4, 10])
    """

    def __init__(self, net: nn.Module, lr: float = 3e-3, weight_decay: float = 1e-4, num_classes: int = 10) -> None:
        super().__init__()
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}")
        self.save_hyperparameters(ignore=["net"])
        self.net = net
        self.loss = nn.CrossEntropyLoss()
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        # A batch of 4, not 1: export treats a dimension of size 1 as a constant.
        self.example_input_array = torch.zeros(4, 1, 8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = self.loss(self(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def _evaluate(self, batch, stage: str, accuracy: MulticlassAccuracy) -> None:
        x, y = batch
        logits = self(x)
        accuracy(logits, y)
        self.log(f"{stage}/loss", self.loss(logits, y), sync_dist=True)
        self.log(f"{stage}/acc", accuracy, prog_bar=True)

    def validation_step(self, batch, batch_idx):
        self._evaluate(batch, "val", self.val_acc)

    def test_step(self, batch, batch_idx):
        self._evaluate(batch, "test", self.test_acc)

    def predict_step(self, batch, batch_idx):
        return self(batch[0] if isinstance(batch, (list, tuple)) else batch).argmax(dim=1)

    def configure_optimizers(self):
        return adamw_with_cosine_schedule(self)


def adamw_with_cosine_schedule(module: L.LightningModule) -> Any:
    """AdamW (``module.hparams.lr``, ``weight_decay``) with the learning rate annealed over ``max_epochs`` (no
    schedule when the trainer has no epoch limit): what the demo modules' ``configure_optimizers`` return."""
    hparams = module.hparams
    optimizer = torch.optim.AdamW(module.parameters(), lr=hparams["lr"], weight_decay=hparams["weight_decay"])
    trainer = module._trainer  # None outside a fit (module.trainer raises then)
    if trainer is None or not trainer.max_epochs or trainer.max_epochs < 0:
        return optimizer
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=trainer.max_epochs)
    return {"optimizer": optimizer, "lr_scheduler": scheduler}
