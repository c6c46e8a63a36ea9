"""Keep ``nn.TransformerEncoder`` on PyTorch's fused inference kernels, also after dynamic int8 quantization.

PyTorch runs an ``nn.TransformerEncoderLayer`` in eval mode through one fused kernel
(``torch._transformer_encoder_layer_fwd``) and its ``nn.MultiheadAttention`` through another
(``torch._native_multi_head_attention``). Before taking the layer kernel, the layer reads ``.weight`` of
its feed-forward Linears. After ``torch.ao.quantization.quantize_dynamic`` those are int8 modules whose
``weight`` is a method, and inference crashes (``AttributeError: 'function' object has no attribute
'device'``). The layer kernel cannot take int8 weights, and the feed-forward Linears are most of the work,
so :func:`route_quantized_encoder_layers` keeps them int8 and sends those layers module by module:
attention still runs fused (the attention weights stay float), the feed-forward runs int8. On this
project's CPU that ran 1.1-1.5x faster than the float fused layer for 4 layers of d_model 256, and 0.75-0.95x
for the tiny digits transformer (d_model 64: too small for int8 to pay); see benchmarks/bench_inference.py.

:func:`find_manual_attention` points at hand-written ``softmax(q @ k^T) @ v`` in user code, which should
call ``torch.nn.functional.scaled_dot_product_attention`` (fused flash / memory-efficient kernels).
"""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_quant.inputs import tensors_in

FUSED_ENCODER_LAYER = "aten._transformer_encoder_layer_fwd"
FUSED_ATTENTION = "aten._native_multi_head_attention"


def _fastpath_weights(layer: nn.TransformerEncoderLayer) -> tuple[Any, ...]:
    # what TransformerEncoderLayer.forward reads before choosing the fused layer kernel
    return (
        layer.self_attn.in_proj_weight,
        layer.self_attn.out_proj.weight,
        layer.linear1.weight,
        layer.linear2.weight,
    )


def _run_module_by_module(layer: nn.Module, args: tuple[Any, ...]) -> None:
    """Forward pre-hook that keeps a layer off the fused layer kernel.

    The layer's fast-path check declines the fused kernel when hooks are attached (it would skip them),
    and it does so before reading the weights of the quantized Linears: the layer then runs its modules
    one by one, attention through the fused attention kernel.
    """
    return None


def route_quantized_encoder_layers(model: nn.Module) -> list[str]:
    """Let ``nn.TransformerEncoder`` models with int8 Linears run inference; return the layers routed.

    Call after legacy dynamic quantization (``torch.ao.quantization.quantize_dynamic``; the project's
    :func:`~lightning_quant.quantization.legacy.legacy_quantize_dynamic` calls it itself). Every ``nn.TransformerEncoderLayer`` whose
    attention or feed-forward weights are no longer float tensors runs module by module (attention fused,
    Linears int8) instead of crashing in the fused-layer check, and its ``nn.TransformerEncoder`` stops
    converting padded batches to nested tensors (that check reads the same weights). Float layers keep the
    fused layer kernel. Calling it again changes nothing.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> from lightning_quant.demo import TransformerNet
        >>> int8 = torch.ao.quantization.quantize_dynamic(TransformerNet().eval(), {nn.Linear})
        >>> route_quantized_encoder_layers(int8)
        ['encoder.layers.0', 'encoder.layers.1']
        >>> with torch.inference_mode():
        ...     int8(torch.rand(4, 1, 8, 8)).shape
        torch.Size([4, 10])
    """
    routed = []
    for name, module in model.named_modules():
        if isinstance(module, nn.TransformerEncoder):
            layers = [layer for layer in module.layers if _needs_routing(layer)]
            if layers:
                module.use_nested_tensor = False
        elif isinstance(module, nn.TransformerEncoderLayer) and _needs_routing(module):
            if _run_module_by_module not in module._forward_pre_hooks.values():
                module.register_forward_pre_hook(_run_module_by_module)
            routed.append(name)
    return routed


