"""At fit end, export the float (or bf16) model as fast, verified deployment artifacts: no quantization."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn
from torch.utils._pytree import tree_map

from lightning_quant.callbacks.quantization_base import QuantizationCallback
from lightning_quant.inputs import ModelInputs
from lightning_quant.quantization.transformer_fastpath import find_manual_attention
from lightning_quant.target import DEFAULT_TARGET

_DTYPES = ("float32", "bfloat16")


class OptimizeForInference(QuantizationCallback):
    r"""At fit end, turns the trained float model into fast deployable files, verified and described in
    ``manifest.json`` exactly like the quantization callbacks' (with ``approach: "float"``).

    This is the modern replacement of TorchScript's deprecated ``torch.jit.optimize_for_inference``: the
    model is captured with ``torch.export`` (any batch size) and written as an AOTInductor package compiled
    with freezing (``"aoti"``: weights become constants, convolutions get oneDNN's prepacked kernels; 2.5x
    faster than eager on the project's conv net), an ONNX file for ONNX Runtime (``"onnx"``) and/or a
    ``torch.export`` program (``"torch_export"``). Each file is reloaded in a fresh process and compared with
    the model; latency, size and validation metrics go to the manifest; ``optimized_model`` is the fast
    model in memory (same inputs as ``forward``, run without autograd).

    Models that compute attention by hand (``softmax(q @ k^T) @ v``) get a warning naming the line: they
    should call ``torch.nn.functional.scaled_dot_product_attention``. Shared arguments (``dirpath``,
    ``formats``, ``example_input``, ``batch_to_input``, ``dynamic_batch``): see
    :class:`~lightning_quant.callbacks.quantization_base.QuantizationCallback`.

    Args:
        dtype: ``"float32"``, or ``"bfloat16"``: weights and floating-point inputs in bf16, outputs back in
            float32 (inputs stay the same as ``forward``'s); formats ``"aoti"`` and ``"torch_export"`` only,
            as ONNX Runtime's CPU kernels do not run bf16.

    Example::

        >>> import lightning as L
        >>> from lightning_quant import OptimizeForInference
        >>> from lightning_quant.demo import ConvNet, DigitsClassifier, DigitsDataModule
        >>> optimize = OptimizeForInference(dirpath="artifacts", formats=["aoti", "onnx"])
        >>> trainer = L.Trainer(max_epochs=1, limit_train_batches=4, callbacks=[optimize])
        >>> trainer.fit(DigitsClassifier(ConvNet()), datamodule=DigitsDataModule())  # doctest: +SKIP
        >>> optimize.manifest["approach"], [a["format"] for a in optimize.manifest["artifacts"]]  # doctest: +SKIP
        ('float', ['aoti', 'onnx'])
        >>> optimize.optimized_model(torch.rand(3, 1, 8, 8)).shape  # doctest: +SKIP
        torch.Size([3, 10])
    """

    approach = "float"
    backend = "float (AOTInductor with freezing; ONNX Runtime)"
    supported_formats = ("aoti", "onnx", "openvino", "torch_export")
    default_formats = ("aoti", "onnx", "openvino", "torch_export")  # "openvino" where installed
    config = None  # nothing is quantized: the shared path exports the float model, as deploy(model, None) does

    def __init__(
        self,
        dtype: str = "float32",
        dirpath: Optional[Union[str, Path]] = None,
        formats: Optional[Sequence[str]] = None,
        example_input: Any = None,
        batch_to_input: Optional[Callable[[Any], Any]] = None,
        dynamic_batch: bool = True,
        target: str = DEFAULT_TARGET,
    ) -> None:
        if dtype not in _DTYPES:
            raise ValueError(f"OptimizeForInference(dtype={dtype!r}) is not supported: use 'float32' or 'bfloat16'")
        if dtype == "bfloat16":
            formats = ["aoti", "torch_export"] if formats is None else formats
            through_onnx = [f for f in formats if f in ("onnx", "openvino")]
            if through_onnx:
                raise ValueError(
                    f"OptimizeForInference(dtype='bfloat16') cannot export {through_onnx}: ONNX Runtime's CPU kernels "
                    "do not run bf16 (and the OpenVINO file is converted from the ONNX one). Use "
                    "formats=['aoti', 'torch_export'], or dtype='float32' for ONNX and OpenVINO."
                )
        # keep_float and max_metric_drop are not parameters: nothing is quantized (so the signature is explicit,
        # not **kwargs, and the schema read from it has no such fields)
        super().__init__(
            dirpath=dirpath,
            formats=formats,
            example_input=example_input,
            batch_to_input=batch_to_input,
            dynamic_batch=dynamic_batch,
            target=target,
        )
        self.dtype = dtype

    @property
    def optimized_model(self) -> Optional[nn.Module]:
        """The fast model after fit (the AOTInductor package when ``"aoti"`` was exported)."""
        return self.quantized_model

    def convert(
        self,
        pl_module: LightningModule,
        inputs: ModelInputs,
        calibration: Sequence[ModelInputs],
        keep_float: Sequence[str],
    ) -> nn.Module:
        model = super().convert(pl_module, inputs, calibration, keep_float)  # config None: a float copy
        if self.dtype == "bfloat16":
            # hooks, not a wrapper: forward keeps its signature, and torch.export traces the casts
            model.to(torch.bfloat16)
            model.register_forward_pre_hook(_inputs_to_bfloat16, with_kwargs=True)
            model.register_forward_hook(_outputs_to_float32)
        return model

    def manifest_details(
        self, float_model: nn.Module, inputs: ModelInputs, calibration: Sequence[ModelInputs]
    ) -> dict[str, Any]:
        manual_attention = find_manual_attention(float_model, *inputs.args, **inputs.kwargs)
        if manual_attention:
            rank_zero_warn(
                f"{type(float_model).__name__} computes attention by hand (softmax(q @ k^T) @ v) at "
                f"{', '.join(manual_attention)}: torch.nn.functional.scaled_dot_product_attention does the "
                "same in one fused kernel (faster, less memory), and exports as one op."
            )
        return {
            "dtype": self.dtype,
            "manual_attention": manual_attention,
            "notes": [
                "No quantization: the trained model itself, exported for inference (torch.export, AOTInductor "
                "with freezing, ONNX). 'quantized' in latency_ms/size_bytes/metrics means this optimized model."
            ],
        }


def _cast_floats(value: Any, dtype: torch.dtype) -> Any:
    return tree_map(lambda v: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v, value)


def _inputs_to_bfloat16(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    return _cast_floats((args, kwargs), torch.bfloat16)


def _outputs_to_float32(module: nn.Module, args: tuple, output: Any) -> Any:
    return _cast_floats(output, torch.float32)
