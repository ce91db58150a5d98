"""The tiny model fixture must look like SmolLM2 from the outside, or tests built on it prove nothing."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from tests.conftest import build_tiny_model


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_special_tokens_mirror_smollm2(tokenizer: PreTrainedTokenizerBase) -> None:
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]
    assert tokenizer.bos_token == "<|im_start|>"
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>"
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == 2
    assert 300 <= len(tokenizer) <= 500


def test_special_tokens_are_single_ids_and_text_round_trips(tokenizer: PreTrainedTokenizerBase) -> None:
    text = "<|im_start|>user\nThe cat is sleeping by the fire.<|im_end|>"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == 1 and ids[-1] == 2
    assert tokenizer.decode(ids) == text


def test_chat_template_renders_chatml_with_default_system_turn(tokenizer: PreTrainedTokenizerBase) -> None:
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}], tokenize=False
    )
    assert rendered == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello<|im_end|>\n"
    )
    prompt = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert prompt == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_model_reloads_runs_and_generates(tiny_model_dir: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    assert (tiny_model_dir / "model.safetensors").is_file()
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert model.config.eos_token_id == model.config.pad_token_id == 2
    assert model.config.bos_token_id == 1
    assert model.config.vocab_size == len(tokenizer)
    assert model.get_input_embeddings().weight.data_ptr() == model.get_output_embeddings().weight.data_ptr()

    texts = ["The sun rises.", "We bought bread and milk at the market."]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (*batch["input_ids"].shape, len(tokenizer))
    assert torch.isfinite(logits).all()

    prompt = tokenizer("Hello", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert 0 < generated.shape[1] - prompt["input_ids"].shape[1] <= 4


def test_rebuild_is_fast_and_identical(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Every session builds it, so it must stay cheap; the fixed seed makes runs comparable."""
    started = time.perf_counter()
    again = build_tiny_model(tmp_path)
    assert time.perf_counter() - started < 2.0
    first = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    second = AutoModelForCausalLM.from_pretrained(again).state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert (again / "tokenizer.json").read_text() == (tiny_model_dir / "tokenizer.json").read_text()
