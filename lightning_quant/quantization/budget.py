"""The accuracy budget of int8: how much a validation metric may drop, and a search that returns layers to float.

Any approach plugs in through two callables: ``quantize_with(keep_float) -> model`` (the int8 model with
those layers left in float) and ``evaluate(model) -> float`` (one validation pass, the metric's value).

:func:`fallback_search` evaluates the fully quantized model and, while it is over the :class:`MetricBudget`,
returns the layers to float one at a time, most sensitive first (ranked by output error, which is cheap:
:func:`lightning_quant.quantization.sensitivity.layer_sensitivity`), one validation pass per step, until the
drop is within budget or a cap is hit (``max_evaluations`` passes in all, counting the float model's;
``max_float_fraction`` of the layers). Over budget it still returns the best model it found, with
``within_budget=False``.

Example (dynamic int8 of a small MLP, accuracy on random data)::

    >>> import torch
    >>> from torch import nn
    >>> from lightning_quant.quantization import DynamicQuantConfig, quantize
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    >>> x = torch.randn(64, 8)
    >>> labels = model(x).argmax(1)
    >>> def evaluate(m):
    ...     with torch.no_grad():
    ...         return (m(x).argmax(1) == labels).float().mean().item()
    >>> def quantize_with(keep_float):
    ...     return quantize(model, DynamicQuantConfig(keep_float=tuple(keep_float)), x)
    >>> budget = MetricBudget("acc", max_drop=0.05)
    >>> result = fallback_search(model, quantize_with, evaluate, budget, layers=["0", "2"], inputs=[x])
    >>> result.within_budget, result.evaluations
    (True, 2)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from lightning_quant.quantization.sensitivity import layer_sensitivity

_BUDGET_FIELDS = ("metric", "max_drop", "relative", "higher_is_better", "max_evaluations", "max_float_fraction")


@dataclass(frozen=True)
class MetricBudget:
    """How much a validation metric may get worse from float to int8, and what the search may spend.

    Args:
        metric: the name the LightningModule logs in ``validation_step``, e.g. ``"val/acc"``.
        max_drop: the largest allowed drop (>= 0), in the metric's units, or as a fraction of the float
            value when ``relative`` (``0.01`` = 1%).
        relative: ``max_drop`` is a fraction of the float model's value.
        higher_is_better: ``False`` for losses and errors (then a rise is the drop).
        max_evaluations: validation passes the search may make in all, counting the float model's and the
            fully quantized model's (>= 2; default 10).
        max_float_fraction: the largest fraction of the quantizable layers that may be returned to float
            (0 to 1; default 0.25). With 4 layers, 0.25 allows one.

    Example::

        >>> MetricBudget("val/acc", max_drop=0.01).allows(before=0.95, after=0.945)
        True
        >>> MetricBudget.from_value({"metric": "val/loss", "max_drop": 0.1, "relative": True, "higher_is_better": False}).relative
        True
    """

    metric: str
    max_drop: float
    relative: bool = False
    higher_is_better: bool = True
    max_evaluations: int = 10
    max_float_fraction: float = 0.25

    def __post_init__(self) -> None:
        if not isinstance(self.metric, str) or not self.metric:
            raise ValueError(
                f"MetricBudget.metric must be the name of a logged validation metric such as "
                f"'val/acc', got {self.metric!r}"
            )
        if (
            isinstance(self.max_drop, bool)
            or not isinstance(self.max_drop, (int, float))
            or not (math.isfinite(self.max_drop) and self.max_drop >= 0)
        ):
            raise ValueError(
                f"MetricBudget.max_drop must be a finite number >= 0 (e.g. 0.01: the metric may drop "
                f"by 0.01, or by 1% with relative=True), got {self.max_drop!r}"
            )
        if self.relative and self.max_drop > 1:
            raise ValueError(
                f"MetricBudget.max_drop={self.max_drop} with relative=True is a fraction of the float "
                "value and must be <= 1 (0.01 = 1%)"
            )
        for name in ("relative", "higher_is_better"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"MetricBudget.{name} must be True or False, got {getattr(self, name)!r}")
        if (
            isinstance(self.max_evaluations, bool)
            or not isinstance(self.max_evaluations, int)
            or self.max_evaluations < 2
        ):
            raise ValueError(
                f"MetricBudget.max_evaluations must be an integer >= 2 (the float model and the fully "
                f"quantized one are evaluated first), got {self.max_evaluations!r}"
            )
        fraction = self.max_float_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction <= 1:
            raise ValueError(
                f"MetricBudget.max_float_fraction must be a number from 0 to 1 (the share of "
                f"quantizable layers that may go back to float), got {fraction!r}"
            )

    @classmethod
    def from_value(cls, value: Union[MetricBudget, Mapping[str, Any], None]) -> Optional[MetricBudget]:
        """A budget from itself, ``None``, or a mapping such as ``{"metric": "val/acc", "max_drop": 0.01}``
        (what a Hydra config holds)."""
        if value is None or isinstance(value, MetricBudget):
            return value
        if isinstance(value, Mapping):
            unknown = sorted(set(map(str, value)) - set(_BUDGET_FIELDS))
            if unknown:
                raise ValueError(f"max_metric_drop has unknown key(s) {unknown}; allowed: {list(_BUDGET_FIELDS)}")
            missing = [key for key in ("metric", "max_drop") if key not in value]
            if missing:
                raise ValueError(f"max_metric_drop needs {missing}, e.g. {{metric: val/acc, max_drop: 0.01}}")
            return cls(**{str(k): v for k, v in value.items()})
        raise TypeError(
            f"max_metric_drop must be None, a MetricBudget or a mapping like "
            f"{{'metric': 'val/acc', 'max_drop': 0.01}}, got {type(value).__name__}: {value!r}"
        )

    def drop(self, before: float, after: float) -> float:
        """How much worse ``after`` is than ``before`` (negative: better), in the budget's units."""
        worse = (before - after) if self.higher_is_better else (after - before)
        if not self.relative:
            return worse
        if before == 0:
            return 0.0 if worse <= 0 else math.inf
        return worse / abs(before)

    def allows(self, before: float, after: float) -> bool:
        return math.isfinite(after) and self.drop(before, after) <= self.max_drop + 1e-12

    def max_float_layers(self, num_layers: int) -> int:
        return math.floor(self.max_float_fraction * num_layers + 1e-9)

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _BUDGET_FIELDS}


