"""The Hydra app behind ``train.py``: build everything from the config, fit, test, return the metric."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lightning_quant.manifest import manifest_numbers
from lightning_quant.quantization import QuantizationError

log = logging.getLogger(__name__)


def _drop_lightning_tips(record: logging.LogRecord) -> bool:
    return "Tip: For seamless" not in record.getMessage()


def log_through_root() -> None:
    """Send Lightning's messages (lightning-quant's fit-end table among them) and Python warnings through the root
    logger, whose handlers Hydra sets for each job: the console and the run folder's ``train.log``. Lightning,
    imported before Hydra set them, found the root logger without handlers, so it gave its loggers console
    handlers of their own and stopped them propagating: ``train.log`` stayed empty."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        for handler in [h for h in logger.handlers if type(h) is logging.StreamHandler]:
            logger.removeHandler(handler)  # the root's console handler prints them (once)
        logger.propagate = True
    logging.captureWarnings(True)  # warnings.warn (rank_zero_warn, the pipeline's) as "py.warnings" records


def instantiate_callbacks(callbacks_cfg: DictConfig | None) -> list[L.Callback]:
    """One callback per named entry; an entry set to null (``callbacks.ptq=null``) is skipped."""
    callbacks = []
    for name, cfg in (callbacks_cfg or {}).items():
        if cfg is None:
            continue
        if "_target_" not in cfg:
            raise ValueError(f"callbacks.{name!s} has no _target_: every callback entry names the class to build")
        callbacks.append(instantiate(cfg))
    return callbacks


def train(cfg: DictConfig) -> float | None:
    """Fit and test the configured model; write ``metrics.json`` (logged metrics, and the numbers of any
    quantization manifest); return the objective for sweepers (see :func:`objective`), or None."""
    # torch 2.13 deprecates pytree's LeafSpec, which Lightning and torch's own copying still use: a note about
    # their code on every run, never about the user's model or data
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
    # Lightning's adverts for its cloud services ("Tip: ... try installing litlogger"): this app's loggers are set
    # in conf/logger, and the tips say nothing about the user's model or data
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_drop_lightning_tips)
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    callbacks = [instantiate(cfg.checkpoint), *instantiate_callbacks(cfg.callbacks)]
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=instantiate(cfg.logger))

    failure: QuantizationError | None = None
    if cfg.train:
        try:
            trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
        except QuantizationError as err:  # training finished; test and record it, then fail the run
            failure = err
            log.error("Quantization failed after training (the float checkpoint is kept):\n%s", err)
    metrics: dict[str, Any] = {k: float(v) for k, v in trainer.callback_metrics.items()}
    for callback in trainer.callbacks:  # type: ignore[attr-defined]  # set by Lightning's callback connector
        metrics.update(manifest_numbers(getattr(callback, "manifest", None)))
    if cfg.test:
        best = getattr(trainer.checkpoint_callback, "best_model_path", "")
        ckpt_path = best if best else (None if cfg.train else cfg.ckpt_path)
        for results in trainer.test(model, datamodule=datamodule, ckpt_path=ckpt_path):
            metrics.update({k: float(v) for k, v in results.items()})

    if trainer.is_global_zero:
        output_dir = Path(cfg.paths.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
        (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    if failure is not None:
        raise failure

    if cfg.optimized_metric is None:
        return None
    return objective(metrics, cfg.optimized_metric, cfg.latency_budget_ms)


def objective(metrics: dict[str, float], optimized_metric: str, latency_budget_ms: float | None = None) -> float:
    """What ``train`` returns to a sweeper: ``metrics[optimized_metric]``, minus the relative excess of the
    int8 latency over ``latency_budget_ms`` when one is set (0.95 at 1.2x the budget scores 0.75).

    Raises:
        KeyError: the metric was not logged, or a latency budget is set but no quantization callback
            measured an int8 latency.
    """
    if optimized_metric not in metrics:
        raise KeyError(
            f"optimized_metric '{optimized_metric}' was not logged; logged metrics: {sorted(metrics)}. "
            "Set optimized_metric to one of them, or to null."
        )
    value = metrics[optimized_metric]
    if latency_budget_ms is None:
        return value
    latency = metrics.get("quantization/quantized/latency_ms")
    if latency is None:
        raise KeyError(
            f"latency_budget_ms={latency_budget_ms} bounds the int8 latency (quantization/quantized/latency_ms), "
            "but no quantization callback measured one: add one (callbacks=ptq) or set latency_budget_ms=null."
        )
    return value - max(0.0, latency / latency_budget_ms - 1.0)
