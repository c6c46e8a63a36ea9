"""Layers of models people bring that quantization must see through: Linears stored transposed (transformers'
``Conv1D``) and weights shared by two layers (tied weights).

**Transposed Linears.** GPT-2 (and GPT, ImageGPT, ...) compute their attention and MLP projections with
transformers' ``Conv1D``: a weight of shape ``[in, out]`` and ``torch.addmm(bias, x, weight)``. It is a Linear in
every respect but its type and weight layout, so quantizers that look for ``nn.Linear`` (torchao's ``quantize_``,
weight-only, PT2E's linear patterns) pass it by. It is recognised by its shape, without importing transformers:
:func:`is_transposed_linear`. A copy that gets quantized has such layers replaced by an equal ``nn.Linear``
(:func:`replace_transposed_linears`); a live model that is captured (static int8 and QAT export the model
itself) calls them as ``F.linear`` on the transposed weight while it is traced
(:func:`transposed_linears_as_linear`), so the graph holds the model's own parameter under its own name.

**Tied weights.** GPT-2's ``lm_head.weight`` is ``transformer.wte.weight``: one Parameter, two names.
:func:`tied_weights` lists such groups.

Example::

    >>> class Conv1D(nn.Module):  # transformers.pytorch_utils.Conv1D, as GPT-2 uses it
    ...     def __init__(self, nf, nx):
    ...         super().__init__()
    ...         self.nf, self.weight, self.bias = nf, nn.Parameter(torch.randn(nx, nf)), nn.Parameter(torch.zeros(nf))
    ...     def forward(self, x):
    ...         return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(*x.shape[:-1], self.nf)
    >>> model = nn.Sequential(Conv1D(8, 4), nn.ReLU())
    >>> is_transposed_linear(model[0]), replace_transposed_linears(model), model[0]
    (True, ['0'], Linear(in_features=4, out_features=8, bias=True))
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from typing import Optional, cast

import torch
from torch import nn
from torch.nn import functional as F


def is_transposed_linear(module: nn.Module) -> bool:
    """Whether ``module`` is a Linear stored transposed, as transformers' ``Conv1D``: a class named ``Conv1D`` with a
    2-d ``weight`` of shape ``[in, out]``, ``nf`` (the output width) equal to ``out``, and a bias of ``out`` values
    or none. (``nn.Conv1d``, a real convolution, has a 3-d weight.)"""
    weight = getattr(module, "weight", None)
    bias = getattr(module, "bias", None)
    return (
        type(module).__name__.endswith("Conv1D")  # also a fake-quantized Conv1D (weight-only QAT)
        and isinstance(weight, torch.Tensor)
        and weight.dim() == 2
        and getattr(module, "nf", None) == weight.shape[1]
        and (bias is None or (isinstance(bias, torch.Tensor) and tuple(bias.shape) == (weight.shape[1],)))
    )


def transposed_input_width(module: nn.Module) -> int:
    """The input width of a transposed Linear (``weight.shape[0]``)."""
    return int(module.weight.shape[0])  # type: ignore[index]  # is_transposed_linear checked the weight


def linear_from_transposed(module: nn.Module) -> nn.Linear:
    """An ``nn.Linear`` computing what the transposed Linear ``module`` computes (its weight transposed, copied)."""
    weight: torch.Tensor = module.weight  # type: ignore[assignment]  # is_transposed_linear checked it
    bias = getattr(module, "bias", None)
    linear = nn.Linear(
        weight.shape[0], weight.shape[1], bias=bias is not None, device=weight.device, dtype=weight.dtype
    )
    with torch.no_grad():
        linear.weight.copy_(weight.t())
        if bias is not None:
            linear.bias.copy_(bias)
    linear.train(module.training)
    return linear


def replace_transposed_linears(model: nn.Module) -> list[str]:
    """Replace, in place, every transposed Linear of ``model`` below the root by an equal ``nn.Linear`` (same name);
    return their names. For copies that get quantized: the new layers' weights are new tensors."""
    names = [name for name, module in model.named_modules() if name and is_transposed_linear(module)]
    for name in names:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, linear_from_transposed(model.get_submodule(name)))
    return names


def with_plain_linears(model: nn.Module) -> nn.Module:
    """``model`` itself if it has no transposed Linear, else a copy with each replaced by an equal ``nn.Linear``
    (:func:`replace_transposed_linears`): what tools that find Linears by type or by ``MatMul`` node quantize."""
    if not any(is_transposed_linear(module) for module in model.modules()):
        return model
    copied = copy.deepcopy(model)
    replace_transposed_linears(copied)
    return copied


@contextlib.contextmanager
def transposed_linears_as_linear(model: nn.Module) -> Iterator[list[str]]:
    """While inside, every transposed Linear of ``model`` computes ``F.linear(x, weight.t(), bias)`` (the same
    values): a graph captured meanwhile has ``aten.linear`` nodes reading the model's own weights, which PT2E's
    quantizers annotate like any Linear. Yields their names; their ``forward`` is given back on leaving."""
    layers = {name: module for name, module in model.named_modules() if is_transposed_linear(module)}
    for module in layers.values():
        module.forward = _linear_call(module)  # on the instance: removed on leaving
    try:
        yield list(layers)
    finally:
        for module in layers.values():
            vars(module).pop("forward", None)


def _linear_call(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    def forward(input: torch.Tensor) -> torch.Tensor:
        weight, bias = cast(torch.Tensor, module.weight), cast(Optional[torch.Tensor], module.bias)
        return F.linear(input, weight.t(), bias)

    return forward


def tied_weights(model: nn.Module) -> list[list[str]]:
    """Groups of parameter names that are one tensor (tied weights), each sorted; e.g. GPT-2's
    ``[["lm_head.weight", "transformer.wte.weight"]]``."""
    names: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(parameter), []).append(name)
    return sorted(sorted(group) for group in names.values() if len(group) > 1)
