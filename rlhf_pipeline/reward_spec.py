"""The reward a stage scores answers with: several signals combined, as DeepMind's Sparrow combines its
preference reward model with rule reward models.

    reward:
      signals:
        warmth: {model: outputs/smollm2-135m/rm}                     # a preference RM, normalised by its stats
        brevity: {model: outputs/smollm2-135m/rule-rm, use: penalty, weight: 2.0}  # a rule RM: P(breaks the rule)
        asks_back: {function: my_rules:asks_a_question, use: veto}  # a function: 1 = breaks the rule
        sentiment: {judge: {type: vader}, weight: 0.5}              # any judge (judges.py)
      veto_reward: -3.0

An answer's reward is Σ weight·score over the `use: reward` signals, minus Σ weight·p over the `use: penalty`
ones, where p in [0, 1] is the probability (or 0/1 verdict) that the answer breaks the signal's rule; an answer
that a `use: veto` signal flags (p > its threshold) gets `veto_reward` instead, whatever else it scored. A
preference RM's score is (score − mean)/std with the statistics its rm stage measured (`normalize: false`
keeps it raw); a rule RM (an rm stage trained on the `classification` format) gives sigmoid(score).

Every stage that scores answers reads this section (ppo, eval, label, best_of_n, grpo, rloo), and each reports
every signal by name. The short form `{model: FOLDER, functions: [module:function, ...]}` names one preference
RM (signal `reward_model`) and functions (signals named after them), all weight 1.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf_pipeline.chat import Messages
from rlhf_pipeline.errors import RecipeError
from rlhf_pipeline.judges import JudgeSpec, import_function
from rlhf_pipeline.outputs import read_manifest
from rlhf_pipeline.reward import CLASSIFICATION, PAIRWISE

if TYPE_CHECKING:
    from rlhf_pipeline.recipe import ModelSpec, Recipe
    from rlhf_pipeline.reward import RewardModel

USES = ("reward", "penalty", "veto")
SIGNAL = "signal/"  # the column prefix of a signal's per-answer scores (eval.json and the answers files)
RULE_USES = ("penalty", "veto")
_SIGNAL_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")  # a log key, an adapter name, a report row

# A signal's scores for answers: chat prompts, answer texts and, when the caller sampled them, the token ids of
# prompt + answer (a reward model then scores exactly those ids instead of re-encoding the texts).
Scorer = Callable[[Sequence[Messages], Sequence[str], Sequence[Sequence[int]] | None], list[float]]


@dataclass
class RewardSignal:
    """One signal: a finished rm stage (`model`), a Python function, or a judge; its weight and its use."""

    model: str | None = None
    function: str | None = None
    judge: JudgeSpec | None = None
    weight: float = 1.0
    use: str = "reward"
    normalize: bool = True  # a preference RM: (score - mean)/std of its training answers' scores
    threshold: float = 0.5  # a veto flags the answers whose probability of breaking the rule is above this

    def __post_init__(self) -> None:
        if sum(source is not None for source in (self.model, self.function, self.judge)) != 1:
            raise ValueError("model: give exactly one of model (a finished rm stage), function (module:function) "
                             "or judge (a judge section)")
        if self.function is not None and ":" not in self.function:
            raise ValueError(f"function: '{self.function}' is not `module:function`")
        if self.use not in USES:
            raise ValueError(f"use: must be one of {', '.join(USES)} (got {self.use!r})")
        if self.weight < 0:
            raise ValueError("weight: must be zero or more; a signal that lowers the reward is `use: penalty`")
        if not 0 < self.threshold < 1:
            raise ValueError("threshold: a probability strictly between 0 and 1")


@dataclass
class RewardSpec:
    """The named signals and how they combine (see the module docstring); empty when a recipe has no section."""

    signals: dict[str, RewardSignal] = field(default_factory=dict)
    veto_reward: float = -3.0  # three standard deviations under a normalised preference RM's mean
    model: str | None = None  # short form: one preference RM, signal `reward_model`
    functions: list[str] = field(default_factory=list)  # short form: functions, signals named after them
    normalize: bool = True  # short form: the RM's normalisation

    def __post_init__(self) -> None:
        if self.signals and (self.model or self.functions):
            raise ValueError("signals: give the signals, or the short form model/functions, not both")
        for reference in self.functions:
            if ":" not in reference:
                raise ValueError(f"functions: '{reference}' is not `module:function`")
        names = [reference.partition(":")[2] for reference in self.functions]
        if len(set(names)) < len(names):
            raise ValueError("functions: two functions have the same name; use the signals form to name them")
        for name in self.signals:
            if not isinstance(name, str) or not _SIGNAL_NAME.fullmatch(name):
                raise ValueError(f"signals: '{name}' is not a usable signal name (a letter, then letters, digits, "
                                 "_ and -)")

    @cached_property
    def by_name(self) -> dict[str, RewardSignal]:
        """Every signal by name, the short form's included."""
        short = {"reward_model": RewardSignal(model=self.model, normalize=self.normalize)} if self.model else {}
        short |= {ref.partition(":")[2]: RewardSignal(function=ref) for ref in self.functions}
        return short or self.signals

    @property
    def given(self) -> bool:
        return bool(self.by_name)

    @property
    def names(self) -> list[str]:
        return list(self.by_name)

    def models(self) -> dict[str, str]:
        """Signal name -> folder of every reward-model signal."""
        return {name: signal.model for name, signal in self.by_name.items() if signal.model is not None}

    def signal_key(self, name: str) -> str:
        """Where a signal sits in the recipe, for error messages (the short form's keys when it was used)."""
        signal = self.by_name[name]
        if self.model and signal.model is not None:
            return "reward.model"
        if signal.function in self.functions:
            return f"reward.functions[{self.functions.index(signal.function)}]"
        return f"reward.signals.{name}"


