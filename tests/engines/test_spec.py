"""The `generation:` section is checked before any weights load, and says how to install what is missing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from rlhf_pipeline.errors import RecipeError
from rlhf_pipeline.stages import load_recipe
from tests.stages.conftest import write_label_recipe


def label_recipe(tmp_path: Path, model_dir: Path, generation: dict[str, Any]) -> Path:
    return write_label_recipe(tmp_path, model_dir, [f"Tell me about topic {i}." for i in range(8)],
                              judge={"type": "vader"}, generation=generation)


@pytest.mark.parametrize(("generation", "key", "problem"), [
    ({"engine": "tgi"}, "generation.engine", "one of hf, vllm, got 'tgi'"),
    ({"engine": "vllm", "sync": "delta"}, "generation.sync", "one of auto, merged, lora"),
    ({"engine": "vllm", "mode": "remote"}, "generation.mode", "one of colocated, server"),
    ({"engine": "vllm", "server_url": "http://127.0.0.1:8000"}, "generation.mode", "are for mode: server"),
    ({"engine": "vllm", "mode": "server", "server_url": "localhost:8000"}, "generation.server_url",
     "an http(s) URL"),
    ({"engine": "vllm", "mode": "server", "server_url": "http://a:1", "server_python": "/usr/bin/python3"},
     "generation.server_python", "give one"),
    ({"engine": "vllm", "mode": "server", "server_python": "/no/such/python"}, "generation.server_python",
     "is not an executable Python"),
    ({"kv_cache_gib": 0}, "generation.kv_cache_gib", "must be > 0"),
    ({"engine": "vllm", "syncs": "merged"}, "generation.syncs", "did you mean sync"),
])
def test_bad_generation_settings_are_refused_naming_the_key(tmp_path: Path, tiny_model_dir: Path,
                                                            generation: dict[str, Any], key: str,
                                                            problem: str) -> None:
    path = label_recipe(tmp_path, tiny_model_dir, generation)
    with pytest.raises(RecipeError) as raised:
        load_recipe(path)
    assert (raised.value.file, raised.value.key) == (path, key)
    assert problem in raised.value.problem


def test_without_vllm_the_error_says_how_to_install_it(tmp_path: Path, tiny_model_dir: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from rlhf_pipeline.engines import spec

    monkeypatch.setattr(spec, "vllm_importable", lambda: False)
    colocated = label_recipe(tmp_path, tiny_model_dir, {"engine": "vllm"})
    with pytest.raises(RecipeError) as raised:
        load_recipe(colocated)
    assert raised.value.key == "generation.engine"
    assert "vllm is not installed" in raised.value.problem and "make vllm-env" in raised.value.problem
    assert "rlhf-pipeline[vllm]" in raised.value.problem and "generation.engine: hf" in raised.value.problem
    server = label_recipe(tmp_path, tiny_model_dir, {"engine": "vllm", "mode": "server"})
    with pytest.raises(RecipeError, match="name the Python of one that has it") as raised:
        load_recipe(server)
    assert raised.value.key == "generation.server_python"
    with_server = label_recipe(tmp_path, tiny_model_dir, {"engine": "vllm", "mode": "server",
                                                          "server_url": "http://127.0.0.1:8000"})
    assert load_recipe(with_server).sections["generation"].server_url == "http://127.0.0.1:8000"


def test_hf_is_the_default(tmp_path: Path, tiny_model_dir: Path) -> None:
    recipe = load_recipe(label_recipe(tmp_path, tiny_model_dir, {}))
    assert recipe.sections["generation"].engine == "hf" and recipe.resolved()["generation"]["sync"] == "auto"
