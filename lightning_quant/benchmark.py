"""Measurements that are fair to compare: median latency after warm-up, bytes of what a model holds."""

from __future__ import annotations

import io
import statistics
import time
from typing import Any, Callable

import torch
from torch import fx, nn

from lightning_quant.quantization.inputs import ModelInputs


def latency_ms(model: Callable[..., Any], inputs: Any, warmup: int = 5, repeats: int = 20) -> float:
    """Median wall time of one call, in milliseconds, after ``warmup`` calls (no autograd).

    Example::

        >>> latency_ms(nn.Linear(4, 4), torch.zeros(2, 4)) > 0
        True
    """
    inputs = ModelInputs.from_value(inputs)
    times = []
    with torch.no_grad():
        for _ in range(warmup):
            inputs(model)
        for _ in range(repeats):
            start = time.perf_counter()
            inputs(model)
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000.0


def model_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights as ``torch.save`` writes them (int8 weights count one byte each).

    Graph modules' constants (PT2E keeps its int8 weights as ``get_attr`` tensors) are included.

    Example::

        >>> model_bytes(nn.Linear(256, 256)) > 256 * 256 * 4
        True
    """
    tensors: dict[str, Any] = dict(model.state_dict())
    for name, module in model.named_modules():
        if isinstance(module, fx.GraphModule):
            for node in module.graph.nodes:
                if node.op == "get_attr":
                    value = _get_attr(module, node.target)
                    if isinstance(value, torch.Tensor):
                        tensors.setdefault(f"{name}.{node.target}" if name else str(node.target), value)
    buffer = io.BytesIO()
    torch.save(tensors, buffer)
    return buffer.getbuffer().nbytes


def _get_attr(module: nn.Module, target: str) -> Any:
    for part in target.split("."):
        module = getattr(module, part, None)
    return module
