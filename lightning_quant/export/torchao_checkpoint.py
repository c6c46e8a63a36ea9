"""``"torchao"``: a weight-only model as torchao tensors, for users who run it with torchao (on GPU, say).

Each layer holding packed weights (:func:`lightning_quant.weight_packing.is_packed_layer`) becomes the plain
``nn.Linear`` or ``nn.Embedding`` it was, its weight a torchao ``IntxUnpackedToInt8Tensor`` holding the same
integers and scales (zero points 0): what ``quantize_(model, IntxWeightOnlyConfig(weight_dtype=torch.int4,
granularity=PerGroup(group_size)))`` makes, but on this package's grid, the one QAT trained on, instead of torchao's
own rounding. The file is ``torch.save`` of a dict of tensors, read with ``torch.load(path, weights_only=True)`` (torchao's
tensor types are allowed globals once torchao is imported), so loading a shared file cannot run code:
``"state_dict"`` is torchao's checkpoint form, which ``model.load_state_dict(state_dict, assign=True)`` reads into
the float model; ``"program"`` (the ``torch.export`` graph, serialized without its weights) and ``"constants"`` let
:func:`load_torchao` (and ``lightning_quant.load``) run the file without the model's class.

Measured here on CPU only (no GPU on these machines): torchao dequantizes these weights on every call, so the file
is slower than float on x86, and the callbacks do not delete it for that (it is a checkpoint, not a CPU runtime).
"""

from __future__ import annotations

import copy
import io
from pathlib import Path
from typing import Any

import torch
import torchao
from torch import nn
from torch._export.serde.serialize import SerializedArtifact, deserialize, serialize
from torchao.quantization import IntxUnpackedToInt8Tensor

from lightning_quant.capture import capture
from lightning_quant.export.torch_export import tensors_only
from lightning_quant.files import atomic_write
from lightning_quant.inputs import ModelInputs
from lightning_quant.weight_packing import is_packed_layer, unpack

SUFFIX = ".pt"


def export_torchao(model: nn.Module, inputs: ModelInputs, path: Path, dynamic_batch: bool = True) -> dict[str, Any]:
    converted = copy.deepcopy(model)
    names = [name for name, module in converted.named_modules() if is_packed_layer(module)]
    if not names:
        raise TypeError(
            f"the torchao format holds weight-only models (WeightOnlyConfig): {type(model).__name__} has no layer "
            "with packed int4/int8 weights. Leave 'torchao' out of formats."
        )
    for name in names:
        if not name:  # the model is the one layer
            converted = _torchao_layer(converted)
            break
        parent, _, child = name.rpartition(".")
        setattr(converted.get_submodule(parent), child, _torchao_layer(converted.get_submodule(name)))
    captured = capture(converted, inputs, dynamic_batch)
    program = captured.program
    # the graph alone (torch's serializer, private): the weights are stored once, as the checkpoint's state_dict
    graph = serialize(
        program, serialize_state_dict=False, serialize_constants=False, serialize_example_inputs=False
    ).exported_program
    buffer = io.BytesIO()
    torch.save({"state_dict": program.state_dict, "constants": program.constants, "program": graph}, buffer)
    atomic_write(path, buffer.getvalue())
    return {
        "how": "weights as torchao IntxUnpackedToInt8Tensor (this grid, zero points 0) -> torch.save of the state_dict "
        "and the torch.export graph",
        "load": "torch.load(path, weights_only=True)['state_dict'] loads into the float model with "
        "load_state_dict(state_dict, assign=True) where torchao is imported; lightning_quant.load(path) runs it",
        "torchao": torchao.__version__,
        "layers": len(names),
        **captured.details(),
    }


def load_torchao(path: Path) -> Any:
    """The file's program with its torchao weights, read with ``torch.load(weights_only=True)``."""
    with tensors_only(path):
        saved = torch.load(str(path), weights_only=True)
    if not (isinstance(saved, dict) and {"state_dict", "constants", "program"} <= set(saved)):
        raise ValueError(
            f"{path} is not a torchao file of this lightning-quant (a dict of state_dict, constants and program): "
            "export it again."
        )
    return deserialize(SerializedArtifact(saved["program"], saved["state_dict"], saved["constants"], b"")).module()


def _torchao_layer(layer: Any) -> nn.Module:
    """The plain layer a packed one stands for, its weight a torchao tensor of the same integers and scales."""
    packed, scales = layer.packed, layer.scales
    q = unpack(packed, layer.bits).flatten(1).to(torch.int8)
    weight = IntxUnpackedToInt8Tensor(
        q,
        scales,
        torch.zeros_like(scales, dtype=torch.int8),
        getattr(torch, f"int{layer.bits}"),  # torch.int4 is missing from torch's type stubs
        (1, layer.group_size),
        scales.dtype,
        None,
    )
    plain: nn.Module
    if hasattr(layer, "in_features"):
        plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        if layer.bias is not None:
            plain.bias = nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
    else:
        plain = nn.Embedding(layer.num_embeddings, layer.embedding_dim)
    plain.weight = nn.Parameter(weight, requires_grad=False)
    return plain
