"""At fit end, export the float (or bf16) model as fast, verified deployment artifacts: no quantization."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

from lightning.pytorch import LightningModule
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn

from lightning_quant.callbacks.quantization_base import QuantizationCallback
from lightning_quant.inputs import ModelInputs
from lightning_quant.precision import to_bfloat16
from lightning_quant.quantization import MetricBudget
from lightning_quant.quantization.transformer_fastpath import find_manual_attention
from lightning_quant.target import DEFAULT_TARGET, resolve_target

_DTYPES = ("auto", "float32", "bfloat16")
# In bf16 these files are the bf16 model itself. ONNX Runtime's CPU kernels have no bf16, so the ONNX file is the
# float32 model; the OpenVINO IR converted from it holds float32 weights and runs in bf16 (OpenVINO's precision,
# chosen at load: 1.7x faster than the bf16 AOTInductor package on ResNet-50, benchmarks/bf16_float_results.md).
_BF16_MODEL_FORMATS = ("aoti", "torch_export")
_BF16_FORMATS = (*_BF16_MODEL_FORMATS, "openvino")


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
        dtype: ``"auto"`` (default): ``"bfloat16"`` where every CPU of ``target`` computes bf16 natively
            (``target="avx512_bf16"``, ``"amx"``, or ``"native"`` on such a CPU), else ``"float32"``; the manifest's
            ``dtype`` and ``dtype_choice`` say which and why. ``"bfloat16"``: weights and computation in bf16,
            inputs and outputs as ``forward``'s (float32); it needs such a target, as emulated bf16 is slower than
            float32. In bf16 the ``"aoti"`` and ``"torch_export"`` files compute in bf16, and OpenVINO runs the
            ``"openvino"`` file in bf16; the ``"onnx"`` file stays float32 (ONNX Runtime's CPU kernels have no
            bf16). ``dtype_by_format`` in the manifest lists each.
        max_metric_drop: an accuracy budget for bf16 (as the quantization callbacks take it): while the metric
            dropped more than allowed, the most sensitive layers return to float32 one at a time. OpenVINO runs a
            whole IR in one precision, so with a budget the ``"openvino"`` file runs in float32.

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
        dtype: str = "auto",
        dirpath: Optional[Union[str, Path]] = None,
        formats: Optional[Sequence[str]] = None,
        example_input: Any = None,
        batch_to_input: Optional[Callable[[Any], Any]] = None,
        dynamic_batch: bool = True,
        max_metric_drop: Optional[Union[MetricBudget, Mapping[str, Any]]] = None,
        target: str = DEFAULT_TARGET,
    ) -> None:
        if dtype not in _DTYPES:
            raise ValueError(
                f"OptimizeForInference(dtype={dtype!r}) is not supported: use 'auto', 'float32' or 'bfloat16'"
            )
        # keep_float is not a parameter: it names layers kept out of quantization (so the signature is explicit,
        # not **kwargs, and the schema read from it has no such field)
        super().__init__(
            dirpath=dirpath,
            formats=formats,
            example_input=example_input,
            batch_to_input=batch_to_input,
            dynamic_batch=dynamic_batch,
            max_metric_drop=max_metric_drop,
            target=target,
        )
        if dtype == "bfloat16" and not resolve_target(target).bf16:
            raise ValueError(
                f"OptimizeForInference(dtype='bfloat16', target={target!r}): not every CPU of target "
                f"{resolve_target(target).name!r} computes bf16 natively (AVX-512 BF16 or AMX), and where bf16 is "
                "emulated it is slower than float32. Use target='avx512_bf16' or 'amx' (or 'native' on such a CPU), "
                "or dtype='auto': bf16 where the target has it, else float32."
            )
        self.dtype = dtype
        if dtype == "bfloat16" and not set(self.formats) & set(self.bf16_formats):
            raise ValueError(
                f"OptimizeForInference(dtype='bfloat16', formats={self.formats}): none of these files computes in "
                f"bf16 (ONNX Runtime's CPU kernels have none; OpenVINO's file runs in float32 under "
                f"max_metric_drop). Add one of {list(self.bf16_formats)}, or use dtype='float32'."
            )

    @property
    def inference_dtype(self) -> str:
        """``dtype`` with ``"auto"`` decided for ``target``: ``"bfloat16"`` or ``"float32"``."""
        if self.dtype == "auto":
            return "bfloat16" if resolve_target(self.target).bf16 else "float32"
        return self.dtype

    @property
    def bf16_formats(self) -> tuple[str, ...]:
        """The formats that compute in bf16 when the model does. OpenVINO runs a whole IR in one precision, so it
        is not one of them under a budget, which may return layers to float32."""
        return _BF16_MODEL_FORMATS if self.budget is not None else _BF16_FORMATS

    @property
    def runtime_dtype(self) -> str:
        return self.inference_dtype if "openvino" in self.bf16_formats else "float32"

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
        return to_bfloat16(model, keep_float) if self.inference_dtype == "bfloat16" else model

    def artifact_models(self, pl_module: LightningModule, keep_float: Sequence[str]) -> dict[str, nn.Module]:
        if self.inference_dtype == "float32":
            return {}
        float32 = self.cpu_copy(pl_module)  # one model: the OpenVINO file is converted from this ONNX export
        return {name: float32 for name in self.formats_for(pl_module) if name not in _BF16_MODEL_FORMATS}

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
        dtype, target = self.inference_dtype, resolve_target(self.target)
        return {
            "dtype": dtype,
            "dtype_choice": _dtype_choice(self.dtype, dtype, target.name),
            "dtype_by_format": {
                name: dtype if name in self.bf16_formats else "float32" for name in self.formats_for(float_model)
            },
            "manual_attention": manual_attention,
            "notes": [
                "No quantization: the trained model itself, exported for inference (torch.export, AOTInductor "
                "with freezing, ONNX). 'quantized' in latency_ms/size_bytes/metrics means this optimized model."
            ],
        }


def _dtype_choice(asked: str, dtype: str, target: str) -> str:
    if asked != "auto":
        return f"dtype={asked!r} was asked for"
    if dtype == "bfloat16":
        return f"auto: every CPU of target {target!r} computes bf16 natively (AVX-512 BF16 or AMX)"
    return (
        f"auto: target {target!r} does not guarantee native bf16 (AVX-512 BF16 or AMX), where emulated bf16 is "
        "slower than float32; target='avx512_bf16', 'amx' or 'native' on such a CPU picks bf16"
    )
