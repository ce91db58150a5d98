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
* whatever the stage itself refuses (its `launch_checks`: PPO under a launch that shards parameters, PPO
  batches that do not fill the processes; stages/ppo.py).

Nothing heavy is imported at module level; `check_launch` takes the environment as a mapping so it can be
tested without launching anything.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

from rlhf_pipeline.distributed import Launch, read_launch
from rlhf_pipeline.errors import RecipeError
from rlhf_pipeline.stages import Stage, get_stage

if TYPE_CHECKING:
    from rlhf_pipeline.recipe import Recipe

# DeepSpeed config keys that must agree with the recipe: DeepSpeed key -> recipe key (default: the config class's).
_DEEPSPEED_RECIPE_KEYS = {
    "gradient_accumulation_steps": "gradient_accumulation_steps",
    "gradient_clipping": "max_grad_norm",
    "train_micro_batch_size_per_gpu": "per_device_train_batch_size",
}


def check_launch(recipe: Recipe, env: Mapping[str, str] | None = None) -> Launch:
    """Raise PipelineError (naming the recipe key and the fix) for a launch this recipe cannot run under.

    The checks every stage shares run here; a stage adds its own through its `launch_checks` (PPO's).
    """
    launch = read_launch(env)
    stage = get_stage(recipe.stage)
    _check_deepspeed_values(recipe, launch, stage)
    _check_sharded_quantization(recipe, launch)
    if stage.launch_checks is not None:
        stage.launch_checks(recipe, launch)
    return launch


def _check_deepspeed_values(recipe: Recipe, launch: Launch, stage: Stage) -> None:
    fixed = launch.deepspeed_values
    for ds_key, recipe_key in _DEEPSPEED_RECIPE_KEYS.items():
        if ds_key not in fixed:
            continue
        wanted = recipe.config.get(recipe_key, stage.config_default(recipe_key))
        if wanted is None or not math.isclose(float(wanted), fixed[ds_key]):
            raise RecipeError(recipe.path, f"training.{recipe_key}",
                              f"the recipe says {wanted} but the DeepSpeed config fixes {ds_key} = "
                              f"{fixed[ds_key]:g} ({launch.deepspeed_sources[ds_key]}); leave {ds_key} out of the "
                              "DeepSpeed config so it follows the recipe (accelerate_configs/README.md), or set "
                              "the recipe to the same value")
    if "train_batch_size" in fixed:
        per_device, accumulation = (recipe.config.get(key, stage.config_default(key))
                                    for key in ("per_device_train_batch_size", "gradient_accumulation_steps"))
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
