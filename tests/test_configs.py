"""Every config in conf/ composes, and bad overrides fail at composition with Hydra's message."""

from __future__ import annotations

import pytest
from conftest import CONF_DIR, compose_train
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

GROUPS = ["data", "model", "trainer", "callbacks", "experiment", "hparams_search"]


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize("override", [f"{group}={option}" for group in GROUPS for option in group_options(group)])
def test_every_config_composes(override):
    cfg = compose_train([override])
    language = override in ("experiment=byte_lm", "model=byte_lm", "data=stdlib_text")
    model, data = (
        ("ByteLanguageModel", "StdlibTextDataModule") if language else ("DigitsClassifier", "DigitsDataModule")
    )
    assert cfg.model._target_ == f"lightning_quant.demo.{model}" or override == "data=stdlib_text"
    assert cfg.data._target_ == f"lightning_quant.demo.{data}" or override == "model=byte_lm"
    assert cfg.trainer._target_ == "lightning.pytorch.Trainer"
    for name, callback in cfg.callbacks.items():
        assert "_target_" in callback, f"callbacks.{name} names no class"


def test_an_experiment_sets_its_own_task_name_and_metric():
    cfg = compose_train(["experiment=byte_lm", "callbacks=int4_qat"])
    assert (cfg.task_name, cfg.optimized_metric) == ("byte_lm", "test/perplexity")  # not train.yaml's defaults
    assert cfg.model.block_size == cfg.data.block_size == 128
    assert cfg.callbacks.int4_qat._target_ == "lightning_quant.WeightOnlyQAT" and cfg.callbacks.int4_qat.bits == 4


def test_default_config_values():
    cfg = compose_train()
    assert cfg.model.net._target_ == "lightning_quant.demo.ConvNet"
    assert cfg.trainer.accelerator == "cpu"
    assert cfg.optimized_metric == "test/acc"
    assert list(cfg.callbacks) == ["ptq"]  # the default run exports verified int8 files


def test_unknown_key_is_rejected_with_its_name():
    with pytest.raises(ConfigCompositionException) as err:
        compose_train(["trainer.max_epoch=3"])
    assert "max_epoch" in str(err.value.__cause__ or err.value)


def test_wrong_type_is_rejected_with_its_name():
    with pytest.raises(ConfigCompositionException) as err:
        compose_train(["trainer.max_epochs=many"])
    cause = err.value.__cause__
    assert isinstance(cause, ValidationError)
    assert "max_epochs" in str(cause)


def test_unknown_group_option_is_rejected():
    with pytest.raises(ConfigCompositionException) as err:
        compose_train(["model=resnet152"])
    assert "resnet152" in str(err.value)
    assert "convnet" in str(err.value)  # Hydra lists the available options


def test_schema_rejects_wrong_type_in_nested_net():
    with pytest.raises(ConfigCompositionException) as err:
        compose_train(["model.net.channels=wide"])
    assert isinstance(err.value.__cause__, (ValidationError, ConfigKeyError))
    assert "channels" in str(err.value.__cause__)
