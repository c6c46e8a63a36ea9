"""Run a LightningModule's own step code (``validation_step``, ``training_step``) against another model, without
modifying the module: :func:`module_view`.

Example::

    >>> import torch
    >>> from lightning_quant.demo import DigitsClassifier, MLPNet
    >>> module = DigitsClassifier(MLPNet()).eval()
    >>> batch = (torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 3]))
    >>> view = module_view(module, lambda x: torch.zeros(len(x), 10))  # every class scores 0: loss log(10)
    >>> _ = view.validation_step(batch, 0)
    >>> sorted(view.logged)
    ['val/acc', 'val/loss']
    >>> round(float(view.logged["val/loss"][0][0]), 4)
    2.3026
    >>> "forward" in vars(module) or "log" in vars(module)  # the module itself is untouched
    False
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Optional

from lightning.pytorch import LightningModule

# attributes of the module's __dict__ the view does not take over: what it replaces, and torch.compile's call
_REPLACED = ("forward", "log", "log_dict", "_compiled_call_impl")
# dicts copied (shallow) so that registering a parameter, buffer or submodule on the view stays on the view
_OWN_DICTS = ("_parameters", "_buffers", "_modules")


class ModuleView(LightningModule):
    """What :func:`module_view` returns (the view's class derives from this and from the module's class)."""

    logged: dict[str, list[tuple[Any, Optional[int]]]]
    _view_model: Optional[Callable[..., Any]]
    _view_class: type[LightningModule]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._view_model is None:
            return self._view_class.forward(self, *args, **kwargs)
        return self._view_model(*args, **kwargs)

    def log(self, name: str, value: Any, *args: Any, batch_size: Optional[int] = None, **kwargs: Any) -> None:
        self.logged.setdefault(name, []).append((value, batch_size))

    def log_dict(  # type: ignore[override]  # any mapping (a MetricCollection is one)
        self, dictionary: Mapping[str, Any], *args: Any, batch_size: Optional[int] = None, **kwargs: Any
    ) -> None:
        for name, value in dictionary.items():
            self.log(name, value, batch_size=batch_size)


def module_view(pl_module: LightningModule, model: Optional[Callable[..., Any]] = None) -> ModuleView:
    """A stand-in for ``pl_module`` in its own hooks: an instance of (a subclass of) the module's class that shares
    its submodules, parameters, buffers, metrics and every other attribute, except that

    * ``view(...)`` and ``view.forward(...)`` call ``model`` (default: the class's own ``forward``, ignoring a
      ``forward`` set on the instance, such as QAT's fake-quant graph),
    * ``view.log(name, value, ...)`` and ``view.log_dict(values, ...)`` record into ``view.logged``:
      ``{name: [(value, batch_size or None), ...]}`` in call order,
    * attributes the step code sets land on the view, not on ``pl_module``.

    ``pl_module`` is never modified (its methods, properties and ``super()`` calls run with the view as ``self``).
    Tensors are shared, so in-place updates (a torchmetrics state, a BatchNorm statistic) reach the module's
    objects: callers reset or restore those as before.
    """
    cls = type(pl_module)
    view_class = type(cls.__name__, (ModuleView, cls), {"__module__": cls.__module__, "__qualname__": cls.__qualname__})
    view: ModuleView = object.__new__(view_class)
    state = {name: value for name, value in vars(pl_module).items() if name not in _REPLACED}
    state.update({name: dict(state[name]) for name in _OWN_DICTS if name in state})
    vars(view).update(state, _view_model=model, _view_class=cls, logged={})
    return view
