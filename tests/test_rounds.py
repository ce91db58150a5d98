"""Iterated RLHF on the tiny model: two rounds of label → rm → ppo → eval after SFT (rlhf_pipeline/rounds.py).

One chain is run for the whole module: `rlhf-pipeline run` in a subprocess, stopped with SIGTERM once round 2's
PPO has a checkpoint, then run again in this process (round 1 skipped, round 2 resumed), then once more (all
skipped). The tests read what those runs left: lineage, the RM's before/after accuracy, the summary, and how the
stop conditions end a round.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from rlhf_pipeline.errors import PipelineError, RecipeError
from rlhf_pipeline.outputs import CHECKPOINT_STATE, read_manifest
from rlhf_pipeline.pipeline import read_pipeline, run_pipeline, validate_pipeline
from rlhf_pipeline.reward import RewardModel
from tests.stages.conftest import sft_rows, write_card

JUDGE = {"type": "callable", "function": "tests.stages.judges:letter_e_share"}
ROOT = Path(__file__).resolve().parents[1]
ROUND_STAGES = ("label", "rm", "ppo", "eval")


def _write_chain(folder: Path, model_dir: Path) -> Path:
    write_card(folder, "chat", sft_rows(32), "messages", ["sft"])
    write_card(folder, "prompts", [{"prompt": f"Say something about topic {i}."} for i in range(24)],
               "prompt_only", ["label", "ppo", "eval"])
    out = folder / "outputs"
    lora = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0}
    small = {"per_device_train_batch_size": 8, "per_device_eval_batch_size": 8, "learning_rate": 5e-3,
             "logging_steps": 1, "save_steps": 50, "eval_strategy": "no", "seed": 0}
    prompts = {"train": ["prompts"], "eval_split": 0.0, "max_length": 96}
    recipes = {
        "sft": {"stage": "sft", "model": {"name_or_path": str(model_dir), "lora": lora},
                "data": {"train": ["chat"], "eval_split": 0.25, "max_length": 96},
                "training": {"output_dir": str(out / "sft"), "max_steps": 3} | small},
        "label": {"stage": "label", "model": {"name_or_path": str(out / "sft")}, "data": prompts, "judge": JUDGE,
                  "labelling": {"output_dir": str(out / "label"), "num_samples": 4, "max_new_tokens": 12,
                                "min_gap": 0.0, "pairs": "all", "batch_size": 32}},
        "rm": {"stage": "rm", "model": {"name_or_path": str(out / "sft"), "lora": lora},
               "data": {"train": [str(out / "label" / "data_card.yaml")], "eval_split": 0.2, "max_length": 96},
               "training": {"output_dir": str(out / "rm"), "max_steps": 3} | small},
        "ppo": {"stage": "ppo", "model": {"name_or_path": str(out / "sft"), "lora": lora}, "data": prompts,
                "training": {"output_dir": str(out / "ppo"), "reward_model_path": str(out / "rm"),
                             "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1,
                             "response_length": 8, "total_episodes": 24, "num_ppo_epochs": 1, "save_steps": 2,
                             "learning_rate": 5e-3,
                             "normalize_reward": True, "num_sample_generations": 0, "disable_tqdm": True,
                             "seed": 0}},
        "eval": {"stage": "eval", "model": {"name_or_path": str(out / "sft")}, "data": prompts, "judge": JUDGE,
                 "evaluation": {"output_dir": str(out / "eval"), "policy": str(out / "ppo"),
                                "reward_model": str(out / "rm"), "max_new_tokens": 12, "bootstrap_samples": 200}},
    }
    for name, recipe in recipes.items():
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    return _write_pipeline(folder)


def _write_pipeline(folder: Path, **settings: Any) -> Path:
    rounds = {"count": 2, "reference": "sft", "rm_data": "accumulated", "held_out": 0.25} | settings
    pipeline = folder / "pipeline.yaml"
    pipeline.write_text(yaml.safe_dump({"name": "tiny-rounds", "stages": [{"stage": "sft", "recipe": "sft.yaml"}],
                                        "rounds": rounds | {"stages": [{"stage": name, "recipe": f"{name}.yaml"}
                                                                       for name in ROUND_STAGES]}}))
    return pipeline


@dataclass
class Chain:
    pipeline: Path
    out: Path
    killed_status: int
    killed_log: str
    resumed: dict[str, Any]
    again: dict[str, Any]
    again_seconds: float


def _complete(checkpoint: Path) -> bool:
    try:
        json.loads((checkpoint / CHECKPOINT_STATE).read_text())
    except (OSError, ValueError):
        return False
    return True


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Chain:
    """The chain stopped by SIGTERM in round 2's PPO, resumed, then run once more."""
    folder = tmp_path_factory.mktemp("rounds")
    pipeline = _write_chain(folder, tiny_model_dir)
    out = folder / "outputs"
    target = out / "round-2" / "ppo"
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                        "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
    log = folder / "killed.log"
    with log.open("wb") as sink:
        process = subprocess.Popen([sys.executable, "-m", "rlhf_pipeline", "run", str(pipeline)], stdout=sink,
                                   stderr=subprocess.STDOUT, env=env, cwd=folder)
        try:
            deadline = time.monotonic() + 300
            while not (target.is_dir() and any(_complete(c) for c in target.glob("checkpoint-*"))):
                assert process.poll() is None, f"the chain ended before round 2's PPO checkpoint:\n{log.read_text()}"
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.02)
            os.kill(process.pid, signal.SIGTERM)
            process.wait(timeout=120)
        finally:
            process.kill()
            process.wait()
    resumed = run_pipeline(pipeline)
    started = time.monotonic()
    again = run_pipeline(pipeline)
    return Chain(pipeline, out, process.returncode, log.read_text(), resumed, again, time.monotonic() - started)


