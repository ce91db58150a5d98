"""Architecture from config.json: parameter counts, and where config.json comes from (folder, finished stage,
Hub cache, embedded alias)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhf_pipeline import embedded
from rlhf_pipeline.errors import PipelineError
from rlhf_pipeline.estimate import Architecture, find_config
from tests.estimate.conftest import LLAMA2_7B, SMOLLM2, hub_cache


def test_parameter_count_of_smollm2_matches_the_published_135m() -> None:
    arch = Architecture.from_config(SMOLLM2)
    assert arch.total_params() == 134_515_008  # what torch counts after loading (tied embeddings)
    assert Architecture.from_config(LLAMA2_7B).total_params() == 6_738_415_616  # Llama-2-7b



def test_config_comes_from_folders_finished_stages_and_the_hub_cache(tiny_model_dir: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from rlhf_pipeline.outputs import StageManifest, mark_complete

    assert find_config(str(tiny_model_dir))[0]["hidden_size"] == 64
    stage = tmp_path / "sft"
    stage.mkdir()
    mark_complete(stage, StageManifest(stage="sft", fingerprint="x", base_model={"path": str(tiny_model_dir),
                                                                                "origin": str(tiny_model_dir)},
                                       adapter=True))
    assert find_config(str(stage))[0]["hidden_size"] == 64  # a finished stage: its base's config
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache(tmp_path / "hub", "org/Model-1.5B", LLAMA2_7B)))
    assert find_config("org/Model-1.5B")[0]["hidden_size"] == 4096  # a dot in the name is still a Hub id
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PipelineError, match=r"not in the local Hugging Face cache.*HF_HUB_OFFLINE"):
        find_config("org/not-downloaded")
    with pytest.raises(PipelineError, match="--base"):
        find_config("outputs/model/sft")


def test_embedded_alias_needs_the_converted_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RLHF_PIPELINE_CACHE", str(tmp_path))
    with pytest.raises(PipelineError, match="not converted yet"):
        find_config("smollm2-135m-instruct")
    folder = embedded.model_dir("smollm2-135m-instruct")
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(SMOLLM2))
    assert find_config("smollm2-135m-instruct")[0]["vocab_size"] == 49152
