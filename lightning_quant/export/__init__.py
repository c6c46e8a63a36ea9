"""Deployable files from a quantized model, one module per format, and their verification.

Formats: ``"aoti"`` (AOTInductor package, freezing on), ``"onnx"`` (fast in ONNX Runtime),
``"torch_export"`` (``torch.export.save`` program), ``"torchscript"`` (legacy ``torch.jit.trace``).
Every file is written atomically and accepts any batch size unless ``dynamic_batch=False``.

Example::

    >>> import tempfile, torch
    >>> from lightning_quant.demo import MLPNet
    >>> from lightning_quant.quantization import DynamicQuantConfig, quantize
    >>> model = MLPNet().eval()
    >>> int8 = quantize(model, DynamicQuantConfig(), torch.zeros(4, 1, 8, 8))
    >>> out = tempfile.mkdtemp()
    >>> [a.format for a in export(int8, torch.zeros(4, 1, 8, 8), ["torch_export"], out)]
    ['torch_export']
"""

from lightning_quant.export.api import FORMATS, Artifact, ExportError, export, load_artifact
from lightning_quant.export.onnx import OnnxQuantization, OrtDynamicQuantization, OrtStaticQuantization
from lightning_quant.export.verify import verify_artifacts

__all__ = [
    "FORMATS",
    "Artifact",
    "ExportError",
    "OnnxQuantization",
    "OrtDynamicQuantization",
    "OrtStaticQuantization",
    "export",
    "load_artifact",
    "verify_artifacts",
]
