"""Deployment targets: which x86 CPUs an int8 file must be right and fast on, and what that demands.

Measured (``benchmarks/``, ``../shared/MEASURED.md``): without VNNI, x86 int8 kernels (oneDNN, ONNX
Runtime's MLAS) multiply uint8 activations by int8 weights with ``vpmaddubsw``, which adds pairs of products
in int16 and saturates: with 8-bit weights an AOTInductor int8 conv net was off by 0.4-4.5% of its output
range, torchao's dynamic int8 Linear by 49%, and ONNX Runtime's int8 files by 12-26%. With weights in 7 bits
(``[-64, 63]``) a pair of products (at most ``2 * 255 * 64``) fits in int16 and the same files are exact.
Separately, AOTInductor compiles C++ for a vector ISA (``-march``): a package built for AVX-512 does not run
on an AVX2 CPU.

A :class:`CpuTarget` says both: the weight range and the ISA the files are built for. ``"avx2"`` (default)
is any x86-64 CPU with AVX2 (Intel Haswell and later, AMD Zen and later); ``"avx512_vnni"``, ``"avx512_bf16"``
(AMD Zen 4 and later, Intel Cooper Lake) and ``"amx"`` name newer CPUs and keep full 8-bit weights; the last two also
compute bfloat16 natively, so float files may run in bf16 for them (:attr:`CpuTarget.bf16`). ``"native"`` is the best
of those this CPU has.

Example::

    >>> resolve_target("avx2").weight_range
    (-64, 63)
    >>> resolve_target("avx512_vnni").weight_range
    (-128, 127)
    >>> resolve_target("avx2").bf16, resolve_target("avx512_bf16").bf16
    (False, True)
"""

from __future__ import annotations

import functools
import platform
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Union

# the /proc/cpuinfo flags that decide which int8 kernels and vector code a CPU runs
ISA_FLAGS = (
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512dq",
    "avx512vl",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
)


@dataclass(frozen=True)
class CpuTarget:
    """The CPUs files are made for.

    Args:
        name: ``"avx2"``, ``"avx512_vnni"``, ``"avx512_bf16"`` or ``"amx"``.
        requires: CPU flags (as ``/proc/cpuinfo`` spells them) a machine needs to run the files.
        weight_bits: 7 where the int8 kernels sum u8 x s8 products in int16 (no VNNI), else 8.
        march: the ``-march`` AOTInductor compiles its C++ for.
        simdlen: the vector width (bits) of AOTInductor's generated loops.
        onednn_isa: the ``ONEDNN_MAX_CPU_ISA`` value that makes oneDNN run as on this target: a machine with a
            wider ISA checks the files' numerics under it too.
    """

    name: str
    requires: tuple[str, ...]
    weight_bits: int
    march: str
    simdlen: int
    onednn_isa: str

    @property
    def weight_range(self) -> tuple[int, int]:
        """``(quant_min, quant_max)`` of int8 weights for this target."""
        half = 2 ** (self.weight_bits - 1)
        return -half, half - 1

    @property
    def bf16(self) -> bool:
        """Every CPU of this target computes bfloat16 natively (AVX-512 BF16 or AMX-BF16). Elsewhere oneDNN emulates
        bf16 or falls back to reference kernels, slower than float32: a bf16 file is only fast for such a target."""
        return bool({"avx512_bf16", "amx_bf16"} & set(self.requires))

    @property
    def inductor_configs(self) -> dict[str, Any]:
        """AOTInductor options that compile for this target rather than for the building machine."""
        return {"cpp.march": self.march, "cpp.simdlen": self.simdlen}

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "requires": list(self.requires), "weight_range": list(self.weight_range)}


TARGETS: dict[str, CpuTarget] = {
    "avx2": CpuTarget("avx2", ("avx2", "fma"), 7, "x86-64-v3", 256, "AVX2"),
    "avx512_vnni": CpuTarget(
        "avx512_vnni",
        ("avx2", "fma", "avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni"),
        8,
        "x86-64-v4",
        512,
        "AVX512_CORE_VNNI",
    ),
    "avx512_bf16": CpuTarget(
        "avx512_bf16",
        ("avx2", "fma", "avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni", "avx512_bf16"),
        8,
        "x86-64-v4",
        512,
        "AVX512_CORE_BF16",
    ),
    "amx": CpuTarget(
        "amx",
        (
            *("avx2", "fma", "avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni", "avx512_bf16"),
            *("amx_tile", "amx_int8", "amx_bf16"),
        ),
        8,
        "sapphirerapids",
        512,
        "AVX512_CORE_AMX",
    ),
}
TARGET_NAMES = (*TARGETS, "native")
DEFAULT_TARGET = "avx2"


def check_target_name(name: Any) -> None:
    """Refuse an unknown target name, listing the allowed ones."""
    if not isinstance(name, str) or name not in TARGET_NAMES:
        raise ValueError(
            f"Unknown target {name!r}; choose one of {list(TARGET_NAMES)}: 'avx2' (default) runs on any x86-64 CPU "
            "with AVX2, 'avx512_vnni'/'avx512_bf16'/'amx' only on CPUs with those instructions, 'native' is this "
            "CPU's best."
        )


