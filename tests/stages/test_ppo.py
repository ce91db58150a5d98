"""The ppo stage end to end on the tiny model with the knobs PPO users reach for: PPO-ptx demonstrations,
an adaptive KL coefficient, an entropy bonus, a critic learning rate and warm-up, epoch early stopping."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from rlhf_pipeline.cli import main
from rlhf_pipeline.ppo.formulas import adaptive_kl_coef
from rlhf_pipeline.stages import load_recipe
from tests.stages.conftest import RecipeFactory, preference_rows, sft_rows, write_card


def record_updates(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """What each PPO update did, seen from inside it: the optimizer's learning rate per parameter group (and
    whether the second group is the critic's), the losses each micro-batch back-propagated beside the statistics
    it returned, the micro-batches each optimizer step took, and the statistics the update returned."""
    from rlhf_pipeline.ppo.roles import CRITIC
    from rlhf_pipeline.ppo.update import PolicyCriticUpdate

    updates: list[dict[str, Any]] = []
    call, micro_batch = PolicyCriticUpdate.__call__, PolicyCriticUpdate.train_micro_batch
    backward, optimizer_step = PolicyCriticUpdate._backward, PolicyCriticUpdate._optimizer_step

    def recording_call(self: Any, rollout: Any, train_policy: bool = True, step: int = 0) -> dict[str, float]:
        groups = self.optimizer.param_groups
        updates.append({"train_policy": train_policy, "lrs": [group["lr"] for group in groups],
                        "critic_group": {id(p) for p in groups[1]["params"]}
                        == {id(p) for p in self.model.role_parameters(CRITIC)},
                        "micro_batches": [], "steps": []})
        updates[-1]["result"] = call(self, rollout, train_policy, step)
        return updates[-1]["result"]

    def recording_micro_batch(self: Any, batch: Any, last: bool, train_policy: bool = True) -> dict[str, Any]:
        updates[-1]["micro_batches"].append({"losses": []})
        stats = micro_batch(self, batch, last, train_policy)
        updates[-1]["micro_batches"][-1]["stats"] = {name: float(value) for name, value in stats.items()}
        return stats

    def recording_backward(self: Any, loss: Any, last: bool) -> None:
        updates[-1]["micro_batches"][-1]["losses"].append(loss.item())
        backward(self, loss, last)

    def recording_step(self: Any) -> None:
        updates[-1]["steps"].append(len(updates[-1]["micro_batches"]))  # the micro-batches done so far
        optimizer_step(self)

    for name, method in (("__call__", recording_call), ("train_micro_batch", recording_micro_batch),
                         ("_backward", recording_backward), ("_optimizer_step", recording_step)):
        monkeypatch.setattr(PolicyCriticUpdate, name, method)
    return updates


def test_ppo_stage_with_ptx_and_the_knobs(tmp_path: Path, tiny_model_dir: Path, make_recipe: RecipeFactory,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from rlhf_pipeline.stages import rm

    write_card(tmp_path, "pairs", preference_rows(16), "prompt_chosen_rejected", ["rm"])
    write_card(tmp_path, "demos", sft_rows(12), "messages", ["sft"])
    write_card(tmp_path, "prompts", [{"prompt": f"Tell me about topic {i}."} for i in range(16)], "prompt_only",
               ["ppo"])
    rm.run(load_recipe(make_recipe("rm", ["pairs"], {"max_steps": 1}, data={"train": ["pairs"], "eval_split": 0.0})))
    target_kl = 1e-5  # low enough that updates stop early on this tiny model
    knobs = {"reward_model_path": str(tmp_path / "outputs" / "rm"), "per_device_train_batch_size": 2,
             "num_mini_batches": 2, "total_episodes": 12, "response_length": 6, "num_ppo_epochs": 2,
             "learning_rate": 1e-3, "ptx_coef": 0.5, "adap_kl_ctrl": True, "kl_coef": 0.1, "target": 0.5,
             "horizon": 40, "entropy_coef": 0.01, "critic_learning_rate": 2e-3, "critic_warmup_steps": 1,
             "early_stopping": True, "target_kl": target_kl, "save_steps": 10, "num_sample_generations": 0,
             "disable_tqdm": True}
    recipe = tmp_path / "ppo.yaml"
    recipe.write_text(yaml.safe_dump({
        "stage": "ppo", "model": {"name_or_path": str(tiny_model_dir), "lora": {"r": 8, "lora_alpha": 16}},
        "data": {"train": ["prompts"], "ptx": ["demos"], "eval_split": 0.0, "max_length": 96},
        "training": {"output_dir": str(tmp_path / "outputs" / "ppo"), "seed": 0, **knobs}}))
    updates = record_updates(monkeypatch)
    assert main(["ppo", str(recipe)]) == 0
    metrics = json.loads((tmp_path / "outputs" / "ppo" / "metrics.json").read_text())
    steps = [entry for entry in metrics["log_history"] if "objective/scores" in entry]
    assert [entry["step"] for entry in steps] == [1, 2, 3] and len(updates) == 3
    assert "loss/policy" not in steps[0] and "loss/ptx" not in steps[0]  # step 1 trains the critic only
    assert [update["train_policy"] for update in updates] == [False, True, True]
    assert all(entry["loss/ptx"] > 0 and "policy/entropy_bonus" in entry for entry in steps[1:])
    coef = 0.1
    for entry in steps:
        assert entry["objective/kl_coef"] == coef
        coef = adaptive_kl_coef(coef, entry["objective/kl"], 0.5, 40, 4)
    assert metrics["data"]["rows_kept"] == 16 + 12  # the demonstrations are counted in the data report

    # The critic learns at critic_learning_rate: its parameter group at twice the policy's rate, which is the
    # logged lr, through the schedule's decay.
    for update, entry in zip(updates, steps, strict=True):
        assert update["critic_group"] and update["lrs"] == pytest.approx([entry["lr"], 2 * entry["lr"]])
    assert updates[0]["lrs"] == pytest.approx([1e-3, 2e-3]) and updates[-1]["lrs"][0] < 1e-3

    # The entropy bonus is in the loss the policy back-propagates: clipped surrogate − entropy_coef × entropy
    # + ptx_coef × the demonstrations' loss, per micro-batch; the critic's is vf_coef × its value loss.
    for update in updates[1:]:
        for micro in update["micro_batches"]:
            stats, (policy_loss, critic_loss) = micro["stats"], micro["losses"]
            bonus = 0.01 * stats["policy/entropy_bonus"]
            assert bonus > 1e-3
            assert policy_loss == pytest.approx(stats["loss/policy"] - bonus + 0.5 * stats["loss/ptx"], abs=1e-6)
            assert critic_loss == pytest.approx(0.1 * stats["loss/value"], rel=1e-6)
    assert all(len(micro["losses"]) == 1 for micro in updates[0]["micro_batches"])  # warm-up: the critic's alone

    # Epoch early stopping: an update ends right after its first minibatch whose approximate KL is past
    # 1.5 × target_kl; policy/early_stopped is the share of the 2 epochs × 2 minibatches it skipped.
    planned, stopped = 4, 0
    for update, entry in zip(updates, steps, strict=True):
        done = len(update["steps"])
        if update["train_policy"]:
            kls = [np.mean([m["stats"]["policy/approxkl"] for m in update["micro_batches"][start:end]])
                   for start, end in itertools.pairwise([0, *update["steps"]])]
            assert all(kl <= 1.5 * target_kl for kl in kls[:-1])
            assert kls[-1] > 1.5 * target_kl or done == planned
        else:
            assert done == planned  # the critic's warm-up never stops early
        assert entry["policy/early_stopped"] == update["result"]["policy/early_stopped"] == pytest.approx(
            1 - done / planned)
        stopped += done < planned
    assert stopped >= 1
