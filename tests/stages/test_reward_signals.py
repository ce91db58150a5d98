"""Stages scoring with a reward specification: checked before weights load, every signal used and reported."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from rlhf_pipeline.cli import main
from rlhf_pipeline.errors import RecipeError
from rlhf_pipeline.stages import load_recipe
from tests.stages.answers import assert_eval_summaries_match_answers, read_answers
from tests.stages.conftest import rm_with_another_tokenizer, write_card

CAKE = "tests.stages.judges:mentions_cake"
LETTER_E = "tests.stages.judges:letter_e_share"


def _ppo_recipe(folder: Path, model_dir: Path, sft: Path, rm: Path, reward: dict[str, Any],
                training: dict[str, Any] | None = None) -> Path:
    write_card(folder, "prompts", [{"prompt": f"Tell me about topic {i}."} for i in range(8)], "prompt_only",
               ["ppo"])
    knobs = {"output_dir": str(folder / "outputs" / "ppo"), "seed": 0, "reward_model_path": str(rm),
             "per_device_train_batch_size": 4, "total_episodes": 8, "response_length": 6, "num_ppo_epochs": 1,
             "save_steps": 10, "num_sample_generations": 0, "disable_tqdm": True}
    path = folder / "ppo.yaml"
    path.write_text(yaml.safe_dump({
        "stage": "ppo", "model": {"name_or_path": str(sft), "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0}},
        "data": {"train": ["prompts"], "eval_split": 0.0, "max_length": 96},
        "training": knobs | (training or {}), "reward": reward}))
    return path


@pytest.mark.parametrize(("reward", "message"), [
    ({"signals": {"rude": {"function": "no_such_module_here:score", "use": "penalty"}}},
     r"reward\.signals\.rude: 'no_such_module_here:score': cannot import module 'no_such_module_here'"),
    ({"signals": {"rude": {"function": CAKE, "wieght": 2}}}, r"reward\.signals\.rude\.wieght: unknown key; did you "
                                                             r"mean weight\?"),
    ({"signals": {"rude": {"function": CAKE, "model": "x"}}}, r"reward\.signals\.rude\.model: give exactly one of"),
    ({"signals": {"rude": {"function": CAKE, "use": "ban"}}}, r"reward\.signals\.rude\.use: must be one of reward, "
                                                             r"penalty, veto"),
    ({"signals": {"x": {"function": CAKE}}, "model": "outputs/rm"}, r"reward\.signals: give the signals, or the "
                                                                    r"short form"),
    ({"signals": {"warmth": {"model": "RM", "use": "penalty"}}}, r"reward\.signals\.warmth\.use: .* is a preference "
                                                                r"reward model .* use it as `use: reward`"),
    ({"signals": {"warmth": {"model": "UNFINISHED"}}}, r"reward\.signals\.warmth\.model: .*rm-in-progress is not a "
                                                      r"finished rm stage"),
])
def test_a_reward_specification_that_cannot_work_fails_validation(
        reward: dict[str, Any], message: str, tmp_path: Path, tiny_model_dir: Path,
        sft_and_rm: tuple[Path, Path]) -> None:
    sft, rm = sft_and_rm
    unfinished = tmp_path / "rm-in-progress"
    (unfinished / "checkpoint-4").mkdir(parents=True)
    text = json.dumps(reward).replace('"RM"', json.dumps(str(rm))).replace('"UNFINISHED"', json.dumps(str(unfinished)))
    path = _ppo_recipe(tmp_path, tiny_model_dir, sft, rm, json.loads(text), {"normalize_reward": False})
    with pytest.raises(RecipeError, match=message):
        load_recipe(path)


def test_ppo_refuses_normalising_the_combined_reward_again(tmp_path: Path, tiny_model_dir: Path,
                                                           sft_and_rm: tuple[Path, Path]) -> None:
    sft, rm = sft_and_rm
    path = _ppo_recipe(tmp_path, tiny_model_dir, sft, rm, {"signals": {"warmth": {"model": str(rm)}}},
                       {"normalize_reward": True})
    with pytest.raises(RecipeError, match=r"training\.normalize_reward: with a reward: section each reward-model "
                                          r"signal is normalised by its own statistics"):
        load_recipe(path)


def test_a_signal_model_with_another_tokenizer_stops_ppo_before_weights_load(
        tmp_path: Path, tiny_model_dir: Path, sft_and_rm: tuple[Path, Path], weights_forbidden: None,
        capsys: pytest.CaptureFixture[str]) -> None:
    other = rm_with_another_tokenizer(tmp_path / "outputs" / "other-rm", tiny_model_dir)
    sft, rm = sft_and_rm
    path = _ppo_recipe(tmp_path, tiny_model_dir, sft, rm, {"signals": {"warmth": {"model": str(rm)},
                                                                       "other": {"model": str(other)}}})
    assert main(["ppo", str(path)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {path}: reward.signals.other: the reward model at {other} "
                                              "uses a different tokenizer")


def test_ppo_scores_with_every_signal_and_logs_each(tmp_path: Path, tiny_model_dir: Path,
                                                    sft_and_rm: tuple[Path, Path]) -> None:
    sft, rm = sft_and_rm
    reward = {"signals": {"warmth": {"model": str(rm)}, "e_share": {"function": LETTER_E, "weight": 2.0},
                          "cake": {"function": CAKE, "use": "penalty", "weight": 0.5}}}
    path = _ppo_recipe(tmp_path, tiny_model_dir, sft, rm, reward)
    assert main(["ppo", str(path)]) == 0
    metrics = json.loads((tmp_path / "outputs" / "ppo" / "metrics.json").read_text())
    steps = [entry for entry in metrics["log_history"] if "objective/scores" in entry]
    assert len(steps) == 2
    for entry in steps:
        assert 0 <= entry["reward/e_share"] <= 1 and 0 <= entry["reward/cake"] <= 1
        combined = entry["reward/warmth"] + 2.0 * entry["reward/e_share"] - 0.5 * entry["reward/cake"]
        assert entry["objective/raw_scores"] == pytest.approx(combined, abs=1e-5)
    report = (tmp_path / "outputs" / "ppo" / "report.md").read_text()
    assert "| reward/cake | " in report and "ppo_signals.png" in report
    assert (tmp_path / "outputs" / "ppo" / "ppo_signals.png").read_bytes()[:4] == b"\x89PNG"
    resolved = yaml.safe_load((tmp_path / "outputs" / "ppo" / "recipe.yaml").read_text())
    assert resolved["reward"]["signals"]["cake"]["use"] == "penalty"


def _normalised_rm_scores(rm: Path, prompts: list[Any], answers: list[str]) -> list[float]:
    """The reward model's raw scores, normalised with the statistics its rm stage recorded in stage.json."""
    from rlhf_pipeline.reward import RewardModel

    stats = json.loads((rm / "stage.json").read_text())["extra"]["reward_stats"]
    raw = RewardModel.from_stage(rm).score(prompts, answers)
    normalised = [(score - stats["mean"]) / stats["std"] for score in raw]
    assert max(abs(n - r) for n, r in zip(normalised, raw, strict=True)) > 1e-2  # the statistics change the scores
    return normalised


