"""Weight-only int4/int8 quantization: one grid for training, storing and running; files verified like int8's;
the callbacks (after training, and QAT from ``start_epoch``) on a real Trainer; the language-model demo."""

from __future__ import annotations

import json

import onnx
import pytest
import torch
from conftest import compose_train, fast_trainer, run_files_alone, run_train_script
from torch import nn

from lightning_quant import WeightOnlyQAT, WeightOnlyQuantization, load
from lightning_quant.demo import ByteLanguageModel, StdlibTextDataModule
from lightning_quant.demo.language_model import generate
from lightning_quant.export import export, verify_artifacts
from lightning_quant.inputs import ModelInputs
from lightning_quant.manifest import format_table
from lightning_quant.pipeline import deploy
from lightning_quant.quantization import WeightOnlyConfig, quantize
from lightning_quant.quantization.quantize import count_quantized_ops
from lightning_quant.quantization.weight_only import (
    FakeQuantizedLinear,
    WeightOnlyLinear,
    dequantize_linear,
    fake_quantize_weight,
    prepare_qat,
    remove_qat,
)
from lightning_quant.weight_packing import dequantize, pack, quantize_weight, unpack


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 10)).eval()


@pytest.mark.parametrize("bits", [4, 8])
def test_grid_keeps_each_groups_largest_weight_and_packing_round_trips(bits):
    weight = torch.randn(24, 128)
    q, scale = quantize_weight(weight, bits, 32)
    assert q.dtype == torch.int8 and int(q.min()) >= -(2 ** (bits - 1)) and int(q.max()) <= 2 ** (bits - 1) - 1
    restored = (q.float().reshape(24, 4, 32) * scale.unsqueeze(2)).reshape(24, 128)
    largest = weight.reshape(24, 4, 32).abs().argmax(dim=2, keepdim=True)
    assert torch.allclose(
        restored.reshape(24, 4, 32).gather(2, largest), weight.reshape(24, 4, 32).gather(2, largest), rtol=1e-6
    )
    error = (restored - weight).abs().reshape(24, 4, 32).amax(dim=2)
    assert bool((error <= scale.abs() + 1e-6).all())  # the nearest level; one level at the clipped side
    packed = pack(q, bits, 32)
    assert packed.dtype == torch.uint8 and tuple(packed.shape) == (24, 4, 32 * bits // 8)
    assert torch.equal(unpack(packed, bits).reshape(24, 128), q)
    assert torch.allclose(dequantize(packed, scale, bits), restored)


def test_fake_quantization_is_the_stored_grid_with_a_straight_through_gradient():
    model = mlp()
    weight = model[2].weight.detach().clone().requires_grad_()
    fake = fake_quantize_weight(weight, 4, 32)
    fake.sum().backward()
    assert torch.equal(weight.grad, torch.ones_like(weight))  # straight through
    int4 = quantize(model, WeightOnlyConfig(bits=4, group_size=32), torch.randn(2, 64))
    assert torch.allclose(fake.detach(), dequantize_linear(int4[2]), atol=1e-6)

    names = prepare_qat(model, WeightOnlyConfig(bits=4))
    assert names == ["0", "2", "4"] and type(model[2]) is FakeQuantizedLinear
    assert model[2].weight is not None and set(model.state_dict()) == set(mlp().state_dict())
    x = torch.randn(3, 64)
    assert torch.allclose(model(x), int4(x), atol=1e-5)  # training sees exactly what ships
    remove_qat(model)
    assert type(model[2]) is nn.Linear and not hasattr(model[2], "bits")


def test_config_refuses_bits_and_group_sizes_it_cannot_ship():
    with pytest.raises(ValueError, match=r"bits must be one of \[4, 8\]"):
        WeightOnlyConfig(bits=3)
    with pytest.raises(ValueError, match="group_size must be 16, 32, 64, 128 or 256"):
        WeightOnlyConfig(group_size=48)
    with pytest.raises(ValueError, match=r"bits must be one of \[4, 8\]"):
        WeightOnlyQuantization(bits=2)
    with pytest.raises(ValueError, match="start_epoch must be a non-negative integer"):
        WeightOnlyQAT(start_epoch=-1)


def test_onnx_file_runs_onnx_runtimes_4bit_kernel_and_matches_the_model(tmp_path):
    model = mlp()
    x = torch.randn(8, 64)
    int4 = quantize(model, WeightOnlyConfig(bits=4, group_size=32), x)
    assert [type(m).__name__ for m in int4 if isinstance(m, (nn.Linear, WeightOnlyLinear))] == ["WeightOnlyLinear"] * 3
    artifacts = export(int4, x, ["onnx", "torch_export"], tmp_path)
    graph = onnx.load(str(tmp_path / artifacts[0].path)).graph
    nodes = [n for n in graph.node if n.op_type == "MatMulNBits"]
    assert len(nodes) == 3 and all(n.domain == "com.microsoft" for n in nodes)
    assert not [n for n in graph.node if n.op_type in ("MatMul", "Gemm")]  # no float weight left behind
    cases = [ModelInputs.from_value(torch.randn(batch, 64)) for batch in (1, 5)]  # any batch size
    report = verify_artifacts(artifacts, int4, cases, tmp_path)
    assert report["onnx"]["relative_error"] < 1e-4 and report["torch_export"]["relative_error"] < 1e-5


def test_embedding_tables_are_stored_on_the_same_grid_looked_up_packed_and_trained_on_it(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(50, 64), nn.Flatten(), nn.Linear(3 * 64, 10)).eval()
    tokens = torch.randint(0, 50, (4, 3))
    int4 = quantize(model, WeightOnlyConfig(bits=4, group_size=32), tokens)
    assert type(int4[0]).__name__ == "WeightOnlyEmbedding" and int4[0].packed.shape == (50, 2, 16)
    table = dequantize_linear(int4[0])
    torch.testing.assert_close(int4[0](tokens), nn.functional.embedding(tokens, table))
    assert torch.equal(table, fake_quantize_weight(model[0].weight, 4, 32).detach())  # QAT's grid
    prepare_qat(model, WeightOnlyConfig(bits=4, group_size=32))
    assert type(model[0]).__name__ == "FakeQuantizedEmbedding"
    torch.testing.assert_close(model(tokens), int4(tokens))  # training sees what ships
    artifacts = export(int4, tokens, ["onnx"], tmp_path)
    cases = [ModelInputs.from_value(torch.randint(0, 50, (batch, 3))) for batch in (1, 5)]
    assert verify_artifacts(artifacts, int4, cases, tmp_path)["onnx"]["relative_error"] < 1e-5
    assert count_quantized_ops(int4) == {"Embedding (int4 weight-only)": 1, "Linear (int4 weight-only)": 1}
    alone = quantize(model[0], WeightOnlyConfig(bits=4, group_size=32), tokens)  # a model that is one layer
    assert type(alone).__name__ == "WeightOnlyEmbedding" and torch.equal(alone(tokens), int4[0](tokens))


def test_torchao_file_holds_the_same_grid_as_torchao_tensors_and_its_state_dict_loads_into_the_float_model(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(50, 64), nn.Flatten(), nn.Linear(3 * 64, 10)).eval()
    tokens = torch.randint(0, 50, (4, 3))
    deployment = deploy(model, WeightOnlyConfig(bits=4), tokens, dirpath=tmp_path, formats=["onnx", "torchao"])
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    torchao_file = next(a for a in manifest["artifacts"] if a["format"] == "torchao")
    assert torchao_file["path"] == "model_torchao.pt" and torchao_file["details"]["layers"] == 2
    state_dict = torch.load(tmp_path / "model_torchao.pt", weights_only=True)["state_dict"]  # tensors only
    assert {type(state_dict["0.weight"]).__name__, type(state_dict["2.weight"]).__name__} == {
        "IntxUnpackedToInt8Tensor"
    }
    fresh = nn.Sequential(nn.Embedding(50, 64), nn.Flatten(), nn.Linear(3 * 64, 10)).eval()
    fresh.load_state_dict(state_dict, assign=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh(tokens), deployment.model.reference(tokens))
        torch.testing.assert_close(load(tmp_path, format="torchao")(tokens), deployment.model.reference(tokens))
    assert manifest["recommended"] == "onnx" or manifest["recommended"] is None  # a checkpoint, never the runtime pick


def test_deploy_writes_verified_int4_files_a_quarter_of_float_that_load_reads(tmp_path):
    model = mlp()
    x = torch.randn(8, 64)
    deployment = deploy(model, WeightOnlyConfig(bits=4), x, dirpath=tmp_path, formats=["torch_export"])
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["approach"] == "weight_only" and manifest["bits"] == 4 and manifest["group_size"] == 32
    assert manifest["size_bytes"]["quantized"] <= 0.3 * manifest["size_bytes"]["float"]
    assert manifest["quantized_ops"] == {"Linear (int4 weight-only)": 3}
    assert "int4 (weight_only)" in format_table(manifest)
    every_format_failed = {**manifest, "artifacts": [], "latency_ms": {"float": manifest["latency_ms"]["float"]}}
    assert "int4 (weight_only)" in format_table(every_format_failed)
    loaded = load(tmp_path)
    with torch.no_grad():
        assert torch.allclose(loaded(x), deployment.model(x), atol=1e-5)
        assert not torch.equal(loaded(x), model(x))  # the 4-bit weights, not the float ones


def wide_mlp() -> nn.Module:  # 2 MB of float weights: the .pt2's own overhead (its graph, ~70 kB) is small beside
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 1024), nn.GELU(), nn.Linear(1024, 256)).eval()


