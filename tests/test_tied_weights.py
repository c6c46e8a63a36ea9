"""Tied weights (a language model's output layer reading its token embedding's table, as GPT-2's ``lm_head`` does)
through every approach, on a small model without Lightning."""

from __future__ import annotations

import json

import onnx
import torch
from torch import nn

from lightning_quant import deploy
from lightning_quant.export import export
from lightning_quant.quantization import DynamicQuantConfig, StaticQuantConfig, WeightOnlyConfig, quantize
from lightning_quant.quantization.layer_report import layer_report
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


def test_weight_only_stores_a_tied_weight_once_in_the_model_and_in_its_onnx_file(tmp_path):
    model = TiedLM().eval()
    config = WeightOnlyConfig(bits=4, group_size=32)
    int4 = quantize(model, config, token_batch(2))
    assert int4.embed.packed is int4.head.packed and int4.embed.scales is int4.head.scales
    assert layer_report(model, int4, config)["tied_weights"] == [
        {
            "parameters": ["embed.weight", "head.weight"],
            "quantized_layers": ["embed", "head"],
            "float_layers": [],
            "one_copy": True,
            "stored": "one quantized copy, shared by embed, head",
        }
    ]
    export(int4, token_batch(2), ["onnx"], tmp_path)
    tables = [i for i in onnx.load(tmp_path / "model.onnx").graph.initializer if list(i.dims) == [VOCAB, 1, 16]]
    assert len(tables) == 1  # the lookup (Gather) and the head (MatMulNBits) read the same packed table


def test_int8_states_that_the_head_reads_a_quantized_copy_and_the_lookup_the_float_table():
    model = TiedLM().eval()
    for config in (StaticQuantConfig(), DynamicQuantConfig()):
        int8 = quantize(model, config, token_batch(4), [token_batch(4, seed) for seed in range(2)])
        report = layer_report(model, int8, config)
        assert report["by_type"] == {"Embedding": {"quantized": 0, "float": 1}, "Linear": {"quantized": 2, "float": 0}}
        (tie,) = report["tied_weights"]
        assert (tie["quantized_layers"], tie["float_layers"], tie["one_copy"]) == (["head"], ["embed"], False)
        assert tie["stored"] == "a quantized copy for head; the float tensor for embed"


def test_the_manifest_counts_layers_by_type_and_states_the_tie(tmp_path):
    model = TiedLM().eval()
    deployment = deploy(
        model, WeightOnlyConfig(keep_float=("hidden",)), token_batch(2), dirpath=tmp_path, formats=["onnx"]
    )
    layers = json.loads((tmp_path / "manifest.json").read_text())["layers"]
    assert layers == deployment.manifest["layers"]
    assert layers["by_type"] == {"Embedding": {"quantized": 1, "float": 0}, "Linear": {"quantized": 1, "float": 1}}
    assert layers["float"] == {"hidden": "in keep_float"}
    assert layers["tied_weights"][0]["one_copy"] is True
