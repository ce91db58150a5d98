"""The SFT stage on the tiny model: answer-only labels, training, saved outputs, resume, skip."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf_pipeline.cli import main
from rlhf_pipeline.stages import load_recipe, sft
from tests.stages.conftest import sft_rows, write_card


def test_labels_mask_exactly_the_prompt_and_keep_end_of_turn(make_recipe, tmp_path: Path) -> None:
    from trl import SFTConfig, SFTTrainer

    from rlhf_pipeline.data.loading import load_datasets
    from rlhf_pipeline.stages.common import load_for_training, trainer_config

    write_card(tmp_path, "chat", sft_rows(8), "messages", ["sft"])
    recipe = load_recipe(make_recipe("sft", ["chat"]))
    loaded = load_for_training(recipe)
    tokenizer = loaded.tokenizer
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    datasets, _ = load_datasets(recipe, tokenizer)
    args = trainer_config(SFTConfig, recipe, max_length=128, completion_only_loss=True,
                          eos_token=tokenizer.eos_token)
    trainer = SFTTrainer(model=loaded.model, args=args, train_dataset=datasets["train"],
                         processing_class=tokenizer)
    example = trainer.train_dataset[0]
    prompt_ids = tokenizer.apply_chat_template(example["prompt"], add_generation_prompt=True, tokenize=True)
    prompt_ids = list(prompt_ids["input_ids"] if hasattr(prompt_ids, "keys") else prompt_ids)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    labels, ids = batch["labels"][0].tolist(), batch["input_ids"][0].tolist()
    length = len(example["input_ids"])
    assert ids[: len(prompt_ids)] == prompt_ids
    assert labels[: len(prompt_ids)] == [-100] * len(prompt_ids)
    answer = labels[len(prompt_ids) : length]
    assert -100 not in answer
    assert tokenizer.eos_token_id in answer  # <|im_end|> closes the answer and is learned
    assert answer == ids[len(prompt_ids) : length]
    assert all(label == -100 for label in labels[length:])  # padding never counts


def test_sft_trains_saves_resumes_and_skips(make_recipe, tmp_path: Path, tiny_model_dir: Path, capsys) -> None:
    write_card(tmp_path, "chat", sft_rows(48), "messages", ["sft"])
    path = make_recipe("sft", ["chat"], training={"num_train_epochs": 2})
    recipe = load_recipe(path)
    metrics = sft.run(recipe)
    assert metrics["eval_loss"] < metrics["eval_loss_before"]
    assert metrics["perplexity"] < metrics["perplexity_before"]
    assert metrics["data"]["rows_kept"] == 48

    out = recipe.output_dir
    manifest = json.loads((out / "stage.json").read_text())
    assert manifest["stage"] == "sft" and manifest["adapter"] is True
    assert (out / "adapter_model.safetensors").is_file() and (out / "recipe.yaml").is_file()
    assert json.loads((out / "metrics.json").read_text())["eval_loss"] == metrics["eval_loss"]

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(out)
    tuned = PeftModel.from_pretrained(base, out)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Tell me about the park."}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    generated = tuned.generate(**prompt, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(generated[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert answer.strip()

    assert main(["sft", str(path)]) == 0
    assert "already finished" in capsys.readouterr().out


def test_sft_resumes_from_last_checkpoint(make_recipe, tmp_path: Path) -> None:
    write_card(tmp_path, "chat", sft_rows(48), "messages", ["sft"])
    recipe = load_recipe(make_recipe("sft", ["chat"], training={"max_steps": 2}))
    sft.run(recipe)
    (recipe.output_dir / "stage.json").unlink()  # as if killed after its checkpoint at step 2
    longer = load_recipe(make_recipe("sft", ["chat"], training={"max_steps": 4}))
    metrics = sft.run(longer)
    assert metrics["resumed_from"].endswith("checkpoint-2")
    assert metrics["global_steps"] == 4
    assert torch.isfinite(torch.tensor(metrics["eval_loss"]))


def test_sft_trains_on_a_stream_and_reports_what_it_read(make_recipe, tmp_path: Path) -> None:
    """`data.streaming`: SFTTrainer gets an IterableDataset; metrics.json counts the rows training read."""
    rows = sft_rows(40)
    write_card(tmp_path, "chat", [*rows[:20], {"messages": "not a conversation"}, *rows[20:]], "messages", ["sft"])
    write_card(tmp_path, "held", sft_rows(48)[44:], "messages", ["sft"])  # prompts training also has
    recipe = load_recipe(make_recipe("sft", ["chat"], {"max_steps": 3, "per_device_train_batch_size": 4},
                                     data={"train": ["chat"], "eval": ["held"], "eval_overlap": "drop",
                                           "streaming": True, "shuffle_buffer": 8, "max_length": 128}))
    metrics = sft.run(recipe)
    data = metrics["data"]
    assert metrics["global_steps"] == 3 and metrics["eval_loss"] is not None
    assert data["rows_dropped"]["wrong_type"] == 1 and data["first_dropped"]["wrong_type"] == ["chat:line 21"]
    assert data["rows_dropped"]["eval_prompt"] > 0 and data["eval_prompts_in_train"] > 0
    # 3 steps of 4 rows through a shuffle buffer of 8 read part of the card: what was read is what is counted
    assert 3 * 4 + 8 <= data["rows_read"] <= 41
    assert data["rows_kept"] + sum(data["rows_dropped"].values()) == data["rows_read"]
    assert data["splits"]["eval"] == {"rows": 4, "prompts": 4}
    saved = json.loads((recipe.output_dir / "metrics.json").read_text())
    assert saved["data"] == data
