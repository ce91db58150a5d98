"""The reward specification's combination: weighted sums, penalties and vetoes on hand-made scores."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from rlhf_pipeline.reward import CLASSIFICATION, PAIRWISE
from rlhf_pipeline.reward_spec import Reward, RewardSignal, RewardSpec, model_scorer

CAKE = "tests.stages.judges:mentions_cake"
LETTER_E = "tests.stages.judges:letter_e_share"


def _reward(signals: dict[str, RewardSignal], scores: dict[str, list[float]], veto_reward: float = -3.0) -> Reward:
    spec = RewardSpec(signals=signals, veto_reward=veto_reward)
    return Reward(spec, {name: (lambda p, a, s, values=values: values) for name, values in scores.items()})


def test_signals_combine_as_weighted_sum_minus_penalties_with_vetoes_overriding() -> None:
    reward = _reward(
        {"warmth": RewardSignal(function=LETTER_E, weight=2.0),
         "brevity": RewardSignal(function=LETTER_E, weight=0.5),
         "long": RewardSignal(function=CAKE, use="penalty", weight=3.0),
         "rude": RewardSignal(function=CAKE, use="veto", threshold=0.7)},
        {"warmth": [1.0, -0.5, 0.25, 2.0], "brevity": [0.0, 1.0, 4.0, 2.0], "long": [0.0, 0.5, 1.0, 0.0],
         "rude": [0.1, 0.7, 0.0, 0.71]}, veto_reward=-9.0)
    signals = reward.signal_scores([[]] * 4, ["a"] * 4)
    # 2·warmth + 0.5·brevity − 3·long; the last answer's rule probability 0.71 > 0.7 vetoes it (0.7 does not).
    assert reward.combine(signals) == pytest.approx([2.0, -1.0 + 0.5 - 1.5, 0.5 + 2.0 - 3.0, -9.0])


def test_a_rule_signal_outside_zero_one_is_refused_with_its_name() -> None:
    reward = _reward({"rude": RewardSignal(function=CAKE, use="penalty")}, {"rude": [0.2, 1.5]})
    with pytest.raises(ValueError, match=r"reward signal 'rude' is a penalty: .* got values outside \[0, 1\] "
                                         r"\(e\.g\. 1\.5\)"):
        reward.signal_scores([[]] * 2, ["a", "b"])


def test_the_short_form_names_its_signals() -> None:
    spec = RewardSpec(model="outputs/rm", functions=[LETTER_E, CAKE], normalize=False)
    assert spec.names == ["reward_model", "letter_e_share", "mentions_cake"]
    assert spec.by_name["reward_model"] == RewardSignal(model="outputs/rm", normalize=False)
    assert spec.signal_key("mentions_cake") == "reward.functions[1]"


def test_a_reward_model_signal_is_its_score_normalised_by_its_stages_statistics() -> None:
    """(score − mean)/std with the mean and std the rm stage measured (RewardModel carries them from stage.json);
    raw with normalize: false; sampled token ids are scored as they are; a rule RM is sigmoid(score), unscaled."""
    rm = SimpleNamespace(mean=2.0, std=4.0, objective=PAIRWISE, score=lambda prompts, answers: [6.0, -2.0, 2.0],
                         score_ids=lambda sequences: [10.0 + len(s) for s in sequences])
    answers = ["a", "b", "c"]
    assert model_scorer(rm, RewardSignal(model="rm"))([[]] * 3, answers) == [1.0, -1.0, 0.0]
    assert model_scorer(rm, RewardSignal(model="rm", normalize=False))([[]] * 3, answers) == [6.0, -2.0, 2.0]
    assert model_scorer(rm, RewardSignal(model="rm"))([[]] * 2, ["a", "b"], [[1, 2], [3]]) == [2.5, 2.25]
    rule = SimpleNamespace(mean=2.0, std=4.0, objective=CLASSIFICATION, score=lambda p, a: [0.0, math.log(3.0)])
    assert model_scorer(rule, RewardSignal(model="rule", use="penalty"))([[]] * 2, ["a", "b"]) == pytest.approx(
        [0.5, 0.75])


def test_signals_naming_one_model_share_its_role() -> None:
    """A PRM read under several aggregations is loaded, and scored, once."""
    spec = RewardSpec(signals={"p_min": RewardSignal(model="out/prm", aggregate="min"),
                               "p_last": RewardSignal(model="out/prm", aggregate="last", weight=0.0),
                               "orm": RewardSignal(model="out/orm", use="penalty"),
                               "e": RewardSignal(function=LETTER_E)})
    assert [spec.role_of(name) for name in ("p_min", "p_last", "orm")] == ["signal_p_min", "signal_p_min", "signal_orm"]
    assert spec.model_roles() == {"signal_p_min": "out/prm", "signal_orm": "out/orm"}


def test_a_step_verifier_is_read_like_a_process_reward_model_with_verdicts_of_one_or_zero() -> None:
    from rlhf_pipeline.data.loading import prompt_key
    from rlhf_pipeline.reward_spec import build_reward

    problem = [{"role": "user", "content": "Tom has 23 apples. He buys 48 more. Then he gives away 17."}]
    reference = "23 + 48 = 71\n71 - 17 = 54\nThe answer is 54."
    answers = [reference, "23 + 48 = 71\n71 - 17 = 53\nThe answer is 53.",
               "23 + 48 = 61\n61 - 17 = 44\nThe answer is 44."]
    verifier = "rlhf_pipeline.tasks.arithmetic:step_labels"
    spec = RewardSpec(signals={how: RewardSignal(function=verifier, aggregate=how) for how in ("min", "last", "dense")})
    reward = build_reward(spec, {}, None, {prompt_key(problem): reference})
    scores = reward.signal_scores([problem] * 3, answers)
    assert scores["min"] == [1.0, 0.0, 0.0] and scores["last"] == [1.0, 0.0, 0.0]
    # dense: log P per step, a wrong step (and every step after it) at the floor log 1e-6; left out of the sum.
    assert scores["dense"] == pytest.approx([0.0, 2 * math.log(1e-6), 3 * math.log(1e-6)])
    assert reward.combine(scores) == [2.0, 0.0, 0.0]
    with pytest.raises(ValueError, match=r"aggregate: how the steps of a process reward model .* or a step verifier"):
        RewardSignal(judge=SimpleNamespace(), aggregate="min")  # type: ignore[arg-type]
