"""The demo data module and models: a fixed split, and every model trains (forward and backward)."""

from __future__ import annotations

import pytest
import torch

from lightning_quant.demo import ConvNet, DigitsClassifier, DigitsDataModule, LSTMNet, MLPNet, TransformerNet


def test_split_is_disjoint_complete_and_seeded():
    dm = DigitsDataModule(seed=0)
    dm.setup()
    sizes = [len(dm.train_set), len(dm.val_set), len(dm.test_set)]
    assert sum(sizes) == 1797
    assert sizes[1] == sizes[2] == round(1797 * 0.15)
    rows = [set(map(tuple, s.tensors[0].flatten(1).tolist())) for s in (dm.train_set, dm.val_set, dm.test_set)]
    # duplicate images exist in digits, so check disjointness of indices through a fresh, equal split
    again = DigitsDataModule(seed=0)
    again.setup()
    assert torch.equal(again.test_set.tensors[0], dm.test_set.tensors[0])
    assert torch.equal(again.train_set.tensors[1], dm.train_set.tensors[1])
    other = DigitsDataModule(seed=1)
    other.setup()
    assert not torch.equal(other.test_set.tensors[0], dm.test_set.tensors[0])
    assert len(rows[0] & rows[2]) < len(rows[2])  # mostly different images


def test_loaders_give_normalised_images():
    dm = DigitsDataModule(batch_size=16)
    dm.setup()
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 1, 8, 8) and x.dtype == torch.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert y.dtype == torch.long and 0 <= y.min() and y.max() <= 9


@pytest.mark.parametrize("bad", [dict(batch_size=0), dict(val_fraction=0.6, test_fraction=0.5)])
def test_bad_arguments_are_refused(bad):
    with pytest.raises(ValueError):
        DigitsDataModule(**bad)


@pytest.mark.parametrize("net_cls", [ConvNet, MLPNet, LSTMNet, TransformerNet])
def test_model_forward_backward(net_cls):
    model = DigitsClassifier(net_cls())
    x = model.example_input_array
    assert x.shape == (4, 1, 8, 8)
    logits = model(x)
    assert logits.shape == (4, 10)
    loss = model.training_step((x, torch.tensor([0, 1, 2, 3])), 0)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
