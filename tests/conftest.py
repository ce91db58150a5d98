"""Shared test setup: offline Hugging Face libraries, the ``slow`` marker, a tiny local model, and
finished stages on it under a Hub id (for the card, push and merge tests).

The tiny model is built from scratch in well under two seconds, so every stage can be exercised
end to end without the Hub and without the 135M embedded model. Its tokenizer deliberately copies
SmolLM2's quirks (ChatML, a default system prompt, eos == pad == ``<|im_end|>``) so tests meet the
same traps the real default model sets.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

    from tests.hub_stages import Stages

# Set before any Hugging Face library is imported (they read these once): tests never reach the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 0, 1, 2, as in SmolLM2
TINY_VOCAB_SIZE = 400

# ChatML like SmolLM2's template, including its habit of adding a system turn when there is none.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Everyday English, enough for a few hundred BPE merges; written for these tests.
TINY_CORPUS = """\
The sun rises in the morning and sets in the evening.
I like to drink a cup of tea before I start work.
She walked the dog to the park after breakfast.
We bought bread, milk, apples and cheese at the market.
The train to the city leaves at nine o'clock.
Please close the window because it is cold outside.
My brother plays football with his friends on Saturday.
The children are reading books in the library.
Can you help me carry these boxes upstairs?
It rained all day, so we stayed at home and cooked soup.
The capital of France is Paris, and the capital of Italy is Rome.
He forgot his umbrella on the bus yesterday.
Thank you for the lovely dinner, it was delicious.
The teacher asked the students to write a short story.
Our neighbours have a small garden with red flowers.
I will call you when I arrive at the station.
The cat is sleeping on the warm chair by the fire.
Water boils at one hundred degrees.
They are planning a trip to the mountains next summer.
Turn left at the bakery and the post office is on your right.
A good answer is short, clear and polite.
What time is it? It is half past three in the afternoon.
How are you today? I am fine, thank you, and how are you?
The shop opens at eight and closes at six every weekday.
She sent a letter to her grandmother last week.
Remember to wash your hands before you eat.
The river flows through the old town towards the sea.
We watched a funny film and laughed a lot.
My phone battery is low, so I need to charge it.
The weather will be sunny with a light wind tomorrow.
"""


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: real embedded model or minutes of CPU; --runslow or RUN_SLOW=1")
    config.addinivalue_line("markers", "vllm: needs vLLM in this process (`make test` runs them in .venv-vllm)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip slow tests by default so the everyday suite stays quick on two CPU cores; skip vLLM tests, saying why,
    where vLLM is not installed."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        no_vllm = pytest.mark.skip(reason="vllm is not installed in this environment; `make test` runs these tests "
                                   "in .venv-vllm (make vllm-env), GPU machines install the vllm extra")
        for item in items:
            if item.get_closest_marker("vllm") is not None:
                item.add_marker(no_vllm)
    if config.getoption("--runslow") or os.environ.get("RUN_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: use --runslow or RUN_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def _build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on TINY_CORPUS, wrapped like a Hub tokenizer (lazy imports: fast collection)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(TINY_CORPUS.splitlines(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",  # pad == eos on purpose: mirrors SmolLM2, exercises the pad-token policy
        unk_token="<|endoftext|>",
        model_max_length=512,
    )
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


def build_tiny_model(folder: Path, hidden_size: int = 64, num_attention_heads: int = 4,
                     num_key_value_heads: int = 2) -> Path:
    """Save a seeded random 2-layer Llama and its tokenizer into ``folder``; the same bytes every time.

    vLLM's CPU attention takes head sizes of 32 and up: its tests build hidden 128 with 2 heads (head size 64).
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _build_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session", autouse=True)
def data_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Converted data cards go to a folder of this session, not the user's cache (child processes inherit it)."""
    folder = tmp_path_factory.mktemp("data-cache")
    previous = os.environ.get("RLHF_PIPELINE_DATA_CACHE")
    os.environ["RLHF_PIPELINE_DATA_CACHE"] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop("RLHF_PIPELINE_DATA_CACHE", None)
    else:
        os.environ["RLHF_PIPELINE_DATA_CACHE"] = previous


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder with the tiny model and tokenizer, loadable like any local model; built once per session."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def hub_cache_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """A fake Hugging Face cache holding the tiny model as test-org/tiny-llama (see tests/hub_stages.py)."""
    from tests.hub_stages import build_hub_cache

    return build_hub_cache(tmp_path_factory.mktemp("hf-cache"), tiny_model_dir)


@pytest.fixture(scope="module")
def hub_cache(hub_cache_dir: Path) -> Iterator[Path]:
    """The fake cache switched on for one test module (switched off after it, so no other module sees it)."""
    from tests.hub_stages import using_hub_cache

    with using_hub_cache(hub_cache_dir):
        yield hub_cache_dir


@pytest.fixture(scope="session")
def hub_stages(tmp_path_factory: pytest.TempPathFactory, hub_cache_dir: Path) -> Stages:
    """Finished SFT stages on the Hub-named base, built once for the card, push and merge tests."""
    from tests.hub_stages import build_stages, using_hub_cache

    with using_hub_cache(hub_cache_dir):
        return build_stages(tmp_path_factory.mktemp("hub-stages"))


@pytest.fixture(scope="session")
def hub_reward_model(hub_stages: Stages, hub_cache_dir: Path) -> Path:
    """A finished reward model on top of `hub_stages.sft`: its card's snippet and its merge are tested."""
    from tests.hub_stages import build_reward_model, using_hub_cache

    with using_hub_cache(hub_cache_dir):
        return build_reward_model(hub_stages)