def _manifest(folder: Path) -> Any:
    manifest = read_manifest(folder)
    assert manifest is not None, f"{folder} is not finished"
    return manifest


def _metrics(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "metrics.json").read_text())


def test_rounds_expand_into_stages_with_their_own_folders(chain: Chain) -> None:
    _, steps = read_pipeline(chain.pipeline)
    assert [step.key for step in steps] == ["sft", *(f"round-{n}/{s}" for n in (1, 2) for s in ROUND_STAGES)]
    recipes = validate_pipeline(chain.pipeline)
    assert [r.output_dir for r in recipes] == [chain.out / "sft", *(chain.out / f"round-{n}" / s
                                                                    for n in (1, 2) for s in ROUND_STAGES)]


def test_sigterm_in_round_2_resumes_round_2_and_skips_round_1(chain: Chain) -> None:
    assert chain.killed_status == 128 + signal.SIGTERM, chain.killed_log
    assert "stopped by SIGTERM after step" in chain.killed_log
    assert "[8/9] round-2/ppo: running" in chain.killed_log
    assert all(chain.resumed[key] == "skipped"
               for key in ("sft", "round-1/label", "round-1/rm", "round-1/ppo", "round-1/eval", "round-2/label",
                           "round-2/rm"))
    ppo = chain.resumed["round-2/ppo"]
    assert ppo["resumed_from"] is not None and ppo["resumed_from"].startswith(str(chain.out / "round-2" / "ppo"))
    assert ppo["global_steps"] == 6
    assert isinstance(chain.resumed["round-2/eval"], dict)
    assert set(chain.again.values()) == {"skipped"} and len(chain.again) == 9
    assert chain.again_seconds < 20


def test_round_2_starts_from_round_1s_policy_and_reward_model(chain: Chain) -> None:
    sft, one, two = (chain.out / "sft").resolve(), chain.out / "round-1", chain.out / "round-2"
    # round 1 starts from the SFT policy (no earlier ppo or rm in the pipeline's stages)
    assert _manifest(one / "label").lineage == [str(sft)]
    assert _manifest(one / "rm").lineage == [str(sft)]
    assert _manifest(one / "ppo").lineage == [str(sft)]
    # round 2: label samples from round 1's policy (other answers, same seed); the RM continues round 1's; PPO
    # starts from round 1's policy
    answers = [[row["answers"] for row in map(json.loads, (folder / "label" / "ranked.jsonl").read_text().splitlines())]
               for folder in (one, two)]
    assert answers[0] != answers[1]
    assert _manifest(two / "label").lineage == [str(sft), str((one / "ppo").resolve())]
    assert _manifest(two / "rm").lineage == [str(sft), str((one / "rm").resolve())]
    ppo = _manifest(two / "ppo")
    assert ppo.lineage == [str(sft), str((one / "ppo").resolve())]
    assert ppo.extra["reward_model"] == str(two / "rm")
    assert Path(ppo.extra["reference"]).resolve() == sft  # reference: sft
    evaluated = json.loads((two / "eval" / "eval.json").read_text())
    assert evaluated["policies"]["policy"]["path"] == str(two / "ppo")


