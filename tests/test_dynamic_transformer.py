"""Dynamic int8 of an nn.TransformerEncoder model: AOTInductor export (torchao) and TorchScript (legacy)."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from conftest import produced_formats
from torch import nn

from lightning_quant import DynamicQuantization, load
from lightning_quant.demo import DigitsClassifier, DigitsDataModule, TransformerNet
from lightning_quant.quantization import DynamicQuantConfig, count_quantized_ops, quantize
from lightning_quant.quantization.legacy import legacy_quantize_dynamic
from lightning_quant.quantization.transformer_fastpath import FUSED_ATTENTION, inference_operators

# embed + head + linear1/linear2 of each of the 2 encoder layers; the attention out_proj stays float
INT8_LINEARS = {"Linear (Int8Tensor)": 6}


def test_dynamic_int8_leaves_the_attention_output_projection_float():
    torch.manual_seed(0)
    net = TransformerNet().eval()
    int8 = quantize(net, DynamicQuantConfig(), torch.rand(4, 1, 8, 8))
    assert count_quantized_ops(int8) == INT8_LINEARS
    for layer in int8.encoder.layers:
        assert type(layer.self_attn.out_proj.weight) is nn.Parameter  # MHA calls F.linear on it: aten.t
        assert type(layer.linear1.weight).__name__ == "Int8Tensor"
    # the export AOTInductor starts from: it failed with "Int8Tensor dispatch ... aten.t" before
    x = torch.rand(4, 1, 8, 8)
    exported = torch.export.export(int8, (x,)).module()
    with torch.no_grad():
        # eager attention runs the fused kernel, the export its decomposition: per-token int8 rounding differs
        torch.testing.assert_close(exported(x), int8(x), atol=0.02, rtol=0.02)
        assert (int8(x) - net(x)).abs().max() < 0.1


def test_legacy_dynamic_int8_of_an_encoder_runs_in_inference_mode():
    torch.manual_seed(0)
    net = TransformerNet().eval()
    int8 = TransformerNet().eval()
    int8.load_state_dict(net.state_dict())
    replaced = legacy_quantize_dynamic(int8, (nn.Linear,))
    assert "encoder.layers.0.linear1" in replaced and "encoder.layers.0.self_attn.out_proj" not in replaced
    x = torch.rand(8, 1, 8, 8)
    with torch.inference_mode():  # crashed in the fused-layer check ('function' object has no attribute 'device')
        out = int8(x)
        expected = net(x)
    assert (out - expected).abs().max() < 0.1
    assert FUSED_ATTENTION in inference_operators(int8, x)


@pytest.fixture(scope="module")
def transformer_run(tmp_path_factory):
    """One real fit of TransformerNet with dynamic int8 to AOTInductor and TorchScript."""
    tmp_path = tmp_path_factory.mktemp("dynamic_transformer")
    L.seed_everything(0)
    callback = DynamicQuantization(formats=["aoti", "torchscript"])
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        callbacks=[callback],
        logger=False,
        max_epochs=1,
        limit_train_batches=4,
        limit_val_batches=2,
        num_sanity_val_steps=0,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(DigitsClassifier(TransformerNet()), datamodule=DigitsDataModule(batch_size=32))
    folder = tmp_path / "quantized"
    return callback, folder, json.loads((folder / "manifest.json").read_text())


def test_dynamic_transformer_exports_verified_aoti_and_torchscript_files(transformer_run):
    _, _, manifest = transformer_run
    assert manifest["status"] == "ok" and manifest["failures"] == {}
    assert manifest["quantized_ops"] == INT8_LINEARS
    assert produced_formats(manifest) == {"aoti", "torchscript"}
    for artifact in manifest["artifacts"]:
        assert artifact["verification"]["relative_error"] <= artifact["verification"]["tolerance"]


def test_dynamic_transformer_files_take_any_batch_in_inference_mode(transformer_run):
    callback, folder, _ = transformer_run
    assert callback.quantized_model.is_lowered  # the AOTInductor package, not the eager torchao model
    x = torch.rand(7, 1, 8, 8)
    aoti, torchscript = load(folder / "manifest.json", "aoti"), load(folder / "manifest.json", "torchscript")
    with torch.inference_mode():
        from_aoti, from_torchscript = aoti(x), torchscript(x)
    assert from_aoti.shape == from_torchscript.shape == (7, 10)
    assert (from_aoti - from_torchscript).abs().max() < 0.2  # two int8 schemes of the same float model
