"""OptimizeForInference: the float model exported (AOTInductor, ONNX, torch.export), verified, in a manifest."""

from __future__ import annotations

import json
import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import produced_formats
from torch import nn

from lightning_quant import ChannelsLast, OptimizeForInference
from lightning_quant.app import train
from lightning_quant.demo import ConvNet, DigitsClassifier, DigitsDataModule
from lightning_quant.export import load_artifact


def make_trainer(tmp_path, callbacks, limit_train_batches=10, max_epochs=1):
    return L.Trainer(
        default_root_dir=tmp_path,
        max_epochs=max_epochs,
        limit_train_batches=limit_train_batches,
        limit_val_batches=3,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


@pytest.fixture(scope="module")
def optimized(tmp_path_factory):
    """A conv net trained with ChannelsLast, then exported in every format by OptimizeForInference."""
    tmp_path = tmp_path_factory.mktemp("optimize")
    L.seed_everything(0)
    module = DigitsClassifier(ConvNet(channels=16))
    callback = OptimizeForInference(dirpath=tmp_path / "optimized")
    trainer = make_trainer(tmp_path, [ChannelsLast(), callback], limit_train_batches=None, max_epochs=2)
    trainer.fit(module, datamodule=DigitsDataModule())
    return module.eval(), callback, tmp_path / "optimized"


def test_the_manifest_describes_verified_float_artifacts(optimized):
    module, callback, dirpath = optimized
    manifest = callback.manifest
    assert json.loads((dirpath / "manifest.json").read_text()) == manifest
    assert manifest["approach"] == "float" and manifest["dtype"] == "float32"
    assert manifest["quantized_ops"] == {}
    assert produced_formats(manifest) == {"aoti", "onnx", "openvino", "torch_export"}
    for artifact in manifest["artifacts"]:
        weights = [artifact["details"]["weights_file"]] if artifact["format"] == "openvino" else []  # its .bin
        assert sum((dirpath / name).stat().st_size for name in [artifact["path"], *weights]) == artifact["bytes"] > 0
        assert artifact["verification"]["relative_error"] < 1e-3  # float: the same numbers, not "close"
        assert artifact["latency_ms"] > 0
    assert (dirpath / manifest["float_checkpoint"]).is_file()
    accuracy = manifest["metrics"]
    assert accuracy["float"]["val/acc"] > 0.5  # trained for real
    assert math.isclose(accuracy["quantized"]["val/acc"], accuracy["float"]["val/acc"], abs_tol=1e-6)


def test_the_optimized_model_and_every_reloaded_file_match_the_module_at_any_batch_size(optimized):
    module, callback, dirpath = optimized
    assert callback.optimized_model is callback.quantized_model and callback.optimized_model.is_lowered
    for batch in (3, 64):
        x = torch.rand(batch, 1, 8, 8)
        with torch.no_grad():
            expected = module(x)
        torch.testing.assert_close(callback.optimized_model(x), expected, rtol=1e-4, atol=1e-4)
        for artifact in callback.manifest["artifacts"]:
            got = load_artifact(dirpath / artifact["path"], artifact["format"])(x)
            got = got[0] if isinstance(got, (list, tuple)) else got
            torch.testing.assert_close(torch.as_tensor(got), expected, rtol=1e-4, atol=1e-4)


def test_bfloat16_export_takes_and_returns_float32(tmp_path):
    L.seed_everything(0)
    module = DigitsClassifier(ConvNet(channels=16))
    callback = OptimizeForInference(dtype="bfloat16", formats=["torch_export"], dirpath=tmp_path / "bf16")
    make_trainer(tmp_path, [callback], limit_train_batches=None).fit(module, datamodule=DigitsDataModule())
    assert callback.manifest["dtype"] == "bfloat16"
    program = torch.export.load(tmp_path / "bf16" / callback.manifest["artifacts"][0]["path"])
    assert any(
        node.meta.get("val") is not None and getattr(node.meta["val"], "dtype", None) == torch.bfloat16
        for node in program.graph.nodes
    )  # it really computes in bf16
    x = torch.rand(5, 1, 8, 8)
    out = program.module()(x)
    assert out.dtype == torch.float32
    with torch.no_grad():
        expected = module.eval()(x)
    assert (out.argmax(1) == expected.argmax(1)).float().mean() >= 0.8
    metrics = callback.manifest["metrics"]
    assert abs(metrics["quantized"]["val/acc"] - metrics["float"]["val/acc"]) <= 0.05


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(dtype="float16"), "'float32' or 'bfloat16'"),
        (dict(dtype="bfloat16", formats=["onnx"]), r"cannot export \['onnx'\]"),
        (dict(formats=["torchscript"]), "cannot export format"),
    ],
)
def test_bad_arguments_are_refused_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        OptimizeForInference(**kwargs)


class RowAttention(nn.Module):
    """Self-attention over the 8 rows of a digit, written by hand."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.embed = nn.Linear(8, dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.embed(x.flatten(1, 2))).chunk(3, dim=-1)
        weights = F.softmax(q @ k.transpose(1, 2) / math.sqrt(q.shape[-1]), dim=-1)
        return self.head((weights @ v).mean(dim=1))


def test_hand_written_attention_is_pointed_at(tmp_path):
    callback = OptimizeForInference(formats=["torch_export"], dirpath=tmp_path / "attention")
    with pytest.warns(UserWarning, match=r"scaled_dot_product_attention"):
        make_trainer(tmp_path, [callback], limit_train_batches=2).fit(
            DigitsClassifier(RowAttention()), datamodule=DigitsDataModule()
        )
    (where,) = callback.manifest["manual_attention"]
    assert where.startswith(f"{__file__}:") and where.endswith("(forward)")


def test_hydra_composes_amp_channels_last_and_optimize(fast_cfg, tmp_path):
    cfg = fast_cfg(
        "callbacks=[amp,channels_last,optimize]", "callbacks.optimize.formats=[onnx]", "callbacks.amp.measure_steps=1"
    )
    assert list(cfg.callbacks) == ["amp", "channels_last", "optimize"]
    train(cfg)
    assert "test/acc" in json.loads((tmp_path / "metrics.json").read_text())
    manifest = json.loads((tmp_path / "optimized" / "manifest.json").read_text())
    assert manifest["approach"] == "float"
    assert [a["format"] for a in manifest["artifacts"]] == ["onnx"]
