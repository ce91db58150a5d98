"""Model configs and recipes for the estimator's tests: a Hub cache holding only a config.json, an SFT recipe."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
SMOLLM2 = {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9,
           "num_hidden_layers": 30, "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152,
           "tie_word_embeddings": True}
LLAMA2_7B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32,
             "num_hidden_layers": 32, "num_key_value_heads": 32, "vocab_size": 32000, "tie_word_embeddings": False}
LLAMA31_8B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
              "num_key_value_heads": 8, "num_hidden_layers": 32, "vocab_size": 128256, "tie_word_embeddings": False,
              "torch_dtype": "bfloat16"}


def hub_cache(root: Path, repo_id: str, config: dict) -> Path:
    """A Hugging Face cache holding only `config.json` of repo_id (what the estimator reads)."""
    folder = root / f"models--{repo_id.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0" * 40)
    snapshot = folder / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps(config))
    return root


def sft_recipe(folder: Path, model: str, training: dict | None = None, **model_keys: object) -> Path:
    recipe = {
        "stage": "sft",
        "model": {"name_or_path": model, "lora": {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05}, **model_keys},
        "data": {"train": [str(REPO / "data_cards" / "demo_sft.yaml")], "eval_split": 0.0, "max_length": 1024},
        "training": {"output_dir": str(folder / "out"), "per_device_train_batch_size": 4,
                     "gradient_accumulation_steps": 4, **(training or {})},
    }
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path
