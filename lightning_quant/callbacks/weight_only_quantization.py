"""Weight-only quantization after training: int4 (or int8) Linear (Conv1D) and Embedding weights in groups, float activations."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lightning.pytorch import LightningModule
from torch import nn

from lightning_quant.callbacks.quantization_base import QuantizationCallback
from lightning_quant.inputs import ModelInputs
from lightning_quant.quantization import WeightOnlyConfig
from lightning_quant.quantization.weight_only import quantizable_layers


class WeightOnlyQuantization(QuantizationCallback):
    r"""At fit end, store ``nn.Linear`` weights and ``nn.Embedding`` tables in ``bits`` bits (int4 by default), one
    float scale per group of ``group_size`` input features (an embedding: of each row); activations stay float. For
    language models and other Linear-heavy networks, where weights dominate size and memory traffic.

    The ``"onnx"`` file runs ONNX Runtime's ``MatMulNBits`` kernel (the packed weights, float compute: exact on
    every x86 CPU); ``"torch_export"`` is the same program as a ``.pt2`` (the op it calls is registered by
    importing ``lightning_quant``); ``"aoti"`` is allowed, and kept only where it is measured faster than float;
    ``"torchao"`` is the model with torchao tensors for weights, for torchao users
    (:mod:`~lightning_quant.export.torchao_checkpoint`). Embeddings are looked up from the packed table. Layers whose input width
    (``embedding_dim``) is not a multiple of ``group_size`` stay float. Shared arguments (``dirpath``, ``formats``,
    ``example_input``, ``keep_float``, ``max_metric_drop``: an accuracy budget that returns the most
    sensitive layers to float, ...): see :class:`~lightning_quant.callbacks.quantization_base.QuantizationCallback`.

    Args:
        bits: 4 (default) or 8.
        group_size: input features per scale: 16, 32 (default), 64, 128 or 256.

    Example::

        >>> WeightOnlyQuantization(bits=4, group_size=64).config
        WeightOnlyConfig(bits=4, group_size=64, keep_float=())
    """

    approach = "weight_only"
    backend = "ONNX Runtime MatMulNBits (packed int4/int8 weights, float compute)"
    supported_formats = ("onnx", "torch_export", "aoti", "torchao")
    default_formats = ("onnx", "torch_export")
    config: WeightOnlyConfig

    def __init__(
        self,
        bits: int = 4,
        group_size: int = 32,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.config = WeightOnlyConfig(bits=bits, group_size=group_size, keep_float=tuple(self.keep_float))

    def quantizable_layers(self, pl_module: LightningModule) -> list[str]:
        return quantizable_layers(pl_module, self.config)

    def manifest_details(
        self, float_model: nn.Module, inputs: ModelInputs, calibration: Sequence[ModelInputs]
    ) -> dict[str, Any]:
        return {
            "bits": self.config.bits,
            "group_size": self.config.group_size,
            "notes": [
                f"Linear, Conv1D and Embedding weights: int{self.config.bits}, one float scale per {self.config.group_size} input "
                "features (symmetric; the largest weight of each group exact); activations float. 'onnx': ONNX "
                "Runtime MatMulNBits with float compute."
            ],
        }
