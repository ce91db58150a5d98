"""An off-the-shelf LLM as the judge (RLAIF, Lee et al. 2023): a rubric prompt, read from next-token probabilities.

    judge: {type: llm, path: embedded}                                   # pairwise, the built-in rubric
    judge: {type: llm, path: outputs/smollm2-135m/sft, mode: pointwise}  # direct RLAIF: an expected rating
    judge: {type: llm, path: HuggingFaceTB/SmolLM2-360M-Instruct, rubric: my_rubric.txt, choices: [A, B]}

`pairwise` shows the judge model the question and two answers in its own chat template and reads
P(first) from the probabilities of the two choice tokens ("1"/"2"), renormalised over the two. Every pair
is asked in both orders and averaged, which cancels a preference for a position; an answer's score is its
mean win probability against the other answers to the same prompt, in [0, 1] (what the label stage ranks).
`pointwise` asks for a rating from 1 to `max_rating` and returns the probability-weighted mean rating.
No text is generated: one batched forward pass per question, the logits of its last position only.
"""

from __future__ import annotations

import json
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf_pipeline.chat import Messages, encode_prompt, pad_batch
from rlhf_pipeline.errors import PipelineError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

    from rlhf_pipeline.recipe import ModelSpec

MODES = ("pairwise", "pointwise")
EMBEDDED = "embedded"  # `path: embedded` is the package's embedded model
EMBEDDED_ALIAS = "smollm2-135m-instruct"

PAIRWISE_RUBRIC = """\
Two assistants replied to the same message from a user. Decide which reply is more helpful, warm and \
friendly: kind, upbeat and on topic.

User's message:
{prompt}

Reply {first_choice}:
{first}

Reply {second_choice}:
{second}

Which reply is more helpful, warm and friendly? Answer with {first_choice} or {second_choice} only."""

POINTWISE_RUBRIC = """\
An assistant replied to a message from a user. Rate how helpful, warm and friendly the reply is, from 1 \
(cold, gloomy or unhelpful) to {max_rating} (kind, upbeat and helpful).

User's message:
{prompt}

Reply:
{answer}

Rate the reply from 1 to {max_rating}. Answer with the number only."""

# Placeholders a rubric must hold, and the optional ones it may hold, per mode.
_REQUIRED = {"pairwise": {"prompt", "first", "second"}, "pointwise": {"prompt", "answer"}}
_OPTIONAL = {"pairwise": {"first_choice", "second_choice"}, "pointwise": {"max_rating"}}

ProbeFn = Callable[["torch.Tensor", "torch.Tensor", "torch.Tensor"], "torch.Tensor"]  # ids, mask, positions -> logits


def read_rubric(rubric: str | None, mode: str) -> str:
    """The rubric text: the built-in one for the mode, a .txt/.md file's content, or the string itself."""
    if rubric is None:
        return PAIRWISE_RUBRIC if mode == "pairwise" else POINTWISE_RUBRIC
    if "\n" not in rubric and Path(rubric).suffix in (".txt", ".md"):
        path = Path(rubric).expanduser()
        if not path.is_file():
            raise ValueError(f"rubric: file '{rubric}' not found (a rubric ending in .txt or .md is read from a file)")
        return path.read_text(encoding="utf-8")
    return rubric


def check_settings(mode: str, rubric: str | None, choices: Sequence[str], max_rating: int) -> None:
    """Refuse a bad llm judge spec before any weights load; ValueError messages start with the key at fault."""
    if mode not in MODES:
        raise ValueError(f"mode: must be one of {', '.join(MODES)} (got {mode!r}); pairwise ranks the answers to a "
                         "prompt (labelling), pointwise rates each answer alone (direct RLAIF)")
    if len(choices) != 2 or len(set(choices)) != 2 or not all(c.strip() for c in choices):
        raise ValueError(f"choices: two different labels for the first and second answer, e.g. ['1', '2'] or "
                         f"['A', 'B'] (got {list(choices)!r})")
    if not 2 <= max_rating <= 9:
        raise ValueError(f"max_rating: ratings run from 1 to 2..9 (each rating must be one token, and '10' is two "
                         f"in most tokenizers); got {max_rating}")
    text = read_rubric(rubric, mode)
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(text) if name is not None}
    except ValueError as err:
        raise ValueError(f"rubric: not a valid template ({err}); write literal braces as {{{{ and }}}}") from None
    missing = sorted(_REQUIRED[mode] - fields)
    unknown = sorted(fields - _REQUIRED[mode] - _OPTIONAL[mode])
    if missing:
        raise ValueError(f"rubric: a {mode} rubric must contain {', '.join('{' + f + '}' for f in missing)} "
                         f"(placeholders: {', '.join('{' + f + '}' for f in sorted(_REQUIRED[mode]))}, optional "
                         f"{', '.join('{' + f + '}' for f in sorted(_OPTIONAL[mode]))})")
    if unknown:
        raise ValueError(f"rubric: unknown placeholder {', '.join('{' + f + '}' for f in unknown)} in a {mode} "
                         f"rubric (known: {', '.join(sorted(_REQUIRED[mode] | _OPTIONAL[mode]))}); write literal "
                         "braces as {{ and }}")


