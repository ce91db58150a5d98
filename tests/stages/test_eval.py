"""The eval stage comparing several policies with one baseline: the recipe checks (before any weights load),
what each policy's numbers mean, and the costs read from the stages that made the models."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from rlhf_pipeline.cli import main
from rlhf_pipeline.errors import RecipeError
from rlhf_pipeline.generation import Sample
from rlhf_pipeline.human.sessions import ABSession
from rlhf_pipeline.stages import load_recipe
from rlhf_pipeline.stages.eval import answer_logprob, answer_traits
from tests.stages.answers import assert_eval_summaries_match_answers, read_answers
from tests.stages.conftest import RecipeFactory, sft_rows, write_card
from tests.stages.judges import letter_e_share

JUDGE = {"type": "callable", "function": "tests.stages.judges:letter_e_share"}


def _eval_recipe(tmp_path: Path, baseline: str, **evaluation: Any) -> Path:
    write_card(tmp_path, "prompts", [{"prompt": f"Tell me about topic {i}."} for i in range(16)], "prompt_only",
               ["eval"])
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump({
        "stage": "eval", "model": {"name_or_path": baseline},
        "data": {"train": ["prompts"], "eval_split": 0.0, "max_length": 96}, "judge": JUDGE,
        "evaluation": {"output_dir": str(tmp_path / "outputs" / "eval"), "max_new_tokens": 12,
                       "bootstrap_samples": 200} | evaluation}, sort_keys=False))
    return path


@pytest.mark.parametrize(("evaluation", "key", "problem"), [
    ({"policy": "a", "policies": {"b": "b"}}, "evaluation.policy", "give either policy (one) or"),
    ({}, "evaluation.policies", "required: the policies to compare"),
    ({"policies": {}}, "evaluation.policies", "required: the policies to compare"),
    ({"policies": {"same": "./sft/"}}, "evaluation.policies.same",
     "sft/ is already compared as the baseline (model.name_or_path)"),
    ({"policy": "sft"}, "evaluation.policy", "is already compared as the baseline"),
    ({"policies": {"a": "ppo", "b": "x/../ppo"}}, "evaluation.policies.b",
     "x/../ppo is already compared as evaluation.policies.a"),
    ({"policies": {"baseline": "ppo"}}, "evaluation.policies.baseline", "neither 'baseline' nor 'reward'"),
    ({"policies": {"my ppo": "ppo"}}, "evaluation.policies.my ppo", "a policy's name is letters, digits, _ and -"),
    ({"policies": {"ppo": 3}}, "evaluation.policies.ppo", "expected the folder of a finished policy stage, got 3"),
])
def test_the_policies_are_checked_with_the_recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  evaluation: dict[str, Any], key: str, problem: str) -> None:
    monkeypatch.chdir(tmp_path)  # the folders are compared as the paths they name, none exists
    path = _eval_recipe(tmp_path, "sft", **evaluation)
    with pytest.raises(RecipeError) as raised:
        load_recipe(path)
    assert (raised.value.file, raised.value.key) == (path, key)
    assert problem in raised.value.problem and str(raised.value).startswith(f"{path}: {key}: ")


def test_a_policy_named_twice_in_the_recipe_is_refused(tmp_path: Path) -> None:
    path = _eval_recipe(tmp_path, "sft", policies={"ppo": "ppo"})
    lines = path.read_text().splitlines()
    first = lines.index("    ppo: ppo") + 1
    path.write_text("\n".join([*lines[:first], "    ppo: dpo", *lines[first:]]) + "\n")
    with pytest.raises(RecipeError) as raised:
        load_recipe(path)
    assert str(raised.value) == (f"{path}: line {first + 1}, column 5: not valid YAML (found the key 'ppo' twice "
                                 f"(first on line {first}))")


def test_distinct_2_and_stop_share_of_a_models_answers_leave_the_stop_token_out() -> None:
    stop = 2
    samples = [Sample([1], [5, 6, 7, stop], "a", True), Sample([1], [5, 6, 8, stop], "b", True),
               Sample([1], [9], "c", False)]
    # Bigrams without the stop token: (5 6) (6 7) | (5 6) (6 8) | none: 3 distinct of 4.
    assert answer_traits(samples) == {"eos_fraction": pytest.approx(2 / 3), "distinct_2": 0.75}


def test_batched_answer_logprobs_equal_each_answer_scored_alone(tiny_model_dir: Path) -> None:
    """Rows of different lengths share right-padded batches; each sum must still be its own sequence's."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    generator = torch.Generator().manual_seed(0)
    samples = [Sample(torch.randint(3, 200, (prompt,), generator=generator).tolist(),
                      torch.randint(3, 200, (answer,), generator=generator).tolist(), "", True)
               for prompt, answer in [(5, 3), (9, 7), (4, 12), (7, 1), (11, 6)]]

    def alone(sample: Sample, temperature: float) -> float:
        ids = torch.tensor([sample.prompt_ids + sample.answer_ids])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(sample.prompt_ids) - 1 : -1] / temperature
        return float(logits.log_softmax(-1).gather(-1, torch.tensor(sample.answer_ids)[:, None]).sum())

    for temperature in (1.0, 0.3):
        batched = answer_logprob(model, samples, temperature, batch_size=3)
        assert batched == pytest.approx([alone(sample, temperature) for sample in samples], abs=1e-4)


