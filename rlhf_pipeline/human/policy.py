"""The probing page's live answers: the policy of a label recipe, loaded once, answering one prompt at a time.

Loading and sampling are the label stage's own (stages/common.load_frozen, generation.sample_answers and the
recipe's `generation:` engine), so a probe sees exactly the answers the label stage would sample: same model,
chat template, settings and engine. The engine lives as long as the page does.
"""

from __future__ import annotations

from collections.abc import Callable

from rlhf_pipeline.errors import PipelineError


def policy_generator(recipe_path: str, overrides: list[str] | None = None) -> Callable[[str], str]:
    """Load the recipe's policy (checked first, before any weights) and return prompt text -> answer text."""
    from rlhf_pipeline.generation import open_engine, sample_answers
    from rlhf_pipeline.stages import load_recipe
    from rlhf_pipeline.stages.common import load_frozen

    recipe = load_recipe(recipe_path, overrides or [])
    if recipe.stage != "label":
        raise PipelineError(f"{recipe_path}: a label recipe is needed (its model is the policy probed); "
                            f"this one is for '{recipe.stage}'")
    config = recipe.settings
    sources, tokenizer, models = load_frozen(recipe, {"policy": recipe.model.name_or_path})
    engine = open_engine(recipe.sections["generation"], models["policy"], tokenizer, 1, sources["policy"].path)
    engine.use(models["policy"], "policy")
    system = recipe.data.system_prompt

    def generate(text: str) -> str:
        prompt = ([{"role": "system", "content": system}] if system is not None else []) + [
            {"role": "user", "content": text}]
        return sample_answers(engine, tokenizer, [prompt], 1, config.max_new_tokens, config.temperature,
                              config.top_p, config.seed, "probing")[0][0].text

    return generate
