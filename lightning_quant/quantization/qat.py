"""Quantization-aware training with PT2E (torchao), without Lightning.

:func:`prepare_qat` exports ``model.forward`` in training mode with ``torch.export`` (batch dimension
dynamic), inserts fake-quant modules with ``prepare_qat_pt2e`` and ``X86InductorQuantizer(is_qat=True)``,
and returns a :class:`QATGraph`: a callable that computes ``model.forward`` with fake-quant.

The graph owns only fake-quant state; it computes with ``model``'s own parameters and buffers (export
shares the tensor objects; when the model's differ, e.g. a pruned ``weight`` computed from its mask, they
are bound per call with ``torch.func.functional_call``). So everything that acts on the original module
keeps working while the graph trains: the optimizer built over ``model.parameters()``,
``torch.nn.utils.prune`` masks, ``load_state_dict``, DDP's gradient hooks and buffer broadcast.
``model.state_dict()`` never changes shape: a checkpoint taken during QAT loads into the float model.

The PT2E traps handled here, each with a test:

* ``model.eval()``/``train()`` do not switch an exported graph; the documented helpers
  ``move_exported_model_to_eval``/``_train`` do, but they rewrite BatchNorm with the default momentum and
  eps and dropout with ``p=0.5``. The values are put back after every switch.
* ``prepare_qat_pt2e``'s conv-BN fusion also writes momentum 0.1 and eps 1e-5, and ``convert_pt2e`` folds
  BN into the conv with eps 1e-5 whatever the module said (after tracing 96 patterns: tens of seconds).
  The module's values are put back after prepare, and :meth:`QATGraph.convert` folds conv-BN itself,
  with the real eps, before ``convert_pt2e``.
* A BatchNorm in eval mode still increments ``num_batches_tracked`` in the exported graph: outside
  training the graph computes with copies of the model's buffers, so evaluation changes nothing.
* A quantizer that annotates nothing would train a float model and call it QAT: zero fake-quant
  modules after prepare is an error.

Example::

    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 10))
    >>> qat = prepare_qat(model, torch.randn(4, 3, 8, 8))
    >>> qat.attach()  # model(x) now runs the fake-quant graph on model's own parameters
    >>> model(torch.randn(16, 3, 8, 8)).shape
    torch.Size([16, 10])
    >>> qat.num_fake_quantizers
    4
    >>> int8 = qat.convert()  # a PT2E int8 (q/dq) graph, ready for export and lowering
    >>> int8(torch.randn(2, 3, 8, 8)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

import copy
import inspect
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.fx import GraphModule, Node
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import prune

from lightning_quant.capture import NOTES_KEY
from lightning_quant.inputs import ModelInputs
from lightning_quant.quantization._torchao import (
    FakeQuantize,
    FakeQuantizeBase,
    FusedMovingAvgObsFakeQuantize,
    HistogramObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    PerChannelMinMaxObserver,
    QuantizationConfig,
    X86InductorQuantizer,
    convert_pt2e,
    disable_observer,
    enable_observer,
    get_default_x86_inductor_quantization_config,
    move_exported_model_to_eval,
    move_exported_model_to_train,
    prepare_qat_pt2e,
)
from lightning_quant.quantization.config import OBSERVERS, check_keep_float
from lightning_quant.quantization.quantize import capture_for_quantization, single_input_channel_convs
from lightning_quant.target import DEFAULT_TARGET, check_target_name, resolve_target

_BATCH_NORM = torch.ops.aten.batch_norm.default
_DROPOUT = torch.ops.aten.dropout.default
_BN_TRAINING, _BN_MOMENTUM, _BN_EPS = 5, 6, 7
_DROPOUT_P = 1


@dataclass(frozen=True)
class QATConfig:
    """How fake-quant is inserted (the QAT counterpart of :class:`StaticQuantConfig`).

    Args:
        observer: how activation ranges are tracked while training: ``"moving_average"`` (default, the
            QAT standard: the range follows the activations as the weights change; fused with fake-quant),
            ``"minmax"`` (the widest range seen) or ``"histogram"`` (slow: a histogram search every step).
            Weights always use a per-step moving average: they change every step.
        per_channel: one weight scale per output channel (default) rather than one per tensor.
        keep_float: names of submodules (as in ``model.named_modules()``) whose ops stay in float.
        target: the CPUs the int8 model is for (:mod:`lightning_quant.target`); ``"avx2"`` (default) trains with
            the 7-bit weight grid that CPUs without VNNI compute exactly, so the converted model and files match.

    Example::

        >>> QATConfig(keep_float=("net.head",)).observer
        'moving_average'
    """

    observer: str = "moving_average"
    per_channel: bool = True
    keep_float: Sequence[str] = ()
    target: str = DEFAULT_TARGET

    def __post_init__(self) -> None:
        if self.observer not in OBSERVERS:
            raise ValueError(f"Unknown observer {self.observer!r}; choose one of {list(OBSERVERS)}")
        check_keep_float(self.keep_float)
        check_target_name(self.target)
        object.__setattr__(self, "keep_float", tuple(self.keep_float))


def make_qat_quantizer(config: QATConfig = QATConfig(), model: nn.Module | None = None) -> X86InductorQuantizer:
    """``X86InductorQuantizer`` for QAT: uint8 activations, int8 symmetric weights in the target's range,
    ``keep_float`` skipped.

    Given ``model``, its convolutions with one input channel stay float too, as in static int8 (see
    :func:`~lightning_quant.quantization.quantize.single_input_channel_convs`).
    """
    default = get_default_x86_inductor_quantization_config(is_qat=True)
    eps = 2**-12  # torchao's x86 default: keeps the scale of an all-zero tensor finite
    activation = default.input_activation  # moving average, fused with fake-quant
    if config.observer != "moving_average":
        observer = MinMaxObserver if config.observer == "minmax" else HistogramObserver
        activation = replace(activation, observer_or_fake_quant_ctr=FakeQuantize.with_args(observer=observer, eps=eps))
    quant_min, quant_max = resolve_target(config.target).weight_range
    weight = replace(default.weight, quant_min=quant_min, quant_max=quant_max)
    if not config.per_channel:
        weight = replace(
            weight,
            qscheme=torch.per_tensor_symmetric,
            ch_axis=None,
            observer_or_fake_quant_ctr=FusedMovingAvgObsFakeQuantize.with_args(
                observer=MovingAverageMinMaxObserver, eps=eps
            ),
        )
    quantizer = _QATQuantizer()
    quantizer.set_global(QuantizationConfig(activation, activation, weight, default.bias, True))
    for name in (*config.keep_float, *(single_input_channel_convs(model) if model is not None else ())):
        quantizer.set_module_name_qconfig(name, None)
    return quantizer


class _QATQuantizer(X86InductorQuantizer):
    """torchao 0.18's ``prepare_qat_pt2e`` fails (IndexError in ``_update_conv_input_qspec_map_after_replacement``)
    on a conv followed by BatchNorm that ``set_module_name_qconfig(name, None)`` keeps in float: the empty
    annotation that marks it is indexed as if it listed input, weight and bias. Once annotation is done the
    marker has served its purpose (stopping the other annotators), so it is removed from convs."""

    def annotate(self, model: GraphModule) -> GraphModule:
        model = super().annotate(model)
        for node in model.graph.nodes:
            annotation = node.meta.get("quantization_annotation")
            if (
                _is_call(node, *_CONVS)
                and annotation is not None
                and not annotation.input_qspec_map
                and annotation.output_qspec is None
            ):
                del node.meta["quantization_annotation"]
        return model


def prepare_qat(model: nn.Module, example_inputs: Any, config: QATConfig = QATConfig()) -> QATGraph:
    """Export ``model.forward`` and insert fake-quant; the result computes with ``model``'s own tensors.

    Args:
        model: the float model; not modified (call :meth:`QATGraph.attach` to route ``model(...)``
            through the fake-quant graph).
        example_inputs: an input of ``model.forward`` (tensor, tuple of arguments, dict of keywords or
            :class:`ModelInputs`), batch of 2 or more. Dimension 0 of the tensors is the batch and is
            dynamic; other dimensions and non-tensor arguments are fixed.
        config: see :class:`QATConfig`.

    Raises:
        ValueError: a ``keep_float`` name that is not a submodule, a BatchNorm without momentum, or
            nothing quantizable (zero fake-quant modules after prepare).
        QuantizationError: ``torch.export`` cannot capture ``forward`` (the message says why).
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
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    inputs = ModelInputs.from_value(example_inputs).bind(model.forward).to(device)
    was_training = model.training
    model.train()  # the training graph: BatchNorm on batch statistics, dropout on
    try:
        captured = capture_for_quantization(model, inputs)
    finally:
        model.train(was_training)
    prepared = prepare_qat_pt2e(captured, make_qat_quantizer(config, model))
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

    Calling it (or ``model(...)`` after :meth:`attach`) follows ``model.training``: in training mode it
    runs :attr:`graph` (BatchNorm on batch statistics unless :meth:`freeze_batchnorm` was called, dropout
    on), in eval mode :attr:`eval_graph`, which does not write the model's buffers. Observers move only while
    :attr:`observers_enabled` is True (the default, as in torchao), in either mode.
    """

    def __init__(self, model: nn.Module, graph: GraphModule) -> None:
        self.model = model
        self.graph = graph
        # calls are put in the form the graph was exported with: positional-or-keyword arguments positional,
        # defaults filled in (as ModelInputs.bind does for the example), so self(x=x) works like self(x)
        self._signature = inspect.signature(model.forward)
        self._fake_quant_names = sorted(
            name for name, child in graph.named_children() if isinstance(child, FakeQuantizeBase)
        )
        self._bindings = _bind(graph, model)
        # the graph as prepared, for evaluation and convert (q/dq where prepare put them); training runs a
        # lighter copy without the fake-quant calls that cannot change a value
        self._prepared = copy.deepcopy(graph.graph)
        _fake_quant_in_float32(graph)
        _drop_repeated_fake_quant(graph)
        _unfuse_float_conv_batchnorm(graph)
        self._graph_slots = [(graph.get_submodule(fqn.rpartition(".")[0]), name) for fqn, _, name, _ in self._bindings]
        self._eval_graph: GraphModule | None = None
        self._batchnorm_frozen = False
        self._observers_enabled = True

    # ------------------------------------------------------------------ running
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        bound = self._signature.bind(*args, **kwargs)
        bound.apply_defaults()
        args, kwargs = bound.args, bound.kwargs
        training = self.model.training
        try:
            if training and (self._graph_holds_live_tensors() or self._rebind()):
                return self.graph(*args, **kwargs)  # the usual case, without functional_call's cost
            graph = self.graph if training else self.eval_graph
            return torch.func.functional_call(graph, self._live_tensors(copy_buffers=not training), args, kwargs)
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
    def eval_graph(self) -> GraphModule:
        """The graph in eval mode. It shares the fake-quant modules with :attr:`graph`; switching an
        exported graph traces patterns (about a second), so it is done once, not at every ``model.eval()``."""
        if self._eval_graph is None:
            eval_graph = GraphModule(self.graph, copy.deepcopy(self._prepared))
            eval_graph.meta.update(self.graph.meta)  # what convert_pt2e reads from prepare
            _switch_mode(eval_graph, training=False)
            self._eval_graph = eval_graph
        return self._eval_graph

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
            for fake_quant in self._fake_quantizers():  # the torchao helpers, without walking every module
                (enable_observer if enabled else disable_observer)(fake_quant)
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
        minmax: list[Any] = []
        others: list[Any] = []
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
        # torchao's observers read the state_dict version from its metadata and, without one, take the
        # state for version 1 and overwrite `eps` with float32's (2**-23 instead of 2**-12): give the
        # loaded values the metadata of this graph's own state_dict, which they came from.
        fake_quant = OrderedDict(state["fake_quant"])
        fake_quant._metadata = self.graph.state_dict()._metadata  # type: ignore[attr-defined]
        self.graph.load_state_dict(fake_quant, strict=False)
        self._observers_enabled = not state["observers_enabled"]
        self.observers_enabled = bool(state["observers_enabled"])
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
                f"{len(unobserved)} fake-quant modules ({', '.join(unobserved[:4])}{', ...' if len(unobserved) > 4 else ''}) "
                "have no range: the QAT graph must run in training with observers enabled on real batches before it "
                "can be converted. The graph is the model's forward: a training_step that calls a submodule directly "
                "(e.g. self.model(**batch)) instead of self(...) never runs it."
            )
        graph = copy.deepcopy(self.eval_graph).cpu()
        with torch.no_grad():
            for fqn, tensor in self._live_tensors(copy_buffers=False).items():
                _assign(graph, fqn, tensor.detach().to("cpu", copy=True))
        graph.apply(disable_observer)
        _fold_conv_batchnorm(graph)
        converted = _drop_unused_tensors(convert_pt2e(graph))
        converted.meta.setdefault(NOTES_KEY, graph.meta.get(NOTES_KEY, ()))  # what capturing the model changed
        return converted

    # ------------------------------------------------------------------ internals
    def _fake_quantizers(self) -> list[FakeQuantizeBase]:
        return [getattr(self.graph, name) for name in self._fake_quant_names]

    def _fake_quant_state(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.graph.state_dict().items() if k.split(".", 1)[0] in self._fake_quant_names}

    def _graph_holds_live_tensors(self) -> bool:
        """Whether the graph's attributes still are the model's tensors (export shares them), so that the
        graph can run as it is: not after pruning (a computed ``weight``) or a replaced parameter."""
        return all(
            getattr(owner, name) is getattr(slot, slot_name)
            for (_, owner, name, _), (slot, slot_name) in zip(self._bindings, self._graph_slots)
        )

    def _rebind(self) -> bool:
        """Point the graph at the model's registered parameters and buffers again (e.g. after
        ``prune.remove`` registered a new ``weight``); False while some tensor is computed per call."""
        live = True
        for (_, owner, name, _), (slot, slot_name) in zip(self._bindings, self._graph_slots):
            tensor = getattr(owner, name)
            if owner._parameters.get(name) is tensor:
                slot._parameters[slot_name] = tensor
            elif owner._buffers.get(name) is tensor:
                slot._buffers[slot_name] = tensor
            else:
                live = False
        return live

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


# ops whose outputs are values of their input: applied to values on a quantization grid, they stay on it
_VALUE_SELECTING = (
    torch.ops.aten.max_pool1d.default,
    torch.ops.aten.max_pool2d.default,
    torch.ops.aten.max_pool3d.default,
    torch.ops.aten.flatten.using_ints,
    torch.ops.aten.reshape.default,
    torch.ops.aten.view.default,
    torch.ops.aten.permute.default,
    torch.ops.aten.transpose.int,
    torch.ops.aten.squeeze.dim,
    torch.ops.aten.unsqueeze.default,
)


def _fake_quant_in_float32(graph: GraphModule) -> None:
    """Under mixed precision (autocast bf16/fp16) activations reach fake-quant in low precision, which
    torch's fused observer + fake-quant kernel refuses ("expected scalar type Float but found BFloat16").
    Observe and round in float32, as the int8 model's quantize ops will, and hand back the input's dtype."""
    for module in graph.modules():
        if isinstance(module, FakeQuantizeBase):
            module.register_forward_pre_hook(_fake_quant_input_to_float32)
            module.register_forward_hook(_fake_quant_output_to_input_dtype)


def _fake_quant_input_to_float32(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    x = args[0]
    low_precision = isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != torch.float32
    module.__dict__["_input_dtype"] = x.dtype if low_precision else None
    return (x.float(), *args[1:]) if low_precision else None


def _fake_quant_output_to_input_dtype(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
    dtype = module.__dict__.pop("_input_dtype", None)
    return output.to(dtype) if dtype is not None else None


def _drop_repeated_fake_quant(graph: GraphModule) -> None:
    """Remove the fake-quant calls that repeat a shared one after a value-selecting op (max-pool, flatten...).

    X86InductorQuantizer gives such an op's output the quantization of its input (``SharedQuantizationSpec``),
    and prepare calls that same fake-quant module again on it: in the int8 model the op runs on int8 values
    and its output keeps the input's scale, so the second call is the identity there. In training it cost a
    fake-quant kernel and its backward per call (3 of 8 activation calls of the digits ConvNet), and its
    observer update pulled a moving-average range toward the narrower range of the pooled values. Without
    it, training computes what the int8 model does and ranges are the producing op's. Training graph only:
    evaluation and convert keep prepare's graph (the same values once observers are off).
    """
    called: dict[int, set[Node]] = {}  # fake-quant module -> its call nodes
    for node in list(graph.graph.nodes):
        if node.op != "call_module" or not isinstance(graph.get_submodule(node.target), FakeQuantizeBase):
            continue
        module = id(graph.get_submodule(node.target))
        source = node.args[0]
        if _is_call(source, *_VALUE_SELECTING) and source.args[0] in called.get(module, ()):
            node.replace_all_uses_with(source)
            graph.graph.erase_node(node)
        else:
            called.setdefault(module, set()).add(node)
    graph.graph.lint()
    graph.recompile()


def _unfuse_float_conv_batchnorm(graph: GraphModule) -> None:
    """Give a conv kept in float (no fake-quant on its weight) its plain ``batch_norm(conv(x, w, b))`` back.

    ``prepare_qat_pt2e`` rewrites every conv-BN, float ones too, as ``bn(conv(x, w * s) / s + b)`` with
    ``s = gamma / sqrt(running_var + eps)``: scaling the weight only matters when it is fake-quantized,
    for a float weight the pattern is the same function at the cost of a weight product, an activation
    division and their backward (a fifth of the digits ConvNet's QAT overhead came from the float first
    conv). Training graph only: evaluation and convert keep prepare's pattern, which the fold expects.
    """
    for bn in [n for n in graph.graph.nodes if _is_call(n, _BATCH_NORM)]:
        match = _match_qat_conv_bn(bn)
        if match is None or match[2] is not match[0].args[1]:  # the conv weight goes through fake-quant
            continue
        conv, weight, _, conv_bias = match
        conv.args = (conv.args[0], weight, conv_bias, *conv.args[3:])
        bn.args = (conv, *bn.args[1:])
    # the scaling nodes are dead now; erase only those (pure), not BatchNorm's in-place step counter
    for node in reversed(list(graph.graph.nodes)):
        if node.op == "call_function" and not node.users and node.target in _SCALING:
            graph.graph.erase_node(node)
    graph.graph.lint()
    graph.recompile()


_SCALING = {
    torch.ops.aten.mul.Tensor,
    torch.ops.aten.div.Tensor,
    torch.ops.aten.add.Tensor,
    torch.ops.aten.sqrt.default,
    torch.ops.aten.reshape.default,
    torch.ops.aten.zeros_like.default,
}


def _set_batchnorm_training(graph: GraphModule, training: bool) -> None:
    # The PT2E QAT recipe for freezing BatchNorm statistics: the `training` argument of every batch_norm op.
    for node in graph.graph.nodes:
        if node.op == "call_function" and node.target == _BATCH_NORM:
            args = list(node.args)
            args[_BN_TRAINING] = training
            node.args = tuple(args)


def _running_var_users(graph: GraphModule) -> list[tuple[Node, str]]:
    """(batch_norm node, running_var name) for every batch_norm with running statistics."""
    found: list[tuple[Node, str]] = []
    for node in graph.graph.nodes:
        if node.op == "call_function" and node.target == _BATCH_NORM:
            running_var = node.args[4]
            if isinstance(running_var, Node) and running_var.op == "get_attr":
                found.append((node, str(running_var.target)))
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


def _drop_unused_tensors(graph: GraphModule) -> GraphModule:
    """Delete the float weights ``convert_pt2e`` leaves behind once their int8 copies are folded constants."""
    used = {node.target for node in graph.graph.nodes if node.op == "get_attr"}
    for fqn, _ in [*graph.named_parameters(), *graph.named_buffers()]:
        if fqn not in used:
            prefix, _, name = fqn.rpartition(".")
            delattr(graph.get_submodule(prefix), name)
    graph.delete_all_unused_submodules()
    return graph


def _fold_conv_batchnorm(graph: GraphModule) -> None:
    """Fold every QAT conv-BN pattern of an eval-mode graph into its conv, with the module's real eps.

    The pattern ``prepare_qat_pt2e`` leaves (``qat_utils._get_qat_conv_bn_pattern``) is
    ``bn(conv(x, fq(w * s), 0) / s + b)`` with ``s = gamma / sqrt(running_var + eps)``; in eval mode that is
    ``conv(x, fq(w * s), (b - running_mean) * s + beta)``. ``convert_pt2e`` would fold it too, but only
    after tracing 96 candidate patterns (tens of seconds here) and with eps 1e-5 whatever the module
    said. A graph without BatchNorm skips that step; a BatchNorm this does not recognise is left to it.
    """
    for bn in [n for n in graph.graph.nodes if _is_call(n, _BATCH_NORM)]:
        match = _match_qat_conv_bn(bn)
        if match is None:
            continue
        conv, weight_node, scaled_weight, conv_bias_node = match
        gamma, beta, running_mean, running_var = (_tensor(graph, n) for n in bn.args[1:5])
        scale = gamma / torch.sqrt(running_var + bn.args[_BN_EPS])
        weight = _tensor(graph, weight_node)
        conv_bias = _tensor(graph, conv_bias_node) if conv_bias_node is not None else torch.zeros_like(beta)
        prefix = weight_node.target.rpartition(".")[0]
        _assign(graph, weight_node.target, weight * scale.reshape([-1] + [1] * (weight.dim() - 1)))
        _assign(graph, f"{prefix}.folded_bias", (conv_bias - running_mean) * scale + beta)
        scaled_weight.replace_all_uses_with(weight_node)
        with graph.graph.inserting_before(conv):
            bias = graph.graph.get_attr(f"{prefix}.folded_bias")
        conv.args = (conv.args[0], conv.args[1], bias, *conv.args[3:])
        bn.replace_all_uses_with(conv)
        graph.graph.erase_node(bn)
    # what torchao's fold also removes: BatchNorm's step counter, meaningless in an inference graph
    for node in list(graph.graph.nodes):
        if _is_call(node, torch.ops.aten.add_.Tensor) and _is_attr(node.args[0], "num_batches_tracked"):
            graph.graph.erase_node(node)
    graph.graph.eliminate_dead_code()
    graph.graph.lint()
    graph.recompile()


def _match_qat_conv_bn(bn: Node) -> tuple[Node, Node, Node, Node | None] | None:
    """(conv, conv weight get_attr, ``w * s`` node, conv bias get_attr or None) if ``bn`` ends the QAT pattern."""
    aten = torch.ops.aten
    if not all(_is_attr(n) for n in bn.args[1:5]):
        return None
    x, conv_bias = bn.args[0], None
    if _is_call(x, aten.add.Tensor) and _is_call(x.args[1], aten.reshape.default) and _is_attr(x.args[1].args[0]):
        x, conv_bias = x.args[0], x.args[1].args[0]
    if not (
        _is_call(x, aten.div.Tensor) and _is_call(x.args[0], *_CONVS) and _is_call(x.args[1], aten.reshape.default)
    ):
        return None
    conv, scale = x.args[0], x.args[1].args[0]
    weight_input, bias = conv.args[1], conv.args[2] if len(conv.args) > 2 else None
    # the weight goes through a fake-quant module, unless the conv is kept in float
    is_fake_quant = isinstance(weight_input, Node) and weight_input.op == "call_module"
    scaled_weight = weight_input.args[0] if is_fake_quant else weight_input
    if not (
        _is_call(scale, aten.div.Tensor)
        and scale.args[0] is bn.args[1]
        and _is_call(scaled_weight, aten.mul.Tensor)
        and (bias is None or _is_call(bias, aten.zeros_like.default))
        and len(conv.users) == 1
    ):
        return None
    weight, weight_scale = scaled_weight.args
    if not (_is_attr(weight) and len(weight.users) == 1 and _is_call(weight_scale, aten.reshape.default)):
        return None
    if weight_scale.args[0] is not scale:
        return None
    return conv, weight, scaled_weight, conv_bias  # type: ignore[return-value]  # Nodes, as matched above


_CONVS = (torch.ops.aten.conv1d.default, torch.ops.aten.conv2d.default, torch.ops.aten.conv3d.default)


def _is_call(node: Any, *targets: Any) -> bool:
    return isinstance(node, Node) and node.op == "call_function" and node.target in targets


def _is_attr(node: Any, suffix: str = "") -> bool:
    return isinstance(node, Node) and node.op == "get_attr" and node.target.endswith(suffix)


def _tensor(graph: GraphModule, node: Node) -> torch.Tensor:
    prefix, _, name = node.target.rpartition(".")
    return getattr(graph.get_submodule(prefix), name)


def _global_rank(group_rank: int, group: Any) -> int:
    return group_rank if group is None else dist.get_global_rank(group, group_rank)
