"""Pre-flight checks of a launch against its recipe: refuse, before any weights load, what would fail later.

`accelerate launch` tells every process how it was launched through environment variables (WORLD_SIZE from
torchrun; ACCELERATE_USE_DEEPSPEED, ACCELERATE_DEEPSPEED_ZERO_STAGE, ACCELERATE_GRADIENT_ACCUMULATION_STEPS,
ACCELERATE_GRADIENT_CLIPPING or ACCELERATE_DEEPSPEED_CONFIG_FILE for DeepSpeed; ACCELERATE_USE_FSDP). The
combinations checked here otherwise fail minutes later (after the weights have loaded, on every rank, with a
library's traceback) or, worse, train something other than the recipe says:

* a DeepSpeed config that fixes gradient accumulation, clipping or batch sizes differently from the recipe
  (the Trainer stops with "DeepSpeed config values that mismatch TrainingArguments");
* a 4-bit (QLoRA) base sharded by ZeRO-3 or FSDP without `bnb_4bit_quant_storage` equal to the compute
  dtype (the 4-bit weights must be stored in a float dtype to be sharded);
* PPO under a launch that shards parameters (ZeRO-3, FSDP): PPO samples its answers with `generate()` from
  the model it trains, token by token, and switches adapters off for the reference and reward passes; it runs
  under DDP and DeepSpeed ZeRO-1/2, which keep whole parameters on every rank;
* a PPO run whose prompts or episodes do not fill the global rollout batch (per process × processes).

Nothing heavy is imported at module level; `check_launch` takes the environment as a mapping so it can be
tested without launching anything.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

from rlhf_pipeline.distributed import Launch, read_launch
from rlhf_pipeline.errors import PipelineError, RecipeError

if TYPE_CHECKING:
    from rlhf_pipeline.recipe import Recipe

PPO_LAUNCH_HINT = ("launch PPO with accelerate_configs/multi_gpu.yaml (DDP) or deepspeed_zero2.yaml "
                   "(cpu_multi_process.yaml or deepspeed_zero2_cpu.yaml on a machine without GPUs)")

# DeepSpeed config keys that must agree with the recipe: DeepSpeed key -> (recipe key, its default).
_DEEPSPEED_RECIPE_KEYS = {
    "gradient_accumulation_steps": ("gradient_accumulation_steps", 1),
    "gradient_clipping": ("max_grad_norm", 1.0),
    "train_micro_batch_size_per_gpu": ("per_device_train_batch_size", 8),
}


def check_launch(recipe: Recipe, env: Mapping[str, str] | None = None) -> Launch:
    """Raise PipelineError (naming the recipe key and the fix) for a launch this recipe cannot run under."""
    launch = read_launch(env)
    if recipe.stage == "ppo":
        _check_ppo_backend(recipe, launch)
    _check_deepspeed_values(recipe, launch)
    _check_sharded_quantization(recipe, launch)
    if recipe.stage == "ppo":
        _check_ppo_batches(recipe, launch)
    return launch


def _check_ppo_backend(recipe: Recipe, launch: Launch) -> None:
    if launch.shards_parameters:
        raise PipelineError(f"{recipe.path}: this launch uses {launch.backend}, which shards every parameter over "
                            "the processes, but PPO samples answers with generate() from the model it trains and "
                            "needs whole parameters on each rank (DDP or DeepSpeed ZeRO-1/2, which shard only "
                            f"gradients and optimizer states); {PPO_LAUNCH_HINT}")


def _check_deepspeed_values(recipe: Recipe, launch: Launch) -> None:
    fixed = launch.deepspeed_values
    for ds_key, (recipe_key, default) in _DEEPSPEED_RECIPE_KEYS.items():
        if ds_key not in fixed:
            continue
        wanted = recipe.config.get(recipe_key, default)
        if wanted is None or not math.isclose(float(wanted), fixed[ds_key]):
            raise RecipeError(recipe.path, f"training.{recipe_key}",
                              f"the recipe says {wanted} but the DeepSpeed config fixes {ds_key} = "
                              f"{fixed[ds_key]:g} ({launch.deepspeed_sources[ds_key]}); leave {ds_key} out of the "
                              "DeepSpeed config so it follows the recipe (accelerate_configs/README.md), or set "
                              "the recipe to the same value")
    if "train_batch_size" in fixed:
        per_device = recipe.config.get("per_device_train_batch_size", 8)
        accumulation = recipe.config.get("gradient_accumulation_steps", 1)
        product = per_device * accumulation * launch.world_size
        if product != fixed["train_batch_size"]:
            raise RecipeError(recipe.path, "training.per_device_train_batch_size",
                              f"per_device_train_batch_size {per_device} x gradient_accumulation_steps "
                              f"{accumulation} x {launch.world_size} processes = {product}, but the DeepSpeed "
                              f"config fixes train_batch_size = {fixed['train_batch_size']:g} "
                              f"({launch.deepspeed_sources['train_batch_size']}); set it to \"auto\"")


def _check_sharded_quantization(recipe: Recipe, launch: Launch) -> None:
    quant = recipe.model.quantization
    if not (quant.load_in_4bit and launch.shards_parameters):
        return
    from rlhf_pipeline.models import resolve_dtype

    compute_name = quant.bnb_4bit_compute_dtype if quant.bnb_4bit_compute_dtype != "auto" else recipe.model.dtype
    compute = str(resolve_dtype(compute_name)).removeprefix("torch.")
    storage = quant.bnb_4bit_quant_storage
    if storage is None or str(resolve_dtype(storage)).removeprefix("torch.") != compute:
        raise RecipeError(recipe.path, "model.quantization.bnb_4bit_quant_storage",
                          f"{launch.backend} shards the 4-bit base over the processes, which needs the 4-bit "
                          f"weights stored in the compute dtype; set bnb_4bit_quant_storage: {compute} "
                          f"(now: {storage or 'uint8, the default'})")


def _check_ppo_batches(recipe: Recipe, launch: Launch) -> None:
    from rlhf_pipeline.ppo.config import PPOConfig

    config = PPOConfig(**recipe.config)
    per_process = config.rollout_batch_size
    global_batch = per_process * launch.world_size
    shape = f"{per_process} prompts per process x {launch.world_size} process(es)"
    if launch.world_size > 1 and config.total_episodes is not None and config.total_episodes % global_batch:
        steps = math.ceil(config.total_episodes / global_batch)
        raise RecipeError(recipe.path, "training.total_episodes",
                          f"{config.total_episodes} episodes do not divide into the global rollout batch of "
                          f"{global_batch} ({shape}): the run would train {steps * global_batch}; set "
                          f"total_episodes to a multiple of {global_batch} (e.g. {steps * global_batch}), or "
                          "change per_device_train_batch_size / gradient_accumulation_steps / num_mini_batches")
    available = count_prompt_rows(recipe)
    if available is not None and available < global_batch:
        raise RecipeError(recipe.path, "data.train",
                          f"at most {available} prompts, fewer than one global rollout batch of {global_batch} "
                          f"({shape}); add prompts, or lower per_device_train_batch_size / "
                          "gradient_accumulation_steps / num_mini_batches, or launch fewer processes")


def count_prompt_rows(recipe: Recipe) -> int | None:
    """Rows in the recipe's local JSON/JSONL cards (an upper bound on its prompts); None if not cheap to know."""
    from rlhf_pipeline.data.loading import read_card_rows

    total = 0
    for card in recipe.cards:
        path = card.local_path()
        if path is None or path.suffix not in (".json", ".jsonl"):
            return None
        total += len(read_card_rows(card)[0])
    return total
