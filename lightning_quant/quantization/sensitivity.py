"""Per-layer sensitivity to int8: how far the output moves when one layer alone is quantized.

An approach plugs in through ``quantize_with(keep_float) -> model`` (the int8 model with those layers left
in float). :func:`layer_sensitivity` quantizes each layer *alone* (every other candidate layer float) and
measures how far the output moves from the float model's on a few batches (relative error and SQNR),
optionally also the metric. It needs no validation pass unless asked to. :func:`save_sensitivity` writes it
as ``sensitivity.csv``, ``sensitivity.md`` and a bar chart ``sensitivity.png``. The ranking is what
:func:`lightning_quant.quantization.budget.fallback_search` returns layers to float by.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from lightning_quant.inputs import ModelInputs, tensors_in
from lightning_quant.quantization.config import is_kept_float
from lightning_quant.quantization.layers import is_transposed_linear
from lightning_quant.report import markdown_table, write_table


def quantizable_layers(
    model: nn.Module, types: tuple[type[nn.Module], ...], keep_float: Sequence[str] = ()
) -> list[str]:
    """Names of the submodules of ``types`` that are not under a ``keep_float`` name, in model order. With
    ``nn.Linear`` among ``types``, Linears stored transposed (transformers' ``Conv1D``) count too."""
    linear = nn.Linear in types
    return [
        name
        for name, module in model.named_modules()
        if name
        and (isinstance(module, types) or (linear and is_transposed_linear(module)))
        and not is_kept_float(name, tuple(keep_float))
    ]


def output_error(reference: nn.Module, model: Callable[..., Any], inputs: Iterable[Any]) -> dict[str, float]:
    """``relative_error`` (||q - f|| / ||f|| over all outputs of all batches) and ``sqnr_db`` of ``model``
    against ``reference`` (the float model)."""
    signal = noise = 0.0
    with torch.no_grad():
        for batch in inputs:
            bound = ModelInputs.from_value(batch).bind(reference.forward)
            expected, actual = _float_leaves(bound(reference)), _float_leaves(bound(model))
            for e, a in zip(expected, actual):
                signal += float(e.double().pow(2).sum())
                noise += float((a.double() - e.double()).pow(2).sum())
    relative = math.sqrt(noise / signal) if signal > 0 else (0.0 if noise == 0 else math.inf)
    sqnr = math.inf if noise == 0 else (10 * math.log10(signal / noise) if signal > 0 else -math.inf)
    if not math.isfinite(noise):
        relative, sqnr = math.inf, -math.inf
    return {"relative_error": relative, "sqnr_db": sqnr}


def layer_sensitivity(
    float_model: nn.Module,
    quantize_with: Callable[[Sequence[str]], Any],
    layers: Sequence[str],
    inputs: Sequence[Any],
    evaluate: Optional[Callable[[Any], float]] = None,
) -> list[dict[str, Any]]:
    """Quantize each of ``layers`` alone (the others float) and measure the output error against
    ``float_model`` on ``inputs`` (and ``evaluate``'s metric, if given: one validation pass per layer).

    Returns one row per layer, most sensitive (largest relative error) first: ``rank``, ``layer``,
    ``relative_error``, ``sqnr_db``, ``metric`` (or None) and ``note`` (why a layer could not be measured,
    e.g. the approach quantizes nothing in it; such rows come last).

    Example::

        >>> from lightning_quant.quantization import DynamicQuantConfig, quantize
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
        >>> x = torch.randn(16, 4)
        >>> rows = layer_sensitivity(model, lambda keep: quantize(model, DynamicQuantConfig(keep_float=tuple(keep)), x),
        ...                          ["0", "2"], [x])
        >>> sorted(row["layer"] for row in rows), rows[0]["rank"]
        (['0', '2'], 1)
    """
    rows = []
    for layer in layers:
        others = [name for name in layers if name != layer]
        row: dict[str, Any] = {"layer": layer, "relative_error": None, "sqnr_db": None, "metric": None, "note": ""}
        try:
            model = quantize_with(others)
        except Exception as err:  # noqa: BLE001  (one layer the approach cannot quantize alone is a row, not a crash)
            row["note"] = f"not quantized alone: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            rows.append(row)
            continue
        row.update(output_error(float_model, model, inputs))
        if evaluate is not None:
            row["metric"] = float(evaluate(model))
        rows.append(row)
    rows.sort(key=lambda r: -1.0 if r["relative_error"] is None else r["relative_error"], reverse=True)
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
    return [{"rank": r["rank"], **{k: v for k, v in r.items() if k != "rank"}} for r in rows]


def save_sensitivity(rows: Sequence[Mapping[str, Any]], dirpath: Union[str, Path], title: str = "") -> dict[str, Path]:
    """Write ``sensitivity.csv``, ``sensitivity.md`` and ``sensitivity.png`` (bar chart of each layer's
    relative output error, quantized alone) into ``dirpath``, atomically; return their paths by suffix."""
    columns = ["rank", "layer", "relative_error", "sqnr_db", "metric", "note"]
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    return write_table(dirpath, "sensitivity", rows, columns, markdown_table(columns, cells), _bar_chart(rows, title))


def _float_leaves(output: Any) -> list[torch.Tensor]:
    return [t.detach().float() for t in tensors_in(output) if t.is_floating_point()]


def _cell(value: Any) -> Any:
    return f"{value:.4g}" if isinstance(value, float) else value


def _bar_chart(rows: Sequence[Mapping[str, Any]], title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    measured = [r for r in rows if r.get("relative_error") is not None and math.isfinite(r["relative_error"])]
    figure = Figure(figsize=(7, 0.35 * max(len(measured), 3) + 1.2), dpi=110, layout="constrained")
    axes = figure.subplots()
    names = [str(r["layer"]) for r in measured][::-1]
    values = [r["relative_error"] for r in measured][::-1]
    axes.barh(names, values, color=["C3" if v == max(values, default=0) else "C0" for v in values])
    if not measured:
        axes.text(0.5, 0.5, "no layer could be quantized alone", transform=axes.transAxes, ha="center", va="center")
    axes.set_xlabel("relative output error, layer quantized alone (||int8 - float|| / ||float||)")
    axes.set_title(title or "Layer sensitivity to int8 (most sensitive on top)", fontsize=10)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
