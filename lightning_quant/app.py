"""The Hydra app behind ``train.py``: build everything from the config, fit, test, return the metric."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


def instantiate_callbacks(callbacks_cfg: DictConfig | None) -> list[L.Callback]:
    """One callback per named entry; an entry set to null (``callbacks.ptq=null``) is skipped."""
    callbacks = []
    for name, cfg in (callbacks_cfg or {}).items():
        if cfg is None:
            continue
        if "_target_" not in cfg:
            raise ValueError(f"callbacks.{name} has no _target_: every callback entry names the class to build")
        callbacks.append(instantiate(cfg))
    return callbacks


def train(cfg: DictConfig) -> float | None:
    """Fit and test the configured model; return ``cfg.optimized_metric`` (for sweepers), if it was logged."""
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    callbacks = [instantiate(cfg.checkpoint), *instantiate_callbacks(cfg.callbacks)]
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=instantiate(cfg.logger))

    if cfg.train:
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    metrics: dict[str, Any] = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if cfg.test:
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        ckpt_path = best if best else (None if cfg.train else cfg.ckpt_path)
        for results in trainer.test(model, datamodule=datamodule, ckpt_path=ckpt_path):
            metrics.update({k: float(v) for k, v in results.items()})

    if trainer.is_global_zero:
        output_dir = Path(cfg.paths.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
        (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))

    if cfg.optimized_metric is None:
        return None
    if cfg.optimized_metric not in metrics:
        raise KeyError(
            f"optimized_metric '{cfg.optimized_metric}' was not logged; logged metrics: {sorted(metrics)}. "
            "Set optimized_metric to one of them, or to null."
        )
    return metrics[cfg.optimized_metric]
