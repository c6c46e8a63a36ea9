"""GPT-2 as its users train it: ``transformers.GPT2LMHeadModel`` (from a small ``GPT2Config``, nothing downloaded) in a
LightningModule whose ``forward`` returns the Hugging Face output and whose ``training_step`` reads ``outputs.loss``.

GPT-2's attention and MLP projections are transformers' ``Conv1D`` (weight ``[in, out]``, ``addmm``) and its output
layer's weight is the token embedding (tied). Each callback must quantize every ``Conv1D``, keep the tie and say so
in ``manifest.json``, and ship files that load and run in a process that imports neither lightning_quant nor
transformers, at another batch size than the example's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import onnx
import pytest
import torch
from conftest import fast_trainer, produced_formats
from torch.utils.data import DataLoader
from transformers import GPT2Config, GPT2LMHeadModel

from lightning_quant import (
    DynamicQuantization,
    PostTrainingQuantization,
    QuantizationAwareTraining,
    WeightOnlyQAT,
    WeightOnlyQuantization,
)

VOCAB, SEQUENCE, LAYERS = 100, 16, 2
TIED = ["model.lm_head.weight", "model.transformer.wte.weight"]


class GPT2LanguageModel(L.LightningModule):
    """A causal language model the way Hugging Face's docs train one: ``labels=input_ids`` (the model shifts them),
    the loss read from the output."""

    def __init__(self) -> None:
        super().__init__()
        config = GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=LAYERS, n_head=2)
        self.model = GPT2LMHeadModel(config)
        self.example_input_array = torch.randint(0, VOCAB, (2, SEQUENCE))

    def forward(self, input_ids: torch.Tensor):
        return self.model(input_ids=input_ids, labels=input_ids)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        outputs = self(batch)
        self.log("train_loss", outputs.loss)
        return outputs.loss

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.log("val_loss", self(batch).loss)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def counting_sequences(n: int, seed: int) -> torch.Tensor:
    """Token ids counting up from a random start: something a tiny model learns in a few steps."""
    start = torch.randint(0, VOCAB, (n, 1), generator=torch.Generator().manual_seed(seed))
    return (start + torch.arange(SEQUENCE)) % VOCAB


# Loads every shipped file at batch 3 (the example's is 2) without lightning_quant or transformers, and prints what
# each returned. argv: the folder, then format=path pairs.
RELOAD_WITHOUT_US = """
import sys, torch, onnxruntime
ids = torch.randint(0, 100, (3, 16))
for pair in sys.argv[2:]:
    fmt, path = pair.split("=")
    path = sys.argv[1] + "/" + path
    if fmt == "onnx":
        session = onnxruntime.InferenceSession(path)
        outputs = [torch.from_numpy(o) for o in session.run(None, {session.get_inputs()[0].name: ids.numpy()})]
    elif fmt == "aoti":
        outputs = torch._inductor.aoti_load_package(path)(ids)
    elif fmt == "openvino":
        import openvino
        compiled = openvino.Core().compile_model(path, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        result = compiled([ids.numpy()])
        outputs = [torch.from_numpy(result[port].copy()) for port in compiled.outputs]
    else:
        outputs = torch.export.load(path).module()(ids)
    print(fmt, [tuple(o.shape) for o in outputs])
assert "lightning_quant" not in sys.modules and "transformers" not in sys.modules
"""


def matmuls_with_int8_weights(path: Path) -> int:
    """The matrix products of an ONNX file that read int8 weights: ``MatMulInteger``, or ``MatMul``/``Gemm`` whose
    weight is a ``DequantizeLinear`` of a constant (through a ``Transpose``, if any)."""
    graph = onnx.load(path).graph
    constants = {i.name for i in graph.initializer}
    dequantized = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in constants}
    dequantized |= {n.output[0] for n in graph.node if n.op_type == "Transpose" and n.input[0] in dequantized}
    return sum(
        n.op_type == "MatMulInteger" or (n.op_type in ("MatMul", "Gemm") and n.input[1] in dequantized)
        for n in graph.node
    )


def fit(callback, tmp_path: Path) -> tuple[GPT2LanguageModel, dict]:
    torch.manual_seed(0)
    model = GPT2LanguageModel()
    train = DataLoader(counting_sequences(64, 0), batch_size=8, shuffle=True)
    trainer = fast_trainer(tmp_path, [callback], limit_val_batches=1)
    trainer.fit(model, train, DataLoader(counting_sequences(16, 1), batch_size=8))
    return model, json.loads((tmp_path / "quantized" / "manifest.json").read_text())


def reload_without_us(folder: Path, files: dict[str, str]) -> list[str]:
    pairs = [f"{fmt}={path}" for fmt, path in files.items()]
    done = subprocess.run(
        [sys.executable, "-c", RELOAD_WITHOUT_US, str(folder), *pairs], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.splitlines()


# QAT ships its default formats (AOTInductor compiles the int8 graph: 35 s of this test's 85); static and dynamic ship
# the ONNX file only, to keep the suite fast (their AOTInductor files are tested on other models)
INT8 = {
    "qat": lambda: QuantizationAwareTraining(),
    "static": lambda: PostTrainingQuantization(num_calibration_batches=2, observer="minmax", formats=["onnx"]),
    "dynamic": lambda: DynamicQuantization(formats=["onnx"]),
}
EMBEDDING_STAYS_FLOAT = {
    "qat": "x86 int8 (X86InductorQuantizer) has no int8 embedding lookup",
    "static": "x86 int8 (X86InductorQuantizer) has no int8 embedding lookup",
    "dynamic": "dynamic int8 quantizes Linear, Conv1D, LSTM and GRU layers",
}


@pytest.mark.slow
@pytest.mark.parametrize("approach", list(INT8))
def test_int8_quantizes_every_conv1d_and_the_tied_head(approach, tmp_path):
    callback = INT8[approach]()
    model, manifest = fit(callback, tmp_path)
    assert produced_formats(manifest) == set(callback.formats)
    layers = manifest["layers"]
    assert layers["by_type"] == {
        "Conv1D": {"quantized": 4 * LAYERS, "float": 0},  # attention in/out, MLP up/down, per block
        "Embedding": {"quantized": 0, "float": 2},
        "Linear": {"quantized": 1, "float": 0},  # lm_head
    }
    reason = EMBEDDING_STAYS_FLOAT[approach]
    assert layers["float"] == {"model.transformer.wte": reason, "model.transformer.wpe": reason}
    (tie,) = layers["tied_weights"]
    assert tie["parameters"] == TIED
    assert (tie["quantized_layers"], tie["float_layers"]) == (["model.lm_head"], ["model.transformer.wte"])
    assert model.model.lm_head.weight is model.model.transformer.wte.weight  # training kept the tie
    # the ONNX file too (ONNX Runtime's own int8 of the float model for static and dynamic)
    assert matmuls_with_int8_weights(tmp_path / "quantized" / "model.onnx") == 4 * LAYERS + 1
    shipped = {a["format"]: a["path"] for a in manifest["artifacts"]}
    for artifact in manifest["artifacts"]:
        assert artifact["details"]["outputs"] == ["loss", "logits"]
    for line in reload_without_us(tmp_path / "quantized", shipped):
        assert line.endswith("[(), (3, 16, 100)]"), line


WEIGHT_ONLY = {"weight_only": lambda: WeightOnlyQuantization(bits=4), "weight_only_qat": lambda: WeightOnlyQAT(bits=4)}


@pytest.mark.slow
@pytest.mark.parametrize("approach", list(WEIGHT_ONLY))
def test_int4_weight_only_quantizes_every_conv1d_and_stores_the_tied_table_once(approach, tmp_path):
    model, manifest = fit(WEIGHT_ONLY[approach](), tmp_path)
    assert produced_formats(manifest) == {"onnx", "torch_export"}
    layers = manifest["layers"]
    assert layers["by_type"] == {
        "Conv1D": {"quantized": 4 * LAYERS, "float": 0},
        "Embedding": {"quantized": 2, "float": 0},  # token and position tables
        "Linear": {"quantized": 1, "float": 0},
    }
    assert layers["float"] == {}
    assert layers["tied_weights"] == [
        {
            "parameters": TIED,
            "quantized_layers": ["model.lm_head", "model.transformer.wte"],
            "float_layers": [],
            "one_copy": True,
            "stored": "one quantized copy, shared by model.lm_head, model.transformer.wte",
        }
    ]
    # after fit the module is the plain model again, tie included: its checkpoints load into GPT2LMHeadModel
    assert type(model.model.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    assert model.model.lm_head.weight is model.model.transformer.wte.weight
    onnx_file = onnx.load(tmp_path / "quantized" / "model.onnx")
    assert sum(node.op_type == "MatMulNBits" for node in onnx_file.graph.node) == 4 * LAYERS + 1
    packed_tables = [i for i in onnx_file.graph.initializer if list(i.dims) == [VOCAB, 1, 16]]
    assert len(packed_tables) == 1  # the lookup and lm_head read one int4 table
    shipped = {a["format"]: a["path"] for a in manifest["artifacts"]}
    # both files load without us: the .pt2 holds ATen ops only (weight_only_linear decomposed)
    assert sorted(reload_without_us(tmp_path / "quantized", shipped)) == [
        "onnx [(), (3, 16, 100)]",
        "torch_export [(), (3, 16, 100)]",
    ]