def model_objective(folder: str | Path) -> str | None:
    """What a finished rm stage learnt: "pairwise" (preferences) or "classification" (a rule); None if unfinished."""
    manifest = read_manifest(Path(folder))
    return None if manifest is None else manifest.extra.get("objective", PAIRWISE)


def check_reward(recipe: Recipe, spec: RewardSpec, answers_grouped: bool = False) -> None:
    """Before any weights load: functions import, models are finished rm stages used as what they are, and a
    pairwise LLM judge only where the answers come in groups per prompt (`label`)."""
    for name, signal in spec.by_name.items():
        key = spec.signal_key(name)
        if signal.judge is not None and signal.judge.type == "llm" and signal.judge.mode == "pairwise" and (
                not answers_grouped):
            raise RecipeError(recipe.path, f"{key}.judge.mode", f"a pairwise LLM judge compares the answers to one "
                              f"prompt with each other, but {recipe.stage} scores each answer alone; use "
                              "mode: pointwise")
        if signal.function is not None:
            try:
                import_function(signal.function)
            except ValueError as error:
                raise RecipeError(recipe.path, key, f"{error}; a reward function is `module:function`, called "
                                  "with (prompts, answers) and returning a float per answer") from None
        if signal.model is not None:
            model_key = key if key == "reward.model" else f"{key}.model"
            recipe.check_finished_stage(model_key, signal.model, ("rm",),
                                        "not a reward model; point it at an rm stage's output_dir")
            objective = model_objective(signal.model)  # unknown while an earlier pipeline stage has yet to write it
            rule = objective == CLASSIFICATION
            if rule and signal.use not in RULE_USES:
                raise RecipeError(recipe.path, f"{key}.use", f"{signal.model} is a rule reward model (the "
                                  "probability that an answer breaks a rule); use it as `use: penalty` or `use: veto`")
            if objective is not None and not rule and signal.use in RULE_USES:
                raise RecipeError(recipe.path, f"{key}.use", f"{signal.model} is a preference reward model (a score, "
                                  "not a probability); use it as `use: reward`, or train a rule RM on a "
                                  "classification card for a penalty or veto")


@dataclass
class Reward:
    """The signals' scorers and their combination: `reward(prompts, answers)` has a judge's signature."""

    spec: RewardSpec
    scorers: dict[str, Scorer]

    def signal_scores(self, prompts: Sequence[Messages], answers: Sequence[str],
                      sequences: Sequence[Sequence[int]] | None = None) -> dict[str, list[float]]:
        """Each signal's score per answer: normalised for a preference RM, a probability for a rule."""
        scores = {name: [float(v) for v in scorer(prompts, answers, sequences)]
                  for name, scorer in self.scorers.items()}
        for name, values in scores.items():
            if len(values) != len(answers):
                raise ValueError(f"reward signal '{name}' returned {len(values)} scores for {len(answers)} answers")
            if self.spec.by_name[name].use in RULE_USES and not all(0 <= v <= 1 for v in values):
                raise ValueError(f"reward signal '{name}' is a {self.spec.by_name[name].use}: it must return the "
                                 "probability (or 0/1 verdict) that an answer breaks its rule, got values outside "
                                 f"[0, 1] (e.g. {next(v for v in values if not 0 <= v <= 1)})")
        return scores

    def combine(self, scores: Mapping[str, Sequence[float]]) -> list[float]:
        """Weighted sum of the reward signals minus the weighted penalties; vetoed answers get `veto_reward`."""
        rows = len(next(iter(scores.values()))) if scores else 0
        totals = [0.0] * rows
        for name, signal in self.spec.by_name.items():
            sign = {"reward": 1.0, "penalty": -1.0}.get(signal.use)
            if sign is not None:
                totals = [t + sign * signal.weight * v for t, v in zip(totals, scores[name], strict=True)]
        for name, signal in self.spec.by_name.items():
            if signal.use == "veto":
                totals = [self.spec.veto_reward if v > signal.threshold else t
                          for t, v in zip(totals, scores[name], strict=True)]
        return totals

    def __call__(self, prompts: Sequence[Messages], answers: Sequence[str]) -> list[float]:
        return self.combine(self.signal_scores(prompts, answers))


