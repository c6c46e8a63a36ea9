"""Measurements that are fair to compare: latency timed side by side after warm-up, bytes of what a model holds."""

from __future__ import annotations

import io
import os
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any, Optional

import torch
from torch import fx, nn

from lightning_quant.inputs import ModelInputs


def latency_ms(model: Callable[..., Any], inputs: Any, warmup: int = 5, repeats: int = 20) -> float:
    """Median wall time of one call, in milliseconds, after ``warmup`` calls (no autograd).

    Example::

        >>> latency_ms(nn.Linear(4, 4), torch.zeros(2, 4)) > 0
        True
    """
    return compare_latency_ms({"model": model}, inputs, warmup, repeats)["model"]


def compare_latency_ms(
    models: Mapping[str, Callable[..., Any]],
    inputs: Any,
    warmup: int = 5,
    repeats: int = 20,
    statistic: Callable[[list[float]], Any] = statistics.median,
    block: int = 1,
    span_s: float = 0.0,
) -> dict[str, Any]:
    """Latency of each model (``statistic`` of the calls, default median), in ms, timed in interleaved rounds.

    Interleaving spreads load from other processes evenly over the models, so their *ratios* hold even on
    a busy machine (absolute times do not). ``statistic=min`` gives the least disturbed call.

    Each round calls each model once untimed, then times ``block`` calls of it in a row: a model called right
    after another runs slower than on its own (the other's OpenMP threads still spin on the cores, its
    buffers fill the caches). Measured on a small conv net beside its ``.pt2`` program, one thread: ONNX
    Runtime's fastest call 0.50 ms timed call by call in alternation, 0.35 ms on its own, 0.35-0.37 ms in
    blocks of 5-20.

    ``span_s`` spreads the rounds over at least that many seconds (a pause after each round that finished early):
    a moment of another process's work (a few hundred ms) then disturbs some rounds, not all of them.

    Example::

        >>> sorted(compare_latency_ms({"a": nn.Linear(4, 4), "b": nn.Identity()}, torch.zeros(2, 4)))
        ['a', 'b']
    """
    inputs = ModelInputs.from_value(inputs)
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.no_grad():
        for _ in range(warmup):
            for model in models.values():
                inputs(model)
        started = time.perf_counter()
        for index in range(repeats):
            for name, model in models.items():
                inputs(model)  # untimed: takes the cores and caches over from the model before
                for _ in range(block):
                    start = time.perf_counter()
                    inputs(model)
                    times[name].append(time.perf_counter() - start)
            time.sleep(max(0.0, started + span_s * (index + 1) / repeats - time.perf_counter()))
    return {name: statistic([t * 1000.0 for t in values]) for name, values in times.items()}


def quartiles(values: list[float]) -> list[float]:
    """``[p25, median, p75]`` of ``values``: the median and its spread, robust to a few disturbed calls."""
    if len(values) < 2:
        return [values[0]] * 3
    low, median, high = statistics.quantiles(values, n=4, method="inclusive")
    return [low, median, high]


# Below this many milliseconds per call of the float model, a call is mostly call overhead (Python, the runtime's
# dispatch) and ratios between files move by more than 10% from run to run (0.05 vs 0.06 ms in one job of a sweep,
# the other way round in the next): the manifest says such a model is too fast to time reliably.
TOO_FAST_TO_TIME_MS = 0.1


def measure_speed(
    float_model: Callable[..., Any],
    reference: Callable[..., Any],
    runtimes: Mapping[str, Callable[..., Any]],
    inputs: Any,
    warmup: int = 10,
    repeats: int = 10,
    block: int = 10,
    span_s: float = 0.5,
) -> dict[str, Any]:
    """Time the float model and every exported file side by side, in interleaved rounds of ``block`` calls each
    (another process's load falls on all of them alike, so their ratios hold, and each file is timed as it runs
    on its own: see :func:`compare_latency_ms`), the rounds spread over at least ``span_s`` seconds; pick the fastest
    file.

    Returns ``latency_ms`` (per name, the fastest call: ``float``, each format, and ``quantized``: the
    fastest file's, or the eager ``reference``'s when there is no file), ``spread_ms`` (``[p25, median, p75]`` per
    name), ``fastest``
    (the fastest format, ``None`` without files, whatever its speed: the caller decides what a file slower than float
    means), ``speedup_vs_float`` per format, ``load_average`` (1-minute, at start and end) and ``too_fast_to_time``
    (the float model's fastest call is under :data:`TOO_FAST_TO_TIME_MS`: the ratios are not reliable).

    Example::

        >>> speed = measure_speed(nn.Linear(4, 4), nn.Linear(4, 4), {"copy": nn.Linear(4, 4)}, torch.zeros(2, 4))
        >>> speed["fastest"], sorted(speed["latency_ms"])
        ('copy', ['copy', 'float', 'quantized'])
    """
    load_start = os.getloadavg()[0]
    models = {"float": float_model, **runtimes} if runtimes else {"float": float_model, "quantized": reference}
    # The fastest call, not the median: another process on the machine slows some calls of each model by 2-3x
    # (ONNX Runtime's and OpenMP's threads wait for a busy core) and moves medians and their ratios with it; the
    # least disturbed call is what the file costs on this CPU, and its ratio to float's held within a few percent
    # from a quiet to a loaded machine (benchmarks/load_results.md).
    # Spread over half a second: in one CI run the rounds of an int4 step (0.2 ms a call, all rounds within 30 ms)
    # all fell in one disturbed moment, 1.5x the file's standalone time.
    timed = compare_latency_ms(models, inputs, warmup, repeats, lambda v: (min(v), quartiles(v)), block, span_s)
    latency = {name: best for name, (best, _) in timed.items()}
    spread = {name: values for name, (_, values) in timed.items()}
    fastest: Optional[str] = min(runtimes, key=latency.__getitem__) if runtimes else None
    if fastest is not None:
        latency["quantized"], spread["quantized"] = latency[fastest], spread[fastest]
    return {
        "latency_ms": latency,
        "spread_ms": spread,
        "too_fast_to_time": latency["float"] < TOO_FAST_TO_TIME_MS,
        "fastest": fastest,
        "speedup_vs_float": {name: latency["float"] / latency[name] for name in runtimes},
        "load_average": [round(load_start, 2), round(os.getloadavg()[0], 2)],
        "rounds": repeats,
        "block": block,
    }


def model_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights as ``torch.save`` writes them (int8 weights count one byte each).

    For a graph module only the tensors its graph reads count: a PT2E converted graph keeps its int8
    weights as ``get_attr`` constants and still holds the unused float originals.

    Example::

        >>> model_bytes(nn.Linear(256, 256)) > 256 * 256 * 4
        True
    """
    if isinstance(model, fx.GraphModule):
        tensors: dict[str, Any] = {}
        for module in model.modules():
            if isinstance(module, fx.GraphModule):
                for node in module.graph.nodes:
                    value = _get_attr(module, node.target) if node.op == "get_attr" else None
                    if isinstance(value, torch.Tensor):
                        tensors[f"{id(module)}.{node.target}"] = value
    else:
        tensors = dict(model.state_dict())
    buffer = io.BytesIO()
    torch.save(tensors, buffer)
    return buffer.getbuffer().nbytes


def _get_attr(module: nn.Module, target: str) -> Any:
    found: Any = module
    for part in target.split("."):
        found = getattr(found, part, None)
    return found
