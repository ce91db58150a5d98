"""glibc's heap on CPU: peak RSS and speed of the SFT and PPO stages, default malloc vs a fixed mmap threshold.

    python benchmarks/allocator.py                      # 3 interleaved rounds of SFT (4 steps), ~10 min
    python benchmarks/allocator.py --stages sft ppo     # PPO too (2 PPO steps per run), ~40 min

glibc raises its mmap threshold (up to 32 MiB) after large blocks are freed, so activation-sized blocks
then come from the heap, and freed temporaries stuck between live tensors stay resident. With
MALLOC_MMAP_THRESHOLD_=65536 in the environment the threshold is fixed: blocks of 64 KiB and more are
mapped and unmapped on their own, and RSS follows the live tensors. The children are those of
ppo_memory.py (the demo recipes, run by the stages); only the environment differs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

SETTINGS = {"default": {}, "mmap-64k": {"MALLOC_MMAP_THRESHOLD_": "65536"}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--stages", nargs="+", choices=("sft", "ppo"), default=["sft"])
    parser.add_argument("--work", type=Path)
    args = parser.parse_args(argv)
    info = common.machine()
    script = Path(__file__).resolve().parent / "ppo_memory.py"
    lines = []
    with tempfile.TemporaryDirectory(prefix="allocator-") as tmp:
        work = args.work or Path(tmp)
        if "ppo" in args.stages:
            common.prepare_stages(work)
        for stage in args.stages:
            print(f"allocator: {stage}, {args.repeats} × (default, mmap-64k)", flush=True)
            results = common.interleaved(tuple(SETTINGS), args.repeats, lambda setting, stage=stage: common.run_child(
                script, ["--child", stage, "--work", str(work)], env=SETTINGS[setting]))
            peak = {s: common.median(results[s], "peak_mib") for s in SETTINGS}
            cpu = {s: common.median(results[s], "train_cpu_seconds") for s in SETTINGS}
            lines += [f"{stage}: peak over baseline (median) default {peak['default']:.0f} MiB, mmap-64k "
                      f"{peak['mmap-64k']:.0f} MiB -> {peak['mmap-64k'] / peak['default']:.2f}; training CPU s "
                      f"default {cpu['default']:.1f}, mmap-64k {cpu['mmap-64k']:.1f} -> "
                      f"{cpu['mmap-64k'] / cpu['default']:.2f}",
                      "  per run (peak MiB, CPU s): " + json.dumps(
                          {s: [(round(r["peak_mib"]), round(r["train_cpu_seconds"], 1)) for r in rs]
                           for s, rs in results.items()})]
    common.report("allocator.py: glibc default vs MALLOC_MMAP_THRESHOLD_=65536 (SmolLM2-135M stages)", info, lines,
                  os.getloadavg())
    return 0


if __name__ == "__main__":
    sys.exit(main())
