"""Quantization-aware training with PT2E (torchao), without Lightning.

:func:`prepare_qat` exports ``model.forward`` in training mode with ``torch.export`` (batch dimension
dynamic), inserts fake-quant modules with ``prepare_qat_pt2e`` and ``X86InductorQuantizer(is_qat=True)``,
and returns a :class:`QATGraph`: a callable that computes ``model.forward`` with fake-quant.

The graph owns only fake-quant state. Parameters and buffers are read from ``model`` at every call
(``torch.func.functional_call``), so everything that acts on the original module keeps working while
the graph trains: the optimizer built over ``model.parameters()``, ``torch.nn.utils.prune`` masks,
``load_state_dict``, DDP's gradient hooks and buffer broadcast. ``model.state_dict()`` never changes
shape: a checkpoint taken during QAT loads into the float model as it is.

The PT2E traps handled here, each with a test:

* ``model.eval()``/``train()`` do not switch an exported graph; the documented helpers
  ``move_exported_model_to_eval``/``_train`` do, but they rewrite BatchNorm with the default momentum and
  eps and dropout with ``p=0.5``. The values are put back after every switch.
* ``prepare_qat_pt2e``'s conv-BN fusion also writes momentum 0.1 and eps 1e-5, and ``convert_pt2e`` folds
  BN into the conv with eps 1e-5 whatever the module said. The module's values are put back after
  prepare, and :meth:`QATGraph.convert` folds the real eps into ``running_var`` before converting.
* A BatchNorm in eval mode still increments ``num_batches_tracked`` in the exported graph: outside
  training the graph computes with copies of the model's buffers, so evaluation changes nothing.
* A quantizer that annotates nothing would train a float model and call it QAT: zero fake-quant
  modules after prepare is an error.

Example::

    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 10))
    >>> qat = prepare_qat(model, (torch.randn(4, 1, 8, 8),))
    >>> qat.attach()  # model(x) now runs the fake-quant graph on model's own parameters
    >>> model(torch.randn(16, 1, 8, 8)).shape
    torch.Size([16, 10])
    >>> qat.num_fake_quantizers
    4
    >>> int8 = qat.convert()  # a PT2E int8 (q/dq) graph, ready for export and lowering
    >>> int8(torch.randn(2, 1, 8, 8)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.fx import GraphModule, Node
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import prune
from torch.utils._pytree import tree_map

from lightning_quant.quantization._torchao import (
    FakeQuantize,
    FakeQuantizeBase,
    FusedMovingAvgObsFakeQuantize,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
    PerChannelMinMaxObserver,
    QuantizationSpec,
    X86InductorQuantizer,
    convert_pt2e,
    disable_observer,
    enable_observer,
    get_default_x86_inductor_quantization_config,
    move_exported_model_to_eval,
    move_exported_model_to_train,
    prepare_qat_pt2e,
)

# How activation ranges are tracked while training. The weights always use a moving-average observer:
# they change every step, so a range that never forgets would keep the widest weights ever seen.
ACTIVATION_OBSERVERS = ("moving_average_minmax", "minmax")

_BATCH_NORM = torch.ops.aten.batch_norm.default
_DROPOUT = torch.ops.aten.dropout.default
_BN_TRAINING, _BN_MOMENTUM, _BN_EPS = 5, 6, 7
_DROPOUT_P, _DROPOUT_TRAINING = 1, 2
# The eps prepare_qat_pt2e's conv-BN fusion and convert_pt2e's BN folding assume (torchao qat_utils).
_TORCHAO_BN_EPS = 1e-5


@dataclass(frozen=True)
class QATConfig:
    """How fake-quant is inserted.

    Args:
        observer: how activation ranges are tracked: ``"moving_average_minmax"`` (the QAT default: the
            range follows the activations as the weights change) or ``"minmax"`` (the widest range seen).
        per_channel: one weight scale per output channel (default) rather than one per tensor.
        keep_float: names of submodules (as in ``model.named_modules()``) whose ops stay in float.
    """

    observer: str = "moving_average_minmax"
    per_channel: bool = True
    keep_float: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.observer not in ACTIVATION_OBSERVERS:
            raise ValueError(f"observer must be one of {ACTIVATION_OBSERVERS}, got {self.observer!r}")
        if isinstance(self.keep_float, str) or not all(isinstance(n, str) and n for n in self.keep_float):
            raise ValueError(
                f"keep_float must be a sequence of submodule names such as ('net.head',), got {self.keep_float!r}"
            )
        object.__setattr__(self, "keep_float", tuple(self.keep_float))


def make_qat_quantizer(config: QATConfig = QATConfig()) -> X86InductorQuantizer:
    """``X86InductorQuantizer`` for QAT: uint8 activations, int8 symmetric weights, ``keep_float`` skipped."""
    default = get_default_x86_inductor_quantization_config(is_qat=True)
    act, weight = default.input_activation, default.weight
    eps = 2**-12  # torchao's x86 default: keeps scales of all-zero tensors finite
    if config.observer == "minmax":
        act = _with_fake_quant(act, MinMaxObserver, eps)
    if not config.per_channel:
        weight = QuantizationSpec(
            dtype=weight.dtype,
            quant_min=weight.quant_min,
            quant_max=weight.quant_max,
            qscheme=torch.per_tensor_symmetric,
            is_dynamic=False,
            observer_or_fake_quant_ctr=FusedMovingAvgObsFakeQuantize.with_args(
                observer=MovingAverageMinMaxObserver, eps=eps
            ),
        )
    qconfig = type(default)(act, act, weight, default.bias, default.is_qat)
    quantizer = X86InductorQuantizer().set_global(qconfig)
    for name in config.keep_float:
        quantizer.set_module_name_qconfig(name, None)
    return quantizer


def _with_fake_quant(spec: QuantizationSpec, observer: type, eps: float) -> QuantizationSpec:
    return QuantizationSpec(
        dtype=spec.dtype,
        quant_min=spec.quant_min,
        quant_max=spec.quant_max,
        qscheme=spec.qscheme,
        is_dynamic=False,
        observer_or_fake_quant_ctr=FakeQuantize.with_args(observer=observer, eps=eps),
    )


def prepare_qat(
    model: nn.Module,
    example_args: Sequence[Any],
    example_kwargs: Mapping[str, Any] | None = None,
    config: QATConfig = QATConfig(),
) -> QATGraph:
    """Export ``model.forward`` and insert fake-quant; the result computes with ``model``'s own tensors.

    Args:
        model: the float model; not modified (call :meth:`QATGraph.attach` to route ``model(...)``
            through the fake-quant graph).
        example_args, example_kwargs: inputs of ``model.forward``, batch of at least 2 (``torch.export``
            treats a dimension of size 1 as a constant). Dimension 0 of every tensor is the batch and is
            dynamic. Non-tensor arguments become constants of the graph.
        config: see :class:`QATConfig`.

    Raises:
        ValueError: a ``keep_float`` name that is not a submodule, a BatchNorm without momentum, or
            nothing quantizable (zero fake-quant modules after prepare).
    """
    if "forward" in vars(model):
        raise ValueError(
            "model.forward is replaced on this instance (a QATGraph attached?); detach it before preparing again"
        )
    modules = dict(model.named_modules())
    unknown = [name for name in config.keep_float if name not in modules]
    if unknown:
        raise ValueError(
            f"keep_float names {unknown} are not submodules of the model; "
            f"its submodules are: {sorted(n for n in modules if n)}"
        )
    no_momentum = [n for n, m in modules.items() if isinstance(m, _BatchNorm) and m.momentum is None]
    if no_momentum:
        raise ValueError(
            f"BatchNorm {no_momentum} use momentum=None (a cumulative average), which an exported QAT "
            "graph cannot express; give them a momentum (e.g. 0.1)"
        )
    example_args, example_kwargs = _to_device(model, tuple(example_args), dict(example_kwargs or {}))
    was_training = model.training
    model.train()  # the training graph: BatchNorm on batch statistics, dropout on
    try:
        exported = torch.export.export(
            model,
            example_args,
            example_kwargs,
            dynamic_shapes=_batch_dynamic_shapes(model, example_args, example_kwargs),
            strict=False,
        )
    finally:
        model.train(was_training)
    prepared = prepare_qat_pt2e(exported.module(), make_qat_quantizer(config))
    _restore_batchnorm_literals(prepared, model)
    qat = QATGraph(model, prepared)
    if qat.num_fake_quantizers == 0:
        raise ValueError(
            "The quantizer inserted no fake-quant module: the model has no op X86InductorQuantizer quantizes "
            "(conv, linear, matmul, ...) outside keep_float. QAT would train a float model; quantize "
            "other layers or drop QAT."
        )
    return qat


class QATGraph:
    """The fake-quant graph of ``model.forward``, computing with ``model``'s live parameters and buffers.

    Calling it (or ``model(...)`` after :meth:`attach`) follows ``model.training``: in training mode
    BatchNorm uses batch statistics (unless :meth:`freeze_batchnorm` was called) and dropout is on; in
    eval mode neither, and the model's buffers are not written. Observers move only while
    :attr:`observers_enabled` is True (the default, as in torchao), in either mode.
    """

    def __init__(self, model: nn.Module, graph: GraphModule) -> None:
        self.model = model
        self.graph = graph
        self._fake_quant_names = sorted(
            name for name, child in graph.named_children() if isinstance(child, FakeQuantizeBase)
        )
        self._bindings = _bind(graph, model)
        self._pruned_owners: list[nn.Module] = []
        self._graph_training: bool | None = None
        self._batchnorm_frozen = False
        self._observers_enabled = True

    # ------------------------------------------------------------------ running
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self._follow_mode(self.model.training)
        tensors = self._live_tensors(copy_buffers=not self.model.training)
        try:
            return torch.func.functional_call(self.graph, tensors, args, kwargs)
        except AssertionError as err:
            if "Guard failed" not in str(err):
                raise
            raise ValueError(
                f"The inputs do not match the exported forward ({err}). The QAT graph was exported from the "
                "example input: the batch dimension is dynamic, every other dimension and every non-tensor "
                "argument is fixed. Pass the varying values as tensors, or an example_input like the real batches."
            ) from err

    def attach(self) -> None:
        """Route ``model(...)`` through the fake-quant graph (sets ``model.forward`` on the instance)."""
        self.model.forward = self  # nn.Module looks forward up on the instance first

    def detach(self) -> None:
        """Give ``model`` its float forward back."""
        if vars(self.model).get("forward") is self:
            del self.model.forward

    @property
    def attached(self) -> bool:
        return vars(self.model).get("forward") is self

    @property
    def num_fake_quantizers(self) -> int:
        return sum(isinstance(m, FakeQuantizeBase) for m in self.graph.modules())

    # ------------------------------------------------------------------ the QAT recipe
    @property
    def observers_enabled(self) -> bool:
        return self._observers_enabled

    @observers_enabled.setter
    def observers_enabled(self, enabled: bool) -> None:
        if enabled != self._observers_enabled:
            self.graph.apply(enable_observer if enabled else disable_observer)
            self._observers_enabled = enabled

    @property
    def batchnorm_frozen(self) -> bool:
        return self._batchnorm_frozen

    def freeze_batchnorm(self) -> None:
        """BatchNorm normalises with its running statistics and stops updating them, also in training."""
        self._batchnorm_frozen = True
        _set_batchnorm_training(self.graph, False)
        self.graph.recompile()

    def sync_observers(self, group: Any = None) -> None:
        """Make observer ranges identical on every process of ``group`` (no-op without torch.distributed).

        Min/max observers are reduced exactly: the range a single process would have after seeing every
        rank's batch, since a moving average of a minimum is monotone in that minimum. Other observers take
        rank 0's state. Scale and zero point are recomputed from the reduced ranges.
        """
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
            return
        minmax, others = [], []
        for fake_quant in self._fake_quantizers():
            observer = getattr(fake_quant, "activation_post_process", None)
            is_minmax = isinstance(observer, (MinMaxObserver, PerChannelMinMaxObserver))
            (minmax if is_minmax else others).append(fake_quant)
        with torch.no_grad():
            for name, op in (("min_val", dist.ReduceOp.MIN), ("max_val", dist.ReduceOp.MAX)):
                tensors = [getattr(fq.activation_post_process, name) for fq in minmax]
                if tensors:
                    flat = torch.cat([t.reshape(-1) for t in tensors])
                    dist.all_reduce(flat, op=op, group=group)
                    for tensor, value in zip(tensors, flat.split([t.numel() for t in tensors])):
                        tensor.copy_(value.view_as(tensor))
            for fake_quant in minmax:
                if fake_quant.activation_post_process.min_val.numel():
                    scale, zero_point = fake_quant.calculate_qparams()
                    fake_quant.scale.resize_(scale.shape).copy_(scale)
                    fake_quant.zero_point.resize_(zero_point.shape).copy_(zero_point)
            for fake_quant in others:
                for buffer in fake_quant.buffers():
                    dist.broadcast(buffer, src=_global_rank(0, group), group=group)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Fake-quant state only (ranges, scales, switches): the model's own tensors are in its state_dict."""
        return {
            "fake_quant": {k: v.detach().clone() for k, v in self._fake_quant_state().items()},
            "batchnorm_frozen": self._batchnorm_frozen,
            "observers_enabled": self._observers_enabled,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        expected = set(self._fake_quant_state())
        given = set(state["fake_quant"])
        if given != expected:
            raise ValueError(
                "The saved fake-quant state does not match this model's QAT graph (missing "
                f"{sorted(expected - given)}, unexpected {sorted(given - expected)}): the model or the "
                "QAT configuration changed since it was saved."
            )
        self.graph.load_state_dict(dict(state["fake_quant"]), strict=False)
        self._observers_enabled = bool(state["observers_enabled"])
        self.graph.apply(enable_observer if self._observers_enabled else disable_observer)
        if state["batchnorm_frozen"]:
            self.freeze_batchnorm()

    # ------------------------------------------------------------------ convert
    def convert(self) -> GraphModule:
        """The int8 model: a copy of the graph with the model's current tensors as constants, BatchNorm
        folded, fake-quant replaced by quantize/dequantize (``convert_pt2e``). Same inputs as forward.
        Nothing of the training state changes.

        Raises:
            ValueError: a fake-quant module has no range yet (the graph never ran with observers on).
        """
        unobserved = [
            name
            for name, fake_quant in self.graph.named_modules()
            if isinstance(fake_quant, FakeQuantizeBase) and not _has_range(fake_quant)
        ]
        if unobserved:
            raise ValueError(
                f"Fake-quant modules {unobserved} have no range: the QAT graph must run in training with "
                "observers enabled on real batches before it can be converted."
            )
        graph = copy.deepcopy(self.graph)
        with torch.no_grad():
            for fqn, tensor in self._live_tensors(copy_buffers=False).items():
                _assign(graph, fqn, tensor.detach().clone())
        graph.apply(disable_observer)
        _switch_mode(graph, training=False)
        _fold_batchnorm_eps(graph)
        return convert_pt2e(graph)

    # ------------------------------------------------------------------ internals
    def _fake_quantizers(self) -> list[FakeQuantizeBase]:
        return [m for m in self.graph.modules() if isinstance(m, FakeQuantizeBase)]

    def _fake_quant_state(self) -> dict[str, torch.Tensor]:
        return {
            k: v for k, v in self.graph.state_dict().items() if k.split(".", 1)[0] in self._fake_quant_names
        }

    def _follow_mode(self, training: bool) -> None:
        if training == self._graph_training:
            return
        _switch_mode(self.graph, training)
        if training and self._batchnorm_frozen:
            _set_batchnorm_training(self.graph, False)
            self.graph.recompile()
        self._graph_training = training

    def _live_tensors(self, copy_buffers: bool) -> dict[str, torch.Tensor]:
        # torch.nn.utils.prune recomputes `weight = weight_orig * weight_mask` in a forward pre-hook of
        # the pruned module; the graph never calls that module, so the hooks run here.
        for owner in {id(o): o for _, o, _, _ in self._bindings}.values():
            for hook in owner._forward_pre_hooks.values():
                if isinstance(hook, prune.BasePruningMethod):
                    hook(owner, ())
        tensors = {}
        for fqn, owner, name, is_buffer in self._bindings:
            tensor = getattr(owner, name)
            tensors[fqn] = tensor.clone() if copy_buffers and is_buffer else tensor
        return tensors


# ---------------------------------------------------------------------- graph helpers
def _bind(graph: GraphModule, model: nn.Module) -> list[tuple[str, nn.Module, str, bool]]:
    """(name in graph, owning module in model, attribute, is buffer) for every model tensor the graph uses."""
    bindings = []
    tensors = [(n, False) for n, _ in graph.named_parameters(remove_duplicate=False)]
    tensors += [(n, True) for n, _ in graph.named_buffers(remove_duplicate=False)]
    for fqn, is_buffer in tensors:
        prefix, _, name = fqn.rpartition(".")
        try:
            owner = model.get_submodule(prefix)
        except AttributeError:
            continue  # the graph's own state: fake-quant modules, lifted constants
        if hasattr(owner, name) or hasattr(owner, name + "_orig"):
            bindings.append((fqn, owner, name, is_buffer))
    return bindings


def _has_range(fake_quant: FakeQuantizeBase) -> bool:
    observer = getattr(fake_quant, "activation_post_process", None)
    min_val = getattr(observer, "min_val", None)
    if min_val is None:
        return True  # an observer without min/max (e.g. fixed qparams) has nothing to see
    return min_val.numel() > 0 and bool(torch.isfinite(min_val).all())


def _assign(graph: GraphModule, fqn: str, tensor: torch.Tensor) -> None:
    prefix, _, name = fqn.rpartition(".")
    owner = graph.get_submodule(prefix)
    if name in owner._parameters:
        owner._parameters[name] = nn.Parameter(tensor, requires_grad=False)
    else:
        owner._buffers[name] = tensor


def _mode_nodes(graph: GraphModule) -> list[Node]:
    return [n for n in graph.graph.nodes if n.op == "call_function" and n.target in (_BATCH_NORM, _DROPOUT)]


def _switch_mode(graph: GraphModule, training: bool) -> None:
    """``move_exported_model_to_train/eval`` (the documented way), keeping BatchNorm momentum/eps and
    dropout p: the helpers' replacement patterns hard-code 0.1, 1e-5 and 0.5."""
    saved = [(n.target, list(n.args)) for n in _mode_nodes(graph)]
    (move_exported_model_to_train if training else move_exported_model_to_eval)(graph)
    nodes = _mode_nodes(graph)
    if [n.target for n in nodes] != [target for target, _ in saved]:
        raise RuntimeError(
            "move_exported_model_to_train/eval changed the graph's BatchNorm/dropout layout; cannot restore "
            "their momentum, eps and p. Please report this with your model."
        )
    for node, (target, old) in zip(nodes, saved):
        args = list(node.args)
        kept = (_BN_MOMENTUM, _BN_EPS) if target == _BATCH_NORM else (_DROPOUT_P,)
        for i in kept:
            args[i] = old[i]
        node.args = tuple(args)
    graph.recompile()


def _set_batchnorm_training(graph: GraphModule, training: bool) -> None:
    # The PT2E QAT recipe for freezing BatchNorm statistics: the `training` argument of every batch_norm op.
    for node in graph.graph.nodes:
        if node.op == "call_function" and node.target == _BATCH_NORM:
            args = list(node.args)
            args[_BN_TRAINING] = training
            node.args = tuple(args)


def _running_var_users(graph: GraphModule) -> list[tuple[Node, str]]:
    """(batch_norm node, running_var name) for every batch_norm with running statistics."""
    found = []
    for node in graph.graph.nodes:
        if node.op == "call_function" and node.target == _BATCH_NORM:
            running_var = node.args[4]
            if isinstance(running_var, Node) and running_var.op == "get_attr":
                found.append((node, running_var.target))
    return found


def _eps_adds(running_var: Node) -> list[Node]:
    # The QAT conv-BN pattern scales the weight by gamma / sqrt(running_var + eps): `add(running_var, eps)`.
    return [
        u
        for u in running_var.users
        if u.op == "call_function" and u.target == torch.ops.aten.add.Tensor and isinstance(u.args[1], float)
    ]


def _restore_batchnorm_literals(graph: GraphModule, model: nn.Module) -> None:
    """Give every batch_norm (and the QAT pattern's eps add) its module's momentum and eps back."""
    for node, running_var_name in _running_var_users(graph):
        module = model.get_submodule(running_var_name.rpartition(".")[0])
        args = list(node.args)
        args[_BN_MOMENTUM], args[_BN_EPS] = float(module.momentum), float(module.eps)
        node.args = tuple(args)
        for add in _eps_adds(node.args[4]):
            add.args = (add.args[0], float(module.eps))
    graph.recompile()


def _fold_batchnorm_eps(graph: GraphModule) -> None:
    """convert_pt2e folds BN into conv with eps 1e-5: move the real eps into running_var, so that
    ``running_var' + 1e-5 == running_var + eps`` everywhere the graph uses them (eval mode)."""
    for node, running_var_name in _running_var_users(graph):
        eps = node.args[_BN_EPS]
        running_var = node.args[4]
        users = set(running_var.users)
        adds = _eps_adds(running_var)
        if eps == _TORCHAO_BN_EPS or users != {node, *adds}:
            continue
        graph.get_buffer(running_var_name).add_(eps - _TORCHAO_BN_EPS)
        args = list(node.args)
        args[_BN_EPS] = _TORCHAO_BN_EPS
        node.args = tuple(args)
        for add in adds:
            add.args = (add.args[0], _TORCHAO_BN_EPS)
    graph.recompile()


def _batch_dynamic_shapes(model: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """Dimension 0 of every tensor input is the (dynamic) batch; everything else is as in the example."""
    bound = inspect.signature(model.forward).bind(*args, **kwargs)

    def spec(value: Any) -> Any:
        return {0: torch.export.Dim.AUTO} if isinstance(value, torch.Tensor) and value.dim() > 0 else None

    return {name: tree_map(spec, value) for name, value in bound.arguments.items()}


def _to_device(model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    tensor = next(iter(model.parameters()), None)
    if tensor is None:
        return args, kwargs
    move = lambda v: v.to(tensor.device) if isinstance(v, torch.Tensor) else v  # noqa: E731
    return tree_map(move, args), tree_map(move, kwargs)


def _global_rank(group_rank: int, group: Any) -> int:
    return group_rank if group is None else dist.get_global_rank(group, group_rank)
