"""Schemas read from signatures, the lightning_quant/callbacks group, and every config file in conf/ composing.

An unknown key, a wrong type and an unknown group option each fail at composition with Hydra's message.
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import typing
from pathlib import Path
from typing import Any, Literal, Optional, Union

import pytest
import torch
from conftest import CONF_DIR, compose_train
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException, MissingConfigException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

from lightning_quant.configs import config_from_signature, snake_case
from lightning_quant.configs.callbacks import CALLBACKS, GROUP


def compose_with_hydra(overrides: list[str]) -> DictConfig:
    """conf/train.yaml with its `hydra` node, so hydra/... options are composed too."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=True)


def schema_names() -> list[str]:
    return sorted(name.removesuffix(".yaml") for name in ConfigStore.instance().repo["lightning_quant"]["callbacks"])


def schema_of(name: str) -> type:
    return OmegaConf.get_type(ConfigStore.instance().load(f"{GROUP}/{name}.yaml").node)


def typed_field(schema: type) -> str | None:
    """A field OmegaConf checks as a number or a bool (a wrong value there must fail), if any."""
    for f in dataclasses.fields(schema):
        inner = typing.get_args(f.type)[0] if typing.get_origin(f.type) is Union else f.type
        if inner in (int, float, bool):
            return f.name
    return None


# ---------------------------------------------------------------------------------------------- the builder
class Mode(enum.Enum):
    FAST = "fast"
    SMALL = "small"


class Example:
    """Every kind of parameter the builder maps."""

    def __init__(
        self,
        required: int,
        ratio: float = 0.5,
        name: str = "x",
        flag: bool = True,
        mode: Mode = Mode.FAST,
        sizes: tuple[int, ...] = (1, 2),
        table: dict[str, float] | None = None,
        kind: Literal["a", "b"] = "a",
        path: Union[str, Path, None] = None,
        either: Union[int, str] = 3,
        function: Optional[typing.Callable[[int], int]] = None,
        sloppy: int = None,  # type: ignore[assignment]
        obj: object = object(),
        *args: Any,
        **kwargs: Any,
    ) -> None:
        self.__dict__.update({k: v for k, v in locals().items() if k != "self"})


def test_signature_maps_types_and_keeps_defaults():
    schema = config_from_signature(Example)
    fields = {f.name: f for f in dataclasses.fields(schema)}
    types = {name: f.type for name, f in fields.items()}
    assert types == {
        "_target_": str,
        "required": int,
        "ratio": float,
        "name": str,
        "flag": bool,
        "mode": Mode,
        "sizes": list[int],
        "table": Optional[dict[str, float]],
        "kind": str,  # a Literal of strings is a string (the class checks the value)
        "path": Optional[str],  # a path given as text
        "either": Any,  # OmegaConf 2.3 has no Union of several types
        "function": Any,
        "sloppy": Optional[int],  # `x: int = None` means Optional[int]
    }
    assert "obj" not in fields  # an object default cannot live in a config: the class's default applies
    cfg = OmegaConf.structured(schema)
    assert cfg._target_ == f"{__name__}.Example"
    assert OmegaConf.is_missing(cfg, "required")
    assert (cfg.ratio, cfg.sizes, cfg.mode, cfg.table) == (0.5, [1, 2], Mode.FAST, None)
    cfg.required = 4
    built = instantiate(cfg)
    assert isinstance(built, Example) and built.required == 4 and built.sizes == [1, 2]


def test_signature_validates_values():
    cfg = OmegaConf.structured(config_from_signature(Example))
    with pytest.raises(ValidationError, match="ratio"):
        cfg.ratio = "half"
    with pytest.raises(ValidationError, match="sizes"):
        cfg.sizes = ["big"]
    with pytest.raises(ConfigKeyError, match="ratoi"):
        cfg["ratoi"] = 0.1


def test_signature_defaults_and_exclude():
    schema = config_from_signature(Example, name="Custom", defaults={"ratio": 0.9}, exclude=("flag",))
    cfg = OmegaConf.structured(schema)
    assert schema.__name__ == "Custom" and cfg.ratio == 0.9 and "flag" not in cfg
    with pytest.raises(ValueError, match="ratoi.*it takes"):
        config_from_signature(Example, defaults={"ratoi": 0.9})
    with pytest.raises(ValueError, match="flga.*it takes"):
        config_from_signature(Example, exclude=("flga",))


