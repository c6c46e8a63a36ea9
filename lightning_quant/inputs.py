"""Model inputs as ``(args, kwargs)``: one form for export, calibration, verification and timing.

A model's example input follows Lightning's ``example_input_array`` convention: a tensor is one positional
argument, a tuple/list is several positional arguments, a dict is keyword arguments.
:meth:`ModelInputs.bind` puts any call into the one canonical form ``forward``'s signature defines
(positional-or-keyword parameters positional, keyword-only ones as keywords), so an export traced from
``model(x, y=t)`` also serves ``model(x, t)``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch.utils._pytree import tree_flatten, tree_map


class ModelInputs(NamedTuple):
    """The positional and keyword arguments of one call to a model's ``forward``."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    @classmethod
    def from_value(cls, value: Any) -> ModelInputs:
        """Read Lightning's convention: tensor -> one argument, tuple/list -> several, dict -> keywords.

        Example::

            >>> ModelInputs.from_value(torch.zeros(2, 3)).args[0].shape
            torch.Size([2, 3])
            >>> sorted(ModelInputs.from_value({"x": torch.zeros(2), "scale": 2.0}).kwargs)
            ['scale', 'x']
        """
        if isinstance(value, ModelInputs):
            return value
        if isinstance(value, dict):
            return cls((), dict(value))
        if isinstance(value, (tuple, list)):
            return cls(tuple(value), {})
        return cls((value,), {})

    def bind(self, forward: Callable[..., Any]) -> ModelInputs:
        """The canonical form of this call for ``forward`` (a bound method or function); defaults applied."""
        try:
            signature = inspect.signature(forward)
        except (TypeError, ValueError):  # builtins without a signature: keep the call as given
            return self
        bound = signature.bind(*self.args, **self.kwargs)
        bound.apply_defaults()
        # bound.args/kwargs leave *args/**kwargs parameters in place, which is the call forward accepts
        return ModelInputs(tuple(bound.args), dict(bound.kwargs))

    def matching(self, forward: Callable[..., Any], example: ModelInputs | None = None) -> ModelInputs:
        """These inputs without the keywords ``forward`` has no parameter for (a dict batch's ``labels``, ids,
        metadata). A ``forward`` that takes ``**kwargs`` keeps them all, or, given the ``example`` call the files
        serve, its named parameters and the example's keywords.

        Example::

            >>> def forward(input_ids, attention_mask=None): ...
            >>> sorted(ModelInputs((), {"input_ids": 1, "attention_mask": 2, "labels": 3}).matching(forward).kwargs)
            ['attention_mask', 'input_ids']
            >>> def forward(**inputs): ...
            >>> example = ModelInputs((), {"input_ids": 0})
            >>> sorted(ModelInputs((), {"input_ids": 1, "labels": 3}).matching(forward, example).kwargs)
            ['input_ids']
        """
        try:
            parameters = inspect.signature(forward).parameters
        except (TypeError, ValueError):
            return self
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
            if example is None:
                return self
            accepted = set(parameters) | set(example.kwargs)
        else:
            accepted = set(parameters)
        return ModelInputs(self.args, {k: v for k, v in self.kwargs.items() if k in accepted})

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor in the call, in the order export flattens them."""
        return tensors_in((self.args, self.kwargs))

    def to(self, device: torch.device | str) -> ModelInputs:
        return self.map(lambda t: t.to(device))

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> ModelInputs:
        """Apply ``fn`` to every tensor, keeping everything else."""
        args, kwargs = tree_map(lambda v: fn(v) if isinstance(v, torch.Tensor) else v, (self.args, self.kwargs))
        return ModelInputs(tuple(args), dict(kwargs))

    def doubled(self) -> ModelInputs:
        """The same call with twice the batch: every tensor whose leading dimension is the batch, repeated.

        Example::

            >>> call = ModelInputs((torch.ones(1, 3), torch.tensor(5)), {})
            >>> [tuple(t.shape) for t in call.doubled().tensors()]
            [(2, 3), ()]
        """
        batch = self.batch_size()
        return self.map(lambda t: torch.cat([t, t]) if t.dim() > 0 and t.shape[0] == batch else t)

    def form(self) -> Any:
        """The call's structure: where tensors are (``True``) and every other value passed (a flag, a scale).

        Example::

            >>> cache = (torch.zeros(1, 4), torch.zeros(1, 4))
            >>> ModelInputs((torch.zeros(2, 3), None), {}).form() == ModelInputs((torch.ones(5, 3), None), {}).form()
            True
            >>> ModelInputs((torch.zeros(2, 3), None), {}).form() == ModelInputs((torch.zeros(2, 3), cache), {}).form()
            False
            >>> ModelInputs((torch.zeros(2, 3), 0.5), {}).form() == ModelInputs((torch.zeros(2, 3), 1.0), {}).form()
            False
        """
        return tree_map(lambda value: True if isinstance(value, torch.Tensor) else value, (self.args, self.kwargs))

    def mismatch(self, example: ModelInputs) -> str | None:
        """How this call differs from ``example`` in what an exported file fixes: its structure and non-tensor
        values, each tensor's dtype and its shape after the batch dimension. ``None`` when it is the same call.

        Example::

            >>> example = ModelInputs((torch.zeros(4, 8), torch.zeros(4, 4)), {})
            >>> ModelInputs((torch.zeros(2, 8), torch.ones(2, 4)), {}).mismatch(example) is None
            True
            >>> ModelInputs((torch.zeros(2, 12), torch.ones(2)), {}).mismatch(example)
            'args[0] has shape [12] after the batch dimension, the example [8]'
        """
        if self.form() != example.form():
            return (
                f"it is another call of forward than the example ({self.describe_call()} vs {example.describe_call()})"
            )
        for (name, mine), (_, theirs) in zip(self.named_tensors(), example.named_tensors()):
            if mine.dtype != theirs.dtype:
                return f"{name} is {str(mine.dtype).replace('torch.', '')}, the example's {str(theirs.dtype).replace('torch.', '')}"
            if mine.dim() != theirs.dim() or mine.shape[1:] != theirs.shape[1:]:
                return (
                    f"{name} has shape {list(mine.shape[1:])} after the batch dimension, the example "
                    f"{list(theirs.shape[1:])}"
                )
        return None

    def named_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """Every tensor with a name saying where it is passed (``args[0]``, ``mask``, ``cache[1]``)."""
        named: list[tuple[str, torch.Tensor]] = []
        for name, value in [*((f"args[{i}]", a) for i, a in enumerate(self.args)), *self.kwargs.items()]:
            leaves, _ = tree_flatten(value)
            tensors = [t for t in leaves if isinstance(t, torch.Tensor)]
            named += [(name if len(leaves) == 1 else f"{name}[{j}]", t) for j, t in enumerate(tensors)]
        return named

    def describe_call(self) -> str:
        """``(args[0]: [8, 12] float32, ...)``: each argument's shape and dtype, or its value."""
        parts = [f"{name}: {list(t.shape)} {str(t.dtype).replace('torch.', '')}" for name, t in self.named_tensors()]
        others = tree_flatten(tree_map(lambda v: None if isinstance(v, torch.Tensor) else v, (self.args, self.kwargs)))[
            0
        ]
        parts += [repr(v) for v in others if v is not None]
        return "(" + ", ".join(parts) + ")"

    def batch_size(self) -> int | None:
        """The leading dimension of the first tensor (the batch), if there is one."""
        tensors = [t for t in self.tensors() if t.dim() > 0]
        return int(tensors[0].shape[0]) if tensors else None

    def describe(self) -> dict[str, Any]:
        """``shape`` and ``dtype`` of the first tensor, and every tensor by argument name, for the manifest."""
        described = [
            {"name": name, "shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")}
            for name, t in self.named_tensors()
        ]
        first: dict[str, Any] = described[0] if described else {"shape": [], "dtype": None}
        return {"shape": first["shape"], "dtype": first["dtype"], "tensors": described}

    def __call__(self, model: Callable[..., Any]) -> Any:
        """Call ``model`` with these inputs: ``inputs(model)``."""
        return model(*self.args, **self.kwargs)


