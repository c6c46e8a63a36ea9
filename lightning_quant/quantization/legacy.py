"""The deprecated ``torch.ao.quantization`` / TorchScript paths, used only where torchao has no answer.

torch 2.13 warns on every call into them; we say it once, in our own words, and silence the repeats.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from lightning_quant.deprecated import legacy_api
from lightning_quant.quantization.config import is_kept_float
from lightning_quant.quantization.transformer_fastpath import route_quantized_encoder_layers

RECURRENT_TYPES: tuple[type[nn.Module], ...] = (nn.LSTM, nn.GRU)


def legacy_quantize_dynamic(
    model: nn.Module, types: tuple[type[nn.Module], ...], keep_float: tuple[str, ...] = ()
) -> list[str]:
    """Replace, in place, every module of ``types`` not kept in float by its legacy dynamic int8 version.

    Returns the names of the replaced modules. Used for ``nn.LSTM``/``nn.GRU`` (torchao has no int8
    recurrent layer; on x86 CPUs the int8 LSTM is no faster than float, it saves weight memory) and for
    TorchScript files (TorchScript cannot trace torchao's int8 tensors). ``nn.TransformerEncoderLayer`` modules
    whose Linears became int8 are routed off the fused layer kernel (see :mod:`.transformer_fastpath`).
    """
    targets = {
        name for name, module in model.named_modules() if type(module) in types and not is_kept_float(name, keep_float)
    }
    if not targets:
        return []
    with legacy_api("torch.ao.quantization.quantize_dynamic"):
        quantized = torch.ao.quantization.quantize_dynamic(
            copy.deepcopy(model), qconfig_spec=targets, dtype=torch.qint8, inplace=False
        )
    for name in sorted(targets):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, quantized.get_submodule(name))
    # an nn.TransformerEncoderLayer with legacy int8 Linears crashes in its fast-path check (it reads .weight)
    route_quantized_encoder_layers(model)
    return sorted(targets)