def resolve_target(target: Union[str, CpuTarget]) -> CpuTarget:
    """The :class:`CpuTarget` for a name; ``"native"`` is the widest target this CPU runs."""
    if isinstance(target, CpuTarget):
        return target
    check_target_name(target)
    if target != "native":
        return TARGETS[target]
    if not flags_known():
        raise ValueError(
            "target='native': this CPU's instruction sets could not be read (no flags in /proc/cpuinfo, no CPUID "
            "answer from torch), so there is no 'native' to build for; pass target='avx2' (any x86-64 CPU with AVX2)."
        )
    flags = set(cpu_info()["flags"])
    runnable = [t for t in TARGETS.values() if set(t.requires) <= flags]
    if not runnable:
        raise ValueError(
            f"target='native': this CPU ({cpu_info()['model']}) has none of the x86 ISAs lightning-quant "
            f"builds int8 files for ({list(TARGETS)}); it needs at least AVX2 and FMA."
        )
    return runnable[-1]


@functools.cache
def cpu_info() -> dict[str, Any]:
    """This machine's CPU: ``vendor``, ``model`` and the :data:`ISA_FLAGS` it has.

    The flags come from CPUID (PyTorch's probes, what the code will run on) for every instruction set it answers
    for, and from ``/proc/cpuinfo`` for the rest: under an emulator (``qemu-x86_64 -cpu Haswell``) and in some VMs
    ``/proc/cpuinfo`` lists the host's flags, not the CPU the code executes on."""
    fields: dict[str, str] = {}
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("vendor_id", "model name", "flags") and key not in fields:
                fields[key] = value.strip()
    listed, probed = set(fields.get("flags", "").split()), _cpuid_flags()
    if probed:
        flags = probed | {flag for flag in listed if flag not in _CPUID_FLAGS}
        source = "cpuid (torch.cpu)" + (" and /proc/cpuinfo" if listed else "")
    else:
        flags, source = listed, "/proc/cpuinfo" if listed else "unknown"
    return {
        "vendor": fields.get("vendor_id", platform.processor() or "unknown"),
        "model": fields.get("model name", platform.machine()),
        "architecture": platform.machine(),
        "flags": [flag for flag in ISA_FLAGS if flag in flags],
        "flags_source": source,
    }


# PyTorch's CPUID probes and the flags each one answers for (AVX-512: F, BW, DQ and VL together; every AVX2 CPU
# has FMA, every AMX-tile CPU AMX-INT8 and AMX-BF16)
_CPUID_PROBES = {
    "_is_avx2_supported": ("avx2", "fma"),
    "_is_avx512_supported": ("avx512f", "avx512bw", "avx512dq", "avx512vl"),
    "_is_vnni_supported": ("avx512_vnni",),
    "_is_avx512_bf16_supported": ("avx512_bf16",),
    "_is_amx_tile_supported": ("amx_tile", "amx_int8", "amx_bf16"),
}
_CPUID_FLAGS = {flag for flags in _CPUID_PROBES.values() for flag in flags}


def _cpuid_flags() -> set[str]:
    """The :data:`ISA_FLAGS` PyTorch's CPUID probes report (empty if it has none)."""
    import torch

    found: set[str] = set()
    for probe, flags in _CPUID_PROBES.items():
        try:
            if getattr(torch.cpu, probe)():
                found.update(flags)
        except (AttributeError, RuntimeError):  # a torch build without the probe
            continue
    return found


def flags_known(cpu: Optional[dict[str, Any]] = None) -> bool:
    """False when neither /proc/cpuinfo nor CPUID told which instructions the CPU has."""
    return (cpu or cpu_info()).get("flags_source", "/proc/cpuinfo") != "unknown"


def missing_flags(target: Union[str, CpuTarget], cpu: Optional[dict[str, Any]] = None) -> list[str]:
    """The flags ``target`` requires that ``cpu`` (default: this machine) lacks; empty if it can run the files, or
    if the CPU's flags could not be read (then nothing is known to be missing: the files are still verified by
    running them here)."""
    cpu = cpu or cpu_info()
    if not flags_known(cpu):
        return []
    return [flag for flag in resolve_target(target).requires if flag not in set(cpu["flags"])]


def check_runs_here(target: Union[str, CpuTarget], what: str, fix: str) -> None:
    """Raise ``RuntimeError`` naming ``what``, the missing flags and ``fix`` if this CPU cannot run ``target``."""
    missing = missing_flags(target)
    if missing:
        cpu = cpu_info()
        raise RuntimeError(
            f"{what} is made for target {resolve_target(target).name!r}, which needs CPU flags "
            f"{list(resolve_target(target).requires)}; this CPU ({cpu['model']}) lacks {missing}. {fix}"
        )


def emulates_narrower_isa(target: CpuTarget) -> bool:
    """True when this CPU has more than ``target`` (e.g. VNNI for an ``"avx2"`` target), so oneDNN's numerics
    for the target differ from this machine's and are checked under ``ONEDNN_MAX_CPU_ISA``."""
    if not flags_known():
        return True  # maybe wider: check under the target's ISA too (a cap above what the CPU has changes nothing)
    have = set(cpu_info()["flags"])
    wider = {flag for t in TARGETS.values() for flag in t.requires} - set(target.requires)
    return bool(have & wider)
