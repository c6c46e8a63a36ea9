"""lightning-quant: Lightning callbacks that make trained models cheaper to run.

Names are imported on first use, so ``import lightning_quant`` stays light and the core
(quantization, export, measurement) can be used without importing Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

from lightning_quant import _quiet

_quiet.install()  # torchao's and torch's import noise on CPU machines, whoever imports torchao first

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "PostTrainingQuantization": "lightning_quant.callbacks.post_training_quantization",
    "DynamicQuantization": "lightning_quant.callbacks.dynamic_quantization",
    "QuantizationAwareTraining": "lightning_quant.callbacks.quantization_aware_training",
    "AutoMixedPrecision": "lightning_quant.callbacks.auto_mixed_precision",
    "ChannelsLast": "lightning_quant.callbacks.channels_last",
    "OptimizeForInference": "lightning_quant.callbacks.optimize_for_inference",
    "WeightOnlyQuantization": "lightning_quant.callbacks.weight_only_quantization",
    "WeightOnlyQAT": "lightning_quant.callbacks.weight_only_qat",
    "MetricBudget": "lightning_quant.quantization.budget",
    "load": "lightning_quant.loading",
    "deploy": "lightning_quant.pipeline",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lightning_quant' has no attribute '{name}'")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
