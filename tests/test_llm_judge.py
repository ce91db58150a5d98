"""The LLM judge (RLAIF): both orders asked and averaged, scores per prompt, ratings, bad specs, choice tokens,
the agreement numbers, and the label stage labelling with a tiny random model as its judge."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from rlhf_pipeline.errors import PipelineError, RecipeError
from rlhf_pipeline.judges import JudgeSpec, load_judge
from rlhf_pipeline.llm_judge import LLMJudge, agreement, conversation_text, single_token_ids
from rlhf_pipeline.stages import load_recipe
from tests.stages.conftest import write_card, write_label_recipe

ANSWERS = ["Lovely day!", "It rained.", "The bus was late again.", "Tea helps."]


def _prompt(text: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": ""}, {"role": "user", "content": text}]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Any:
    from rlhf_pipeline.models import load_tokenizer
    from rlhf_pipeline.recipe import ModelSpec
    from rlhf_pipeline.sources import resolve_source

    spec = ModelSpec(name_or_path=str(tiny_model_dir))
    return load_tokenizer(resolve_source(spec), spec)


def _fixed_logits(tokenizer: Any, favoured: dict[str, float]) -> Any:
    """A judge that ignores the question: these logits (0 elsewhere) after every question; it counts the rows."""
    calls: list[int] = []

    def logits(ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        calls.append(len(ids))
        out = torch.zeros(len(ids), len(tokenizer))
        for text, value in favoured.items():
            out[:, tokenizer.convert_tokens_to_ids(text)] = value
        return out

    logits.calls = calls  # type: ignore[attr-defined]
    return logits


def test_a_judge_that_only_sees_the_position_gives_every_answer_one_half(tokenizer: Any) -> None:
    logits = _fixed_logits(tokenizer, {"1": 3.0})  # P(first) = 0.95 whatever the answers say
    judge = LLMJudge(logits, tokenizer, name="stub", batch_size=5)
    assert judge([_prompt("How was your day?")] * 4, ANSWERS) == [0.5, 0.5, 0.5, 0.5]
    assert sum(logits.calls) == 4 * 3  # every ordered pair: both orders of the 6 pairs


def test_both_orders_are_asked_and_the_positions_pull_cancels(tokenizer: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A judge preferring the longer answer by 0.3, plus 0.15 for whichever answer comes first."""
    judge = LLMJudge(_fixed_logits(tokenizer, {}), tokenizer, name="stub")
    asked: list[tuple[str, str]] = []

    def prob_first(triples: list[tuple[Any, str, str]], description: str | None = None) -> tuple[list, list]:
        asked.extend((first, second) for _, first, second in triples)
        sign = [(len(a) > len(b)) - (len(a) < len(b)) for _, a, b in triples]
        return [0.5 + 0.3 * s + 0.15 for s in sign], [1.0] * len(triples)

    monkeypatch.setattr(judge, "prob_first", prob_first)
    answers = ["a", "bb", "ccc"]
    scores = judge([_prompt("Hi")] * 3, answers)
    assert sorted(asked) == sorted((a, b) for a in answers for b in answers if a != b)
    assert scores == pytest.approx([0.2, 0.5, 0.8], abs=1e-12)


def test_answers_are_compared_only_with_answers_to_the_same_prompt(tiny_model_dir: Path) -> None:
    judge = LLMJudge.from_path(str(tiny_model_dir), batch_size=3)
    rainy, cake = _prompt("Describe a rainy Monday."), _prompt("Give me feedback on my first cake.")
    prompts = [rainy, cake, rainy, cake, rainy]
    answers = ["Cosy and calm.", "It looks great!", "Wet and grey.", "A bit dry.", "Rain again."]
    together = judge(prompts, answers)
    alone = judge([rainy] * 3, answers[0::2]) + judge([cake] * 2, answers[1::2])
    assert [together[i] for i in (0, 2, 4, 1, 3)] == pytest.approx(alone, abs=1e-5)
    assert all(0.0 <= s <= 1.0 for s in together)
    # P(i beats j) + P(j beats i) = 1, so a prompt's K win rates sum to K/2
    assert sum(together[0::2]) == pytest.approx(1.5, abs=1e-6)
    assert sum(together[1::2]) == pytest.approx(1.0, abs=1e-6)
    assert len(set(together)) > 2  # the random model has opinions: not every pair is a tie


