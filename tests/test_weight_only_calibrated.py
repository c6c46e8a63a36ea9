"""int4 weights chosen on calibration data (``WeightOnlyConfig(method="clip" | "gptq")``): closer to float than
round to nearest on the data, the same MatMulNBits files, read from the fit's dataloader by the callback."""

from __future__ import annotations

import copy
import json

import onnx
import pytest
import torch
from conftest import compose_train, fast_trainer
from torch import nn

from lightning_quant import WeightOnlyQAT, WeightOnlyQuantization
from lightning_quant.demo import ByteLanguageModel, StdlibTextDataModule
from lightning_quant.export import export, verify_artifacts
from lightning_quant.inputs import ModelInputs
from lightning_quant.pipeline import deploy
from lightning_quant.quantization import WeightOnlyConfig, quantize
from lightning_quant.quantization.weight_calibration import gptq_quantize, input_second_moments
from lightning_quant.quantization.weight_only import _calibrated_weights, execution_order
from lightning_quant.weight_packing import quantize_weight


def outlier_inputs(count: int, seed: int) -> list[torch.Tensor]:
    """Batches with a few large input channels (as language models' activations have)."""
    generator = torch.Generator().manual_seed(seed)
    channel_scale = torch.ones(128)
    channel_scale[:6] = 12.0
    return [torch.randn(128, 128, generator=generator) * channel_scale for _ in range(count)]


