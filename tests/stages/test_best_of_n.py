"""The best-of-n stage: the subset estimator against enumeration, the KL formula, the recipe checks, and a run on
the tiny model whose reward is answer length, so the best answer is known."""

from __future__ import annotations

import itertools
import json
import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from rlhf_pipeline.cli import main
from rlhf_pipeline.errors import RecipeError
from rlhf_pipeline.generation import Sample
from rlhf_pipeline.stages import load_recipe
from rlhf_pipeline.stages.best_of_n import best_of_n_weights, expected_best_of_n, kept_answers, kl_best_of_n
from tests.stages.answers import read_answers
from tests.stages.conftest import RecipeFactory, write_card

LENGTH = "tests.stages.judges:answer_length"
JUDGE = {"type": "callable", "function": "tests.stages.judges:letter_e_share"}


def _brute_force(rewards: list[float], values: list[float], n: int) -> float:
    """Mean over every n-subset of the value of its max-reward answer (the first sampled of tied ones)."""
    picks = [values[max(subset, key=lambda i: (rewards[i], -i))]
             for subset in itertools.combinations(range(len(rewards)), n)]
    return sum(picks) / len(picks)


@pytest.mark.parametrize("seed", range(6))
def test_the_estimator_is_the_mean_over_every_subset(seed: int) -> None:
    rng = random.Random(seed)
    n_max = rng.randint(1, 9)
    rewards = [float(rng.randint(0, 4)) for _ in range(n_max)]  # few distinct values: ties on purpose
    values = [rng.uniform(-1, 1) for _ in range(n_max)]
    for n in range(1, n_max + 1):
        assert expected_best_of_n(rewards, values, n) == pytest.approx(_brute_force(rewards, values, n), abs=1e-12)
    assert expected_best_of_n(rewards, values, 1) == pytest.approx(sum(values) / n_max)
    best = max(range(n_max), key=lambda i: (rewards[i], -i))
    assert expected_best_of_n(rewards, values, n_max) == pytest.approx(values[best])


def test_the_weights_by_hand() -> None:
    # 4 answers, best of 2: rank 4 (the top) is in 3 of the 6 pairs, rank 3 wins 2 pairs, rank 2 one, rank 1 none.
    assert best_of_n_weights(4, 2) == pytest.approx([0, 1 / 6, 2 / 6, 3 / 6])
    assert sum(best_of_n_weights(16, 5)) == pytest.approx(1.0)
    assert expected_best_of_n([0.3, 0.9, 0.1, 0.5], [10.0, 20.0, 30.0, 40.0], 2) == pytest.approx(
        (20 * 3 + 40 * 2 + 10 * 1) / 6)
    with pytest.raises(ValueError, match="best of 5 needs 1 <= n <= 4"):
        expected_best_of_n([0.0] * 4, [0.0] * 4, 5)


def test_kl_formula() -> None:
    assert kl_best_of_n(1) == 0.0
    assert kl_best_of_n(2) == pytest.approx(math.log(2) - 0.5)
    assert kl_best_of_n(16) == pytest.approx(2.772588722 - 0.9375)
    assert all(kl_best_of_n(n) < kl_best_of_n(n + 1) < math.log(n + 1) for n in range(1, 64))


def _recipe(tmp_path: Path, policy: Path, reward: dict[str, Any] | None = None, **best_of_n: Any) -> Path:
    write_card(tmp_path, "prompts", [{"prompt": f"Tell me about topic {i}."} for i in range(12)], "prompt_only",
               ["eval"])
    path = tmp_path / "best-of-n.yaml"
    path.write_text(yaml.safe_dump({
        "stage": "best-of-n", "model": {"name_or_path": str(policy)},
        "data": {"train": ["prompts"], "eval_split": 0.0, "max_length": 96},
        "reward": reward or {"functions": [LENGTH]}, "judge": JUDGE,
        "best_of_n": {"output_dir": str(tmp_path / "outputs" / "best-of-n"), "max_new_tokens": 16,
                      "bootstrap_samples": 200} | best_of_n}, sort_keys=False))
    return path