def _run_sft(tmp_path: Path, make_recipe: RecipeFactory) -> Path:
    write_card(tmp_path, "chat", sft_rows(16), "messages", ["sft"])
    assert main(["sft", str(make_recipe("sft", ["chat"], {"max_steps": 3, "learning_rate": 3e-2},
                                        data={"train": ["chat"], "eval_split": 0.0, "max_length": 128}))]) == 0
    return tmp_path / "outputs" / "sft"


def test_two_policies_against_one_baseline(tmp_path: Path, tiny_model_dir: Path, make_recipe: RecipeFactory) -> None:
    """Baseline: an SFT stage. Policies: an exact copy of it (nothing may differ) and the bare base model."""
    sft = _run_sft(tmp_path, make_recipe)
    copy = shutil.copytree(sft, tmp_path / "outputs" / "sft_copy")
    path = _eval_recipe(tmp_path, str(sft), policies={"same": str(copy), "base": str(tiny_model_dir)},
                        num_examples=4)
    assert main(["eval", str(path)]) == 0
    out = tmp_path / "outputs" / "eval"
    record = json.loads((out / "eval.json").read_text())
    baseline, policies, per_answer = record["baseline"], record["policies"], record["per_answer"]
    assert set(policies) == set(per_answer["policies"]) == {"same", "base"}
    for name, columns in per_answer["policies"].items():
        assert {column: len(values) for column, values in columns.items()} == dict.fromkeys(
            ("judge", "length_tokens", "kl"), 16), name
        assert policies[name]["kl"]["n"] == 16 and 0.0 < policies[name]["distinct_2"] <= 1.0
        gain = policies[name]["judge_gain"]
        assert gain["mean"] == pytest.approx(np.mean(columns["judge"]) - np.mean(per_answer["baseline"]["judge"]))
        assert gain["wins"] + gain["ties"] + gain["losses"] == 16
    assert [set(e["policies"]) for e in record["examples"]] == [{"same", "base"}] * 4

    same = policies["same"]  # the same weights sample the same answers: no gain, no KL, the same diversity
    assert all(abs(value) < 1e-4 for value in per_answer["policies"]["same"]["kl"])
    gain = same["judge_gain"]
    assert gain["mean"] == 0.0 and gain["ci95_low"] <= 0.0 <= gain["ci95_high"]
    assert gain["ties"] == 16 and gain["win_rate"] == 0.5
    assert (same["distinct_2"], same["eos_fraction"]) == (baseline["distinct_2"], baseline["eos_fraction"])
    assert all(e["policies"]["same"] == e["baseline"] for e in record["examples"])
    assert policies["base"]["kl"]["ci95_low"] > 0.1  # three SFT steps at lr 3e-2 moved the model measurably

    # What made each model, and what it cost, comes from its stage.json; the bare base has none.
    sft_costs = json.loads((sft / "stage.json").read_text())["metrics"]["resources"]
    assert sft_costs["wall_seconds"] > 0 and 0.1 < sft_costs["peak_rss_gib"] < 24
    assert (same["stage"], same["resources"]) == ("sft", sft_costs) == (baseline["stage"], baseline["resources"])
    assert (policies["base"]["stage"], policies["base"]["resources"]) == (None, None)
    eval_costs = json.loads((out / "stage.json").read_text())["metrics"]["resources"]
    assert eval_costs["wall_seconds"] > 0 and 0.1 < eval_costs["peak_rss_gib"] < 24

    # Every answer is on disk beside the summary, and the summary is the file's: its means, rates and gains.
    rows = read_answers(out)
    assert [row["prompt"] for row in rows] == [[{"role": "user", "content": f"Tell me about topic {i}."}]
                                               for i in range(16)]
    assert [row["baseline"]["answer"] for row in rows[:4]] == [e["baseline"] for e in record["examples"]]
    assert_eval_summaries_match_answers(record, rows, {"judge", "length_tokens"})
    for row in rows:  # each answer beside its own numbers: the judge's score of its text, a cut answer's length
        for answer in [row["baseline"], *row["policies"].values()]:
            assert answer["judge"] == letter_e_share([], [answer["answer"]])[0]
            assert 0 < answer["length_tokens"] <= 12 and (answer["finished"] or answer["length_tokens"] == 12)
        assert row["policies"]["same"]["answer"] == row["baseline"]["answer"]
    blind = ABSession(out, tmp_path / "human-ab", policy="base")  # people can judge every prompt's answers
    assert [item["policy"] for item in blind.items] == [row["policies"]["base"]["answer"] for row in rows]

    report = (out / "report.md").read_text()
    assert "Every sampled answer: [`answers.jsonl`](answers.jsonl), one row per prompt" in report
    assert report.splitlines()[2].startswith("best of 2 by judge gain: ")
    lines = report.splitlines()
    start = lines.index(next(line for line in lines if line.startswith("| method |")))
    bake_off = lines[start + 2 : lines.index("", start)]
    ranked = sorted(policies, key=lambda name: -policies[name]["judge_gain"]["mean"])  # best judge gain first
    labels = {"same": "same (sft)", "base": "base"}
    assert [row.split(" | ")[0] for row in bake_off] == ["| baseline (sft)", *(f"| {labels[n]}" for n in ranked)]
    assert "| same (sft) | +0.000 [+0.000, +0.000] | 0.50 | " in report
    assert (out / "eval_tradeoff.png").read_bytes()[:8] == (out / "eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
