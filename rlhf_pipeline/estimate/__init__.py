"""`rlhf-pipeline estimate`: will this recipe fit? Peak memory per device, from the model's config.json alone.

    rlhf-pipeline estimate recipes/llama-3.1-8b-qlora/sft.yaml --gpu-memory 24GB
    rlhf-pipeline estimate recipes/mistral-7b-lora/sft.yaml --num-gpus 8 --gpu-memory 80GB --zero 3
    rlhf-pipeline estimate recipes/smollm2-135m/sft.yaml --cpu --json

No weights are read and nothing heavy is imported (no torch). Each step has its module, each importing only
the ones listed before it:

- `architecture.py`: the shapes memory depends on (`Architecture`, `Linear`, `targeted_linears`) and
  `find_config`, which reads `config.json` (embedded alias → its converted cache folder; local folder;
  finished stage output → its base; Hub id → the local Hugging Face cache).
- `memory.py`: the memory model, documented there: `estimate(Setup) -> Estimate`, a breakdown into `Row`s
  (weights, LoRA, trainable states, activations, PPO's phases).
- `verdict.py`: `cheapest_fix` re-runs the estimate with each candidate `Change` (and their combinations)
  and names the cheapest one that fits.
- `command.py`: a recipe and the command line's hardware → `Setup` (`setup_from_recipe`, `estimate_recipe`),
  the printed table (`render`), and the `estimate` command (`add_commands`).
"""

from rlhf_pipeline.estimate.architecture import Architecture, Linear, find_config, targeted_linears
from rlhf_pipeline.estimate.command import add_commands, estimate_recipe, parse_memory, render, setup_from_recipe
from rlhf_pipeline.estimate.memory import GIB, Estimate, Row, Setup, estimate, lora_params
from rlhf_pipeline.estimate.verdict import Change, cheapest_fix

__all__ = ["GIB", "Architecture", "Change", "Estimate", "Linear", "Row", "Setup", "add_commands", "cheapest_fix",
           "estimate", "estimate_recipe", "find_config", "lora_params", "parse_memory", "render",
           "setup_from_recipe", "targeted_linears"]
