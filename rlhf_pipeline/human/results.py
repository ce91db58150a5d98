"""What the judgement log becomes: preference pairs, classified answers, their data cards, agreement, win rate.

Written again after every judgement (each file replaced atomically), so the outputs are never behind the
log and `rm` can train on them whenever the annotators stop. Shown orders are undone here: a judgement
stores the original index of the answer picked, and the order it was shown in for the record.
"""

from __future__ import annotations

import collections
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from rlhf_pipeline.human.agreement import agreement_report, pair_agreement
from rlhf_pipeline.outputs import write_jsonl, write_text_atomic


def prompt_text(prompt: Any) -> str:
    """The last user turn of a chat prompt (what the annotator reads), or the prompt itself when it is text."""
    if isinstance(prompt, list):
        users = [turn["content"] for turn in prompt if turn.get("role") == "user"]
        return users[-1] if users else ""
    return str(prompt)


def preference_rows(items: list[dict[str, Any]], records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One pair per (picked answer, other non-empty answer) of every "best" judgement, with its annotator."""
    rows = []
    for record in records:
        if record["verdict"] != "best":
            continue
        item = items[record["item"]]
        chosen = item["answers"][record["best"]]
        rows.extend({"prompt": item["prompt"], "chosen": chosen, "rejected": other, "annotator": record["annotator"],
                     "item": record["item"]}
                    for other in item["answers"] if other.strip() and other != chosen)
    return rows


def classified_rows(items: list[dict[str, Any]], records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every answer of a judged (not skipped) item: label 1 when the annotator flagged it as breaking a rule."""
    rows = []
    for record in records:
        if record["verdict"] == "skip":
            continue
        item = items[record["item"]]
        rows.extend({"prompt": item["prompt"], "answer": answer, "label": int(index in record["flags"]),
                     "annotator": record["annotator"]}
                    for index, answer in enumerate(item["answers"]) if answer.strip())
    return rows


def label_agreement(items: list[dict[str, Any]], records: list[dict[str, Any]]) -> dict[str, Any]:
    """Kappa between annotators on shared items, and of each annotator with the machine judge's best answer."""
    picks: dict[str, dict[int, int]] = collections.defaultdict(dict)
    for record in records:
        if record["verdict"] == "best":
            picks[record["annotator"]][record["item"]] = record["best"]
    judge = {i: max(range(len(item["scores"])), key=item["scores"].__getitem__)
             for i, item in enumerate(items) if item.get("scores")}
    versus_judge = {name: pair_agreement(labels, judge) for name, labels in sorted(picks.items())}
    return {"annotators": agreement_report(picks),
            "humans_vs_judge": {name: stats for name, stats in versus_judge.items() if stats is not None}}


def agreement_sentence(agreement: dict[str, Any]) -> str:
    """The card's one-line account of agreement (the full numbers are in summary.json)."""
    parts = [f"{pair} {_kappa(v['cohen_kappa'])} on {v['items']} shared items"
             for pair, v in agreement["annotators"]["pairs"].items()]
    parts += [f"{name} vs the machine judge {_kappa(v['cohen_kappa'])} on {v['items']} items"
              for name, v in agreement["humans_vs_judge"].items()]
    return f"Agreement (Cohen's kappa): {'; '.join(parts)}." if parts else "No item was judged twice yet."


def _kappa(value: float | None) -> str:
    return "undefined" if value is None else f"{value:.2f}"


def _counts(records: list[dict[str, Any]]) -> dict[str, Any]:
    per_annotator = collections.Counter(r["annotator"] for r in records)
    verdicts = collections.Counter(r["verdict"] for r in records)
    return {"judgements": len(records), "per_annotator": dict(sorted(per_annotator.items())),
            "verdicts": dict(sorted(verdicts.items()))}


def write_label_results(folder: Path, items_path: Path, items: list[dict[str, Any]], records: list[dict[str, Any]],
                        rules: str) -> dict[str, Any]:
    """preferences.jsonl + data_card.yaml (for rm), classified.jsonl + classification_card.yaml, summary.json."""
    import yaml

    pairs, classified = preference_rows(items, records), classified_rows(items, records)
    counts = _counts(records) | {"items": len(items), "pairs": len(pairs), "classified": len(classified),
                                 "flagged": sum(r["label"] for r in classified),
                                 "items_judged": len({r["item"] for r in records if r["verdict"] != "skip"})}
    agreement = label_agreement(items, records)
    annotators = ", ".join(counts["per_annotator"]) or "none yet"
    card = {
        "name": f"{folder.name}_human_preferences",
        "description": (f"Preference pairs labelled by people ({annotators}) on the sampled answers in {items_path}: "
                        f"each judgement picks the best of the shown answers (in a random order), and yields one "
                        f"pair of it over each other answer. {counts['judgements']} judgements, "
                        f"{counts['verdicts'].get('skip', 0)} skipped. {agreement_sentence(agreement)}"),
        "source": {"path": "preferences.jsonl"},
        "format": "prompt_chosen_rejected",
        "license": "same as the prompts and the sampled model",
        "stages": ["rm"],
        "size": {"rows": len(pairs), "prompts": counts["items_judged"], "judgements": counts["judgements"],
                 "per_annotator": counts["per_annotator"]},
        "known_issues": ("Human-judged by the annotators listed; items labelled by several annotators appear once "
                         "per annotator, so their disagreements stay in the data."),
    }
    classification_card = {
        "name": f"{folder.name}_human_flags",
        "description": (f"Answers people judged against the rules ({rules or 'as each annotator understood them'}): "
                        f"label 1 when an annotator flagged the answer as breaking a rule "
                        f"({counts['flagged']} of {len(classified)})."),
        "source": {"path": "classified.jsonl"},
        "format": "classification",
        "violation_when": True,
        "license": "same as the prompts and the sampled model",
        "stages": ["rm"],
        "size": {"rows": len(classified), "prompts": counts["items_judged"]},
        "known_issues": "An unflagged answer is one the annotator saw and did not flag, not one checked for each rule.",
    }
    write_jsonl(folder / "preferences.jsonl", pairs)
    write_text_atomic(folder / "data_card.yaml", yaml.safe_dump(card, sort_keys=False))
    write_jsonl(folder / "classified.jsonl", classified)
    write_text_atomic(folder / "classification_card.yaml", yaml.safe_dump(classification_card, sort_keys=False))
    summary = {"counts": counts, "agreement": agreement}
    write_text_atomic(folder / "summary.json", json.dumps(summary, indent=2))
    return summary


@lru_cache(maxsize=1)
def _win_rate_metric() -> Any:
    from rlhf_pipeline.metrics import load_metric

    return load_metric("win_rate")


def ab_outcome(record: dict[str, Any]) -> float:
    """+1 when the policy's answer was preferred, -1 the baseline's, 0 a tie (the win_rate metric's gain)."""
    return {"policy": 1.0, "baseline": -1.0, "tie": 0.0}[record["verdict"]]


def write_ab_results(folder: Path, records: list[dict[str, Any]], policy: str) -> dict[str, Any]:
    """summary.json: the policy's win rate over the baseline with its bootstrap 95% interval, and agreement."""
    judged = [r for r in records if r["verdict"] != "skip"]
    counts = _counts(records)
    picks: dict[str, dict[int, str]] = collections.defaultdict(dict)
    for record in judged:
        picks[record["annotator"]][record["item"]] = record["verdict"]
    summary: dict[str, Any] = {"policy": policy, "counts": counts, "agreement": agreement_report(picks)}
    if judged:
        outcomes = [ab_outcome(r) for r in judged]
        summary["win_rate"] = _win_rate_metric().compute(policy_scores=outcomes, baseline_scores=[0.0] * len(judged))
        summary["left_side"] = dict(collections.Counter(r["left"] for r in judged))
    write_text_atomic(folder / "summary.json", json.dumps(summary, indent=2))
    return summary


def write_probe_results(folder: Path, records: list[dict[str, Any]]) -> dict[str, Any]:
    """classified.jsonl + data_card.yaml (classification format) from the probing verdicts."""
    import yaml

    rows = [{"prompt": r["prompt"], "answer": r["answer"], "label": int(r["broken"]), "rule": r["rule"],
             "annotator": r["annotator"]} for r in records]
    rules = collections.Counter(r["rule"] for r in records)
    card = {
        "name": f"{folder.name}_probes",
        "description": (f"Adversarial probes written by people ({', '.join(sorted({r['annotator'] for r in records}))})"
                        f" to make the policy break a rule, as Sparrow collected its rule data; label 1 when the "
                        f"person judged the rule broken ({sum(r['label'] for r in rows)} of {len(rows)})."),
        "source": {"path": "classified.jsonl"},
        "format": "classification",
        "violation_when": True,
        "license": "same as the sampled model",
        "stages": ["rm"],
        "size": {"rows": len(rows), "prompts": len(rows), "per_rule": dict(sorted(rules.items()))},
        "known_issues": "Prompts were written to provoke breaks: the violation rate is not the policy's usual rate.",
    }
    write_jsonl(folder / "classified.jsonl", rows)
    write_text_atomic(folder / "data_card.yaml", yaml.safe_dump(card, sort_keys=False))
    return {"counts": _counts(records) | {"broken": sum(r["label"] for r in rows)}}
