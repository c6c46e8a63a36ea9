"""What QAT inserts: :class:`QATConfig` and the quantizer it makes (``X86InductorQuantizer`` for training)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn
from torch.fx import GraphModule

from lightning_quant.quantization._torchao import X86InductorQuantizer
from lightning_quant.quantization.config import check_observed_config
from lightning_quant.quantization.graph_ops import CONVS, is_call
from lightning_quant.quantization.quantize import x86_quantizer
from lightning_quant.target import DEFAULT_TARGET


@dataclass(frozen=True)
class QATConfig:
    """How fake-quant is inserted (the QAT counterpart of :class:`StaticQuantConfig`).

    Args:
        observer: how activation ranges are tracked while training: ``"moving_average"`` (default, the
            QAT standard: the range follows the activations as the weights change; fused with fake-quant),
            ``"minmax"`` (the widest range seen) or ``"histogram"`` (slow: a histogram search every step).
            Weights always use a per-step moving average: they change every step.
        per_channel: one weight scale per output channel (default) rather than one per tensor.
        keep_float: names of submodules (as in ``model.named_modules()``) whose ops stay in float.
        target: the CPUs the int8 model is for (:mod:`lightning_quant.target`); ``"avx2"`` (default) trains with
            the 7-bit weight grid that CPUs without VNNI compute exactly, so the converted model and files match.

    Example::

        >>> QATConfig(keep_float=("net.head",)).observer
        'moving_average'
    """

    observer: str = "moving_average"
    per_channel: bool = True
    keep_float: Sequence[str] = ()
    target: str = DEFAULT_TARGET

    def __post_init__(self) -> None:
        check_observed_config(self.observer, self.keep_float, self.target)
        object.__setattr__(self, "keep_float", tuple(self.keep_float))


def make_qat_quantizer(config: QATConfig = QATConfig(), model: nn.Module | None = None) -> X86InductorQuantizer:
    """``X86InductorQuantizer`` for QAT: :func:`~lightning_quant.quantization.quantize.x86_quantizer` with
    fake-quant in place of observers (uint8 activations, int8 symmetric weights in the target's range,
    ``keep_float`` and, given ``model``, its convolutions with one input channel left float)."""
    return x86_quantizer(config, model, is_qat=True, quantizer=_QATQuantizer())


class _QATQuantizer(X86InductorQuantizer):
    """torchao 0.18's ``prepare_qat_pt2e`` fails (IndexError in ``_update_conv_input_qspec_map_after_replacement``)
    on a conv followed by BatchNorm that ``set_module_name_qconfig(name, None)`` keeps in float: the empty
    annotation that marks it is indexed as if it listed input, weight and bias. Once annotation is done the
    marker has served its purpose (stopping the other annotators), so it is removed from convs."""

    def annotate(self, model: GraphModule) -> GraphModule:
        model = super().annotate(model)
        for node in model.graph.nodes:
            annotation = node.meta.get("quantization_annotation")
            if (
                is_call(node, *CONVS)
                and annotation is not None
                and not annotation.input_qspec_map
                and annotation.output_qspec is None
            ):
                del node.meta["quantization_annotation"]
        return model
