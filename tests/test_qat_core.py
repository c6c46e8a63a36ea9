"""The QAT core without Lightning: prepare_qat / QATGraph on small real models (torchao PT2E, real export)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import prune
from torchao.quantization.pt2e import FakeQuantizeBase

from lightning_quant.quantization import count_quantized_ops
from lightning_quant.quantization.qat import QATConfig, prepare_qat

BN_EPS, BN_MOMENTUM, DROPOUT = 1e-2, 0.03, 0.25


class TwoInputNet(nn.Module):
    """Two tensor inputs and a keyword-only tensor; conv-BN with non-default eps/momentum; dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=True)
        self.bn = nn.BatchNorm2d(8, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.drop = nn.Dropout(DROPOUT)
        self.head = nn.Linear(8, 4)
        self.side = nn.Linear(5, 4)

    def forward(self, x: torch.Tensor, y: torch.Tensor, *, scale: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv(x)))
        h = torch.relu(self.bn2(self.conv2(h)))
        return self.head(self.drop(h.mean(dim=(2, 3)))) * scale + self.side(y)


def inputs(batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # small images: the first conv's outputs have a variance of about 1e-3, so BatchNorm's eps=1e-2 matters
    return {
        "x": 0.05 * torch.randn(batch, 3, 6, 6, generator=g),
        "y": torch.randn(batch, 5, generator=g),
        "scale": torch.tensor(1.5),
    }


def set_fake_quant(qat, enabled: bool) -> None:
    for module in qat.graph.modules():
        if isinstance(module, FakeQuantizeBase):
            module.enable_fake_quant(enabled)


@pytest.fixture(scope="module")
def trained():
    """A TwoInputNet after a few QAT steps (observers on), with the optimizer built before prepare."""
    torch.manual_seed(0)
    model = TwoInputNet()
    model.bn.running_var.fill_(1e-3)  # as if trained on these inputs
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    before = copy.deepcopy(model.state_dict())
    qat = prepare_qat(model, inputs(4))
    qat.attach()
    model.train()
    for step in range(8):
        batch = inputs(16, seed=step)
        optimizer.zero_grad()
        model(**batch).pow(2).mean().backward()
        optimizer.step()
    return model, qat, before


def test_training_moves_the_models_own_parameters(trained):
    model, qat, before = trained
    assert qat.attached and qat.num_fake_quantizers > 0
    assert list(model.state_dict()) == list(before)  # checkpoints keep the float model's keys
    assert not torch.equal(model.conv.weight, before["conv.weight"])
    assert not torch.equal(model.head.weight, before["head.weight"])
    assert not torch.equal(model.bn.running_mean, before["bn.running_mean"])  # BN statistics are the module's


def test_fake_quant_graph_matches_the_float_model_when_fake_quant_is_off():
    """BatchNorm momentum/eps and dropout p survive prepare and the train/eval helpers (torchao resets them)."""
    torch.manual_seed(0)
    model = TwoInputNet()
    reference = copy.deepcopy(model)
    qat = prepare_qat(model, inputs(4))
    set_fake_quant(qat, False)
    qat.observers_enabled = False
    batch = inputs(16, seed=1)
    for training in (True, False, True):  # train -> eval -> train again
        model.train(training), reference.train(training)
        torch.manual_seed(3)
        expected = reference(**batch)
        torch.manual_seed(3)
        got = qat(**batch)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
        # momentum 0.03: both updated their running statistics the same way
        torch.testing.assert_close(model.bn.running_var, reference.bn.running_var, rtol=1e-5, atol=1e-6)
    qat.freeze_batchnorm()
    model.train()
    frozen = model.bn.running_mean.clone()
    qat(**batch)
    torch.testing.assert_close(model.bn.running_mean, frozen, rtol=0, atol=0)


def test_eval_changes_no_weight_buffer_or_range(trained):
    model, qat, _ = trained
    state = copy.deepcopy(model.state_dict())
    ranges = qat.state_dict()
    qat.observers_enabled = False
    model.eval()
    with torch.no_grad():
        for seed in range(3):
            model(**inputs(8, seed=seed))
    model.train()
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[name]), name  # num_batches_tracked included
    ranges_after = qat.state_dict()
    for name, value in ranges["fake_quant"].items():
        if not name.endswith("observer_enabled"):
            assert torch.equal(ranges_after["fake_quant"][name], value), name


