"""Every training stage under real multi-process launches on the CPU: DDP, two "nodes", DeepSpeed ZeRO-2/3.

Each test starts `accelerate launch` with a shipped profile from accelerate_configs/ (2 processes) on the
tiny model. How many processes ran is never taken from the command line: the stages record what the ranks
saw (`world_size`, `ranks` gathered from every process, `distributed_type`, `zero_stage`) in metrics.json.
The DeepSpeed runs go through tests/launch_probe.py, which also saves the in-memory trained model's logits
on rank 0, so the saved adapter can be checked against the model that was actually trained. The stages seed
before loading, so DDP, two "nodes", ZeRO-2 and ZeRO-3 runs of one recipe must train identically: the
later tests compare their losses with the DDP run of the same stage (the tests run in file order).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from rlhf_pipeline.outputs import last_checkpoint
from tests.launch_probe import PROBE_IDS, logits_path
from tests.stages.conftest import preference_rows, sft_rows, stepwise_rows, write_card

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "accelerate_configs"
PROBE = Path(__file__).resolve().parent / "launch_probe.py"
TIMEOUT = 600
PER_DEVICE, ACCUMULATION = 4, 1
LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0}

# Per-launch wall times, printed at the end of the module (pytest -s, or -rA for the captured output).
TIMINGS: dict[str, float] = {}


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("ACCELERATE_USE_CPU", None)  # it would silently turn DeepSpeed off
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


def _launch_command(config: Path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), *flags]


def launch(label: str, config: Path, program: list[str], *flags: str,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`accelerate launch --config_file CONFIG [flags] PROGRAM...`, timed; output is stdout + stderr."""
    started = time.monotonic()
    done = subprocess.run([*_launch_command(config, "--main_process_port", "0", *flags), *program],
                          env=_env() | (env or {}),
                          cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=TIMEOUT,
                          check=False)
    TIMINGS[label] = time.monotonic() - started
    return done


def stage(name: str, recipe: Path, *overrides: str) -> list[str]:
    return ["-m", "rlhf_pipeline", name, str(recipe), *overrides]


def probed(name: str, recipe: Path) -> list[str]:
    return [str(PROBE), name, str(recipe)]