@pytest.mark.parametrize(("settings", "key", "problem"), [
    ({"n_max": 8, "n_values": [1, 2, 4, 16]}, "best_of_n.n_values", "16 is above n_max 8"),
    ({"n_values": [1, 4, 2]}, "best_of_n.n_values", "must be strictly increasing, got [1, 4, 2]"),
    ({"n_values": [1, 2, 2]}, "best_of_n.n_values", "must be strictly increasing"),
    ({"n_values": [2, 4]}, "best_of_n.n_values", "must start with 1"),
    ({"n_values": []}, "best_of_n.n_values", "must start with 1"),
    ({"n_values": [1, "two"]}, "best_of_n.n_values", "expected"),
    ({"n_max": 0}, "best_of_n.n_max", "at least 1 answer per prompt, got 0"),
    ({"temperature": 0.0}, "best_of_n.temperature", "must be positive, got 0.0"),
    ({"top_p": 0.0}, "best_of_n.top_p", "in (0, 1]"),
    ({"batch_size": 0}, "best_of_n.batch_size", "at least 1, got 0"),
    ({"n_sample": 4}, "best_of_n.n_sample", "unknown key"),
    ({"sft_card_min_reward": 1.0}, "best_of_n.sft_card_min_reward", "write_sft_card is false"),
])
def test_bad_settings_are_refused_naming_the_key(tmp_path: Path, settings: dict[str, Any], key: str,
                                                 problem: str) -> None:
    path = _recipe(tmp_path, tmp_path / "policy", **settings)
    with pytest.raises(RecipeError) as raised:
        load_recipe(path)
    assert (raised.value.file, raised.value.key) == (path, key)
    assert problem in raised.value.problem


def test_the_default_n_values_are_powers_of_two_up_to_n_max(tmp_path: Path) -> None:
    assert load_recipe(_recipe(tmp_path, tmp_path / "policy", n_max=12)).settings.n_values == [1, 2, 4, 8, 12]
    assert load_recipe(_recipe(tmp_path, tmp_path / "policy", n_max=1)).settings.n_values == [1]


@pytest.mark.parametrize(("reward", "key", "problem"), [
    ({"functions": ["tests.stages.judges:no_such"]}, "reward.functions[0]", "has no function 'no_such'"),
    ({"model": "RM"}, "reward.model", "holds a finished 'sft' stage, not a reward model"),
    ({}, "reward", "required: what best-of-n maximises"),
])
@pytest.mark.usefixtures("weights_forbidden")
def test_a_bad_reward_is_refused_before_any_weights_load(tmp_path: Path, sft_and_rm: tuple[Path, Path],
                                                          reward: dict[str, Any], key: str, problem: str) -> None:
    reward = {k: str(sft_and_rm[0]) if v == "RM" else v for k, v in reward.items()}
    path = _recipe(tmp_path, sft_and_rm[0], reward=reward or {"normalize": True})
    with pytest.raises(RecipeError) as raised:
        load_recipe(path)
    assert raised.value.key == key and problem in raised.value.problem