def test_convert_matches_the_fake_quant_model_and_folds_batchnorm(trained):
    model, qat, _ = trained
    model.eval()
    batch = inputs(3, seed=7)  # another batch size than the example: the batch is dynamic
    with torch.no_grad():
        expected = model(**batch)
    int8 = qat.convert()
    got = int8(batch["x"], batch["y"], scale=batch["scale"])
    model.train()
    ops = count_quantized_ops(int8)
    assert ops.get("aten.conv2d (int8 weight)") == 2 and ops.get("aten.linear (int8 weight)") == 2
    assert not any("batch_norm" in str(n.target) for n in int8.graph.nodes)
    # same ranges and weights: only rounding order differs; eps=1e-2 folded exactly (torchao would use 1e-5)
    assert (got - expected).abs().max() <= 0.03 * expected.abs().max()  # 14% with torchao's own fold


def test_pruning_masks_reach_the_graph_and_the_int8_weights():
    torch.manual_seed(0)
    model = TwoInputNet()
    qat = prepare_qat(model, inputs(4))
    qat.attach()
    model.train()
    model(**inputs(16))  # ranges
    prune.l1_unstructured(model.conv2, "weight", amount=0.5)
    model.eval()
    qat.observers_enabled = False
    with torch.no_grad():
        pruned_out = model(**inputs(8))
        model.conv2.weight_orig.mul_(model.conv2.weight_mask)  # what the mask means, applied by hand
        prune.remove(model.conv2, "weight")
        torch.testing.assert_close(model(**inputs(8)), pruned_out)
    model.train()
    model(**inputs(8))
    assert qat.graph.get_parameter("conv2.weight") is model.conv2.weight  # the new parameter, bound again
    int8 = qat.convert()
    int8_weights = [t for t in int8.state_dict().values() if t.dtype == torch.int8 and t.shape == (8, 8, 3, 3)]
    assert len(int8_weights) == 1 and (int8_weights[0] == 0).float().mean() >= 0.5


def test_state_dict_round_trip_reproduces_the_model():
    torch.manual_seed(0)
    model = TwoInputNet()
    qat = prepare_qat(model, inputs(4))
    model.train()
    qat(**inputs(16))
    qat.freeze_batchnorm()
    state = qat.state_dict()
    twin = copy.deepcopy(model)
    restored = prepare_qat(twin, inputs(4))
    restored.load_state_dict(state)
    assert restored.batchnorm_frozen and restored.observers_enabled == qat.observers_enabled
    model.eval(), twin.eval()
    torch.testing.assert_close(restored(**inputs(8)), qat(**inputs(8)), rtol=0, atol=0)
    state["fake_quant"].popitem()
    with pytest.raises(ValueError, match="does not match this model's QAT graph"):
        restored.load_state_dict(state)


@pytest.mark.parametrize(
    "config",
    [QATConfig(), QATConfig(observer="minmax", per_channel=False), QATConfig(observer="histogram")],
    ids=["moving_average", "minmax-per_tensor", "histogram"],
)
def test_every_fake_quant_buffer_round_trips_through_the_state(config):
    """Every buffer of every fake-quant module and observer, each set to a value a fresh graph does not
    have, comes back from ``state_dict``/``load_state_dict`` (torchao's versioned loading once reset eps)."""
    torch.manual_seed(0)
    model = TwoInputNet()
    qat = prepare_qat(model, inputs(4), config)
    model.train()
    qat(**inputs(16))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, buffer in _fake_quant_buffers(qat, copy=False).items():
            if name.endswith("observer_enabled"):
                continue  # the QATGraph's switch, saved as observers_enabled (set below)
            if buffer.is_floating_point():
                buffer.add_(torch.rand(buffer.shape, generator=g) + 0.5)
            else:
                buffer.add_(torch.randint(1, 5, buffer.shape, generator=g))
    qat.observers_enabled = False
    saved = _fake_quant_buffers(qat)
    restored = prepare_qat(copy.deepcopy(model), inputs(4), config)
    fresh = _fake_quant_buffers(restored)
    assert fresh.keys() == saved.keys()
    same_as_fresh = [n for n, v in saved.items() if v.shape == fresh[n].shape and torch.equal(v, fresh[n])]
    assert same_as_fresh == []  # the test can fail: every buffer must be carried by the state
    restored.load_state_dict(qat.state_dict())
    loaded = _fake_quant_buffers(restored)
    assert [n for n, v in saved.items() if not (v.shape == loaded[n].shape and torch.equal(v, loaded[n]))] == []
    assert restored.observers_enabled is False


