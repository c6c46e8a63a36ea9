"""QuantizationAwareTraining under ``strategy="ddp"``, 2 CPU processes (gloo).

Lightning's DDP launcher starts the other rank by running the same command again, so the fit runs in
this file executed as a script (``python tests/test_qat_ddp.py OUT``), not inside pytest's process. Each
rank saves what it saw; the test compares the two.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import torch


def ranges(callback) -> dict[str, torch.Tensor]:
    state = callback.qat.state_dict()["fake_quant"]
    return {k: v.clone() for k, v in state.items() if k.endswith(("min_val", "max_val", "scale", "zero_point"))}


def run(out: Path) -> None:
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    from lightning_quant import QuantizationAwareTraining
    from lightning_quant.demo import ConvNet, DigitsClassifier, DigitsDataModule

    class Probe(Callback):
        """Listed before the QAT callback: at a batch end it sees this rank's ranges before they are reduced."""

        def __init__(self, qat) -> None:
            self.qat, self.seen = qat, {}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.seen.setdefault("local", ranges(self.qat))

        def on_train_epoch_end(self, trainer, pl_module):
            self.seen[f"epoch{trainer.current_epoch}"] = ranges(self.qat)

    L.seed_everything(0)
    qat = QuantizationAwareTraining(formats=["torch_export"], dirpath=out / "quantized")
    probe = Probe(qat)
    trainer = L.Trainer(
        strategy="ddp",
        accelerator="cpu",
        devices=2,
        max_epochs=2,
        limit_train_batches=3,
        limit_val_batches=2,
        num_sanity_val_steps=0,
        callbacks=[probe, qat],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out,
    )
    trainer.fit(DigitsClassifier(ConvNet(channels=8, blocks=2)), DigitsDataModule(batch_size=32))
    probe.seen.update(final=ranges(qat), exported=qat.manifest is not None, left_fit=time.time())
    torch.save(probe.seen, out / f"rank{trainer.global_rank}.pt")


def test_ddp_two_cpu_processes_keep_identical_ranges_and_export_once(tmp_path):
    done = subprocess.run([sys.executable, __file__, str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    # the ranks trained on different batches: before the first reduction their ranges differed ...
    assert any(not torch.equal(rank0["local"][k], rank1["local"][k]) for k in rank0["local"])
    # ... after every step they are the same
    for moment in ("epoch0", "epoch1", "final"):
        for name, value in rank0[moment].items():
            assert torch.equal(value, rank1[moment][name]), (moment, name)
    # rank zero exported; rank one did not, and left fit only after the manifest was written
    manifest = tmp_path / "quantized" / "manifest.json"
    assert rank0["exported"] and not rank1["exported"] and manifest.is_file()
    assert rank1["left_fit"] >= manifest.stat().st_mtime


if __name__ == "__main__":
    run(Path(sys.argv[1]))
