"""Schemas of the demo app: data, model, trainer, checkpoint, logger and the top-level run."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


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
class MLPClassifierConfig(ClassifierConfig):
    net: MLPNetConfig = field(default_factory=MLPNetConfig)


@dataclass
class LSTMClassifierConfig(ClassifierConfig):
    net: LSTMNetConfig = field(default_factory=LSTMNetConfig)


@dataclass
class TransformerClassifierConfig(ClassifierConfig):
    net: TransformerNetConfig = field(default_factory=TransformerNetConfig)


@dataclass
class TrainerConfig:
    """The ``lightning.Trainer`` arguments the app exposes; add a field here to expose another."""

    _target_: str = "lightning.pytorch.Trainer"
    default_root_dir: str = "${paths.output_dir}"
    accelerator: str = "cpu"
    devices: Any = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: Optional[str] = None
    max_epochs: Optional[int] = 20
    min_epochs: Optional[int] = None
    max_steps: int = -1
    max_time: Optional[str] = None
    fast_dev_run: Any = False
    limit_train_batches: Optional[float] = None
    limit_val_batches: Optional[float] = None
    limit_test_batches: Optional[float] = None
    limit_predict_batches: Optional[float] = None
    val_check_interval: Optional[float] = None
    check_val_every_n_epoch: Optional[int] = 1
    num_sanity_val_steps: Optional[int] = None
    log_every_n_steps: Optional[int] = 10
    accumulate_grad_batches: int = 1
    gradient_clip_val: Optional[float] = None
    deterministic: Any = None
    benchmark: Optional[bool] = None
    sync_batchnorm: bool = False
    enable_checkpointing: Optional[bool] = None
    enable_progress_bar: Optional[bool] = None
    enable_model_summary: Optional[bool] = None


@dataclass
class CheckpointConfig:
    """The float checkpoint every run keeps (``ModelCheckpoint``), written before any quantization."""

    _target_: str = "lightning.pytorch.callbacks.ModelCheckpoint"
    dirpath: str = "${paths.output_dir}/checkpoints"
    filename: str = "epoch_{epoch:03d}"
    monitor: Optional[str] = "val/acc"
    mode: str = "max"
    save_top_k: int = 1
    save_last: Optional[bool] = True
    auto_insert_metric_name: bool = False


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
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logger: CSVLoggerConfig = field(default_factory=CSVLoggerConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    task_name: str = "train"
    seed: int = 0
    train: bool = True
    test: bool = True
    ckpt_path: Optional[str] = None
    # The metric `train` returns, so Hydra sweepers (Optuna) can optimise it.
    optimized_metric: Optional[str] = "test/acc"


def register_configs() -> None:
    """Store every schema in Hydra's ConfigStore (safe to call more than once)."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(group="data", name="digits_schema", node=DigitsDataConfig)
    cs.store(group="model", name="convnet_schema", node=ConvNetClassifierConfig)
    cs.store(group="model", name="mlp_schema", node=MLPClassifierConfig)
    cs.store(group="model", name="lstm_schema", node=LSTMClassifierConfig)
    cs.store(group="model", name="transformer_schema", node=TransformerClassifierConfig)
    cs.store(group="trainer", name="trainer_schema", node=TrainerConfig)
