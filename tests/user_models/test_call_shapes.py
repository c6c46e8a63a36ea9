"""LightningModules whose forward is called the ways users write it: keyword arguments, several positional inputs
split out of the batch by ``training_step`` itself, no ``example_input_array`` at all (Lightning's demo
``LightningTransformer`` as it ships), and a recurrent layer with a format that cannot carry it."""

from __future__ import annotations

import textwrap
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import fast_trainer, produced_formats, run_files_alone
from lightning.pytorch.demos import LightningTransformer, WikiText2
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_quant import DynamicQuantization, OptimizeForInference, PostTrainingQuantization


class KeywordsModule(L.LightningModule):
    """``forward(x, y, scale=1.0)``, called with keywords everywhere (the example too)."""

    def __init__(self) -> None:
        super().__init__()
        self.x_proj, self.y_proj, self.head = nn.Linear(8, 32), nn.Linear(4, 32), nn.Linear(32, 2)
        self.example_input_array = {"x": torch.randn(4, 8), "y": torch.randn(4, 4), "scale": 0.5}

    def forward(self, x, y, scale=1.0):
        return self.head(torch.relu(self.x_proj(x) + self.y_proj(y))) * scale

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(x=batch["x"], y=batch["y"], scale=0.5), batch["label"])

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), 1e-3)


def keyword_batches(n: int = 64) -> list[dict[str, torch.Tensor]]:
    x, y = torch.randn(n, 8), torch.randn(n, 4)
    return [{"x": x[i], "y": y[i], "label": (x[i, 0] > 0).long()} for i in range(n)]


