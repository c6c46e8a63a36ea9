"""One rank of a 2-process DDP run (CPU, gloo) fails: the whole run ends, non-zero, in bounded time.

What ends it (Lightning 2.6, torch gloo):

* a rank that raises exits; its peers' next collective (gradient all-reduce, barrier) fails at once with
  gloo's "Connection closed by peer", and Lightning's ``_ChildProcessObserver`` (a thread in the launching
  process, rank 0) kills every process within 5 s when a child exits non-zero;
* a rank that *hangs* is bounded only by the process-group timeout (``DDPStrategy(timeout=...)``, default
  30 min; conf/trainer/ddp.yaml sets it): the waiting ranks' collective times out, they exit, and the
  observer kills the hung rank 0.

The fit runs in this file executed as a script (Lightning's launcher starts rank 1 by running it again),
in its own session so a test that fails cannot leave processes behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

BOUND_SECONDS = 240  # process start-up and a short fit on a loaded 2-core machine; a hang would be 30 min
TIMEOUT_SECONDS = 30  # the process group's (conf/trainer/ddp.yaml's default is 30 min)


def run(out: Path, case: str) -> None:
    from datetime import timedelta

    import lightning as L
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.strategies import DDPStrategy

    from lightning_quant import DynamicQuantization
    from lightning_quant.demo import DigitsClassifier, DigitsDataModule, MLPNet

    class Fail(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if case == "rank 1 raises in training" and trainer.global_rank == 1 and batch_idx == 1:
                raise RuntimeError("rank 1 fails in training_step")

        def on_fit_end(self, trainer, pl_module):  # listed before the quantization callback: runs first
            if case == "rank 0 hangs at fit end" and trainer.global_rank == 0:
                time.sleep(3600)

    # rank 0's quantization really fails: every layer kept float leaves nothing to quantize
    keep_float = ["net"] if case == "rank 0 quantization fails" else []
    quantization = DynamicQuantization(formats=["torch_export"], dirpath=out / "quantized", keep_float=keep_float)
    L.seed_everything(0)
    trainer = L.Trainer(
        # the process-group timeout also bounds the rendezvous: rank 1 (a fresh Python importing torch and Lightning)
        # must connect within it, which took over 10 s beside another test on a loaded 2-core machine
        strategy=DDPStrategy(timeout=timedelta(seconds=TIMEOUT_SECONDS)),
        accelerator="cpu",
        devices=2,
        max_epochs=1,
        limit_train_batches=3,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        callbacks=[Fail(), quantization],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out,
    )
    try:
        trainer.fit(DigitsClassifier(MLPNet(hidden=32)), DigitsDataModule(batch_size=32))
    finally:
        (out / f"rank{trainer.global_rank}.json").write_text(json.dumps({"left_fit": time.time()}))


def kill_session(session_id: int, grace_seconds: float = 5.0) -> list[int]:
    """SIGKILL what is still running in the session after ``grace_seconds``; return those process ids (zombies,
    i.e. processes that already exited and wait to be reaped, are not counted). The grace covers a process caught
    while exiting: it closes its pipes (so communicate() returns) before the kernel marks it a zombie, which on a
    loaded machine can be seen in between."""
    deadline = time.monotonic() + grace_seconds
    while _running_in(session_id) and time.monotonic() < deadline:
        time.sleep(0.1)
    running = _running_in(session_id)
    for pid in running:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return running


def _running_in(session_id: int) -> list[int]:
    running = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        state, process_group = fields[0], int(fields[2])
        if process_group == session_id and state not in ("Z", "X"):
            running.append(int(stat.parent.name))
    return running


@pytest.mark.parametrize(
    "case",
    [
        "rank 1 raises in training",
        "rank 0 quantization fails",
        "rank 0 hangs at fit end",
    ],
)
def test_a_failing_rank_ends_the_whole_run_with_a_nonzero_exit(tmp_path, case):
    started = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, __file__, str(tmp_path), case],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        # communicate() returns once every process holding the pipes (rank 1 too) has exited
        _, stderr = process.communicate(timeout=BOUND_SECONDS)
    finally:
        leftover = kill_session(process.pid)  # the launcher, and any rank it left behind
    assert process.returncode != 0, stderr[-3000:]
    assert leftover == [], "a rank outlived the run"
    assert time.monotonic() - started < BOUND_SECONDS

    if case == "rank 1 raises in training":
        assert "rank 1 fails in training_step" in stderr
    elif case == "rank 0 quantization fails":
        # rank 0 released rank 1 from the fit-end barrier before raising: rank 1 left fit normally
        assert "DynamicQuantization failed on DigitsClassifier" in stderr and "produced no quantized op" in stderr
        manifest = json.loads((tmp_path / "quantized" / "manifest.json").read_text())
        assert manifest["status"] == "failed" and "keep_float" in manifest["error"]
        assert (
            json.loads((tmp_path / "rank1.json").read_text())["left_fit"]
            >= (tmp_path / "quantized" / "manifest.json").stat().st_mtime
        )
    elif case == "rank 0 hangs at fit end":
        # rank 1's barrier timed out (TIMEOUT_SECONDS here), it exited, and Lightning's observer killed rank 0
        assert process.returncode == -signal.SIGKILL
        assert "rank1" in stderr.lower() and ("timed out" in stderr.lower() or "timeout" in stderr.lower())


if __name__ == "__main__":
    run(Path(sys.argv[1]), sys.argv[2])
