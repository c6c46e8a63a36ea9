"""``"torch_export"``: the ``torch.export`` program, saved with ``torch.export.save``.

This is the portable, unlowered program: loaded and run eagerly it executes the q/dq reference graph
(slower than float for static int8). Lower it with AOTInductor (freezing) or ``torch.compile`` to deploy.
Weight-only programs are saved with ``weight_only_linear`` decomposed into core ATen ops (unpack, scale, matmul
on the packed uint8 constants), so plain ``torch.export.load`` runs them without this package; the custom op
ran no faster there (it runs the same ops: 0.53 vs 0.56 ms, a 2-layer int4 MLP, within noise), and its fast
kernel is ONNX Runtime's ``MatMulNBits``, which the ONNX file keeps.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import nn

from lightning_quant.capture import capture
from lightning_quant.files import atomic_write
from lightning_quant.inputs import ModelInputs
from lightning_quant.weight_packing import decompose

SUFFIX = ".pt2"


def export_program(model: nn.Module, inputs: ModelInputs, path: Path, dynamic_batch: bool = True) -> dict[str, Any]:
    captured = capture(model, inputs, dynamic_batch)
    program = decompose(captured.program, core_aten=False)  # ATen ops only: loads with plain torch
    # torch.export.save stores the example inputs too (a language model's cache: megabytes); nothing reads them
    program.example_inputs = None
    buffer = io.BytesIO()  # torch.export.save to a path aborts the process if the disk fills mid-write
    torch.export.save(program, buffer)
    atomic_write(path, buffer.getvalue())
    return {
        "how": "torch.export -> torch.export.save (unlowered program)",
        "load": "torch.export.load(path).module()(*args, **kwargs)",
        **captured.details(),
    }


def load_program(path: Path) -> Any:
    """The program's module, read without unpickling anything but tensors (:func:`tensors_only`)."""
    import lightning_quant.quantization  # noqa: F401  (registers torchao's tensor types, which programs may hold)

    with tensors_only(path):
        return torch.export.load(str(path)).module()


@contextlib.contextmanager
def tensors_only(path: Path) -> Iterator[None]:
    """While a ``.pt2`` archive loads (a program, or an AOTInductor package: one reader), unpickle nothing but tensors.
    The reader reads weights that are tensor subclasses (torchao's) with ``torch.load(weights_only=False)`` and
    opaque constants with ``pickle.loads``: a crafted file runs any code it holds through either. torch's own switch forces every
    ``torch.load`` to ``weights_only=True`` (torchao's tensor types are allowed globals); opaque constants are
    refused (this package's programs have none).

    Raises:
        ValueError: naming ``path``, when the file holds a Python object other than tensors.
    """
    from torch.export.pt2_archive import _package

    class _NoPickle:
        @staticmethod
        def loads(data: bytes, **kwargs: Any) -> NoReturn:
            raise ValueError(
                f"Refusing to load {path}: it holds a pickled Python object (an opaque constant), which could run "
                "code when read. lightning-quant's programs hold only tensors; export the file again."
            )

    forced, python_pickle = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD"), _package.pickle
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    _package.pickle = _NoPickle  # type: ignore[assignment]  # its one use is pickle.loads of opaque constants
    try:
        yield
    except pickle.UnpicklingError as err:  # a weights-only load met a global that is not a tensor type
        refused = re.search(r"WeightsUnpickler error:\s*(.+?)(?: Please use|\n|$)", str(err))
        raise ValueError(
            f"Refusing to load {path}: it holds Python objects other than tensors "
            f"({refused.group(1) if refused else 'not a weights-only pickle'}), which could run code when "
            "unpickled. Export the file again (files from an older lightning-quant may hold pickled modules)."
        ) from err
    finally:
        _package.pickle = python_pickle
        if forced is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = forced
