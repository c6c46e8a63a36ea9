"""The one place torchao is imported (import torchao symbols from here). Its import noise on CPU machines is
dropped by :mod:`lightning_quant._quiet`, installed when the package is imported, before this module."""

from __future__ import annotations

import torchao
from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
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
from torchao.quantization.pt2e.observer import HistogramObserver
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
