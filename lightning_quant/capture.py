"""``capture``: the one ``torch.export`` call that quantization and every export format share.

Models users bring are not always capturable as written. ``capture`` tries what a careful engineer would, in order,
and records each step it took in ``Capture.notes`` (the manifest shows them):

1. ``torch.export.export(strict=False)`` with one dynamic batch dimension (:func:`batch_dynamic_shapes`); an
   example of batch 1 is captured as two copies of it (export treats a dimension of size 1 as a constant).
2. A branch on a tensor's value (``if bool(mask.all())``; ``nn.Transformer`` checks its mask this way) cannot
   be traced. The model runs once on the example, records the value each such branch took, and is captured
   again with those values; the file checks at run time that the branch goes the same way (it raises if not).
3. A model whose code fixes the batch size (a ``view(4, ...)``) cannot take a dynamic batch: captured again
   with the example's batch size, which the files then require.

What still fails raises :class:`CaptureError`: one paragraph naming the line that blocks it, with the whole of
torch's report (FX graphs can run to a thousand lines) in ``error.report``.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import inspect
import io
import linecache
import logging
import os
import sys
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch.export import Dim
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode
from torch.utils._pytree import tree_map

from lightning_quant.errors import QuantizationError, first_lines
from lightning_quant.inputs import ModelInputs

Site = tuple[str, int]
NOTES_KEY = "lightning_quant.capture_notes"  # in the ``meta`` of a graph module made from a capture  # (file, line) of a branch on a tensor's value


@dataclass(frozen=True)
class Capture:
    """A captured ``program`` and what was changed to capture it (empty when the model exported as written)."""

    program: torch.export.ExportedProgram
    notes: tuple[str, ...] = ()
    dynamic_batch: bool = True

    def details(self) -> dict[str, Any]:
        """What an exported file's manifest entry says about its capture (nothing when it was plain)."""
        return {
            **({"capture": list(self.notes)} if self.notes else {}),
            **({} if self.dynamic_batch else {"dynamic_batch": False}),
        }


class CaptureError(QuantizationError):
    """``torch.export`` could not capture the model; ``report`` holds torch's full message and traceback."""

    def __init__(self, message: str, report: str) -> None:
        super().__init__(message)
        self.report = report


def capture(model: Any, inputs: ModelInputs, dynamic_batch: bool = True) -> Capture:
    """``torch.export`` ``model`` on ``inputs``, with a dynamic batch unless ``dynamic_batch`` is off or the model
    pins it (see the module docstring for the fallbacks).

    Example::

        >>> net = torch.nn.Linear(3, 2)
        >>> captured = capture(net, ModelInputs.from_value(torch.zeros(4, 3)))
        >>> captured.program.module()(torch.ones(7, 3)).shape, captured.notes
        (torch.Size([7, 2]), ())
    """
    model = keywords_as_parameters(model, inputs)
    shapes = batch_dynamic_shapes(model, inputs, dynamic_batch)
    example = inputs
    if shapes is not None and inputs.batch_size() == 1:
        # export treats a dimension of size 1 as a constant: captured on two copies, the program takes any batch
        inputs = inputs.doubled()
    # a graph captured before (PT2E quantization) keeps what was changed then; its files say so too
    notes: list[str] = list(getattr(model, "meta", {}).get(NOTES_KEY, ()))
    branches: Optional[dict[Site, list[bool]]] = None
    while True:
        used: collections.Counter[Site] = collections.Counter()
        # torch.export prints the partial FX graph of a failed attempt to stderr (hundreds of lines on a
        # transformer), also for the attempts the fallbacks below recover from: kept for the error's report
        printed = io.StringIO()
        try:
            with _branches_as_recorded(branches, used), _quiet_shape_log(), contextlib.redirect_stderr(printed):
                program = torch.export.export(model, inputs.args, inputs.kwargs, dynamic_shapes=shapes, strict=False)
        except Exception as err:
            if branches is None and _data_dependent(err):
                branches = _record_branches(model, inputs)
                if branches:
                    continue
            if shapes is not None and _batch_pinned(err):
                shapes, inputs = None, example
                notes.append(
                    f"the batch size is fixed to {inputs.batch_size()} (the example's): the model's code "
                    f"pins it ({_pinning_reason(err)})"
                )
                continue
            raise _capture_error(model, err, printed.getvalue()) from err
        sys.stderr.write(printed.getvalue())  # what a successful capture printed (warnings) still shows
        notes[:0] = [_branch_note(site, branches) for site in sorted(used) if branches and site in branches]
        return Capture(program, tuple(dict.fromkeys(notes)), dynamic_batch=shapes is not None)


