"""No lost work: one failing format leaves the others, the float checkpoint and a manifest recording the failure."""

from __future__ import annotations

import errno
import json
import os

import pytest
import torch
from conftest import fast_trainer, run_train_script

from lightning_quant import DynamicQuantization
from lightning_quant.demo import DigitsClassifier, DigitsDataModule, MLPNet
from lightning_quant.manifest import FORMAT_VERSION
from lightning_quant.quantization import QuantizationError

FAST = dict(limit_test_batches=1)  # beside conftest.FAST_FIT


def disk_full_for(name_part, monkeypatch):
    """The environment, not the thing under test: moving a finished file whose name has ``name_part`` into
    place fails as on a full disk (``atomic_path`` writes a temp file, then ``os.replace``)."""
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        if name_part in os.fspath(dst):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(dst))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)


def test_disk_full_in_one_format_keeps_the_others_the_checkpoint_and_a_manifest(tmp_path, monkeypatch):
    disk_full_for("model_program", monkeypatch)  # the "torch_export" file
    callback = DynamicQuantization(formats=["onnx", "torch_export"])
    trainer = fast_trainer(tmp_path, [callback], **FAST)
    model = DigitsClassifier(MLPNet(hidden=1024))  # wide: the int8 ONNX file beats float, so it is kept
    with pytest.raises(QuantizationError) as error:
        trainer.fit(model, datamodule=DigitsDataModule(batch_size=32))
    message = str(error.value)
    assert "could not produce 1 of 2 format(s)" in message and "torch_export" in message
    assert "the disk is full" in message and "Free space in" in message and "another dirpath" in message
    assert "float model is safe" in message

    out = tmp_path / "quantized"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format_version"] == FORMAT_VERSION
    assert manifest["status"] == "partial"
    assert list(manifest["failures"]) == ["torch_export"] and "ENOSPC" not in manifest["failures"]["torch_export"]
    assert "No space left on device" in manifest["failures"]["torch_export"]
    assert [a["format"] for a in manifest["artifacts"]] == ["onnx"]
    assert (
        manifest["artifacts"][0]["verification"]["relative_error"]
        <= manifest["artifacts"][0]["verification"]["tolerance"]
    )
    # nothing half-written under a final name, no temp file left behind
    assert sorted(p.name for p in out.iterdir()) == ["float.ckpt", "manifest.json", "model.onnx"]
    assert manifest["float_checkpoint"] == "float.ckpt"  # no save_last: the callback wrote one before converting
    assert callback.manifest == manifest

    # testing the best checkpoint restores the callback state saved before fit end: the manifest stays
    trainer.test(model, datamodule=DigitsDataModule(batch_size=32), ckpt_path="best")
    assert callback.manifest == manifest


def test_train_script_ends_with_a_clear_message_and_a_nonzero_exit(tmp_path):
    # every layer kept float: dynamic int8 has nothing to quantize, so convert fails after training
    result = run_train_script(tmp_path, "model=mlp", "callbacks=dynamic", "callbacks.dynamic.keep_float=[net]")
    assert result.returncode != 0
    assert "DynamicQuantization failed on DigitsClassifier" in result.stderr
    assert "produced no quantized op" in result.stderr and "keep_float" in result.stderr
    manifest = json.loads((tmp_path / "quantized" / "manifest.json").read_text())
    assert manifest["status"] == "failed" and manifest["artifacts"] == []
    assert "produced no quantized op" in manifest["error"]
    assert manifest["float_checkpoint"] == "../checkpoints/last.ckpt"
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    metrics = json.loads((tmp_path / "metrics.json").read_text())  # the test still ran on the best checkpoint
    assert "test/acc" in metrics


def test_the_float_checkpoint_holds_the_weights_that_were_quantized(tmp_path):
    """A ModelCheckpoint that saves only on improvement leaves a "last" checkpoint of an earlier step: the float
    checkpoint the manifest names must be the trained model that was quantized, not that one."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    never_improves = ModelCheckpoint(
        dirpath=tmp_path / "ckpt", monitor="val/acc", mode="max", save_last=True, save_top_k=1
    )
    callback = DynamicQuantization(formats=["onnx"])
    trainer = fast_trainer(tmp_path, [never_improves, callback], **{**FAST, "max_epochs": 3})
    model = DigitsClassifier(MLPNet(), lr=1e-12)  # next to no learning: val/acc never improves after epoch 0
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=32))
    manifest = json.loads((tmp_path / "quantized" / "manifest.json").read_text())
    saved = torch.load(tmp_path / "quantized" / manifest["float_checkpoint"], weights_only=True)
    assert torch.load(never_improves.last_model_path, weights_only=True)["global_step"] < trainer.global_step
    assert saved["global_step"] == trainer.global_step
    assert all(torch.equal(saved["state_dict"][k], v) for k, v in model.state_dict().items())
