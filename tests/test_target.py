"""Deployment targets: int8 files that are right on every x86 CPU they claim, on AVX2 and VNNI machines alike.

These tests hold on both kinds of machine this project meets: on a CPU with VNNI the AVX2 numerics are checked
with oneDNN limited to AVX2 (``ONEDNN_MAX_CPU_ISA``); on an AVX2-only CPU they are this CPU's own.
"""

from __future__ import annotations

import functools
import json
import re
import time
from pathlib import Path

import onnx
import pytest
import torch
from conftest import fast_trainer
from onnx import numpy_helper
from torch import nn

from lightning_quant import PostTrainingQuantization, QuantizationAwareTraining, deploy, load
from lightning_quant.benchmark import measure_speed
from lightning_quant.cli import main as cli_main
from lightning_quant.demo import ConvNet, DigitsClassifier, DigitsDataModule
from lightning_quant.export import OrtStaticQuantization, export, verify_artifacts
from lightning_quant.manifest import build_manifest
from lightning_quant.quantization import DynamicQuantConfig, ModelInputs, QuantizationError, StaticQuantConfig, quantize
from lightning_quant.quantization.qat import QATConfig, prepare_qat
from lightning_quant.target import TARGETS, cpu_info, emulates_narrower_isa, missing_flags, resolve_target


class PositiveLinear(nn.Module):
    """All-positive weights and inputs: every u8 x s8 pair of products is large and of one sign, so an int16
    sum of pairs (x86 int8 kernels without VNNI) saturates with 8-bit weights and cannot with 7-bit ones."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(64, 16)
        with torch.no_grad():
            self.linear.weight.uniform_(0.5, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class PositiveConv(nn.Module):
    """The same for a convolution (oneDNN's int8 conv kernels are the ones that sum pairs in int16 on AVX2;
    its int8 inner product, measured under ONEDNN_MAX_CPU_ISA=AVX2, is exact either way)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(16, 16, 3)
        with torch.no_grad():
            self.conv.weight.uniform_(0.5, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def positive_batches(n: int = 4, shape: tuple[int, ...] = (8, 64)) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.rand(*shape, generator=generator) * 0.5 + 0.5 for _ in range(n)]


def graph_int8_weights(graph: torch.fx.GraphModule) -> torch.Tensor:
    """Every int8 constant (the weights) of a converted PT2E graph, flattened."""
    constants = [t for t in graph.buffers()]
    constants += [
        functools.reduce(getattr, n.target.split("."), graph) for n in graph.graph.nodes if n.op == "get_attr"
    ]
    return torch.cat([t.flatten() for t in constants if isinstance(t, torch.Tensor) and t.dtype == torch.int8])


def test_target_names_weight_ranges_and_the_native_choice():
    assert resolve_target("avx2").weight_range == (-64, 63)
    assert resolve_target("avx512_vnni").weight_range == resolve_target("amx").weight_range == (-128, 127)
    assert [name for name, target in TARGETS.items() if target.bf16] == ["avx512_bf16", "amx"]
    assert resolve_target("avx2").inductor_configs == {"cpp.march": "x86-64-v3", "cpp.simdlen": 256}
    native = resolve_target("native")
    assert not missing_flags(native)  # the widest target this CPU runs...
    wider = [t for t in TARGETS.values() if len(t.requires) > len(native.requires)]
    assert all(missing_flags(t) for t in wider)  # ...and no wider one
    assert emulates_narrower_isa(TARGETS["avx2"]) == ("avx512_vnni" in cpu_info()["flags"])
    for bad in ("avx512", "AVX2", 2):
        with pytest.raises(ValueError, match=r"Unknown target .*'avx2', 'avx512_vnni', 'avx512_bf16', 'amx', 'native'"):
            StaticQuantConfig(target=bad)
        with pytest.raises(ValueError, match="Unknown target"):
            PostTrainingQuantization(target=bad)


@pytest.mark.parametrize("target, bound", [("avx2", 64), ("avx512_vnni", 128)])
def test_static_int8_weights_use_the_targets_range(target, bound):
    model = PositiveLinear().eval()
    batches = positive_batches()
    int8 = quantize(model, StaticQuantConfig(target=target), batches[0], batches)
    weights = graph_int8_weights(int8)
    assert -bound <= int(weights.min()) and int(weights.max()) <= bound - 1
    assert int(weights.abs().max()) >= bound - 2  # the range is used, not just bounded


