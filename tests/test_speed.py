"""Speed decides what is recommended, never which verified files exist; the manifest's timings are the files' own."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

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
    """The manifest's time of the file ``name`` and the file's time on its own (fastest of 300 calls, 100 in a row),
    timed again a second later, up to 8 times, until the two agree within 20%: as times, or as ratios to the float
    model's time (the manifest's float time against the float model timed here alongside).

    This VM's whole CPU runs 1.4x slower for seconds at a time (idle machine, same process: the int4 step 0.21 ms
    and its float model 0.31 ms for 3 s, then 0.148 and 0.216): a time taken in one such moment and one taken in
    another differ by that much, and their ratios to float do not. A neighbour slowing the file inside the
    manifest's rounds (#27: 1.37 ms in the manifest, 0.70-0.75 on its own) shows in both. Returns the closest
    attempt's (in the manifest, on its own) pair, as times or as ratios."""
    latency = manifest["latency_ms"]
    closest = (float("inf"), 0.0, 0.0)
    for attempt in range(8):
        if attempt:
            time.sleep(1)
        on_its_own, float_on_its_own = (
            fastest_call_ms(lambda _: file_call(), None),
            fastest_call_ms(lambda _: float_call(), None),
        )
        for pair in (
            (latency[name], on_its_own),
            (latency[name] / latency["float"], on_its_own / float_on_its_own),
        ):
            distance = abs(math.log(pair[0] / pair[1]))
            closest = min(closest, (distance, *pair))
        if closest[0] <= math.log(1.2):
            break
    return closest[1], closest[2]


def conv_net_case(folder: str) -> tuple[float, float, dict]:
    x = torch.rand(8, 3, 32, 32)
    calibration = [torch.rand(8, 3, 32, 32) for _ in range(4)]
    model = small_conv_net()
    # the slow unlowered program and the float model are timed beside the onnx file: they must not slow it down
    deployment = deploy(model, StaticQuantConfig(), x, calibration, dirpath=folder, formats=["onnx", "torch_export"])
    onnx = load(folder, "onnx")
    with torch.no_grad():
        ratios = agrees_with_the_files_on_their_own(deployment.manifest, "onnx", lambda: onnx(x), lambda: model(x))
    return *ratios, deployment.manifest["latency_ms"]


def int4_step_case(folder: str) -> tuple[float, float, dict]:
    # the case (#27): an int4 decode step's ONNX file, 1.37 ms in the manifest, 0.70-0.75 ms on its own
    torch.manual_seed(0)
    model = ByteLanguageModel(width=128, layers=2, heads=4, block_size=64).eval()
    step = model.example_input_array  # one sequence, one byte, the empty cache, position 0
    deployment = deploy(model, WeightOnlyConfig(bits=4), step, dirpath=folder, formats=["onnx"])
    onnx = load(folder, "onnx")
    with torch.no_grad():
        ratios = agrees_with_the_files_on_their_own(
            deployment.manifest, "onnx", lambda: onnx(*step), lambda: model(*step)
        )
    return *ratios, deployment.manifest["latency_ms"]


CASES = {"conv_net": conv_net_case, "int4_step": int4_step_case}


def run_as_a_users_script(case: str, folder: Path) -> tuple[float, float, dict]:
    """``case`` in a fresh Python process, as a user's script runs it (deploy, load, time), on one thread.

    Not in the test process: in two CI runs an xdist worker that had run a few hundred tests before timed the int4
    step at 1.5x its standalone ratio inside deploy() (the other worker idle, waiting), which neither a fresh
    process nor the same tests without xdist reproduce here (12 of 12 and 8 of 8 within 20%)."""
    done = subprocess.run(
        [sys.executable, __file__, case, str(folder)],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return tuple(json.loads(done.stdout.strip().splitlines()[-1]))  # type: ignore[return-value]


@pytest.mark.parametrize("case", list(CASES))
def test_the_manifest_times_a_file_as_it_runs_on_its_own(case, tmp_path):
    in_manifest, on_its_own, latency = run_as_a_users_script(case, tmp_path)
    assert 1 / 1.2 <= in_manifest / on_its_own <= 1.2, (in_manifest, on_its_own, latency)
    if case == "conv_net":
        assert latency["too_fast_to_time"] is False  # 0.4-0.8 ms a call


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


if __name__ == "__main__":  # run_as_a_users_script: python test_speed.py <case> <folder>
    torch.set_num_threads(1)
    print(json.dumps(CASES[sys.argv[1]](sys.argv[2])))
