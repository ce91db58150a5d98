"""Secrets stay secret and loading runs no foreign code: remote code and pickle weights only when the recipe
asks, credentials only from the environment, and never written to a log, report, recipe or model card."""

from __future__ import annotations

import dataclasses
import logging
import secrets
import shutil
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from rlhf_pipeline.cli import main
from rlhf_pipeline.errors import PipelineError, RecipeError
from rlhf_pipeline.models import load_base, load_tokenizer
from rlhf_pipeline.recipe import ModelSpec
from rlhf_pipeline.schema import build_section
from rlhf_pipeline.sources import resolve_source
from rlhf_pipeline.stages import load_recipe
from tests.stages.conftest import sft_rows, write_card

REPO = Path(__file__).resolve().parents[1]


def _spec(model_dir: Path, **extra: Any) -> ModelSpec:
    return build_section(ModelSpec, {"name_or_path": str(model_dir), **extra}, Path("recipe.yaml"), "model")


def _load(spec: ModelSpec) -> tuple[Any, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        source = resolve_source(spec, progress=lambda _: None)
        model = load_base(source, spec, load_tokenizer(source, spec))
    return model, [str(w.message) for w in caught]


def test_remote_code_is_off_unless_asked_and_then_warned(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for shipped in sorted((REPO / "recipes").rglob("*.yaml")):
        assert "trust_remote_code: true" not in shipped.read_text()
    default = _spec(tiny_model_dir)
    assert default.trust_remote_code is False

    seen: list[dict[str, Any]] = []
    for cls in (AutoModelForCausalLM, AutoTokenizer):
        real = cls.from_pretrained

        def spy(*args: Any, _real: Any = real, **kwargs: Any) -> Any:
            seen.append(kwargs)
            return _real(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    _, messages = _load(default)
    assert [kwargs["trust_remote_code"] for kwargs in seen] == [False, False]  # tokenizer and model
    assert not any("trust_remote_code" in m for m in messages)

    seen.clear()
    _, messages = _load(_spec(tiny_model_dir, trust_remote_code=True))
    assert [kwargs["trust_remote_code"] for kwargs in seen] == [True, True]
    assert f"trust_remote_code is on: code from {tiny_model_dir} runs on this machine" in messages


@pytest.fixture
def pickle_only_model(tiny_model_dir: Path, tmp_path: Path) -> Path:
    """The tiny model with its weights as pytorch_model.bin (a pickle) and no safetensors file."""
    folder = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    from safetensors.torch import load_file

    torch.save(load_file(tiny_model_dir / "model.safetensors"), folder / "pytorch_model.bin")
    return folder


def test_pickle_weights_need_allow_unsafe_weights(pickle_only_model: Path) -> None:
    with pytest.raises(PipelineError) as info:
        _load(_spec(pickle_only_model))
    message = str(info.value)
    assert message.startswith(f"model.allow_unsafe_weights: {pickle_only_model} has no safetensors weights "
                              "(found pytorch_model.bin); pickle weights can run code")
    assert "set model.allow_unsafe_weights: true if you trust the source" in message

    model, _ = _load(_spec(pickle_only_model, allow_unsafe_weights=True))
    assert model.get_input_embeddings().weight.shape[0] >= 400


@pytest.mark.parametrize(("where", "key"), [
    (("hub",), "token"),
    (("hub",), "hf_token"),
    (("hub",), "HF_TOKEN"),
    (("hub",), "hfToken"),
    (("hub",), "HF-Token"),
    (("training",), "hub_token"),
    (("training",), "wandb_api_key"),
    (("training",), "WANDB_API_KEY"),
    (("training",), "wandbApiKey"),
    (("model",), "apikey"),
    (("model",), "access_token"),
    (("model",), "auth_token"),
    (("data", "extra", "deeper"), "password"),
    (("judge",), "client_secret"),
    (("judge",), "secretKey"),
    (("model",), "aws_secret_access_key"),
    (("model",), "private_key"),
])
def test_secret_looking_keys_are_refused(tmp_path: Path, where: tuple[str, ...], key: str) -> None:
    data = yaml.safe_load((REPO / "recipes" / "smollm2-135m" / "sft.yaml").read_text())
    data["data"]["train"] = [str(REPO / "data_cards" / "demo_sft.yaml")]
    target = data
    for section in where:
        target = target.setdefault(section, {})
    value = "hf_" + secrets.token_hex(17)
    target[key] = value
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    message = str(info.value)
    assert message.startswith(f"{path}: {'.'.join(where)}.{key}: looks like a secret")
    assert "HF_TOKEN" in message and "WANDB_API_KEY" in message  # where it belongs instead
    assert value not in message


def test_secrets_inside_lists_are_found(tmp_path: Path) -> None:
    data = yaml.safe_load((REPO / "recipes" / "smollm2-135m" / "sft.yaml").read_text())
    data["training"]["report_to"] = [{"name": "wandb", "api_key": "abc"}]
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(RecipeError, match=r": training\.report_to\[0\]\.api_key: looks like a secret"):
        load_recipe(path)


def test_special_token_keys_are_not_secrets(tmp_path: Path) -> None:
    ppo = yaml.safe_load((REPO / "recipes" / "smollm2-135m" / "ppo.yaml").read_text())
    ppo["data"]["train"] = [str(REPO / "data_cards" / "demo_ppo_prompts.yaml")]
    ppo["training"].update(reward_model_path=str(tmp_path / "rm"), stop_token="eos", stop_token_id=2)
    path = tmp_path / "ppo.yaml"
    path.write_text(yaml.safe_dump(ppo))
    assert load_recipe(path).config["stop_token_id"] == 2

    sft = yaml.safe_load((REPO / "recipes" / "smollm2-135m" / "sft.yaml").read_text())
    sft["data"]["train"] = [str(REPO / "data_cards" / "demo_sft.yaml")]
    sft["training"].update(pad_token="<|pad|>", eos_token="<|im_end|>")  # SFTConfig's own fields
    path.write_text(yaml.safe_dump(sft))
    assert load_recipe(path).config["pad_token"] == "<|pad|>"
    sft["model"]["pad_token"] = "<|pad|>"  # not a model key: refused as unknown, not as a secret
    path.write_text(yaml.safe_dump(sft))
    with pytest.raises(RecipeError, match=r"model\.pad_token: unknown key"):
        load_recipe(path)


def test_tokens_in_the_environment_never_reach_outputs(tmp_path: Path, tiny_model_dir: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       capfd: pytest.CaptureFixture[str],
                                                       caplog: pytest.LogCaptureFixture) -> None:
    planted = {"HF_TOKEN": "hf_" + secrets.token_hex(17), "HUGGING_FACE_HUB_TOKEN": "hf_" + secrets.token_hex(17),
               "WANDB_API_KEY": secrets.token_hex(20)}
    for name, value in planted.items():
        monkeypatch.setenv(name, value)
    write_card(tmp_path, "chat", sft_rows(16), "messages", ["sft"])
    recipe = {"stage": "sft", "model": {"name_or_path": str(tiny_model_dir), "lora": {"r": 4, "lora_alpha": 8}},
              "data": {"train": ["chat"], "eval_split": 0.25, "max_length": 96},
              "training": {"output_dir": str(tmp_path / "outputs" / "sft"), "max_steps": 2, "save_steps": 1,
                           "per_device_train_batch_size": 4, "logging_steps": 1, "eval_strategy": "no"},
              "hub": {"push": False, "repo_id": "me/tiny-sft"}}
    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump(recipe))
    caplog.set_level(logging.DEBUG)
    assert main(["sft", str(path)]) == 0
    captured = capfd.readouterr()

    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    names = {p.name for p in written}
    assert {"stage.json", "recipe.yaml", "metrics.json", "README.md", "adapter_config.json",
            "trainer_state.json", "training_args.bin"} <= names  # model card, saved recipe, checkpoints...
    for value in planted.values():
        for file in written:
            assert value.encode() not in file.read_bytes(), f"{value[:6]}... found in {file}"
        for text in (captured.out, captured.err, caplog.text):
            assert value not in text
    assert dataclasses.asdict(load_recipe(path).hub) == yaml.safe_load(
        (tmp_path / "outputs" / "sft" / "recipe.yaml").read_text())["hub"]