def test_avx2_verification_rejects_8bit_weights_and_accepts_7bit(tmp_path):
    """The same conv, exported for AVX2 CPUs: with 8-bit weights the int8 kernels of a CPU without VNNI saturate
    and verification says so (here, or under ONEDNN_MAX_CPU_ISA=AVX2 on a VNNI machine); with the avx2 target's
    7-bit weights the file is exact."""
    model = PositiveConv().eval()
    batches = positive_batches(shape=(8, 16, 8, 8))
    cases = [ModelInputs.from_value(b) for b in batches[:2]]
    eight_bit = quantize(model, StaticQuantConfig(target="avx512_vnni"), batches[0], batches)
    artifacts = export(eight_bit, batches[0], ["aoti"], tmp_path / "8bit", target="avx2")
    with pytest.raises(QuantizationError, match=r"aoti .*relative error .*exceeds the tolerance"):
        verify_artifacts(artifacts, eight_bit, cases, tmp_path / "8bit", target="avx2")

    seven_bit = quantize(model, StaticQuantConfig(target="avx2"), batches[0], batches)
    artifacts = export(seven_bit, batches[0], ["aoti"], tmp_path / "7bit", target="avx2")
    report = verify_artifacts(artifacts, seven_bit, cases, tmp_path / "7bit", target="avx2")["aoti"]
    assert report["relative_error"] < 1e-3
    runs = report["checked_on"]["runs"]
    assert runs == (["this CPU", "ONEDNN_MAX_CPU_ISA=AVX2"] if emulates_narrower_isa(TARGETS["avx2"]) else ["this CPU"])
    assert artifacts[0].details["inductor_configs"]["cpp.march"] == "x86-64-v3"


def test_dynamic_int8_for_avx2_is_exact_where_the_kernels_have_no_vnni(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 10)).eval()
    x = torch.randn(16, 256)
    int8 = quantize(model, DynamicQuantConfig(target="avx2"), x)
    artifacts = export(int8, x, ["aoti"], tmp_path, target="avx2")
    report = verify_artifacts(artifacts, int8, [ModelInputs.from_value(x)], tmp_path, target="avx2")["aoti"]
    assert report["relative_error"] < 1e-3


def test_onnx_runtime_files_hold_the_targets_weight_range(tmp_path):
    model = PositiveLinear().eval()
    batches = positive_batches()
    calibration = [ModelInputs.from_value(b) for b in batches]
    recipe = OrtStaticQuantization(calibration, observer="minmax")
    int8 = quantize(model, StaticQuantConfig(target="avx2"), batches[0], batches)
    cases = calibration[:2]

    artifacts = export(
        int8, batches[0], ["onnx"], tmp_path / "avx2", float_model=model, onnx_quantization=recipe, target="avx2"
    )
    weights = [
        numpy_helper.to_array(t)
        for t in onnx.load(str(tmp_path / "avx2" / "model.onnx")).graph.initializer
        if t.data_type == onnx.TensorProto.INT8
    ]
    assert weights and max(int(abs(w).max()) for w in weights) <= 64
    report = verify_artifacts(artifacts, int8, cases, tmp_path / "avx2", float_model=model, target="avx2")["onnx"]
    assert report["int8_weight_range"][1] <= 64

    # a file with 8-bit weights is refused for AVX2 CPUs, whatever this CPU computes
    artifacts = export(
        int8, batches[0], ["onnx"], tmp_path / "vnni", float_model=model, onnx_quantization=recipe, target="avx512_vnni"
    )
    with pytest.raises(QuantizationError, match=r"int8 weights span .* outside the 7-bit range target 'avx2' needs"):
        verify_artifacts(artifacts, int8, cases, tmp_path / "vnni", float_model=model, target="avx2")


