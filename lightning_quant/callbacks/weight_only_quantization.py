"""Weight-only quantization after training: int4 (or int8) Linear (Conv1D) and Embedding weights in groups, float activations."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn

from lightning_quant.callbacks.quantization_base import (
    QuantizationCallback,
    _first_batch,
    _is_empty,
    check_calibration_arguments,
)
from lightning_quant.inputs import ModelInputs
from lightning_quant.quantization import WeightOnlyConfig
from lightning_quant.quantization.weight_only import quantizable_layers

_METHOD_NOTES = {
    "rtn": "rounded to nearest, the largest weight of each group exact",
    "clip": "each group's scale searched for the least output error on the calibration batches",
    "gptq": "GPTQ: rounding errors compensated over the calibration batches, each group's scale searched",
}


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
        method: how the integers and scales are chosen: ``"rtn"`` (default: round to nearest, no data), ``"clip"``
            (each group's scale searched for the least output error on calibration batches, AWQ's clipping
            search) or ``"gptq"`` (GPTQ's error compensation on calibration batches, scales searched alike). The
            files are the same ``MatMulNBits`` nodes whichever is chosen.
        num_calibration_batches: ``"clip"``/``"gptq"``: how many batches of the fit's ``calibration_dataloader``
            the Linear layers' inputs are measured on (whole batches through ``forward``; they need not be the
            call the example is, e.g. whole sequences for a language model whose example is one generation step).
        calibration_dataloader: ``"train"`` (default) or ``"val"``.

    Example::

        >>> WeightOnlyQuantization(bits=4, group_size=64).config
        WeightOnlyConfig(bits=4, group_size=64, keep_float=(), method='rtn')
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
        method: str = "rtn",
        num_calibration_batches: int = 16,
        calibration_dataloader: str = "train",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.config = WeightOnlyConfig(
            bits=bits, group_size=group_size, keep_float=tuple(self.keep_float), method=method
        )
        check_calibration_arguments(num_calibration_batches, calibration_dataloader)
        self.num_calibration_batches = num_calibration_batches
        self.calibration_dataloader = calibration_dataloader

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if not self.config.needs_calibration:
            return
        # the fit's dataloaders exist from here on: a data method without data fails now, not after training
        name, where = type(self).__name__, self.calibration_dataloader
        loaders = self._dataloaders(trainer, where)
        if not loaders or all(_is_empty(loader) for loader in loaders):
            raise ValueError(
                f"{name}(method={self.config.method!r}) chooses the weights on batches of the {where} dataloader, "
                f"and this fit has {'an empty one' if loaders else 'none'}: pass one to trainer.fit, set "
                f"calibration_dataloader to the other, or use method='rtn' (no data)"
            )
        sample = next((batch for batch in map(_first_batch, loaders) if batch is not None), None)
        if sample is not None:  # a batch forward cannot take raises here, naming batch_to_input
            self._batch_inputs(sample, pl_module, where)

    def calibration_inputs(self, trainer: Trainer, inputs: ModelInputs) -> list[ModelInputs]:
        if not self.config.needs_calibration:
            return []
        # read once per fit end: every conversion of this fit's model (the accuracy budget's too) reads the same
        calibration = list(self.model_inputs(trainer, self.calibration_dataloader, self.num_calibration_batches))
        if len(calibration) < self.num_calibration_batches:
            rank_zero_warn(
                f"{type(self).__name__}(method={self.config.method!r}) read {len(calibration)} batch(es) of the "
                f"{self.calibration_dataloader} dataloader, fewer than num_calibration_batches="
                f"{self.num_calibration_batches}."
            )
        return calibration

    def quantizable_layers(self, pl_module: LightningModule) -> list[str]:
        return quantizable_layers(pl_module, self.config)

    def manifest_details(
        self, float_model: nn.Module, inputs: ModelInputs, calibration: Sequence[ModelInputs]
    ) -> dict[str, Any]:
        details: dict[str, Any] = {
            "bits": self.config.bits,
            "group_size": self.config.group_size,
            "method": self.config.method,
        }
        if self.config.needs_calibration:
            details["calibration"] = {
                "dataloader": self.calibration_dataloader,
                "batches": len(calibration),
                "batches_requested": self.num_calibration_batches,
            }
        return details | {
            "notes": [
                f"Linear, Conv1D and Embedding weights: int{self.config.bits}, one float scale per {self.config.group_size} input "
                f"features (symmetric; {_METHOD_NOTES[self.config.method]}); activations float. 'onnx': ONNX "
                "Runtime MatMulNBits with float compute."
            ],
        }
