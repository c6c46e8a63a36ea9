"""The files are right on an AVX2-only CPU, checked on an exact one: QEMU's ``qemu-x86_64 -cpu Haswell`` runs the
same Python, and CPUID (what torch, oneDNN and ONNX Runtime pick their kernels by) says AVX2 + FMA, no AVX-512,
no VNNI, whatever the host has. Without VNNI, int8 kernels sum u8 x s8 products in int16 and saturate: this is
where 8-bit weights go wrong and the default target's 7-bit weights must be exact. ``.ci/run`` installs Debian's
``qemu-user``; under QEMU everything runs 10-50x slower, so one emulated process checks every file at once."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from lightning_quant import deploy
from lightning_quant.demo import MLPNet
from lightning_quant.quantization import DynamicQuantConfig, WeightOnlyConfig
from lightning_quant.target import resolve_target

# run every file of each folder with its own runtime on the saved inputs; then try lightning_quant.load on a folder
# whose target the CPU lacks
RUN = """
import json, sys, torch
folders, inputs_path, out_path, refused_folder = sys.argv[1].split(","), sys.argv[2], sys.argv[3], sys.argv[4]
inputs = torch.load(inputs_path, weights_only=True)
outputs = {"cpu_capability": torch.backends.cpu.get_cpu_capability()}
for folder in folders:
    x = inputs[folder]
    for artifact in json.load(open(folder + "/manifest.json"))["artifacts"]:
        path, fmt = folder + "/" + artifact["path"], artifact["format"]
        if fmt == "aoti":
            out = torch._inductor.aoti_load_package(path)(x)
        elif fmt == "onnx":
            import onnxruntime
            session = onnxruntime.InferenceSession(path)
            out = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
        elif fmt == "openvino":
            import openvino
            compiled = openvino.Core().compile_model(path, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
            out = torch.from_numpy(compiled([x.numpy()])[compiled.outputs[0]].copy())
        else:
            continue
        outputs[path] = out
try:
    import lightning_quant
    lightning_quant.load(refused_folder)
    outputs["refused"] = ""
except RuntimeError as err:
    outputs["refused"] = str(err)
outputs["flags"] = lightning_quant.target.cpu_info()["flags"]
torch.save(outputs, out_path)
"""


def run(tmp_path: Path, prefix: list[str], folders: dict[Path, torch.Tensor], refused: Path, name: str) -> dict:
    inputs, out = tmp_path / "inputs.pt", tmp_path / f"{name}.pt"
    torch.save({str(folder): x for folder, x in folders.items()}, inputs)
    command = [*prefix, sys.executable, "-c", RUN, ",".join(map(str, folders)), str(inputs), str(out), str(refused)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out, weights_only=True)


def test_default_dynamic_and_int4_files_are_exact_on_an_emulated_haswell(tmp_path, default_train_run):
    qemu = shutil.which("qemu-x86_64")
    assert qemu, "qemu-x86_64 not found: install Debian's qemu-user (apt-get install -y qemu-user), as .ci/run does"
    torch.manual_seed(0)
    # the default `python train.py`: static int8 of the digits conv net, aoti, onnx and openvino, target avx2 (one
    # run, shared with test_ptq_callbacks.py and test_target.py)
    run_dir, done = default_train_run
    assert done.returncode == 0, done.stderr[-3000:]
    static = run_dir / "quantized"
    dynamic = tmp_path / "dynamic"
    deploy(MLPNet(hidden=256).eval(), DynamicQuantConfig(), torch.rand(8, 1, 8, 8), dirpath=dynamic, formats=["onnx"])
    int4 = tmp_path / "int4"
    deploy(torch.nn.Linear(64, 32).eval(), WeightOnlyConfig(bits=4), torch.randn(4, 64), dirpath=int4, formats=["onnx"])
    # a folder whose files claim the avx512_vnni target: refused on an AVX2 CPU, by the target, not by SIGILL
    vnni = tmp_path / "vnni"
    shutil.copytree(dynamic, vnni)
    manifest = json.loads((vnni / "manifest.json").read_text())
    manifest["target"] = resolve_target("avx512_vnni").to_dict()
    (vnni / "manifest.json").write_text(json.dumps(manifest))

    folders = {static: torch.rand(16, 1, 8, 8), dynamic: torch.rand(16, 1, 8, 8), int4: torch.randn(16, 64)}
    native = run(tmp_path, [], folders, vnni, "native")
    haswell = run(tmp_path, [qemu, "-cpu", "Haswell"], folders, vnni, "haswell")

    assert haswell["cpu_capability"] == "AVX2"
    assert not {"avx512f", "avx512_vnni", "amx_tile"} & set(haswell["flags"])  # CPUID, not the host's cpuinfo
    assert "avx512_vnni" in haswell["refused"] and "lacks" in haswell["refused"]
    files = [key for key in native if key.startswith("/")]
    assert {Path(f).parent.name for f in files} == {"quantized", "dynamic", "int4"}
    assert any(f.endswith(".pt2") for f in files) and any(f.endswith(".onnx") for f in files)
    assert any(f.endswith("model_openvino.xml") for f in files)  # the default train.py ships OpenVINO's IR too
    for file in files:
        difference = (haswell[file] - native[file]).abs().max() / native[file].abs().max()
        assert difference <= 1e-5, f"{file}: relative difference {difference:.3g} between Haswell and this CPU"
