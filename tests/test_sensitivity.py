"""Accuracy-aware int8 without Lightning: MetricBudget, layer sensitivity, the float-fallback search, and
QAT's convert with layers bypassed. The fragile model has one layer whose input carries a huge activation
outlier: per-tensor (static) or per-row (dynamic) activation scales then round every other channel to 0."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_quant.quantization import (
    DynamicQuantConfig,
    MetricBudget,
    StaticQuantConfig,
    count_quantized_ops,
    fallback_search,
    layer_sensitivity,
    quantizable_layers,
    quantize,
    save_sensitivity,
)
from lightning_quant.quantization.fallback import convert_keeping_float
from lightning_quant.quantization.qat import prepare_qat

OUTLIER = 1000.0


class FragileNet(nn.Module):
    """Four Linear layers; the input of ``fragile`` has channel 0 scaled by 1000 (its weight column divided
    by 1000, so the float function is unchanged)."""

    def __init__(self, in_features: int = 16, hidden: int = 32, num_classes: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fragile = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, num_classes)
        scale = torch.ones(hidden)
        scale[0] = OUTLIER
        self.register_buffer("scale", scale)
        with torch.no_grad():
            self.fragile.weight[:, 0] /= OUTLIER

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc2(torch.relu(self.fc1(x))))
        return self.head(torch.relu(self.fragile(h * self.scale)))


def fragile_data(seed: int = 0, samples: int = 256):
    """A FragileNet and inputs labelled by that net itself: the float model scores accuracy 1.0."""
    torch.manual_seed(seed)
    model = FragileNet().eval()
    x = torch.randn(samples, 16)
    with torch.no_grad():
        labels = model(x).argmax(1)
    return model, x, labels


def accuracy(model, x, labels) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == labels).float().mean().item()


@pytest.fixture(scope="module")
def fragile_static():
    model, x, labels = fragile_data()
    batches = list(x.split(32))

    def quantize_with(keep_float):
        return quantize(model, StaticQuantConfig(observer="minmax", keep_float=tuple(keep_float)), x[:4], batches)

    return model, x, labels, batches, quantize_with


def test_budget_validates_its_fields_with_what_is_allowed():
    with pytest.raises(ValueError, match=r"max_drop must be a finite number >= 0"):
        MetricBudget("val/acc", max_drop=-0.1)
    with pytest.raises(ValueError, match=r"max_drop must be a finite number"):
        MetricBudget("val/acc", max_drop="1%")
    with pytest.raises(ValueError, match=r"max_drop must be a finite number"):
        MetricBudget("val/acc", max_drop=float("nan"))
    with pytest.raises(ValueError, match=r"relative=True .* must be <= 1"):
        MetricBudget("val/acc", max_drop=5, relative=True)
    with pytest.raises(ValueError, match=r"metric must be the name of a logged validation metric"):
        MetricBudget("", max_drop=0.1)
    with pytest.raises(ValueError, match=r"max_evaluations must be an integer >= 2"):
        MetricBudget("val/acc", max_drop=0.1, max_evaluations=1)
    with pytest.raises(ValueError, match=r"max_float_fraction must be a number from 0 to 1"):
        MetricBudget("val/acc", max_drop=0.1, max_float_fraction=1.5)
    with pytest.raises(TypeError, match=r"higher_is_better must be True or False"):
        MetricBudget("val/acc", max_drop=0.1, higher_is_better="yes")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['max_dorp'\]; allowed: \['metric', 'max_drop'"):
        MetricBudget.from_value({"metric": "val/acc", "max_dorp": 0.1})
    with pytest.raises(ValueError, match=r"needs \['max_drop'\]"):
        MetricBudget.from_value({"metric": "val/acc"})
    with pytest.raises(TypeError, match=r"must be None, a MetricBudget or a mapping"):
        MetricBudget.from_value(0.01)


def test_budget_drop_absolute_relative_and_lower_is_better():
    assert MetricBudget("acc", 0.01).allows(0.95, 0.9401) and not MetricBudget("acc", 0.01).allows(0.95, 0.939)
    relative = MetricBudget("acc", 0.1, relative=True)
    assert relative.drop(0.5, 0.45) == pytest.approx(0.1) and relative.allows(0.5, 0.451)
    loss = MetricBudget("loss", 0.05, higher_is_better=False)
    assert loss.drop(1.0, 1.2) == pytest.approx(0.2) and loss.allows(1.0, 0.5) and not loss.allows(1.0, 1.2)
    assert not loss.allows(1.0, math.nan)
    assert MetricBudget("acc", 0.1, max_float_fraction=0.25).max_float_layers(4) == 1
    assert MetricBudget("acc", 0.1, max_float_fraction=0.25).max_float_layers(3) == 0


def test_sensitivity_ranks_the_fragile_layer_first_and_saves_table_and_chart(fragile_static, tmp_path):
    model, x, labels, batches, quantize_with = fragile_static
    layers = quantizable_layers(model, (nn.Linear,))
    assert layers == ["fc1", "fc2", "fragile", "head"]
    rows = layer_sensitivity(model, quantize_with, layers, batches[:2], evaluate=lambda m: accuracy(m, x, labels))
    assert [row["rank"] for row in rows] == [1, 2, 3, 4]
    assert rows[0]["layer"] == "fragile"
    assert rows[0]["relative_error"] > 20 * rows[1]["relative_error"]
    assert rows[0]["sqnr_db"] < rows[1]["sqnr_db"]
    assert rows[0]["metric"] < min(row["metric"] for row in rows[1:])  # the metric agrees with the ranking
    paths = save_sensitivity(rows, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sensitivity.csv", "sensitivity.md", "sensitivity.png"]
    lines = paths["csv"].read_text().splitlines()
    assert lines[0] == "rank,layer,relative_error,sqnr_db,metric,note" and lines[1].startswith("1,fragile,")
    assert "| 1 | fragile |" in paths["md"].read_text()
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fallback_keeps_exactly_the_fragile_layer_float_and_meets_the_budget(fragile_static):
    model, x, labels, batches, quantize_with = fragile_static
    budget = MetricBudget("acc", max_drop=0.02)
    result = fallback_search(
        model,
        quantize_with,
        lambda m: accuracy(m, x, labels),
        budget,
        quantizable_layers(model, (nn.Linear,)),
        inputs=batches[:2],
    )
    assert result.reference == 1.0
    assert not budget.allows(result.reference, result.before)  # fully int8: over budget
    assert result.within_budget and budget.allows(result.reference, result.after)
    assert [layer["name"] for layer in result.float_layers] == ["fragile"]
    assert "sensitivity rank 1 of 4" in result.float_layers[0]["reason"]
    assert result.evaluations == 3  # float, fully int8, fragile float
    assert count_quantized_ops(result.model) == {"aten.linear (int8 weight)": 3}
    report = result.report(budget)
    assert (
        report["before"] == result.before and report["after"] == result.after and report["stopped"] == "within budget"
    )


def test_fallback_within_budget_at_once_needs_no_sensitivity():
    model, x, labels = fragile_data()
    tolerant = MetricBudget("acc", max_drop=0.5)
    calls = []

    def quantize_with(keep_float):
        calls.append(list(keep_float))
        return quantize(model, DynamicQuantConfig(keep_float=tuple(keep_float)), x[:4])

    result = fallback_search(model, quantize_with, lambda m: accuracy(m, x, labels), tolerant, ["fc1", "fragile"])
    assert result.within_budget and result.evaluations == 2 and result.float_layers == [] and result.sensitivity == []
    assert calls == [[]]


def test_caps_stop_the_search_and_the_best_model_is_returned():
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(16, 16), nn.ReLU()) for _ in range(8)]).eval()
    x = torch.randn(64, 16)
    layers = quantizable_layers(model, (nn.Linear,))
    with torch.no_grad():
        expected = model(x)

    def closeness(m) -> float:  # any int8 layer makes it worse than float: the budget max_drop=0 is unreachable
        with torch.no_grad():
            return -float((m(x) - expected).pow(2).mean())

    def quantize_with(keep_float):
        return quantize(model, DynamicQuantConfig(keep_float=tuple(keep_float)), x[:4])

    capped = MetricBudget("closeness", max_drop=0.0, max_evaluations=4, max_float_fraction=1.0)
    result = fallback_search(model, quantize_with, closeness, capped, layers, inputs=[x])
    assert result.evaluations == 4 and not result.within_budget
    assert result.stopped == "max_evaluations=4 validation passes made"
    assert len(result.steps) == 3 and len(result.float_layers) == 2
    assert result.after == max(step["value"] for step in result.steps)

    few_float = MetricBudget("closeness", max_drop=0.0, max_float_fraction=0.25)
    result = fallback_search(model, quantize_with, closeness, few_float, layers, inputs=[x])
    assert len(result.float_layers) == 2 and result.evaluations == 4  # 25% of 8 layers
    assert result.stopped.startswith("max_float_fraction=0.25 of 8 quantizable layers allows 2")


def test_qat_convert_keeping_float_bypasses_the_fragile_layer():
    model, x, labels = fragile_data()
    qat = prepare_qat(model, x[:4])
    model.train()
    with torch.no_grad():
        for batch in x.split(32):  # observers see the data, as in QAT training
            qat(batch)
    model.eval()
    full = convert_keeping_float(qat, [])
    kept = convert_keeping_float(qat, ["fragile"])
    assert count_quantized_ops(full) == {"aten.linear (int8 weight)": 4}
    assert count_quantized_ops(kept) == {"aten.linear (int8 weight)": 3}
    assert accuracy(full, x, labels) < 0.95 <= accuracy(kept, x, labels)
    assert count_quantized_ops(qat.convert()) == {"aten.linear (int8 weight)": 4}  # the QAT graph is unchanged
