"""Our PPO stage vs TRL 1.12's `trl.experimental.ppo.PPOTrainer` on the same SmolLM2 setup: s/update and memory.

    python benchmarks/ppo_vs_trl112.py                    # installs trl==1.12.0 into /tmp/trl112 if needed
    python benchmarks/ppo_vs_trl112.py --work /tmp/stages --steps 3 --repeats 3

TRL 1.12 is never a dependency: it is installed with `pip install --no-deps --target /tmp/trl112 trl==1.12.0`
and put first on sys.path of its child process only. Both sides start from the same small finished SFT and
RM stages (benchmarks/common.py) and answer the same demo prompts (chat-templated ids), with the demo PPO
recipe's settings, read from recipes/smollm2-135m/ppo.yaml for both sides (our knob names are TRL's: batch
sizes, mini-batches, PPO epochs, answer length, temperature, stop token and missing-EOS penalty, KL
coefficient and estimator, clip ranges, vf_coef, γ, λ, learning rate and schedule), LoRA r=16 / alpha 32 on
all linear layers of the policy, fp32, one torch thread.

The designs differ where the memory goes: TRL 1.12 takes the reward model and a full value model (a second
sequence-classification copy, trained entirely, so in the optimizer) besides the policy (its reference is
the policy with the adapter off); ours holds one copy of the base with the four roles as adapters on it
(ppo/roles.py). Seconds per update = training-phase wall time / updates; memory = peak RSS during training −
the process baseline. Targets: ours/TRL ≤ 0.8 for time, ≤ 0.5 for memory.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

TRL112 = Path(os.environ.get("TRL112_DIR", "/tmp/trl112"))
RECIPE = common.REPO / "recipes" / "smollm2-135m" / "ppo.yaml"
# Recipe keys that mean the same in TRL 1.12's PPOConfig (ours kept its names), passed to it unchanged. Not
# gradient_accumulation_steps: TRL 1.12's rollout is per_device × accumulation, split into num_mini_batches;
# ours is per_device × accumulation × num_mini_batches (ppo/config.py), so TRL gets accumulation × mini-batches.
SHARED_KNOBS = ("per_device_train_batch_size", "num_mini_batches", "num_ppo_epochs",
                "response_length", "temperature", "stop_token", "missing_eos_penalty", "kl_coef", "kl_estimator",
                "cliprange", "cliprange_value", "vf_coef", "gamma", "lam", "learning_rate", "lr_scheduler_type",
                "local_rollout_forward_batch_size", "seed")


def install_trl112() -> None:
    if (TRL112 / "trl" / "experimental" / "ppo" / "ppo_trainer.py").is_file():
        return
    print(f"installing trl==1.12.0 into {TRL112} (--no-deps, side directory)", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(TRL112), "trl==1.12.0"],
                   check=True, capture_output=True, text=True)


def _ours(work: Path, steps: int, out: Path) -> int:
    from rlhf_pipeline.stages import get_stage, load_recipe

    recipe = load_recipe(RECIPE, [f"model.name_or_path={work / 'sft'}", f"training.reward_model_path={work / 'rm'}",
                                  f"training.output_dir={out}", f"training.total_episodes={16 * steps}",
                                  "training.save_steps=1000", "training.num_sample_generations=0"])
    get_stage("ppo").run(recipe)
    return steps


def _trl112(work: Path, steps: int, out: Path) -> int:
    """TRL 1.12's PPO with the same models, prompts and knobs."""
    import dataclasses

    from datasets import Dataset
    from peft import LoraConfig
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    from rlhf_pipeline.chat import encode_prompt
    from rlhf_pipeline.models import REWARD, load_base, load_tokenizer, merged_model
    from rlhf_pipeline.sources import resolve_source
    from rlhf_pipeline.stages import load_recipe

    recipe = load_recipe(RECIPE, [f"model.name_or_path={work / 'sft'}", f"training.reward_model_path={work / 'rm'}"])
    ours = recipe.settings
    spec = dataclasses.replace(recipe.model, lora=None)
    source = resolve_source(spec, progress=lambda _: None)
    tokenizer = load_tokenizer(source, spec)
    policy = merged_model(load_base(source, spec, tokenizer), source.adapter)  # the SFT model, merged in fp32
    rm_spec = dataclasses.replace(spec, name_or_path=str(work / "rm"))
    rm_source = resolve_source(rm_spec, progress=lambda _: None)

    def reward_model() -> Any:  # the RM adapter and its score head, merged in fp32
        return merged_model(load_base(rm_source, rm_spec, tokenizer, task=REWARD), rm_source.adapter)

    reward = reward_model()
    value = reward_model()  # TRL trains a full copy as the critic
    value.requires_grad_(True)  # merging the RM adapter leaves every weight frozen; TRL's critic trains them all
    rows = [json.loads(line) for line in (common.REPO / "data" / "demo" / "ppo_prompts.jsonl").read_text().splitlines()
            if line.strip()]
    prompts = [encode_prompt(tokenizer, [{"role": "user", "content": row["prompt"]}]) for row in rows]
    tokenizer.padding_side = "left"
    config = PPOConfig(
        output_dir=str(out), total_episodes=16 * steps, num_sample_generations=0, save_strategy="no",
        report_to="none", use_cpu=True, bf16=False, logging_steps=1, sft_model_path=str(work / "sft"),
        reward_model_path=str(work / "rm"),
        gradient_checkpointing=False,  # its default is True but its PPO loop never enables it; say so explicitly
        gradient_accumulation_steps=ours.gradient_accumulation_steps * ours.num_mini_batches,
        **{knob: recipe.config[knob] for knob in SHARED_KNOBS if knob in recipe.config},
    )
    assert config.per_device_train_batch_size * config.gradient_accumulation_steps == ours.rollout_batch_size
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = PPOTrainer(args=config, processing_class=tokenizer, model=policy, ref_model=None, reward_model=reward,
                         train_dataset=Dataset.from_dict({"input_ids": prompts}), value_model=value,
                         peft_config=lora)
    trainer.train()
    return trainer.state.global_step