def test_a_pairwise_judge_refuses_a_prompt_with_one_answer(tokenizer: Any) -> None:
    judge = LLMJudge(_fixed_logits(tokenizer, {}), tokenizer, name="stub")
    with pytest.raises(PipelineError, match="prompt 1 has a single answer; use mode: pointwise"):
        judge([_prompt("a"), _prompt("b"), _prompt("a")], ["x", "y", "z"])


def test_pointwise_scores_are_expected_ratings(tokenizer: Any, tiny_model_dir: Path) -> None:
    certain = LLMJudge(_fixed_logits(tokenizer, {"3": 50.0}), tokenizer, name="stub", mode="pointwise",
                       max_rating=5)
    assert certain([_prompt("Hi")], ["Hello!"]) == pytest.approx([3.0])
    split = LLMJudge(_fixed_logits(tokenizer, {"2": 50.0, "5": 50.0}), tokenizer, name="stub", mode="pointwise",
                     max_rating=5)
    assert split([_prompt("Hi")], ["Hello!"]) == pytest.approx([3.5])
    real = LLMJudge.from_path(str(tiny_model_dir), mode="pointwise", max_rating=7)
    scores = real([_prompt("Hi")] * 3, ["Hello!", "Go away.", "Nice to meet you."])
    assert all(1.0 <= s <= 7.0 for s in scores) and len(set(scores)) == 3


@pytest.mark.parametrize(("spec", "problem"), [
    ({"type": "llm"}, "path: an llm judge needs its model"),
    ({"type": "llm", "path": "m", "mode": "listwise"}, "mode: must be one of pairwise, pointwise (got 'listwise')"),
    ({"type": "llm", "path": "m", "rubric": "Which is better, {first} or {second}?"},
     "rubric: a pairwise rubric must contain {prompt}"),
    ({"type": "llm", "path": "m", "mode": "pointwise", "rubric": "{prompt} {first} {second}"},
     "rubric: a pointwise rubric must contain {answer}"),
    ({"type": "llm", "path": "m", "rubric": "{prompt} {first} {second} {third}"},
     "rubric: unknown placeholder {third} in a pairwise rubric"),
    ({"type": "llm", "path": "m", "rubric": "{prompt} {first} {second} {"}, "rubric: not a valid template"),
    ({"type": "llm", "path": "m", "rubric": "missing_rubric.txt"}, "rubric: file 'missing_rubric.txt' not found"),
    ({"type": "llm", "path": "m", "choices": ["1", "1"]}, "choices: two different labels"),
    ({"type": "llm", "path": "m", "mode": "pointwise", "max_rating": 10}, "max_rating: ratings run from 1 to 2..9"),
    ({"type": "llm", "path": "m", "batch_size": 0}, "batch_size: must be 1 or more"),
])
def test_a_bad_llm_judge_spec_is_refused(spec: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValueError) as raised:
        JudgeSpec(**spec)
    assert str(raised.value).startswith(problem)


def test_a_rubric_file_is_read_and_checked(tmp_path: Path) -> None:
    rubric = tmp_path / "rubric.txt"
    rubric.write_text("Q: {prompt}\n1) {first}\n2) {second}\nBetter:")
    assert JudgeSpec(type="llm", path="m", rubric=str(rubric)).name == "llm:m:pairwise"
    rubric.write_text("Q: {prompt}\n1) {first}\nBetter:")
    with pytest.raises(ValueError, match=r"rubric: a pairwise rubric must contain \{second\}"):
        JudgeSpec(type="llm", path="m", rubric=str(rubric))


def test_a_recipe_names_the_judge_key_at_fault(tmp_path: Path, tiny_model_dir: Path) -> None:
    path = _label_recipe(tmp_path, tiny_model_dir, {"type": "llm", "path": str(tiny_model_dir), "mode": "ranked"})
    with pytest.raises(RecipeError) as raised:
        load_recipe(path)
    assert (raised.value.key, raised.value.problem.split(" (")[0]) == ("judge.mode",
                                                                       "must be one of pairwise, pointwise")


