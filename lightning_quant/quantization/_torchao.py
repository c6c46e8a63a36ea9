"""The one place torchao is imported: its CPU import noise is silenced here, once.

On a CPU-only machine torchao 0.18 logs "Failed to load ... .so" for its CUDA kernels and torch logs an
Enum ``register_constant`` deprecation; neither concerns our users. Import torchao symbols from here.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def _quiet_loggers(*names: str) -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


with _quiet_loggers("torchao", "torch.utils._pytree"):
    import torchao
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    from torchao.quantization.pt2e.observer import (
        HistogramObserver,
        MinMaxObserver,
        MovingAverageMinMaxObserver,
        PerChannelMinMaxObserver,
    )
    from torchao.quantization.pt2e.quantizer import QuantizationConfig, QuantizationSpec
    from torchao.quantization.pt2e import (
        FakeQuantize,
        FakeQuantizeBase,
        FusedMovingAvgObsFakeQuantize,
        MinMaxObserver,
        MovingAverageMinMaxObserver,
        MovingAveragePerChannelMinMaxObserver,
        PerChannelMinMaxObserver,
        disable_observer,
        enable_observer,
        move_exported_model_to_eval,
        move_exported_model_to_train,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e, prepare_qat_pt2e
    from torchao.quantization.pt2e.quantizer import QuantizationConfig, QuantizationSpec
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

__all__ = [
    "torchao",
    "quantize_",
    "Int8DynamicActivationInt8WeightConfig",
    "HistogramObserver",
    "MinMaxObserver",
    "MovingAverageMinMaxObserver",
    "PerChannelMinMaxObserver",
    "QuantizationConfig",
    "QuantizationSpec",
    "convert_pt2e",
    "prepare_pt2e",
    "prepare_qat_pt2e",
    "FakeQuantize",
    "FakeQuantizeBase",
    "FusedMovingAvgObsFakeQuantize",
    "MinMaxObserver",
    "MovingAverageMinMaxObserver",
    "MovingAveragePerChannelMinMaxObserver",
    "PerChannelMinMaxObserver",
    "QuantizationConfig",
    "QuantizationSpec",
    "disable_observer",
    "enable_observer",
    "move_exported_model_to_eval",
    "move_exported_model_to_train",
    "X86InductorQuantizer",
    "get_default_x86_inductor_quantization_config",
]