def child(mode: str, work: Path, steps: int) -> dict[str, Any]:
    if mode == "trl112":
        sys.path.insert(0, str(TRL112))
        import trl

        assert trl.__version__ == "1.12.0", trl.__version__
        import trl.experimental.ppo
        from trl.experimental.ppo import PPOTrainer as owner
    else:
        from rlhf_pipeline.ppo.trainer import PPOTrainer as owner
    base = common.baseline()
    window = common.TrainWindow()
    window.wrap(owner)
    with tempfile.TemporaryDirectory(prefix=f"ppo-vs-{mode}-") as tmp:
        updates = (_ours if mode == "ours" else _trl112)(work, steps, Path(tmp) / "out")
    return {"seconds_per_update": window.seconds / updates, "cpu_seconds_per_update": window.cpu_seconds / updates,
            "peak_mib": (window.peak - base) / common.MB, "updates": float(updates)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2, help="PPO updates per run")
    parser.add_argument("--work", type=Path)
    parser.add_argument("--child", choices=("ours", "trl112"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        common.emit(child(args.child, args.work, args.steps))
        return 0
    install_trl112()
    info = common.machine()
    with tempfile.TemporaryDirectory(prefix="ppo-vs-trl112-") as tmp:
        work = args.work or Path(tmp)
        common.prepare_stages(work)
        print(f"ppo_vs_trl112: {args.repeats} × (ours, trl112), {args.steps} updates each, "
              f"{common.threads()} torch thread(s)", flush=True)
        results = common.interleaved(("ours", "trl112"), args.repeats, lambda mode: common.run_child(
            Path(__file__), ["--child", mode, "--work", str(work), "--steps", str(args.steps)]))
    t_ours, t_trl = (common.median(results[m], "seconds_per_update") for m in ("ours", "trl112"))
    c_ours, c_trl = (common.median(results[m], "cpu_seconds_per_update") for m in ("ours", "trl112"))
    m_ours, m_trl = (common.median(results[m], "peak_mib") for m in ("ours", "trl112"))
    lines = [
        f"seconds per update (median): ours {t_ours:.1f}, TRL 1.12 {t_trl:.1f} -> ours/TRL {t_ours / t_trl:.2f} "
        "(target <= 0.8)",
        f"CPU seconds per update (median; = wall time on an idle core with 1 thread): ours {c_ours:.1f}, TRL 1.12 "
        f"{c_trl:.1f} -> ours/TRL {c_ours / c_trl:.2f}",
        f"peak memory over baseline (median): ours {m_ours:.0f} MiB, TRL 1.12 {m_trl:.0f} MiB -> ours/TRL "
        f"{m_ours / m_trl:.2f} (target <= 0.5)",
        "per run (s/update, CPU s/update, peak MiB): " + json.dumps(
            {m: [(round(r["seconds_per_update"], 1), round(r["cpu_seconds_per_update"], 1), round(r["peak_mib"]))
                 for r in rs] for m, rs in results.items()}),
    ]
    common.report("ppo_vs_trl112.py: our PPO vs TRL 1.12 experimental PPOTrainer (SmolLM2-135M)", info, lines,
                  os.getloadavg())
    return 0


if __name__ == "__main__":
    sys.exit(main())