def embedding_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(4096, 128), nn.Flatten(), nn.Linear(3 * 128, 10)).eval()


@pytest.mark.parametrize(
    "model, example",
    [(wide_mlp, lambda: torch.randn(8, 256)), (embedding_model, lambda: torch.randint(0, 4096, (8, 3)))],
    ids=["linear", "embedding"],
)
def test_int4_programs_hold_core_aten_ops_only_and_run_with_plain_torch(model, example, tmp_path):
    float_model, x = model(), example()
    deployment = deploy(float_model, WeightOnlyConfig(bits=4), x, dirpath=tmp_path, formats=["torch_export"])
    (artifact,) = json.loads((tmp_path / "manifest.json").read_text())["artifacts"]
    program = torch.export.load(tmp_path / artifact["path"])
    assert {node.target.namespace for node in program.graph.nodes if node.op == "call_function"} == {"aten"}
    # in a fresh process that never imports lightning_quant: plain torch.export.load(path).module()(x)
    outputs = run_files_alone(tmp_path, x)["torch_export"]
    with torch.no_grad():
        torch.testing.assert_close(outputs[0], deployment.model(x))
    # the packed uint8 weights are the program's constants (not unpacked at export): the file stays int4-sized
    assert {t.dtype for t in program.state_dict.values() if t.dim() == 3} == {torch.uint8}
    float_bytes = sum(p.numel() * p.element_size() for p in float_model.parameters())
    assert (tmp_path / artifact["path"]).stat().st_size < 0.3 * float_bytes


