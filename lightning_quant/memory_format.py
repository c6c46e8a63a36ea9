"""Channels-last memory format for conv nets (plain torch, no Lightning)."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


def _channels_last_input(conv: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    # A no-op for inputs already channels-last (every conv after the first one, usually).
    x = args[0]
    if isinstance(x, torch.Tensor) and x.dim() == 4:
        return (x.contiguous(memory_format=torch.channels_last), *args[1:])
    return None


def to_channels_last(model: nn.Module) -> list[str]:
    """Put ``model``'s 2D convolutions in channels-last memory format, weights and inputs; return their names.

    The 4D parameters become channels-last (in place: optimizers and checkpoint loading keep working) and
    every ``nn.Conv2d`` gets a forward pre-hook that makes its 4D input channels-last, so inputs need no
    change, however the model is called. Calling it again changes nothing. A model without ``nn.Conv2d``
    is left as it is and ``[]`` is returned: channels-last only speeds up 2D convolutions.

    Example::

        >>> from lightning_quant.demo import ConvNet
        >>> model = ConvNet(channels=8, blocks=2)
        >>> to_channels_last(model)
        ['features.0.0', 'features.1.0']
        >>> model.features[0][0].weight.is_contiguous(memory_format=torch.channels_last)
        True
    """
    convs = {name: module for name, module in model.named_modules() if isinstance(module, nn.Conv2d)}
    if not convs:
        return []
    model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # Module.to takes it; the stub omits it
    for conv in convs.values():
        if _channels_last_input not in conv._forward_pre_hooks.values():
            conv.register_forward_pre_hook(_channels_last_input)
    return list(convs)


def with_contiguous_weights(model: nn.Module) -> nn.Module:
    """``model`` itself if its 4D parameters and buffers are contiguous, else a copy in which they are.

    For compilers that choose their own layout and mishandle channels-last constants: AOTInductor with
    freezing and a dynamic batch dimension computes wrong results from channels-last conv weights
    (torch 2.13: 2-4% relative error on the demo ConvNet, float and PT2E int8 alike).

    Example::

        >>> from lightning_quant.demo import ConvNet
        >>> model = ConvNet(channels=8, blocks=2)
        >>> with_contiguous_weights(model) is model
        True
        >>> _ = to_channels_last(model)
        >>> with_contiguous_weights(model).features[0][0].weight.is_contiguous()
        True
    """
    tensors = [*model.parameters(), *model.buffers()]
    if all(t.dim() != 4 or t.is_contiguous() for t in tensors):
        return model
    return copy.deepcopy(model).to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
