"""Models users bring, not our demo nets: a Hugging Face BERT with dict batches and a ModelOutput, and a ResNet with
torchvision's block structure (one ReLU module called twice), through a real Trainer."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from lightning_quant import (
    ChannelsLast,
    DynamicQuantization,
    OptimizeForInference,
    PostTrainingQuantization,
    QuantizationAwareTraining,
)
from lightning_quant.demo import DigitsClassifier, DigitsDataModule, ResNet

transformers = pytest.importorskip("transformers")  # a test dependency: pip install -e ".[test]"


class Tokens(Dataset):
    """Token-id sequences whose label is whether the first id is above the vocabulary's middle."""

    def __init__(self, n: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, 100, (n, 16), generator=generator)
        self.mask = torch.ones(n, 16, dtype=torch.long)
        self.mask[n // 2:, 12:] = 0  # some padding
        self.labels = (self.ids[:, 0] >= 50).long()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:  # a Hugging Face style batch: a dict with labels
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i],
                "token_type_ids": torch.zeros(16, dtype=torch.long)}


class BertClassifier(L.LightningModule):
    """``BertForSequenceClassification`` from a small config (random weights, nothing downloaded)."""

    def __init__(self) -> None:
        super().__init__()
        config = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=128, max_position_embeddings=32, num_labels=2)
        self.bert = transformers.BertForSequenceClassification(config)
        self.example_input_array = {"input_ids": torch.randint(0, 100, (4, 16)),
                                    "attention_mask": torch.ones(4, 16, dtype=torch.long)}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> Any:
        return self.bert(input_ids=input_ids, attention_mask=attention_mask)  # a SequenceClassifierOutput

    def training_step(self, batch, batch_idx):
        loss = F.cross_entropy(self(batch["input_ids"], batch["attention_mask"]).logits, batch["labels"])
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        logits = self(batch["input_ids"], batch["attention_mask"]).logits
        self.log("val/loss", F.cross_entropy(logits, batch["labels"]))
        self.log("val/acc", (logits.argmax(1) == batch["labels"]).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), 1e-3)



def fit_bert(callback, tmp_path: Path) -> dict:
    trainer = L.Trainer(default_root_dir=tmp_path, callbacks=[callback], logger=False, max_epochs=1,
                        limit_train_batches=3, limit_val_batches=1, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(BertClassifier(), DataLoader(Tokens(64, 0), batch_size=8), DataLoader(Tokens(32, 1), batch_size=8))
    return json.loads((Path(callback.dirpath) / "manifest.json").read_text())


RELOAD_WITHOUT_US = """
import sys, torch, onnxruntime, numpy as np
folder = sys.argv[1]
ids, mask = torch.randint(0, 100, (3, 16)), torch.ones(3, 16, dtype=torch.long)
aoti = torch._inductor.aoti_load_package(folder + "/model_aoti.pt2")
logits = aoti(ids, mask)
session = onnxruntime.InferenceSession(folder + "/model.onnx")
names = [i.name for i in session.get_inputs()]
from_onnx = session.run(None, dict(zip(names, [ids.numpy(), mask.numpy()])))[0]
assert "lightning_quant" not in sys.modules and "transformers" not in sys.modules
print(tuple(logits.shape), from_onnx.shape)
"""


@pytest.mark.slow
@pytest.mark.parametrize("make", [
    lambda: PostTrainingQuantization(num_calibration_batches=3),
    lambda: DynamicQuantization(),
    lambda: QuantizationAwareTraining(),
], ids=["static", "dynamic", "qat"])
def test_bert_with_dict_batches_and_a_model_output(make, tmp_path):
    callback = make()
    manifest = fit_bert(callback, tmp_path)
    assert manifest["status"] == "ok" and {a["format"] for a in manifest["artifacts"]} == {"aoti", "onnx"}
    for artifact in manifest["artifacts"]:
        assert artifact["details"]["outputs"] == ["logits"]  # what the files return, said in the manifest
        assert artifact["verification"]["relative_error"] <= artifact["verification"]["tolerance"]
    assert sum(manifest["quantized_ops"].values()) > 0
    assert set(manifest["metrics"]["quantized"]) == {"val/acc", "val/loss"}  # validation_step ran on the int8 model
    # the int8 model after fit answers like forward: a SequenceClassifierOutput
    output = callback.quantized_model(torch.randint(0, 100, (5, 16)), torch.ones(5, 16, dtype=torch.long))
    assert output.logits.shape == (5, 2)
    # the files load and run at another batch size in a process that imports neither us nor transformers
    done = subprocess.run([sys.executable, "-c", RELOAD_WITHOUT_US, str(callback.dirpath)], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["(3,", "2)", "(3,", "2)"]


def test_bert_float_export_for_inference(tmp_path):
    callback = OptimizeForInference(formats=["onnx"])
    manifest = fit_bert(callback, tmp_path)
    assert manifest["status"] == "ok" and manifest["artifacts"][0]["details"]["outputs"] == ["logits"]


def test_a_batch_forward_cannot_take_fails_before_training_and_names_the_fix(tmp_path):
    class Unbindable(BertClassifier):
        def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> Any:  # names no key of the batch
            return self.bert(input_ids=ids, attention_mask=mask)

    trainer = L.Trainer(default_root_dir=tmp_path, callbacks=[DynamicQuantization(example_input=(
        torch.randint(0, 100, (4, 16)), torch.ones(4, 16, dtype=torch.long)))], logger=False, max_epochs=1,
        limit_train_batches=2, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    with pytest.raises(ValueError, match=r"batch of the train dataloader \(dict with keys .*labels.*\) does not fit "
                                         r"Unbindable.forward.*batch_to_input="):
        trainer.fit(Unbindable(), DataLoader(Tokens(16, 0), batch_size=8))
    assert trainer.global_step == 0


def fit_digits(callbacks, tmp_path: Path, net) -> None:
    trainer = L.Trainer(default_root_dir=tmp_path, callbacks=callbacks, logger=False, max_epochs=1,
                        limit_train_batches=20, limit_val_batches=2, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(DigitsClassifier(net), datamodule=DigitsDataModule(batch_size=32))


@pytest.mark.slow
@pytest.mark.parametrize("make", [
    lambda: PostTrainingQuantization(num_calibration_batches=4),
    lambda: QuantizationAwareTraining(),
], ids=["static", "qat"])
def test_resnet_with_a_shared_relu_quantizes_with_channels_last(make, tmp_path):
    callback = make()
    torch.manual_seed(0)
    fit_digits([ChannelsLast(), callback], tmp_path, ResNet())
    manifest = json.loads((tmp_path / "quantized" / "manifest.json").read_text())
    assert manifest["status"] == "ok" and {a["format"] for a in manifest["artifacts"]} == {"aoti", "onnx"}
    convs = sum(count for op, count in manifest["quantized_ops"].items() if "conv" in op)
    assert convs >= 8  # every conv of both stages but the one-channel stem (kept float, see the manifest notes)
    for artifact in manifest["artifacts"]:
        assert artifact["verification"]["relative_error"] <= artifact["verification"]["tolerance"]


def test_resnet_float_export_for_inference(tmp_path):
    callback = OptimizeForInference(formats=["aoti"])
    fit_digits([ChannelsLast(), callback], tmp_path, ResNet())
    assert callback.manifest["status"] == "ok" and callback.manifest["artifacts"][0]["verification"]["relative_error"] < 1e-3