def test_ppo_scores_every_row_with_the_normalised_rm_and_each_signal(sft_and_rm: tuple[Path, Path]) -> None:
    """PPO's reward on its own rows (prompt + sampled ids): per answer, the RM signal is the RM's score normalised
    by its stage's reward_stats, and the score is the weighted sum minus the penalty, or veto_reward."""
    import torch

    from rlhf_pipeline.chat import encode_conversations, encode_prompt, pad_batch
    from rlhf_pipeline.models import load_tokenizer
    from rlhf_pipeline.recipe import ModelSpec
    from rlhf_pipeline.reward_spec import RewardSignal, RewardSpec, load_reward
    from rlhf_pipeline.sources import resolve_source
    from rlhf_pipeline.stages.ppo import _signals_reward

    sft, rm = sft_and_rm
    spec = RewardSpec(signals={"warmth": RewardSignal(model=str(rm)),
                               "e_share": RewardSignal(function=LETTER_E, weight=2.0),
                               "cake": RewardSignal(function=CAKE, use="penalty", weight=0.5),
                               "long": RewardSignal(function="tests.stages.judges:over_30_characters", use="veto")},
                      veto_reward=-4.0)
    model = ModelSpec(name_or_path=str(sft))
    tokenizer = load_tokenizer(resolve_source(model), model)
    chats = [[{"role": "user", "content": f"Tell me about topic {i}."}] for i in (2, 0, 3, 1)]
    answers = ["I love cake, see?", "Eels eat eggs.", "No.", "Cake? A cake! Here, the finest cake."]
    ids, mask = pad_batch(encode_conversations(tokenizer, chats, answers), tokenizer.pad_token_id, "right")
    score = _signals_reward(load_reward(spec, model), tokenizer,
                            {tuple(encode_prompt(tokenizer, chat)): chat for chat in chats})
    out = {name: values.tolist() for name, values in score(
        ids, mask, torch.tensor([len(encode_prompt(tokenizer, chat)) for chat in chats])).items()}

    warmth = _normalised_rm_scores(rm, chats, answers)
    shares = [a.count("e") / len(a) for a in answers]
    assert out["warmth"] == pytest.approx(warmth, abs=1e-5)
    assert out["e_share"] == pytest.approx(shares) and out["cake"] == [1.0, 0.0, 0.0, 1.0]
    assert out["long"] == [0.0, 0.0, 0.0, 1.0]
    expected = [w + 2.0 * e - 0.5 * c for w, e, c in zip(warmth, shares, out["cake"], strict=True)]
    expected[3] = -4.0  # the long answer is vetoed, whatever it scored
    assert out["score"] == pytest.approx(expected, abs=1e-5)