def test_qat_trains_on_the_targets_weight_grid():
    torch.manual_seed(0)
    model = ConvNet(in_channels=3, channels=8).train()
    x = torch.rand(4, 3, 8, 8)
    qat = prepare_qat(model, x, QATConfig(target="avx2"))
    ranges = {
        (fq.quant_min, fq.quant_max) for fq in qat._fake_quantizers() if fq.dtype == torch.qint8 or fq.quant_min < 0
    }
    assert ranges == {(-64, 63)}
    qat.attach()
    model(x)
    weights = graph_int8_weights(qat.convert())
    assert int(weights.min()) >= -64 and int(weights.max()) <= 63


def fit(callback, tmp_path, epochs=1):
    trainer = fast_trainer(tmp_path, [callback], max_epochs=epochs, limit_train_batches=4)
    trainer.fit(DigitsClassifier(ConvNet(channels=8)), datamodule=DigitsDataModule(batch_size=32))
    return json.loads((tmp_path / "quantized" / "manifest.json").read_text())


@pytest.mark.slow
def test_default_run_records_cpu_target_speed_and_the_recommended_file(default_train_run):
    assert PostTrainingQuantization().target == "avx2"
    # the default `python train.py` (static int8, aoti, onnx and openvino; one run, shared with other files): the callback's
    # quantized_model runs the recommended file's runtime, tested on a PostTrainingQuantization fit in
    # test_ptq_callbacks.py
    run_dir, done = default_train_run
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((run_dir / "quantized" / "manifest.json").read_text())
    assert manifest["cpu"] == cpu_info() and "avx2" in manifest["cpu"]["flags"]
    assert manifest["target"]["name"] == "avx2" and manifest["target"]["weight_range"] == [-64, 63]
    assert {a["target"] for a in manifest["artifacts"]} == {"avx2"}
    latency = manifest["latency_ms"]
    for artifact in manifest["artifacts"]:
        assert artifact["speedup_vs_float"] == pytest.approx(latency["float"] / artifact["latency_ms"])
        assert artifact["faster_than_float"] == (artifact["speedup_vs_float"] > 1)
        assert (
            0 < artifact["latency_ms"] <= latency["spread_ms"][artifact["format"]][0]
        )  # the fastest call, at most p25
    fastest = min(manifest["artifacts"], key=lambda a: a["latency_ms"])
    assert manifest["recommended"] == (fastest["format"] if fastest["faster_than_float"] else None)
    assert latency["quantized"] == fastest["latency_ms"]
    assert len(manifest["latency_ms"]["load_average"]) == 2


def test_a_file_slower_than_float_is_never_recommended():
    model = nn.Linear(4, 4).eval()
    x = torch.zeros(2, 4)

    def slow(inputs):
        time.sleep(0.002)
        return model(inputs)

    speed = measure_speed(model, model, {"onnx": slow}, x, repeats=3, span_s=0)
    assert speed["fastest"] == "onnx" and speed["speedup_vs_float"]["onnx"] < 1
    manifest = build_manifest(
        approach="static",
        backend="x86",
        model="Linear",
        example_inputs=ModelInputs.from_value(x),
        dynamic_batch=True,
        artifacts=[],
        verification={},
        metrics={},
        speed=speed,
        latency_input=ModelInputs.from_value(x),
        target=resolve_target("avx2"),
        size_bytes={"float": 1, "quantized": 1},
        quantized_ops={},
    )
    assert manifest["recommended"] is None


def test_a_target_this_cpu_lacks_is_refused_before_training(tmp_path, cpu_lacking_a_target):
    lacking = cpu_lacking_a_target
    callback = PostTrainingQuantization(target=lacking)
    with pytest.raises(RuntimeError, match=rf"target={lacking!r}.* lacks .*target='avx2'"):
        fit(callback, tmp_path)
    assert not (tmp_path / "quantized" / "manifest.json").exists()


@pytest.mark.slow
def test_vnni_target_keeps_8bit_weights_where_the_cpu_has_vnni(tmp_path):
    callback = QuantizationAwareTraining(formats=["aoti"], target="avx512_vnni")
    if missing_flags("avx512_vnni"):  # an AVX2-only machine: refused, naming what is missing
        with pytest.raises(RuntimeError, match=r"lacks \[.*avx512"):
            fit(callback, tmp_path)
        return
    manifest = fit(callback, tmp_path)
    assert manifest["target"]["name"] == "avx512_vnni" and manifest["target"]["weight_range"] == [-128, 127]
    assert manifest["artifacts"][0]["details"]["inductor_configs"]["cpp.march"] == "x86-64-v4"
    emulated = ["ONEDNN_MAX_CPU_ISA=AVX512_CORE_VNNI"] if emulates_narrower_isa(TARGETS["avx512_vnni"]) else []
    assert manifest["artifacts"][0]["verification"]["checked_on"]["runs"] == ["this CPU", *emulated]  # AMX: VNNI too
    weights = graph_int8_weights(callback.quantized_model.reference)
    assert int(weights.abs().max()) > 64  # full 8-bit weights


