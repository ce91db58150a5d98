"""Process reward models and right answers used by the stages: a PRM's aggregations as reward signals, best-of-n's
rerankers (each signal, majority vote, oracle), PPO's dense step rewards, and outcome checks against the cards'
references in GRPO and eval; all checked before weights load where they can be."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path
from typing import Any

import pytest
import yaml

from rlhf_pipeline.cli import main
from rlhf_pipeline.errors import RecipeError
from rlhf_pipeline.stages import load_recipe, prm
from rlhf_pipeline.stages.best_of_n import expected_best_of_n, expected_majority
from rlhf_pipeline.tasks.arithmetic import generate
from tests.stages.conftest import stepwise_rows, write_card, write_recipe

OUTCOME = "rlhf_pipeline.tasks.answers:outcome"
STEP_VERIFIER = "rlhf_pipeline.tasks.arithmetic:step_labels"
LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0}


@pytest.fixture(scope="module")
def trained_prm(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path,
                sft_and_rm: tuple[Path, Path]) -> Path:
    """A PRM trained from the shared SFT stage (so it shares the policies' base) on the trivial step rule."""
    folder = tmp_path_factory.mktemp("prm")
    write_card(folder, "steps", stepwise_rows(64), "stepwise", ["prm"])
    recipe = load_recipe(write_recipe(folder, tiny_model_dir, "prm", ["steps"], {"num_train_epochs": 4,
                                                                                 "learning_rate": 1e-2},
                                      model={"name_or_path": str(sft_and_rm[0])},
                                      data={"train": ["steps"], "eval_split": 0.25, "max_length": 160}))
    prm.run(recipe)
    return recipe.output_dir


def _problems(folder: Path, name: str = "problems", count: int = 8) -> None:
    write_card(folder, name, [{"prompt": p.text(), "reference": p.solution()} for p in generate(5, {"x": count})["x"]],
               "prompt_only", ["ppo", "grpo", "eval", "best-of-n"])


@pytest.mark.parametrize("seed", range(5))
def test_majority_vote_is_the_mean_over_every_subset(seed: int) -> None:
    rng = random.Random(seed)
    size = rng.randint(2, 8)
    finals = [rng.choice(["4", "5", "6", None]) for _ in range(size)]
    values = [float(final == "4") if final else rng.random() for final in finals]
    for n in range(1, size + 1):
        picks = []
        for subset in itertools.combinations(range(size), n):
            stated = [finals[i] for i in subset if finals[i] is not None]
            if not stated:
                picks.append(sum(values[i] for i in subset) / n)
                continue
            top = max(stated.count(f) for f in set(stated))
            winners = sorted(f for f in set(stated) if stated.count(f) == top)
            picks.append(sum(sum(values[i] for i in subset if finals[i] == w) / stated.count(w) for w in winners)
                         / len(winners))
        assert expected_majority(finals, values, n, 10_000, rng) == pytest.approx(sum(picks) / len(picks))
    # Over the subset budget: that many random subsets, still an unbiased estimate
    sampled = expected_majority(["4"] * 6 + ["5"] * 4, [1.0] * 6 + [0.0] * 4, 5, 50, random.Random(0))
    assert 0.5 < sampled < 1.0


def test_best_of_n_reranks_by_each_signal_by_majority_vote_and_by_the_oracle(
        tmp_path: Path, sft_and_rm: tuple[Path, Path], trained_prm: Path) -> None:
    write_card(tmp_path, "prompts", [{"prompt": f"Topic {i}."} for i in range(6)], "prompt_only", ["best-of-n"])
    path = tmp_path / "best-of-n.yaml"
    path.write_text(yaml.safe_dump({
        "stage": "best-of-n", "model": {"name_or_path": str(sft_and_rm[0])},
        "data": {"train": ["prompts"], "eval_split": 0.0, "max_length": 96},
        "reward": {"signals": {"process": {"model": str(trained_prm), "aggregate": "min"},
                               "process_last": {"model": str(trained_prm), "aggregate": "last", "weight": 0.0},
                               "long": {"function": "tests.stages.judges:over_30_characters", "use": "penalty",
                                        "weight": 0.0}}},
        "judge": {"type": "callable", "function": "tests.stages.judges:letter_e_share"},
        "best_of_n": {"output_dir": str(tmp_path / "out"), "n_max": 4, "max_new_tokens": 12, "bootstrap_samples": 100,
                      "rank_each_signal": True, "oracle": True, "majority_vote": "tests.stages.judges:first_word"}}))
    assert main(["best-of-n", str(path)]) == 0
    record = json.loads((tmp_path / "out" / "best_of_n.json").read_text())
    rankers = record["rankers"]
    per_prompt = [json.loads(line) for line in (tmp_path / "out" / "answers.jsonl").read_text().splitlines()]
    assert sorted(rankers) == ["long", "majority", "oracle", "process", "process_last", "reward"]
    for name, rows in rankers.items():
        assert [row["n"] for row in rows] == [1, 2, 4]
        assert rows[0]["judge"]["mean"] == pytest.approx(record["by_n"][0]["judge"]["mean"])  # best of 1: any pick
        assert set(rows[-1]["gain_over"]) == set(rankers) - {name}
    for i, n in enumerate([1, 2, 4]):
        process = [expected_best_of_n(row["signal/process"], row["judge"], n) for row in per_prompt]
        shorter = [expected_best_of_n([-v for v in row["signal/long"]], row["judge"], n) for row in per_prompt]
        assert rankers["process"][i]["judge"]["mean"] == pytest.approx(sum(process) / len(process))
        assert rankers["long"][i]["judge"]["mean"] == pytest.approx(sum(shorter) / len(shorter))  # a penalty: lower
        assert rankers["oracle"][i]["judge"]["mean"] >= max(r[i]["judge"]["mean"] for r in rankers.values()) - 1e-12
    assert all(0 < p <= 1 for row in per_prompt for p in row["signal/process"])  # min of the steps' P(right)
    from rlhf_pipeline.process_reward import ProcessRewardModel  # the same PRM, read once for both aggregations

    chats = [[{"role": "user", "content": f"Topic {i}."}] for i in range(6)]
    probabilities = ProcessRewardModel.from_stage(trained_prm).step_probabilities(
        [chat for chat in chats for _ in range(4)], [a for row in per_prompt for a in row["answers"]])
    flat = [(row["signal/process"][k], row["signal/process_last"][k]) for row in per_prompt for k in range(4)]
    for (least, last), steps in zip(flat, probabilities, strict=True):
        assert least == pytest.approx(min(steps or [0.0]), abs=1e-5) and last == pytest.approx((steps or [0.0])[-1],
                                                                                               abs=1e-5)
    report = (tmp_path / "out" / "report.md").read_text()
    assert "Rerankers on the same samples" in report and "best_of_n_rankers.png" in report


def test_dense_step_rewards_land_on_the_tokens_that_end_each_step(tiny_model_dir: Path, trained_prm: Path) -> None:
    import torch

    from rlhf_pipeline.chat import encode_answer, encode_prompt
    from rlhf_pipeline.process_reward import ProcessRewardModel, step_log_reward
    from rlhf_pipeline.reward_spec import Reward, RewardSignal, RewardSpec, build_reward
    from rlhf_pipeline.stages.ppo import _signals_reward, _step_scorer
    from rlhf_pipeline.steps import step_end_positions

    scorer = ProcessRewardModel.from_stage(trained_prm)
    tokenizer = scorer.tokenizer
    spec = RewardSpec(signals={"process": RewardSignal(model=str(trained_prm), aggregate="dense", weight=0.5),
                               "e": RewardSignal(function="tests.stages.judges:letter_e_share")})
    reward: Reward = build_reward(spec, {"process": scorer}, None)
    chat = [{"role": "user", "content": "Topic 7."}]
    prompt = encode_prompt(tokenizer, chat)
    answers = ["The sun rises.\nMy phone is low.", "We bought bread."]
    rows = [prompt + encode_answer(tokenizer, answer) for answer in answers]
    score = _signals_reward(reward, tokenizer, {tuple(prompt): chat},
                            {"process": (_step_scorer(scorer, None, {}, tokenizer), 0.5)})
    width = max(map(len, rows))
    ids = torch.tensor([row + [tokenizer.pad_token_id] * (width - len(row)) for row in rows])
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows])
    out = score(ids, mask, torch.tensor([len(prompt)] * 2))
    probabilities = scorer.step_probabilities([chat] * 2, answers)
    for row, (sequence, p) in enumerate(zip(rows, probabilities, strict=True)):
        ends = step_end_positions(tokenizer, sequence[len(prompt):])
        expected = torch.zeros(out["step_rewards"].shape[1])
        for end, probability in zip(ends, p, strict=True):
            expected[end] = 0.5 * step_log_reward(probability)
        assert torch.allclose(out["step_rewards"][row], expected, atol=1e-5)
        assert [tokenizer.decode([sequence[len(prompt) + e]]) for e in ends[:-1]] == ["\n"] * (len(ends) - 1)
        assert out["process"][row].item() == pytest.approx(sum(step_log_reward(q) for q in p), abs=1e-5)
    # The combined score leaves the dense signal out: its reward arrives step by step.
    assert out["score"].tolist() == pytest.approx(out["e"].tolist())


