"""Sweeps through Hydra's submitit launcher: a real two-job `python train.py -m hydra/launcher=submitit_local` writes
the comparison of its jobs, and `hydra/launcher=slurm` (conf/hydra/launcher/slurm.yaml) makes the sbatch array
script a cluster would run.

submitit_local is the SLURM launcher's plugin with the local executor: each job is pickled, run in a process of its
own by submitit and its result read back, as on a cluster (less sbatch and the shared file system).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import hydra_plugins.hydra_submitit_launcher  # noqa: F401  (the test extra installs it: missing is a failure, not a skip)
import yaml
from conftest import FAST_TRAIN_SCRIPT, ROOT
from test_hydra_sweep import read_csv

# the cheapest jobs that still make comparison rows: a few batches, no quantization callback (one float row each)
FAST = [f"{key}={value}" for key, value in FAST_TRAIN_SCRIPT.items()] + [
    "trainer.enable_model_summary=false",
    "callbacks=none",
]


def train(*overrides: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "-m", *overrides, *FAST],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip


def test_submitit_local_sweep_runs_each_job_in_its_own_process_and_compares_them(tmp_path):
    sweep_dir = tmp_path / "sweep"
    # timeout_min: submitit ends a job that hangs, so the sweep ends too
    result = train("hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5", "model=convnet,mlp",
                   f"hydra.sweep.dir={sweep_dir}")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Submitit 'local' sweep output dir" in result.stdout + result.stderr
    rows = read_csv(sweep_dir / "comparison.csv")
    assert [(r["job"], r["status"], r["model"], r["callbacks"], r["approach"], r["overrides"]) for r in rows] == [
        ("0", "ok", "convnet", "none", "float", "model=convnet"),
        ("1", "ok", "mlp", "none", "float", "model=mlp"),
    ]
    submitit_ids = set()
    for row in rows:
        job_dir = sweep_dir / row["job"]
        metrics = json.loads((job_dir / "metrics.json").read_text())
        assert float(row["objective"]) == metrics["test/acc"]  # what train() returned, sent back by submitit
        assert json.loads((job_dir / "job_status.json").read_text())["status"] == "completed"
        # the job ran under submitit: Hydra's job id is submitit's, whose folder holds the job's log and result
        job_id = str(yaml.safe_load((job_dir / ".hydra" / "hydra.yaml").read_text())["hydra"]["job"]["id"])
        submitit_dir = sweep_dir / ".submitit" / job_id
        assert (submitit_dir / f"{job_id}_0_result.pkl").exists()
        assert "Job completed successfully" in (submitit_dir / f"{job_id}_0_log.out").read_text()
        submitit_ids.add(job_id)
    assert len(submitit_ids) == 2 and str(os.getpid()) not in submitit_ids
    table = (sweep_dir / "comparison.md").read_text()
    assert table.count("\n") == 2 + len(rows) and "| 0 | ok | convnet |" in table and "| 1 | ok | mlp |" in table
    assert (sweep_dir / "comparison.png").stat().st_size > 0


def test_slurm_launcher_writes_the_sbatch_array_of_the_sweep(tmp_path):
    """No cluster here: an `sbatch` on PATH keeps the script submitit hands it and refuses the submission, so
    the sweep stops before any job, with sbatch's error (submitit also wants an `srun` on PATH; it is not called)."""
    bin_dir, script = tmp_path / "bin", tmp_path / "submitted.sh"
    bin_dir.mkdir()
    commands = {"sbatch": f'cp "$1" {script}\necho "sbatch: error: no cluster here" >&2\nexit 1', "srun": "exit 1"}
    for name, body in commands.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    result = train("hydra/launcher=slurm", "hydra.launcher.partition=cpu", "hydra.launcher.gres=gpu:1",
                   "model=convnet,mlp", f"hydra.sweep.dir={tmp_path / 'sweep'}", env=env)  # fmt: skip
    assert result.returncode != 0 and "no cluster here" in result.stderr, result.stderr[-3000:]
    sbatch = script.read_text()
    logs = f"{tmp_path / 'sweep'}/.submitit/%A_%a/%A_%a"  # %A: the array's id, %a: the job's index in it
    expected = [
        *(f"#SBATCH --{flag}" for flag in ["partition=cpu", "gres=gpu:1", "cpus-per-task=4", "mem=8GB", "time=60",
                                           "nodes=1", "ntasks-per-node=1", f"output={logs}_0_log.out"]),
        "#SBATCH --array=0-1%2",  # the two jobs, at most array_parallelism (16) at a time
        "export OMP_NUM_THREADS=4",  # the setup line: one torch thread per CPU of the job
        f"srun --unbuffered --output {logs}_%t_log.out",
        f"{sys.executable} -u -m submitit.core._submit",
    ]  # fmt: skip
    for line in expected:
        assert line in sbatch, sbatch
    assert not list((tmp_path / "sweep").glob("[0-9]*"))  # no job ran
