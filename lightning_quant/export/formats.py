"""One frozen :class:`Format` per export format, in one table: what ``export``, ``verify``, ``load`` and the CLI
need to know about a format is read from here, not from comparisons of its name.

Example::

    >>> FORMATS_BY_NAME["openvino"].files(Path("out/model_openvino.xml"))
    [PosixPath('out/model_openvino.xml'), PosixPath('out/model_openvino.bin')]
    >>> format_of(Path("any/model.onnx")).name
    'onnx'
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from lightning_quant.export import aoti, onnx, openvino, torch_export, torchao_checkpoint, torchscript


@dataclass(frozen=True)
class Format:
    """An export format.

    Attributes:
        name: what ``formats=[...]`` and the manifest call it.
        filename: the file written into the export directory.
        export: ``export(model, inputs, path, dynamic_batch, **options) -> details``.
        load: ``load(path) -> callable`` taking the model's inputs.
        runtime: what runs the file (for messages and the README).
        takes_target: the export takes the CPU target (compiles for its ISA, or holds weights in its range).
        from_float_model: made from the float model when the approach re-quantizes it with ONNX Runtime (its
            numbers are then compared with the float model, not the converted one).
        onednn_isa_switch: its kernels obey ``ONEDNN_MAX_CPU_ISA``, so a narrower target's kernels can be run
            here; files without it are checked for the target's int8 weight range instead.
        runs_in_own_threads: the runtime has its own thread pool (run it after PyTorch's formats in one process:
            both busy at once slow each other down).
        unpickled: read by unpickling (tensors only): what ``inspect`` reads to find a file ``load`` would refuse.
        int8_weight_range: ``(low, high)`` of the file's int8 weights, for formats without an ISA switch.
        weights_suffix: a second file beside the first holding the weights (OpenVINO's ``.bin``), if any.
        suffixes: file name endings the CLI recognises as this format when no manifest says.
        requires: the optional package its export and load need, with the extra that installs it.
        converted_from: a format whose file this one is converted from: exported in the same call, that file is
            passed on (``source_file``, ``source_details``) instead of being made a second time.
        takes_dtype: its runtime picks the precision of the float parts when it loads the file (OpenVINO): the
            export takes the ``dtype`` the model computes in and records it in the file for the loader.
    """

    name: str
    filename: str
    export: Callable[..., dict[str, Any]]
    load: Callable[[Path], Any]
    runtime: str
    takes_target: bool = False
    from_float_model: bool = False
    onednn_isa_switch: bool = True
    runs_in_own_threads: bool = False
    unpickled: bool = False
    int8_weight_range: Optional[Callable[[Path], Optional[tuple[int, int]]]] = None
    weights_suffix: Optional[str] = None
    suffixes: tuple[str, ...] = ()
    requires: Optional[tuple[str, str]] = None  # (module, pip extra)
    converted_from: Optional[str] = None
    takes_dtype: bool = False

    @property
    def installed(self) -> bool:
        """Whether its optional package (if any) can be imported here."""
        return self.requires is None or importlib.util.find_spec(self.requires[0]) is not None

    def files(self, path: Path) -> list[Path]:
        """The file at ``path`` and the weights file beside it, if the format has one."""
        return [path] + ([path.with_suffix(self.weights_suffix)] if self.weights_suffix else [])


FORMAT_TABLE: tuple[Format, ...] = (
    Format(
        "aoti",
        "model_aoti" + aoti.SUFFIX,
        aoti.export_aoti,
        aoti.load_aoti,
        runtime="AOTInductor (torch._inductor.aoti_load_package)",
        takes_target=True,
    ),
    Format(
        "onnx",
        "model" + onnx.SUFFIX,
        onnx.export_onnx,
        onnx.load_onnx,
        runtime="ONNX Runtime",
        takes_target=True,
        from_float_model=True,
        onednn_isa_switch=False,
        runs_in_own_threads=True,
        int8_weight_range=onnx.int8_weight_range,
        suffixes=(onnx.SUFFIX,),
    ),
    Format(
        "openvino",
        "model_openvino" + openvino.SUFFIX,
        openvino.export_openvino,
        openvino.load_openvino,
        runtime="OpenVINO",
        takes_target=True,
        from_float_model=True,
        onednn_isa_switch=False,
        runs_in_own_threads=True,
        int8_weight_range=openvino.int8_weight_range,
        weights_suffix=openvino.WEIGHTS_SUFFIX,
        suffixes=(openvino.SUFFIX,),
        requires=("openvino", "openvino"),
        takes_dtype=True,
        converted_from="onnx",
    ),
    Format(
        "torch_export",
        "model_program" + torch_export.SUFFIX,
        torch_export.export_program,
        torch_export.load_program,
        runtime="torch.export.load(...).module() (eager PyTorch)",
        unpickled=True,
    ),
    Format(
        "torchscript",
        "model" + torchscript.SUFFIX,
        torchscript.export_torchscript,
        torchscript.load_torchscript,
        runtime="TorchScript (legacy)",
        suffixes=(torchscript.SUFFIX, ".torchscript"),
    ),
    Format(
        "torchao",
        "model_torchao" + torchao_checkpoint.SUFFIX,
        torchao_checkpoint.export_torchao,
        torchao_checkpoint.load_torchao,
        runtime="torchao (eager PyTorch with torchao tensors)",
        unpickled=True,
    ),
)
FORMATS_BY_NAME: dict[str, Format] = {f.name: f for f in FORMAT_TABLE}
FORMATS: tuple[str, ...] = tuple(FORMATS_BY_NAME)


def get_format(name: str) -> Format:
    """The :class:`Format` called ``name``; ``ValueError`` naming the choices otherwise."""
    if name not in FORMATS_BY_NAME:
        raise ValueError(f"Unknown export format {name!r}; choose from {list(FORMATS)}")
    return FORMATS_BY_NAME[name]


def installed(names: Sequence[str]) -> tuple[str, ...]:
    """The formats of ``names`` whose optional package is installed here (defaults leave the others out)."""
    return tuple(name for name in names if get_format(name).installed)


def format_of(path: Path) -> Optional[Format]:
    """The format a file's name says (its exact export file name, else its suffix); ``None`` if it says none."""
    for candidate in FORMAT_TABLE:
        if path.name == candidate.filename:
            return candidate
    for candidate in FORMAT_TABLE:
        if path.suffix in candidate.suffixes:
            return candidate
    return None