def lm_trainer(tmp_path, callback, epochs=2):
    torch.manual_seed(0)
    model = ByteLanguageModel(width=64, layers=1, heads=2, block_size=32)
    data = StdlibTextDataModule(block_size=32, batch_size=8, max_bytes=6000)
    trainer = fast_trainer(tmp_path, [callback], max_epochs=epochs, limit_train_batches=6, limit_val_batches=2)
    return trainer, model, data


def test_post_training_int4_callback_ships_the_language_model(tmp_path):
    callback = WeightOnlyQuantization(bits=4, formats=["torch_export"], dirpath=tmp_path / "int4")
    trainer, model, data = lm_trainer(tmp_path, callback, epochs=1)
    trainer.fit(model, data)
    manifest = json.loads((tmp_path / "int4" / "manifest.json").read_text())
    assert manifest["approach"] == "weight_only" and manifest["status"] != "failed"
    linears = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    assert manifest["quantized_ops"] == {"Linear (int4 weight-only)": len(linears), "Embedding (int4 weight-only)": 2}
    assert "val/perplexity" in manifest["metrics"]["quantized"]
    assert all(type(m) is not FakeQuantizedLinear for m in model.modules())  # the user's module is unchanged
    # the file is the generation step (timed as the example: one sequence, one byte), for any batch
    assert manifest["latency_ms"]["input_shape"] == [1, 1]
    step = load(tmp_path / "int4")
    logits, *cache = step(torch.zeros(3, 1, dtype=torch.long), model.empty_cache(3), torch.tensor(0))
    assert logits.shape == (3, 1, 256) and len(cache) == 2 and cache[0].shape == (3, 2, 32, 32)
    int4 = quantize(model, WeightOnlyConfig(bits=4), model.example_input_array)
    assert generate(step, b"import ", 12, model.empty_cache(1)) == generate(int4, b"import ", 12, model.empty_cache(1))


