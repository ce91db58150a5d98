"""Our SFT stage vs a bare `trl.SFTTrainer` script doing the same work: training wall time and peak memory.

    python benchmarks/overhead.py                 # 3 interleaved rounds of 6 optimizer steps each
    python benchmarks/overhead.py --steps 10 --repeats 5

Both sides train SmolLM2-135M-Instruct from the converted cache folder on the shipped demo SFT rows (as
prompt/completion pairs, loss on the answer), micro-batch 8, LoRA r=16 / alpha 32 / dropout 0.05 on all
linear layers, fp32, no activation checkpointing (the stage's CPU default; TRL's own default is on), the
same seed, learning rate and schedule, no checkpoints and no eval. "ours" runs
`rlhf_pipeline.stages.sft.run` on recipes/smollm2-135m/sft.yaml; "bare" is the twenty lines a user would
write with TRL alone. Each run is a fresh process; the training phase is `Trainer.train()`; memory is the
peak RSS during it minus the process baseline before any weights load. Target: ours/bare ≤ 1.03.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

RECIPE = common.REPO / "recipes" / "smollm2-135m" / "sft.yaml"
DATA = common.REPO / "data" / "demo" / "sft_demonstrations.jsonl"


def _ours(steps: int, work: Path) -> Any:
    from rlhf_pipeline.stages import load_recipe, sft

    # The bare script below is the plain TRL set-up: padded micro-batches of 8 and the chat template's own
    # system prompt (the demo recipe packs rows of 4 with an empty system turn).
    recipe = load_recipe(RECIPE, [f"training.output_dir={work / 'ours'}", f"training.max_steps={steps}",
                                  "training.save_strategy='no'", "data.eval_split=0.0", "training.packing=false",
                                  "training.per_device_train_batch_size=8", "data.system_prompt=null"])
    sft.run(recipe)


def _bare(steps: int, work: Path) -> Any:
    """What a user writes with TRL alone, mirroring the recipe's settings."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from rlhf_pipeline import embedded

    folder = embedded.materialise("smollm2-135m-instruct")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.pad_token = "<|endoftext|>"  # pad must differ from EOS (<|im_end|>), as the stage does
    tokenizer.padding_side = "right"
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    rows = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    dataset = Dataset.from_list([{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in rows])
    args = SFTConfig(output_dir=str(work / "bare"), max_steps=steps, per_device_train_batch_size=8,
                     gradient_accumulation_steps=1, learning_rate=2e-4, lr_scheduler_type="cosine", warmup_steps=0.05,
                     logging_steps=5, save_strategy="no", report_to="none", use_cpu=True, bf16=False,
                     max_length=128, completion_only_loss=True, eos_token=tokenizer.eos_token, seed=42,
                     activation_checkpointing=False)  # TRL's default is on; the stage turns it off on CPU
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=lora).train()


def child(mode: str, steps: int) -> dict[str, Any]:
    import transformers
    from trl import SFTTrainer

    base = common.baseline()
    window = common.TrainWindow()
    window.wrap(transformers.Trainer)
    tokens: list[int] = []
    original = SFTTrainer.compute_loss

    def compute_loss(self: Any, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        tokens.append(int(inputs["attention_mask"].sum()))
        return original(self, model, inputs, *args, **kwargs)

    SFTTrainer.compute_loss = compute_loss
    with tempfile.TemporaryDirectory(prefix=f"overhead-{mode}-") as tmp:
        (_ours if mode == "ours" else _bare)(steps, Path(tmp))
    return {"train_seconds": window.seconds, "train_cpu_seconds": window.cpu_seconds,
            "peak_mib": (window.peak - base) / common.MB,
            "start_mib": (window.start_rss - base) / common.MB,
            "tokens": sum(tokens), "steps": len(tokens)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per side (median)")
    parser.add_argument("--child", choices=("ours", "bare"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        common.emit(child(args.child, args.steps))
        return 0
    info = common.machine()
    print(f"overhead: {args.repeats} × (ours, bare), {args.steps} steps each, {common.threads()} torch thread(s)")
    results = common.interleaved(("ours", "bare"), args.repeats, lambda mode: common.run_child(
        Path(__file__), ["--child", mode, "--steps", str(args.steps)]))
    same_work = {m: {r["tokens"] for r in results[m]} for m in results}
    t_ours, t_bare = common.median(results["ours"], "train_seconds"), common.median(results["bare"], "train_seconds")
    c_ours, c_bare = (common.median(results[m], "train_cpu_seconds") for m in ("ours", "bare"))
    m_ours, m_bare = common.median(results["ours"], "peak_mib"), common.median(results["bare"], "peak_mib")
    lines = [
        f"tokens trained per run: ours {sorted(same_work['ours'])}, bare {sorted(same_work['bare'])}",
        f"training wall time (median): ours {t_ours:.1f} s, bare {t_bare:.1f} s -> ratio {t_ours / t_bare:.3f} "
        f"(target <= 1.03)",
        f"training CPU time (median; = wall time on an idle core with 1 thread): ours {c_ours:.1f} s, bare "
        f"{c_bare:.1f} s -> ratio {c_ours / c_bare:.3f}",
        f"peak memory over baseline (median): ours {m_ours:.0f} MiB, bare {m_bare:.0f} MiB -> ratio "
        f"{m_ours / m_bare:.3f} (target <= 1.03)",
        "per run (wall s, CPU s, peak MiB): " + json.dumps({m: [(round(r["train_seconds"], 1),
                                                                 round(r["train_cpu_seconds"], 1),
                                                                 round(r["peak_mib"])) for r in rs]
                                                             for m, rs in results.items()}),
    ]
    common.report("overhead.py: our SFT stage vs bare trl.SFTTrainer (SmolLM2-135M, LoRA r=16)", info, lines,
                  os.getloadavg())
    return 0


if __name__ == "__main__":
    sys.exit(main())