def test_a_step_verifiers_dense_rewards_land_on_the_ends_of_its_wrong_steps(tiny_model_dir: Path) -> None:
    import math

    import torch
    from transformers import AutoTokenizer

    from rlhf_pipeline.chat import encode_answer, encode_prompt
    from rlhf_pipeline.data.loading import prompt_key
    from rlhf_pipeline.reward_spec import RewardSignal, RewardSpec, build_reward
    from rlhf_pipeline.stages.ppo import _signals_reward, _step_scorer
    from rlhf_pipeline.steps import step_end_positions

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    verifier = STEP_VERIFIER
    chat = [{"role": "user", "content": "Tom has 23 apples. He buys 48 more. Then he gives away 17."}]
    answers_known = {prompt_key(chat): "23 + 48 = 71\n71 - 17 = 54\nThe answer is 54."}
    spec = RewardSpec(signals={"correct": RewardSignal(function=OUTCOME),
                               "verified": RewardSignal(function=verifier, aggregate="dense", weight=0.05)})
    reward = build_reward(spec, {}, None, answers_known)
    prompt = encode_prompt(tokenizer, chat)
    answers = ["23 + 48 = 71\n71 - 17 = 54\nThe answer is 54.", "23 + 48 = 71\n71 - 17 = 64\nThe answer is 64."]
    rows = [prompt + encode_answer(tokenizer, answer) for answer in answers]
    score = _signals_reward(reward, tokenizer, {tuple(prompt): chat},
                            {"verified": (_step_scorer(None, verifier, answers_known, tokenizer), 0.05)})
    width = max(map(len, rows))
    ids = torch.tensor([row + [tokenizer.pad_token_id] * (width - len(row)) for row in rows])
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows])
    out = score(ids, mask, torch.tensor([len(prompt)] * 2))
    floor = 0.05 * math.log(1e-6)
    for row, verdicts in zip(rows, [[True, True, True], [True, False, False]], strict=True):
        ends = step_end_positions(tokenizer, row[len(prompt):])
        assert len(ends) == 3
        expected = torch.zeros(out["step_rewards"].shape[1])
        for end, good in zip(ends, verdicts, strict=True):
            expected[end] = 0.0 if good else floor
        assert torch.allclose(out["step_rewards"][rows.index(row)], expected)
    assert out["score"].tolist() == [1.0, 0.0]  # the outcome; the verifier's reward comes step by step