def test_a_generation_step_with_the_cache_gives_the_logits_of_the_whole_sequence():
    torch.manual_seed(0)
    model = ByteLanguageModel(width=32, layers=2, heads=2, block_size=16).eval()
    tokens = torch.randint(0, 256, (3, 12))
    with torch.no_grad():
        whole = model(tokens)
        prompt, *cache = model(tokens[:, :5], model.empty_cache(3), torch.tensor(0))  # several bytes in one step
        steps = [prompt]
        for position in range(5, 12):
            logits, *cache = model(tokens[:, position : position + 1], tuple(cache), torch.tensor(position))
            steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), whole, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="both cache and position"):
        model(tokens, model.empty_cache(3))


def test_qat_trains_fake_quantized_from_start_epoch_and_ships_that_grid(tmp_path):
    callback = WeightOnlyQAT(start_epoch=1, bits=4, formats=["torch_export"], dirpath=tmp_path / "int4")
    seen: list[tuple[int, bool]] = []

    trainer, model, data = lm_trainer(tmp_path, callback, epochs=2)
    hook = model.register_forward_pre_hook(
        lambda module, args: (
            seen.append((trainer.current_epoch, any(type(m) is FakeQuantizedLinear for m in module.modules())))
            if module.training
            else None
        )
    )
    trainer.fit(model, data)
    hook.remove()
    assert set(seen) == {(0, False), (1, True)}  # every training step of epoch 1 fake-quantized, none of epoch 0
    assert all(type(m) is not FakeQuantizedLinear for m in model.modules())  # removed at fit end
    checkpoint = torch.load(next((tmp_path).rglob("*.ckpt")), weights_only=False)
    assert set(checkpoint["state_dict"]) == set(model.state_dict())  # names unchanged: loads into the plain model
    manifest = json.loads((tmp_path / "int4" / "manifest.json").read_text())
    assert manifest["approach"] == "weight_only_qat" and manifest["qat"] == {"start_epoch": 1}
    int4 = quantize(model, WeightOnlyConfig(bits=4), model.example_input_array)
    step = (torch.randint(0, 256, (2, 1)), tuple(torch.randn(c.shape) for c in model.empty_cache(2)), torch.tensor(7))
    with torch.no_grad():
        for file_output, model_output in zip(load(tmp_path / "int4")(*step), int4(*step)):
            torch.testing.assert_close(file_output, model_output, atol=1e-4, rtol=1e-4)


def test_the_language_model_experiment_composes_with_int4_qat():
    cfg = compose_train(["experiment=byte_lm", "callbacks=int4_qat"])
    assert cfg.callbacks.int4_qat.start_epoch < cfg.trainer.max_epochs  # QAT epochs happen
    assert cfg.checkpoint.monitor is None  # test() reads the last epoch's weights: the ones quantized


@pytest.mark.slow
def test_train_script_runs_the_language_model_with_int4_qat(tmp_path):
    run = run_train_script(
        tmp_path,
        "experiment=byte_lm",
        "callbacks=int4_qat",
        "model.width=64",
        "model.layers=1",
        "model.heads=2",
        "model.block_size=32",
        "data.max_bytes=8000",
        "trainer.max_epochs=2",
        "callbacks.int4_qat.start_epoch=1",
        "callbacks.int4_qat.formats=[torch_export]",
    )
    assert run.returncode == 0, run.stderr[-3000:]
    manifest = json.loads(next(tmp_path.rglob("quantized/manifest.json")).read_text())
    assert manifest["approach"] == "weight_only_qat" and manifest["bits"] == 4
    assert manifest["size_bytes"]["quantized"] <= 0.5 * manifest["size_bytes"]["float"]


def test_accuracy_budget_returns_the_most_sensitive_linear_layers_to_float(tmp_path):
    budget = {"metric": "val/perplexity", "max_drop": 0.0, "relative": True, "higher_is_better": False}
    callback = WeightOnlyQuantization(
        bits=4, formats=["torch_export"], dirpath=tmp_path / "int4", max_metric_drop=budget
    )
    trainer, model, data = lm_trainer(tmp_path, callback, epochs=1)
    trainer.fit(model, data)
    manifest = json.loads((tmp_path / "int4" / "manifest.json").read_text())
    returned = [layer["name"] for layer in manifest["accuracy_budget"]["float_layers"]]
    quantizable = [n for n, m in model.named_modules() if type(m) in (nn.Linear, nn.Embedding)]
    assert returned and set(returned) <= set(quantizable) and manifest["keep_float"] == returned
    assert sum(manifest["quantized_ops"].values()) == len(quantizable) - len(returned)
    assert manifest["accuracy_budget"]["after"] < manifest["accuracy_budget"]["before"]  # lower perplexity