@dataclass
class FallbackResult:
    """What :func:`fallback_search` found. ``model`` is the best model (within budget with the fewest
    float layers, else the best metric); ``float_layers`` are ``{"name", "reason"}`` in the order returned."""

    model: Any
    reference: float
    before: float
    after: float
    within_budget: bool
    evaluations: int
    float_layers: list[dict[str, Any]]
    stopped: str
    steps: list[dict[str, Any]] = field(default_factory=list)
    sensitivity: list[dict[str, Any]] = field(default_factory=list)

    def report(self, budget: MetricBudget) -> dict[str, Any]:
        """The ``accuracy_budget`` section of ``manifest.json``."""
        return {
            **budget.to_dict(),
            "float": self.reference,
            "before": self.before,
            "after": self.after,
            "drop": budget.drop(self.reference, self.after),
            "within_budget": self.within_budget,
            "evaluations": self.evaluations,
            "float_layers": self.float_layers,
            "stopped": self.stopped,
            "steps": self.steps,
        }


def fallback_search(
    float_model: Any,
    quantize_with: Callable[[Sequence[str]], Any],
    evaluate: Callable[[Any], float],
    budget: MetricBudget,
    layers: Sequence[str],
    inputs: Sequence[Any] = (),
    ranking: Optional[Sequence[Mapping[str, Any]]] = None,
) -> FallbackResult:
    """Quantize everything; while over ``budget``, return the most sensitive layer to float and evaluate again.

    Args:
        float_model: the float model (evaluated once: the reference value of the metric).
        quantize_with: ``keep_float -> int8 model``; called with ``[]`` first, then with a growing list.
        evaluate: ``model -> metric value``: one validation pass (counted).
        budget: the allowed drop and the caps (``max_evaluations`` passes in all, ``max_float_fraction``).
        layers: the candidate layers (the approach's quantizable modules).
        inputs: a few input batches for :func:`layer_sensitivity` (the ranking), computed only when the
            fully quantized model is over budget. Not needed when ``ranking`` is given.
        ranking: rows as from :func:`layer_sensitivity` (most sensitive first), to skip computing them.
    """
    layers = list(layers)
    evaluations = 0

    def measure(model: Any) -> float:
        nonlocal evaluations
        evaluations += 1
        return float(evaluate(model))

    reference = measure(float_model)
    model = quantize_with([])
    before = measure(model)
    best: tuple[Any, float, list[dict[str, Any]]] = (model, before, [])
    steps = [{"float_layers": 0, "value": before}]
    if budget.allows(reference, before):
        return FallbackResult(model, reference, before, before, True, evaluations, [], "within budget", steps)
    if ranking is None:
        ranking = layer_sensitivity(float_model, quantize_with, layers, inputs) if layers else []
    ranked = [dict(row) for row in ranking if row.get("relative_error") is not None]
    limit = min(budget.max_float_layers(len(layers)), max(len(layers) - 1, 0))  # one layer at least stays int8
    returned: list[dict[str, Any]] = []
    stopped = "every ranked layer is float"
    for row in ranked:
        if len(returned) >= limit:
            stopped = (
                f"max_float_fraction={budget.max_float_fraction} of {len(layers)} quantizable layers "
                f"allows {limit} float layer(s)"
                + (" (one stays int8)" if budget.max_float_layers(len(layers)) > limit else "")
            )
            break
        if evaluations >= budget.max_evaluations:
            stopped = f"max_evaluations={budget.max_evaluations} validation passes made"
            break
        returned.append(
            {
                "name": row["layer"],
                "reason": (
                    f"sensitivity rank {row['rank']} of {len(ranked)}: quantized alone, its relative output "
                    f"error is {row['relative_error']:.3g} (SQNR {row['sqnr_db']:.1f} dB)"
                ),
            }
        )
        model = quantize_with([r["name"] for r in returned])
        value = measure(model)
        returned[-1]["reason"] += f"; {budget.metric} {steps[-1]['value']:.4g} -> {value:.4g} with it float"
        steps.append({"float_layers": len(returned), "layer": row["layer"], "value": value})
        if _better(value, best[1], budget):
            best = (model, value, list(returned))
        if budget.allows(reference, value):
            return FallbackResult(
                model,
                reference,
                before,
                value,
                True,
                evaluations,
                list(returned),
                "within budget",
                steps,
                ranked,
            )
    model, after, kept = best
    return FallbackResult(model, reference, before, after, False, evaluations, kept, stopped, steps, ranked)


def _better(value: float, best: float, budget: MetricBudget) -> bool:
    if not math.isfinite(value):
        return False
    if not math.isfinite(best):
        return True
    return value > best if budget.higher_is_better else value < best
