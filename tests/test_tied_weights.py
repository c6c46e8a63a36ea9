"""Tied weights (a language model's output layer reading its token embedding's table, as GPT-2's ``lm_head`` does)
through every approach, on a small model without Lightning."""

from __future__ import annotations

import torch
from torch import nn

from lightning_quant.quantization.qat import prepare_qat

VOCAB, WIDTH = 50, 32


class TiedLM(nn.Module):
    """Embedding -> Linear -> ReLU -> head, the head's weight the embedding's table (one Parameter, two names)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.hidden = nn.Linear(WIDTH, WIDTH)
        self.head = nn.Linear(WIDTH, VOCAB, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.hidden(self.embed(ids))))


def token_batch(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, 8), generator=torch.Generator().manual_seed(seed))


def test_qat_of_tied_weights_trains_evaluates_and_converts_with_the_shared_tensor():
    torch.manual_seed(0)
    model = TiedLM()
    qat = prepare_qat(model, token_batch(4))
    qat.attach()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(3):
        logits = model(token_batch(8, step))
        nn.functional.cross_entropy(logits.flatten(0, 1), token_batch(8, step).flatten()).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert model.head.weight is model.embed.weight  # training kept the tie
    model.eval()
    ids = token_batch(3, seed=9)
    fake_quant = model(ids)  # the eval graph holds the shared table under one of its two names
    int8 = qat.convert()
    assert torch.allclose(int8(ids), fake_quant, atol=0.05 * fake_quant.abs().max().item())
    # the int8 model looks tokens up in the trained table (float: x86 int8 has no int8 embedding)
    (lookup,) = [n for n in int8.graph.nodes if n.target is torch.ops.aten.embedding.default]
    assert torch.equal(int8.get_parameter(lookup.args[0].target), model.embed.weight)
