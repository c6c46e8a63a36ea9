"""A disk that fills while artifacts are written: real writes failing, not a simulated rename.

Each case runs in a subprocess whose file-size limit (``RLIMIT_FSIZE``, as ``ulimit -f``) is lowered with
``SIGXFSZ`` ignored, so a write past the limit fails with ``EFBIG`` exactly where a full disk fails with
``ENOSPC``: in the middle of the file.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import torch

LIMIT = textwrap.dedent("""
    import resource, signal
    def limit_file_size(size):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write with EFBIG instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, resource.RLIM_INFINITY))
""")

FIT = LIMIT + textwrap.dedent("""
    import sys
    import lightning as L
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint
    from lightning_quant import OptimizeForInference
    from lightning_quant.demo import DigitsClassifier, DigitsDataModule, MLPNet

    class DiskFillsAtFitEnd(Callback):  # listed before the quantization callback: its on_fit_end runs first
        def on_fit_end(self, trainer, pl_module):
            limit_file_size(32 * 1024)  # room for manifest.json, not for the ONNX file (~340 KiB)

    L.seed_everything(0)
    trainer = L.Trainer(
        max_epochs=1, limit_train_batches=3, limit_val_batches=2, num_sanity_val_steps=0, logger=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=sys.argv[1],
        callbacks=[DiskFillsAtFitEnd(), OptimizeForInference(formats=["onnx"]),
                   ModelCheckpoint(dirpath=sys.argv[1] + "/checkpoints", save_last=True)],
    )
    trainer.fit(DigitsClassifier(MLPNet()), datamodule=DigitsDataModule(batch_size=32))
""")

EXPORT = LIMIT + textwrap.dedent("""
    import sys, torch
    from lightning_quant.demo import MLPNet
    from lightning_quant.export import ExportError, export
    from lightning_quant.export.onnx import OrtDynamicQuantization
    from lightning_quant.quantization import DynamicQuantConfig, quantize

    model, example = MLPNet(hidden=32).eval(), torch.zeros(4, 64)
    int8 = quantize(model, DynamicQuantConfig(), example)
    limit_file_size(64 * 1024)  # room for the ONNX file (~10 KiB), not for the .pt2 program (~130 KiB)
    try:
        export(int8, example, ["torch_export", "onnx"], sys.argv[1], float_model=model,
               onnx_quantization=OrtDynamicQuantization())
    except ExportError as error:
        print(error)
""")


def run(script: str, tmp_path) -> subprocess.CompletedProcess:
    path = tmp_path / "script.py"
    path.write_text(script)
    return subprocess.run(
        [sys.executable, str(path), str(tmp_path / "out")], capture_output=True, text=True, timeout=600
    )


def test_disk_full_at_fit_end_names_the_fix_keeps_the_checkpoint_and_leaves_no_partial_file(tmp_path):
    done = run(FIT, tmp_path)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "OptimizeForInference could not produce 1 of 1 format(s)" in done.stderr
    assert "File too large" in done.stderr and "the disk is full" in done.stderr
    assert "Free space in" in done.stderr and "another dirpath" in done.stderr
    assert "The trained float model is safe" in done.stderr

    out = tmp_path / "out" / "quantized"
    # nothing half-written under a final name, no temporary file left behind; the manifest says what failed
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "partial" and manifest["artifacts"] == []
    assert "File too large" in manifest["failures"]["onnx"] and "another dirpath" in manifest["failures"]["onnx"]
    # the float checkpoint was on disk before the disk filled, complete
    checkpoint = tmp_path / "out" / "checkpoints" / "last.ckpt"
    assert manifest["float_checkpoint"] == "../checkpoints/last.ckpt"
    assert torch.load(checkpoint, weights_only=True)["state_dict"]


def test_disk_full_in_one_format_is_an_error_for_that_format_and_the_others_are_written(tmp_path):
    done = run(EXPORT, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Exporting GraphModule to 'torch_export' failed" in done.stdout or "'torch_export' failed" in done.stdout
    assert "File too large" in done.stdout and "another dirpath" in done.stdout
    assert "The other formats were written: ['onnx']" in done.stdout
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model.onnx"]
