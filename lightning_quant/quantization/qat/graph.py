"""The QAT graph: :func:`prepare_qat` exports ``model.forward`` with fake-quant, :class:`QATGraph` runs it
on the model's own tensors, follows its train/eval mode, keeps the QAT recipe's switches and converts to int8."""

from __future__ import annotations

import copy
import inspect
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.fx import GraphModule
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import prune

from lightning_quant.capture import NOTES_KEY
from lightning_quant.inputs import ModelInputs
from lightning_quant.quantization._torchao import (
    FakeQuantizeBase,
    MinMaxObserver,
    PerChannelMinMaxObserver,
    convert_pt2e,
    disable_observer,
    enable_observer,
    prepare_qat_pt2e,
)
from lightning_quant.quantization.qat.config import QATConfig, make_qat_quantizer
from lightning_quant.quantization.qat.passes import (
    assign,
    drop_repeated_fake_quant,
    drop_unused_tensors,
    fake_quant_in_float32,
    fold_conv_batchnorm,
    restore_batchnorm_literals,
    set_batchnorm_training,
    switch_mode,
    unfuse_float_conv_batchnorm,
)
from lightning_quant.quantization.quantize import capture_for_quantization, contiguous_constants


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
    restore_batchnorm_literals(prepared, model)
    qat = QATGraph(model, prepared, inputs.form())
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

    def __init__(self, model: nn.Module, graph: GraphModule, form: Any = None) -> None:
        self.model = model
        self.graph = graph
        # calls are put in the form the graph was exported with: positional-or-keyword arguments positional,
        # defaults filled in (as ModelInputs.bind does for the example), so self(x=x) works like self(x)
        self._signature = inspect.signature(model.forward)
        self._form = form
        self._fake_quant_names = sorted(
            name for name, child in graph.named_children() if isinstance(child, FakeQuantizeBase)
        )
        self._bindings = _bind(graph, model)
        # the graph as prepared, for evaluation and convert (q/dq where prepare put them); training runs a
        # lighter copy without the fake-quant calls that cannot change a value
        self._prepared = copy.deepcopy(graph.graph)
        fake_quant_in_float32(graph)
        drop_repeated_fake_quant(graph)
        unfuse_float_conv_batchnorm(graph)
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
            return torch.func.functional_call(graph, self._live_tensors(graph, copy_buffers=not training), args, kwargs)
        except AssertionError as err:
            if "Guard failed" not in str(err):
                raise
            raise ValueError(
                f"The inputs do not match the exported forward ({err}). The QAT graph was exported from the "
                "example input: the batch dimension is dynamic, every other dimension and every non-tensor "
                "argument is fixed. Pass the varying values as tensors, or an example_input like the real batches."
            ) from err

    def takes(self, inputs: ModelInputs) -> bool:
        """Whether the graph was captured on calls like ``inputs`` (see :meth:`ModelInputs.form`)."""
        return self._form == inputs.form()

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
            switch_mode(eval_graph, training=False)
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
        set_batchnorm_training(self.graph, False)
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
            for fqn, tensor in self._live_tensors(graph, copy_buffers=False).items():
                assign(graph, fqn, tensor.detach().to("cpu", copy=True))
        graph.apply(disable_observer)
        fold_conv_batchnorm(graph)
        converted = contiguous_constants(drop_unused_tensors(convert_pt2e(graph)))
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

    def _live_tensors(self, graph: GraphModule, copy_buffers: bool) -> dict[str, torch.Tensor]:
        """The model's current tensors under the names ``graph`` holds them by. A tensor the model holds under two
        names (tied weights: GPT-2's ``lm_head.weight`` is ``wte.weight``) may have only one of them in ``graph``:
        switching the graph to eval merges the two reads of one tensor into one."""
        # torch.nn.utils.prune recomputes `weight = weight_orig * weight_mask` in a forward pre-hook of
        # the pruned module; the graph never calls that module, so the hooks run here.
        for owner in {id(o): o for _, o, _, _ in self._bindings}.values():
            for hook in owner._forward_pre_hooks.values():
                if isinstance(hook, prune.BasePruningMethod):
                    hook(owner, ())
        held = {n for n, _ in graph.named_parameters(remove_duplicate=False)}
        held |= {n for n, _ in graph.named_buffers(remove_duplicate=False)}
        tensors = {}
        for fqn, owner, name, is_buffer in self._bindings:
            if fqn not in held:
                continue
            tensor = getattr(owner, name)
            tensors[fqn] = tensor.clone() if copy_buffers and is_buffer else tensor
        return tensors


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


def _global_rank(group_rank: int, group: Any) -> int:
    return group_rank if group is None else dist.get_global_rank(group, group_rank)