def conversation_text(prompt: Messages) -> str:
    """What the user asked, as the rubric shows it: the text of a lone user turn, else `Role: text` lines."""
    turns = [m for m in prompt if m["content"].strip()]
    if len(turns) == 1 and turns[0]["role"] == "user":
        return turns[0]["content"]
    return "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in turns)


def single_token_ids(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], key: str, model_name: str) -> list[int]:
    """The token id of each text, which must be exactly one token of the judge model's tokenizer."""
    ids = []
    for text in texts:
        encoded = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(encoded) != 1:
            pieces = tokenizer.convert_ids_to_tokens(encoded)
            raise PipelineError(f"judge.{key}: '{text}' is {len(encoded)} tokens {pieces} for the judge model "
                                f"{model_name}; its probability is read from one next token, so each choice must "
                                "be a single token (try choices: ['1', '2'] or ['A', 'B'])")
        ids.append(encoded[0])
    if len(set(ids)) != len(ids):
        raise PipelineError(f"judge.{key}: {list(texts)} map to the same token for the judge model {model_name}")
    return ids


def _unloaded(*_: object) -> torch.Tensor:
    raise RuntimeError("the judge model is not loaded yet")


@dataclass
class LLMJudge:
    """A frozen causal LM asked a rubric question per answer (pointwise) or per ordered pair (pairwise).

    `logits` maps left-padded ids, their mask and position ids to the next-token logits of the last
    position ([batch, vocab]); `from_path` builds it from a loaded model, tests give a stub.
    """

    logits: ProbeFn
    tokenizer: PreTrainedTokenizerBase
    name: str
    mode: str = "pairwise"
    rubric: str | None = None
    choices: tuple[str, ...] = ("1", "2")
    max_rating: int = 9
    batch_size: int = 8
    device: Any = "cpu"

    def __post_init__(self) -> None:
        check_settings(self.mode, self.rubric, self.choices, self.max_rating)
        self.template = read_rubric(self.rubric, self.mode)
        ratings = [str(r) for r in range(1, self.max_rating + 1)]
        self.choice_ids = single_token_ids(self.tokenizer, self.choices, "choices", self.name)
        self.rating_ids = (single_token_ids(self.tokenizer, ratings, "max_rating", self.name)
                           if self.mode == "pointwise" else [])

    @classmethod
    def from_path(cls, path: str, model_spec: ModelSpec | None = None, **settings: Any) -> LLMJudge:
        """Load `path` (a folder, a Hub id, `embedded`, a finished stage) frozen, as the recipe's model loads.

        The recipe's dtype and quantization apply; its chat_template only when the judge is the recipe's model.
        """
        import dataclasses

        from rlhf_pipeline.adapters import load_frozen_roles
        from rlhf_pipeline.distributed import say
        from rlhf_pipeline.models import load_tokenizer
        from rlhf_pipeline.recipe import ModelSpec
        from rlhf_pipeline.sources import resolve_source

        name = EMBEDDED_ALIAS if path == EMBEDDED else path
        if model_spec is None:
            spec = ModelSpec(name_or_path=name)
        else:
            template = model_spec.chat_template if name == model_spec.name_or_path else None
            spec = dataclasses.replace(model_spec, name_or_path=name, chat_template=template)
        try:
            source = resolve_source(spec, progress=say)
            tokenizer = load_tokenizer(source, spec)
        except PipelineError as err:
            raise PipelineError(f"judge.path: {path}: {str(err).removeprefix('model.name_or_path: ')}") from None
        judge = cls(_unloaded, tokenizer, name=path, **settings)  # choice tokens checked before weights load
        say(f"loading the LLM judge {source.origin}" + (f" with the adapter of {source.adapter}"
                                                         if source.adapter else ""))
        shared = load_frozen_roles({"judge": source}, spec, tokenizer)["judge"]

        def last_logits(ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
            return shared("judge", ids, mask, positions, logits_to_keep=1)[:, -1]

        return dataclasses.replace(judge, logits=last_logits, device=next(shared.parameters()).device)

    # ------------------------------------------------------------------ questions

    def pair_question(self, prompt: Messages, first: str, second: str) -> list[int]:
        text = self.template.format(prompt=conversation_text(prompt), first=first, second=second,
                                    first_choice=self.choices[0], second_choice=self.choices[1])
        return encode_prompt(self.tokenizer, [{"role": "user", "content": text}])

    def rating_question(self, prompt: Messages, answer: str) -> list[int]:
        text = self.template.format(prompt=conversation_text(prompt), answer=answer, max_rating=self.max_rating)
        return encode_prompt(self.tokenizer, [{"role": "user", "content": text}])

    def token_probs(self, questions: Sequence[Sequence[int]], token_ids: Sequence[int],
                    description: str | None = None) -> tuple[list[list[float]], list[float]]:
        """Next-token probabilities of `token_ids` after each question, renormalised over them, and the mass
        they held before renormalising (how well the judge keeps to the answer format). Batches are formed
        by length, so little padding is computed."""
        import torch
        from tqdm.auto import tqdm

        from rlhf_pipeline.distributed import is_main_process

        order = sorted(range(len(questions)), key=lambda i: len(questions[i]))
        probs: list[list[float]] = [[] for _ in questions]
        mass: list[float] = [0.0] * len(questions)
        wanted = torch.tensor(list(token_ids))
        with torch.no_grad():
            for start in tqdm(range(0, len(order), self.batch_size), desc=description,
                              disable=description is None or not is_main_process()):
                rows = order[start : start + self.batch_size]
                ids, mask = pad_batch([questions[i] for i in rows], self.tokenizer.pad_token_id, "left")
                positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
                logits = self.logits(ids.to(self.device), mask.to(self.device), positions.to(self.device)).float().cpu()
                full = torch.log_softmax(logits, dim=-1)[:, wanted]
                for row, picked, total in zip(rows, torch.softmax(full, dim=-1).tolist(),
                                              full.exp().sum(dim=-1).tolist(), strict=True):
                    probs[row], mass[row] = picked, total
        return probs, mass

    # ------------------------------------------------------------------ judging

    def prob_first(self, triples: Sequence[tuple[Messages, str, str]],
                   description: str | None = None) -> tuple[list[float], list[float]]:
        """P(the first answer is better) for each (prompt, first, second), and the choice tokens' mass."""
        probs, mass = self.token_probs([self.pair_question(*t) for t in triples], self.choice_ids, description)
        return [p[0] for p in probs], mass

    def expected_ratings(self, prompts: Sequence[Messages], answers: Sequence[str],
                         description: str | None = None) -> list[float]:
        """Σ r·P(r) over the ratings 1..max_rating, the probabilities renormalised over the rating tokens."""
        questions = [self.rating_question(p, a) for p, a in zip(prompts, answers, strict=True)]
        probs, _ = self.token_probs(questions, self.rating_ids, description)
        return [sum((r + 1) * p for r, p in enumerate(row)) for row in probs]

    def win_rates(self, prompts: Sequence[Messages], answers: Sequence[str],
                  description: str | None = None) -> list[float]:
        """Each answer's mean probability of beating the other answers to its prompt, both orders averaged."""
        groups: dict[str, list[int]] = {}
        for index, prompt in enumerate(prompts):
            groups.setdefault(json.dumps(prompt, sort_keys=True), []).append(index)
        lone = next((members[0] for members in groups.values() if len(members) < 2), None)
        if lone is not None:
            raise PipelineError(f"judge.mode: a pairwise LLM judge compares the answers to one prompt, and prompt "
                                f"{lone} has a single answer; use mode: pointwise to score answers one by one")
        ordered = [(i, j) for members in groups.values() for i in members for j in members if i != j]
        first, _ = self.prob_first([(prompts[i], answers[i], answers[j]) for i, j in ordered], description)
        p_first = dict(zip(ordered, first, strict=True))
        wins: list[list[float]] = [[] for _ in answers]
        for i, j in ordered:  # asked as (i, j) and (j, i): the position's own pull cancels in the difference
            wins[i].append(0.5 + (p_first[i, j] - p_first[j, i]) / 2)
        return [sum(w) / len(w) for w in wins]

    def __call__(self, prompts: Sequence[Messages], answers: Sequence[str]) -> list[float]:
        """The `Judge` signature (judges.py): one float per answer, higher is better."""
        if self.mode == "pointwise":
            return self.expected_ratings(prompts, answers)
        return self.win_rates(prompts, answers)


def agreement(judge: LLMJudge, pairs: Sequence[tuple[Messages, str, str]],
              description: str | None = "judging pairs") -> dict[str, Any]:
    """How a pairwise judge agrees with (prompt, chosen, rejected) labels, and how much the order sways it.

    Each pair is asked with chosen first and with rejected first. Reported: agreement of the order-averaged
    verdict (ties at exactly 0.5 count as disagreement) with its 95% bootstrap interval, agreement of each
    order alone, the share of pairs whose verdict flips with the order, the mean |P(chosen wins | first) −
    P(chosen wins | second)| and its signed mean (> 0: the judge favours the first position), and the mean
    probability mass of the two choice tokens (low: the judge does not answer in the asked format). A
    pointwise judge compares expected ratings instead (`rating_agreement`).
    """
    from rlhf_pipeline.stats import bootstrap_ci

    if not pairs:
        raise ValueError("agreement: no pairs to judge")
    if judge.mode == "pointwise":
        return rating_agreement(judge, pairs, description)
    asked = [(p, c, r) for p, c, r in pairs] + [(p, r, c) for p, c, r in pairs]
    first, mass = judge.prob_first(asked, description)
    n = len(pairs)
    wins_first = first[:n]  # P(chosen wins) with chosen shown first
    wins_second = [1 - p for p in first[n:]]  # ... with chosen shown second
    averaged = [(a + b) / 2 for a, b in zip(wins_first, wins_second, strict=True)]
    effect = [a - b for a, b in zip(wins_first, wins_second, strict=True)]
    agrees = [float(p > 0.5) for p in averaged]
    return {
        "pairs": n,
        "agreement": sum(agrees) / n,
        "agreement_ci95": list(bootstrap_ci(agrees)),
        "agreement_chosen_first": sum(p > 0.5 for p in wins_first) / n,
        "agreement_chosen_second": sum(p > 0.5 for p in wins_second) / n,
        "order_flip_share": sum((a > 0.5) != (b > 0.5) for a, b in zip(wins_first, wins_second, strict=True)) / n,
        "position_effect": sum(abs(e) for e in effect) / n,
        "first_position_bias": sum(effect) / n,
        "mean_p_chosen": sum(averaged) / n,
        "choice_token_mass": sum(mass) / len(mass),
    }


def rating_agreement(judge: LLMJudge, pairs: Sequence[tuple[Messages, str, str]],
                     description: str | None = "rating answers") -> dict[str, Any]:
    """How often a pointwise judge rates chosen above rejected (ties count as disagreement), and the mean ratings."""
    from rlhf_pipeline.stats import bootstrap_ci

    prompts = [p for p, _, _ in pairs] * 2
    ratings = judge.expected_ratings(prompts, [c for _, c, _ in pairs] + [r for _, _, r in pairs], description)
    n = len(pairs)
    chosen, rejected = ratings[:n], ratings[n:]
    agrees = [float(c > r) for c, r in zip(chosen, rejected, strict=True)]
    return {"pairs": n, "agreement": sum(agrees) / n, "agreement_ci95": list(bootstrap_ci(agrees)),
            "mean_rating_chosen": sum(chosen) / n, "mean_rating_rejected": sum(rejected) / n}
