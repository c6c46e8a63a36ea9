"""Speed decides what is recommended, never which verified files exist; the manifest's timings are the files' own."""

from __future__ import annotations

import json
import time

import pytest
import torch
from torch import nn

from lightning_quant import deploy, load
from lightning_quant.demo import ByteLanguageModel
from lightning_quant.quantization import DynamicQuantConfig, StaticQuantConfig, WeightOnlyConfig

pytestmark = pytest.mark.alone  # the manifest's timings are compared with timings taken here


def small_conv_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    ).eval()


def fastest_call_ms(model, x, calls=100, rounds=3) -> float:
    """The fastest of ``rounds`` x ``calls`` calls, the rounds a moment apart (robust to another process's load)."""
    best = float("inf")
    with torch.no_grad():
        for _ in range(rounds):
            for _ in range(10):
                model(x)
            for _ in range(calls):
                start = time.perf_counter()
                model(x)
                best = min(best, (time.perf_counter() - start) * 1000)
            time.sleep(0.05)
    return best


def agrees_with_the_files_on_their_own(manifest: dict, name: str, file_call, float_call) -> tuple[float, float]:
    """The manifest's time of the file ``name`` against its float model's, and the same ratio timed here, each of
    the two on its own (fastest of 100 calls in a row, the two alternating every few rounds), timed again a second
    later while the two ratios are more than 20% apart.

    Ratios, not times: this VM's whole CPU runs 1.4x slower for seconds at a time (idle machine, same process:
    the int4 step 0.21 ms and its float model 0.31 ms for 3 s, then 0.148 and 0.216), which moves every time
    alike. A neighbour slowing the file inside the manifest's rounds (#27: 1.37 ms in the manifest, 0.70-0.75 on
    its own) moves the file's time alone and shows in its ratio."""
    latency = manifest["latency_ms"]
    in_manifest = latency[name] / latency["float"]
    best_file, best_float = float("inf"), float("inf")
    for attempt in range(6):
        if attempt:
            time.sleep(1)
        best_file = min(best_file, fastest_call_ms(lambda _: file_call(), None))
        best_float = min(best_float, fastest_call_ms(lambda _: float_call(), None))
        if 1 / 1.2 <= in_manifest / (best_file / best_float) <= 1.2:
            break
    return in_manifest, best_file / best_float


def test_the_manifest_times_a_file_as_it_runs_on_its_own(tmp_path):
    x = torch.rand(8, 3, 32, 32)
    calibration = [torch.rand(8, 3, 32, 32) for _ in range(4)]
    model = small_conv_net()
    # the slow unlowered program and the float model are timed beside the onnx file: they must not slow it down
    deployment = deploy(model, StaticQuantConfig(), x, calibration, dirpath=tmp_path, formats=["onnx", "torch_export"])
    onnx = load(tmp_path, "onnx")
    with torch.no_grad():
        in_manifest, on_its_own = agrees_with_the_files_on_their_own(
            deployment.manifest, "onnx", lambda: onnx(x), lambda: model(x)
        )
    assert 1 / 1.2 <= in_manifest / on_its_own <= 1.2, (in_manifest, on_its_own, deployment.manifest["latency_ms"])
    assert deployment.manifest["latency_ms"]["too_fast_to_time"] is False  # 0.4-0.8 ms a call


def test_the_manifest_times_the_int4_generation_step_as_it_runs_on_its_own(tmp_path):
    # the case (#27): an int4 decode step's ONNX file, 1.37 ms in the manifest, 0.70-0.75 ms on its own
    torch.manual_seed(0)
    model = ByteLanguageModel(width=128, layers=2, heads=4, block_size=64).eval()
    step = model.example_input_array  # one sequence, one byte, the empty cache, position 0
    deployment = deploy(model, WeightOnlyConfig(bits=4), step, dirpath=tmp_path, formats=["onnx"])
    onnx = load(tmp_path, "onnx")
    with torch.no_grad():
        in_manifest, on_its_own = agrees_with_the_files_on_their_own(
            deployment.manifest, "onnx", lambda: onnx(*step), lambda: model(*step)
        )
    assert 1 / 1.2 <= in_manifest / on_its_own <= 1.2, (in_manifest, on_its_own, deployment.manifest["latency_ms"])


def test_a_verified_file_slower_than_float_is_kept_marked_and_never_recommended(tmp_path):
    # one small Linear layer: ONNX Runtime's call overhead alone is about 3x its eager call (0.013 vs 0.004 ms)
    model = nn.Linear(16, 4).eval()
    with pytest.warns(UserWarning, match="no exported file is faster than the float model"):
        deployment = deploy(model, DynamicQuantConfig(), torch.rand(2, 16), dirpath=tmp_path, formats=["onnx"])
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["status"] == "ok" and manifest["failures"] == {}
    [onnx] = manifest["artifacts"]
    assert (tmp_path / onnx["path"]).is_file()
    assert onnx["faster_than_float"] is False and onnx["latency_ms"] > manifest["latency_ms"]["float"]
    assert onnx["speedup_vs_float"] < 1 and onnx["load_average"] == manifest["latency_ms"]["load_average"]
    assert manifest["recommended"] is None
    latency = manifest["latency_ms"]
    assert latency["too_fast_to_time"] is True and "too_fast_to_time" in latency["note"]
    assert deployment.model.runtime == "onnx"  # the fastest verified file still runs quantized_model
    x = torch.rand(5, 16)
    torch.testing.assert_close(load(tmp_path)(x), model(x), atol=0.05, rtol=0.05)
