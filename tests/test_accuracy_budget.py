"""max_metric_drop on the int8 callbacks, with a real Trainer: a model with one fragile layer gets exactly
that layer back in float; an unreachable budget still exports, marked over budget; digits stay within 10
validation passes; bad input fails early with the names that would work."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from conftest import fast_trainer, produced_formats
from test_sensitivity import FragileNet
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_quant import DynamicQuantization, PostTrainingQuantization, QuantizationAwareTraining
from lightning_quant.demo import ConvNet, DigitsClassifier, DigitsDataModule
from lightning_quant.quantization import MetricBudget

# beside conftest.FAST_FIT: two training batches, every validation batch (the budget's metric)
FAST = dict(limit_train_batches=2, limit_val_batches=1.0)


class FragileClassifier(L.LightningModule):
    """FragileNet on inputs labelled by its own float outputs (float accuracy 1.0); lr 0 keeps it so."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = FragileNet()
        self.example_input_array = torch.zeros(4, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val/acc", (logits.argmax(1) == y).float().mean())
        self.log("val/loss", nn.functional.cross_entropy(logits, y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def fragile_loaders(model: FragileClassifier):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(512, 16, generator=generator)
    with torch.no_grad():
        y = model.net.eval()(x).argmax(1)
    model.net.train()
    train = DataLoader(TensorDataset(x[:256], y[:256]), batch_size=64)
    val = DataLoader(TensorDataset(x[256:], y[256:]), batch_size=64)
    return train, val


def fit_fragile(callback, tmp_path, **trainer_kwargs):
    model = FragileClassifier()
    trainer = fast_trainer(
        tmp_path,
        [callback],
        logger=L.pytorch.loggers.CSVLogger(tmp_path, name="csv", version=""),
        **{**FAST, **trainer_kwargs},
    )
    trainer.fit(model, *fragile_loaders(model))
    return json.loads((tmp_path / "quantized" / "manifest.json").read_text())


BUDGET = {"metric": "val/acc", "max_drop": 0.02}


@pytest.fixture(scope="module")
def static_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("budget_static")
    callback = PostTrainingQuantization(
        num_calibration_batches=4, observer="minmax", formats=["torch_export", "onnx"], max_metric_drop=BUDGET
    )
    return callback, fit_fragile(callback, tmp_path), tmp_path


def test_static_fallback_keeps_exactly_the_fragile_layer_float(static_run):
    callback, manifest, tmp_path = static_run
    budget = manifest["accuracy_budget"]
    assert {k: budget[k] for k in ("metric", "max_drop", "relative", "max_evaluations", "max_float_fraction")} == {
        "metric": "val/acc",
        "max_drop": 0.02,
        "relative": False,
        "max_evaluations": 10,
        "max_float_fraction": 0.25,
    }
    assert budget["float"] == 1.0
    assert budget["before"] < 0.98 <= budget["after"]  # fully int8 over budget, the exported model within
    assert budget["within_budget"] is True and budget["stopped"] == "within budget"
    assert [layer["name"] for layer in budget["float_layers"]] == ["net.fragile"]
    assert "sensitivity rank 1 of 4" in budget["float_layers"][0]["reason"]
    assert budget["evaluations"] == 3  # float, fully int8, net.fragile float
    assert manifest["keep_float"] == ["net.fragile"] and callback.keep_float == []  # the user's list is unchanged
    assert manifest["quantized_ops"] == {"aten.linear (int8 weight)": 3}
    assert budget["sensitivity"] == "sensitivity.csv"
    dirpath = tmp_path / "quantized"
    assert (dirpath / "sensitivity.csv").read_text().splitlines()[1].startswith("1,net.fragile,")
    assert (dirpath / "sensitivity.png").stat().st_size > 1000
    # the exported files were verified as usual; 'onnx' is ONNX Runtime's own QDQ with the fragile layer and
    # the Mul producing its input left float: it passed verification against the float model (quantizing that
    # input alone gave relative error 0.40), though on a quiet machine ORT may then lose to float on so small
    # a model and be deleted for speed (produced_formats allows that, and only that)
    assert produced_formats(manifest) == {"torch_export", "onnx"}
    assert any("'onnx' is ONNX Runtime quantize_static (QDQ)" in note for note in manifest["notes"])
    assert [layer["name"] for layer in manifest["accuracy_budget"]["float_layers"]] == ["net.fragile"]
    for artifact in manifest["artifacts"]:
        assert artifact["verification"]["relative_error"] <= artifact["verification"]["tolerance"]
    assert manifest["metrics"]["quantized"]["val/acc"] >= 0.98
    logged = (tmp_path / "csv" / "metrics.csv").read_text()
    assert "quantization/budget/after" in logged and "quantization/budget/evaluations" in logged


def test_unreachable_budget_still_exports_marked_over_budget(tmp_path):
    callback = DynamicQuantization(
        formats=["torch_export"], max_metric_drop=MetricBudget("val/acc", max_drop=0.01, max_float_fraction=0.0)
    )
    with pytest.warns(
        UserWarning, match=r"accuracy budget NOT met: val/acc went from 1 \(float\) to 0\.\d+ \(quantized\)"
    ) as record:
        manifest = fit_fragile(callback, tmp_path)
    message = str(next(w.message for w in record if "NOT met" in str(w.message)))
    assert "max_drop=0.01" in message and "max_float_fraction=0.0 of 4 quantizable layers allows 0" in message
    assert "within_budget: false" in message
    budget = manifest["accuracy_budget"]
    assert budget["within_budget"] is False and budget["float_layers"] == [] and budget["evaluations"] == 2
    assert budget["after"] == budget["before"] < 0.99 and budget["drop"] > 0.01
    assert manifest["status"] == "ok" and [a["format"] for a in manifest["artifacts"]] == ["torch_export"]
    assert (tmp_path / "quantized" / manifest["artifacts"][0]["path"]).is_file()


def test_qat_fallback_bypasses_fake_quant_of_the_fragile_layer(tmp_path):
    callback = QuantizationAwareTraining(formats=["torch_export"], max_metric_drop=BUDGET)
    manifest = fit_fragile(callback, tmp_path)
    budget = manifest["accuracy_budget"]
    assert budget["before"] < 0.98 <= budget["after"] and budget["within_budget"] is True
    assert [layer["name"] for layer in budget["float_layers"]] == ["net.fragile"]
    assert budget["evaluations"] == 3
    assert manifest["quantized_ops"] == {"aten.linear (int8 weight)": 3}
    assert (
        manifest["artifacts"][0]["verification"]["relative_error"]
        <= manifest["artifacts"][0]["verification"]["tolerance"]
    )


def test_digits_fallback_costs_at_most_10_validation_passes(tmp_path):
    torch.manual_seed(0)
    # max_drop 0 on the loss: any int8 error counts, so the search runs through the layers
    budget = {"metric": "val/loss", "max_drop": 0.0, "higher_is_better": False, "max_float_fraction": 1.0}
    callback = PostTrainingQuantization(
        num_calibration_batches=4, observer="minmax", formats=["torch_export"], max_metric_drop=budget
    )
    trainer = fast_trainer(
        tmp_path, [callback], **{**FAST, "max_epochs": 2, "limit_train_batches": 10, "limit_val_batches": 3}
    )
    trainer.fit(DigitsClassifier(ConvNet(channels=8)), DigitsDataModule(batch_size=32))
    report = callback.manifest["accuracy_budget"]
    assert 2 <= report["evaluations"] <= 10
    assert report["evaluations"] == 1 + len(report["steps"])  # float + one per int8 model evaluated
    assert len(report["float_layers"]) <= 3  # ConvNet(blocks=4): 3 convs + head are candidates, one stays int8


def test_unknown_metric_fails_at_the_first_validation_naming_the_logged_ones(tmp_path):
    callback = DynamicQuantization(
        formats=["torch_export"], max_metric_drop={"metric": "val/accuracy", "max_drop": 0.01}
    )
    model = FragileClassifier()
    trainer = fast_trainer(tmp_path, [callback], **{**FAST, "num_sanity_val_steps": 1})
    with pytest.raises(ValueError, match=r"watches 'val/accuracy'.* It logs: \['val/acc', 'val/loss'\]"):
        trainer.fit(model, *fragile_loaders(model))
    assert trainer.global_step == 0  # the sanity check caught it before any training step


def test_budget_without_validation_data_fails_before_training(tmp_path):
    callback = DynamicQuantization(formats=["torch_export"], max_metric_drop=BUDGET)
    model = FragileClassifier()
    trainer = fast_trainer(tmp_path, [callback], **FAST)
    with pytest.raises(ValueError, match=r"measures 'val/acc' on the validation dataloader, and this fit has none"):
        trainer.fit(model, fragile_loaders(model)[0])


@pytest.mark.parametrize(
    "value, error",
    [
        ({"metric": "val/acc", "max_drop": -1}, r"max_drop must be a finite number >= 0"),
        ({"metric": "val/acc", "max_drop": "1%"}, r"max_drop must be a finite number >= 0"),
        ({"metric": "val/acc", "max_drop": 2, "relative": True}, r"relative=True .* must be <= 1"),
        ({"max_drop": 0.1}, r"needs \['metric'\]"),
        (0.01, r"must be None, a MetricBudget or a mapping"),
    ],
)
def test_bad_max_metric_drop_fails_at_construction(value, error):
    with pytest.raises((ValueError, TypeError), match=error):
        PostTrainingQuantization(max_metric_drop=value)


def test_hydra_config_sets_the_budget_and_rejects_unknown_keys():
    from conftest import compose_train
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    cfg = compose_train(["callbacks=[dynamic]", "callbacks.dynamic.max_metric_drop={metric: val/acc, max_drop: 0.01}"])
    assert instantiate(cfg.callbacks.dynamic).budget == MetricBudget("val/acc", 0.01)
    assert instantiate(compose_train(["callbacks=[qat]"]).callbacks.qat).budget is None
    cfg = compose_train(["callbacks=[ptq]", "callbacks.ptq.max_metric_drop={metric: val/acc, max_dorp: 0.01}"])
    with pytest.raises(InstantiationException, match=r"unknown key\(s\) \['max_dorp'\]"):
        instantiate(cfg.callbacks.ptq)
