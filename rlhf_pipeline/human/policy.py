"""The probing page's live answers: the policy of a label recipe, loaded once, answering one prompt at a time.

Loading and sampling are the label stage's own (stages/common.load_frozen, generation.sample_answers), so
a probe sees exactly the answers the label stage would sample: same model, chat template and settings.
"""

from __future__ import annotations

from collections.abc import Callable

from rlhf_pipeline.errors import PipelineError


def policy_generator(recipe_path: str, overrides: list[str] | None = None) -> Callable[[str], str]:
    """Load the recipe's policy (checked first, before any weights) and return prompt text -> answer text."""
    from rlhf_pipeline.generation import sample_answers
    from rlhf_pipeline.stages import load_recipe
    from rlhf_pipeline.stages.common import load_frozen

    recipe = load_recipe(recipe_path, overrides or [])
    if recipe.stage != "label":
        raise PipelineError(f"{recipe_path}: a label recipe is needed (its model is the policy probed); "
                            f"this one is for '{recipe.stage}'")
    config = recipe.settings
    _, tokenizer, models = load_frozen(recipe, {"policy": recipe.model.name_or_path})
    policy = models["policy"].use("policy")
    system = recipe.data.system_prompt

    def generate(text: str) -> str:
        prompt = ([{"role": "system", "content": system}] if system is not None else []) + [
            {"role": "user", "content": text}]
        return sample_answers(policy, tokenizer, [prompt], 1, config.max_new_tokens, config.temperature,
                              config.top_p, 1, config.seed, "probing")[0][0].text

    return generate