def test_a_minimum_reward_keeps_only_answers_that_reach_it() -> None:
    """Expert iteration: with a 0/1 verifier reward and a bar of 1, a prompt whose best finished answer is wrong
    gives no SFT row (and is counted), and a right answer that was cut off is never kept."""
    def sample(text: str, finished: bool = True) -> Sample:
        return Sample(prompt_ids=[1], answer_ids=[2], text=text, finished=finished)

    prompts = [[{"role": "user", "content": f"problem {i}"}] for i in range(4)]
    samples = [[sample("wrong"), sample("right")],            # the right one is kept
               [sample("wrong"), sample("wrong too")],        # no right answer: left out, counted below the bar
               [sample("right", finished=False), sample("wrong")],  # the right one was cut: below the bar too
               [sample("right", finished=False), sample("", finished=True)]]  # nothing finished with text
    per_prompt = [{"reward": [0.0, 1.0], "judge": [0.0, 1.0]}, {"reward": [0.0, 0.0], "judge": [0.0, 0.0]},
                  {"reward": [1.0, 0.0], "judge": [1.0, 0.0]}, {"reward": [1.0, 0.0], "judge": [1.0, 0.0]}]
    rows, counts = kept_answers(prompts, samples, per_prompt, min_reward=1.0)
    assert [(row["prompt"][0]["content"], row["completion"]) for row in rows] == [("problem 0", "right")]
    assert counts == {"rows": 1, "prompts_without_a_finished_answer": 1, "prompts_below_min_reward": 2}
    rows, counts = kept_answers(prompts, samples, per_prompt)  # no bar: the best finished answer, right or wrong
    assert [row["completion"] for row in rows] == ["right", "wrong", "wrong"]
    assert counts == {"rows": 3, "prompts_without_a_finished_answer": 1}