def test_ppo_trains_on_dense_step_rewards_and_the_outcome(tmp_path: Path, tiny_model_dir: Path,
                                                          sft_and_rm: tuple[Path, Path], trained_prm: Path) -> None:
    _problems(tmp_path)
    path = tmp_path / "ppo.yaml"
    path.write_text(yaml.safe_dump({
        "stage": "ppo", "model": {"name_or_path": str(sft_and_rm[0]), "lora": LORA},
        "data": {"train": ["problems"], "eval_split": 0.0, "max_length": 192},
        "reward": {"signals": {"correct": {"function": OUTCOME},
                               "process": {"model": str(trained_prm), "aggregate": "dense", "weight": 0.5}}},
        "training": {"output_dir": str(tmp_path / "out"), "seed": 0, "reward_model_path": str(trained_prm),
                     "per_device_train_batch_size": 4, "total_episodes": 8, "response_length": 12,
                     "num_ppo_epochs": 1, "save_steps": 10, "num_sample_generations": 0, "disable_tqdm": True}}))
    assert main(["ppo", str(path)]) == 0
    steps = [e for e in json.loads((tmp_path / "out" / "metrics.json").read_text())["log_history"]
             if "objective/scores" in e]
    assert len(steps) == 2
    for entry in steps:
        assert entry["reward/process"] <= 0 and 0 <= entry["reward/correct"] <= 1
        assert entry["objective/raw_scores"] == pytest.approx(entry["reward/correct"])  # dense rewards come per step


