"""A small byte-level language model (a decoder-only Transformer) trained on real text with no download: the
Python standard library's own source (:mod:`lightning_quant.demo.text`). Its Linear layers hold nearly all its
weights, which is where int4 weight-only quantization (and QAT for it) pays."""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional, Union

import lightning as L
import torch
from torch import nn
from torch.nn import functional as F
from torchmetrics.text import Perplexity

from lightning_quant.demo.module import adamw_with_cosine_schedule
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

    def forward(
        self,
        x: torch.Tensor,
        cache: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
        positions: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, ...]:
        """``x`` ``(batch, length, width)`` -> ``(x,)``. With ``cache`` (keys and values of the positions so far,
        ``(batch, heads, block_size, head_width)`` each) the queries are at ``positions`` and see every position
        up to theirs: -> ``(x, keys, values)``, this call's keys and values written at ``positions``."""
        batch, length, width = x.shape
        q, k, v = self.qkv(self.attention_norm(x)).view(batch, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        written: tuple[torch.Tensor, ...] = ()
        if cache is None or positions is None:
            attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            keys, values = cache[0].index_copy(2, positions, k), cache[1].index_copy(2, positions, v)
            visible = torch.arange(keys.shape[2], device=x.device) <= positions[:, None]
            attended, written = F.scaled_dot_product_attention(q, keys, values, attn_mask=visible), (keys, values)
        x = x + self.projection(attended.transpose(1, 2).reshape(batch, length, width))
        return x + self.contract(F.gelu(self.expand(self.feed_forward_norm(x)))), *written


class ByteLanguageModel(L.LightningModule):
    """Predicts the next byte of text. ``forward(tokens)`` (long ``(batch, length)``, ``length <= block_size``)
    returns logits ``(batch, length, 256)``: how it trains and is evaluated. ``forward(tokens, cache, position)``
    is one step of generation: ``tokens`` at ``position`` (a 0-d long tensor) onwards, ``cache`` the keys and
    values of the positions before (:meth:`empty_cache`); it returns the logits and then the cache to pass next (``logits, *cache = model(tokens, cache, position)``). The
    example input is that step for one new byte, so the exported files are the generation step a server calls
    (see :func:`generate`). Logs ``{train,val,test}/loss`` and ``{val,test}/perplexity`` (torchmetrics; per
    byte). The defaults (width 256, 4 blocks) hold 3.3M parameters.

    Example::

        >>> model = ByteLanguageModel(width=32, layers=1, heads=2, block_size=16)
        >>> model(torch.zeros(4, 16, dtype=torch.long)).shape
        torch.Size([4, 16, 256])
        >>> logits, *cache = model(*model.example_input_array)
        >>> logits.shape, len(cache), cache[0].shape
        (torch.Size([1, 1, 256]), 2, torch.Size([1, 2, 16, 16]))
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
        # one generation step of one sequence: the call a CPU server makes for every new byte
        self.example_input_array = (torch.zeros(1, 1, dtype=torch.long), self.empty_cache(1), torch.tensor(0))

    def empty_cache(self, batch_size: int) -> tuple[torch.Tensor, ...]:
        """The cache before the first byte: keys and values of each block, ``(batch_size, heads, block_size,
        width // heads)`` zeros each (``2 * layers`` tensors)."""
        width, heads, layers = self.hparams["width"], self.hparams["heads"], self.hparams["layers"]
        shape = (batch_size, heads, self.hparams["block_size"], width // heads)
        return tuple(torch.zeros(shape, device=self.device) for _ in range(2 * layers))

    def forward(
        self,
        tokens: torch.Tensor,
        cache: Optional[tuple[torch.Tensor, ...]] = None,
        position: Optional[torch.Tensor] = None,
    ) -> Union[torch.Tensor, tuple[torch.Tensor, ...]]:
        if (cache is None) != (position is None):
            raise ValueError("a generation step takes both cache and position (see ByteLanguageModel.empty_cache)")
        offsets = torch.arange(tokens.shape[1], device=tokens.device)
        positions = offsets if position is None else position + offsets
        x = self.embedding(tokens) + self.position(positions)
        written: list[torch.Tensor] = []
        for index, block in enumerate(self.blocks):
            x, *layer_cache = block(x, None if cache is None else (cache[2 * index], cache[2 * index + 1]), positions)
            written += layer_cache
        logits = self.head(self.norm(x))
        return logits if cache is None else (logits, *written)

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
        return adamw_with_cosine_schedule(self)


def generate(
    step: Callable[..., tuple[torch.Tensor, ...]], prompt: bytes, new_bytes: int, empty_cache: tuple[torch.Tensor, ...]
) -> bytes:
    """``prompt`` and the ``new_bytes`` most likely bytes after it (greedy), one generation step per byte.
    ``step``: a :class:`ByteLanguageModel` or a file of its generation step loaded with :func:`lightning_quant.load`;
    ``empty_cache``: ``model.empty_cache(1)``. Prompt and new bytes together fit in ``block_size``.

    Example::

        >>> model = ByteLanguageModel(width=32, layers=1, heads=2, block_size=16).eval()
        >>> len(generate(model, b"def ", 5, model.empty_cache(1)))
        9
    """
    if not prompt or len(prompt) + new_bytes > empty_cache[0].shape[2]:
        raise ValueError(f"prompt ({len(prompt)} bytes) + new_bytes ({new_bytes}) must be 1..{empty_cache[0].shape[2]}")
    out, cache = bytearray(prompt), empty_cache
    with torch.no_grad():
        for position in range(len(prompt) + new_bytes - 1):
            logits, *written = step(torch.tensor([[out[position]]]), cache, torch.tensor(position))
            cache = tuple(written)
            if position >= len(prompt) - 1:
                out.append(int(logits[0, -1].argmax()))
    return bytes(out)