def tensors_in(value: Any) -> list[torch.Tensor]:
    """Every tensor in ``value`` (a tensor, or tuples, lists, dicts and other pytrees holding tensors), in the
    order ``torch.export`` flattens them; everything else is skipped.

    Example::

        >>> [list(t.shape) for t in tensors_in((torch.zeros(2), {"mask": torch.ones(3), "label": "cat"}))]
        [[2], [3]]
    """
    leaves, _ = tree_flatten(value)
    return [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]


def example_inputs_for_export(value: Any, forward: Callable[..., Any]) -> ModelInputs:
    """``value`` (Lightning's convention) bound to ``forward``, on CPU, checked for export: it must fit
    ``forward`` and hold a tensor.

    Example::

        >>> def forward(x, scale=1.0): ...
        >>> example_inputs_for_export(torch.zeros(1, 3), forward)
        ModelInputs(args=(tensor([[0., 0., 0.]]), 1.0), kwargs={})
        >>> example_inputs_for_export({"y": torch.zeros(1, 3)}, forward)
        Traceback (most recent call last):
        ...
        ValueError: example_input does not match forward: missing a required argument: 'x'
    """
    name = getattr(forward, "__qualname__", "forward")
    try:
        inputs = ModelInputs.from_value(value).bind(forward)
    except TypeError as err:
        raise ValueError(f"example_input does not match {name}: {err}") from err
    if not inputs.tensors():
        raise ValueError("example_input holds no tensor; pass the tensors forward takes")
    check_finite(inputs, "example_input")  # the files are verified on it
    return inputs.to("cpu")


def finite(tensors: Sequence[torch.Tensor]) -> bool:
    """No NaN or inf in any floating-point tensor of ``tensors``."""
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point() or t.is_complex())


def check_finite(inputs: ModelInputs, what: str) -> None:
    """Refuse ``inputs`` holding NaN or inf: every output computed from them compares as NaN, checking nothing.

    Raises:
        ValueError: naming ``what`` and the tensor.
    """
    for index, tensor in enumerate(inputs.tensors()):
        if not finite([tensor]):
            raise ValueError(
                f"{what} holds NaN or inf (tensor {index}, shape {tuple(tensor.shape)}): calibration ranges and "
                "outputs computed from it would be NaN, checking nothing. Clean or clip the data (or drop those "
                "samples), or use finite values."
            )


def default_batch_to_input(batch: Any) -> Any:
    """The input part of a batch: ``batch[0]`` of a tuple/list ``(input, target, ...)``, else the batch itself
    (a dict batch is bound to ``forward`` by parameter name; keys it has no parameter for are dropped)."""
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise ValueError("got an empty batch; pass batch_to_input=... to say which part is the model input")
        return batch[0]
    return batch
