"""A large HH-format preference file through `load_datasets`: 5f119fc's row-by-row pass against the cached,
batched loader, on the same file in the same run.

    python benchmarks/data_loading.py                 # 200,000 rows, one round (~10 min on 2 busy cores)
    python benchmarks/data_loading.py --rows 50000 --rounds 3

The script writes an Anthropic-HH-shaped JSONL file (seeded, from a few hand-written exchanges: multi-turn
transcripts, ~10% longer than --max-length tokens, a few mismatched histories and empty answers, as the real
harmless-base split has), a data card and an rm recipe for it, and copies 5f119fc's package out of git. Each
measurement is a fresh child process (one torch thread, TOKENIZERS_PARALLELISM=false), in this order per round:

- old: 5f119fc's `load_datasets` (every row converted and measured one at a time, in one process);
- first: this loader with an empty cache (num_proc by default: one per idle CPU), then first-2 with
  `data.num_proc: 2` (two worker processes);
- cached: this loader again on first's cache.

Memory is the peak proportional set size (PSS) of the child and its worker processes together, sampled every
0.5 s while `load_datasets` runs, minus their PSS just before it (libraries and tokenizer loaded); its anonymous
part (heap, not the file pages of memory-mapped tables) is given too. Every mode must
give the same train and eval rows (hashed) and the same data report, or the script says so and fails.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

OLD_COMMIT = "5f119fc"
ALIAS = "smollm2-135m-instruct"
# Reading smaps_rollup walks every mapping of every process: every 50 ms it cost ~24 CPU seconds per 200k-row
# load and slowed a two-process load by ~12 s on 2 cores (a measured 70.5 s against 58.2 s at 0.5 s, with the
# same peak), so the meter would have timed itself
SAMPLE_SECONDS = 0.5
MODES = ("old", "first", "first-2", "cached")
LABELS = {"old": f"old ({OLD_COMMIT}, row by row)", "first": "first load (num_proc auto)",
          "first-2": "first load (num_proc 2)", "cached": "cached load"}

# Hand-written exchanges in the shape of Anthropic HH: a human turn, a helpful answer, a curt one. Every turn of
# the file gets its row's number, so no turn repeats from row to row (as in the real data).
EXCHANGES = [
    ("How do I keep basil alive on a windowsill?",
     "Give it at least six hours of sun, water it when the top of the soil is dry, and pinch off the flowers so "
     "the leaves keep growing.", "Buy a new one."),
    ("What's a good way to start running?",
     "Begin with short intervals: one minute running, two minutes walking, three times a week, and add a minute "
     "of running each week.", "Just run."),
    ("Can you help me write a birthday message for my sister?",
     "Of course! Happy birthday to the person who has always had my back. Here's to another year of laughs.",
     "Happy birthday."),
    ("I feel stressed about my exams.",
     "That's very common. A plan with short study blocks, real breaks and enough sleep usually helps more than "
     "long nights of cramming.", "Everyone does."),
    ("Why is the sky blue?",
     "Sunlight scatters off the molecules in the air, and blue light scatters the most, so blue reaches your "
     "eyes from every direction.", "It just is."),
    ("What should I cook tonight?",
     "A quick vegetable stir-fry with rice takes twenty minutes and uses whatever is already in the fridge.",
     "Toast."),
    ("How can I get my cat to stop scratching the sofa?",
     "Put a sturdy scratching post right next to the sofa, reward the cat when it uses it, and cover the sofa "
     "corners for a few weeks.", "Get rid of the sofa."),
    ("Is it safe to charge my phone overnight?",
     "Modern phones stop charging when the battery is full, so it's generally fine; keep it off the bed so it "
     "can stay cool.", "Probably."),
]


def write_data(folder: Path, rows: int, tokenizer_dir: Path, seed: int = 0) -> Path:
    """The HH-format file, its card and an rm recipe; returns the recipe."""
    rng = random.Random(seed)
    (folder / "data").mkdir(parents=True, exist_ok=True)
    (folder / "data_cards").mkdir(exist_ok=True)
    with (folder / "data" / "hh.jsonl").open("w") as out:
        for number in range(rows):
            history = ""
            for turn in range(rng.choice([0, 1, 1, 2, 2, 3, 4])):
                question, good, _ = rng.choice(EXCHANGES)
                history += f"\n\nHuman: {question} ({number}.{turn})\n\nAssistant: {good} ({number}.{turn})"
            question, good, poor = rng.choice(EXCHANGES)
            history += f"\n\nHuman: {question} (#{number})\n\nAssistant:"
            chosen = " " + " ".join(rng.choice(EXCHANGES)[1] for _ in range(rng.choice([1, 1, 2, 2, 3, 5, 8])))
            chosen, rejected = f"{chosen} (#{number})", f" {poor} (#{number})"  # no text repeats between rows
            roll = rng.random()
            if roll < 0.002:  # a different history on the rejected side: mismatched_history
                row = {"chosen": history + chosen, "rejected": history.replace("(#", "(other #") + rejected}
            elif roll < 0.004:  # an empty answer: empty_answer
                row = {"chosen": history + " ", "rejected": history + rejected}
            else:
                row = {"chosen": history + chosen, "rejected": history + rejected}
            out.write(json.dumps(row) + "\n")
    (folder / "data_cards" / "hh.yaml").write_text(
        "name: hh\ndescription: HH-shaped benchmark rows\nsource: {path: ../data/hh.jsonl}\nformat: hh_transcript\n"
        "license: MIT\nstages: [rm]\n")
    recipe = folder / "rm.yaml"
    recipe.write_text(f"stage: rm\nmodel: {{name_or_path: {tokenizer_dir}}}\n"
                      f"data: {{train: [hh]}}\ntraining: {{output_dir: {folder / 'out'}}}\n")
    return recipe


def old_package(folder: Path) -> Path:
    """5f119fc's `rlhf_pipeline` package, copied out of git into `folder/old`."""
    target = folder / "old"
    target.mkdir(exist_ok=True)
    archive = subprocess.run(["git", "-C", str(common.REPO), "archive", OLD_COMMIT, "rlhf_pipeline"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return target


def digest(rows: Any) -> str:
    """A hash of the rows in order (taken after the measurement, a row at a time)."""
    hashed = hashlib.sha256()
    for row in rows:
        hashed.update(json.dumps(row, sort_keys=True).encode() + b"\n")
    return hashed.hexdigest()[:16]


def tree_memory() -> tuple[int, int]:
    """(PSS, its anonymous part) of this process and its workers, from /proc/<pid>/smaps_rollup: shared pages are
    split between the processes sharing them, and the file pages of memory-mapped tables count too."""
    import psutil

    me = psutil.Process()
    total = anonymous = 0
    for process in [me, *me.children(recursive=True)]:
        try:
            fields = dict(line.split(":", 1) for line in Path(f"/proc/{process.pid}/smaps_rollup").read_text()
                          .splitlines()[1:])
        except OSError:  # a worker that just ended
            continue
        total += int(fields["Pss"].split()[0]) * 1024
        anonymous += int(fields["Pss_Anon"].split()[0]) * 1024
    return total, anonymous


class PeakMemory(threading.Thread):
    """The peak of `tree_memory()` while a block runs, sampled every `SAMPLE_SECONDS`."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak, self.peak_anonymous, self.stop = 0, 0, threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            total, anonymous = tree_memory()
            self.peak, self.peak_anonymous = max(self.peak, total), max(self.peak_anonymous, anonymous)
            self.stop.wait(SAMPLE_SECONDS)

    def __enter__(self) -> PeakMemory:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.join()


def child(mode: str, recipe_path: Path, tokenizer_dir: Path, max_length: int, old: Path | None) -> dict[str, Any]:
    if old is not None:
        sys.path.insert(0, str(old))
    import rlhf_pipeline

    assert Path(rlhf_pipeline.__file__).is_relative_to(old or common.REPO), rlhf_pipeline.__file__
    common.import_libraries()
    from transformers import AutoTokenizer

    from rlhf_pipeline.data.loading import load_datasets
    from rlhf_pipeline.distributed import process_state
    from rlhf_pipeline.stages import load_recipe

    process_state()
    overrides = [f"data.max_length={max_length}"]
    recipe = load_recipe(recipe_path, overrides + (["data.num_proc=2"] if mode == "first-2" else []))
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    common.trim()
    baseline, baseline_anonymous = tree_memory()
    started, cpu = time.perf_counter(), os.times()
    with PeakMemory() as memory:
        datasets, report = load_datasets(recipe, tokenizer)
    seconds, after = time.perf_counter() - started, os.times()
    record = report.as_dict()
    return {"seconds": seconds, "cpu_seconds": (after.user + after.system + after.children_user +
                                                after.children_system) - (cpu.user + cpu.system + cpu.children_user +
                                                                          cpu.children_system),
            "peak_mib": (memory.peak - baseline) / common.MB,
            "peak_anonymous_mib": (memory.peak_anonymous - baseline_anonymous) / common.MB,
            "rows_read": record["rows_read"],
            "report": {key: record[key] for key in ("rows_read", "rows_kept", "rows_dropped", "first_dropped")},
            "train": digest(datasets["train"]), "eval": digest(datasets["eval"]),
            "splits": {name: len(part) for name, part in datasets.items()}}


def measure(mode: str, recipe: Path, tokenizer_dir: Path, max_length: int, old: Path, cache: Path) -> dict[str, Any]:
    args = [str(Path(__file__).resolve()), "--child", mode, "--recipe", str(recipe), "--tokenizer",
            str(tokenizer_dir), "--max-length", str(max_length)] + (["--old", str(old)] if mode == "old" else [])
    env = {**os.environ, **common.OFFLINE, "OMP_NUM_THREADS": common.threads(), "RLHF_PIPELINE_DATA_CACHE": str(cache)}
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=common.REPO, env=env,
                          timeout=4 * 3600)
    if done.returncode != 0:
        raise RuntimeError(f"{mode} failed:\n{done.stderr[-4000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["rows_per_s"] = result["rows_read"] / result["seconds"]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--max-length", type=int, default=384, help="data.max_length (the issue's HH run: 384)")
    parser.add_argument("--work", type=Path, help="keep the file and caches here (default: a temporary folder)")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--recipe", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--old", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        common.emit(child(args.child, args.recipe, args.tokenizer, args.max_length, args.old))
        return 0
    from rlhf_pipeline.embedded import materialise

    info = common.machine()
    tokenizer_dir = materialise(ALIAS)
    with tempfile.TemporaryDirectory(prefix="data-loading-") as scratch:
        work = args.work or Path(scratch)
        recipe = write_data(work, args.rows, tokenizer_dir)
        old = old_package(work)
        size = (work / "data" / "hh.jsonl").stat().st_size / common.MB
        print(f"data_loading: {args.rows} rows ({size:.0f} MiB), {args.rounds} round(s) of {', '.join(MODES)}",
              flush=True)
        results: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
        for round_ in range(args.rounds):
            caches = {"old": work / f"cache-old-{round_}", "first": work / f"cache-{round_}",
                      "first-2": work / f"cache-2-{round_}", "cached": work / f"cache-{round_}"}
            for mode in MODES:
                load = os.getloadavg()[0]
                result = measure(mode, recipe, tokenizer_dir, args.max_length, old, caches[mode])
                result["load_before"] = load
                results[mode].append(result)
                print(f"  round {round_ + 1}/{args.rounds} {mode}: {result['seconds']:.1f} s, "
                      f"{result['rows_per_s']:.0f} rows/s, CPU {result['cpu_seconds']:.1f} s, "
                      f"peak +{result['peak_mib']:.0f} MiB, load before {load:.1f}", flush=True)
    outcomes = {json.dumps([r["report"], r["train"], r["eval"], r["splits"]], sort_keys=True)
                for runs in results.values() for r in runs}
    keys = ("seconds", "rows_per_s", "peak_mib", "peak_anonymous_mib", "cpu_seconds")
    median = {mode: {key: common.median(runs, key) for key in keys} for mode, runs in results.items()}
    first = results["old"][0]
    lines = [f"file: {args.rows} HH-format rows ({size:.0f} MiB), data.max_length {args.max_length}, tokenizer "
             f"{ALIAS}; {first['report']['rows_kept']} rows kept, dropped {first['report']['rows_dropped']}",
             f"the same train/eval rows and data report in every mode: {'yes' if len(outcomes) == 1 else 'NO'}"]
    lines += [f"{LABELS[mode]}: {m['seconds']:.1f} s, {m['rows_per_s']:.0f} rows/s, CPU {m['cpu_seconds']:.1f} s, "
              f"peak memory +{m['peak_mib']:.0f} MiB ({m['peak_anonymous_mib']:.0f} MiB of it anonymous)"
              for mode, m in median.items()]
    lines += [
        f"first load vs {OLD_COMMIT}: {median['old']['seconds'] / median['first']['seconds']:.2f}x faster "
        f"(target >= 3); with two processes {median['old']['seconds'] / median['first-2']['seconds']:.2f}x; "
        f"CPU time {median['old']['cpu_seconds'] / median['first']['cpu_seconds']:.2f}x less",
        f"cached / first load: {median['cached']['seconds'] / median['first']['seconds']:.3f} (target <= 0.10)",
        f"peak memory first / old: {median['first']['peak_mib'] / median['old']['peak_mib']:.2f} (target <= 1); "
        f"cached / old: {median['cached']['peak_mib'] / median['old']['peak_mib']:.2f}",
        "per run: " + json.dumps({mode: [[round(r["seconds"], 1), round(r["peak_mib"]), round(r["load_before"], 1)]
                                         for r in runs] for mode, runs in results.items()}),
    ]
    common.report("data_loading.py: load_datasets on a large HH-format file, 5f119fc vs cached", info, lines,
                  os.getloadavg())
    return 0 if len(outcomes) == 1 else 1


if __name__ == "__main__":
    sys.exit(main())