class Base:
    def __init__(self, size: int, ratio: float = 0.5, name: str = "base") -> None:
        self.size, self.ratio, self.name = size, ratio, name


class Middle(Base):
    def __init__(self, depth: int = 2, name: str = "middle", **kwargs: Any) -> None:
        super().__init__(name=name, **kwargs)
        self.depth = depth


class Inherits(Middle):
    """No ``__init__`` of its own: Middle's applies."""


class Top(Inherits):
    def __init__(self, flag: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.flag = flag


class Closed(Base):
    def __init__(self, depth: int = 2) -> None:  # no **kwargs: Base's parameters are not Closed's
        super().__init__(size=depth)


def test_signature_follows_kwargs_up_the_mro():
    schema = config_from_signature(Top)
    fields = {f.name: f for f in dataclasses.fields(schema)}
    # the subclass's own parameters first; `name` is Middle's (its default wins over Base's)
    assert {name: f.type for name, f in fields.items()} == {
        "_target_": str,
        "flag": bool,
        "depth": int,
        "name": str,
        "size": int,
        "ratio": float,
    }
    cfg = OmegaConf.structured(schema)
    assert (cfg.flag, cfg.depth, cfg.name, cfg.ratio) == (False, 2, "middle", 0.5)
    assert OmegaConf.is_missing(cfg, "size")
    with pytest.raises(ValidationError, match="ratio"):
        cfg.ratio = "half"  # a base's hint is checked as well
    with pytest.raises(ConfigKeyError, match="sise"):
        cfg["sise"] = 3
    cfg.size, cfg.ratio = 3, 0.25
    built = instantiate(cfg)
    assert (built.flag, built.depth, built.name, built.size, built.ratio) == (False, 2, "middle", 3, 0.25)
    assert OmegaConf.structured(config_from_signature(Top, defaults={"ratio": 0.9})).ratio == 0.9
    assert [f.name for f in dataclasses.fields(config_from_signature(Inherits))] == [
        "_target_",
        "depth",
        "name",
        "size",
        "ratio",
    ]
    assert [f.name for f in dataclasses.fields(config_from_signature(Closed))] == ["_target_", "depth"]


def test_signature_by_dotted_path_keeps_the_path_as_target():
    cfg = OmegaConf.structured(config_from_signature("lightning.pytorch.callbacks.EarlyStopping"))
    assert cfg._target_ == "lightning.pytorch.callbacks.EarlyStopping"
    assert OmegaConf.is_missing(cfg, "monitor") and cfg.patience == 3


def test_snake_case():
    assert snake_case("PostTrainingQuantization") == "post_training_quantization"
    assert snake_case("ONNXExport") == "onnx_export"
    assert snake_case("ChannelsLast") == "channels_last"


# --------------------------------------------------------------------- lightning_quant/callbacks schemas
def test_every_existing_callback_has_a_schema():
    expected = {snake_case(path.rsplit(".", 1)[1]) for path in CALLBACKS if inspect.isclass(_locate_or_none(path))}
    assert {"model_checkpoint", "early_stopping"} <= expected
    assert expected == set(schema_names())


def _locate_or_none(path: str) -> Any:
    import importlib.util

    from hydra.utils import get_object

    module = path.rsplit(".", 1)[0]
    return get_object(path) if importlib.util.find_spec(module) is not None else None


@pytest.mark.parametrize("name", schema_names())
def test_schema_matches_the_signature(name):
    schema = schema_of(name)
    target = OmegaConf.structured(schema)._target_
    assert {f.name for f in dataclasses.fields(schema)} - {"_target_"} <= accepted_keywords(_locate_or_none(target))


def accepted_keywords(cls: type) -> set[str]:
    """The keywords ``cls(...)`` accepts: its ``__init__``'s, and while one takes ``**kwargs``, its base's."""
    accepted: set[str] = set()
    for base in cls.__mro__:
        if base is object or "__init__" not in base.__dict__:
            continue
        parameters = inspect.signature(base.__dict__["__init__"]).parameters.values()
        accepted |= {
            p.name for p in parameters if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        }
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            break
    return accepted


@pytest.mark.parametrize(
    "name", [n for n in schema_names() if OmegaConf.structured(schema_of(n))._target_.startswith("lightning_quant.")]
)
def test_schema_of_a_lightning_quant_callback_covers_every_keyword(name):
    """A keyword the callback takes (its own or its base's, through **kwargs) can be set from a config."""
    schema = schema_of(name)
    target = _locate_or_none(OmegaConf.structured(schema)._target_)
    assert accepted_keywords(target) <= {f.name for f in dataclasses.fields(schema)}


@pytest.mark.parametrize("name", schema_names())
def test_schema_rejects_unknown_key_and_wrong_type_at_composition(name):
    group = f"+lightning_quant/callbacks@callbacks.checked={name}"
    cfg = compose_train([group])
    assert cfg.callbacks.checked._target_ == OmegaConf.structured(schema_of(name))._target_
    with pytest.raises(ConfigCompositionException) as err:
        compose_train([group, "callbacks.checked.no_such_argument=1"])
    assert isinstance(err.value.__cause__, (ConfigKeyError, ConfigAttributeError))
    assert "callbacks.checked.no_such_argument" in str(err.value.__cause__)
    field = typed_field(schema_of(name))
    if field is not None:
        with pytest.raises(ConfigCompositionException) as err:
            compose_train([group, f"callbacks.checked.{field}=not_a_number"])
        assert isinstance(err.value.__cause__, ValidationError)
        assert field in str(err.value.__cause__)


# ------------------------------------------------------------------------------ conf/callbacks/*.yaml
def callback_options() -> list[tuple[str, str]]:
    """(option file, callback key) for every callback a conf/callbacks file defines."""
    found = []
    for path in sorted((CONF_DIR / "callbacks").glob("*.yaml")):
        for key in compose_train([f"callbacks={path.stem}"]).callbacks:
            found.append((path.stem, key))
    return found


@pytest.mark.parametrize(("option", "key"), callback_options())
def test_callback_option_is_validated_by_its_schema(option, key):
    cfg = compose_train([f"callbacks={option}"])
    schema = OmegaConf.get_type(cfg.callbacks[key])
    assert dataclasses.is_dataclass(schema), (
        f"conf/callbacks/{option}.yaml: callbacks.{key} has no schema; add to its defaults list "
        f"`- /lightning_quant/callbacks@{key}: <snake_case class name>` before `- _self_`"
    )
    with pytest.raises(ConfigCompositionException) as err:
        compose_train([f"callbacks={option}", f"callbacks.{key}.no_such_argument=1"])
    assert "no_such_argument" in str(err.value.__cause__)
    field = typed_field(schema)
    if field is not None:
        with pytest.raises(ConfigCompositionException) as err:
            compose_train([f"callbacks={option}", f"callbacks.{key}.{field}=not_a_number"])
        assert isinstance(err.value.__cause__, ValidationError)
        assert f"callbacks.{key}.{field}" in str(err.value.__cause__)


def test_callback_options_combine():
    # `default` selects `ptq` itself: combining the two would list ptq twice, which Hydra refuses.
    options = [option for option, _ in callback_options() if option != "default"]
    cfg = compose_train([f"callbacks=[{','.join(sorted(set(options)))}]"])
    assert set(cfg.callbacks) == {key for _, key in callback_options()}


def test_unknown_callbacks_option_lists_the_options():
    with pytest.raises(MissingConfigException) as err:
        compose_train(["callbacks=no_such_option"])
    assert "no_such_option" in str(err.value) and "none" in str(err.value)


# ------------------------------------------------------------------------------------ every conf/ file
def every_option() -> list[str]:
    """`group=option` for every file in conf/ but the primary config (hydra/... included)."""
    return [
        f"{path.parent.relative_to(CONF_DIR).as_posix()}={path.stem}"
        for path in sorted(CONF_DIR.rglob("*.yaml"))
        if path.parent != CONF_DIR
    ]


@pytest.mark.parametrize("override", every_option())
def test_every_config_file_composes(override):
    cfg = compose_with_hydra([override])
    group, option = override.split("=")
    assert cfg.hydra.runtime.choices[group] == option
    assert cfg.trainer._target_ == "lightning.pytorch.Trainer"


def test_launcher_options():
    parallel = compose_with_hydra(["hydra/launcher=parallel"]).hydra.launcher
    assert parallel._target_.endswith("JoblibLauncher") and parallel.n_jobs == 2
    slurm = compose_with_hydra(["hydra/launcher=slurm", "hydra.launcher.gres=gpu:1"]).hydra.launcher
    assert slurm._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (slurm.partition, slurm.cpus_per_task, slurm.gres, slurm.account) == (None, 4, "gpu:1", None)
    # the plugin's schema: every key of its SlurmQueueConf, typed
    with pytest.raises(ConfigCompositionException, match="partiton"):
        compose_with_hydra(["hydra/launcher=slurm", "hydra.launcher.partiton=cpu"])
    with pytest.raises(ConfigCompositionException, match="cpus_per_task"):
        compose_with_hydra(["hydra/launcher=slurm", "hydra.launcher.cpus_per_task=many"])
    local = compose_with_hydra(["hydra/launcher=submitit_local"]).hydra.launcher
    assert local._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher"


def test_sweep_comparison_is_configured_and_validated():
    cfg = compose_with_hydra([])
    assert cfg.hydra.callbacks.comparison._target_ == "lightning_quant.sweep.SweepComparison"
    user_cfg = compose_with_hydra(["+lightning_quant/sweep@hydra.callbacks.other=comparison"])
    assert user_cfg.hydra.callbacks.other.metric == "val/acc"
    with pytest.raises(ConfigCompositionException, match="stme"):
        compose_with_hydra(["+lightning_quant/sweep@hydra.callbacks.other=comparison", "hydra.callbacks.other.stme=x"])


def test_trainer_schema_follows_lightning():
    cfg = compose_train(["trainer.reload_dataloaders_every_n_epochs=2", "trainer.detect_anomaly=true"])
    assert cfg.trainer.reload_dataloaders_every_n_epochs == 2  # any Trainer argument, without a hand-written field
    assert "callbacks" not in cfg.trainer and "logger" not in cfg.trainer  # the app passes those
    with pytest.raises(ConfigCompositionException) as err:
        compose_train(["trainer.detect_anomaly=sometimes"])
    assert "detect_anomaly" in str(err.value.__cause__)


def test_missing_required_argument_fails_at_instantiation_naming_it():
    cfg = compose_train(["+lightning_quant/callbacks@callbacks.stop=early_stopping"])
    assert OmegaConf.is_missing(cfg.callbacks.stop, "monitor")
    with pytest.raises(Exception, match="monitor"):
        instantiate(cfg.callbacks.stop)


def test_app_schemas_stay_out_of_the_groups_a_user_app_names_itself():
    """A user's Hydra app that imports lightning_quant.configs must not see our schemas among its own
    model/data/trainer options (its --help would list them); ours live under lightning_quant/app."""
    from hydra.core.config_store import ConfigStore

    import lightning_quant.configs  # noqa: F401  (registers everything)

    repo = ConfigStore.instance().repo
    leaked = [f"{group}/{name}" for group in ("model", "data", "trainer") for name in repo.get(group, {})]
    assert leaked == [] and "train_schema.yaml" not in repo
    assert set(repo["lightning_quant"]["app"]["model"]) == {
        "convnet.yaml",
        "mlp.yaml",
        "lstm.yaml",
        "resnet.yaml",
        "transformer.yaml",
        "byte_lm.yaml",
    }


# The README's recipe for an app whose users switch approach from the command line: one file per approach in a
# group of the app's own, each choosing lightning-quant's schema and setting only that approach's keys.
SWITCHABLE_APP = {
    "config.yaml": "defaults:\n  - quant: ptq\n  - _self_\n",
    "quant/ptq.yaml": (
        "# @package _global_\ndefaults:\n  - /lightning_quant/callbacks@callbacks.quant: post_training_quantization\n"
        "  - _self_\ncallbacks:\n  quant:\n    num_calibration_batches: 16\n    target: avx2\n"
    ),
    "quant/dynamic.yaml": (
        "# @package _global_\ndefaults:\n  - /lightning_quant/callbacks@callbacks.quant: dynamic_quantization\n"
        "  - _self_\ncallbacks:\n  quant:\n    recurrent: false\n"
    ),
}


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ([], "PostTrainingQuantization"),
        (["quant=dynamic"], "DynamicQuantization"),
        (["quant=dynamic", "callbacks.quant.target=native"], "DynamicQuantization"),
    ],
)
def test_an_app_switches_approach_from_the_command_line(tmp_path, overrides, expected):
    for name, text in SWITCHABLE_APP.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(tmp_path), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    callback = instantiate(cfg.callbacks.quant)
    assert type(callback).__name__ == expected
    assert callback.target == ("native" if "callbacks.quant.target=native" in overrides else "avx2")


def test_model_resnet_instantiates_torchvisions_block_structure():
    from lightning_quant.demo import ResNet

    model = instantiate(compose_with_hydra(["model=resnet"]).model)
    assert isinstance(model.net, ResNet) and model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
