"""Build a Hydra structured config (a dataclass) from a class's ``__init__`` signature.

A schema written by hand drifts from the code it describes; one read from the signature cannot. Each
parameter becomes a field: its type hint mapped to a type OmegaConf can check (``Any`` where OmegaConf
has no such type), its default kept, parameters without a default ``MISSING``. ``_target_`` names the
class, so ``hydra.utils.instantiate`` builds it. A parameter whose default cannot live in a config
(an arbitrary object) is left out: the class's own default then applies. A class whose ``__init__`` takes
``**kwargs`` (and passes them to its base's) also gets the fields of the next ``__init__`` up its MRO, and so
on while those take ``**kwargs`` too; a parameter of the subclass wins over the base's of the same name.

Example:
    >>> from omegaconf import OmegaConf
    >>> EarlyStoppingConfig = config_from_signature("lightning.pytorch.callbacks.EarlyStopping")
    >>> cfg = OmegaConf.structured(EarlyStoppingConfig(monitor="val/acc"))
    >>> cfg._target_, cfg.patience
    ('lightning.pytorch.callbacks.EarlyStopping', 3)
    >>> cfg.patience = "many"  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    omegaconf.errors.ValidationError: Value 'many' of type 'str' could not be converted to Integer
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import functools
import importlib
import inspect
import os
import pathlib
import re
import types
import typing
from collections import abc
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Optional

from hydra.utils import get_object
from omegaconf import MISSING, OmegaConf

_PRIMITIVES = (int, float, bool, str, bytes, pathlib.Path)
_KEY_TYPES = (str, int, float, bool, bytes)
_NONE = type(None)


def config_from_signature(
    target: str | type | Callable[..., Any],
    *,
    name: str | None = None,
    module: str | None = None,
    defaults: Mapping[str, Any] | None = None,
    exclude: Iterable[str] = (),
) -> type:
    """Return a dataclass whose fields are ``target``'s ``__init__`` parameters, plus ``_target_``.

    Args:
        target: the class (or function) to describe, or its dotted path; a path is what ``_target_``
            says (e.g. the public ``lightning.pytorch.callbacks.ModelCheckpoint`` rather than the module
            that defines it).
        name: the dataclass's name; default ``<ClassName>Config``.
        module: the module the dataclass is published in (``setattr`` there), so pickling a config
            (as the joblib and submitit launchers do) finds it by name. Default: not published.
        defaults: defaults that replace the signature's, e.g. ``{"monitor": "val/acc"}``; a key that is
            not a parameter is an error.
        exclude: parameters the config must not set (e.g. ones the app passes itself).
    """
    target_path = target if isinstance(target, str) else _qualified_name(target)
    target = get_object(target) if isinstance(target, str) else target
    parameters, hints = _parameters(target)
    defaults, exclude = dict(defaults or {}), set(exclude)
    unknown = sorted((set(defaults) | exclude) - set(parameters))
    if unknown:
        raise ValueError(f"{unknown} are not parameters of {target_path}; it takes {sorted(parameters)}")
    parameters = {name: p for name, p in parameters.items() if name not in exclude}

    fields: list[tuple[str, Any, Any]] = [("_target_", str, dataclasses.field(default=target_path))]
    for parameter in parameters.values():
        default = defaults.get(parameter.name, parameter.default)
        field = _field(hints.get(parameter.name, Any), default)
        if field is not None:
            fields.append((parameter.name, *field))

    name = name or f"{target.__name__}Config"
    schema = dataclasses.make_dataclass(name, fields)
    schema.__doc__ = f"Structured config of ``{target_path}``, read from its signature."
    if module is not None:
        schema.__module__ = module
        setattr(importlib.import_module(module), name, schema)
    return schema


def snake_case(name: str) -> str:
    """``PostTrainingQuantization`` -> ``post_training_quantization``: the name a schema is stored under."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()


def _qualified_name(target: Any) -> str:
    return f"{target.__module__}.{target.__qualname__}"