def test_eval_reports_the_combined_reward_and_each_signal_with_its_gain(
        tmp_path: Path, tiny_model_dir: Path, sft_and_rm: tuple[Path, Path]) -> None:
    sft, rm = sft_and_rm
    write_card(tmp_path, "prompts", [{"prompt": f"Tell me about topic {i}."} for i in range(12)], "prompt_only",
               ["eval"])
    path = tmp_path / "eval.yaml"
    signals = {"warmth": {"model": str(rm)}, "e_share": {"function": LETTER_E, "weight": 2.0},
               "cake": {"function": CAKE, "use": "penalty", "weight": 0.5}}
    path.write_text(yaml.safe_dump({
        "stage": "eval", "model": {"name_or_path": str(sft)},
        "data": {"train": ["prompts"], "eval_split": 0.0, "max_length": 96},
        "judge": {"type": "callable", "function": LETTER_E}, "reward": {"signals": signals},
        "evaluation": {"output_dir": str(tmp_path / "outputs" / "eval"), "policies": {"base": str(tiny_model_dir)},
                       "max_new_tokens": 10, "bootstrap_samples": 200}}))
    assert main(["eval", str(path)]) == 0
    out = tmp_path / "outputs" / "eval"
    record = json.loads((out / "eval.json").read_text())
    for columns in (record["per_answer"]["baseline"], record["per_answer"]["policies"]["base"]):
        assert columns["signal/e_share"] == columns["judge"]  # the same function, as a judge and as a signal
        combined = [w + 2.0 * e - 0.5 * c for w, e, c in zip(columns["signal/warmth"], columns["signal/e_share"],
                                                                columns["signal/cake"], strict=True)]
        assert columns["reward"] == pytest.approx(combined)
    rows = read_answers(out)
    assert_eval_summaries_match_answers(record, rows, {"judge", "length_tokens", "reward", "signal/warmth",
                                                       "signal/e_share", "signal/cake"})
    answers = [(row["prompt"], answer) for row in rows for answer in (row["baseline"], row["policies"]["base"])]
    warmth = _normalised_rm_scores(rm, [prompt for prompt, _ in answers], [a["answer"] for _, a in answers])
    assert [a["signal/warmth"] for _, a in answers] == pytest.approx(warmth, abs=1e-5)
    for (_, answer), rm_score in zip(answers, warmth, strict=True):  # each answer's reward from its own text
        share, cake = answer["answer"].count("e") / max(len(answer["answer"]), 1), "cake" in answer["answer"].lower()
        assert answer["reward"] == pytest.approx(rm_score + 2.0 * share - 0.5 * cake, abs=1e-5)
    policy = record["policies"]["base"]
    for name in ("warmth", "e_share", "cake"):
        gain = policy[f"signal/{name}_gain"]
        assert gain["mean"] == pytest.approx(policy[f"signal/{name}"]["mean"] - record["baseline"][f"signal/{name}"]
                                             ["mean"])
    assert record["signals"]["cake"] == {"use": "penalty", "weight": 0.5}
    report = (out / "report.md").read_text()
    assert "Reward signals (`reward:` section)" in report and "| cake | penalty (0.5) | " in report


