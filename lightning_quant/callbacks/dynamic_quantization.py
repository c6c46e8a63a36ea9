"""Dynamic int8 after training: int8 weights, activations quantized on the fly; no calibration data."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from lightning_quant.callbacks.quantization_base import QuantizationCallback
from lightning_quant.inputs import ModelInputs
from lightning_quant.quantization import DynamicQuantConfig
from lightning_quant.quantization.config import is_kept_float
from lightning_quant.quantization.layers import replace_transposed_linears
from lightning_quant.quantization.legacy import RECURRENT_TYPES, legacy_quantize_dynamic
from lightning_quant.quantization.sensitivity import quantizable_layers

# torch.export cannot capture the legacy int8 LSTM/GRU (their packed weights are TorchScript objects)
_NEEDS_TORCH_EXPORT = ("aoti", "torch_export")
RECURRENT_NOTE = (
    "LSTM/GRU run the legacy torch.ao.quantization dynamic int8 kernel (torchao has none). On this x86 CPU it "
    "gave no speed gain over float (2x512 LSTM, batch 32: 28.2 ms int8 vs 28.4 ms float); it saves weight memory."
)


class DynamicQuantization(QuantizationCallback):
    r"""At fit end, quantize weights to int8 and activations on the fly: Linear, LSTM and GRU layers.

    ``nn.Linear`` layers use torchao ``Int8DynamicActivationInt8WeightConfig`` (fast once lowered: the
    ``"aoti"`` file). ``nn.LSTM``/``nn.GRU`` use the legacy ``torch.ao.quantization.quantize_dynamic``
    because torchao has no int8 recurrent layer; it works but is **not faster** than float on x86 CPUs (it
    saves weight memory), and ``torch.export`` cannot capture it, so a model with them exports to
    ``"onnx"`` (ONNX Runtime ``quantize_dynamic``) and ``"torchscript"`` (legacy); ``recurrent=False``
    leaves them in float and allows every format. ``"torchscript"`` holds a legacy ``quantize_dynamic``
    model (TorchScript cannot trace torchao's int8 tensors). Shared arguments: see
    :class:`~lightning_quant.callbacks.quantization_base.QuantizationCallback` (``max_metric_drop``:
    an accuracy budget that returns the most sensitive layers to float).

    Args:
        recurrent: also quantize ``nn.LSTM`` and ``nn.GRU`` (legacy kernel, see above).

    Example::

        >>> dq = DynamicQuantization(formats=["onnx", "torchscript"])
        >>> dq.formats
        ['onnx', 'torchscript']
    """

    approach = "dynamic"
    backend = "x86 (torchao int8 dynamic Linear; legacy torch.ao int8 dynamic LSTM/GRU)"
    supported_formats = ("aoti", "onnx", "torch_export", "torchscript")
    default_formats = ("aoti", "onnx")
    config: DynamicQuantConfig

    def __init__(
        self,
        recurrent: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.config = DynamicQuantConfig(recurrent=recurrent, keep_float=tuple(self.keep_float), target=self.target)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            self.formats_for(pl_module)  # formats a recurrent model cannot have fail before training

    def formats_for(self, model: nn.Module) -> list[str]:
        """The formats for ``model``: with int8 LSTM/GRU layers, which torch.export cannot capture, the default
        formats become ``["onnx", "torchscript"]``; formats the user chose that need torch.export raise."""
        recurrent_layers = self._recurrent_layers(model)
        blocked = [f for f in self.formats if f in _NEEDS_TORCH_EXPORT]
        if not recurrent_layers or not blocked:
            return self.formats
        if not self.formats_listed:
            return ["onnx", "torchscript"]
        raise ValueError(
            f"{type(model).__name__} has recurrent layers {recurrent_layers}: their int8 version (legacy "
            f"torch.ao) cannot be captured by torch.export, so formats {blocked} are impossible. Use "
            "formats=['onnx', 'torchscript'], or recurrent=False to keep them float (int8 LSTM gives no speed "
            "on x86 CPUs anyway)."
        )

    def _recurrent_layers(self, model: nn.Module) -> list[str]:
        """The LSTM/GRU layers made int8 (none with ``recurrent=False``)."""
        if not self.config.recurrent:
            return []
        return [
            name
            for name, module in model.named_modules()
            if isinstance(module, RECURRENT_TYPES) and not is_kept_float(name, tuple(self.keep_float))
        ]

    def quantizable_layers(self, pl_module: LightningModule) -> list[str]:
        return [
            name
            for name in quantizable_layers(pl_module, self._layer_types(), self.keep_float)
            # attention's output projection: never int8 (see quantize._dynamic_linear_filter)
            if not isinstance(pl_module.get_submodule(name), NonDynamicallyQuantizableLinear)
        ]

    def artifact_models(self, pl_module: LightningModule, keep_float: Sequence[str]) -> dict[str, nn.Module]:
        if "torchscript" not in self.formats_for(pl_module):
            return {}
        legacy = self.cpu_copy(pl_module)
        replace_transposed_linears(legacy)  # transformers' Conv1D as the nn.Linear legacy int8 replaces
        legacy_quantize_dynamic(legacy, self._layer_types(), tuple(keep_float))
        return {"torchscript": legacy}

    def _layer_types(self) -> tuple[type[nn.Module], ...]:
        return (nn.Linear, *RECURRENT_TYPES) if self.config.recurrent else (nn.Linear,)

    def manifest_details(
        self, float_model: nn.Module, inputs: ModelInputs, calibration: Sequence[ModelInputs]
    ) -> dict[str, Any]:
        notes = [
            "Linear: torchao Int8DynamicActivationInt8WeightConfig (per-token int8 activations, per-channel "
            "int8 weights); fast once lowered ('aoti'). 'onnx': ONNX Runtime quantize_dynamic of the float model."
        ]
        if "torchscript" in self.formats_for(float_model):
            notes.append(
                "'torchscript': legacy torch.ao quantize_dynamic (TorchScript cannot trace torchao int8 "
                "tensors); its numerics differ slightly, so it is verified against the float model."
            )
        recurrent_layers = self._recurrent_layers(float_model)
        if recurrent_layers:
            notes.append(RECURRENT_NOTE)
        elif not self.config.recurrent:
            notes.append("recurrent=False: LSTM/GRU layers stay float.")
        return {"recurrent_layers_int8": recurrent_layers, "notes": notes}
