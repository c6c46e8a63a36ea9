"""module_view: the module's own step code runs against another model, and the module is never modified."""

import torch
from torch import nn

from lightning_quant.callbacks._evaluation import evaluate_validation
from lightning_quant.callbacks._view import module_view
from lightning_quant.demo import DigitsClassifier, MLPNet


class Helpers(DigitsClassifier):
    """validation_step through a helper method and super(), setting an attribute on the way."""

    def validation_step(self, batch, batch_idx):
        self.last_batch_idx = batch_idx
        self.log_dict({"val/mean_logit": self._logits(batch).mean()}, batch_size=len(batch[0]))
        return super().validation_step(batch, batch_idx)

    def _logits(self, batch):
        return self(batch[0])


def _batches(n=3, size=4):
    torch.manual_seed(0)
    return [(torch.rand(size, 1, 8, 8), torch.randint(0, 10, (size,))) for _ in range(n)]


def _snapshot(module):
    return {
        "dict": dict(vars(module)),
        "modules": dict(module._modules),
        "parameters": dict(module._parameters),
        "buffers": dict(module._buffers),
        "state": {k: v.clone() for k, v in module.state_dict().items()},
        "forward": type(module).forward,
    }


def _assert_untouched(module, before):
    assert dict(vars(module)) == before["dict"]  # same keys, same objects: nothing set, nothing replaced
    assert "forward" not in vars(module) and "log" not in vars(module) and "log_dict" not in vars(module)
    assert dict(module._modules) == before["modules"]
    assert dict(module._parameters) == before["parameters"] and dict(module._buffers) == before["buffers"]
    for name, value in module.state_dict().items():
        assert torch.equal(value, before["state"][name]), name


def test_view_runs_the_given_model_and_records_logs_without_touching_the_module():
    module = Helpers(MLPNet()).eval()
    before = _snapshot(module)
    calls = []

    def model(x):
        calls.append(x.shape[0])
        return torch.zeros(x.shape[0], 10)

    view = module_view(module, model)
    assert isinstance(view, Helpers)
    view.validation_step(_batches(1)[0], 7)
    assert calls == [4, 4]  # the helper's self(...) and the demo's: both reach the model
    assert sorted(view.logged) == ["val/acc", "val/loss", "val/mean_logit"]
    assert view.logged["val/mean_logit"] == [(torch.tensor(0.0), 4)]
    assert view.last_batch_idx == 7  # set on the view ...
    assert not hasattr(module, "last_batch_idx")  # ... not on the module
    view.net = nn.Linear(2, 2)  # registering a submodule stays on the view too
    assert isinstance(module.net, MLPNet)
    _assert_untouched(module, before)


def test_view_without_model_runs_the_class_forward_even_when_the_instance_overrides_it():
    module = DigitsClassifier(MLPNet()).eval()
    module.forward = lambda x: torch.full((x.shape[0], 10), 5.0)  # e.g. QAT's fake-quant graph, attached
    x = torch.rand(2, 1, 8, 8)
    torch.testing.assert_close(module_view(module)(x), module.net(x))
    assert vars(module)["forward"](x).eq(5.0).all()  # still the instance's own


def test_evaluate_validation_leaves_the_module_untouched_and_matches_its_own_forward():
    module = Helpers(MLPNet()).eval()
    before = _snapshot(module)
    batches = _batches()
    own = evaluate_validation(module, module.net, [batches], [float("inf")])
    _assert_untouched(module, before)
    zeros = evaluate_validation(module, lambda x: torch.zeros(x.shape[0], 10), [batches], [2])
    _assert_untouched(module, before)
    assert sorted(own) == ["val/acc", "val/loss", "val/mean_logit"]
    assert zeros["val/mean_logit"] == 0.0 and abs(zeros["val/loss"] - torch.log(torch.tensor(10.0)).item()) < 1e-5
    logits = torch.cat([module.net(x) for x, _ in batches])
    labels = torch.cat([y for _, y in batches])
    assert abs(own["val/acc"] - (logits.argmax(1) == labels).float().mean().item()) < 1e-6
    assert abs(own["val/mean_logit"] - logits.mean().item()) < 1e-5  # equal batch sizes: the weighted mean