def test_best_of_n_picks_the_longest_answer_and_its_card_feeds_sft(tmp_path: Path, sft_and_rm: tuple[Path, Path],
                                                                   make_recipe: RecipeFactory) -> None:
    """Reward = answer length in characters: best of n must pick the longest answer, the reward must rise with n,
    and the kept answers must load as SFT data."""
    sft, _ = sft_and_rm
    path = _recipe(tmp_path, sft, n_max=8, n_values=[1, 2, 4, 8], num_examples=3, write_sft_card=True)
    assert main(["best-of-n", str(path)]) == 0
    out = tmp_path / "outputs" / "best-of-n"
    record = json.loads((out / "best_of_n.json").read_text())
    per_prompt = read_answers(out)
    assert record["prompts"] == len(per_prompt) == 12 and record["reward"] == ["answer_length"]
    for row in per_prompt:
        assert [len(row[key]) for key in ("answers", "reward", "judge", "length_tokens", "finished")] == [8] * 5
        assert row["reward"] == [float(len(answer)) for answer in row["answers"]]
        assert row["judge"] == [answer.count("e") / max(len(answer), 1) for answer in row["answers"]]
        lengths = [len(answer) for answer in row["answers"]]
        assert row["best"] == lengths.index(max(lengths))  # the longest; the first sampled of equally long ones

    by_n = record["by_n"]
    assert [row["n"] for row in by_n] == [1, 2, 4, 8]
    assert [row["kl_bound"] for row in by_n] == pytest.approx([math.log(n) - (n - 1) / n for n in (1, 2, 4, 8)])
    rewards = [row["reward"]["mean"] for row in by_n]
    assert rewards == sorted(rewards) and rewards[-1] > rewards[0]  # more answers to choose from: longer picks
    assert rewards[0] == pytest.approx(np.mean([r for row in per_prompt for r in row["reward"]]))
    assert rewards[-1] == pytest.approx(np.mean([max(row["reward"]) for row in per_prompt]))
    judges = [np.mean([expected_best_of_n(row["reward"], row["judge"], n) for row in per_prompt]) for n in (1, 2, 4, 8)]
    assert [row["judge"]["mean"] for row in by_n] == pytest.approx(judges)
    for row in by_n[1:]:
        gain = row["reward_gain"]
        assert gain["mean"] == pytest.approx(row["reward"]["mean"] - by_n[0]["reward"]["mean"])
        assert 0 < gain["ci95_low"] <= gain["mean"] <= gain["ci95_high"]
        assert gain["wins"] + gain["ties"] + gain["losses"] == 12
    assert "reward_gain" not in by_n[0] and "judge_gain" not in by_n[0]

    # The kept answers: each prompt's longest answer among those that ended with the stop token.
    demonstrations = [json.loads(line) for line in (out / "demonstrations.jsonl").read_text().splitlines()]
    expected = []
    for row in per_prompt:
        finished = [i for i in range(8) if row["finished"][i] and row["answers"][i].strip()]
        if finished:
            best = max(finished, key=lambda i: (row["reward"][i], -i))
            expected.append((row["prompt"], row["answers"][best]))
    assert [(d["prompt"], d["completion"]) for d in demonstrations] == expected
    card = yaml.safe_load((out / "data_card.yaml").read_text())
    assert card["format"] == "prompt_completion" and card["size"]["rows"] == len(expected)
    assert card["size"]["prompts_without_a_finished_answer"] == 12 - len(expected)
    assert record["sft_card"] == {"rows": len(expected), "prompts_without_a_finished_answer": 12 - len(expected)}

    lengths = [length for row in per_prompt for length in row["length_tokens"]]
    assert record["finished_fraction"] == pytest.approx(np.mean([f for row in per_prompt for f in row["finished"]]))
    assert by_n[0]["length_tokens"]["mean"] == pytest.approx(np.mean(lengths)) and all(n <= 16 for n in lengths)

    report = (out / "report.md").read_text()
    assert "Every sampled answer: [`answers.jsonl`](answers.jsonl), one row per prompt" in report
    assert report.splitlines()[2].startswith(f"best of 8 vs 1: judge {by_n[0]['judge']['mean']:.3f} → ")
    assert f"| 8 | {math.log(8) - 7 / 8:.3f} | " in report
    assert (out / "best_of_n.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    if not expected:
        pytest.skip("the tiny policy finished no answer: nothing to load as SFT data")
    from rlhf_pipeline.data.loading import load_datasets
    from rlhf_pipeline.models import load_tokenizer
    from rlhf_pipeline.sources import resolve_source

    sft_recipe = load_recipe(make_recipe("sft", [str(out / "data_card.yaml")], name="rs-sft",
                                         data={"train": [str(out / "data_card.yaml")], "eval_split": 0.0,
                                               "max_length": 256}))
    tokenizer = load_tokenizer(resolve_source(sft_recipe.model), sft_recipe.model)
    datasets, report_data = load_datasets(sft_recipe, tokenizer)
    assert report_data.kept == len(expected)
    assert [(row["prompt"], row["completion"][-1]["content"]) for row in datasets["train"]] == expected


def test_several_reward_signals_are_combined_and_reported_each(tmp_path: Path, sft_and_rm: tuple[Path, Path]) -> None:
    """Half the length as a reward and twice the letter-e share as a penalty (reward_spec's combination): the
    reward is 0.5·length − 2·share, and each signal is summarised at the answer that reward picks."""
    signals = {"length": {"function": LENGTH, "weight": 0.5},
               "e_share": {"function": "tests.stages.judges:letter_e_share", "use": "penalty", "weight": 2.0}}
    path = _recipe(tmp_path, sft_and_rm[0], reward={"signals": signals}, n_max=4)
    assert main(["best-of-n", str(path)]) == 0
    record = json.loads((tmp_path / "outputs" / "best-of-n" / "best_of_n.json").read_text())
    answers = read_answers(tmp_path / "outputs" / "best-of-n")
    assert record["reward"] == ["length", "e_share"]
    for row in answers:
        assert row["signal/length"] == [float(len(answer)) for answer in row["answers"]]
        assert row["reward"] == pytest.approx([0.5 * length - 2 * share for length, share in
                                               zip(row["signal/length"], row["signal/e_share"], strict=True)])
    top = record["by_n"][-1]
    for name in ("signal/length", "signal/e_share"):
        assert top[name]["mean"] == pytest.approx(np.mean([p[name][p["best"]] for p in answers]))
    assert "| n | KL bound (nats) | judge [95% CI] | judge gain [95% CI] | reward [95% CI] | reward gain [95% CI] | " \
           "signal/e_share [95% CI] | signal/length [95% CI] |" in (path.parent / "outputs" / "best-of-n" /
                                                                    "report.md").read_text()