def _fake_quant_buffers(qat, copy: bool = True) -> dict[str, torch.Tensor]:
    """Every buffer of the graph's fake-quant modules (and their observers), by name."""
    return {
        f"{name}.{buffer_name}": buffer.clone() if copy else buffer
        for name, module in qat.graph.named_children()
        if isinstance(module, FakeQuantizeBase)
        for buffer_name, buffer in module.named_buffers()
    }


def test_training_skips_the_fake_quant_calls_that_cannot_change_a_value():
    """A max-pool or flatten output shares its input's fake-quant: training drops that repeated call (the
    identity once ranges stop moving), evaluation and convert keep prepare's graph."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(72, 4),
    )
    x = torch.randn(16, 3, 6, 6)
    qat = prepare_qat(model, x[:4])
    qat.attach()

    def calls(graph):
        return sum(
            n.op == "call_module" and isinstance(graph.get_submodule(n.target), FakeQuantizeBase)
            for n in graph.graph.nodes
        )

    assert calls(qat.graph) == calls(qat.eval_graph) - 2  # after the max-pool and after flatten
    model.train()
    model(x)  # ranges
    qat.observers_enabled = False
    qat.freeze_batchnorm()  # training and evaluation now compute the same function
    with torch.no_grad():
        trained_graph = model(x)
        model.eval()
        torch.testing.assert_close(trained_graph, model(x), rtol=0, atol=1e-6)
        torch.testing.assert_close(qat.convert()(x), model(x), rtol=0.05, atol=0.05)


def test_what_cannot_work_is_an_error_that_says_why():
    with pytest.raises(ValueError, match="choose one of"):
        QATConfig(observer="percentile")
    with pytest.raises(ValueError, match="not submodules.*'conv'"):
        prepare_qat(TwoInputNet(), inputs(4), QATConfig(keep_float=("net.head",)))
    no_momentum = TwoInputNet()
    no_momentum.bn.momentum = None
    with pytest.raises(ValueError, match="momentum=None"):
        prepare_qat(no_momentum, inputs(4))
    with pytest.raises(ValueError, match="no fake-quant module"):
        prepare_qat(nn.Sequential(nn.ReLU(), nn.Tanh()), torch.randn(4, 3))
    qat = prepare_qat(TwoInputNet(), inputs(4))
    with pytest.raises(ValueError, match="no range"):
        qat.convert()  # never ran with observers on


def test_a_non_tensor_argument_is_a_constant_of_the_graph():
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor, factor: float = 2.0) -> torch.Tensor:
            return self.linear(x) * factor

    model = Scaled()
    qat = prepare_qat(model, (torch.randn(4, 4), 2.0))
    assert qat(torch.randn(3, 4), 2.0).shape == (3, 4)
    with pytest.raises(ValueError, match="non-tensor argument is fixed"):
        qat(torch.randn(3, 4), 3.0)


def test_a_float_conv_trains_as_plain_conv_batchnorm():
    """prepare_qat_pt2e rewrites float convs into the fake-quant conv-BN pattern too (w * s, conv / s):
    training runs them as conv + batch_norm (same function, cheaper), evaluation and convert keep the pattern."""
    torch.manual_seed(0)
    model = TwoInputNet()
    reference = copy.deepcopy(model)
    qat = prepare_qat(model, inputs(4), QATConfig(keep_float=("conv",)))

    def conv_weights(graph):
        return [n.args[1] for n in graph.graph.nodes if n.op == "call_function" and "conv" in str(n.target)]

    assert [w.op for w in conv_weights(qat.graph)] == ["get_attr", "call_module"]  # float weight, fake-quant
    assert [w.op for w in conv_weights(qat.eval_graph)] == ["call_function", "call_module"]  # prepare's w * s
    set_fake_quant(qat, False)
    batch = inputs(16, seed=1)
    model.train(), reference.train()
    torch.manual_seed(3)
    expected = reference(**batch)
    torch.manual_seed(3)
    got = qat(**batch)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.bn.running_var, reference.bn.running_var, rtol=1e-5, atol=1e-6)
    assert torch.equal(model.bn.num_batches_tracked, reference.bn.num_batches_tracked)
    set_fake_quant(qat, True)
    for seed in range(3):
        qat(**inputs(16, seed=seed))  # ranges
    qat.observers_enabled = False
    model.eval()
    with torch.no_grad():
        expected = model(**batch)
    got = qat.convert()(batch["x"], batch["y"], scale=batch["scale"])
    assert (got - expected).abs().max() <= 0.03 * expected.abs().max()
