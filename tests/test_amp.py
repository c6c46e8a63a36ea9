"""AutoMixedPrecision: Lightning's own MixedPrecision plugin, installed from a callback, chosen by measurement."""

from __future__ import annotations

import logging

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_quant import AutoMixedPrecision
from lightning_quant.demo import ConvNet, DigitsClassifier, DigitsDataModule
from lightning_quant.precision import preferred_mixed_precision


class AutocastProbe(DigitsClassifier):
    """Records, per step kind, whether the step ran under CPU autocast and in which dtype."""

    def __init__(self) -> None:
        super().__init__(ConvNet(channels=8, blocks=2))
        self.autocast: dict[str, set] = {}

    def _record(self, kind: str) -> None:
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
        self.autocast.setdefault(kind, set()).add(dtype)

    def training_step(self, batch, batch_idx):
        self._record("train")
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch, batch_idx):
        self._record("val")
        return super().validation_step(batch, batch_idx)


def fit(tmp_path, callbacks=(), seed=0, ckpt_path=None, max_epochs=1, **trainer_kwargs):
    L.seed_everything(seed)
    model = AutocastProbe()
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        max_epochs=max_epochs,
        limit_train_batches=3,
        limit_val_batches=2,
        num_sanity_val_steps=0,
        callbacks=list(callbacks),
        logger=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        **trainer_kwargs,
    )
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=32), ckpt_path=ckpt_path)
    return trainer, model


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


@pytest.mark.parametrize(
    "kwargs, message",
    [(dict(dtype="fp8"), "'auto'"), (dict(dtype="bf16-mixed"), "'bf16'"), (dict(measure_steps=-1), ">= 0")],
)
def test_bad_arguments_are_refused_at_construction(kwargs, message):
    with pytest.raises(MisconfigurationException, match=message):
        AutoMixedPrecision(**kwargs)


def test_bf16_trains_exactly_like_lightnings_own_plugin(tmp_path):
    amp = AutoMixedPrecision(dtype="bf16")
    trainer, model = fit(tmp_path / "callback", [amp])
    lightning_trainer, lightning_model = fit(tmp_path / "trainer", precision="bf16-mixed")

    assert trainer.precision == lightning_trainer.precision == "bf16-mixed"
    assert type(trainer.precision_plugin) is MixedPrecision
    assert trainer.precision_plugin.scaler is None  # bf16 needs no gradient scaling
    # the same autocast region: training and validation steps in bf16 autocast, in both runs
    assert model.autocast == lightning_model.autocast == {"train": {torch.bfloat16}, "val": {torch.bfloat16}}
    assert_same_weights(model, lightning_model)
    assert amp.precision == "bf16-mixed" and amp.reason == "dtype='bf16' was requested"


def test_auto_keeps_the_faster_of_its_measurements_and_leaves_no_trace(tmp_path, caplog):
    amp = AutoMixedPrecision(dtype="auto", measure_steps=2)
    with caplog.at_level(logging.INFO):
        trainer, model = fit(tmp_path / "auto", [amp])
    candidate, _ = preferred_mixed_precision("cpu")

    assert trainer.precision == amp.precision
    if candidate is None:  # hardware without bf16: nothing worth measuring
        assert amp.precision == "32-true" and amp.step_seconds == {}
    else:
        state = amp.state_dict()
        assert set(state["step_seconds"]) == {"32-true", candidate}
        assert all(len(times) == 2 and min(times) > 0 for times in state["step_seconds"].values())
        fastest = {name: min(times) for name, times in state["step_seconds"].items()}
        assert state["precision"] == min(fastest, key=fastest.get)
        assert f"{fastest['32-true'] * 1e3:.2f} ms" in state["reason"]
        assert f"{fastest[candidate] * 1e3:.2f} ms" in state["reason"]
    assert f"training with precision={amp.precision!r}" in caplog.text

    # Measuring changed nothing: the run equals a plain run in the chosen precision (same batches,
    # same BatchNorm statistics, same random state, no optimizer step taken by the measurement).
    reference = {"precision": amp.precision} if amp.precision != "32-true" else {}
    _, reference_model = fit(tmp_path / "reference", **reference)
    assert_same_weights(model, reference_model)


def test_a_resumed_run_keeps_the_choice_without_measuring_again(tmp_path):
    first = AutoMixedPrecision(dtype="auto", measure_steps=1)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    fit(tmp_path, [first, checkpoint])

    resumed = AutoMixedPrecision(dtype="auto", measure_steps=1)
    trainer, _ = fit(tmp_path, [resumed], ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"), max_epochs=2)
    assert trainer.current_epoch == 2
    assert (resumed.precision, resumed.step_seconds) == (first.precision, first.step_seconds)
    assert resumed.reason.endswith("(restored from the checkpoint)")
    assert trainer.precision == first.precision


@pytest.mark.parametrize(
    "trainer_precision, dtype",
    [("bf16-mixed", "auto"), ("64-true", "bf16"), ("bf16-true", "auto")],
)
def test_a_conflicting_trainer_precision_is_refused_before_training(tmp_path, trainer_precision, dtype):
    with pytest.raises(MisconfigurationException, match=f"precision='{trainer_precision}'.*remove `precision=`"):
        fit(tmp_path, [AutoMixedPrecision(dtype=dtype)], precision=trainer_precision)


def test_the_same_precision_on_the_trainer_is_not_a_conflict(tmp_path):
    amp = AutoMixedPrecision(dtype="bf16")
    trainer, model = fit(tmp_path, [amp], precision="bf16-mixed")
    assert trainer.precision == amp.precision == "bf16-mixed"
    assert model.autocast["train"] == {torch.bfloat16}


def test_fp16_on_cpu_is_refused_before_training(tmp_path):
    with pytest.raises(MisconfigurationException, match="needs a CUDA device"):
        fit(tmp_path, [AutoMixedPrecision(dtype="fp16")])


class ManualOptimization(AutocastProbe):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False


def test_measuring_under_manual_optimization_is_refused(tmp_path):
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        max_epochs=1,
        callbacks=[AutoMixedPrecision()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    with pytest.raises(MisconfigurationException, match="measure_steps=0"):
        trainer.fit(ManualOptimization(), datamodule=DigitsDataModule())
    assert trainer.global_step == 0


def test_hydra_composes_amp_channels_last_and_qat(fast_cfg, tmp_path):
    from lightning_quant import ChannelsLast, QuantizationAwareTraining
    from lightning_quant.app import instantiate_callbacks, train

    cfg = fast_cfg(
        "callbacks=[amp,channels_last,qat]", "callbacks.amp.measure_steps=1", "callbacks.qat.quantize_on_fit_end=false"
    )
    callbacks = instantiate_callbacks(cfg.callbacks)
    assert [type(c) for c in callbacks] == [AutoMixedPrecision, ChannelsLast, QuantizationAwareTraining]
    assert 0.0 <= train(cfg) <= 1.0  # AMP chose, ChannelsLast converted, QAT fake-quantized: and it trained