def succeeded(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, done.stdout[-6000:]
    return done.stdout


@pytest.fixture(scope="module", autouse=True)
def report_timings():
    yield
    print("\nlaunch timings: " + ", ".join(f"{label} {seconds:.0f}s" for label, seconds in TIMINGS.items()))


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """Data cards for all three stages next to where the recipes will be written."""
    root = tmp_path_factory.mktemp("distributed")
    write_card(root, "chat", sft_rows(48), "messages", ["sft"])
    write_card(root, "pairs", preference_rows(48), "prompt_chosen_rejected", ["rm"])
    write_card(root, "steps", stepwise_rows(48), "stepwise", ["prm"])
    write_card(root, "prompts", [{"prompt": f"Say something about topic {i}."} for i in range(24)], "prompt_only",
               ["ppo"])
    (root / "model").symlink_to(tiny_model_dir)
    return root


def write_recipe(work: Path, name: str, stage_name: str, training: dict[str, Any] | None = None,
                 eval_split: float = 0.25) -> Path:
    cards = {"sft": ["chat"], "rm": ["pairs"], "prm": ["steps"], "ppo": ["prompts"]}[stage_name]
    settings = {"output_dir": str(work / "out" / name), "max_steps": 3, "per_device_train_batch_size": PER_DEVICE,
                "gradient_accumulation_steps": ACCUMULATION, "per_device_eval_batch_size": 8,
                "learning_rate": 5e-3, "logging_steps": 1, "save_steps": 50, "eval_strategy": "no", "seed": 0,
                "report_to": "none"}
    if stage_name == "ppo":
        settings = {"output_dir": str(work / "out" / name)}
    recipe = {"stage": stage_name, "model": {"name_or_path": str(work / "model"), "lora": LORA},
              "data": {"train": cards, "eval_split": eval_split, "max_length": 96},
              "training": settings | (training or {})}
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def metrics_of(output_dir: Path) -> dict[str, Any]:
    """The finished stage's metrics; stage.json (written last) must be there."""
    manifest = json.loads((output_dir / "stage.json").read_text())
    assert manifest["adapter"] is True
    return json.loads((output_dir / "metrics.json").read_text())


def assert_two_ranks(metrics: dict[str, Any], distributed_type: str, zero_stage: int | None = None) -> None:
    assert metrics["world_size"] == 2
    assert metrics["ranks"] == [0, 1]  # gathered from both processes by rank 0
    assert metrics["distributed_type"] == distributed_type
    assert metrics["zero_stage"] == zero_stage


def assert_adapter_trained(output_dir: Path) -> dict[str, torch.Tensor]:
    """Every saved tensor has its full shape, and every lora_B moved away from its zero initialisation."""
    weights = load_file(output_dir / "adapter_model.safetensors")
    lora_b = {key: value for key, value in weights.items() if "lora_B" in key}
    assert lora_b and all(value.numel() > 0 for value in weights.values())
    assert all(value.ndim == 2 and value.abs().sum() > 0 for value in lora_b.values())
    return weights


def load_trained(model_dir: Path, output_dir: Path, task: str) -> tuple[Any, Any]:
    """(base, base + saved adapter), loaded the way a user would, in eval mode."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(output_dir)

    def base() -> Any:
        if task == "sft":
            return AutoModelForCausalLM.from_pretrained(model_dir)
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
        model.config.pad_token_id = tokenizer.pad_token_id
        return model

    return base().eval(), PeftModel.from_pretrained(base(), output_dir).eval()


def logits(model: Any) -> torch.Tensor:
    ids = torch.tensor(PROBE_IDS)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()


# ---------------------------------------------------------------------------------------------- DDP

@pytest.fixture(scope="module")
def ddp_runs(work: Path) -> dict[str, Path]:
    """Output folders of the DDP runs, filled by the tests in file order (RM before PPO)."""
    return {}


def test_sft_ddp_two_ranks_one_writer(work: Path, tiny_model_dir: Path, ddp_runs: dict[str, Path]) -> None:
    recipe = write_recipe(work, "sft-ddp", "sft")
    output = succeeded(launch("sft ddp", CONFIGS / "cpu_multi_process.yaml", stage("sft", recipe)))
    out = work / "out" / "sft-ddp"
    metrics = metrics_of(out)
    assert_two_ranks(metrics, "MULTI_CPU")
    assert metrics["global_batch_size"] == PER_DEVICE * ACCUMULATION * 2
    assert metrics["global_steps"] == 3 and metrics["eval_loss"] < metrics["eval_loss_before"]
    # Only rank 0 prints summaries and writes files.
    assert len(re.findall(r"^sft: finished; outputs in ", output, flags=re.MULTILINE)) == 1
    assert len(re.findall(r"^sft: data ", output, flags=re.MULTILINE)) == 1
    assert not list(out.glob(".final-*")) and not list(out.glob(".*.tmp"))
    assert_adapter_trained(out)
    base, tuned = load_trained(tiny_model_dir, out, "sft")
    assert not torch.allclose(logits(base), logits(tuned), atol=1e-4)
    ddp_runs["sft"] = out


def test_a_rank_that_raises_ends_the_launch_and_the_last_checkpoint_resumes(work: Path) -> None:
    recipe = write_recipe(work, "sft-fault", "sft", {"max_steps": 6, "save_steps": 2, "disable_tqdm": True})
    out = work / "out" / "sft-fault"
    failed = launch("sft rank 1 fails", CONFIGS / "cpu_multi_process.yaml", probed("sft", recipe),
                    env={"PROBE_FAIL": "1:3"})  # rank 1 raises in step 3, after checkpoint-2
    assert failed.returncode != 0
    assert TIMINGS["sft rank 1 fails"] < 60  # not the backend's 30-minute timeout
    output = failed.stdout
    assert re.search(r"^rank 1 of 2 failed: ValueError: injected failure in step 3$", output, re.MULTILINE), output
    root_cause = output[output.index("Root Cause"):]
    assert re.search(r"rank\s*: 1 \(local_rank: 1\)", root_cause) and "ValueError: injected failure" in root_cause
    assert "[rank0]: Traceback" not in output and "[rank1]: Traceback" not in output  # one account of the error
    assert not (out / "stage.json").exists() and last_checkpoint(out) == out / "checkpoint-2"

    succeeded(launch("sft resumed after the failure", CONFIGS / "cpu_multi_process.yaml", stage("sft", recipe)))
    metrics = metrics_of(out)
    assert metrics["resumed_from"] == str(out / "checkpoint-2") and metrics["global_steps"] == 6


def test_rm_ddp(work: Path, tiny_model_dir: Path, ddp_runs: dict[str, Path]) -> None:
    recipe = write_recipe(work, "rm-ddp", "rm")
    succeeded(launch("rm ddp", CONFIGS / "cpu_multi_process.yaml", stage("rm", recipe)))
    out = work / "out" / "rm-ddp"
    metrics = metrics_of(out)
    assert_two_ranks(metrics, "MULTI_CPU")
    assert metrics["global_batch_size"] == PER_DEVICE * ACCUMULATION * 2
    assert metrics["global_steps"] == 3 and metrics["reward_stats"]["std"] > 0
    weights = assert_adapter_trained(out)
    assert any("score" in key for key in weights)  # the trained head travels with the adapter
    _, tuned = load_trained(tiny_model_dir, out, "rm")
    assert logits(tuned).shape == (1, 1) and torch.isfinite(logits(tuned)).all()
    ddp_runs["rm"] = out


def test_prm_ddp(work: Path, tiny_model_dir: Path, ddp_runs: dict[str, Path]) -> None:
    recipe = write_recipe(work, "prm-ddp", "prm")
    output = succeeded(launch("prm ddp", CONFIGS / "cpu_multi_process.yaml", stage("prm", recipe)))
    out = work / "out" / "prm-ddp"
    metrics = metrics_of(out)
    assert_two_ranks(metrics, "MULTI_CPU")
    assert metrics["global_batch_size"] == PER_DEVICE * ACCUMULATION * 2 and metrics["global_steps"] == 3
    assert len(re.findall(r"^prm: finished; outputs in ", output, flags=re.MULTILINE)) == 1
    assert metrics["eval"]["solutions"] == 12 and 0 <= metrics["eval_step_accuracy"] <= 1  # a quarter held out
    weights = assert_adapter_trained(out)
    assert any("score" in key for key in weights)  # the trained head travels with the adapter
    ddp_runs["prm"] = out


def ppo_recipe(work: Path, name: str, ddp_runs: dict[str, Path], **extra: Any) -> Path:
    """Two PPO steps of 8 prompts (2 per micro-batch x 2 accumulated x 2 processes) against the DDP reward model."""
    return write_recipe(work, name, "ppo", {
        "reward_model_path": str(ddp_runs["rm"]), "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 2, "response_length": 8, "total_episodes": 16, "num_ppo_epochs": 1,
        "learning_rate": 1e-3, "normalize_reward": True, "disable_tqdm": True, "num_sample_generations": 0,
        **extra}, eval_split=0.0)


def ppo_steps(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """The logged PPO steps without their time/* seconds (wall clock: never equal between two runs)."""
    return [{key: value for key, value in entry.items() if not key.startswith("time/")}
            for entry in metrics["log_history"] if "objective/scores" in entry]


def test_ppo_ddp(work: Path, tiny_model_dir: Path, ddp_runs: dict[str, Path]) -> None:
    if "rm" not in ddp_runs:
        pytest.skip("needs the reward model of test_rm_ddp")
    per_device, accumulation, episodes = 2, 2, 16
    recipe = ppo_recipe(work, "ppo-ddp", ddp_runs, save_steps=2)  # checkpoint-2: the trained weights to compare
    output = succeeded(launch("ppo ddp", CONFIGS / "cpu_multi_process.yaml", stage("ppo", recipe)))
    out = work / "out" / "ppo-ddp"
    metrics = metrics_of(out)
    assert_two_ranks(metrics, "MULTI_CPU")
    assert metrics["global_batch_size"] == per_device * accumulation * 2
    assert metrics["global_steps"] == episodes // (per_device * accumulation * 2)
    assert len(re.findall(r"^ppo: finished; outputs in ", output, flags=re.MULTILINE)) == 1
    assert_adapter_trained(out)
    base, tuned = load_trained(tiny_model_dir, out, "sft")
    assert not torch.allclose(logits(base), logits(tuned), atol=1e-6)
    ddp_runs["ppo"] = out


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_sft_two_nodes_on_one_machine(work: Path, ddp_runs: dict[str, Path]) -> None:
    recipe = write_recipe(work, "sft-2nodes", "sft")
    port = str(_free_port())
    started = time.monotonic()
    launchers = [subprocess.Popen([*_launch_command(CONFIGS / "cpu_multi_process.yaml", "--num_machines", "2",
                                                    "--num_processes", "2", "--machine_rank", str(rank),
                                                    "--main_process_ip", "127.0.0.1", "--main_process_port", port),
                                   *stage("sft", recipe)], env=_env(), cwd=REPO, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    outputs = [launcher.communicate(timeout=TIMEOUT)[0] for launcher in launchers]
    TIMINGS["sft two nodes"] = time.monotonic() - started
    for launcher, output in zip(launchers, outputs, strict=True):
        assert launcher.returncode == 0, output[-6000:]
    metrics = metrics_of(work / "out" / "sft-2nodes")
    assert_two_ranks(metrics, "MULTI_CPU")
    assert metrics["global_batch_size"] == PER_DEVICE * ACCUMULATION * 2
    assert "sft: finished" in outputs[0] and "sft: finished" not in outputs[1]  # machine 1 holds rank 1 only
    if "sft" in ddp_runs:  # the same world of two, seeded alike: the very same training
        assert metrics["eval_loss"] == pytest.approx(metrics_of(ddp_runs["sft"])["eval_loss"], abs=1e-6)


# ----------------------------------------------------------------------------------------- DeepSpeed

def train_losses(metrics: dict[str, Any]) -> list[float]:
    return [entry["loss"] for entry in metrics["log_history"] if "loss" in entry]


def _check_sharded_run(work: Path, tiny_model_dir: Path, name: str, stage_name: str, ddp_runs: dict[str, Path],
                       distributed_type: str = "DEEPSPEED", zero_stage: int | None = None) -> None:
    out = work / "out" / name
    metrics = metrics_of(out)
    if stage_name in ddp_runs:  # same seed, same global batch: ZeRO and FSDP must train exactly as DDP did
        ddp = metrics_of(ddp_runs[stage_name])
        assert train_losses(metrics) == pytest.approx(train_losses(ddp), abs=1e-4)
        final = {"sft": "eval_loss", "rm": "eval_mean_margin", "prm": "eval_step_accuracy"}[stage_name]
        assert metrics[final] == pytest.approx(ddp[final], abs=1e-4)
    assert_two_ranks(metrics, distributed_type, zero_stage)
    assert metrics["global_batch_size"] == PER_DEVICE * ACCUMULATION * 2
    assert metrics["global_steps"] == 3
    if stage_name == "sft":
        assert metrics["eval_loss_before"] is not None and metrics["eval_loss"] < metrics["eval_loss_before"]
    assert_adapter_trained(out)
    base, tuned = load_trained(tiny_model_dir, out, stage_name)
    saved = logits(tuned)
    trained = torch.load(logits_path(work / f"{name}.yaml"))  # rank 0's in-memory model at the end of training
    torch.testing.assert_close(saved, trained, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(saved, logits(base), atol=1e-4)


@pytest.mark.parametrize(("stage_name", "zero_stage"), [("sft", 2), pytest.param("rm", 2, marks=pytest.mark.slow),
                                                        ("prm", 2), ("sft", 3)])  # rm opt-in: prm has a head too
def test_deepspeed_trains_like_ddp_and_saves_the_trained_adapter(work: Path, tiny_model_dir: Path,
                                                                 ddp_runs: dict[str, Path], stage_name: str,
                                                                 zero_stage: int) -> None:
    name = f"{stage_name}-zero{zero_stage}"
    recipe = write_recipe(work, name, stage_name)
    config = CONFIGS / f"deepspeed_zero{zero_stage}_cpu.yaml"
    succeeded(launch(f"{stage_name} zero{zero_stage}", config, probed(stage_name, recipe)))
    _check_sharded_run(work, tiny_model_dir, name, stage_name, ddp_runs, zero_stage=zero_stage)


def zero3_shard_everything(work: Path) -> Path:
    """deepspeed_zero3_cpu.yaml with every parameter sharded, however small.

    ZeRO-3 keeps parameters under stage3_param_persistence_threshold (1e5 elements) whole on every rank, so
    with the tiny model the shipped profile shards no LoRA tensor at all. This variant of it (the same file,
    its DeepSpeed section given as a config file with the threshold at 0) shards them all, and the heads too.
    """
    ds_config = work / "zero3_shard_everything.json"
    ds_config.write_text(json.dumps({
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                              "stage3_gather_16bit_weights_on_model_save": True},
        "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto", "gradient_clipping": "auto"}))
    shipped = yaml.safe_load((CONFIGS / "deepspeed_zero3_cpu.yaml").read_text())
    shipped.pop("mixed_precision")  # a deepspeed_config_file owns precision and the other DeepSpeed keys
    shipped["deepspeed_config"] = {"deepspeed_config_file": str(ds_config), "zero3_init_flag": True,
                                   "deepspeed_multinode_launcher": "standard"}
    config = work / "zero3_shard_everything.yaml"
    config.write_text(yaml.safe_dump(shipped))
    return config


def test_zero3_sharded_adapter_and_head_are_gathered_on_save(work: Path, tiny_model_dir: Path,
                                                             ddp_runs: dict[str, Path]) -> None:
    """The reward model under zero3_shard_everything: the case where an ungathered save writes empty
    tensors (checked: 28 of them for the SFT LoRA)."""
    recipe = write_recipe(work, "rm-zero3-sharded", "rm")
    output = succeeded(launch("rm zero3 sharded", zero3_shard_everything(work), probed("rm", recipe)))
    assert "invalid shape" not in output  # PEFT's warning for ungathered ZeRO-3 / FSDP shards
    _check_sharded_run(work, tiny_model_dir, "rm-zero3-sharded", "rm", ddp_runs, zero_stage=3)


def assert_same_ppo_steps(ours: dict[str, Any], theirs: dict[str, Any]) -> None:
    mine, reference = ppo_steps(ours), ppo_steps(theirs)
    assert [entry["step"] for entry in mine] == [entry["step"] for entry in reference] == [1, 2]
    for entry, expected in zip(mine, reference, strict=True):
        for key, value in expected.items():
            assert entry[key] == pytest.approx(value, rel=1e-4, abs=1e-5), (expected["step"], key)


TRAINED_FILES = ("adapter_model.safetensors", "value_model/adapter_model.safetensors",
                 "value_model/value_head.safetensors")


def assert_same_trained_weights(checkpoint: Path, reference: Path) -> None:
    """Two PPO checkpoints hold the same policy and critic adapters and value head.

    This checks the optimizer steps themselves, which the logged statistics cannot: a step's statistics are
    measured before its update. (It caught ZeRO-3 adding the critic's first gradient of a step onto the
    previous step's, 3.7e-4 off after two steps; see ppo/sharding.prepare_deepspeed.)
    """
    for name in TRAINED_FILES:
        ours, theirs = load_file(checkpoint / name), load_file(reference / name)
        assert ours.keys() == theirs.keys(), name
        for key, value in theirs.items():
            torch.testing.assert_close(ours[key], value, atol=1e-5, rtol=1e-4, msg=lambda m, k=key: f"{k}: {m}")


def run_ppo_like_ddp(work: Path, tiny_model_dir: Path, ddp_runs: dict[str, Path], name: str, config: Path,
                     zero_stage: int) -> tuple[Path, dict[str, Any], str]:
    """Launch the PPO recipe `name` (a checkpoint per step) and check it trained as DDP did and saved what it
    trained: the same step statistics and weights as the DDP run, the probe's logits from the saved adapter."""
    recipe = ppo_recipe(work, name, ddp_runs, save_steps=1)
    output = succeeded(launch(name.replace("-", " "), config, probed("ppo", recipe)))
    out = work / "out" / name
    metrics = metrics_of(out)
    assert_two_ranks(metrics, "DEEPSPEED", zero_stage)
    assert metrics["global_batch_size"] == 8 and metrics["global_steps"] == 2
    assert_same_ppo_steps(metrics, metrics_of(ddp_runs["ppo"]))
    assert_same_trained_weights(out / "checkpoint-2", ddp_runs["ppo"] / "checkpoint-2")
    assert_adapter_trained(out)
    base, tuned = load_trained(tiny_model_dir, out, "sft")
    torch.testing.assert_close(logits(tuned), torch.load(logits_path(recipe)), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(logits(tuned), logits(base), atol=1e-6)
    return out, metrics, output


def resume_after_step_one(work: Path, ddp_runs: dict[str, Path], name: str, config: Path,
                          metrics: dict[str, Any]) -> None:
    """What a crash during step 2 leaves (checkpoint-1, no completion marker); the same command resumes it
    and trains step 2 as the uninterrupted run did."""
    out = work / "out" / name
    (out / "stage.json").unlink()
    shutil.rmtree(out / "checkpoint-2")
    succeeded(launch(f"{name.replace('-', ' ')} resumed", config, stage("ppo", work / f"{name}.yaml")))
    resumed = metrics_of(out)
    assert resumed["resumed_from"] == str(out / "checkpoint-1")
    assert_same_ppo_steps(resumed, metrics)
    assert_same_trained_weights(out / "checkpoint-2", ddp_runs["ppo"] / "checkpoint-2")


def test_ppo_zero2_trains_like_ddp_saves_and_resumes(work: Path, tiny_model_dir: Path,
                                                     ddp_runs: dict[str, Path]) -> None:
    """PPO under DeepSpeed ZeRO-2: the same two steps as DDP, the trained adapter saved, exact resume.

    The four roles are adapters on one module (adapters.SharedBase), so accelerate builds one DeepSpeed
    engine; the optimizer states are partitioned, so each checkpoint holds one optimizer shard per rank.
    """
    if "ppo" not in ddp_runs:
        pytest.skip("needs the PPO run of test_ppo_ddp")
    config = CONFIGS / "deepspeed_zero2_cpu.yaml"
    out, metrics, _ = run_ppo_like_ddp(work, tiny_model_dir, ddp_runs, "ppo-zero2", config, 2)
    shards = list((out / "checkpoint-1" / "deepspeed" / "state").glob("*optim_states.pt"))
    assert len(shards) == 2, shards
    resume_after_step_one(work, ddp_runs, "ppo-zero2", config, metrics)


def _module_states(checkpoint: Path) -> dict[str, torch.Tensor]:
    """What ZeRO-3 saved of rank 0's module in a PPO checkpoint: its trainable parameters as that rank held them
    (the values themselves are in its optimizer files)."""
    (path,) = (checkpoint / "deepspeed" / "state").glob("zero_pp_rank_0_*model_states.pt")
    return torch.load(path, map_location="cpu", weights_only=False)["module"]


@pytest.mark.parametrize("sharded", [False, pytest.param(True, marks=pytest.mark.slow)],  # opt-in: 28 s
                         ids=["shipped", "shard_everything"])
def test_ppo_zero3_trains_like_ddp_saves_and_resumes(work: Path, tiny_model_dir: Path, ddp_runs: dict[str, Path],
                                                     sharded: bool) -> None:
    """PPO under DeepSpeed ZeRO-3: the same two steps as DDP, whole trained tensors saved, exact resume.

    Generation runs on parameters gathered once per generate call (ppo/sharding.py), every other pass on
    ZeRO-3's per-module gathering. With the shipped profile the tiny model's LoRA tensors and heads stay
    whole (under stage3_param_persistence_threshold) and only the base is sharded; with
    zero3_shard_everything every one of them is sharded, so the saved adapters and the critic's head are
    complete only if they were gathered, and resuming loads into sharded parameters.
    """
    if "ppo" not in ddp_runs:
        pytest.skip("needs the PPO run of test_ppo_ddp")
    name = "ppo-zero3-sharded" if sharded else "ppo-zero3"
    config = zero3_shard_everything(work) if sharded else CONFIGS / "deepspeed_zero3_cpu.yaml"
    out, metrics, output = run_ppo_like_ddp(work, tiny_model_dir, ddp_runs, name, config, 3)
    assert "invalid shape" not in output  # PEFT's warning for ungathered shards
    checkpoint = out / "checkpoint-2"
    policy, critic = assert_adapter_trained(checkpoint), assert_adapter_trained(checkpoint / "value_model")
    head = load_file(checkpoint / "value_model" / "value_head.safetensors")
    hidden_size = json.loads((tiny_model_dir / "config.json").read_text())["hidden_size"]
    assert head["weight"].shape == (1, hidden_size) and head["bias"].shape == (1,)
    # ZeRO-3 shards every parameter before it checkpoints (the whole-kept small ones too), so its own copy of
    # the module holds empty tensors: the adapters and head above are whole because they were gathered
    lora = {key: value for key, value in _module_states(checkpoint).items() if "lora_" in key}
    assert len(lora) == len(policy) + len(critic) and all(value.numel() == 0 for value in lora.values())
    assert len(list((checkpoint / "deepspeed" / "state").glob("*optim_states.pt"))) == 2
    resume_after_step_one(work, ddp_runs, name, config, metrics)


# ---------------------------------------------------------------------------------------------- FSDP

def fsdp_on_two_cpu_processes(work: Path) -> Path:
    """fsdp.yaml as shipped, but for 2 CPU processes in fp32."""
    fsdp = yaml.safe_load((CONFIGS / "fsdp.yaml").read_text()) | {"num_processes": 2, "mixed_precision": "no"}
    config = work / "fsdp_cpu.yaml"
    config.write_text(yaml.safe_dump(fsdp))
    return config


@pytest.mark.parametrize("stage_name", ["sft", pytest.param("rm", marks=pytest.mark.slow)])  # rm opt-in: 13 s
def test_fsdp2_trains_like_ddp_and_saves_the_trained_adapter(work: Path, tiny_model_dir: Path,
                                                             ddp_runs: dict[str, Path], stage_name: str) -> None:
    """SFT and RM under accelerate's FSDP2 profile on two CPU processes: DDP's training, the trained adapter saved.

    accelerate selects FSDP only with GPUs, so the probe switches its state to FSDP (launch_probe.py,
    PROBE_FSDP_ON_CPU); the rest is the real code: accelerate's FSDP2 preparation (a unit per decoder block,
    DTensor parameters), the Trainer under FSDP, and the stage's save, which gathers the DTensors (ungathered,
    saving failed with "invalid python storage"; a reward model's score head, which the scoring forward leaves
    unsharded, is read from the state dict). Activation checkpointing is on, as on GPUs.
    """
    name = f"{stage_name}-fsdp"
    recipe = write_recipe(work, name, stage_name, {"activation_checkpointing": True})
    succeeded(launch(f"{stage_name} fsdp", fsdp_on_two_cpu_processes(work), probed(stage_name, recipe),
                     env={"PROBE_FSDP_ON_CPU": "1"}))
    _check_sharded_run(work, tiny_model_dir, name, stage_name, ddp_runs, "FSDP")


def test_ppo_refuses_fsdp_before_loading_weights(work: Path, ddp_runs: dict[str, Path]) -> None:
    """fsdp.yaml on this CPU machine (2 processes, fp32): refused with the profiles that work, no weights read.

    (accelerate 1.15 itself turns FSDP into plain DDP without GPUs; the refusal comes first.)
    """
    if "rm" not in ddp_runs:
        pytest.skip("needs the reward model of test_rm_ddp")
    config = fsdp_on_two_cpu_processes(work)
    recipe = write_recipe(work, "ppo-fsdp", "ppo", {"reward_model_path": str(ddp_runs["rm"]),
                                                    "per_device_train_batch_size": 2, "total_episodes": 16},
                          eval_split=0.0)
    done = launch("ppo fsdp refused", config, stage("ppo", recipe))
    assert done.returncode != 0
    assert "error: " in done.stdout and "this launch uses FSDP, which the ppo stage does not support" in done.stdout
    assert "deepspeed_zero3_cpu.yaml" in done.stdout
    assert re.search(r"exitcode\s*:\s*2\b", done.stdout)  # the CLI's status for a PipelineError, no crash
    assert "]: Traceback" not in done.stdout  # no rank raised anything else
    assert "loading " not in done.stdout  # refused before any weights were read
    assert not (work / "out" / "ppo-fsdp" / "stage.json").exists()