def _parameters(target: Any) -> tuple[dict[str, inspect.Parameter], dict[str, Any]]:
    """The parameters a config may set (by name, in signature order) and their type hints.

    For a class: its ``__init__``'s parameters and, while an ``__init__`` takes ``**kwargs`` (which it passes
    up), those of the next ``__init__`` up the MRO, each hinted by its own ``__init__``; a name already seen
    (the subclass's) wins. ``*args`` and ``**kwargs`` themselves are never fields.
    """
    if not inspect.isclass(target):
        return _named_parameters(inspect.signature(target), skip=0), _type_hints(target)
    parameters: dict[str, inspect.Parameter] = {}
    hints: dict[str, Any] = {}
    inits = [cls.__dict__["__init__"] for cls in target.__mro__ if cls is not object and "__init__" in cls.__dict__]
    for depth, init in enumerate(inits):
        signature = inspect.signature(init)
        own = _named_parameters(signature, skip=1)
        own_hints = _type_hints(init)
        for name, parameter in own.items():
            # a base's positional-only parameter cannot arrive through the subclass's **kwargs
            if name not in parameters and (depth == 0 or parameter.kind is not parameter.POSITIONAL_ONLY):
                parameters[name] = parameter
                hints[name] = own_hints.get(name, Any)
        if not any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
            break
    return parameters, hints


def _named_parameters(signature: inspect.Signature, skip: int) -> dict[str, inspect.Parameter]:
    """The signature's parameters but its first ``skip`` (``self``), ``*args`` and ``**kwargs``."""
    return {
        p.name: p for p in list(signature.parameters.values())[skip:] if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }


def _type_hints(function: Any) -> dict[str, Any]:
    """Resolved hints of ``function``; a hint that cannot be resolved (a TYPE_CHECKING-only name) is ``Any``."""
    try:
        return typing.get_type_hints(function)
    except Exception:
        namespace = getattr(function, "__globals__", {})
        hints = {}
        for key, hint in getattr(function, "__annotations__", {}).items():
            try:
                hints[key] = eval(hint, namespace) if isinstance(hint, str) else hint  # noqa: S307
            except Exception:
                hints[key] = Any
        return hints


def _field(hint: Any, default: Any) -> tuple[Any, dataclasses.Field] | None:
    """(type, dataclass field) for one parameter, or None when its default cannot be held in a config."""
    type_ = _config_type(hint)
    if default is inspect.Parameter.empty:
        return type_, dataclasses.field(default=MISSING)
    if default is None and type_ is not Any:
        type_ = Optional[type_]  # `x: int = None` means Optional[int]
    if isinstance(default, tuple):
        default = list(default)
    for candidate in (type_, Any):
        made: Any = (
            dataclasses.field(default_factory=functools.partial(copy.deepcopy, default))
            if isinstance(default, (list, dict))
            else dataclasses.field(default=default)
        )
        if _holds(candidate, made):
            return candidate, made
    return None


def _holds(type_: Any, field: dataclasses.Field) -> bool:
    """Whether OmegaConf accepts a field of ``type_`` with this default."""
    try:
        OmegaConf.structured(dataclasses.make_dataclass("Probe", [("value", type_, field)]))
    except Exception:
        return False
    return True


def _config_type(hint: Any) -> Any:
    """The closest type OmegaConf 2.3 can validate: primitives, Enums, Optional, List, Dict; else Any."""
    if hint is Any or hint is inspect.Parameter.empty:
        return Any
    if hint in _PRIMITIVES or (inspect.isclass(hint) and issubclass(hint, enum.Enum)):
        return hint
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        kinds = {type(arg) for arg in args}
        return kinds.pop() if len(kinds) == 1 and next(iter(kinds)) in _PRIMITIVES else Any
    if origin in (typing.Union, types.UnionType):
        members = [arg for arg in args if arg is not _NONE]
        if all(member in (str, pathlib.Path, os.PathLike) for member in members):
            inner: Any = str  # a path given as text
        elif len(members) == 1:
            inner = _config_type(members[0])
        else:
            return Any  # OmegaConf 2.3 has no Union of several types
        return Optional[inner] if _NONE in args and inner is not Any else inner
    if origin in (list, tuple, abc.Sequence):
        items = [arg for arg in args if arg is not Ellipsis]
        item = _config_type(items[0]) if len(set(items)) == 1 else Any
        return list[item]  # type: ignore[valid-type]  # a type computed at run time, for OmegaConf
    if origin in (dict, abc.Mapping):
        key, value = args if args else (Any, Any)
        return dict[key if key in _KEY_TYPES else Any, _config_type(value)]  # type: ignore[misc]  # as above
    return Any
