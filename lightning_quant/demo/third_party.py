"""Models of architectures nobody here wrote, in LightningModules the way their users write them: a Hugging Face
BERT classifier (dict batches, a ``ModelOutput`` return; needs ``transformers``, a test dependency) and Lightning's
own demo Transformer (``forward(inputs, target)``). The tests and ``benchmarks/bench_real_models.py`` run our
callbacks on them; weights are random-initialised from a config, nothing is downloaded."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.demos import LightningTransformer, Transformer
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from lightning_quant.demo.text import TRAIN_FILES, VAL_FILES, VOCAB_SIZE, StdlibText

TOKENS = 100  # BERT's vocabulary here
SEQUENCE = 16


class Tokens(Dataset):
    """Token-id sequences labelled by whether the first id is in the vocabulary's upper half, as Hugging Face
    style dict samples (``input_ids``, ``attention_mask``, ``token_type_ids``, ``labels``).

    Example::

        >>> sorted(Tokens(4, seed=0)[0])
        ['attention_mask', 'input_ids', 'labels', 'token_type_ids']
    """

    def __init__(self, n: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, TOKENS, (n, SEQUENCE), generator=generator)
        self.mask = torch.ones(n, SEQUENCE, dtype=torch.long)
        self.mask[n // 2 :, 12:] = 0  # some padding
        self.labels = (self.ids[:, 0] >= TOKENS // 2).long()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.ids[i],
            "attention_mask": self.mask[i],
            "labels": self.labels[i],
            "token_type_ids": torch.zeros(SEQUENCE, dtype=torch.long),
        }


class BertClassifier(L.LightningModule):
    """``transformers.BertForSequenceClassification`` from a small ``BertConfig``; ``forward`` returns its
    ``SequenceClassifierOutput``."""

    def __init__(self, hidden_size: int = 64, layers: int = 2) -> None:
        super().__init__()
        import transformers  # a test dependency, imported only by the model that needs it

        config = transformers.BertConfig(  # type: ignore[call-arg]  # num_labels: a PretrainedConfig keyword
            vocab_size=TOKENS,
            hidden_size=hidden_size,
            num_hidden_layers=layers,
            num_attention_heads=2,
            intermediate_size=2 * hidden_size,
            max_position_embeddings=2 * SEQUENCE,
            num_labels=2,
        )
        self.bert = transformers.BertForSequenceClassification(config)
        self.example_input_array = {
            "input_ids": torch.randint(0, TOKENS, (4, SEQUENCE)),
            "attention_mask": torch.ones(4, SEQUENCE, dtype=torch.long),
        }

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> Any:
        return self.bert(input_ids=input_ids, attention_mask=attention_mask)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = F.cross_entropy(self(batch["input_ids"], batch["attention_mask"]).logits, batch["labels"])
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits = self(batch["input_ids"], batch["attention_mask"]).logits
        self.log("val/loss", F.cross_entropy(logits, batch["labels"]))
        self.log("val/acc", (logits.argmax(1) == batch["labels"]).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), 1e-3)


class DemoTransformer(LightningTransformer):
    """Lightning's demo language model (``lightning.pytorch.demos``), smaller, trained on standard-library bytes
    instead of WikiText2 (no download). Its ``forward(inputs, target)`` takes the batch's two tensors."""

    def __init__(self, width: int = 64, layers: int = 1, block_size: int = 32, max_bytes: int = 20_000) -> None:
        super().__init__(vocab_size=VOCAB_SIZE)
        self.model = Transformer(vocab_size=VOCAB_SIZE, ninp=width, nhead=2, nhid=width, nlayers=layers, dropout=0.0)
        self.block_size, self.max_bytes = block_size, max_bytes
        self.example_input_array = tuple(
            torch.stack(pair) for pair in zip(*[StdlibText(VAL_FILES, block_size)[i] for i in range(4)])
        )

    def prepare_data(self) -> None:  # LightningTransformer downloads WikiText2 here
        pass

    def train_dataloader(self) -> DataLoader:
        return DataLoader(StdlibText(TRAIN_FILES, self.block_size, max_bytes=self.max_bytes), batch_size=8)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(StdlibText(VAL_FILES, self.block_size, max_bytes=self.max_bytes // 4), batch_size=8)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        inputs, target = batch
        loss = F.nll_loss(self(inputs, target), target.view(-1))
        self.log("val/loss", loss)
