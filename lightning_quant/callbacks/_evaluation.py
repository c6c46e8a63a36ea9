"""A LightningModule's own validation metrics for another model: what the callbacks compare float and quantized
models with (the accuracy budget, the manifest's ``metrics``)."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from lightning.pytorch import LightningModule
from torchmetrics import Metric

from lightning_quant.callbacks._view import module_view
from lightning_quant.inputs import tensors_in


def evaluate_validation(
    pl_module: LightningModule, model: Callable[..., Any], loaders: Sequence[Any], limits: Sequence[float]
) -> dict[str, float]:
    """Run ``pl_module``'s ``validation_step`` with ``model`` as its forward (on a :func:`module_view`: the module
    itself is not modified); return what it logs.

    The module's own code computes the metrics: torchmetrics objects it logs are computed over all batches,
    plain values are averaged weighted by batch size. Metric states are reset before and after.
    """
    metrics = [m for m in pl_module.modules() if isinstance(m, Metric)]
    recorded_metrics: dict[str, Metric] = {}
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    view = module_view(pl_module, model)
    takes_dataloader_idx = "dataloader_idx" in inspect.signature(view.validation_step).parameters
    for metric in metrics:
        metric.reset()
    saved_sync = [(m, m.sync_on_compute) for m in metrics]
    for metric in metrics:
        metric.sync_on_compute = False  # only rank zero evaluates: a sync would wait for the others forever
    try:
        with torch.no_grad():
            for index, (loader, limit) in enumerate(zip(loaders, limits)):
                for batch_idx, batch in enumerate(loader):
                    if batch_idx >= limit:
                        break
                    batch = _to_cpu(batch)
                    tensors = [t for t in tensors_in(batch) if t.dim() > 0]
                    current_batch_size = int(tensors[0].shape[0]) if tensors else 1
                    extra = {"dataloader_idx": index} if takes_dataloader_idx and len(loaders) > 1 else {}
                    view.validation_step(batch, batch_idx, **extra)
                    for name, calls in view.logged.items():
                        for value, batch_size in calls:
                            if isinstance(value, Metric):
                                recorded_metrics[name] = value
                                continue
                            weight = batch_size or current_batch_size
                            sums[name] = sums.get(name, 0.0) + float(value) * weight
                            counts[name] = counts.get(name, 0.0) + weight
                    view.logged.clear()
        results = {name: float(metric.compute()) for name, metric in recorded_metrics.items()}
        results.update({name: sums[name] / counts[name] for name in sums})
    finally:
        for metric, sync in saved_sync:
            metric.sync_on_compute = sync
            metric.reset()
    return dict(sorted(results.items()))


def evaluated_batches(loader: Any, limit: float) -> int:
    if math.isfinite(limit):
        return min(len(loader), int(limit)) if hasattr(loader, "__len__") else int(limit)
    return len(loader) if hasattr(loader, "__len__") else 0  # an unsized loader read to its end: not counted


def _to_cpu(batch: Any) -> Any:
    from torch.utils._pytree import tree_map

    return tree_map(lambda v: v.cpu() if isinstance(v, torch.Tensor) else v, batch)
