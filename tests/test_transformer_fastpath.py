"""nn.TransformerEncoder on PyTorch's fused inference kernels, also after dynamic int8 quantization."""

from __future__ import annotations

import copy
import inspect
import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_quant.demo import DigitsClassifier, DigitsDataModule, TransformerNet
from lightning_quant.deprecated import legacy_api
from lightning_quant.quantization import DynamicQuantConfig, quantize
from lightning_quant.quantization.transformer_fastpath import (
    FUSED_ATTENTION,
    FUSED_ENCODER_LAYER,
    find_manual_attention,
    inference_operators,
    route_quantized_encoder_layers,
)

INT8_LINEAR = "quantized.linear_dynamic"


def legacy_dynamic_int8(model: nn.Module) -> nn.Module:
    with legacy_api("torch.ao.quantization.quantize_dynamic"):
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """TransformerNet trained briefly on digits by a real Trainer, plus the test images and labels."""
    L.seed_everything(0)
    module = DigitsClassifier(TransformerNet())
    datamodule = DigitsDataModule(batch_size=64)
    trainer = L.Trainer(
        default_root_dir=tmp_path_factory.mktemp("transformer"),
        max_epochs=2,
        limit_train_batches=10,
        limit_val_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=datamodule)
    images, labels = datamodule.test_set.tensors
    return module.net.eval(), images, labels


def test_the_trained_float_encoder_runs_the_fused_layer_kernel(trained):
    net, images, _ = trained
    assert FUSED_ENCODER_LAYER in inference_operators(net, images[:8])
    assert route_quantized_encoder_layers(net) == []  # float layers are left on the fused layer kernel
    assert FUSED_ENCODER_LAYER in inference_operators(net, images[:8])


def test_legacy_dynamic_int8_crashes_in_the_fast_path_check_unless_routed(trained):
    net, images, labels = trained
    int8 = legacy_dynamic_int8(net).eval()
    with pytest.raises(AttributeError, match="'function' object has no attribute"), torch.inference_mode():
        int8(images[:8])  # the bug this module exists for: if torch fixes it, simplify the module

    assert route_quantized_encoder_layers(int8) == ["encoder.layers.0", "encoder.layers.1"]
    assert route_quantized_encoder_layers(int8) == ["encoder.layers.0", "encoder.layers.1"]  # idempotent
    operators = inference_operators(int8, images[:8])
    assert FUSED_ATTENTION in operators and INT8_LINEAR in operators
    with torch.inference_mode():
        float_predictions = net(images).argmax(1)
        int8_predictions = int8(images).argmax(1)
    with torch.no_grad():
        assert torch.equal(int8(images).argmax(1), int8_predictions)
    assert (int8_predictions == float_predictions).float().mean() >= 0.9
    float_accuracy = (float_predictions == labels).float().mean()
    assert (int8_predictions == labels).float().mean() >= float_accuracy - 0.05


def test_padded_batches_skip_the_nested_tensor_path_of_a_quantized_encoder():
    torch.manual_seed(0)
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 2).eval()
    src = torch.randn(3, 5, 16)
    padding = torch.zeros(3, 5, dtype=torch.bool)
    padding[0, 3:] = True
    int8 = legacy_dynamic_int8(encoder)
    with pytest.raises(AttributeError), torch.inference_mode():
        int8(src, src_key_padding_mask=padding)

    route_quantized_encoder_layers(int8)
    assert int8.use_nested_tensor is False and encoder.use_nested_tensor is True
    with torch.inference_mode():
        expected = encoder(src, src_key_padding_mask=padding)
        got = int8(src, src_key_padding_mask=padding)
    # padded positions are zeros in the nested-tensor result and computed values otherwise: compare the rest
    torch.testing.assert_close(got[~padding], expected[~padding], atol=0.1, rtol=0.1)


def test_the_projects_dynamic_int8_needs_no_routing_and_runs_in_inference_mode(trained):
    net, images, _ = trained
    int8 = quantize(net, DynamicQuantConfig(), images[:4])
    assert route_quantized_encoder_layers(int8) == []  # torchao's int8 weights are tensors: the check declines
    with torch.inference_mode():
        assert int8(images[:8]).shape == (8, 10)


class HandWrittenAttention(nn.Module):
    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        weights = F.dropout(scores.masked_fill(scores.isnan(), 0).softmax(dim=-1), 0.1, self.training)
        return torch.matmul(weights, v)


class FusedAttention(HandWrittenAttention):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return F.scaled_dot_product_attention(q, k, v)


def test_hand_written_attention_is_found_at_its_line_and_fused_attention_is_not():
    x = torch.rand(2, 4, 8)
    found = find_manual_attention(HandWrittenAttention(), x)
    source, first = inspect.getsourcelines(HandWrittenAttention.forward)
    line = first + next(i for i, text in enumerate(source) if "torch.matmul(weights, v)" in text)
    assert found == [f"{__file__}:{line} (forward)"]
    assert find_manual_attention(FusedAttention(), x) == []
    assert find_manual_attention(TransformerNet().eval(), torch.rand(2, 1, 8, 8)) == []
    assert find_manual_attention(nn.Sequential(nn.Linear(8, 8), nn.Softmax(dim=-1)), x) == []
