"""OptimizeForInference: the float model exported (AOTInductor, ONNX, torch.export), verified, in a manifest."""

from __future__ import annotations

import copy
import json
import math

import lightning as L
import onnxruntime
import pytest
import torch
import torch.nn.functional as F
from conftest import produced_formats
from openvino import Type
from torch import nn

from lightning_quant import ChannelsLast, OptimizeForInference
from lightning_quant.app import train
from lightning_quant.demo import ConvNet, DigitsClassifier, DigitsDataModule
from lightning_quant.export import export, load_artifact
from lightning_quant.precision import to_bfloat16
from lightning_quant.target import resolve_target


def make_trainer(tmp_path, callbacks, limit_train_batches=10, max_epochs=1):
    return L.Trainer(
        default_root_dir=tmp_path,
        max_epochs=max_epochs,
        limit_train_batches=limit_train_batches,
        limit_val_batches=3,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


@pytest.fixture(scope="module")
def optimized(tmp_path_factory):
    """A conv net trained with ChannelsLast, then exported in every format by OptimizeForInference."""
    tmp_path = tmp_path_factory.mktemp("optimize")
    L.seed_everything(0)
    module = DigitsClassifier(ConvNet(channels=16))
    callback = OptimizeForInference(dirpath=tmp_path / "optimized")
    trainer = make_trainer(tmp_path, [ChannelsLast(), callback], limit_train_batches=None, max_epochs=2)
    trainer.fit(module, datamodule=DigitsDataModule())
    return module.eval(), callback, tmp_path / "optimized"


def test_the_manifest_describes_verified_float_artifacts(optimized):
    module, callback, dirpath = optimized
    manifest = callback.manifest
    assert json.loads((dirpath / "manifest.json").read_text()) == manifest
    assert manifest["approach"] == "float" and manifest["dtype"] == "float32"  # auto, for the default avx2 target
    assert manifest["quantized_ops"] == {}
    assert produced_formats(manifest) == {"aoti", "onnx", "openvino", "torch_export"}
    for artifact in manifest["artifacts"]:
        weights = [artifact["details"]["weights_file"]] if artifact["format"] == "openvino" else []  # its .bin
        assert sum((dirpath / name).stat().st_size for name in [artifact["path"], *weights]) == artifact["bytes"] > 0
        assert artifact["verification"]["relative_error"] < 1e-3  # float: the same numbers, not "close"
        assert artifact["latency_ms"] > 0
    assert (dirpath / manifest["float_checkpoint"]).is_file()
    accuracy = manifest["metrics"]
    assert accuracy["float"]["val/acc"] > 0.5  # trained for real
    assert math.isclose(accuracy["quantized"]["val/acc"], accuracy["float"]["val/acc"], abs_tol=1e-6)


def test_the_optimized_model_and_every_reloaded_file_match_the_module_at_any_batch_size(optimized):
    module, callback, dirpath = optimized
    assert callback.optimized_model is callback.quantized_model and callback.optimized_model.is_lowered
    for batch in (3, 64):
        x = torch.rand(batch, 1, 8, 8)
        with torch.no_grad():
            expected = module(x)
        torch.testing.assert_close(callback.optimized_model(x), expected, rtol=1e-4, atol=1e-4)
        for artifact in callback.manifest["artifacts"]:
            got = load_artifact(dirpath / artifact["path"], artifact["format"])(x)
            got = got[0] if isinstance(got, (list, tuple)) else got
            torch.testing.assert_close(torch.as_tensor(got), expected, rtol=1e-4, atol=1e-4)


def test_auto_dtype_is_bf16_only_for_a_target_that_computes_it_natively(tmp_path):
    """dtype="auto" on the widest target this CPU runs: bf16 where it has AVX-512 BF16 or AMX (the torch_export file
    computes in bf16, OpenVINO runs its file in bf16, the ONNX file stays float32), float32 on an AVX2 or VNNI-only
    CPU."""
    L.seed_everything(0)
    module = DigitsClassifier(ConvNet(channels=16))
    formats = ["torch_export", "onnx", "openvino"]
    callback = OptimizeForInference(formats=formats, target="native", dirpath=tmp_path / "auto")
    make_trainer(tmp_path, [callback], limit_train_batches=None).fit(module, datamodule=DigitsDataModule())
    manifest = callback.manifest
    bf16 = resolve_target("native").bf16
    assert manifest["dtype"] == ("bfloat16" if bf16 else "float32")
    assert manifest["dtype_choice"].startswith("auto: ")
    dtype = manifest["dtype"]
    assert manifest["dtype_by_format"] == {"torch_export": dtype, "onnx": "float32", "openvino": dtype}
    program_path, onnx_path, ir_path = (tmp_path / "auto" / path_of(manifest, name) for name in formats)
    program = torch.export.load(program_path)
    assert computes_in_bf16(program) == bf16
    assert all(i.type == "tensor(float)" for i in onnxruntime.InferenceSession(onnx_path).get_inputs())
    ir = load_artifact(ir_path, "openvino")  # loaded in the precision written into the IR
    assert ir.runtime.precision == ("bf16" if bf16 else "f32")
    assert ir.runtime.compiled.get_property("INFERENCE_PRECISION_HINT") == (Type.bf16 if bf16 else Type.f32)
    assert {a["format"] for a in manifest["artifacts"]} == set(formats)  # every file verified and kept


class LogsErrorVsFloat32(DigitsClassifier):
    """Also logs the model's relative error against a float32 copy of its weights as of the last validation
    (the trained model at fit end): 0 for the float32 model, a little above for one computing in bf16."""

    def on_validation_start(self):
        self.float32 = [copy.deepcopy(self.net).float()]  # in a list: not a submodule, so never cast to bf16

    def validation_step(self, batch, batch_idx):
        expected = self.float32[0](batch[0])
        error = (self(batch[0]) - expected).abs().max() / expected.abs().max()
        self.log("val/error_vs_float32", error)
        return super().validation_step(batch, batch_idx)


def test_bfloat16_export_takes_and_returns_float32_and_the_budget_returns_layers_to_float32(tmp_path):
    """dtype="bfloat16" for a bf16 target (refused for one without native bf16). Over its budget (no bf16 model is
    exactly float32's), the search returns the most sensitive layers to float32 up to max_float_fraction and ships the
    best model it found: the exported program keeps exactly its float32 layers in float32."""
    if not resolve_target("native").bf16:  # an AVX2 or VNNI-only CPU: refused, naming the targets that have bf16
        with pytest.raises(ValueError, match=r"target='avx512_bf16' or 'amx'"):
            OptimizeForInference(dtype="bfloat16", target="native")
        return
    L.seed_everything(0)
    module = LogsErrorVsFloat32(ConvNet(channels=16))
    budget = {"metric": "val/error_vs_float32", "max_drop": 0.0, "higher_is_better": False, "max_float_fraction": 0.5}
    callback = OptimizeForInference(
        dtype="bfloat16",
        formats=["torch_export", "openvino"],
        max_metric_drop=budget,
        target="native",
        dirpath=tmp_path / "bf16",
    )
    with pytest.warns(UserWarning, match="budget"):
        make_trainer(tmp_path, [callback], limit_train_batches=None).fit(module, datamodule=DigitsDataModule())
    manifest = callback.manifest
    assert manifest["dtype"] == "bfloat16" and manifest["dtype_choice"] == "dtype='bfloat16' was asked for"
    # OpenVINO runs a whole IR in one precision: under a budget, which returns layers to float32, float32
    assert manifest["dtype_by_format"] == {"torch_export": "bfloat16", "openvino": "float32"}
    assert load_artifact(tmp_path / "bf16" / path_of(manifest, "openvino"), "openvino").runtime.precision == "f32"
    report = manifest["accuracy_budget"]
    assert report["float"] == 0.0 < report["after"] <= report["before"] and not report["within_budget"]
    assert [step["float_layers"] for step in report["steps"]] == [0, 1, 2]  # it returned layers to float32
    returned = [layer["name"] for layer in report["float_layers"]]  # those of the best model (maybe none)
    program = torch.export.load(tmp_path / "bf16" / path_of(manifest, "torch_export"))
    assert computes_in_bf16(program)  # it really computes in bf16...
    weights = {name: tensor.dtype for name, tensor in program.state_dict.items() if name.endswith("weight")}
    float32 = {name for name, dtype in weights.items() if dtype == torch.float32}
    assert float32 == {f"{name}.weight" for name in returned} and len(float32) < len(weights)  # ...but those
    x = torch.rand(5, 1, 8, 8)
    out = program.module()(x)
    assert out.dtype == torch.float32
    with torch.no_grad():
        expected = module.eval()(x)
    assert (out.argmax(1) == expected.argmax(1)).float().mean() >= 0.8
    metrics = manifest["metrics"]
    assert abs(metrics["quantized"]["val/acc"] - metrics["float"]["val/acc"]) <= 0.05


def test_layers_kept_in_float32_stay_float32_in_the_exported_files(tmp_path):
    """to_bfloat16's float32 layers, through export: the program and the AOTInductor package hold their weights in
    float32, the rest in bf16, and both files compute what the mixed model computes."""
    torch.manual_seed(0)
    model = to_bfloat16(ConvNet(channels=8).eval(), keep_float=["head"])
    x = torch.rand(3, 1, 8, 8)
    artifacts = export(model, x, ["torch_export", "aoti"], tmp_path)
    program = torch.export.load(tmp_path / artifacts[0].path)
    dtypes = {name: tensor.dtype for name, tensor in program.state_dict.items() if name.endswith("weight")}
    assert dtypes["head.weight"] == torch.float32
    assert {dtype for name, dtype in dtypes.items() if name != "head.weight"} == {torch.bfloat16}
    with torch.no_grad():
        expected = model(x)
    for artifact in artifacts:
        got = load_artifact(tmp_path / artifact.path, artifact.format)(torch.cat([x, x]))
        torch.testing.assert_close(got, torch.cat([expected, expected]), rtol=2e-2, atol=2e-2)


def path_of(manifest, name):
    return next(a["path"] for a in manifest["artifacts"] if a["format"] == name)


def computes_in_bf16(program):
    return any(
        node.meta.get("val") is not None and getattr(node.meta["val"], "dtype", None) == torch.bfloat16
        for node in program.graph.nodes
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(dtype="float16"), "'auto', 'float32' or 'bfloat16'"),
        (dict(dtype="bfloat16"), r"target 'avx2' computes bf16 natively.*target='avx512_bf16'"),
        (dict(dtype="bfloat16", target="avx512_bf16", formats=["onnx"]), r"none of these files computes in bf16"),
        (dict(formats=["torchscript"]), "cannot export format"),
    ],
)
def test_bad_arguments_are_refused_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        OptimizeForInference(**kwargs)


