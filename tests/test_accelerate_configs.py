"""Static checks of the accelerate config files in ``accelerate_configs/``.

Nothing is launched here: every file goes through accelerate's own config loader, the argument handling of
``accelerate launch`` (without starting processes) and, for DeepSpeed / FSDP, the plugin classes the
launched processes build from the launcher's environment. Launch tests live elsewhere.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

CONFIG_DIR = Path(__file__).resolve().parents[1] / "accelerate_configs"
CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))

EXPECTED = {
    "single_gpu.yaml",
    "multi_gpu.yaml",
    "multi_node.yaml",
    "deepspeed_zero2.yaml",
    "deepspeed_zero3.yaml",
    "deepspeed_zero3_offload.yaml",
    "fsdp.yaml",
    "cpu_multi_process.yaml",
    "deepspeed_zero2_cpu.yaml",
    "deepspeed_zero3_cpu.yaml",
}
CPU_CONFIGS = {"cpu_multi_process.yaml", "deepspeed_zero2_cpu.yaml", "deepspeed_zero3_cpu.yaml"}

# Keys of `deepspeed_config` that become DeepSpeedPlugin arguments in the launched processes, and the keys
# only the launcher itself uses (multi-node launch).
DS_PLUGIN_KEYS = {
    "zero_stage": "zero_stage",
    "offload_optimizer_device": "offload_optimizer_device",
    "offload_param_device": "offload_param_device",
    "offload_optimizer_nvme_path": "offload_optimizer_nvme_path",
    "offload_param_nvme_path": "offload_param_nvme_path",
    "zero3_init_flag": "zero3_init_flag",
    "zero3_save_16bit_model": "zero3_save_16bit_model",
    "gradient_accumulation_steps": "gradient_accumulation_steps",
    "gradient_clipping": "gradient_clipping",
    "deepspeed_config_file": "hf_ds_config",
    "deepspeed_moe_layer_cls_names": "transformer_moe_cls_names",
}
DS_LAUNCHER_ONLY_KEYS = {
    "deepspeed_multinode_launcher",
    "deepspeed_hostfile",
    "deepspeed_exclusion_filter",
    "deepspeed_inclusion_filter",
}


def _ids(paths):
    return [p.name for p in paths]


def _raw(path: Path) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _configs_of_type(distributed_type: str) -> list[Path]:
    return [p for p in CONFIGS if _raw(p)["distributed_type"] == distributed_type]


DS_CONFIGS = _configs_of_type("DEEPSPEED")


def _leading_comment(path: Path) -> str:
    """The comment block before the first YAML line, without the ``#`` markers."""
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            lines.append(line[1:].strip())
        elif line.strip():
            break
    return "\n".join(lines).strip()


@pytest.fixture
def clean_accelerate_env(monkeypatch):
    """Drop ACCELERATE_*/FSDP_* variables so plugins only see what the test sets."""
    for key in list(os.environ):
        if key.startswith(("ACCELERATE_", "FSDP_")):
            monkeypatch.delenv(key)
    return monkeypatch


