"""Models users bring, not our demo nets: a Hugging Face BERT with dict batches and a ModelOutput, a ResNet with
torchvision's block structure (one ReLU module called twice) and Lightning's demo Transformer, through a real Trainer
(the models: lightning_quant/demo/third_party.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import fast_trainer, produced_formats
from torch.utils.data import DataLoader

from lightning_quant import (
    ChannelsLast,
    DynamicQuantization,
    OptimizeForInference,
    PostTrainingQuantization,
    QuantizationAwareTraining,
)
from lightning_quant.demo import DigitsClassifier, DigitsDataModule, ResNet
from lightning_quant.demo.text import VOCAB_SIZE
from lightning_quant.demo.third_party import BertClassifier, DemoTransformer, Tokens


def fit_bert(callback, tmp_path: Path) -> dict:
    trainer = fast_trainer(tmp_path, [callback], limit_val_batches=1)
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
@pytest.mark.parametrize(
    "make",
    [
        lambda: PostTrainingQuantization(num_calibration_batches=3),
        lambda: DynamicQuantization(),
        lambda: QuantizationAwareTraining(),
    ],
    ids=["static", "dynamic", "qat"],
)
def test_bert_with_dict_batches_and_a_model_output(make, tmp_path):
    callback = make()
    manifest = fit_bert(callback, tmp_path)
    # OpenVINO's IR of the int8 ONNX too, where the approach has one (not dynamic: OpenVINO un-quantizes its weights)
    openvino = set() if isinstance(callback, DynamicQuantization) else {"openvino"}
    assert produced_formats(manifest) == {"aoti", "onnx", *openvino}
    for artifact in manifest["artifacts"]:
        assert artifact["details"]["outputs"] == ["logits"]  # what the files return, said in the manifest
        assert artifact["verification"]["relative_error"] <= artifact["verification"]["tolerance"]
    assert sum(manifest["quantized_ops"].values()) > 0
    assert set(manifest["metrics"]["quantized"]) == {"val/acc", "val/loss"}  # validation_step ran on the int8 model
    # the int8 model after fit answers like forward: a SequenceClassifierOutput
    output = callback.quantized_model(torch.randint(0, 100, (5, 16)), torch.ones(5, 16, dtype=torch.long))
    assert output.logits.shape == (5, 2)
    # the files load and run at another batch size in a process that imports neither us nor transformers
    done = subprocess.run(
        [sys.executable, "-c", RELOAD_WITHOUT_US, str(callback.dirpath)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["(3,", "2)", "(3,", "2)"]


def test_bert_float_export_for_inference(tmp_path):
    callback = OptimizeForInference(formats=["onnx"])
    manifest = fit_bert(callback, tmp_path)
    assert manifest["status"] == "ok" and manifest["artifacts"][0]["details"]["outputs"] == ["logits"]


def test_a_batch_calibration_cannot_bind_fails_before_training_and_names_the_fix(tmp_path):
    class Unbindable(BertClassifier):
        def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> Any:  # names no key of the batch
            return self.bert(input_ids=ids, attention_mask=mask)

    example = (torch.randint(0, 100, (4, 16)), torch.ones(4, 16, dtype=torch.long))
    # static int8 calibrates on the batches: one that cannot be bound to forward is refused before training
    trainer = fast_trainer(tmp_path, [PostTrainingQuantization(example_input=example)], limit_train_batches=2)
    with pytest.raises(
        ValueError,
        match=r"batch of the train dataloader \(dict with keys .*labels.*\) does not fit "
        r"Unbindable.forward.*batch_to_input=",
    ):
        trainer.fit(Unbindable(), DataLoader(Tokens(16, 0), batch_size=8))
    assert trainer.global_step == 0


def fit_digits(callbacks, tmp_path: Path, net) -> None:
    trainer = fast_trainer(tmp_path, callbacks, limit_train_batches=20)
    trainer.fit(DigitsClassifier(net), datamodule=DigitsDataModule(batch_size=32))


@pytest.mark.slow
@pytest.mark.parametrize(
    "make",
    [
        lambda: PostTrainingQuantization(num_calibration_batches=4),
        lambda: QuantizationAwareTraining(),
    ],
    ids=["static", "qat"],
)
def test_resnet_with_a_shared_relu_quantizes_with_channels_last(make, tmp_path):
    callback = make()
    torch.manual_seed(0)
    fit_digits([ChannelsLast(), callback], tmp_path, ResNet())
    manifest = json.loads((tmp_path / "quantized" / "manifest.json").read_text())
    assert produced_formats(manifest) == {"aoti", "onnx", "openvino"}
    convs = sum(count for op, count in manifest["quantized_ops"].items() if "conv" in op)
    assert convs >= 8  # every conv of both stages but the one-channel stem (kept float, see the manifest notes)
    for artifact in manifest["artifacts"]:
        assert artifact["verification"]["relative_error"] <= artifact["verification"]["tolerance"]


def test_resnet_float_export_for_inference(tmp_path):
    callback = OptimizeForInference(formats=["aoti"])
    fit_digits([ChannelsLast(), callback], tmp_path, ResNet())
    assert (
        callback.manifest["status"] == "ok"
        and callback.manifest["artifacts"][0]["verification"]["relative_error"] < 1e-3
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "make, failing",
    [
        # default formats (aoti, onnx, openvino): ONNX Runtime's own static int8 of this model is 22% off float, so
        # its onnx file, and the OpenVINO IR converted from it, fail verification; the aoti file is verified and
        # ships, and the fit ends normally with a warning
        (lambda: PostTrainingQuantization(num_calibration_batches=3), ["onnx", "openvino"]),
        (lambda: DynamicQuantization(), []),
        (lambda: QuantizationAwareTraining(), []),
    ],
    ids=["static", "dynamic", "qat"],
)
def test_lightnings_demo_transformer(make, failing, tmp_path):
    callback = make()
    torch.manual_seed(0)
    trainer = fast_trainer(tmp_path, [callback], limit_train_batches=4, num_sanity_val_steps=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(DemoTransformer())
    manifest = callback.manifest
    assert "aoti" in {a["format"] for a in manifest["artifacts"]}, manifest.get("failures")
    assert list(manifest["failures"]) == failing and manifest["status"] == ("partial" if failing else "ok")
    warned = [str(w.message) for w in caught if "of the default formats failed" in str(w.message)]
    assert len(warned) == (1 if failing else 0) and all(name in warned[0] for name in failing)
    for artifact in manifest["artifacts"]:
        assert artifact["verification"]["relative_error"] <= artifact["verification"]["tolerance"]
        if artifact["format"] == "aoti":  # nn.Transformer's causal-mask check, resolved from the example
            assert "transformer.py" in " ".join(artifact["details"]["capture"])
    inputs, target = (t[:3] for t in DemoTransformer().example_input_array)
    assert callback.quantized_model(inputs, target).shape == (3 * 32, VOCAB_SIZE)  # another batch size
