"""Step labels, the label stage's `labelling.writes: steps`: sampled solutions split into steps, each labelled.

    labelling: {writes: steps, step_verifier: rlhf_pipeline.tasks.arithmetic:step_labels, mc_rollouts: 4}

Two ways to label a step, as a process reward model (stages/prm.py) needs:

- a step verifier (`step_verifier`, `module:function` called with the problem, the solution and its
  reference, returning one bool per step), when the task has one;
- Math-Shepherd's estimate (Wang et al. 2024), when only final answers can be checked: from each step prefix
  the policy rolls out `mc_rollouts` completions (through generation.sample_answers), and the step is labelled
  by the share whose final answer the outcome check (the recipe's judge or `reward:`) calls right: "hard" is
  1 when any does, "soft" the share. The last step is labelled by the solution's own outcome.

With both, the MC labels are measured against the verifier's (precision and recall of each class): how noisy
MC labels are, which Qwen's "Lessons of developing process reward models" (2025) reports on real maths.
`step_labels` picks which labels the card carries. Written: `stepwise.jsonl` + `data_card.yaml` (format
stepwise), the held-out prompts' solutions in `stepwise_eval.jsonl` + `data_card_eval.yaml`, and every
solution's outcome as a rule classifier's data (`outcomes.jsonl` + `data_card_outcomes.yaml`, label 1 = a
wrong final answer; `_eval` likewise), what an outcome reward model trains on; every solution with its outcome
and all its step labels in `solutions.jsonl`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf_pipeline.errors import PipelineError
from rlhf_pipeline.steps import SEPARATOR, join_steps, split_steps

if TYPE_CHECKING:
    from rlhf_pipeline.chat import Messages
    from rlhf_pipeline.generation import Engine, Sample
    from rlhf_pipeline.recipe import Recipe

Complete = Callable[[list["Messages"], list[str], int], list[list[str]]]  # prompts, prefixes, k -> continuations
Check = Callable[[list["Messages"], list[str]], list[float]]  # prompts, answers -> 1 right / 0 wrong
STEP_LABELS = ("verifier", "mc_hard", "mc_soft")


def mc_step_labels(prompts: Sequence[Messages], solutions: Sequence[list[str]], complete: Complete, check: Check,
                   rollouts: int) -> list[list[float]]:
    """Math-Shepherd's soft label of every step: the share of `rollouts` completions of the solution's first i
    steps whose final answer `check` calls right; the last step's is the solution's own outcome."""
    prefixes = [(index, i, join_steps(steps[: i + 1]) + SEPARATOR) for index, steps in enumerate(solutions)
                for i in range(len(steps) - 1)]
    continuations = complete([prompts[index] for index, _, _ in prefixes], [p for _, _, p in prefixes], rollouts)
    flat_prompts = [prompts[index] for index, _, _ in prefixes for _ in range(rollouts)]
    flat_answers = [prefix + text for (_, _, prefix), texts in zip(prefixes, continuations, strict=True)
                    for text in texts]
    right = _verdicts(check(flat_prompts, flat_answers)) if flat_answers else []
    labels = [[0.0] * len(steps) for steps in solutions]
    for position, (index, i, _) in enumerate(prefixes):
        labels[index][i] = sum(right[position * rollouts : (position + 1) * rollouts]) / rollouts
    outcomes = _verdicts(check(list(prompts), [join_steps(steps) for steps in solutions]))
    for index, steps in enumerate(solutions):
        if steps:
            labels[index][-1] = outcomes[index]
    return labels


def _verdicts(scores: Sequence[float]) -> list[float]:
    if not all(0 <= score <= 1 for score in scores):
        raise PipelineError("label: writes: steps checks final answers with the judge (or reward), which must "
                            "return 1 (right) or 0 (wrong), e.g. rlhf_pipeline.tasks.answers:outcome; got "
                            f"{list(scores[:5])}")
    return [float(score > 0.5) for score in scores]


def agreement(mc: Sequence[Sequence[float]], verifier: Sequence[Sequence[bool]]) -> dict[str, Any]:
    """MC hard labels (share > 0) against the verifier's: per class ("good", "wrong") the precision (of the steps MC
    puts in the class, the share the verifier puts there too) and recall (of the verifier's, the share MC finds)."""
    pairs = [(share > 0, good) for shares, goods in zip(mc, verifier, strict=True)
             for share, good in zip(shares, goods, strict=True)]
    soft = [(share, good) for shares, goods in zip(mc, verifier, strict=True)
            for share, good in zip(shares, goods, strict=True)]
    result: dict[str, Any] = {"steps": len(pairs), "solutions": len(mc),
                              "agreement": sum(a == b for a, b in pairs) / len(pairs) if pairs else None}
    for name, value in (("good", True), ("wrong", False)):
        both = sum(a == value and b == value for a, b in pairs)
        called, actual = sum(a == value for a, _ in pairs), sum(b == value for _, b in pairs)
        result[name] = {"precision": both / called if called else None, "recall": both / actual if actual else None,
                        "support": actual}
    for name, value in (("soft_on_good", True), ("soft_on_wrong", False)):
        shares = [share for share, good in soft if good == value]
        result[name] = sum(shares) / len(shares) if shares else None
    return result


def _card(recipe: Recipe, config: Any, judge: str, kind: str, rows: int, prompts: int, held_out: bool) -> dict:
    steps = kind == "steps"
    name = f"{recipe.output_dir.name}_{'steps' if steps else 'outcomes'}" + ("_eval" if held_out else "")
    stem = ("stepwise" if steps else "outcomes") + ("_eval" if held_out else "")
    source = (f"labelled by {config.step_labels}" + (f" ({config.step_verifier})" if config.step_labels == "verifier"
                                                     else f" from {config.mc_rollouts} rollouts per step prefix"))
    return {
        "name": name,
        "description": (f"Solutions sampled from {recipe.model.name_or_path} ({config.num_samples} per prompt, "
                        f"temperature {config.temperature}, at most {config.max_new_tokens} new tokens), "
                        + (f"split into steps (one per line), each step {source}." if steps else
                           f"each labelled 1 when the judge '{judge}' calls its final answer wrong.")
                        + (" The held-out prompts' solutions." if held_out else "")),
        "source": {"path": f"{stem}.jsonl"},
        "format": "stepwise" if steps else "classification",
        **({} if steps else {"violation_when": True}),
        "license": "same as the prompts and the sampled model",
        "stages": ["prm"] if steps else ["rm"],
        "size": {"rows": rows, "prompts": prompts},
        "known_issues": ("Labelled by a program on one policy's samples: the verifier's rules as written, or "
                         "Monte-Carlo estimates as noisy as the rollouts." if steps else
                         "Outcome labels say nothing about the steps: a right answer can rest on wrong steps."),
    }


def write_step_labels(recipe: Recipe, config: Any, policy_engine: Callable[[], AbstractContextManager[Engine]],
                      tokenizer: Any, prompts: list[Messages],
                      samples: list[list[Sample]], check: Check, judge: str, held_out: set[int],
                      references: dict[str, str]) -> tuple[dict[str, Any], Callable[[Path], None]]:
    """The step-labelled solutions, outcomes and cards of `writes: steps`: metrics and a writer of the files.

    `policy_engine` opens the label stage's sampling engine on its policy, for Math-Shepherd's rollouts."""
    import yaml

    from rlhf_pipeline.data.loading import prompt_key
    from rlhf_pipeline.distributed import say
    from rlhf_pipeline.generation import sample_answers
    from rlhf_pipeline.judges import import_function
    from rlhf_pipeline.outputs import write_jsonl

    owners = [index for index, group in enumerate(samples) for sample in group if split_steps(sample.text)]
    texts = [sample.text for group in samples for sample in group if split_steps(sample.text)]
    solutions = [split_steps(text) for text in texts]
    owner_prompts = [prompts[index] for index in owners]
    outcomes = _verdicts(check(owner_prompts, texts))
    say(f"label: {len(solutions)} solutions with steps, {sum(outcomes):.0f} with the right answer")
    labels: dict[str, list[list[float]]] = {}
    if config.step_verifier:
        verify = import_function(config.step_verifier)
        labels["verifier"] = [[float(good) for good in verify(prompt, text, references.get(prompt_key(prompt)))]
                              for prompt, text in zip(owner_prompts, texts, strict=True)]
    mc_block = None
    if config.mc_rollouts:
        def complete(chats: list[Messages], prefixes: list[str], k: int) -> list[list[str]]:
            with policy_engine() as engine:
                rolled = sample_answers(engine, tokenizer, chats, k, config.max_new_tokens, config.temperature,
                                        config.top_p, config.seed + 1, "label: Math-Shepherd rollouts",
                                        answer_prefixes=prefixes)
            return [[sample.text for sample in group] for group in rolled]

        soft = mc_step_labels(owner_prompts, solutions, complete, check, config.mc_rollouts)
        labels["mc_soft"], labels["mc_hard"] = soft, [[float(share > 0) for share in row] for row in soft]
        if "verifier" in labels:
            mc_block = agreement(soft, [[good > 0.5 for good in row] for row in labels["verifier"]])
            mc_block["rollouts"] = config.mc_rollouts
            say(f"label: Math-Shepherd labels vs the verifier: agreement {mc_block['agreement']:.3f}, wrong steps "
                f"found (recall) {mc_block['wrong']['recall']}, precision {mc_block['wrong']['precision']}")
    chosen = labels[config.step_labels]
    rows: dict[bool, list[dict[str, Any]]] = {False: [], True: []}
    outcome_rows: dict[bool, list[dict[str, Any]]] = {False: [], True: []}
    for index, prompt, text, steps, good, right in zip(owners, owner_prompts, texts, solutions, chosen, outcomes,
                                                       strict=True):
        rows[index in held_out].append({"prompt": prompt, "steps": steps, "labels": good})
        outcome_rows[index in held_out].append({"prompt": prompt, "answer": text, "label": int(right < 0.5)})
    every = [{"prompt": prompt, "answer": text, "right": right, "labels": {kind: rows_[n] for kind, rows_ in
                                                                         labels.items()}}
             for n, (prompt, text, right) in enumerate(zip(owner_prompts, texts, outcomes, strict=True))]
    counts = {"prompts": len(prompts), "answers": sum(map(len, samples)), "solutions": len(solutions),
              "steps": sum(map(len, solutions)), "right_answers": sum(outcomes) / max(len(outcomes), 1),
              "finished_answers": sum(s.finished for group in samples for s in group),
              "held_out_prompts": len(held_out), "held_out_solutions": len(rows[True]),
              "good_steps": sum(sum(row) for row in chosen) / max(sum(map(len, chosen)), 1)}
    metrics = {"counts": counts, "step_labels": config.step_labels, "mc_vs_verifier": mc_block}
    per_prompt = {False: len(prompts) - len(held_out), True: len(held_out)}

    def write_files(folder: Path) -> None:
        for held in (False, True):
            if held and not held_out:
                continue
            suffix = "_eval" if held else ""
            write_jsonl(folder / f"stepwise{suffix}.jsonl", rows[held])
            write_jsonl(folder / f"outcomes{suffix}.jsonl", outcome_rows[held])
            for kind, name in (("steps", f"data_card{suffix}.yaml"), ("outcomes", f"data_card_outcomes{suffix}.yaml")):
                card = _card(recipe, config, judge, kind, len((rows if kind == "steps" else outcome_rows)[held]),
                             per_prompt[held], held)
                (folder / name).write_text(yaml.safe_dump(card, sort_keys=False))
        write_jsonl(folder / "solutions.jsonl", every)

    return metrics, write_files
