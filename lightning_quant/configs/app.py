"""Schemas of the demo app: data, model, trainer, checkpoint, logger and the top-level run."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from lightning_quant.configs.signature import config_from_signature


@dataclass
class PathsConfig:
    output_dir: str = "${hydra:runtime.output_dir}"


@dataclass
class DigitsDataConfig:
    _target_: str = "lightning_quant.demo.DigitsDataModule"
    batch_size: int = 64
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    seed: int = 0
    num_workers: int = 0


@dataclass
class StdlibTextDataConfig:
    _target_: str = "lightning_quant.demo.StdlibTextDataModule"
    block_size: int = 128
    batch_size: int = 16
    max_bytes: Optional[int] = None


@dataclass
class ConvNetConfig:
    _target_: str = "lightning_quant.demo.ConvNet"
    in_channels: int = 1
    channels: int = 32
    blocks: int = 4
    num_classes: int = 10


@dataclass
class MLPNetConfig:
    _target_: str = "lightning_quant.demo.MLPNet"
    in_features: int = 64
    hidden: int = 256
    layers: int = 2
    num_classes: int = 10


@dataclass
class LSTMNetConfig:
    _target_: str = "lightning_quant.demo.LSTMNet"
    input_size: int = 8
    hidden_size: int = 64
    num_layers: int = 1
    num_classes: int = 10


@dataclass
class TransformerNetConfig:
    _target_: str = "lightning_quant.demo.TransformerNet"
    input_size: int = 8
    seq_len: int = 8
    d_model: int = 64
    nhead: int = 4
    num_layers: int = 2
    dim_feedforward: int = 128
    dropout: float = 0.1
    num_classes: int = 10


@dataclass
class ResNetConfig:
    _target_: str = "lightning_quant.demo.ResNet"
    in_channels: int = 1
    widths: list[int] = field(default_factory=lambda: [16, 32])
    blocks: int = 2
    num_classes: int = 10


@dataclass
class ClassifierConfig:
    _target_: str = "lightning_quant.demo.DigitsClassifier"
    net: Any = MISSING
    lr: float = 3e-3
    weight_decay: float = 1e-4
    num_classes: int = 10


@dataclass
class ConvNetClassifierConfig(ClassifierConfig):
    net: ConvNetConfig = field(default_factory=ConvNetConfig)


@dataclass
class ResNetClassifierConfig(ClassifierConfig):
    net: ResNetConfig = field(default_factory=ResNetConfig)


@dataclass
class MLPClassifierConfig(ClassifierConfig):
    net: MLPNetConfig = field(default_factory=MLPNetConfig)


@dataclass
class LSTMClassifierConfig(ClassifierConfig):
    net: LSTMNetConfig = field(default_factory=LSTMNetConfig)


@dataclass
class TransformerClassifierConfig(ClassifierConfig):
    net: TransformerNetConfig = field(default_factory=TransformerNetConfig)


@dataclass
class ByteLanguageModelConfig:
    _target_: str = "lightning_quant.demo.ByteLanguageModel"
    width: int = 256
    layers: int = 4
    heads: int = 4
    block_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.01


# The Trainer and the float checkpoint take every argument of their class (read from its signature, so
# the schema follows Lightning), with the app's defaults. `callbacks` and `logger` are the app's to pass.
TrainerConfig = config_from_signature(
    "lightning.pytorch.Trainer",
    name="TrainerConfig",
    module=__name__,
    exclude=("callbacks", "logger"),
    defaults={
        "default_root_dir": "${paths.output_dir}",
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": 20,
        "log_every_n_steps": 10,
    },
)

# The float checkpoint every run keeps, written before any quantization is tried.
CheckpointConfig = config_from_signature(
    "lightning.pytorch.callbacks.ModelCheckpoint",
    name="CheckpointConfig",
    module=__name__,
    defaults={
        "dirpath": "${paths.output_dir}/checkpoints",
        "filename": "epoch_{epoch:03d}",
        "monitor": "val/acc",
        "mode": "max",
        "save_last": True,
        "auto_insert_metric_name": False,
    },
)


@dataclass
class CSVLoggerConfig:
    _target_: str = "lightning.pytorch.loggers.CSVLogger"
    save_dir: str = "${paths.output_dir}"
    name: str = "csv"
    version: str = ""


@dataclass
class TrainConfig:
    """The whole run: what ``python train.py`` composes."""

    data: Any = MISSING
    model: Any = MISSING
    trainer: Any = MISSING
    callbacks: dict[str, Any] = field(default_factory=dict)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)  # type: ignore[valid-type]  # made at import
    logger: CSVLoggerConfig = field(default_factory=CSVLoggerConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    task_name: str = "train"
    seed: int = 0
    train: bool = True
    test: bool = True
    ckpt_path: Optional[str] = None
    # The metric `train` returns, so Hydra sweepers (Optuna) can optimise it.
    optimized_metric: Optional[str] = "test/acc"
    # Optional bound on the int8 latency (ms per batch, as the quantization callback measures it): over it,
    # the returned objective drops by the relative excess (see lightning_quant.app.objective).
    latency_budget_ms: Optional[float] = None


def register_app_configs() -> None:
    """Store the app's schemas in Hydra's ConfigStore (safe to call more than once).

    They live under ``lightning_quant/app/`` rather than in the ``model``/``data``/``trainer`` groups
    themselves: a user's own Hydra app that imports :mod:`lightning_quant.configs` would otherwise list
    our schemas among its own options (``model=convnet_schema`` in its ``--help``). A YAML option extends
    one with ``- /lightning_quant/app/model/convnet@_here_`` in its defaults list.
    """
    cs = ConfigStore.instance()
    for group, name, node in (
        ("lightning_quant/app", "train", TrainConfig),
        ("lightning_quant/app/data", "digits", DigitsDataConfig),
        ("lightning_quant/app/data", "stdlib_text", StdlibTextDataConfig),
        ("lightning_quant/app/model", "convnet", ConvNetClassifierConfig),
        ("lightning_quant/app/model", "resnet", ResNetClassifierConfig),
        ("lightning_quant/app/model", "mlp", MLPClassifierConfig),
        ("lightning_quant/app/model", "lstm", LSTMClassifierConfig),
        ("lightning_quant/app/model", "transformer", TransformerClassifierConfig),
        ("lightning_quant/app/model", "byte_lm", ByteLanguageModelConfig),
        ("lightning_quant/app/trainer", "default", TrainerConfig),
    ):
        cs.store(group=group, name=name, node=node, provider="lightning-quant")
