"""The reward a stage scores answers with: several signals combined, as DeepMind's Sparrow combines its
preference reward model with rule reward models.

    reward:
      signals:
        warmth: {model: outputs/smollm2-135m/rm}                     # a preference RM, normalised by its stats
        brevity: {model: outputs/smollm2-135m/rule-rm, use: penalty, weight: 2.0}  # a rule RM: P(breaks the rule)
        asks_back: {function: my_rules:asks_a_question, use: veto}  # a function: 1 = breaks the rule
        sentiment: {judge: {type: vader}, weight: 0.5}              # any judge (judges.py)
      veto_reward: -3.0

A process reward model (a finished prm stage) is a signal too, with `aggregate` saying how its steps' P(right)
make one reward: `min`, `product` or `last` (process_reward.py); `dense` (PPO only) gives PPO a reward at the
end of every step instead, log P(right), beside the other signals' reward at the end of the answer:

        process: {model: outputs/smollm2-135m-arithmetic/prm, aggregate: min}

A step verifier is read the same way: a `function` with `aggregate` is called per answer with the problem, the
solution and the problem's right answer (labelling.step_verifier's contract) and gives a verdict per step, which
counts as P(right) of 1 or 0 (so a wrong step's dense reward is weight·log 1e-6 = −13.8·weight):

        verified_steps: {function: rlhf_pipeline.tasks.arithmetic:step_labels, aggregate: dense, weight: 0.05}

A function with a `references` parameter (tasks/answers.py:outcome) is also given each prompt's right answer,
from the `reference` column of the stage's cards (data/loading.py:answer_key).

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
from rlhf_pipeline.data.loading import prompt_key
from rlhf_pipeline.errors import RecipeError
from rlhf_pipeline.judges import AnswerKey, JudgeSpec, checking_references, import_function, takes_references
from rlhf_pipeline.models import SCORER_STAGES
from rlhf_pipeline.outputs import read_manifest
from rlhf_pipeline.process_reward import AGGREGATIONS, DENSE, PROCESS, ProcessRewardModel, aggregate
from rlhf_pipeline.reward import CLASSIFICATION, PAIRWISE

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from rlhf_pipeline.adapters import SharedBase
    from rlhf_pipeline.recipe import ModelSpec, Recipe
    from rlhf_pipeline.reward import RewardModel

    Scorers = Mapping[str, RewardModel | ProcessRewardModel]

USES = ("reward", "penalty", "veto")
SIGNAL = "signal/"  # the column prefix of a signal's per-answer scores (eval.json and the answers files)
RULE_USES = ("penalty", "veto")
_SIGNAL_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")  # a log key, an adapter name, a report row

# A signal's scores for answers: chat prompts, answer texts and, when the caller sampled them, the token ids of
# prompt + answer (a reward model then scores exactly those ids instead of re-encoding the texts).
Scorer = Callable[[Sequence[Messages], Sequence[str], Sequence[Sequence[int]] | None], list[float]]
StepVerdicts = Callable[[Sequence[Messages], Sequence[str]], list[list[float]]]  # per answer, each step's P(right)


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
    aggregate: str | None = None  # a PRM or step verifier: min, product, last, or dense (PPO: a reward per step)

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
        if self.aggregate is not None and (self.judge is not None or self.aggregate not in (*AGGREGATIONS, DENSE)):
            raise ValueError(f"aggregate: how the steps of a process reward model (`model`) or a step verifier "
                             f"(`function`) make one reward, one of {', '.join(AGGREGATIONS)} or {DENSE} (PPO); got "
                             f"{self.aggregate!r}")


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

    def role_of(self, name: str) -> str:
        """The role (adapter) a reward-model signal is scored by on a shared base: signals naming one folder share
        it, so a model is loaded once (and a PRM read under three aggregations is scored once)."""
        folders = self.models()
        return signal_role(next(other for other, folder in folders.items() if folder == folders[name]))

    def model_roles(self) -> dict[str, str]:
        """Role -> folder of every distinct reward model the signals name."""
        return {self.role_of(name): folder for name, folder in self.models().items()}

    def signal_key(self, name: str) -> str:
        """Where a signal sits in the recipe, for error messages (the short form's keys when it was used)."""
        signal = self.by_name[name]
        if self.model and signal.model is not None:
            return "reward.model"
        if signal.function in self.functions:
            return f"reward.functions[{self.functions.index(signal.function)}]"
        return f"reward.signals.{name}"


def model_objective(folder: str | Path) -> str | None:
    """What a finished rm or prm stage learnt: "pairwise" (preferences), "classification" (a rule) or "process"
    (a prm's step scores); None if unfinished."""
    manifest = read_manifest(Path(folder))
    if manifest is None:
        return None
    return PROCESS if manifest.stage == "prm" else manifest.extra.get("objective", PAIRWISE)


def check_reward(recipe: Recipe, spec: RewardSpec, answers_grouped: bool = False) -> None:
    """Before any weights load: functions import, models are finished rm stages used as what they are, and a
    pairwise LLM judge only where the answers come in groups per prompt (`label`)."""
    _check_references(recipe, spec)
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
                contract = ("a step verifier is `module:function`, called per answer with (problem, solution, "
                            "reference) and returning a verdict per step" if signal.aggregate else
                            "a reward function is `module:function`, called with (prompts, answers) and returning "
                            "a float per answer")
                raise RecipeError(recipe.path, key, f"{error}; {contract}") from None
            _check_process_signal(recipe, key, signal, PROCESS if signal.aggregate else None)
        if signal.model is not None:
            model_key = key if key == "reward.model" else f"{key}.model"
            recipe.check_finished_stage(model_key, signal.model, SCORER_STAGES,
                                        "not a reward model; point it at an rm (or prm) stage's output_dir")
            objective = model_objective(signal.model)  # unknown while an earlier pipeline stage has yet to write it
            _check_process_signal(recipe, key, signal, objective)
            rule = objective == CLASSIFICATION
            if rule and signal.use not in RULE_USES:
                raise RecipeError(recipe.path, f"{key}.use", f"{signal.model} is a rule reward model (the "
                                  "probability that an answer breaks a rule); use it as `use: penalty` or `use: veto`")
            if objective is not None and not rule and signal.use in RULE_USES:
                raise RecipeError(recipe.path, f"{key}.use", f"{signal.model} is a preference reward model (a score, "
                                  "not a probability); use it as `use: reward`, or train a rule RM on a "
                                  "classification card for a penalty or veto")


def _check_process_signal(recipe: Recipe, key: str, signal: RewardSignal, objective: str | None) -> None:
    """A process reward model needs an aggregation (dense only in PPO, as a reward); nothing else takes one."""
    if objective == PROCESS and signal.aggregate is None:
        raise RecipeError(recipe.path, f"{key}.aggregate", f"{signal.model} is a process reward model (a score per "
                          f"step): say how its steps make one reward, one of {', '.join(AGGREGATIONS)} (or {DENSE} in "
                          "ppo: a reward at the end of every step)")
    if objective not in (PROCESS, None) and signal.aggregate is not None:
        raise RecipeError(recipe.path, f"{key}.aggregate", f"{signal.model} scores whole answers, not steps; remove "
                          "aggregate (it is for a prm stage's output)")
    if signal.aggregate is not None and signal.use != "reward":
        raise RecipeError(recipe.path, f"{key}.use", "a process reward model's (or step verifier's) P(right) is a "
                          "reward: use: reward")
    if signal.aggregate == DENSE and recipe.stage != "ppo":
        raise RecipeError(recipe.path, f"{key}.aggregate", f"dense rewards (one per step) are PPO's; {recipe.stage} "
                          f"scores whole answers: use one of {', '.join(AGGREGATIONS)}")


def _check_references(recipe: Recipe, spec: RewardSpec) -> None:
    """A function that checks answers against the right ones needs cards that carry them (a `reference` column)."""
    from rlhf_pipeline.data.loading import answer_key

    needing = [name for name, signal in spec.by_name.items()
               if signal.function is not None and signal.aggregate is None and _importable(signal.function)
               and takes_references(import_function(signal.function))]
    # Cards an earlier stage writes (pending) and Hub cards are read when the stage runs, which refuses a prompt
    # without a reference then.
    listed = len(recipe.data.train) + len(recipe.data.eval) + len(recipe.data.ptx)
    if not needing or len(recipe.cards) < listed or any(card.source.path is None for card in recipe.cards):
        return
    if not answer_key(recipe):
        raise RecipeError(recipe.path, spec.signal_key(needing[0]), f"{spec.by_name[needing[0]].function} checks "
                          "answers against each prompt's right answer, and no card of data.train or data.eval gives "
                          "one: list prompt cards with a `reference` column (format prompt_only)")


def _importable(reference: str) -> bool:
    try:
        import_function(reference)
    except ValueError:
        return False  # check_reward says what is wrong with it
    return True


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
        """Weighted sum of the reward signals minus the weighted penalties; vetoed answers get `veto_reward`.
        Dense signals are left out: PPO adds their rewards step by step."""
        rows = len(next(iter(scores.values()))) if scores else 0
        totals = [0.0] * rows
        for name, signal in self.spec.by_name.items():
            sign = {"reward": 1.0, "penalty": -1.0}.get(signal.use)
            if sign is not None and signal.aggregate != DENSE:  # a dense signal's reward comes per step (PPO)
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


def model_scorer(rm: RewardModel | ProcessRewardModel, signal: RewardSignal) -> Scorer:
    """A reward model as a signal: sigmoid(score) for a rule RM, else its score, normalised unless told not to;
    a process reward model's steps' P(right), aggregated as the signal says."""
    if isinstance(rm, ProcessRewardModel):
        return _process_scorer(rm, str(signal.aggregate))
    mean, std = (rm.mean, rm.std) if signal.normalize else (0.0, 1.0)
    rule = rm.objective == CLASSIFICATION

    def score(prompts: Sequence[Messages], answers: Sequence[str],
              sequences: Sequence[Sequence[int]] | None = None) -> list[float]:
        raw = rm.score_ids(sequences) if sequences is not None else rm.score(prompts, answers)
        return [1 / (1 + math.exp(-s)) for s in raw] if rule else [(s - mean) / std for s in raw]

    return score


def _process_scorer(prm: ProcessRewardModel, how: str) -> Scorer:
    def score(prompts: Sequence[Messages], answers: Sequence[str],
              sequences: Sequence[Sequence[int]] | None = None) -> list[float]:
        if sequences is None:
            sequences, cuts = prm.encode(prompts, answers)
        else:  # sampled ids: their prompt part is the chat-encoded prompt, as every stage encodes it
            cuts = prm.prompt_lengths(prompts)
        return [aggregate(probabilities, how) for _, probabilities in prm.step_scores(sequences, cuts)]

    return score


def step_verdicts(function: str, answer_key: AnswerKey | None) -> StepVerdicts:
    """A step verifier over a batch: each answer's verdict per step as P(right), 1.0 or 0.0. It is given the
    problem's right answer from the cards when they carry one (None otherwise)."""
    verify = import_function(function)

    def verdicts(prompts: Sequence[Messages], answers: Sequence[str]) -> list[list[float]]:
        return [[float(bool(good)) for good in verify(prompt, answer, (answer_key or {}).get(prompt_key(prompt)))]
                for prompt, answer in zip(prompts, answers, strict=True)]

    return verdicts


def _verifier_scorer(verdicts: StepVerdicts, how: str) -> Scorer:
    def score(prompts: Sequence[Messages], answers: Sequence[str], sequences: Any = None) -> list[float]:
        return [aggregate(steps, how) for steps in verdicts(prompts, answers)]

    return score


def _text_scorer(judge: Callable[[Sequence[Messages], Sequence[str]], Sequence[float]]) -> Scorer:
    def score(prompts: Sequence[Messages], answers: Sequence[str], sequences: Any = None) -> list[float]:
        return [float(v) for v in judge(prompts, answers)]

    return score


def build_reward(spec: RewardSpec, reward_models: Scorers, model_spec: ModelSpec | None,
                 answer_key: AnswerKey | None = None) -> Reward:
    """The spec's Reward from its loaded reward models (signal name -> RewardModel or ProcessRewardModel);
    functions and judges here, given the prompts' right answers (`answer_key`) when they check against them."""
    from rlhf_pipeline.judges import load_judge

    scorers: dict[str, Scorer] = {}
    for name, signal in spec.by_name.items():
        if signal.model is not None:
            scorers[name] = model_scorer(reward_models[name], signal)
        elif signal.function is not None and signal.aggregate is not None:
            scorers[name] = _verifier_scorer(step_verdicts(signal.function, answer_key), signal.aggregate)
        elif signal.function is not None:
            function = import_function(signal.function)
            scorers[name] = _text_scorer(checking_references(function, answer_key, signal.function))
        else:
            scorers[name] = _text_scorer(load_judge(signal.judge, model_spec, answer_key))  # type: ignore[arg-type]
    return Reward(spec, scorers)


def reward_models_from_roles(spec: RewardSpec, roles: Mapping[str, SharedBase],
                             tokenizer: PreTrainedTokenizerBase) -> dict[str, RewardModel | ProcessRewardModel]:
    """Each reward-model signal's scorer from its loaded role (`spec.role_of(name)`): a process reward model for a
    prm stage, else a RewardModel with its rm stage's statistics; signals sharing a role share the scorer."""
    from rlhf_pipeline.reward import RewardModel

    by_role: dict[str, RewardModel | ProcessRewardModel] = {}
    for role, folder in spec.model_roles().items():
        kind = ProcessRewardModel if model_objective(folder) == PROCESS else RewardModel
        by_role[role] = kind.from_role(roles[role], role, tokenizer, folder)
    return {name: by_role[spec.role_of(name)] for name in spec.models()}


def signal_role(name: str) -> str:
    """The role (adapter) name of a reward-model signal on a shared base."""
    return f"signal_{name}"


def load_reward(spec: RewardSpec, model_spec: ModelSpec, answer_key: AnswerKey | None = None) -> Reward:
    """The spec's Reward with its reward models loaded as frozen roles on one base (4-bit if the recipe says);
    `answer_key`: the prompts' right answers, for the functions that check against them."""
    import dataclasses

    from rlhf_pipeline.adapters import load_frozen_roles
    from rlhf_pipeline.errors import PipelineError
    from rlhf_pipeline.models import load_tokenizer, same_tokenizer
    from rlhf_pipeline.sources import resolve_source

    reward_models: dict[str, RewardModel | ProcessRewardModel] = {}
    if folders := spec.models():
        specs = {name: dataclasses.replace(model_spec, name_or_path=folder) for name, folder in folders.items()}
        sources = {name: resolve_source(s) for name, s in specs.items()}
        first, *others = sources
        tokenizer = load_tokenizer(sources[first], specs[first])
        for name in others:
            if not same_tokenizer(tokenizer, load_tokenizer(sources[name], specs[name])):
                raise PipelineError(f"reward.signals.{name}: {folders[name]} uses a different tokenizer than "
                                    f"{folders[first]}; train every reward model from the same SFT output")
        unique = {spec.role_of(name): source for name, source in sources.items()}
        roles = load_frozen_roles(unique, model_spec, tokenizer, frozenset(unique))
        reward_models = reward_models_from_roles(spec, roles, tokenizer)
    return build_reward(spec, reward_models, model_spec, answer_key)


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