def _launch_args(path: Path, *extra: str):
    """What `accelerate launch --config_file path ... script.py` resolves to, without launching anything."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    parser = launch_command_parser()
    args = parser.parse_args(["--config_file", str(path), *extra, "train.py"])
    args, defaults, mp_from_config = _validate_launch_command(args)
    return args, defaults, mp_from_config


def _launcher_kind(args) -> str:
    """The branch `accelerate.commands.launch.launch_command` takes for these args."""
    if args.use_deepspeed and not args.cpu:
        return "deepspeed"
    if (args.use_fsdp or args.multi_gpu) and not args.cpu:
        return "multi_gpu"  # torchrun: one process per `num_processes`
    return "simple"  # ONE process, whatever num_processes says


def test_expected_files_present():
    assert {p.name for p in CONFIGS} >= EXPECTED


@pytest.mark.parametrize("path", CONFIGS, ids=_ids(CONFIGS))
def test_loaded_by_accelerate_config_loader(path):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.utils import ComputeEnvironment

    cfg = load_config_from_file(str(path))  # raises on unknown top-level keys
    assert isinstance(cfg, ClusterConfig)
    assert cfg.compute_environment == ComputeEnvironment.LOCAL_MACHINE
    # The class for the file's compute environment reads it the same way.
    assert ClusterConfig.from_yaml_file(str(path)).to_dict() == cfg.to_dict()
    assert cfg.num_processes >= 1
    assert cfg.num_processes % cfg.num_machines == 0


@pytest.mark.parametrize("path", CONFIGS, ids=_ids(CONFIGS))
def test_leading_comment_describes_the_file(path):
    comment = _leading_comment(path)
    assert comment, f"{path.name} has no leading comment"
    assert comment.startswith(path.name)
    assert "Suits:" in comment
    assert re.search(r"\b(sft|rm|ppo)\b", comment), "comment must say which stages the file suits"
    assert re.search(r"\d+B\b|tiny", comment), "comment must say which model sizes the file suits"
    one_line = re.sub(r"\s+", " ", re.sub(r"\\\s*\n", " ", comment))  # join `\`-continued lines
    assert f"accelerate launch --config_file accelerate_configs/{path.name}" in one_line


@pytest.mark.parametrize("path", CONFIGS, ids=_ids(CONFIGS))
def test_accepted_by_accelerate_launch(path):
    from accelerate.commands.launch import launch_command_parser

    raw = _raw(path)
    args, _, _ = _launch_args(path)
    expected_kind = {"NO": "simple", "MULTI_GPU": "multi_gpu", "FSDP": "multi_gpu", "DEEPSPEED": "deepspeed"}
    assert _launcher_kind(args) == expected_kind[raw["distributed_type"]]
    assert args.num_processes == raw["num_processes"]
    assert args.num_machines == raw.get("num_machines", 1)
    assert args.mixed_precision == raw["mixed_precision"]
    # Nested keys that `accelerate launch` does not know are silently ignored: catch typos here.
    launch_options = {action.dest for action in launch_command_parser()._actions}
    for section in ("deepspeed_config", "fsdp_config"):
        for key in raw.get(section) or {}:
            assert key in launch_options, f"{path.name}: {section}.{key} is not an `accelerate launch` option"


@pytest.mark.parametrize("path", CONFIGS, ids=_ids(CONFIGS))
def test_mixed_precision_bf16_on_gpu_no_on_cpu(path):
    expected = "no" if path.name in CPU_CONFIGS else "bf16"
    assert _raw(path)["mixed_precision"] == expected


def test_cpu_multi_process_has_the_fields_notes_cpu_requires():
    path = CONFIG_DIR / "cpu_multi_process.yaml"
    raw = _raw(path)
    # MULTI_CPU / use_cpu: true would silently run ONE process.
    assert raw["distributed_type"] == "MULTI_GPU"
    assert raw["use_cpu"] is False
    assert raw["num_processes"] == 2
    assert raw.get("num_machines", 1) == 1
    args, _, _ = _launch_args(path)
    assert _launcher_kind(args) == "multi_gpu"
    assert args.num_processes == 2
    # The processes must be told to use the CPU: the comment has to say how.
    comment = _leading_comment(path)
    for needle in ("ACCELERATE_USE_CPU=true", "use_cpu=True", "cpu=True", "world size"):
        assert needle in comment


@pytest.mark.parametrize("name", ["deepspeed_zero2_cpu.yaml", "deepspeed_zero3_cpu.yaml"])
def test_deepspeed_cpu_configs(name):
    path = CONFIG_DIR / name
    raw = _raw(path)
    assert raw["distributed_type"] == "DEEPSPEED"
    assert raw["use_cpu"] is False  # use_cpu: true -> one process, no DeepSpeed
    assert raw["num_processes"] == 2
    assert raw["mixed_precision"] == "no"
    assert raw["deepspeed_config"]["zero_stage"] == (2 if "zero2" in name else 3)
    args, _, _ = _launch_args(path)
    assert _launcher_kind(args) == "deepspeed"
    comment = _leading_comment(path)
    for needle in ("TORCH_EXTENSIONS_DIR", "PartialState(cpu=True)", "use_cpu=True", "ACCELERATE_USE_CPU"):
        assert needle in comment


@pytest.mark.parametrize("path", DS_CONFIGS, ids=_ids(DS_CONFIGS))
def test_deepspeed_config_builds_plugin(path, clean_accelerate_env):
    from accelerate.utils import DeepSpeedPlugin

    ds = _raw(path)["deepspeed_config"]
    unknown = set(ds) - set(DS_PLUGIN_KEYS) - DS_LAUNCHER_ONLY_KEYS
    assert not unknown, f"unexpected deepspeed_config keys {unknown}"
    plugin = DeepSpeedPlugin(**{DS_PLUGIN_KEYS[k]: v for k, v in ds.items() if k in DS_PLUGIN_KEYS})
    zero = plugin.deepspeed_config["zero_optimization"]
    assert plugin.zero_stage == zero["stage"] == ds["zero_stage"]
    assert zero["offload_optimizer"]["device"] == ds.get("offload_optimizer_device", "none")
    assert zero["offload_param"]["device"] == ds.get("offload_param_device", "none")
    if ds["zero_stage"] == 3:
        assert plugin.zero3_init_flag is True
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    else:
        assert plugin.zero3_init_flag is False


@pytest.mark.parametrize("path", DS_CONFIGS, ids=_ids(DS_CONFIGS))
def test_deepspeed_batch_settings_left_to_the_recipe(path):
    """A fixed value here would fight the recipe (Trainer: mismatch error; custom loop: silently replaced)."""
    ds = _raw(path)["deepspeed_config"]
    for key in ("gradient_accumulation_steps", "gradient_clipping", "deepspeed_config_file"):
        assert key not in ds, f"{path.name}: leave {key} out so the recipe's value is used"
    assert ds.get("deepspeed_multinode_launcher") == "standard"  # torchrun per node (srun-friendly)


@pytest.mark.parametrize("path", DS_CONFIGS, ids=_ids(DS_CONFIGS))
def test_deepspeed_plugin_from_launcher_env_accepts_recipe_values(path, clean_accelerate_env):
    """Rebuild the plugin exactly as a launched process does, then apply Trainer-style recipe values."""
    from accelerate.utils import DeepSpeedPlugin
    from accelerate.utils.launch import prepare_deepspeed_cmd_env
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig, unset_hf_deepspeed_config

    raw = _raw(path)
    args, _, mp_from_config = _launch_args(path)
    args.main_process_port = 0  # never touch a port another run may use
    fields = list(raw["deepspeed_config"]) + (["mixed_precision"] if mp_from_config else [])
    args.deepspeed_fields_from_accelerate_config = ",".join(fields)
    _, env = prepare_deepspeed_cmd_env(args)
    for key, value in env.items():
        if key.startswith("ACCELERATE_"):
            clean_accelerate_env.setenv(key, value)
    assert "ACCELERATE_GRADIENT_ACCUMULATION_STEPS" not in env
    assert "ACCELERATE_GRADIENT_CLIPPING" not in env

    plugin = DeepSpeedPlugin()
    assert plugin.zero_stage == raw["deepspeed_config"]["zero_stage"]
    assert plugin.gradient_accumulation_steps == "auto"
    assert plugin.deepspeed_config["gradient_accumulation_steps"] == "auto"
    assert plugin.deepspeed_config["gradient_clipping"] == "auto"
    assert plugin.deepspeed_config["train_micro_batch_size_per_gpu"] == "auto"
    plugin.set_mixed_precision(env["ACCELERATE_MIXED_PRECISION"])  # as AcceleratorState does

    bf16 = raw["mixed_precision"] == "bf16"
    recipe = SimpleNamespace(
        world_size=raw["num_processes"],
        per_device_train_batch_size=2,
        gradient_accumulation_steps=4,
        max_grad_norm=0.3,
        learning_rate=1e-5,
        adam_beta1=0.9,
        adam_beta2=0.95,
        adam_epsilon=1e-8,
        weight_decay=0.0,
        save_on_each_node=False,
        fp16=False,
        fp16_full_eval=False,
        bf16=bf16,
        bf16_full_eval=False,
    )
    hf_config = HfTrainerDeepSpeedConfig(plugin.deepspeed_config)
    try:
        hf_config.trainer_config_process(recipe)  # what the Trainer does with TrainingArguments
        assert hf_config.mismatches == []
        assert hf_config.config["gradient_accumulation_steps"] == 4
        assert hf_config.config["gradient_clipping"] == 0.3
        assert hf_config.config["train_batch_size"] == 2 * 4 * raw["num_processes"]
    finally:
        unset_hf_deepspeed_config()


def test_fsdp_config_builds_fsdp2_plugin(clean_accelerate_env):
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    path = CONFIG_DIR / "fsdp.yaml"
    fsdp = _raw(path)["fsdp_config"]
    assert fsdp["fsdp_version"] == 2
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert fsdp["fsdp_state_dict_type"] in ("FULL_STATE_DICT", "SHARDED_STATE_DICT")
    assert fsdp["fsdp_cpu_ram_efficient_loading"] is True

    args, _, _ = _launch_args(path)
    args.main_process_port = 0
    env = prepare_multi_gpu_env(args)
    assert env["ACCELERATE_USE_FSDP"] == "true"
    for key, value in env.items():
        if key.startswith(("ACCELERATE_", "FSDP_")):
            clean_accelerate_env.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2
    assert plugin.state_dict_type.name == fsdp["fsdp_state_dict_type"]
    assert plugin.cpu_ram_efficient_loading is True
    assert plugin.reshard_after_forward is True
    assert plugin.auto_wrap_policy is not None


def test_multi_node_template():
    path = CONFIG_DIR / "multi_node.yaml"
    raw = _raw(path)
    assert raw["num_machines"] == 2
    assert raw["num_processes"] == 16
    assert raw["rdzv_backend"] == "static"
    assert raw["main_process_ip"]
    assert "PLACEHOLDER" in path.read_text(encoding="utf-8")
    # Command-line flags override the template (as in the Slurm example).
    args, _, _ = _launch_args(
        path,
        "--num_machines",
        "4",
        "--num_processes",
        "32",
        "--machine_rank",
        "3",
        "--main_process_ip",
        "node-0",
    )
    assert (args.num_machines, args.num_processes, args.machine_rank) == (4, 32, 3)
    assert args.main_process_ip == "node-0"
    assert args.rdzv_backend == "static"


def test_multi_gpu_defaults_to_8_and_says_how_to_override():
    path = CONFIG_DIR / "multi_gpu.yaml"
    assert _raw(path)["num_processes"] == 8
    assert "--num_processes" in _leading_comment(path)
    args, _, _ = _launch_args(path, "--num_processes", "4")
    assert args.num_processes == 4


def test_readme_lists_every_config():
    readme = (CONFIG_DIR / "README.md").read_text(encoding="utf-8")
    for path in CONFIGS:
        assert path.name in readme
    assert "srun" in readme and "--machine_rank" in readme