def test_eval_takes_either_reward_model_or_a_reward_section(tmp_path: Path, sft_and_rm: tuple[Path, Path]) -> None:
    sft, rm = sft_and_rm
    write_card(tmp_path, "prompts", [{"prompt": "Hi?"}], "prompt_only", ["eval"])
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump({
        "stage": "eval", "model": {"name_or_path": str(sft)}, "data": {"train": ["prompts"], "eval_split": 0.0},
        "reward": {"model": str(rm)},
        "evaluation": {"output_dir": str(tmp_path / "out"), "policy": str(rm), "reward_model": str(rm)}}))
    with pytest.raises(RecipeError, match=r"evaluation\.reward_model: the recipe's reward: section says what"):
        load_recipe(path)


def test_label_ranks_by_the_reward_section_when_given(tmp_path: Path, sft_and_rm: tuple[Path, Path]) -> None:
    sft, _ = sft_and_rm
    write_card(tmp_path, "prompts", [{"prompt": f"Tell me about topic {i}."} for i in range(4)], "prompt_only",
               ["label"])
    path = tmp_path / "label.yaml"
    path.write_text(yaml.safe_dump({
        "stage": "label", "model": {"name_or_path": str(sft)},
        "data": {"train": ["prompts"], "eval_split": 0.0, "max_length": 96},
        "reward": {"signals": {"e_share": {"function": LETTER_E}, "cake": {"function": CAKE, "use": "veto"}}},
        "labelling": {"output_dir": str(tmp_path / "out"), "num_samples": 3, "max_new_tokens": 10,
                      "min_gap": 0.0}}, sort_keys=False))
    assert main(["label", str(path)]) == 0
    ranked = [json.loads(line) for line in (tmp_path / "out" / "ranked.jsonl").read_text().splitlines()]
    for row in ranked:
        expected = [-3.0 if "cake" in a.lower() else a.count("e") / max(len(a), 1) for a in row["answers"]]
        assert row["scores"] == pytest.approx(expected)
        assert row["signal/e_share"] == [a.count("e") / max(len(a), 1) for a in row["answers"]]
        assert row["signal/cake"] == [float("cake" in a.lower()) for a in row["answers"]]
        assert [len(row[key]) for key in ("answers", "length_tokens", "finished")] == [3, 3, 3]
        # an answer that did not end with the stop token was cut at max_new_tokens
        assert all(0 < n <= 10 and (done or n == 10) for n, done in zip(row["length_tokens"], row["finished"],
                                                                      strict=True))
    stage = json.loads((tmp_path / "out" / "stage.json").read_text())
    assert stage["metrics"]["judge"] == "reward (e_share, cake)"
    assert stage["metrics"]["counts"]["finished_answers"] == sum(sum(row["finished"]) for row in ranked)
    assert stage["metrics"]["mean_judge_score"] == pytest.approx(np.mean([row["scores"] for row in ranked]))
    report = (tmp_path / "out" / "report.md").read_text()
    assert "Every sampled answer: [`ranked.jsonl`](ranked.jsonl), one row per prompt" in report