def test_grpo_and_eval_check_answers_against_the_cards_references(tmp_path: Path, tiny_model_dir: Path,
                                                                   sft_and_rm: tuple[Path, Path]) -> None:
    _problems(tmp_path)
    grpo = write_recipe(tmp_path, tiny_model_dir, "grpo", ["problems"], {
        "max_steps": 2, "num_generations": 2, "per_device_train_batch_size": 4, "max_completion_length": 8,
        "beta": 0.0}, model={"name_or_path": str(sft_and_rm[0]), "lora": LORA},
        data={"train": ["problems"], "eval_split": 0.0, "max_length": 192}, reward={"functions": [OUTCOME]})
    assert main(["grpo", str(grpo)]) == 0
    metrics = json.loads((tmp_path / "outputs" / "grpo" / "metrics.json").read_text())
    rewards = [e["rewards/outcome/mean"] for e in metrics["log_history"] if "rewards/outcome/mean" in e]
    assert rewards and all(0 <= r <= 1 for r in rewards)

    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump({
        "stage": "eval", "model": {"name_or_path": str(sft_and_rm[0])},
        "data": {"train": ["problems"], "eval_split": 0.0, "max_length": 192},
        "judge": {"type": "callable", "function": OUTCOME},
        "reward": {"signals": {"correct": {"function": OUTCOME},
                               "verifies": {"function": "rlhf_pipeline.tasks.arithmetic:steps", "weight": 0.0}}},
        "evaluation": {"output_dir": str(tmp_path / "eval"), "policy": str(tmp_path / "outputs" / "grpo"),
                       "max_new_tokens": 8, "bootstrap_samples": 100}}))
    assert main(["eval", str(path)]) == 0
    record = json.loads((tmp_path / "eval" / "eval.json").read_text())
    for columns in (record["per_answer"]["baseline"], record["per_answer"]["policies"]["policy"]):
        assert len(columns["judge"]) == 8 and set(columns["judge"]) <= {0.0, 1.0}
        assert columns["signal/correct"] == columns["judge"] and set(columns["signal/verifies"]) <= {0.0, 1.0}


def _reward_recipe(folder: Path, model_dir: Path, stage: str, reward: dict[str, Any], cards: str = "problems",
                   **training: Any) -> Path:
    path = folder / f"{stage}.yaml"
    section = {"ppo": "training", "eval": "evaluation", "best-of-n": "best_of_n"}[stage]
    path.write_text(yaml.safe_dump({
        "stage": stage, "model": {"name_or_path": str(model_dir), "lora": LORA},
        "data": {"train": [cards], "eval_split": 0.0}, "reward": reward,
        section: {"output_dir": str(folder / "out")} | training}))
    return path


@pytest.mark.usefixtures("weights_forbidden")
def test_process_signals_and_reference_checks_are_refused_before_weights_load(
        tmp_path: Path, sft_and_rm: tuple[Path, Path], trained_prm: Path) -> None:
    sft, rm = sft_and_rm
    _problems(tmp_path)
    write_card(tmp_path, "bare", [{"prompt": "What is 2 + 2?"}], "prompt_only", ["eval"])
    cases = [
        ("best-of-n", {"signals": {"p": {"model": str(trained_prm)}}}, {},
         r"reward\.signals\.p\.aggregate: .* is a process reward model .* min, product, last"),
        ("best-of-n", {"signals": {"p": {"model": str(trained_prm), "aggregate": "dense"}}}, {},
         r"reward\.signals\.p\.aggregate: dense rewards \(one per step\) are PPO's"),
        ("best-of-n", {"signals": {"r": {"model": str(rm), "aggregate": "min"}}}, {},
         r"reward\.signals\.r\.aggregate: .* scores whole answers, not steps"),
        ("ppo", {}, {"reward_model_path": str(trained_prm)},
         r"reward: .* is a process reward model .* give it in a reward: section"),
        ("best-of-n", {"signals": {"v": {"function": STEP_VERIFIER, "aggregate": "dense"}}}, {},
         r"reward\.signals\.v\.aggregate: dense rewards \(one per step\) are PPO's"),
        ("best-of-n", {"signals": {"v": {"function": f"{STEP_VERIFIER}s_of_nothing", "aggregate": "min"}}}, {},
         r"reward\.signals\.v: .*; a step verifier is `module:function`, called per answer with \(problem, "),
        ("best-of-n", {"signals": {"v": {"function": STEP_VERIFIER, "aggregate": "min"}}}, {}, None),
        ("best-of-n", {"functions": [OUTCOME]}, {}, None),
    ]
    for stage, reward, training, message in cases:
        path = _reward_recipe(tmp_path, sft, stage, reward, **training)
        if message is None:
            assert load_recipe(path).stage == stage  # the problems carry references: accepted
            continue
        with pytest.raises(RecipeError, match=message):
            load_recipe(path)
    bare = _reward_recipe(tmp_path, sft, "best-of-n", {"functions": [OUTCOME]}, cards="bare")
    with pytest.raises(RecipeError, match=r"reward\.functions\[0\]: rlhf_pipeline\.tasks\.answers:outcome checks "
                                          r"answers against each prompt's right answer, and no card"):
        load_recipe(bare)