def keywords_as_parameters(model: Any, inputs: ModelInputs) -> Any:
    """``model`` itself, or, when its ``forward`` takes ``**kwargs`` and ``inputs`` passes keywords through them
    (``forward(self, **inputs)`` around a Hugging Face model), a module calling it whose ``forward`` names those
    keywords as parameters: ``torch.export`` cannot bind a call to ``**kwargs``, and the files then take the
    example's keywords by name (an ONNX file's input names).

    Example::

        >>> class Wrapper(torch.nn.Module):
        ...     def forward(self, **inputs):
        ...         return inputs["x"] * 2
        >>> call = ModelInputs((), {"x": torch.ones(2)})
        >>> inspect.signature(keywords_as_parameters(Wrapper(), call).forward)
        <Signature (*, x)>
    """
    forward = model.forward if hasattr(model, "forward") else model
    try:
        parameters = list(inspect.signature(forward).parameters.values())
    except (TypeError, ValueError):
        return model
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return model
    named = {p.name for p in parameters}
    extra = [name for name in inputs.kwargs if name not in named]
    if not extra:
        return model
    kept = [p for p in parameters if p.kind is not inspect.Parameter.VAR_KEYWORD]
    keyword_only = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY) for name in extra]
    return _NamedKeywords(model, inspect.Signature(kept + keyword_only))


class _NamedKeywords(torch.nn.Module):
    """Calls ``model``; ``inspect.signature(self.forward)`` is ``signature`` (the keywords it is called with)."""

    def __init__(self, model: Any, signature: inspect.Signature) -> None:
        super().__init__()
        self.model = model

        def forward(*args: Any, **kwargs: Any) -> Any:
            return model(*args, **kwargs)

        forward.__signature__ = signature  # type: ignore[attr-defined]  # read by inspect.signature
        self.forward = forward