def _needs_routing(layer: nn.Module) -> bool:
    return isinstance(layer, nn.TransformerEncoderLayer) and not all(
        isinstance(weight, torch.Tensor) for weight in _fastpath_weights(layer)
    )


class _OperatorRecorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.operators: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.operators.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def inference_operators(model: nn.Module, *inputs: Any) -> set[str]:
    """Names of the operators one eval-mode ``inference_mode`` forward of ``model`` runs.

    Shows which kernels a model really takes: :data:`FUSED_ENCODER_LAYER` (fused transformer layer),
    :data:`FUSED_ATTENTION` (fused attention), ``"quantized.linear_dynamic"`` (int8 Linear), ...
    The model is put in eval mode and back.

    Example::

        >>> from lightning_quant.demo import TransformerNet
        >>> FUSED_ENCODER_LAYER in inference_operators(TransformerNet(), torch.rand(4, 1, 8, 8))
        True
    """
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), _OperatorRecorder() as recorder:
            model(*inputs)
    finally:
        model.train(was_training)
    return recorder.operators


_MATMULS = {
    torch.matmul,
    torch.bmm,
    torch.baddbmm,
    torch.einsum,
    torch.Tensor.matmul,
    torch.Tensor.__matmul__,
    torch.Tensor.bmm,
}
_SOFTMAXES = {torch.softmax, torch.nn.functional.softmax, torch.Tensor.softmax}
_THIS_FILE = str(Path(__file__))
_TORCH_DIR = str(Path(torch.__file__).parent)


class _AttentionPatternMode(TorchFunctionMode):
    """Follows ``matmul -> (scale, mask, dropout...) -> softmax -> matmul`` through user code.

    Only calls made from Python code are seen: PyTorch's own composite functions (``nn.MultiheadAttention``,
    ``scaled_dot_product_attention``) run as one call, so they are never reported.
    """

    def __init__(self) -> None:
        super().__init__()
        # id -> tensor, holding the tensors so an id cannot be reused during the forward
        self.scores: dict[int, torch.Tensor] = {}
        self.weights: dict[int, torch.Tensor] = {}
        self.found: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        tensors = tensors_in((args, kwargs))
        if func in _MATMULS:
            if any(id(t) in self.weights for t in tensors):
                self.found.append(_user_code_location())
            elif isinstance(out, torch.Tensor):
                self.scores[id(out)] = out
        elif func in _SOFTMAXES:
            if any(id(t) in self.scores for t in tensors):
                self.weights[id(out)] = out
        elif isinstance(out, torch.Tensor):
            # same-shape follow-ups (scaling, masking, dropout) keep what the tensor is
            for tracked in (self.scores, self.weights):
                if any(id(t) in tracked and t.shape == out.shape for t in tensors):
                    tracked[id(out)] = out
        return out


def _user_code_location() -> str:
    for frame in reversed(traceback.extract_stack()):
        if not frame.filename.startswith((_THIS_FILE, _TORCH_DIR)):
            return f"{frame.filename}:{frame.lineno} ({frame.name})"
    return "<unknown>"


def find_manual_attention(model: nn.Module, *args: Any, **kwargs: Any) -> list[str]:
    """Where ``model``'s forward, called with ``args`` and ``kwargs``, computes attention by hand
    (``softmax(q @ k^T) @ v``), as ``file:line``.

    Hand-written attention materialises the full score matrix and runs three kernels;
    ``torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=..., dropout_p=..., is_causal=...)``
    computes the same in one fused (flash / memory-efficient) kernel. An empty list means none was found.

    Example::

        >>> class HandWritten(nn.Module):
        ...     def forward(self, x):
        ...         return torch.softmax(x @ x.transpose(1, 2) / 8**0.5, dim=-1) @ x
        >>> [where.split(":")[-1] for where in find_manual_attention(HandWritten(), torch.rand(2, 4, 8))]
        ['3 (forward)']
        >>> find_manual_attention(nn.MultiheadAttention(8, 2, batch_first=True), *[torch.rand(2, 4, 8)] * 3)
        []
    """
    with torch.no_grad(), _AttentionPatternMode() as mode:
        model(*args, **kwargs)
    return mode.found
