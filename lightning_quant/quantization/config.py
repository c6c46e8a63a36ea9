"""What to quantize and how: small config dataclasses, one per approach (torchao's style)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from lightning_quant.target import DEFAULT_TARGET, check_target_name

OBSERVERS = ("minmax", "moving_average", "histogram")


@dataclass(frozen=True)
class StaticQuantConfig:
    """Static int8 (PT2E, ``X86InductorQuantizer``): activations calibrated on real batches, int8 weights.

    Args:
        observer: how activation ranges are calibrated: ``"histogram"`` (default; minimises the
            quantization error, slowest to calibrate), ``"minmax"`` or ``"moving_average"``.
        per_channel: one weight scale per output channel (default) instead of one per tensor.
        keep_float: names of submodules left in float (as in ``model.named_modules()``).
        target: the CPUs the int8 model must be right on (:mod:`lightning_quant.target`): ``"avx2"`` (default,
            any x86-64 CPU with AVX2: 7-bit weights), ``"avx512_vnni"``, ``"avx512_bf16"``, ``"amx"`` (8-bit) or ``"native"``.

    Example::

        >>> StaticQuantConfig(observer="minmax", keep_float=("net.head",)).observer
        'minmax'
    """

    observer: str = "histogram"
    per_channel: bool = True
    keep_float: Sequence[str] = field(default_factory=tuple)
    target: str = DEFAULT_TARGET

    def __post_init__(self) -> None:
        check_observed_config(self.observer, self.keep_float, self.target)


@dataclass(frozen=True)
class DynamicQuantConfig:
    """Dynamic int8: int8 weights, activations quantized on the fly at each call.

    ``nn.Linear`` layers go through torchao (``Int8DynamicActivationInt8WeightConfig``); ``nn.LSTM`` and
    ``nn.GRU``, which torchao does not cover, through the legacy ``torch.ao.quantization.quantize_dynamic``
    (on x86 CPUs it saves memory, not time). Set ``recurrent=False`` to leave them in float. ``target`` as in
    :class:`StaticQuantConfig` (``"avx2"``: torchao's ``reduce_range``, 7-bit weights and activations).

    Example::

        >>> DynamicQuantConfig(keep_float=("net.head",)).recurrent
        True
    """

    recurrent: bool = True
    keep_float: Sequence[str] = field(default_factory=tuple)
    target: str = DEFAULT_TARGET

    def __post_init__(self) -> None:
        check_keep_float(self.keep_float)
        check_target_name(self.target)


def is_kept_float(name: str, keep_float: Sequence[str]) -> bool:
    """Whether the module ``name`` stays float: it is one of ``keep_float`` or inside one of them.

    Example::

        >>> is_kept_float("net.head.0", ("net.head",)), is_kept_float("net.header", ("net.head",))
        (True, False)
    """
    return any(name == kept or name.startswith(kept + ".") for kept in keep_float)


def check_observed_config(observer: str, keep_float: Sequence[str], target: str) -> None:
    """The fields static int8 and QAT configs share: a known observer, module names, a known target."""
    if observer not in OBSERVERS:
        raise ValueError(f"Unknown observer {observer!r}; choose one of {list(OBSERVERS)}")
    check_keep_float(keep_float)
    check_target_name(target)


def check_keep_float(names: Sequence[str]) -> None:
    """``keep_float`` is a list of module names (a bare string would be read letter by letter)."""
    if isinstance(names, str) or not all(isinstance(name, str) for name in names):
        raise TypeError(f"keep_float must be a list of module names such as ['net.head'], got {names!r}")