def batch_dynamic_shapes(model: Any, inputs: ModelInputs, dynamic_batch: bool = True) -> dict[str, Any] | None:
    """``dynamic_shapes`` for ``torch.export.export(model, inputs.args, inputs.kwargs, ...)``.

    Dimension 0 of every tensor whose leading size equals the batch size is one shared ``Dim("batch")``;
    other tensors and non-tensor arguments stay static. ``None`` when ``dynamic_batch`` is off.
    (``torch.export`` treats a size-1 dimension as constant, so the example's batch should be 2 or more.)
    """
    batch_size = inputs.batch_size()
    if not dynamic_batch or batch_size is None:
        return None
    batch = Dim("batch")

    def spec(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch_size:
            return {0: batch}
        return None

    forward = model.forward if hasattr(model, "forward") else model
    arguments = inspect.signature(forward).bind(*inputs.args, **inputs.kwargs).arguments
    return {name: tree_map(spec, value) for name, value in arguments.items()}


_tensor_bool = torch.Tensor.__bool__


def _record_branches(model: Any, inputs: ModelInputs) -> dict[Site, list[bool]]:
    """Per line, the values ``bool(tensor)`` took there (in call order) when a copy of ``model`` ran eagerly on
    ``inputs``. Raises :class:`CaptureError` naming a line whose value changes on other inputs (the example's
    floats shifted up and down, its integers shuffled along the batch): that branch really depends on the data.
    """
    model = copy.deepcopy(model)  # the runs must not move its BatchNorm statistics
    runs = [_branch_values(model, inputs)]
    for variant in _variants(inputs):
        with contextlib.suppress(Exception):  # an input the model rejects tells nothing
            runs.append(_branch_values(model, variant))
    for site, values in runs[0].items():
        if any(run.get(site, values) != values for run in runs[1:]):
            raise CaptureError(
                f"torch.export could not capture {type(model).__name__}.forward: the branch at {_where(site)} "
                "depends on the input's values (it goes both ways on different inputs). Compute both sides with "
                "tensor ops (torch.where) or use torch.cond.",
                report="",
            )
    return runs[0]


def _branch_values(model: Any, inputs: ModelInputs) -> dict[Site, list[bool]]:
    values: dict[Site, list[bool]] = collections.defaultdict(list)

    def __bool__(self: torch.Tensor) -> bool:
        value = _tensor_bool(self)
        values[_caller()].append(value)
        return value

    torch.Tensor.__bool__ = __bool__  # type: ignore[method-assign,assignment]
    try:
        with torch.no_grad():
            inputs(model)
    finally:
        torch.Tensor.__bool__ = _tensor_bool  # type: ignore[method-assign]
    return dict(values)


def _variants(inputs: ModelInputs) -> list[ModelInputs]:
    def shifted(sign: int) -> Any:
        def change(t: torch.Tensor) -> torch.Tensor:
            if t.is_floating_point():
                return sign * (t.abs() + 1)
            if t.dtype != torch.bool and t.dim() > 0:
                return t.flip(0) if sign > 0 else t.roll(1, dims=-1)
            return t

        return change

    return [inputs.map(shifted(1)), inputs.map(shifted(-1))]


@contextlib.contextmanager
def _branches_as_recorded(
    branches: Optional[dict[Site, list[bool]]], used: collections.Counter[Site]
) -> Iterator[None]:
    """While tracing, a ``bool(tensor)`` that depends on data takes the value recorded at its line (n-th call,
    n-th value) and adds a run-time check that the tensor agrees; ``used`` counts the lines resolved this way."""
    if not branches:
        yield
        return
    calls: collections.Counter[Site] = collections.Counter()

    def __bool__(self: torch.Tensor) -> bool:
        site = _caller()
        index, calls[site] = calls[site], calls[site] + 1
        try:
            return _tensor_bool(self)
        except GuardOnDataDependentSymNode:
            recorded = branches.get(site, [])
            if index >= len(recorded):
                raise
            scalar = self.item()
            truth = scalar if self.dtype == torch.bool else scalar != 0
            torch._check(truth if recorded[index] else torch.sym_not(truth))
            used[site] += 1
            return recorded[index]

    torch.Tensor.__bool__ = __bool__  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        torch.Tensor.__bool__ = _tensor_bool  # type: ignore[method-assign]


@contextlib.contextmanager
def _quiet_shape_log() -> Iterator[None]:
    """torch logs the FX graph traced so far when a guard fails (hundreds of lines on a transformer): that text
    belongs in the error's report, not on the console."""
    logger = logging.getLogger("torch.fx.experimental.symbolic_shapes")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _caller() -> Site:
    frame = sys._getframe(2)
    return frame.f_code.co_filename, frame.f_lineno


def _branch_note(site: Site, branches: dict[Site, list[bool]]) -> str:
    values = sorted(set(branches[site]))
    return (
        f"the branch at {_where(site)} depends on tensor values: it takes the value it took on the example "
        f"({' / '.join(map(str, values))}), and the file checks this when it runs"
    )


def _where(site: Site) -> str:
    file, line = site
    code = linecache.getline(file, line).strip()
    relative = os.path.relpath(file)
    short = relative if not relative.startswith("..") else "/".join(Path(file).parts[-3:])
    return f"{short}:{line}" + (f" `{code}`" if code else "")


def _data_dependent(err: BaseException) -> bool:
    return isinstance(err, GuardOnDataDependentSymNode) or "data-dependent expression" in str(err)


def _batch_pinned(err: BaseException) -> bool:
    return "Constraints violated" in str(err) or "specialized it to be a constant" in str(err)


def _pinning_reason(err: BaseException) -> str:
    lines = [line.strip(" -") for line in str(err).splitlines()]
    return next(
        (line for line in lines if "specialized" in line or "Not all values" in line), lines[0] if lines else ""
    )


def _capture_error(model: Any, err: BaseException, printed: str = "") -> CaptureError:
    report = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    if printed:
        report += f"\ntorch.export printed:\n{printed}"
    cause = first_lines(err, 1)
    blocking = _blocking_line(err)
    if _data_dependent(err):
        fix = (
            "A branch on a tensor's value that changes with the input cannot be exported: compute both sides "
            "with tensor ops (torch.where) or use torch.cond."
        )
    else:
        fix = "Rewrite that line with tensor ops torch.export supports."
    where = f" at {blocking}" if blocking else ""
    return CaptureError(
        f"torch.export could not capture {type(model).__name__}.forward{where}: {type(err).__name__}: {cause} {fix}",
        report,
    )


def _blocking_line(err: BaseException) -> Optional[str]:
    """The innermost frame of the traceback outside torch's tracing machinery (often the user's line)."""
    frames = traceback.extract_tb(err.__traceback__)
    internal = ("/torch/_", "/torch/export/", "/torch/fx/", "/torch/utils/", "/lightning_quant/", "contextlib.py")
    outside = [f for f in frames if not any(part in f.filename for part in internal)]
    if not outside:
        return None
    frame = outside[-1]
    return _where((frame.filename, frame.lineno or 0))
