"""Switch on automatic mixed precision from a callback, choosing the format by measurement."""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.utilities.combined_loader import CombinedLoader
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torchmetrics import Metric

from lightning_quant.callbacks._view import ModuleView, module_view
from lightning_quant.precision import BF16_MIXED, FLOAT32, FP16_MIXED, preferred_mixed_precision

_DTYPES: dict[str, Any] = {"auto": None, "bf16": BF16_MIXED, "fp16": FP16_MIXED}


class AutoMixedPrecision(Callback):
    r"""Trains in automatic mixed precision through Lightning's own ``MixedPrecision`` plugin.

    Precision is fixed when the ``Trainer`` is built; this callback installs Lightning's
    :class:`~lightning.pytorch.plugins.precision.MixedPrecision` plugin on the strategy at fit start, so the
    autocast region (``training_step``/``validation_step``/... inside ``torch.autocast``) and the fp16
    gradient scaler are exactly those of ``Trainer(precision="bf16-mixed")`` or ``"16-mixed"``, and
    ``trainer.precision`` reports the format in use.

    With ``dtype="auto"`` the hardware proposes a format (bf16 where the device computes it natively, fp16
    with gradient scaling on CUDA devices without fast bf16, else float32) and, unless ``measure_steps=0``,
    ``measure_steps`` forward/backward passes of ``training_step`` on a real training batch are timed for
    float32 and the proposal, interleaved, before training; the format with the fastest step is kept (other
    processes' load only adds time). The measuring leaves no trace: weights, BatchNorm statistics,
    torchmetrics states, gradients and the random state are as before, and what ``training_step`` logs
    is dropped. The choice, the reason and the timings are logged, stored in
    :attr:`precision`, :attr:`reason`, :attr:`step_seconds` and in checkpoints, so a resumed run keeps them.

    Args:
        dtype: ``"auto"``, ``"bf16"`` (bf16-mixed) or ``"fp16"`` (16-mixed with gradient scaling, CUDA only).
        measure_steps: with ``dtype="auto"``, timed steps per candidate (after one untimed warm-up step);
            ``0`` trusts the hardware rule without measuring.

    Raises:
        MisconfigurationException: at setup, if the ``Trainer`` was given a ``precision`` other than the
            default float32 that differs from ``dtype`` (or any with ``dtype="auto"``), if ``dtype="fp16"``
            runs on a CPU, or if measuring needs ``training_step`` to run under manual optimization.

    Example::

        >>> import lightning as L
        >>> from lightning_quant import AutoMixedPrecision
        >>> from lightning_quant.demo import ConvNet, DigitsClassifier, DigitsDataModule
        >>> amp = AutoMixedPrecision(dtype="auto")
        >>> trainer = L.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1, callbacks=[amp],
        ...                     logger=False, enable_checkpointing=False, enable_progress_bar=False)
        >>> trainer.fit(DigitsClassifier(ConvNet(channels=8)), datamodule=DigitsDataModule())  # doctest: +SKIP
        >>> trainer.precision == amp.precision  # doctest: +SKIP
        True
    """

    def __init__(self, dtype: str = "auto", measure_steps: int = 5) -> None:
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise MisconfigurationException(
                f"AutoMixedPrecision(dtype={dtype!r}) is not supported: use 'auto' (choose for this hardware), "
                "'bf16' (bf16-mixed) or 'fp16' (16-mixed with gradient scaling, CUDA only)."
            )
        if isinstance(measure_steps, bool) or not isinstance(measure_steps, int) or measure_steps < 0:
            raise MisconfigurationException(
                f"AutoMixedPrecision(measure_steps={measure_steps!r}) must be an integer >= 0 "
                "(0 chooses by hardware alone, without measuring)."
            )
        self.dtype = dtype
        self.measure_steps = measure_steps
        self.precision: str | None = None  # Lightning's name of the format in use, once chosen
        self.reason = ""
        self.step_seconds: dict[str, list[float]] = {}
        self._plugin: MixedPrecision | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        plugin = trainer.precision_plugin
        wanted = _DTYPES[self.dtype]
        given_by_user = plugin is not self._plugin and type(plugin) is not Precision
        if given_by_user and (wanted is None or plugin.precision != wanted):
            raise MisconfigurationException(
                f"AutoMixedPrecision(dtype={self.dtype!r}) conflicts with the Trainer's precision="
                f"{trainer.precision!r} ({type(plugin).__name__}): remove `precision=` from the Trainer and let "
                "the callback choose, or remove the callback."
            )
        if wanted == FP16_MIXED and trainer.strategy.root_device.type == "cpu":
            raise MisconfigurationException(
                "AutoMixedPrecision(dtype='fp16') needs a CUDA device (fp16 autocast with gradient scaling); "
                "on a CPU use dtype='bf16' or dtype='auto'."
            )
        if self._measures and not pl_module.automatic_optimization:
            raise MisconfigurationException(
                "AutoMixedPrecision(dtype='auto') times forward/backward passes of training_step, which under "
                "manual optimization would also step the optimizer: pass measure_steps=0, or dtype='bf16'/'fp16'."
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.precision is None:  # not restored from a checkpoint
            decision = self._choose(trainer, pl_module)
            # every process must train in the same format: rank 0's measurement decides
            self.precision, self.reason, self.step_seconds = trainer.strategy.broadcast(decision, src=0)
        if self.precision != trainer.precision:
            # Replacing the plugin after strategy.setup is equivalent to passing it to the Trainer:
            # MixedPrecision.convert_module and .connect are the base no-ops, and the fp16 scaler state is
            # restored from a checkpoint after on_fit_start.
            self._plugin = MixedPrecision(self.precision, device=trainer.strategy.root_device.type)  # type: ignore[arg-type]  # one of its two names
            trainer.strategy.precision_plugin = self._plugin
        rank_zero_info(f"AutoMixedPrecision: training with precision={self.precision!r} because {self.reason}.")

    def _choose(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[str, str, dict]:
        if self.dtype != "auto":
            return _DTYPES[self.dtype], f"dtype={self.dtype!r} was requested", {}
        candidate, why = preferred_mixed_precision(trainer.strategy.root_device)
        if candidate is None:
            return FLOAT32, why, {}
        if not self.measure_steps:
            return candidate, f"{why} (not measured: measure_steps=0)", {}
        plugins = {
            FLOAT32: trainer.precision_plugin,
            candidate: MixedPrecision(candidate, device=trainer.strategy.root_device.type),  # type: ignore[arg-type]  # one of its two names
        }
        seconds = self._time_steps(trainer, pl_module, plugins)
        # the fastest step of each: load from other processes only ever adds time
        fastest = {name: min(times) for name, times in seconds.items()}
        faster = min(fastest, key=fastest.__getitem__)
        timings = ", ".join(f"{name} {step * 1e3:.2f} ms" for name, step in fastest.items())
        reason = (
            f"{why}, and per forward/backward step of training_step on a training batch (fastest of "
            f"{self.measure_steps}) {timings}: {faster} is the faster"
        )
        return faster, reason, seconds

    def _time_steps(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, plugins: dict[str, Precision]
    ) -> dict[str, list[float]]:
        device = trainer.strategy.root_device
        seconds: dict[str, list[float]] = {name: [] for name in plugins}
        with _leaves_no_trace(pl_module, device) as view:
            batch = _training_batch(trainer)
            # Interleaved rounds, so load from other processes hits every candidate alike; round 0 warms up
            # (allocations, kernel selection) and is not kept.
            for round_ in range(self.measure_steps + 1):
                for name, plugin in plugins.items():
                    elapsed = _time_forward_backward(view, batch, plugin, device)
                    if round_:
                        seconds[name].append(elapsed)
        return seconds

    @property
    def _measures(self) -> bool:
        return self.dtype == "auto" and self.measure_steps > 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "dtype": self.dtype,
            "precision": self.precision,
            "reason": self.reason,
            "step_seconds": self.step_seconds,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict["dtype"] != self.dtype:
            return  # the run is resumed with another request: choose again
        self.precision = state_dict["precision"]
        self.reason = state_dict["reason"] + " (restored from the checkpoint)"
        self.step_seconds = state_dict["step_seconds"]


def _training_batch(trainer: pl.Trainer) -> Any:
    # A fresh loader from the user's hook (or the loader passed to fit), so the loader training uses is
    # untouched; CombinedLoader unpacks collections of loaders the way the fit loop does.
    loader = CombinedLoader(trainer.fit_loop._data_source.dataloader(), mode="max_size_cycle")
    batch, _, _ = next(iter(loader))
    return trainer.strategy.batch_to_device(batch)


def _time_forward_backward(pl_module: pl.LightningModule, batch: Any, plugin: Precision, device: torch.device) -> float:
    _synchronize(device)
    start = time.perf_counter()
    with plugin.train_step_context():
        output = pl_module.training_step(batch, 0)
    loss = output["loss"] if isinstance(output, Mapping) else output
    if loss is not None:
        scaler = getattr(plugin, "scaler", None)
        (scaler.scale(loss) if scaler is not None else loss).backward()
    _synchronize(device)
    return time.perf_counter() - start


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def _leaves_no_trace(pl_module: pl.LightningModule, device: torch.device) -> Iterator[ModuleView]:
    """Passes run inside, on the view it yields, change nothing: no optimizer step, and buffers (BatchNorm
    statistics), torchmetrics states, gradients and random state are put back; ``self.log`` calls go to the view
    (:func:`module_view`: the module itself is not modified) and are dropped."""
    buffers = {name: buffer.detach().clone() for name, buffer in pl_module.named_buffers()}
    grads = {param: param.grad for param in pl_module.parameters()}
    metrics = [
        (metric, copy.deepcopy(metric.metric_state), metric._update_count, metric._computed)
        for metric in pl_module.modules()
        if isinstance(metric, Metric)
    ]
    rng_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices):
        try:
            yield module_view(pl_module)
        finally:
            with torch.no_grad():
                for name, buffer in pl_module.named_buffers():
                    buffer.copy_(buffers[name])
            for param, grad in grads.items():
                param.grad = grad
            for metric, state, update_count, computed in metrics:
                for name, value in state.items():
                    setattr(metric, name, value)
                metric._update_count, metric._computed = update_count, computed