class KeywordOnlyMask(L.LightningModule):
    """A keyword-only argument, and the example a dict."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(8, 2)
        self.example_input_array = {"x": torch.randn(4, 8), "mask": torch.ones(4, 2)}

    def forward(self, x, *, mask):
        return self.net(x) * mask

    def training_step(self, batch, batch_idx):
        x, label = batch
        return F.cross_entropy(self(x, mask=torch.ones(len(x), 2)), label)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), 1e-3)


@pytest.mark.parametrize("module", [KeywordsModule, KeywordOnlyMask])
def test_optimize_for_inference_on_a_module_called_with_keywords(module, tmp_path):
    callback = OptimizeForInference(formats=["onnx", "torch_export"])
    data = (
        keyword_batches() if module is KeywordsModule else TensorDataset(torch.randn(64, 8), torch.randint(0, 2, (64,)))
    )
    fast_trainer(tmp_path, [callback], limit_val_batches=0).fit(module(), DataLoader(data, batch_size=8))
    assert produced_formats(callback.manifest) == {"onnx", "torch_export"}
    assert callback.manifest["manual_attention"] == []
    # the files take forward's canonical call: positional-or-keyword arguments positional, keyword-only by name
    x = torch.randn(3, 8)
    call = ((x, torch.randn(3, 4), 0.5), {}) if module is KeywordsModule else ((x,), {"mask": torch.ones(3, 2)})
    outputs = run_files_alone(callback.dirpath, *call[0], **call[1])
    assert outputs and all(tensors[0].shape == (3, 2) for tensors in outputs.values())
    if module is KeywordsModule:  # the files fix scale at the example's 0.5; another scale runs the model itself
        x, y = torch.randn(3, 8), torch.randn(3, 4)
        deployed = callback.quantized_model
        assert torch.allclose(deployed(x=x, y=y, scale=1.0), 2 * deployed(x=x, y=y, scale=0.5), atol=1e-5)


class TwoInputs(L.LightningModule):
    """``forward(a, b, scale=1.0)``; batches are ``(x, y)`` and ``training_step`` splits ``x`` into ``a`` and ``b``
    itself, so a batch is not a call of forward (no batch_to_input given)."""

    def __init__(self) -> None:
        super().__init__()
        self.a_proj, self.b_proj, self.head = nn.Linear(8, 32), nn.Linear(4, 32), nn.Linear(32, 2)
        self.example_input_array = (torch.randn(4, 8), torch.randn(4, 4))

    def forward(self, a, b, scale=1.0):
        return self.head(torch.relu(self.a_proj(a) + self.b_proj(b))) * scale

    def split(self, batch):
        x, y = batch
        return x[:, :8], x[:, 8:], y

    def training_step(self, batch, batch_idx):
        a, b, y = self.split(batch)
        return F.cross_entropy(self(a, b), y)

    def validation_step(self, batch, batch_idx):
        a, b, y = self.split(batch)
        self.log("val/acc", (self(a, b).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), 1e-3)


def split_batches(n: int) -> DataLoader:
    x = torch.randn(n, 12)
    return DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=8)


def test_batches_that_are_not_a_call_of_forward_verify_on_the_example(tmp_path):
    callback = DynamicQuantization(formats=["onnx", "torch_export"])
    fast_trainer(tmp_path, [callback]).fit(TwoInputs(), split_batches(64), split_batches(32))
    manifest = callback.manifest
    assert produced_formats(manifest) == {"onnx", "torch_export"}
    outputs = run_files_alone(callback.dirpath, torch.randn(3, 8), torch.randn(3, 4), 1.0)  # defaults bound too
    assert all(tensors[0].shape == (3, 2) for tensors in outputs.values()) and outputs
    assert manifest["latency_ms"]["input_shape"] == [4, 8]  # timed on the example, not on a batch
    note = " ".join(manifest["notes"])
    assert "batch_to_input" in note and "example" in note
    assert set(manifest["metrics"]["quantized"]) == {"val/acc"}  # validation_step ran on the int8 model


def test_calibration_on_batches_that_are_not_a_call_of_forward_fails_before_training(tmp_path):
    trainer = fast_trainer(tmp_path, [PostTrainingQuantization()])
    with pytest.raises(ValueError, match=r"(?s)batch_to_input=lambda batch.*before training") as error:
        trainer.fit(TwoInputs(), split_batches(64), split_batches(32))
    assert "[12]" in str(error.value) and "[8]" in str(error.value)  # what differs: the feature sizes
    assert trainer.global_step == 0


@pytest.mark.slow
def test_lightnings_demo_transformer_without_an_example_input(tmp_path, monkeypatch):
    # LightningTransformer as it ships: its prepare_data reads ./data/wikitext-2.txt (downloading it if absent)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "wikitext-2.txt").write_text(Path(textwrap.__file__).read_text()[:4000] * 5)
    dataset = WikiText2()
    model = LightningTransformer(vocab_size=dataset.vocab_size)
    callback = DynamicQuantization(formats=["torch_export"])
    torch.manual_seed(0)
    trainer = fast_trainer(tmp_path, [callback], limit_train_batches=2)
    trainer.fit(model, DataLoader(dataset, batch_size=4))
    manifest = callback.manifest
    assert manifest["status"] == "ok", manifest
    assert any("first batch of the training dataloader" in note for note in manifest["notes"])
    assert [t["shape"] for t in manifest["input"]["tensors"]] == [[4, 35], [4, 35]]
    inputs, target = torch.randint(0, dataset.vocab_size, (3, 35)), torch.randint(0, dataset.vocab_size, (3, 35))
    outputs = run_files_alone(callback.dirpath, inputs, target)  # another batch size, without lightning_quant
    assert outputs.keys() == {"torch_export"} and outputs["torch_export"][0].shape == (3 * 35, dataset.vocab_size)


class GRUTagger(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(8, 16, batch_first=True)
        self.head = nn.Linear(16, 2)
        self.example_input_array = torch.randn(4, 5, 8)

    def forward(self, x):
        return self.head(self.gru(x)[0][:, -1])

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), 1e-3)


def test_a_gru_with_aoti_is_refused_before_training(tmp_path):
    trainer = fast_trainer(tmp_path, [DynamicQuantization(formats=["aoti"])])
    data = DataLoader(TensorDataset(torch.randn(16, 5, 8), torch.randint(0, 2, (16,))), batch_size=4)
    with pytest.raises(ValueError, match=r"recurrent layers \['gru'\].*formats \['aoti'\]"):
        trainer.fit(GRUTagger(), data)
    assert trainer.global_step == 0
