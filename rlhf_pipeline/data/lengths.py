"""Token lengths of canonical rows as `apply_chat_template` counts them, measured without its per-row cost.

Measuring is most of a card's first load: every conversation is rendered with the chat template and
tokenised. Two things make it cheaper without changing a count:

- a batch of rows is rendered in one call and tokenised in one call of the Rust tokenizer, which counts
  tokens without building the offsets and Python lists `apply_chat_template(tokenize=True)` returns;
- the answers of a pair share their prompt, so the text their renderings have in common is tokenised once.
  A rendering is cut only where an added token that strips nothing begins (the chat template's
  `<|im_start|>`): a Hugging Face tokenizer splits its input at added tokens before normalising and
  pre-tokenising, so the two pieces are tokenised exactly as they are inside the whole text.

A meter checks itself on its first batch against `apply_chat_template(tokenize=True)`, and measures the plain
way for good if any count differs (a tokenizer whose added tokens behave otherwise), so the counts, and the
rows dropped as too long, are always those of the plain path.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

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


def _common_prefix(texts: list[str]) -> int:
    """Length of the longest prefix all texts share (a binary search over C-speed slice comparisons)."""
    first, low, high = texts[0], 0, min(map(len, texts))
    while low < high:
        middle = (low + high + 1) // 2
        if all(text.startswith(first[:middle]) for text in texts[1:]):
            low = middle
        else:
            high = middle - 1
    return low


class LengthMeter:
    """Counts the tokens of canonical rows in batches (picklable, so `datasets` can run it in workers)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self.backend = self._private_backend(tokenizer)
        self.cuts = self._cut_tokens(tokenizer) if self.backend is not None else []
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
        taking no whitespace or word boundary from their left."""
        rendered = tokenizer.apply_chat_template(_PROBE, tokenize=False)
        return [token.content for token in tokenizer.added_tokens_decoder.values()
                if token.content and token.content in rendered and not (token.lstrip or token.single_word or
                                                                         token.normalized)]

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
        pieces: list[str] = []
        plan: list[tuple[int | None, list[int]]] = []  # per row: its shared piece, and its answers' pieces
        texts = self._rendered(rows)
        for row_texts in texts:
            shared = self._cut(row_texts) if len(row_texts) > 1 else 0
            head = None
            if shared:
                head = len(pieces)
                pieces.append(row_texts[0][:shared])
            plan.append((head, list(range(len(pieces), len(pieces) + len(row_texts)))))
            pieces.extend(text[shared:] for text in row_texts)
        counts = [len(encoding.ids) for encoding in self.backend.encode_batch_fast(pieces, add_special_tokens=False)]
        return [(counts[head] if head is not None else 0) + max(counts[index] for index in tails)
                for head, tails in plan]

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

    def _cut(self, texts: list[str]) -> int:
        """Where the texts of one row may be cut so that the part before is theirs in common: the last start of a
        cut token inside their common prefix, at which every text has a cut token (0: nowhere)."""
        common = _common_prefix(texts)
        best = 0
        for token in self.cuts:
            start = texts[0].rfind(token, 0, common + len(token))
            if best < start <= common and all(any(text.startswith(cut, start) for cut in self.cuts) for text in texts):
                best = start
        return best
