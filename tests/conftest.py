from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import lightning as L
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict

import lightning_quant.configs  # noqa: F401  (registers the structured configs)
from lightning_quant.target import TARGETS, missing_flags

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"

# Under pytest-xdist (`-n 2`, one worker a core) each worker and every process its tests start (train.py, DDP ranks,
# QEMU, verification) computes on one thread: two workers of two threads each on two cores spin-wait on each other
# and run 10-50x slower.
if os.environ.get("PYTEST_XDIST_WORKER"):
    for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[_name] = "1"
    import torch

    torch.set_num_threads(1)


# Under xdist the test files are handed out whole (a module-scoped fixture is built once), these first, longest first
# (durations on an idle 2-core machine), so that the two workers end at about the same time; the rest follow in the
# order they are collected in.
LONGEST_FILES = [
    "tests/test_real_models.py",
    "tests/user_models/test_gpt2.py",
    "tests/test_avx2_emulated.py",  # makes the shared default_train_run early, long before test_ptq_callbacks.py reads it
    "tests/user_models/test_hf_tutorial.py",
    "tests/test_export.py",
    "tests/test_qat_callback.py",
    "tests/test_weight_only.py",
    "tests/test_target.py",
    "tests/user_models/test_call_shapes.py",
    "tests/test_ddp_rank_failure.py",
    "tests/test_formats_rule.py",
    "tests/test_pipeline.py",
    "tests/test_run_folder.py",
    "tests/test_optimize_for_inference.py",
    "tests/test_ptq_callbacks.py",
    "tests/test_hydra_user_app.py",
    "tests/test_reliability_interrupt.py",
    "tests/test_hydra_sweep.py",
    "tests/test_dynamic_transformer.py",
]


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """``-n 2``: whole files to a worker, in the order of collection (see :func:`pytest_collection_modifyitems`)."""
    from xdist.scheduler import LoadFileScheduling

    config.option.loadscopereorder = False  # xdist would hand out the files with the most tests first
    return LoadFileScheduling(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("PYTEST_XDIST_WORKER"):
        first = {name: rank for rank, name in enumerate(LONGEST_FILES)}
        items.sort(key=lambda item: first.get(item.nodeid.partition("::")[0], len(first)))  # stable: in-file order kept


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    """Under xdist, every test (its setup, module fixtures included, call and teardown) holds a shared lock on one
    file that all workers of the run see, and a test marked ``alone`` holds it exclusively: it starts once the
    other worker's current test ends, and no other test starts until it is done. A gate lock, held while asking,
    keeps a waiting ``alone`` test from being passed by ever-new shared holders. Without xdist this does nothing."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return (yield)
    shared = item.config._tmp_path_factory.getbasetemp().parent  # type: ignore[attr-defined]  # the run's folder
    alone = item.get_closest_marker("alone") is not None
    with open(shared / "alone.gate", "w") as gate, open(shared / "alone.lock", "w") as lock:
        fcntl.flock(gate, fcntl.LOCK_EX)
        fcntl.flock(lock, fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
        if not alone:
            fcntl.flock(gate, fcntl.LOCK_UN)
        try:
            return (yield)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
            fcntl.flock(gate, fcntl.LOCK_UN)


FAST_FIT = dict(
    max_epochs=1,
    limit_train_batches=3,
    limit_val_batches=2,
    num_sanity_val_steps=0,
    logger=False,
    enable_progress_bar=False,
    enable_model_summary=False,
)


def fast_trainer(root: Path, callbacks=(), **settings) -> L.Trainer:
    """A real Trainer that fits a few batches quietly (:data:`FAST_FIT`: one epoch of 3 training and 2 validation
    batches, no sanity check, logger, progress bar or model summary); ``settings`` override any Trainer argument."""
    return L.Trainer(default_root_dir=root, callbacks=list(callbacks), **{**FAST_FIT, **settings})


# what run_train_script sets unless the test overrides it: a fit of a few batches
FAST_TRAIN_SCRIPT = {
    "trainer.max_epochs": "1",
    "trainer.limit_train_batches": "3",
    "trainer.limit_val_batches": "2",
    "trainer.limit_test_batches": "1",
    "trainer.enable_progress_bar": "false",
}


def run_train_script(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    """``python train.py <overrides>`` in a fresh process, with ``run_dir`` as Hydra's run directory and the
    :data:`FAST_TRAIN_SCRIPT` settings the overrides do not set."""
    keys = {o.partition("=")[0] for o in overrides}
    fast = [f"{key}={value}" for key, value in FAST_TRAIN_SCRIPT.items() if key not in keys]
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *fast, *overrides, f"hydra.run.dir={run_dir}"],
        capture_output=True,
        text=True,
        timeout=600,
    )


def once_per_run(tmp_path_factory: pytest.TempPathFactory, name: str, make: Callable[[Path], None]) -> Path:
    """The folder ``make(folder)`` fills, made once per pytest run: under xdist the first worker to ask makes it
    while the others wait on a file lock, then all read the same folder (tests must not change it)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's folder, above each worker's own
    folder = root / name
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not (root / f"{name}.done").exists():
                shutil.rmtree(folder, ignore_errors=True)
                make(folder)
                (root / f"{name}.done").touch()
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return folder


@pytest.fixture(scope="session")
def default_train_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The default ``python train.py`` (static int8 of the digits conv net, AOTInductor, ONNX and OpenVINO, target avx2) with
    the :data:`FAST_TRAIN_SCRIPT` settings, run once for every test that reads its folder or its console: its run
    directory and the finished process (its exit code, stdout and stderr)."""

    def make(folder: Path) -> None:
        done = run_train_script(folder)
        (folder / "process.json").write_text(
            json.dumps({"args": done.args, "returncode": done.returncode, "stdout": done.stdout, "stderr": done.stderr})
        )

    folder = once_per_run(tmp_path_factory, "default_train_run", make)
    process = json.loads((folder / "process.json").read_text())
    return folder, subprocess.CompletedProcess(**process)


def compose_train(overrides: list[str] | None = None, output_dir: Path | None = None) -> DictConfig:
    """Compose conf/train.yaml as `python train.py <overrides>` would, outside a Hydra run."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides or [])
    if output_dir is not None:
        with open_dict(cfg):
            cfg.paths.output_dir = str(output_dir)
    return cfg


@pytest.fixture
def fast_cfg(tmp_path):
    """A config that fits for a few batches, in tmp_path."""

    def make(*overrides: str) -> DictConfig:
        # No quantization callback unless the test picks one: the default option exports int8 files.
        chosen = any(o.startswith("callbacks=") for o in overrides)
        return compose_train(
            [
                *([] if chosen else ["callbacks=none"]),
                "trainer.max_epochs=1",
                "trainer.limit_train_batches=3",
                "trainer.limit_val_batches=2",
                "trainer.limit_test_batches=2",
                "trainer.enable_progress_bar=false",
                "trainer.enable_model_summary=false",
                *overrides,
            ],
            output_dir=tmp_path,
        )

    return make


def produced_formats(manifest: dict) -> set[str]:
    """The formats a run produced and verified (every verified file is kept, whatever its speed); any failed
    format fails the calling test."""
    assert not manifest.get("failures"), manifest["failures"]
    return {a["format"] for a in manifest["artifacts"]}


@pytest.fixture
def cpu_lacking_a_target(monkeypatch):
    """This CPU when it lacks a target's instructions, else an AVX2-only CPU (Zen 3: no AVX-512, no VNNI) in its
    place, so the refusal is tested on AMX machines too. Returns the name of a target the CPU lacks."""
    lacking = [name for name, target in TARGETS.items() if missing_flags(target)]
    if not lacking:
        zen3 = {"vendor": "AuthenticAMD", "model": "AMD EPYC 7B13", "architecture": "x86_64", "flags": ["avx2", "fma"]}
        monkeypatch.setattr("lightning_quant.target.cpu_info", lambda: zen3)
        monkeypatch.setattr("lightning_quant.loading.cpu_info", lambda: zen3)
        lacking = [name for name, target in TARGETS.items() if missing_flags(target)]
    return lacking[-1]


# loads every file a manifest lists with its runtime alone (no lightning_quant, no transformers) and runs it on
# the call saved beside it; writes each file's output tensors
_RUN_FILES = """
import json, sys, torch
folder, call_path, out_path = sys.argv[1:4]
args, kwargs = torch.load(call_path, weights_only=True)
flat = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
outputs = {}
for artifact in json.load(open(folder + "/manifest.json"))["artifacts"]:
    path, fmt = folder + "/" + artifact["path"], artifact["format"]
    if fmt == "aoti":
        out = torch._inductor.aoti_load_package(path)(*args, **kwargs)
    elif fmt == "torch_export":
        out = torch.export.load(path).module()(*args, **kwargs)
    elif fmt == "onnx":
        import onnxruntime
        session = onnxruntime.InferenceSession(path)
        out = [torch.from_numpy(o) for o in session.run(None, {i.name: t.numpy() for i, t in zip(session.get_inputs(), flat)})]
    elif fmt == "openvino":
        import openvino
        compiled = openvino.Core().compile_model(path, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        result = compiled([t.numpy() for t in flat])
        out = [torch.from_numpy(result[port].copy()) for port in compiled.outputs]
    else:
        continue
    outputs[fmt] = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
assert not {"lightning_quant", "transformers"} & set(sys.modules), "a file needed lightning_quant or transformers"
torch.save(outputs, out_path)
"""


def run_files_alone(folder: Path, *args, **kwargs) -> dict[str, list]:
    """Run every file of ``folder``'s manifest (aoti, torch_export, onnx, openvino) on ``args``/``kwargs`` in a fresh
    process that imports neither lightning_quant nor transformers, each with its own runtime only; returns each
    format's output tensors. The call's tensors are fed to an ONNX or OpenVINO file in the order of its inputs."""
    import tempfile

    import torch

    scratch = Path(tempfile.mkdtemp())
    call, out = scratch / "call.pt", scratch / "outputs.pt"

    torch.save((args, kwargs), call)
    done = subprocess.run(
        [sys.executable, "-c", _RUN_FILES, str(folder), str(call), str(out)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out, weights_only=True)


def _without(key: str) -> Callable[[bytes], bytes]:
    def damage(text: bytes) -> bytes:
        manifest = json.loads(text)
        del manifest["artifacts"][0][key]
        return json.dumps(manifest).encode()

    return damage


def _bytes_as_text(text: bytes) -> bytes:
    manifest = json.loads(text)
    manifest["artifacts"][0]["bytes"] = str(manifest["artifacts"][0]["bytes"])
    return json.dumps(manifest).encode()


# ways a manifest.json can be broken (a function of the good file's bytes) and what the message says (a regex)
BROKEN_MANIFESTS: dict[str, tuple[Callable[[bytes], bytes], str]] = {
    "not UTF-8": (lambda text: text.replace(b'"model"', b'"mod\xe9l"'), r"manifest.json is not UTF-8 text"),
    "not JSON": (lambda text: text[: len(text) // 2], r"manifest.json is not valid JSON"),
    "a list": (lambda text: b"[" + text + b"]", r"manifest.json holds a JSON list, not the object a manifest is"),
    "no sha256": (_without("sha256"), r"manifest.json: artifacts\[0\] \('model.onnx'\) lacks \['sha256'\]"),
    "no path": (_without("path"), r"manifest.json: artifacts\[0\] \('no path'\) lacks \['path'\]"),
    "no format": (_without("format"), r"artifacts\[0\] \('model.onnx'\) lacks \['format'\] \(every entry has"),
    "bytes as text": (_bytes_as_text, r"artifacts\[0\] \('model.onnx'\) 'bytes' is '\d+', not of type int"),
}


def break_manifest(folder: Path, how: str) -> str:
    """Rewrite ``folder``'s manifest.json broken as :data:`BROKEN_MANIFESTS` says; return the message expected."""
    damage, message = BROKEN_MANIFESTS[how]
    path = folder / "manifest.json"
    path.write_bytes(damage(path.read_bytes()))
    return message