def signal_columns(signals: Mapping[str, Sequence[float]]) -> dict[str, Sequence[float]]:
    """Each signal's per-answer scores under its column name, `signal/<name>`, beside the combined `reward`."""
    return {f"{SIGNAL}{name}": values for name, values in signals.items()}


def model_scorer(rm: RewardModel, signal: RewardSignal) -> Scorer:
    """A reward model as a signal: sigmoid(score) for a rule RM, else its score, normalised unless told not to."""
    mean, std = (rm.mean, rm.std) if signal.normalize else (0.0, 1.0)
    rule = rm.objective == CLASSIFICATION

    def score(prompts: Sequence[Messages], answers: Sequence[str],
              sequences: Sequence[Sequence[int]] | None = None) -> list[float]:
        raw = rm.score_ids(sequences) if sequences is not None else rm.score(prompts, answers)
        return [1 / (1 + math.exp(-s)) for s in raw] if rule else [(s - mean) / std for s in raw]

    return score


def _text_scorer(judge: Callable[[Sequence[Messages], Sequence[str]], Sequence[float]]) -> Scorer:
    def score(prompts: Sequence[Messages], answers: Sequence[str], sequences: Any = None) -> list[float]:
        return [float(v) for v in judge(prompts, answers)]

    return score


def build_reward(spec: RewardSpec, reward_models: Mapping[str, RewardModel], model_spec: ModelSpec | None) -> Reward:
    """The spec's Reward from its loaded reward models (signal name -> RewardModel); functions and judges here."""
    from rlhf_pipeline.judges import load_judge

    scorers: dict[str, Scorer] = {}
    for name, signal in spec.by_name.items():
        if signal.model is not None:
            scorers[name] = model_scorer(reward_models[name], signal)
        elif signal.function is not None:
            scorers[name] = _text_scorer(import_function(signal.function))
        else:
            scorers[name] = _text_scorer(load_judge(signal.judge, model_spec))  # type: ignore[arg-type]
    return Reward(spec, scorers)


def signal_role(name: str) -> str:
    """The role (adapter) name of a reward-model signal on a shared base."""
    return f"signal_{name}"


def load_reward(spec: RewardSpec, model_spec: ModelSpec) -> Reward:
    """The spec's Reward with its reward models loaded as frozen roles on one base (4-bit if the recipe says)."""
    import dataclasses

    from rlhf_pipeline.adapters import load_frozen_roles
    from rlhf_pipeline.errors import PipelineError
    from rlhf_pipeline.models import load_tokenizer, same_tokenizer
    from rlhf_pipeline.reward import RewardModel
    from rlhf_pipeline.sources import resolve_source

    reward_models: dict[str, RewardModel] = {}
    if folders := spec.models():
        specs = {name: dataclasses.replace(model_spec, name_or_path=folder) for name, folder in folders.items()}
        sources = {name: resolve_source(s) for name, s in specs.items()}
        first, *others = sources
        tokenizer = load_tokenizer(sources[first], specs[first])
        for name in others:
            if not same_tokenizer(tokenizer, load_tokenizer(sources[name], specs[name])):
                raise PipelineError(f"reward.signals.{name}: {folders[name]} uses a different tokenizer than "
                                    f"{folders[first]}; train every reward model from the same SFT output")
        roles = load_frozen_roles({signal_role(n): s for n, s in sources.items()}, model_spec, tokenizer,
                                  frozenset(signal_role(n) for n in sources))
        reward_models = {name: RewardModel.from_role(roles[signal_role(name)], signal_role(name), tokenizer, folder)
                         for name, folder in folders.items()}
    return build_reward(spec, reward_models, model_spec)


RewardFunction = Callable[..., list[float]]  # TRL's reward function: (prompts, completions, **columns) -> floats


def trl_reward_functions(reward: Reward) -> tuple[list[RewardFunction], list[float]]:
    """The signals as TRL reward functions, named after them (TRL logs each by name), and their weights
    (a penalty's negated) for TRL's `reward_weights`. A veto is no weighted sum: callers refuse it first."""
    functions, weights = [], []
    for name, signal in reward.spec.by_name.items():
        scorer = reward.scorers[name]

        def function(prompts: Sequence[Messages], completions: Sequence[object], _scorer: Scorer = scorer,
                     **_: object) -> list[float]:
            texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]  # type: ignore[index]
            return [float(v) for v in _scorer(prompts, texts, None)]

        function.__name__ = name
        functions.append(function)
        weights.append(-signal.weight if signal.use == "penalty" else signal.weight)
    return functions, weights