def test_eval_refuses_a_pairwise_llm_judge(tmp_path: Path, tiny_model_dir: Path) -> None:
    write_card(tmp_path, "prompts", [{"prompt": "Hi."}], "prompt_only", ["eval"])
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump({
        "stage": "eval", "model": {"name_or_path": str(tiny_model_dir)},
        "data": {"train": ["prompts"], "eval_split": 0.0}, "judge": {"type": "llm", "path": "embedded"},
        "evaluation": {"output_dir": str(tmp_path / "eval"), "policy": str(tmp_path / "ppo")}}))
    with pytest.raises(RecipeError) as raised:
        load_recipe(path)
    assert raised.value.key == "judge.mode" and "use mode: pointwise" in raised.value.problem


def test_choice_tokens_must_each_be_one_token_of_the_judge_model(tokenizer: Any, tiny_model_dir: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    for choices in (["1", "2"], ["A", "B"]):
        ids = single_token_ids(tokenizer, choices, "choices", "tiny")
        assert [tokenizer.decode([i]) for i in ids] == choices
    with pytest.raises(PipelineError, match=r"judge\.choices: 'Reply one' is [2-9] tokens .* for the judge model "
                                            r"tiny; .*\(try choices: \['1', '2'\] or \['A', 'B'\]"):
        single_token_ids(tokenizer, ["Reply one", "Reply two"], "choices", "tiny")

    def no_weights(*_: object, **__: object) -> None:
        raise AssertionError("weights loaded before the choices were checked")

    monkeypatch.setattr("rlhf_pipeline.adapters.load_frozen_roles", no_weights)
    with pytest.raises(PipelineError, match=rf"judge\.choices: 'Yes please' .* judge model {tiny_model_dir}"):
        LLMJudge.from_path(str(tiny_model_dir), choices=("Yes please", "No thanks"))


def test_a_missing_judge_model_is_named_by_the_judge_key(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match=r"^judge\.path: \./no-such-judge: folder '\./no-such-judge' not found$"):
        load_judge(JudgeSpec(type="llm", path="./no-such-judge"))


def test_the_prompt_is_shown_as_the_user_wrote_it() -> None:
    assert conversation_text(_prompt("How was the traffic?")) == "How was the traffic?"
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Tell me a joke."}]
    assert conversation_text(chat) == "User: Hi\nAssistant: Hello!\nUser: Tell me a joke."


def test_agreement_separates_a_position_bias_from_a_judgement(tokenizer: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    pairs = [(_prompt("Hi"), f"Great to see you {i}!", f"Meh {i}.") for i in range(4)]
    positional = LLMJudge(_fixed_logits(tokenizer, {"1": math.log(4.0)}), tokenizer, name="stub")  # P(first) = 0.8
    numbers = agreement(positional, pairs, None)
    assert numbers["agreement"] == 0.0 and numbers["order_flip_share"] == 1.0  # exact ties count as disagreement
    assert numbers["agreement_chosen_first"] == 1.0 and numbers["agreement_chosen_second"] == 0.0
    assert numbers["position_effect"] == pytest.approx(0.6) and numbers["first_position_bias"] == pytest.approx(0.6)

    sure = LLMJudge(_fixed_logits(tokenizer, {}), tokenizer, name="stub")
    monkeypatch.setattr(sure, "prob_first", lambda triples, description=None: (
        [0.9 if first.startswith("Great") else 0.3 for _, first, _ in triples], [0.5] * len(triples)))
    numbers = agreement(sure, pairs, None)
    assert numbers["agreement"] == 1.0 and numbers["agreement_ci95"] == [1.0, 1.0]
    assert numbers["order_flip_share"] == 0.0
    assert numbers["mean_p_chosen"] == pytest.approx(0.8)  # (0.9 + (1 - 0.3)) / 2
    assert numbers["position_effect"] == pytest.approx(0.2) and numbers["choice_token_mass"] == 0.5


def _label_recipe(folder: Path, model_dir: Path, judge: dict[str, Any]) -> Path:
    return write_label_recipe(folder, model_dir, [f"Tell me about topic {i}." for i in range(3)],
                              {"num_samples": 3, "max_new_tokens": 8, "min_gap": 0.0, "pairs": "all", "seed": 0},
                              judge=judge)


def test_the_label_stage_labels_with_an_llm_judge(tmp_path: Path, tiny_model_dir: Path) -> None:
    from rlhf_pipeline.stages import label

    recipe = load_recipe(_label_recipe(tmp_path, tiny_model_dir,
                                       {"type": "llm", "path": str(tiny_model_dir), "choices": ["A", "B"]}))
    metrics = label.run(recipe)
    folder = recipe.output_dir
    ranked = [json.loads(line) for line in (folder / "ranked.jsonl").read_text().splitlines()]
    pairs = [json.loads(line) for line in (folder / "preferences.jsonl").read_text().splitlines()]
    assert metrics["judge"] == f"llm:{tiny_model_dir}:pairwise" and len(ranked) == 3
    for row in ranked:  # win rates against the prompt's other two answers
        assert all(0.0 <= s <= 1.0 for s in row["scores"]) and sum(row["scores"]) == pytest.approx(1.5, abs=1e-6)
    assert metrics["counts"]["pairs"] == len(pairs) > 0
    scores = {(json.dumps(r["prompt"]), a): s for r in ranked for a, s in zip(r["answers"], r["scores"], strict=True)}
    for pair in pairs:
        key = json.dumps(pair["prompt"])
        assert pair["judge_gap"] == pytest.approx(scores[key, pair["chosen"]] - scores[key, pair["rejected"]])
        assert pair["judge_gap"] >= 0
    assert yaml.safe_load((folder / "data_card.yaml").read_text())["size"]["rows"] == len(pairs)


def test_a_pointwise_judge_is_measured_by_its_ratings(tokenizer: Any) -> None:
    pairs = [(_prompt("Hi"), "Great to see you!", "Meh.")] * 3
    judge = LLMJudge(_fixed_logits(tokenizer, {"2": 50.0}), tokenizer, name="stub", mode="pointwise", max_rating=3)
    numbers = agreement(judge, pairs, None)
    assert numbers == {"pairs": 3, "agreement": 0.0, "agreement_ci95": [0.0, 0.0], "mean_rating_chosen": 2.0,
                       "mean_rating_rejected": 2.0}  # equal ratings are no agreement


def test_the_agreement_script_prints_its_numbers_as_json(tmp_path: Path, tiny_model_dir: Path) -> None:
    import subprocess
    import sys

    from tests.stages.conftest import preference_rows

    card = write_card(tmp_path, "pairs", preference_rows(10), "prompt_chosen_rejected", ["rm"])
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "judge_agreement.py"
    done = subprocess.run([sys.executable, str(script), str(card), "--judge", str(tiny_model_dir), "--max-pairs", "6",
                           "--choices", "A", "B"], capture_output=True, text=True, check=True, timeout=300)
    numbers = json.loads(done.stdout)  # stdout holds the JSON alone
    assert (numbers["pairs_in_file"], numbers["pairs"], numbers["choices"]) == (10, 6, ["A", "B"])
    assert 0.0 <= numbers["agreement"] <= 1.0 and 0.0 <= numbers["order_flip_share"] <= 1.0
    assert numbers["position_effect"] >= abs(numbers["first_position_bias"]) > 0  # mean |x| >= |mean x|


def test_a_pointwise_llm_judge_is_a_reward_signal(tiny_model_dir: Path) -> None:
    from rlhf_pipeline.reward_spec import RewardSignal, RewardSpec, build_reward

    judge = JudgeSpec(type="llm", path=str(tiny_model_dir), mode="pointwise", max_rating=5)
    spec = RewardSpec(signals={"rlaif": RewardSignal(judge=judge, weight=2.0)})
    reward = build_reward(spec, {}, None)
    prompts, answers = [_prompt("Hi")] * 2, ["Hello there!", "Go away."]
    ratings = reward.signal_scores(prompts, answers)["rlaif"]
    assert all(1.0 <= r <= 5.0 for r in ratings) and ratings[0] != ratings[1]
    assert reward(prompts, answers) == pytest.approx([2.0 * r for r in ratings])
