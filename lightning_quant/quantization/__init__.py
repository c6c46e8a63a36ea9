"""The int8 core, free of Lightning: configs, one :func:`quantize` entry point, op counting.

Example::

    >>> import torch
    >>> from lightning_quant.demo import MLPNet
    >>> from lightning_quant.quantization import DynamicQuantConfig, count_quantized_ops, quantize
    >>> int8 = quantize(MLPNet().eval(), DynamicQuantConfig(), torch.zeros(4, 1, 8, 8))
    >>> count_quantized_ops(int8)
    {'Linear (Int8Tensor)': 3}
"""

from lightning_quant.inputs import ModelInputs
from lightning_quant.quantization.budget import FallbackResult, MetricBudget, fallback_search
from lightning_quant.quantization.config import OBSERVERS, DynamicQuantConfig, StaticQuantConfig
from lightning_quant.quantization.quantize import (
    QuantizationError,
    count_quantized_ops,
    export_for_quantization,
    quantize,
    single_input_channel_convs,
    x86_quantizer,
)
from lightning_quant.quantization.sensitivity import (
    layer_sensitivity,
    output_error,
    quantizable_layers,
    save_sensitivity,
)
from lightning_quant.quantization.weight_only import WeightOnlyConfig

__all__ = [
    "OBSERVERS",
    "DynamicQuantConfig",
    "FallbackResult",
    "MetricBudget",
    "ModelInputs",
    "QuantizationError",
    "StaticQuantConfig",
    "WeightOnlyConfig",
    "count_quantized_ops",
    "export_for_quantization",
    "fallback_search",
    "layer_sensitivity",
    "output_error",
    "quantizable_layers",
    "save_sensitivity",
    "quantize",
    "single_input_channel_convs",
    "x86_quantizer",
]
