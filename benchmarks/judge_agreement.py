"""An LLM judge against a preference file's labels: agreement, order flips and position effect.

    python benchmarks/judge_agreement.py data_cards/demo_preferences_warm.yaml
    python benchmarks/judge_agreement.py outputs/smollm2-135m/label/data_card.yaml --judge outputs/smollm2-135m/sft \
        --max-pairs 200 --seed 0 --choices A B

The pairs are read through their data card, as a recipe reads them. Each pair is asked in both orders
(rlhf_pipeline.llm_judge.agreement); `--mode pointwise` compares expected ratings instead. Prints one JSON
object with the numbers, the settings and the wall time on stdout (progress goes to stderr).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: F401  (offline environment, the repository on sys.path)


def read_pairs(card_path: Path) -> list[tuple[list[dict[str, str]], str, str]]:
    """(prompt, chosen, rejected) of every usable row of a preference card."""
    from rlhf_pipeline.chat import answer_text
    from rlhf_pipeline.data.cards import load_card
    from rlhf_pipeline.data.loading import convert_card_rows, read_card_rows

    card = load_card(card_path)
    rows, _, _ = read_card_rows(card)
    converted = convert_card_rows(card, rows, None).rows
    return [(row["prompt"], answer_text(row["chosen"]), answer_text(row["rejected"])) for row in converted]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("card", type=Path, help="data card of a preference file (prompt/chosen/rejected)")
    parser.add_argument("--judge", default="embedded", help="judge model: folder, Hub id, embedded, finished stage")
    parser.add_argument("--mode", default="pairwise", choices=("pairwise", "pointwise"))
    parser.add_argument("--rubric", default=None, help="rubric text or a .txt/.md file (default: built-in)")
    parser.add_argument("--choices", nargs=2, default=["1", "2"])
    parser.add_argument("--max-pairs", type=int, default=None, help="judge a seeded random subset of this size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()

    from rlhf_pipeline.llm_judge import LLMJudge, agreement

    pairs = read_pairs(args.card)
    total = len(pairs)
    if args.max_pairs is not None and args.max_pairs < total:
        pairs = random.Random(args.seed).sample(pairs, args.max_pairs)
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # progress messages; stdout holds the JSON alone
        judge = LLMJudge.from_path(args.judge, mode=args.mode, rubric=args.rubric, choices=tuple(args.choices),
                                   batch_size=args.batch_size)
        loaded = time.perf_counter()
        numbers = agreement(judge, pairs)
    done = time.perf_counter()
    print(json.dumps({"card": str(args.card), "pairs_in_file": total, "judge": args.judge, "mode": args.mode,
                      "choices": args.choices, "rubric": args.rubric or "built-in", "seed": args.seed,
                      **numbers, "load_seconds": round(loaded - start, 1),
                      "judge_seconds": round(done - loaded, 1)}, indent=2))


if __name__ == "__main__":
    main()