def test_rule_labels_train_a_rule_rm_that_ppo_takes_as_a_penalty_only(
        tmp_path: Path, tiny_model_dir: Path, sft_and_rm: tuple[Path, Path]) -> None:
    sft, rm = sft_and_rm
    write_card(tmp_path, "prompts", [{"prompt": f"Tell me about topic {i}."} for i in range(12)], "prompt_only",
               ["label"])
    labels = tmp_path / "outputs" / "label-rule"
    path = tmp_path / "label.yaml"
    path.write_text(yaml.safe_dump({
        "stage": "label", "model": {"name_or_path": str(sft)},
        "data": {"train": ["prompts"], "eval_split": 0.0, "max_length": 96},
        "judge": {"type": "callable", "function": "tests.stages.judges:over_30_characters"},
        "labelling": {"output_dir": str(labels), "writes": "classification", "num_samples": 2,
                      "max_new_tokens": 12}}))
    assert main(["label", str(path)]) == 0
    rows = [json.loads(line) for line in (labels / "classified.jsonl").read_text().splitlines()]
    assert rows and all(row["label"] == int(len(row["answer"]) > 30) for row in rows)
    counts = json.loads((labels / "stage.json").read_text())["metrics"]["counts"]
    assert counts["classified"] == len(rows) and counts["violations"] == sum(row["label"] for row in rows)
    card = yaml.safe_load((labels / "data_card.yaml").read_text())
    assert (card["format"], card["violation_when"], card["size"]["rows"]) == ("classification", True, len(rows))

    rm_recipe = tmp_path / "rule-rm.yaml"
    rm_recipe.write_text(yaml.safe_dump({
        "stage": "rm", "model": {"name_or_path": str(sft), "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0}},
        "data": {"train": [str(labels / "data_card.yaml")], "eval_split": 0.25, "max_length": 96},
        "training": {"output_dir": str(tmp_path / "outputs" / "rule-rm"), "max_steps": 2,
                     "per_device_train_batch_size": 8, "report_to": "none", "seed": 0}}))
    assert main(["rm", str(rm_recipe)]) == 0
    rule_rm = tmp_path / "outputs" / "rule-rm"
    assert json.loads((rule_rm / "stage.json").read_text())["extra"]["objective"] == "classification"

    with pytest.raises(RecipeError, match=r"training\.reward_model_path: a rule reward model .* cannot be PPO's "
                                          r"reward"):
        load_recipe(_ppo_recipe(tmp_path, tiny_model_dir, sft, rule_rm, {}))
    with pytest.raises(RecipeError, match=r"reward\.signals\.brief\.use: .* is a rule reward model .* use it as "
                                          r"`use: penalty` or `use: veto`"):
        load_recipe(_ppo_recipe(tmp_path, tiny_model_dir, sft, rm, {"signals": {"brief": {"model": str(rule_rm)}}}))
    penalised = load_recipe(_ppo_recipe(tmp_path, tiny_model_dir, sft, rm, {"signals": {
        "warmth": {"model": str(rm)}, "brief": {"model": str(rule_rm), "use": "penalty"}}}))
    assert penalised.sections["reward"].by_name["brief"].use == "penalty"


def test_a_pairwise_llm_judge_is_a_signal_only_where_answers_come_in_groups(
        tmp_path: Path, tiny_model_dir: Path, sft_and_rm: tuple[Path, Path]) -> None:
    sft, rm = sft_and_rm
    judge = {"type": "llm", "path": str(tiny_model_dir), "mode": "pairwise"}
    path = _ppo_recipe(tmp_path, tiny_model_dir, sft, rm, {"signals": {"rubric": {"judge": judge}}})
    with pytest.raises(RecipeError, match=r"reward\.signals\.rubric\.judge\.mode: a pairwise LLM judge compares the "
                                          r"answers to one prompt with each other, but ppo scores each answer alone"):
        load_recipe(path)
    write_card(tmp_path, "prompts", [{"prompt": "Hi?"}], "prompt_only", ["label"])
    label = tmp_path / "label.yaml"
    label.write_text(yaml.safe_dump({
        "stage": "label", "model": {"name_or_path": str(sft)}, "data": {"train": ["prompts"], "eval_split": 0.0},
        "reward": {"signals": {"rubric": {"judge": judge}}}, "labelling": {"output_dir": str(tmp_path / "out")}}))
    assert load_recipe(label).sections["reward"].by_name["rubric"].judge.mode == "pairwise"
