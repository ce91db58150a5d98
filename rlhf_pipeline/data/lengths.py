"""Token lengths of canonical rows as `apply_chat_template` counts them, measured without its per-row cost.

Measuring is most of a card's first load: every conversation is rendered with the chat template and
tokenised. Two things make it cheaper without changing a count:

- a batch of rows is rendered in one call and tokenised in one call of the Rust tokenizer, which counts
  tokens without building the offsets and Python lists `apply_chat_template(tokenize=True)` returns;
- a rendering is cut into pieces before each added token the chat template writes (`<|im_start|>`), and a
  piece met before is not tokenised again: a pair's two conversations share their prompt's pieces, and every
  conversation of a template that adds a default system prompt shares that one. A Hugging Face tokenizer
  splits its input at added tokens before normalising and pre-tokenising, so a piece that starts with an
  added token taking no whitespace or word boundary from its left is tokenised exactly as it is inside the
  whole text, and the counts add up.

A meter checks itself on its first batch against `apply_chat_template(tokenize=True)`, and measures the plain
way for good if any count differs (a tokenizer whose added tokens behave otherwise), so the counts, and the
rows dropped as too long, are always those of the plain path.
"""

from __future__ import annotations

import collections
import logging
import re
from typing import TYPE_CHECKING, Any

from rlhf_pipeline.steps import join_steps

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

ANSWER_COLUMNS = ("completion", "chosen", "rejected")
_CHECKED_ROWS = 32  # rows of the first batch measured both ways
_PROBE = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]


def conversations(row: dict[str, Any]) -> tuple[list[list[dict[str, str]]], bool]:
    """The conversations whose lengths make a row's: prompt + each answer, or the prompt alone (with the
    generation prompt, as it will be answered)."""
    answers = [row[name] for name in ANSWER_COLUMNS if row.get(name) is not None]
    if row.get("steps") is not None:  # a stepwise row: its steps are one answer, a line each
        answers = [[{"role": "assistant", "content": join_steps(row["steps"])}]]
    return ([row["prompt"] + answer for answer in answers], True) if answers else ([row["prompt"]], False)


def plain_lengths(tokenizer: PreTrainedTokenizerBase, rows: list[dict[str, Any]]) -> list[int]:
    """The reference: `apply_chat_template(tokenize=True)`, a row's longest conversation."""
    lengths = []
    for row in rows:
        chats, with_answer = conversations(row)
        # return_dict=False: a BatchEncoding's len() is its number of keys (2), which filtered nothing
        lengths.append(max(len(tokenizer.apply_chat_template(chat, tokenize=True, return_dict=False,
                                                             add_generation_prompt=not with_answer))
                           for chat in chats))
    return lengths


class LengthMeter:
    """Counts the tokens of canonical rows in batches (picklable, so `datasets` can run it in workers)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self.backend = self._private_backend(tokenizer)
        cuts = self._cut_tokens(tokenizer) if self.backend is not None else []
        self.pieces = re.compile("(?=" + "|".join(map(re.escape, cuts)) + ")") if cuts else None
        self.known: dict[str, int] = {}  # the last batch's repeated pieces (a default system prompt) -> tokens
        self.checked = False

    @staticmethod
    def _private_backend(tokenizer: PreTrainedTokenizerBase) -> Any:
        """A copy of a fast tokenizer's Rust tokenizer, set as `__call__` sets it (no truncation, no padding)."""
        from tokenizers import Tokenizer

        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            return None
        copy = Tokenizer.from_str(backend.to_str())
        copy.no_truncation()
        copy.no_padding()
        copy.encode_special_tokens = bool(getattr(tokenizer, "split_special_tokens", False))
        return copy

    @staticmethod
    def _cut_tokens(tokenizer: PreTrainedTokenizerBase) -> list[str]:
        """Added tokens a rendering may be cut before: used by the chat template, matched on the raw text, and
        taking no whitespace or word boundary from their left (longest first, as a tokenizer matches them)."""
        rendered = tokenizer.apply_chat_template(_PROBE, tokenize=False)
        return sorted((token.content for token in tokenizer.added_tokens_decoder.values()
                       if token.content and token.content in rendered and not (token.lstrip or token.single_word or
                                                                                token.normalized)), key=len,
                      reverse=True)

    def __call__(self, rows: list[dict[str, Any]]) -> list[int]:
        if self.backend is None or not rows:
            return plain_lengths(self.tokenizer, rows)
        lengths = self._fast(rows)
        if not self.checked:
            self.checked = True
            sample = rows[:_CHECKED_ROWS]
            if plain_lengths(self.tokenizer, sample) != lengths[:len(sample)]:
                logger.info("data: token lengths measured row by row (this tokenizer cannot be measured in pieces)")
                self.backend = None
                return plain_lengths(self.tokenizer, rows)
        return lengths

    def _fast(self, rows: list[dict[str, Any]]) -> list[int]:
        texts = self._rendered(rows)
        split = [[[piece for piece in self.pieces.split(text) if piece] if self.pieces else [text] for text in row]
                 for row in texts]
        needed = collections.Counter(piece for row in split for text in row for piece in text)
        counts = {piece: self.known[piece] for piece in needed if piece in self.known}
        new = [piece for piece in needed if piece not in counts]
        if new:
            encoded = self.backend.encode_batch_fast(new, add_special_tokens=False)
            counts.update(zip(new, (len(encoding.ids) for encoding in encoded), strict=True))
        self.known = {piece: counts[piece] for piece, seen in needed.items() if seen > 1}  # likely to come again
        return [max(sum(counts[piece] for piece in text) for text in row) for row in split]

    def _rendered(self, rows: list[dict[str, Any]]) -> list[list[str]]:
        """Each row's conversations rendered as text, in two batched calls (with answers, and prompts alone)."""
        texts: list[list[str]] = [[] for _ in rows]
        for with_answer in (True, False):
            chats, owners = [], []
            for index, row in enumerate(rows):
                row_chats, answered = conversations(row)
                if answered == with_answer:
                    chats.extend(row_chats)
                    owners.extend([index] * len(row_chats))
            if chats:
                rendered = self.tokenizer.apply_chat_template(chats, tokenize=False,
                                                              add_generation_prompt=not with_answer)
                for owner, text in zip(owners, rendered, strict=True):
                    texts[owner].append(text)
        return texts
