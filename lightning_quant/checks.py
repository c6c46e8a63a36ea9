"""Argument checks the callbacks and :func:`~lightning_quant.deploy` share, so both refuse the same mistakes with the
same messages, before any work: each names the problem and the fix.

Example::

    >>> check_formats(None, ("aoti", "onnx", "torch_export"), ("aoti", "onnx"), "deploy")
    ['aoti', 'onnx']
    >>> check_formats("onnx", ("aoti", "onnx"), ("aoti", "onnx"), "deploy")
    Traceback (most recent call last):
    ...
    TypeError: deploy: formats must be a list of strings from ['aoti', 'onnx'], got 'onnx' (a list: ['onnx'])
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from lightning_quant.inputs import ModelInputs, check_finite
from lightning_quant.target import check_runs_here, check_target_name


def check_formats(
    formats: Optional[Sequence[str]], supported: Sequence[str], default: Sequence[str], owner: str
) -> list[str]:
    """``formats`` as a list (for ``None``: the ``default`` ones installed here): strings from ``supported``, at least
    one, none twice, each with its optional package installed."""
    if isinstance(formats, str) or (formats is not None and not all(isinstance(f, str) for f in formats)):
        hint = f" (a list: {[formats]})" if isinstance(formats, str) else ""
        raise TypeError(f"{owner}: formats must be a list of strings from {list(supported)}, got {formats!r}{hint}")
    from lightning_quant.export.formats import get_format, installed

    chosen = list(installed(default) if formats is None else formats)
    unknown = [f for f in chosen if f not in supported]
    if unknown:
        raise ValueError(f"{owner} cannot export format(s) {unknown}; choose from {list(supported)}")
    for name in chosen:
        required = get_format(name).requires
        if required is not None and not get_format(name).installed:
            raise ValueError(
                f"{owner}: format {name!r} needs the {required[0]} package, which is not installed: "
                f'pip install "lightning-quant[{required[1]}]", or leave {name!r} out of formats'
            )
    if not chosen:
        raise ValueError(
            f"formats is empty: {owner} would export nothing; list at least one of {list(supported)} "
            f"(or leave formats out for {list(default)})"
        )
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"{owner}: formats lists a format twice: {chosen}")
    return chosen


def check_target(target: Any, owner: str) -> None:
    """A known target name, whose instructions this CPU has (its files are verified by running them here)."""
    check_target_name(target)
    check_runs_here(
        target,
        f"{owner}(target={target!r})",
        "Its files are verified by running them here: build them on such a CPU, or choose "
        "target='avx2' (runs on any x86-64 CPU with AVX2).",
    )


def check_keep_float_names(model: nn.Module, keep_float: Sequence[str], owner: str) -> None:
    """Every name in ``keep_float`` is a module of ``model`` (a typo would quietly quantize the layer)."""
    names = dict(model.named_modules())
    missing = [name for name in keep_float if name not in names]
    if missing:
        options = ", ".join(n for n in names if n) or "(none)"
        raise ValueError(
            f"{owner}: keep_float names modules that {type(model).__name__} does not have: {missing}. "
            f"Its modules are: {options}"
        )


def check_example(model: nn.Module, inputs: ModelInputs, owner: str, argument: str) -> None:
    """The example input is finite and ``model`` runs on it (eval mode, no grad, mode restored): a wrong shape or
    dtype (int64 where forward needs float) fails here, naming ``argument`` (how the user passes the example)."""
    check_finite(inputs, f"{owner}: the example input")
    was_training = model.training
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    try:
        with torch.no_grad():
            model.eval()
            inputs.to(device)(model)
    except Exception as err:
        described = inputs.describe()
        raise ValueError(
            f"{owner}: {type(model).__name__}.forward fails on the example input (shape {described.get('shape')}, "
            f"dtype {described.get('dtype')}): {type(err).__name__}: {err}. Pass {argument} a batch of the shape "
            "and dtype forward takes."
        ) from err
    finally:
        model.train(was_training)


def check_same_call(batch: ModelInputs, example: ModelInputs, what: str) -> None:
    """``batch`` is the call ``example`` is, at any batch size: the same arguments, each tensor with the same dtype
    and the same shape past the batch dimension (what the exported files accept)."""

    def call(inputs: ModelInputs) -> tuple[Any, list[tuple[torch.dtype, tuple[int, ...]]]]:
        return inputs.form(), [(t.dtype, tuple(t.shape[1:])) for t in inputs.tensors()]

    if call(batch) != call(example):

        def described(inputs: ModelInputs) -> list[str]:
            return [f"{t['name']}: {t['dtype']} {t['shape']}" for t in inputs.describe()["tensors"]]

        raise ValueError(
            f"{what} is not the call the example input is: {described(batch)}, the example {described(example)}. "
            "Pass batches of what forward takes, as the example (any batch size)."
        )


def check_writable(dirpath: Path, owner: str) -> None:
    """The files could be written: create ``dirpath`` and a file in it."""
    try:
        Path(dirpath).mkdir(parents=True, exist_ok=True)
        probe = Path(dirpath) / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ValueError(
            f"{owner} cannot write into dirpath {str(dirpath)!r} ({type(err).__name__}: {err.strerror or err}): "
            "pass a writable dirpath= (or fix the directory's permissions)."
        ) from err
