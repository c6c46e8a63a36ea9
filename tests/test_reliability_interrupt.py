"""SIGTERM or Ctrl-C during QAT: a real training process is killed; its checkpoint resumes with every
fake-quant buffer (ranges, scale, zero point, eps) restored."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lightning_quant import QuantizationAwareTraining
from lightning_quant.demo import ConvNet, DigitsClassifier, DigitsDataModule

SCRIPT = textwrap.dedent("""
    import faulthandler, signal, sys, time
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # the test asks for every thread's stack if it hangs
    import lightning as L
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint
    from lightning_quant import QuantizationAwareTraining
    from lightning_quant.demo import ConvNet, DigitsClassifier, DigitsDataModule

    class Slow(Callback):  # long enough epochs to be interrupted in the middle of one
        def on_train_batch_end(self, *args):
            time.sleep(0.1)

    L.seed_everything(0)
    qat = QuantizationAwareTraining(start_epoch=0, quantize_on_fit_end=False)
    checkpoint = ModelCheckpoint(dirpath=sys.argv[1], save_last=True)
    trainer = L.Trainer(max_epochs=1000, limit_train_batches=6, limit_val_batches=1, callbacks=[qat, checkpoint, Slow()],
                        logger=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(DigitsClassifier(ConvNet(channels=8, blocks=2)), datamodule=DigitsDataModule(batch_size=32))
""")


class AtResume(Callback):
    def __init__(self, qat):
        self.qat = qat

    def on_train_epoch_start(self, trainer, pl_module):
        if not hasattr(self, "ranges"):
            self.ranges = {k: v.clone() for k, v in self.qat.qat.state_dict()["fake_quant"].items()}
            self.fake_quant = "forward" in vars(pl_module)
            self.epoch = trainer.current_epoch


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_interrupted_qat_resumes_from_its_checkpoint_with_ranges_restored(tmp_path, signum):
    script = tmp_path / "train_qat.py"
    script.write_text(SCRIPT)
    last = tmp_path / "ckpt" / "last.ckpt"
    process = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "ckpt")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # as from a terminal: Ctrl-C's default action. A child inherits an ignored SIGINT, and Python then never
        # raises KeyboardInterrupt; Lightning ignores SIGINT for good once a fit in this test process was
        # interrupted, which made this test hang after other tests in the same session.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 240
        while not last.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert last.exists(), process.communicate(timeout=5)[0][-3000:] if process.poll() is not None else "timeout"
        time.sleep(0.3)  # into the next epoch: interrupted mid-QAT, between checkpoints
        process.send_signal(signum)
        try:
            output = process.communicate(timeout=120)[0]
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGUSR1)  # where it hangs, for the failure message
            time.sleep(2)
            process.kill()
            pytest.fail(
                "the training process did not stop within 120 s of the signal:\n" + process.communicate()[0][-6000:]
            )
    finally:
        if process.poll() is None:
            process.kill()
    # Lightning shuts down gracefully (exit code 0) on both signals; it stopped long before max_epochs=1000
    assert ("Received SIGTERM" if signum == signal.SIGTERM else "KeyboardInterrupt") in output, output[-2000:]

    saved = torch.load(last, weights_only=True)  # a complete checkpoint, and nothing but tensors and primitives
    state = saved["callbacks"][next(k for k in saved["callbacks"] if "QuantizationAwareTraining" in k)]
    assert state["qat"] is not None and state["qat"]["fake_quant"]
    assert saved["epoch"] < 999

    L.seed_everything(1)  # another init: everything must come from the checkpoint
    model = DigitsClassifier(ConvNet(channels=8, blocks=2))
    qat = QuantizationAwareTraining(start_epoch=0, quantize_on_fit_end=False)
    at_resume = AtResume(qat)
    trainer = L.Trainer(
        max_epochs=saved["epoch"] + 2,
        limit_train_batches=2,
        limit_val_batches=1,
        callbacks=[qat, at_resume],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path / "resumed",
    )
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=32), ckpt_path=last)

    assert at_resume.epoch == saved["epoch"] + 1  # continued after the checkpoint's epoch
    assert at_resume.fake_quant  # fake-quant forward attached from the checkpoint, not restarted
    assert at_resume.ranges.keys() == state["qat"]["fake_quant"].keys()
    differ = [
        name for name, value in at_resume.ranges.items() if not torch.equal(value, state["qat"]["fake_quant"][name])
    ]
    assert differ == []  # min/max, scale, zero_point, eps: every fake-quant buffer restored
    assert qat._started_epoch == state["started_epoch"] == 0