class RowAttention(nn.Module):
    """Self-attention over the 8 rows of a digit, written by hand."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.embed = nn.Linear(8, dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.embed(x.flatten(1, 2))).chunk(3, dim=-1)
        weights = F.softmax(q @ k.transpose(1, 2) / math.sqrt(q.shape[-1]), dim=-1)
        return self.head((weights @ v).mean(dim=1))


def test_hand_written_attention_is_pointed_at(tmp_path):
    callback = OptimizeForInference(formats=["torch_export"], dirpath=tmp_path / "attention")
    with pytest.warns(UserWarning, match=r"scaled_dot_product_attention"):
        make_trainer(tmp_path, [callback], limit_train_batches=2).fit(
            DigitsClassifier(RowAttention()), datamodule=DigitsDataModule()
        )
    (where,) = callback.manifest["manual_attention"]
    assert where.startswith(f"{__file__}:") and where.endswith("(forward)")


def test_hydra_composes_amp_channels_last_and_optimize(fast_cfg, tmp_path):
    cfg = fast_cfg(
        "callbacks=[amp,channels_last,optimize]", "callbacks.optimize.formats=[onnx]", "callbacks.amp.measure_steps=1"
    )
    assert list(cfg.callbacks) == ["amp", "channels_last", "optimize"]
    train(cfg)
    assert "test/acc" in json.loads((tmp_path / "metrics.json").read_text())
    manifest = json.loads((tmp_path / "optimized" / "manifest.json").read_text())
    assert manifest["approach"] == "float"
    assert [a["format"] for a in manifest["artifacts"]] == ["onnx"]
