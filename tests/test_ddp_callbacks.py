"""Every callback under ``strategy="ddp"``, 2 CPU processes (gloo): files are written by global rank zero only.

One launch runs two fits in the same pair of processes (Lightning's DDP launcher starts rank 1 by running
this file again, so the fits run in this file executed as a script, not inside pytest's process; see
tests/test_qat_ddp.py):

1. ConvNet with ChannelsLast, AutoMixedPrecision (auto: rank 0 measures and decides for both),
   PostTrainingQuantization and OptimizeForInference (each into its own dirpath),
2. MLPNet with DynamicQuantization.

Both ranks record, with a Python audit hook, every file they open for writing, rename, remove or create
under the output directory: rank 1 must have none. (C++ writers such as ``torch.save`` to a path are not
audited, but every artifact, manifest and checkpoint here is moved into place by ``os.replace`` or written
through Python's ``open``, which are; rank 0's record shows the hook sees them.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

FORMATS = ["onnx", "torch_export"]  # no AOTInductor: each compile costs 15-30 s and proves nothing more here


def watch_writes(root: Path) -> list[str]:
    """Record write-like file system events under ``root`` in this process (audit hooks cannot be removed:
    the caller stops looking at the list when it is done)."""
    events: list[str] = []
    prefix = str(root.resolve())

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            writing = (mode is not None and any(c in str(mode) for c in "wax+")) or (
                mode is None and isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
            )
            if not writing:
                return
        elif event in ("os.rename", "os.remove", "os.mkdir", "os.rmdir", "os.truncate"):
            path = args[0]
        else:
            return
        if isinstance(path, (str, bytes, os.PathLike)) and os.path.abspath(os.fsdecode(path)).startswith(prefix):
            events.append(f"{event} {os.fsdecode(path)}")

    sys.addaudithook(hook)
    return events


def run(out: Path) -> None:
    writes = watch_writes(out)

    import lightning as L
    import torch

    from lightning_quant import (
        AutoMixedPrecision,
        ChannelsLast,
        DynamicQuantization,
        OptimizeForInference,
        PostTrainingQuantization,
    )
    from lightning_quant.demo import ConvNet, DigitsClassifier, DigitsDataModule, MLPNet

    def trainer(callbacks):
        return L.Trainer(
            strategy="ddp",
            accelerator="cpu",
            devices=2,
            max_epochs=1,
            limit_train_batches=3,
            limit_val_batches=2,
            num_sanity_val_steps=0,
            callbacks=callbacks,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=out,
        )

    L.seed_everything(0)
    amp = AutoMixedPrecision(measure_steps=2)
    ptq = PostTrainingQuantization(num_calibration_batches=4, observer="minmax", formats=FORMATS, dirpath=out / "ptq")
    optimize = OptimizeForInference(formats=FORMATS, dirpath=out / "float")
    conv = DigitsClassifier(ConvNet(channels=8, blocks=2))
    first = trainer([ChannelsLast(), amp, ptq, optimize])
    first.fit(conv, DigitsDataModule(batch_size=32))
    left_first_fit = time.time()

    dynamic = DynamicQuantization(formats=FORMATS, dirpath=out / "dynamic")
    second = trainer([dynamic])
    second.fit(DigitsClassifier(MLPNet(hidden=1024)), DigitsDataModule(batch_size=32))  # int8 ONNX beats float

    seen = {
        "global_rank": second.global_rank,
        "world_size": second.world_size,
        "precision": amp.precision,
        "channels_last": all(
            m.weight.is_contiguous(memory_format=torch.channels_last)
            for m in conv.modules()
            if isinstance(m, torch.nn.Conv2d)
        ),
        "manifests": {
            name: cb.manifest is not None for name, cb in (("ptq", ptq), ("float", optimize), ("dynamic", dynamic))
        },
        "left_first_fit": left_first_fit,
        "left_second_fit": time.time(),
        "writes": list(writes),
    }
    # written after the list was copied: this file is the one thing rank 1 writes
    (out / f"rank{second.global_rank}.json").write_text(json.dumps(seen))


def test_every_callback_under_ddp_writes_once_from_rank_zero(tmp_path):
    done = subprocess.run([sys.executable, __file__, str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert (rank0["global_rank"], rank1["global_rank"], rank0["world_size"]) == (0, 1, 2)

    # rank 0 did the work and holds the results; rank 1 wrote nothing at all under the output directory
    assert rank0["manifests"] == {"ptq": True, "float": True, "dynamic": True}
    assert rank1["manifests"] == {"ptq": False, "float": False, "dynamic": False}
    assert rank1["writes"] == []
    for name in ("ptq", "float", "dynamic"):  # the hook does see the writes: rank 0's moved every file into place
        for filename in ("model.onnx", "model_program.pt2", "manifest.json"):
            assert any(
                e.startswith("os.rename") and e.endswith(f"-{filename}") and f"/{name}/" in e for e in rank0["writes"]
            ), (name, filename, rank0["writes"])

    # both processes trained the same way: rank 0's AMP decision, channels-last weights
    assert rank0["precision"] == rank1["precision"] and rank0["precision"] in ("32-true", "bf16-mixed")
    assert rank0["channels_last"] and rank1["channels_last"]

    # one complete, verified set of files per callback, nothing half-written or temporary next to it
    expected = {"ptq": "static", "float": "float", "dynamic": "dynamic"}
    for name, approach in expected.items():
        directory = tmp_path / name
        manifest = json.loads((directory / "manifest.json").read_text())
        assert manifest["approach"] == approach and manifest["status"] == "ok", manifest.get("error")
        assert manifest["failures"] == {}
        assert sorted(a["format"] for a in manifest["artifacts"]) == sorted(FORMATS)
        for artifact in manifest["artifacts"]:
            assert artifact["verification"]["relative_error"] <= artifact["verification"]["tolerance"]
        files = sorted(p.name for p in directory.iterdir())
        assert files == sorted(
            [
                "manifest.json",
                "model.onnx",
                "model_program.pt2",
                *(
                    [Path(manifest["float_checkpoint"]).name]
                    if not manifest["float_checkpoint"].startswith("..")
                    else []
                ),
            ]
        )

    # rank 1 was held at fit end until rank 0 had written everything
    assert rank1["left_first_fit"] >= (tmp_path / "float" / "manifest.json").stat().st_mtime
    assert rank1["left_first_fit"] >= (tmp_path / "ptq" / "manifest.json").stat().st_mtime
    assert rank1["left_second_fit"] >= (tmp_path / "dynamic" / "manifest.json").stat().st_mtime


if __name__ == "__main__":
    run(Path(sys.argv[1]))
