"""Server mode: a vLLM server on localhost, started from the environment that has vLLM (.venv-vllm on this
machine: `make test` passes its Python as RLHF_VLLM_PYTHON), sampling for a label stage and following a PPO run's
policy versions. These tests run in the main environment: the pipeline and the server need not share one.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.engines.conftest import PROMPTS, greedy, hf_greedy, ppo_roles
from tests.stages.conftest import write_label_recipe

REPO = Path(__file__).resolve().parents[2]


def vllm_python() -> str | None:
    """The interpreter of an environment with vLLM: RLHF_VLLM_PYTHON, else the repository's .venv-vllm."""
    candidate = os.environ.get("RLHF_VLLM_PYTHON") or str(REPO / ".venv-vllm" / "bin" / "python")
    return candidate if Path(candidate).is_file() else None


pytestmark = pytest.mark.skipif(vllm_python() is None, reason="no Python with vLLM to start a server from: run "
                                "`make vllm-env` (or set RLHF_VLLM_PYTHON); `make test` does both")


def generation(**values: Any) -> dict[str, Any]:
    return {"engine": "vllm", "mode": "server", "dtype": "float32", "enforce_eager": True, "kv_cache_gib": 1} | values


def test_a_label_stage_samples_through_a_server_it_starts_and_stops(tmp_path: Path, engine_model_dir: Path) -> None:
    from rlhf_pipeline.pipeline import run_stage
    from rlhf_pipeline.stages import load_recipe

    path = write_label_recipe(tmp_path, engine_model_dir, [chat[0]["content"] for chat in PROMPTS],
                              {"num_samples": 3, "max_new_tokens": 12, "min_gap": 0.0, "pairs": "all"},
                              judge={"type": "vader"}, generation=generation(server_python=vllm_python()))
    metrics = run_stage(load_recipe(path), overwrite=False)
    assert metrics["counts"]["answers"] == 3 * len(PROMPTS)
    ranked = [json.loads(line) for line in (tmp_path / "outputs" / "label" / "ranked.jsonl").read_text().splitlines()]
    assert len(ranked) == len(PROMPTS) and all(len(row["answers"]) == 3 for row in ranked)
    assert sum(bool(answer.strip()) for row in ranked for answer in row["answers"]) > len(PROMPTS)
    manifest = json.loads((tmp_path / "outputs" / "label" / "stage.json").read_text())
    sampling = manifest["metrics"]["resources"]["sampling"]
    assert sampling["engine"] == "vllm" and sampling["sampled_tokens"] > 0 and sampling["tokens_per_second"] > 0
    assert "Sampled with vllm" in (tmp_path / "outputs" / "label" / "report.md").read_text()
    leftover = subprocess.run(["pgrep", "-f", f"--model {engine_model_dir}"], capture_output=True, text=True)
    assert leftover.stdout.strip() == ""  # the stage stopped the server it started


@pytest.fixture(scope="module")
def user_server(engine_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A server started the way a user would (docs/vllm.md), its URL; stopped after the module."""
    from rlhf_pipeline.engines.spec import GenerationSpec
    from rlhf_pipeline.engines.versions import engine_environment
    from rlhf_pipeline.engines.vllm_local import engine_arguments
    from rlhf_pipeline.engines.vllm_server import free_port, server_command, wait_until_ready

    spec = GenerationSpec(**generation())
    port, log = free_port(), tmp_path_factory.mktemp("server") / "server.log"
    command = server_command(vllm_python(), engine_model_dir, engine_model_dir, port,
                             engine_arguments(spec, "merged", None))
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                   env={**os.environ, **engine_environment(spec)})
    try:
        wait_until_ready(f"http://127.0.0.1:{port}", 600, process, log)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=60)


def test_a_ppo_run_syncs_its_policy_versions_to_a_users_server(user_server: str, engine_model_dir: Path,
                                                               adapters: dict[str, Path], tmp_path: Path) -> None:
    from rlhf_pipeline.chat import encode_prompt
    from rlhf_pipeline.engines.spec import GenerationSpec
    from rlhf_pipeline.generation import open_engine
    from rlhf_pipeline.ppo.roles import POLICY
    from rlhf_pipeline.ppo.trainer import PPOTrainer
    from tests.engines.test_vllm_colocated import length_reward, ppo_config

    shared, tokenizer, _ = ppo_roles(engine_model_dir, adapters)
    engine = open_engine(GenerationSpec(**generation(server_url=user_server)), shared, tokenizer, 32,
                         engine_model_dir)
    try:
        before = hf_greedy(shared, POLICY, tokenizer)
        assert greedy(engine, shared, POLICY, tokenizer, version="before") == before
        config = ppo_config(tmp_path)
        config.total_episodes = 16  # two PPO steps: two policy versions synced to the server
        trainer = PPOTrainer(config, shared, length_reward, tokenizer,
                             [encode_prompt(tokenizer, chat) for chat in PROMPTS[:8]], engine=engine)
        trainer.train()
        assert engine.stats.syncs == 3 and len(trainer.log_history) >= 2  # before, step 0's policy, step 1's
        assert all(entry["generation/logprob_gap"] < 1e-3 for entry in trainer.log_history if "step" in entry
                   and "generation/logprob_gap" in entry)
        after = hf_greedy(shared, POLICY, tokenizer)
        assert after != before
        assert greedy(engine, shared, POLICY, tokenizer, version=trainer.global_step) == after
    finally:
        engine.close()


def test_grpo_samples_each_step_through_the_engine(user_server: str, tmp_path: Path, engine_model_dir: Path) -> None:
    from rlhf_pipeline.pipeline import run_stage
    from rlhf_pipeline.stages import load_recipe
    from tests.stages.conftest import write_recipe
    from tests.stages.test_policy_training import ONLINE

    write_label_recipe(tmp_path, engine_model_dir, [chat[0]["content"] for chat in PROMPTS[:8]])  # its prompt card
    path = write_recipe(tmp_path, engine_model_dir, "grpo", ["prompts"], {"max_steps": 2, **ONLINE},
                        data={"train": ["prompts"], "eval_split": 0.0, "max_length": 96},
                        reward={"functions": ["tests.stages.judges:letter_e_share"]},
                        generation=generation(server_url=user_server))
    metrics = run_stage(load_recipe(path), overwrite=False)
    assert 0 <= metrics["final"]["rewards/letter_e_share/mean"] <= 1
    manifest = json.loads((tmp_path / "outputs" / "grpo" / "stage.json").read_text())
    sampling = manifest["metrics"]["resources"]["sampling"]
    assert sampling["engine"] == "vllm" and sampling["syncs"] == 2  # the adapter of step 0, then of step 1