def outlier_mlp() -> tuple[nn.Module, list[torch.Tensor]]:
    """A small MLP and its calibration inputs."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 256), nn.GELU(), nn.Linear(256, 64)).eval()
    return model, outlier_inputs(4, seed=0)


def output_error(model: nn.Module, quantized: nn.Module, batches: list[torch.Tensor]) -> float:
    with torch.no_grad():
        return float(sum((quantized(x) - model(x)).pow(2).sum() for x in batches))


def test_data_methods_are_closer_to_float_than_round_to_nearest_on_the_calibration_data():
    model, batches = outlier_mlp()
    errors = {
        method: output_error(model, quantize(model, WeightOnlyConfig(method=method), batches[0], batches), batches)
        for method in ("rtn", "clip", "gptq")
    }
    assert errors["clip"] < 0.9 * errors["rtn"]
    assert errors["gptq"] < 0.6 * errors["rtn"] and errors["gptq"] < errors["clip"]
    # and on inputs of the same distribution it did not see
    held_out = outlier_inputs(2, seed=1)
    rtn, gptq = (quantize(model, WeightOnlyConfig(method=m), batches[0], batches) for m in ("rtn", "gptq"))
    assert output_error(model, gptq, held_out) < output_error(model, rtn, held_out)


def test_gptq_stays_on_the_grid_and_without_data_spread_is_round_to_nearest():
    torch.manual_seed(0)
    weight = torch.randn(16, 64)
    q, scale = gptq_quantize(weight, torch.eye(64), bits=4, group_size=32)
    assert q.dtype == torch.int8 and int(q.min()) >= -8 and int(q.max()) <= 7 and scale.shape == (16, 2)
    # H the identity: no error is spread, and the searched scales never do worse than round to nearest
    q_rtn, scale_rtn = quantize_weight(weight, 4, 32)
    dq = (q.float().reshape(16, 2, 32) * scale.unsqueeze(2)).flatten(1)
    dq_rtn = (q_rtn.float().reshape(16, 2, 32) * scale_rtn.unsqueeze(2)).flatten(1)
    assert (dq - weight).pow(2).sum() <= (dq_rtn - weight).pow(2).sum()


def test_second_moments_are_the_mean_outer_product_of_each_layers_inputs():
    model, batches = outlier_mlp()
    moments = input_second_moments(model, ["0", "2"], [ModelInputs.from_value(x) for x in batches])
    x = torch.cat(batches).double()
    torch.testing.assert_close(moments["0"], x.t() @ x / len(x), rtol=1e-5, atol=1e-4)  # summed in float32
    assert moments["2"].shape == (256, 256)


def test_gptq_file_runs_matmulnbits_in_onnx_runtime_and_matches_the_model(tmp_path):
    model, batches = outlier_mlp()
    int4 = quantize(model, WeightOnlyConfig(method="gptq"), batches[0], batches)
    artifacts = export(int4, batches[0], ["onnx"], tmp_path)
    graph = onnx.load(str(tmp_path / artifacts[0].path)).graph
    assert [n.op_type for n in graph.node if n.op_type in ("MatMulNBits", "MatMul", "Gemm")] == ["MatMulNBits"] * 2
    report = verify_artifacts(artifacts, int4, [ModelInputs.from_value(x) for x in batches[:2]], tmp_path)
    assert report["onnx"]["relative_error"] < 1e-4


def test_deploy_chooses_the_weights_on_calibration_data_and_refuses_without(tmp_path):
    model, batches = outlier_mlp()
    with pytest.raises(ValueError, match=r"method='gptq'\) needs calibration_data"):
        deploy(model, WeightOnlyConfig(method="gptq"), batches[0], dirpath=tmp_path, formats=["onnx"])
    with pytest.raises(ValueError, match=r"method='clip'\) chooses the weights on calibration inputs"):
        quantize(model, WeightOnlyConfig(method="clip"), batches[0])
    deployment = deploy(
        model, WeightOnlyConfig(method="gptq"), batches[0], calibration_data=batches, dirpath=tmp_path, formats=["onnx"]
    )
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["method"] == "gptq" and manifest["quantized_ops"] == {"Linear (int4 weight-only)": 2}
    rtn = quantize(model, WeightOnlyConfig(), batches[0])
    assert output_error(model, deployment.model, batches) < output_error(model, rtn, batches)


def test_bad_method_and_calibration_settings_are_refused_clearly():
    with pytest.raises(ValueError, match=r"method must be one of \['rtn', 'clip', 'gptq'\]"):
        WeightOnlyConfig(method="awq")
    with pytest.raises(ValueError, match=r"method must be one of"):
        WeightOnlyQuantization(method="GPTQ")
    with pytest.raises(ValueError, match="num_calibration_batches must be a positive integer"):
        WeightOnlyQuantization(method="gptq", num_calibration_batches=0)
    with pytest.raises(ValueError, match=r"calibration_dataloader must be one of \['train', 'val'\]"):
        WeightOnlyQuantization(method="gptq", calibration_dataloader="test")
    with pytest.raises(ValueError, match="WeightOnlyQAT trains the weights for round to nearest"):
        WeightOnlyQAT(method="gptq")


def tiny_lm(tmp_path, callback):
    torch.manual_seed(0)
    model = ByteLanguageModel(width=64, layers=1, heads=2, block_size=32)
    data = StdlibTextDataModule(block_size=32, batch_size=8, max_bytes=6000)
    trainer = fast_trainer(tmp_path, [callback], max_epochs=1, limit_train_batches=6, limit_val_batches=2)
    return trainer, model, data


def test_callback_reads_calibration_batches_from_the_dataloader_and_ships_gptq_weights(tmp_path):
    callback = WeightOnlyQuantization(
        method="gptq",
        num_calibration_batches=3,
        calibration_dataloader="val",
        formats=["onnx"],
        dirpath=tmp_path / "int4",
    )
    trainer, model, data = tiny_lm(tmp_path, callback)
    trainer.fit(model, data)
    manifest = json.loads((tmp_path / "int4" / "manifest.json").read_text())
    assert manifest["status"] != "failed" and manifest["method"] == "gptq"
    assert manifest["calibration"] == {"dataloader": "val", "batches": 3, "batches_requested": 3}
    assert manifest["quantized_ops"]["Linear (int4 weight-only)"] == 5
    # the shipped weights are GPTQ's on those batches: the same as quantizing with them directly
    batches = [tokens for tokens, _ in list(data.val_dataloader())[:3]]
    model.eval()
    gptq = quantize(model, WeightOnlyConfig(method="gptq"), batches[0], batches)
    rtn = quantize(model, WeightOnlyConfig(), batches[0])
    head = callback.quantized_model.reference.head  # type: ignore[union-attr]
    torch.testing.assert_close(head.packed, gptq.head.packed)
    assert not torch.equal(gptq.head.packed, rtn.head.packed)


def test_callback_with_a_data_method_refuses_a_fit_without_its_dataloader_before_training(tmp_path):
    callback = WeightOnlyQuantization(method="clip", calibration_dataloader="val", formats=["onnx"])
    trainer, model, data = tiny_lm(tmp_path, callback)
    data.setup("fit")
    with pytest.raises(ValueError, match=r"method='clip'\) chooses the weights on batches of the val dataloader"):
        trainer.fit(model, train_dataloaders=data.train_dataloader())
    assert trainer.global_step == 0


def test_the_int4_callback_config_selects_the_method_and_checks_it():
    from hydra.errors import ConfigCompositionException
    from hydra.utils import instantiate

    cfg = compose_train(["experiment=byte_lm", "callbacks=int4", "callbacks.int4.method=gptq"])
    callback = instantiate(cfg.callbacks.int4)
    assert callback.config.method == "gptq" and callback.num_calibration_batches == 16
    assert compose_train(["callbacks=int4"]).callbacks.int4.method == "rtn"  # data-free by default
    with pytest.raises(ConfigCompositionException):  # a key the callback does not take
        compose_train(["callbacks=int4", "callbacks.int4.calibration_batches=4"])
    with pytest.raises(Exception, match=r"method must be one of \['rtn', 'clip', 'gptq'\]"):
        instantiate(compose_train(["callbacks=int4", "callbacks.int4.method=awq"]).callbacks.int4)


class Reversed(nn.Module):
    """Layers declared in the opposite order to the one forward calls them in, the output tied to the embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.second = nn.Linear(64, 64)
        self.first = nn.Linear(64, 64)
        self.embedding = nn.Embedding(50, 64)
        self.head = nn.Linear(64, 50, bias=False)
        self.head.weight = self.embedding.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.second(torch.relu(self.first(self.embedding(tokens))))))


def test_layers_are_chosen_in_call_order_and_a_tied_weight_once():
    torch.manual_seed(0)
    model = Reversed().eval()
    batches = [torch.randint(0, 50, (16, 8)) for _ in range(3)]
    names = ["second", "first", "embedding", "head"]
    assert execution_order(model, names, ModelInputs.from_value(batches[0])) == ["embedding", "first", "second", "head"]
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    gptq = quantize(model, WeightOnlyConfig(method="gptq"), batches[0], batches)
    assert gptq.head.packed is gptq.embedding.packed  # one packed copy of the tied weight
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())  # float untouched
    rtn = quantize(model, WeightOnlyConfig(), batches[0])
    assert output_error(model, gptq, batches) < output_error(model, rtn, batches)
    # layer by layer (each measured after the ones before are quantized): on a copy, chosen once for the tied pair
    copied, calls = copy.deepcopy(model), [ModelInputs.from_value(x) for x in batches]
    chosen = _calibrated_weights(copied, names, WeightOnlyConfig(method="gptq"), calls, sequential=True)
    assert sorted(chosen) == ["embedding", "first", "second"]
    assert not torch.equal(copied.first.weight, model.first.weight)  # replaced by what it stores
