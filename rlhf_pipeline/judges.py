"""Judges score answers without people: a trained reward model, a Python function, or VADER sentiment.

A judge takes chat prompts and answer texts and returns one float per answer, higher is better. The
`label` stage ranks sampled answers with one (RLAIF); the `eval` stage reports one next to the reward; a
judge can also be one signal of a reward (reward_spec.py).

    judge: {type: vader}
    judge: {type: reward_model, path: outputs/smollm2-135m/rm}
    judge: {type: callable, function: my_package.rules:politeness}
    judge: {type: llm, path: embedded, mode: pairwise}    # an LLM asked a rubric question (llm_judge.py)
    judge: {type: callable, function: rlhf_pipeline.tasks.answers:outcome}   # accuracy against the right answers

A function with a `references` parameter is called with each prompt's right answer too, looked up in the
stage's answer key (data/loading.py:answer_key, from the cards' `reference` column).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from rlhf_pipeline.chat import Messages
from rlhf_pipeline.data.loading import prompt_key
from rlhf_pipeline.errors import PipelineError
from rlhf_pipeline.llm_judge import check_settings

if TYPE_CHECKING:
    from rlhf_pipeline.recipe import ModelSpec

Judge = Callable[[Sequence[Messages], Sequence[str]], list[float]]
AnswerKey = Mapping[str, str]  # prompt_key(prompt) -> the prompt's right answer (a card's `reference`)
JUDGE_TYPES = ("vader", "reward_model", "callable", "llm")


@dataclass
class JudgeSpec:
    """Which judge: `vader`, a finished RM stage (`path`), `function: module:function`, or an LLM (`path`).

    An `llm` judge's model is `path` (a folder, a Hub id, `embedded`, a finished stage); `mode`, `rubric`
    (text or a .txt/.md file), `choices`, `max_rating` and `batch_size` are explained in llm_judge.py.
    """

    type: str = "vader"
    path: str | None = None
    function: str | None = None
    mode: str = "pairwise"
    rubric: str | None = None
    choices: list[str] = field(default_factory=lambda: ["1", "2"])
    max_rating: int = 9
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.type not in JUDGE_TYPES:
            raise ValueError(f"type: must be one of {', '.join(JUDGE_TYPES)}")
        if self.type == "reward_model" and not self.path:
            raise ValueError("path: a reward_model judge needs the folder of a finished rm stage")
        if self.type == "callable" and (not self.function or ":" not in self.function):
            raise ValueError("function: a callable judge needs `module:function`")
        if self.type == "llm":
            if not self.path:
                raise ValueError("path: an llm judge needs its model: a folder, a Hub id, `embedded` or a finished "
                                 "stage's folder")
            if self.batch_size < 1:
                raise ValueError("batch_size: must be 1 or more")
            check_settings(self.mode, self.rubric, self.choices, self.max_rating)

    @property
    def name(self) -> str:
        return {"vader": "vader", "reward_model": f"reward_model:{self.path}",
                "llm": f"llm:{self.path}:{self.mode}"}.get(self.type, str(self.function))


def vader_judge() -> Judge:
    """VADER's compound sentiment score in [-1, 1]: a published lexicon and rule set, not ours."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = SentimentIntensityAnalyzer()

    def score(prompts: Sequence[Messages], answers: Sequence[str]) -> list[float]:
        return [analyzer.polarity_scores(answer)["compound"] for answer in answers]

    return score


def import_function(reference: str) -> Callable[..., list[float]]:
    """The function `module:function` names; ValueError saying what is wrong (module, name, not callable)."""
    module_name, _, name = reference.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"'{reference}': cannot import module '{module_name}' ({error}); install it or put it "
                         "on PYTHONPATH") from error
    function = getattr(module, name, None)
    if not callable(function):
        raise ValueError(f"'{reference}': module '{module_name}' has no function '{name}'")
    return function


def takes_references(function: Callable[..., object]) -> bool:
    """Whether a function checks answers against the right ones (it has a `references` parameter)."""
    try:
        return "references" in inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False


def checking_references(function: Callable[..., list[float]], answer_key: AnswerKey | None, name: str) -> Judge:
    """A function as a judge: one with a `references` parameter gets each prompt's right answer from `answer_key`."""
    if not takes_references(function):
        return function

    def judge(prompts: Sequence[Messages], answers: Sequence[str]) -> list[float]:
        references = []
        for prompt in prompts:
            reference = (answer_key or {}).get(prompt_key(prompt))
            if reference is None:
                shown = prompt[-1]["content"] if prompt else ""
                raise PipelineError(f"'{name}' checks each answer against its prompt's right answer, and the prompt "
                                    f"{shown[:80]!r} has none: give the stage's prompt cards a `reference` column "
                                    "(the right answer, or a worked solution ending in it)")
            references.append(reference)
        return function(prompts, answers, references=references)

    return judge


def load_judge(spec: JudgeSpec, model_spec: ModelSpec | None = None, answer_key: AnswerKey | None = None) -> Judge:
    """Build the judge a recipe names; a reward-model judge loads with the recipe's model settings (4-bit...);
    a function that checks against the right answers reads them from `answer_key`."""
    if spec.type == "vader":
        return vader_judge()
    if spec.type == "reward_model":
        from rlhf_pipeline.reward import RewardModel

        return RewardModel.from_stage(str(spec.path), model_spec).score
    if spec.type == "llm":
        from rlhf_pipeline.llm_judge import LLMJudge

        return LLMJudge.from_path(str(spec.path), model_spec, mode=spec.mode, rubric=spec.rubric,
                                  choices=tuple(spec.choices), max_rating=spec.max_rating, batch_size=spec.batch_size)
    return checking_references(import_function(str(spec.function)), answer_key, str(spec.function))