def test_refreshed_rm_trains_on_every_rounds_pairs_and_is_measured_before_and_after(chain: Chain) -> None:
    one, two = chain.out / "round-1", chain.out / "round-2"
    labels = [_metrics(folder / "label")["counts"] for folder in (one, two)]
    for counts, folder in zip(labels, (one, two), strict=True):
        assert counts["held_out_prompts"] == 6  # 25% of 24 prompts
        held_out = (folder / "label" / "preferences_eval.jsonl").read_text().splitlines()
        trained = (folder / "label" / "preferences.jsonl").read_text().splitlines()
        assert len(held_out) == counts["held_out_pairs"] and len(trained) == counts["pairs"] - len(held_out)
        held_prompts = {json.dumps(json.loads(line)["prompt"]) for line in held_out}
        assert held_prompts.isdisjoint(json.dumps(json.loads(line)["prompt"]) for line in trained)
    first, second = _metrics(one / "rm"), _metrics(two / "rm")
    assert first["before"] is None  # round 1's RM starts from the SFT policy: nothing to refresh
    assert first["data"]["rows_kept"] == labels[0]["pairs"]  # its new pairs: trained and held out
    assert second["data"]["rows_kept"] == labels[0]["pairs"] - labels[0]["held_out_pairs"] + labels[1]["pairs"]
    assert second["eval"]["pairs"] == labels[1]["held_out_pairs"]
    assert second["before"]["reward_model"] == str(one / "rm")
    assert second["before"]["pairs"] == second["eval"]["pairs"]
    held_out = [json.loads(line) for line in (two / "label" / "preferences_eval.jsonl").read_text().splitlines()]
    scorer = RewardModel.from_stage(one / "rm")
    chosen, rejected = (scorer.score([row["prompt"] for row in held_out], [row[side] for row in held_out])
                        for side in ("chosen", "rejected"))
    wins = sum(c > r for c, r in zip(chosen, rejected, strict=True))
    assert second["before"]["eval_accuracy"] == pytest.approx(wins / len(held_out))  # round 1's RM, scored again


@pytest.mark.parametrize("round_number", [1, 2])
def test_no_refreshed_rm_trains_on_a_held_out_prompt(chain: Chain, round_number: int) -> None:
    """Each round's RM is measured on prompts that no card it trained on holds: every round holds out the same
    prompts, and pairs on them in other cards are dropped from training (data.eval_overlap: drop)."""
    folder = chain.out / f"round-{round_number}"
    held_out = {json.dumps(json.loads(line)["prompt"])
                for line in (folder / "label" / "preferences_eval.jsonl").read_text().splitlines()}
    recipe = yaml.safe_load((folder / "rm" / "recipe.yaml").read_text())
    assert recipe["data"]["eval_overlap"] == "drop" and len(recipe["data"]["train"]) == round_number
    for card in recipe["data"]["train"]:
        pairs = Path(card).parent / "preferences.jsonl"
        assert held_out.isdisjoint(json.dumps(json.loads(line)["prompt"]) for line in pairs.read_text().splitlines())
    data = _metrics(folder / "rm")["data"]
    assert data["eval_prompts_in_train"] == 0
    assert data["splits"]["eval"]["prompts"] == len(held_out)


