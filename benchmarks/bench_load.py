"""Do the speed-ups users act on survive a busy machine? (issue 17) The same job (the default ``python train.py``,
static int8 of the digits conv net) runs twice: on a quiet machine, then with another process computing on one
core (a one-thread PyTorch matmul loop, like a second job). Each run's manifest gives every shipped file's
speed-up over float eager and its spread; the table puts the two side by side with the load averages.

    python benchmarks/bench_load.py                      # about 3 minutes on an idle 2-core machine
    python benchmarks/bench_load.py -- model=resnet      # extra arguments go to train.py
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from lightning_quant.target import cpu_info

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).with_name("load_results.md")
LOAD = "import torch\ntorch.set_num_threads(1)\na = torch.randn(512, 512)\nwhile True:\n    a @ a\n"
AGREE = 0.2  # issue 17: quiet and loaded speed-ups within 20% of each other


def train(out: Path, overrides: list[str]) -> dict[str, Any]:
    subprocess.run(
        [sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={out}", *overrides],
        check=True,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    return json.loads((out / "quantized" / "manifest.json").read_text())


def speedups(manifest: dict[str, Any]) -> dict[str, float]:
    return {a["format"]: a["speedup_vs_float"] for a in manifest["artifacts"] if a["speedup_vs_float"]}


def main() -> None:
    overrides = sys.argv[sys.argv.index("--") + 1 :] if "--" in sys.argv else []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        quiet = train(Path(scratch) / "quiet", overrides)
        load = subprocess.Popen([sys.executable, "-c", LOAD])
        try:
            time.sleep(5)  # let the load average see it
            loaded = train(Path(scratch) / "loaded", overrides)
        finally:
            load.kill()
    cpu = cpu_info()
    lines = [
        "# Speed-ups on a quiet and a loaded machine (benchmarks/bench_load.py)",
        "",
        f"CPU: {cpu['vendor']} {cpu['model']}, ISA flags {cpu['flags']}. Job: `python train.py "
        f"{' '.join(overrides)}`; loaded = another process running a one-thread matmul loop throughout.",
        "",
        "| file | quiet speed-up | loaded speed-up | loaded / quiet | within 20% |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, manifest in (("quiet", quiet), ("loaded", loaded)):
        timing = manifest["latency_ms"]
        lines.insert(
            -2,
            f"{name}: load average {timing['load_average'][0]:.2f} -> {timing['load_average'][1]:.2f}; "
            f"float eager {timing['float']:.3f} ms (fastest call; p25-p75 {timing['spread_ms']['float'][0]:.3f}-"
            f"{timing['spread_ms']['float'][2]:.3f}); recommended {manifest['recommended']}  ",
        )
    quiet_speed, loaded_speed = speedups(quiet), speedups(loaded)
    for fmt in quiet_speed.keys() & loaded_speed.keys():
        ratio = loaded_speed[fmt] / quiet_speed[fmt]
        lines.append(
            f"| {fmt} | {quiet_speed[fmt]:.2f}x | {loaded_speed[fmt]:.2f}x | {ratio:.2f} | "
            f"{'yes' if abs(ratio - 1) <= AGREE else 'NO'} |"
        )
    lines += ["", f"Run took {time.perf_counter() - started:.0f} s."]
    RESULTS.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