def test_load_and_cli_refuse_a_file_built_for_instructions_this_cpu_lacks(tmp_path, capsys, cpu_lacking_a_target):
    model = PositiveLinear().eval()
    x = positive_batches()[0]
    int8 = quantize(model, DynamicQuantConfig(), x)
    lacking = TARGETS[cpu_lacking_a_target]
    artifacts = export(int8, x, ["torch_export"], tmp_path, target=lacking)
    speed = measure_speed(model, int8, {}, x, repeats=3)
    manifest = build_manifest(
        approach="dynamic",
        backend="x86",
        model="PositiveLinear",
        example_inputs=ModelInputs.from_value(x),
        dynamic_batch=True,
        artifacts=artifacts,
        verification={},
        metrics={},
        speed=speed,
        latency_input=ModelInputs.from_value(x),
        target=lacking,
        size_bytes={"float": 1, "quantized": 1},
        quantized_ops={},
    )
    (tmp_path / "manifest.json").write_text(json.dumps(manifest, default=str))
    lacks = re.escape(str(missing_flags(lacking)))
    with pytest.raises(
        RuntimeError, match=rf"built for target '{lacking.name}' .* this CPU .* lacks {lacks}.*target='avx2'"
    ):
        load(tmp_path)
    assert cli_main(["time", str(tmp_path / "model_program.pt2"), "--runs", "2", "--no-progress"]) != 0
    assert "lacks" in capsys.readouterr().err

    manifest["target"] = resolve_target("avx2").to_dict()  # the portable target's files load here
    (tmp_path / "manifest.json").write_text(json.dumps(manifest, default=str))
    assert load(tmp_path)(x).shape == (8, 16)


def test_cpuid_reads_the_same_instruction_sets_as_proc_cpuinfo():
    from lightning_quant.target import ISA_FLAGS, _cpuid_flags

    listed = set(Path("/proc/cpuinfo").read_text().split("flags")[1].split("\n")[0].split())
    probed = _cpuid_flags()
    assert probed and probed <= set(ISA_FLAGS)
    assert probed <= listed | {"amx_int8"}  # CPUID finds nothing the kernel does not list
    assert ("avx512_vnni" in probed) == ("avx512_vnni" in listed)  # what decides 7 or 8 bits
    assert set(cpu_info()["flags"]) == {f for f in ISA_FLAGS if f in probed or f in listed}
    assert cpu_info()["flags_source"] == "cpuid (torch.cpu) and /proc/cpuinfo"


def test_a_cpu_whose_flags_cannot_be_read_is_not_refused_and_is_checked_as_the_narrowest(monkeypatch, tmp_path):
    unknown = {"vendor": "unknown", "model": "x86_64", "architecture": "x86_64", "flags": [], "flags_source": "unknown"}
    for module in ("target", "loading", "manifest", "export.verify"):
        monkeypatch.setattr(f"lightning_quant.{module}.cpu_info", lambda: unknown)
    assert missing_flags("amx") == []  # not known to be missing: the files are verified by running them here
    assert emulates_narrower_isa(TARGETS["avx2"])  # maybe wider than AVX2: the AVX2 numerics are checked too
    with pytest.raises(ValueError, match=r"could not be read.*target='avx2'"):
        resolve_target("native")
    model = PositiveLinear().eval()
    x = positive_batches()[0]
    int8 = quantize(model, DynamicQuantConfig(target="amx"), x)
    deployment = deploy(model, DynamicQuantConfig(target="amx"), x, dirpath=tmp_path, formats=["torch_export"])
    assert deployment.manifest["cpu"]["flags_source"] == "unknown"
    with torch.no_grad():
        assert torch.allclose(load(tmp_path)(x), int8(x), atol=1e-4)