def test_refresh_carries_the_score_head_and_reference_sft_keeps_the_sft_log_probs(chain: Chain) -> None:
    """The refresh starts from round 1's RM whole (head included); round 2's PPO reference is the SFT policy."""
    import dataclasses

    import torch

    from rlhf_pipeline.models import REWARD, load_tokenizer, read_score_head
    from rlhf_pipeline.ppo.roles import POLICY, REFERENCE, build_ppo_model
    from rlhf_pipeline.sources import resolve_source
    from rlhf_pipeline.stages.common import load_for_training

    recipes = {r.output_dir: r for r in validate_pipeline(chain.pipeline)}
    one, two = chain.out / "round-1", chain.out / "round-2"
    rm = load_for_training(recipes[two / "rm"], task=REWARD).model
    heads = [p for name, p in rm.named_parameters() if "score" in name and "modules_to_save" in name]
    assert len(heads) == 1 and torch.equal(heads[0].detach(), read_score_head(one / "rm").to(heads[0].dtype))

    recipe = recipes[two / "ppo"]
    spec = recipe.model

    def source(folder: Path) -> Any:
        return resolve_source(dataclasses.replace(spec, name_or_path=str(folder)))

    tokenizer = load_tokenizer(source(chain.out / "sft"), spec)
    model = build_ppo_model(source(chain.out / "sft"), source(two / "rm"), spec, tokenizer,
                            policy_init=source(one / "ppo"))
    plain_sft = build_ppo_model(source(chain.out / "sft"), source(two / "rm"), spec, tokenizer)
    plain_one = build_ppo_model(source(one / "ppo"), source(two / "rm"), spec, tokenizer)
    ids = torch.tensor([tokenizer("Say something about topic 3.")["input_ids"]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        reference, policy = model(REFERENCE, ids, mask), model(POLICY, ids, mask)
        assert torch.allclose(reference, plain_sft(REFERENCE, ids, mask), atol=1e-5)
        assert torch.allclose(policy, plain_one(REFERENCE, ids, mask), atol=1e-5)
        assert not torch.allclose(reference, policy, atol=1e-3)  # round 1's PPO moved the policy


@pytest.mark.parametrize("writer", ["run", "report command"])
def test_summary_has_a_row_and_a_plot_per_round(chain: Chain, writer: str) -> None:
    """The chain's summary has one row per round; `rlhf-pipeline report` on the output folder rewrites the same."""
    from rlhf_pipeline.cli import main

    if writer == "run":
        run_pipeline(_write_pipeline(chain.pipeline.parent))
    else:
        written = (chain.out / "report.md").read_text()
        (chain.out / "report.md").unlink()
        (chain.out / "rounds.png").unlink()
        assert main(["report", str(chain.out)]) == 0
        assert (chain.out / "report.md").read_text().replace("Run outputs", "Pipeline tiny-rounds") == written
    report = (chain.out / "report.md").read_text()
    table = report[report.index("## Rounds"):].splitlines()
    rows = [line for line in table if line.startswith("| 1 |") or line.startswith("| 2 |")]
    assert len(rows) == 2
    second = _metrics(chain.out / "round-2" / "rm")
    cells = [cell.strip() for cell in rows[1].strip("|").split("|")]
    assert cells[2] == f"{second['before']['eval_accuracy']:.3f}" and cells[3] == f"{second['eval_accuracy']:.3f}"
    assert [cell.strip() for cell in rows[0].strip("|").split("|")][2] == "—"  # no RM before round 1's
    evaluated = json.loads((chain.out / "round-2" / "eval" / "eval.json").read_text())["policies"]["policy"]
    assert cells[5].startswith(f"{evaluated['judge_gain']['mean']:+.3f} [")
    assert cells[8] == f"{evaluated['kl']['mean']:.3f}"
    assert (chain.out / "rounds.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_too_few_new_pairs_stops_the_round_naming_it(chain: Chain, capsys: pytest.CaptureFixture[str]) -> None:
    pairs = [_metrics(chain.out / f"round-{n}" / "label")["counts"]["pairs"] for n in (1, 2)]
    threshold = pairs[1] + 1
    stopped_in = 1 if pairs[0] < threshold else 2
    pipeline = _write_pipeline(chain.pipeline.parent, min_new_pairs=threshold)
    with pytest.raises(PipelineError, match=rf"^round {stopped_in}: the label stage \(.*round-{stopped_in}/label\) "
                                            rf"kept {pairs[stopped_in - 1]} new pairs after the judge's gap filter "
                                            rf".*, fewer than rounds.min_new_pairs {threshold}; its later stages and "
                                            "rounds do not run; the stages finished so far stay finished"):
        run_pipeline(pipeline)
    assert "pipeline stopped in " in capsys.readouterr().out
    for stage in ROUND_STAGES:  # nothing finished is undone
        assert read_manifest(chain.out / "round-1" / stage) is not None


def test_rm_below_the_threshold_stops_the_round_naming_it(chain: Chain) -> None:
    accuracies = [_metrics(chain.out / f"round-{n}" / "rm")["eval_accuracy"] for n in (1, 2)]
    stopped_in = next((n for n, a in zip((1, 2), accuracies, strict=True) if a < 1.0), None)
    if stopped_in is None:
        pytest.skip("both refreshed RMs are perfect on their held-out pairs: no threshold above them")
    pipeline = _write_pipeline(chain.pipeline.parent, min_rm_accuracy=1.0)
    with pytest.raises(PipelineError, match=rf"^round {stopped_in}: the refreshed reward model \(.*round-{stopped_in}"
                                            rf"/rm\) has held-out accuracy {accuracies[stopped_in - 1]:.3f} on \d+ "
                                            r"new pairs.*, below rounds.min_rm_accuracy 1.0"):
        run_pipeline(pipeline)
    assert read_manifest(chain.out / f"round-{stopped_in}" / "rm") is not None


@pytest.mark.parametrize(("settings", "stages", "message"), [
    ({"reference": "base"}, ROUND_STAGES, "rounds.reference: sft .* or previous"),
    ({"rm_data": "all"}, ROUND_STAGES, "rounds.rm_data: accumulated .* or new"),
    ({"held_out": 0}, ROUND_STAGES, "rounds.held_out: a share"),
    ({"count": 0}, ROUND_STAGES, "rounds.count: at least 1 round"),
    ({"cuont": 2}, ROUND_STAGES, "rounds.cuont: unknown key; did you mean count\\?"),
    ({}, ("rm", "label", "ppo"), "rounds.stages: a round runs label, rm, ppo and optionally eval, in this order; "
                                 "got rm, label, ppo"),
])
def test_bad_rounds_fail_before_anything_loads(tmp_path: Path, settings: dict[str, Any], stages: tuple[str, ...],
                                                message: str) -> None:
    for name in ROUND_STAGES:
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump({"stage": name, "x": {"output_dir": f"out/{name}"}}))
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(yaml.safe_dump({"rounds": {"count": 2} | settings | {
        "stages": [{"stage": name, "recipe": f"{name}.yaml"} for name in stages]}}))
    with pytest.raises(RecipeError, match=message):
        read_pipeline(pipeline)


def test_validate_names_every_rounds_stage(chain: Chain, capsys: pytest.CaptureFixture[str]) -> None:
    from rlhf_pipeline.cli import main

    assert main(["validate", str(chain.pipeline)]) == 0
    keys = " -> ".join(["sft", *(f"round-{n}/{s}" for n in (1, 2) for s in ROUND_STAGES)])
    assert capsys.readouterr().out == f"{chain.pipeline}: valid pipeline ({keys})\n"


def test_reference_previous_and_new_pairs_only_change_what_round_2_reads(chain: Chain) -> None:
    pipeline = _write_pipeline(chain.pipeline.parent, reference="previous", rm_data="new")
    steps = {step.key: step for step in read_pipeline(pipeline)[1]}
    recipes = {r.output_dir: r for r in validate_pipeline(pipeline)}
    one, two = chain.out / "round-1", chain.out / "round-2"
    ppo = recipes[two / "ppo"]
    assert ppo.model.name_or_path == str(one / "ppo") and ppo.config.get("policy_init") is None
    assert recipes[one / "ppo"].model.name_or_path == str(chain.out / "sft")  # round 1: the recipe's own start
    assert recipes[two / "rm"].data.train == [str(two / "label" / "data_card.yaml")]
    assert recipes[two / "rm"].data.eval == [str(two / "label" / "data_card_eval.yaml")]
    assert "labelling.eval_split=0.25" in steps["round-2/label"].overrides


def test_rounds_after_a_whole_chain_start_from_its_policy_and_reward_model() -> None:
    """The shipped recipe: round 1 builds on the demo chain's PPO policy and RM, and its pairs join the refresh."""
    steps = {step.key: step for step in read_pipeline(ROOT / "recipes" / "smollm2-135m" / "iterated.yaml")[1]}
    demo = "outputs/smollm2-135m"
    assert f"model.name_or_path={demo}/ppo" in steps["round-1/label"].overrides
    assert f"model.name_or_path={demo}/rm" in steps["round-1/rm"].overrides
    assert f"training.policy_init={demo}/ppo" in steps["round-1/ppo"].overrides
    assert (f"data.train=[{demo}/label/data_card.yaml, {demo}/round-1/label/data_card.yaml, "
            f"{demo}/round-2/label/data_card.yaml]") in steps["round-2/rm"].overrides
    assert f"training.policy_init={demo}/round-1/ppo" in steps["round-2/ppo"].overrides
    assert f"evaluation.policy={demo}/round-2/ppo" in steps["round-2/eval"].overrides


def test_from_names_a_rounds_stage_on_the_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    """`run --from round-2/ppo` reaches the pipeline, which knows its steps; a step it lacks is refused, listed."""
    from rlhf_pipeline.cli import main, make_parser

    iterated = str(ROOT / "recipes" / "smollm2-135m" / "iterated.yaml")
    assert make_parser().parse_args(["run", iterated, "--from", "round-2/ppo"]).start == "round-2/ppo"
    assert main(["run", iterated, "--from", "round-3/ppo"]) == 2
    error = capsys.readouterr().err
    assert "--from: no stage 'round-3/ppo' in this pipeline" in error and "round-2/ppo, round-2/eval" in error


def test_policy_init_must_be_a_finished_policy(chain: Chain) -> None:
    from rlhf_pipeline.stages import load_recipe

    step = next(step for step in read_pipeline(chain.pipeline)[1] if step.key == "round-2/ppo")
    with pytest.raises(RecipeError, match=r"training.policy_init: .*round-1/rm holds a finished 'rm' stage, not a "
                                          r"policy; point it at the output_dir of a policy stage \(sft, ppo, dpo"):
        load_recipe(step.recipe, [*step.overrides, f"training.policy_init={chain.out / 'round-1' / 'rm'}"])


def test_a_round_without_held_out_pairs_stops(tmp_path: Path) -> None:
    """The RM's before/after accuracy needs pairs from held-out prompts: a round with none cannot measure it."""
    from rlhf_pipeline.pipeline import PipelineStep
    from rlhf_pipeline.rounds import RoundsSpec, check_round

    (tmp_path / "metrics.json").write_text(json.dumps({"counts": {"pairs": 50, "held_out_pairs": 0,
                                                                  "held_out_prompts": 3}}))
    step = PipelineStep("label", tmp_path / "label.yaml", round=3, rounds=RoundsSpec(count=3, min_new_pairs=10))
    with pytest.raises(PipelineError, match=r"^round 3: none of the label stage's 50 new pairs \(.*\) comes from one "
                                            r"of its 3 held-out prompts, so the reward model cannot be measured"):
        check_round(step, tmp_path)
    (tmp_path / "metrics.json").write_text(json.dumps({"counts": {"pairs": 50, "held_out_pairs": 4}}))
    check_round(step, tmp_path)


def test_the_rm_keeps_its_recipes_other_cards(chain: Chain, tmp_path: Path) -> None:
    stages = [{"stage": name, "recipe": str(chain.pipeline.parent / f"{name}.yaml")} for name in ROUND_STAGES]
    stages[1]["overrides"] = {"data.train": [str(chain.out / "label" / "data_card.yaml"), "human_pairs"]}
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(yaml.safe_dump({"rounds": {"count": 2, "stages": stages}}))
    step = next(step for step in read_pipeline(pipeline)[1] if step.key == "round-2/rm")
    cards = [str(chain.out / f"round-{n}" / "label" / "data_card.yaml") for n in (1, 2)]
    assert [o for o in step.overrides if o.startswith("data.train=")][-1] == \
        f"data.train=[human_pairs, {cards[0]}, {cards[1]}]"
