"""A small byte-level language model (a decoder-only Transformer) trained on real text with no download: the
Python standard library's own source (:mod:`lightning_quant.demo.text`). Its Linear layers hold nearly all its
weights, which is where int4 weight-only quantization (and QAT for it) pays."""

from __future__ import annotations

import lightning as L
import torch
from torch import nn
from torch.nn import functional as F
from torchmetrics.text import Perplexity

from lightning_quant.demo.text import VOCAB_SIZE


class DecoderBlock(nn.Module):
    """Pre-norm causal self-attention and a GELU feed-forward of ``4 * width``, both residual."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.attention_norm = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.projection = nn.Linear(width, width)
        self.feed_forward_norm = nn.LayerNorm(width)
        self.expand = nn.Linear(width, 4 * width)
        self.contract = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(self.attention_norm(x)).view(batch, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.projection(attended.transpose(1, 2).reshape(batch, length, width))
        return x + self.contract(F.gelu(self.expand(self.feed_forward_norm(x))))


class ByteLanguageModel(L.LightningModule):
    """Predicts the next byte of text: ``forward(tokens)`` (long ``(batch, length)``, ``length <= block_size``)
    returns logits ``(batch, length, 256)``. Logs ``{train,val,test}/loss`` and ``{val,test}/perplexity``
    (torchmetrics; per byte). The defaults (width 256, 4 blocks) hold 3.3M parameters.

    Example::

        >>> model = ByteLanguageModel(width=32, layers=1, heads=2, block_size=16)
        >>> model(model.example_input_array).shape
        torch.Size([4, 16, 256])
    """

    def __init__(
        self,
        width: int = 256,
        layers: int = 4,
        heads: int = 4,
        block_size: int = 128,
        lr: float = 2e-3,
        weight_decay: float = 0.01,
    ) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width ({width}) must be a multiple of heads ({heads})")
        self.save_hyperparameters()
        self.embedding = nn.Embedding(VOCAB_SIZE, width)
        self.position = nn.Embedding(block_size, width)
        self.blocks = nn.ModuleList(DecoderBlock(width, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, VOCAB_SIZE)
        self.val_perplexity = Perplexity()
        self.test_perplexity = Perplexity()
        # a batch of 4 (export treats a dimension of size 1 as a constant) of full-length blocks
        self.example_input_array = torch.zeros(4, block_size, dtype=torch.long)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embedding(tokens) + self.position(torch.arange(tokens.shape[1], device=tokens.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        tokens, target = batch
        loss = F.cross_entropy(self(tokens).flatten(0, 1), target.flatten())
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def _evaluate(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str, perplexity: Perplexity) -> None:
        tokens, target = batch
        logits = self(tokens)
        perplexity(logits, target)
        self.log(f"{stage}/loss", F.cross_entropy(logits.flatten(0, 1), target.flatten()), sync_dist=True)
        self.log(f"{stage}/perplexity", perplexity, prog_bar=True)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_perplexity)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_perplexity)

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        if self.trainer is None or not self.trainer.max_epochs or self.trainer.max_epochs < 0:
            return optimizer
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.trainer.max_epochs)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}
