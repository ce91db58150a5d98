"""PPOTrainer end to end on a tiny random Llama: it learns, its reference is the SFT model, it resumes exactly."""

from __future__ import annotations

import copy
import json
import math
import string
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftModel
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers import logging as hf_logging

from rlhf_pipeline.adapters import SharedBase
from rlhf_pipeline.engines.base import SamplingSettings
from rlhf_pipeline.engines.hf import generation_config
from rlhf_pipeline.outputs import last_checkpoint
from rlhf_pipeline.ppo.checkpoints import save_weights
from rlhf_pipeline.ppo.config import PPOConfig
from rlhf_pipeline.ppo.experience import Rollout, response_logits, truncate_after_stop
from rlhf_pipeline.ppo.roles import CRITIC, POLICY, REFERENCE
from rlhf_pipeline.ppo.trainer import PPOTrainer, RewardFn
from tests.two_processes import launch_two_processes

LETTERS = "abcdefghijklm"
TARGET = "a"


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """A 32-wide model is overhead-bound: one thread is several times faster than two on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    yield
    torch.set_num_threads(threads)
    hf_logging.set_verbosity(verbosity)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """One token per letter; pad, bos and eos are three distinct ids, as in our pipeline."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2} | {c: 3 + i for i, c in enumerate(LETTERS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return tiny_tokenizer()


def tiny_config(tokenizer: PreTrainedTokenizerFast, **extra: Any) -> LlamaConfig:
    # initializer_range 0.2 (not 0.02): with tiny-scale weights the logits cannot move far from uniform.
    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                       initializer_range=0.2, pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **extra)


def build_model(tokenizer: PreTrainedTokenizerFast) -> tuple[SharedBase, LlamaForCausalLM]:
    """The PPO roles on one random base (reference = the bare base), and an untouched copy of that base."""
    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_config(tokenizer))
    pristine = copy.deepcopy(base)
    shared = SharedBase(base)
    shared.add_role(REFERENCE)
    shared.add_role(POLICY, config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"), trainable=True)
    shared.add_role(CRITIC, config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"), trainable=True,
                    head=torch.nn.Linear(base.config.hidden_size, 1))
    return shared, pristine


def logprobs_of(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log softmax then gather: the plain definition, to check the trainer's memory-saving version against."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def prompts(tokenizer: PreTrainedTokenizerFast, count: int = 64) -> list[list[int]]:
    """Prompts of 3-6 tokens that never contain the target letter, and sometimes contain the pad id."""
    others = [tokenizer.convert_tokens_to_ids(c) for c in LETTERS if c != TARGET]
    rows = [[tokenizer.bos_token_id] + [others[(7 * i + j) % len(others)] for j in range(2 + i % 4)]
            for i in range(count)]
    rows[1].insert(1, tokenizer.pad_token_id)
    return rows


def target_fraction(tokenizer: PreTrainedTokenizerFast, response_length: int) -> RewardFn:
    """Reward: the share of response tokens that are the target letter (prompts never contain it)."""
    target = tokenizer.convert_tokens_to_ids(TARGET)

    def reward_fn(input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_lengths: torch.Tensor) -> torch.Tensor:
        return ((input_ids == target) & attention_mask.bool()).sum(dim=1).float() / response_length

    return reward_fn


def make_trainer(tokenizer: PreTrainedTokenizerFast, output_dir: Path, on_log: Any = None, ptx_loss: Any = None,
                 **overrides: Any) -> tuple[PPOTrainer, LlamaForCausalLM]:
    settings: dict[str, Any] = dict(output_dir=str(output_dir), per_device_train_batch_size=8, response_length=6,
                                    temperature=1.0, learning_rate=3e-3, num_ppo_epochs=4, num_mini_batches=2,
                                    kl_coef=0.01, total_episodes=16 * 20, save_steps=1000, num_sample_generations=2,
                                    disable_tqdm=True, seed=7)
    settings.update(overrides)
    config = PPOConfig(**settings)
    model, pristine = build_model(tokenizer)
    trainer = PPOTrainer(config, model, target_fraction(tokenizer, config.response_length), tokenizer,
                         prompts(tokenizer), on_log=on_log, ptx_loss=ptx_loss)
    return trainer, pristine


def numeric_logs(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [entry for entry in history if "samples" not in entry]


def test_ppo_raises_the_reward_with_finite_kl(tokenizer: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    seen: list[dict[str, Any]] = []
    trainer, _ = make_trainer(tokenizer, tmp_path, on_log=seen.append)
    final = trainer.train()

    logs = numeric_logs(trainer.log_history)
    assert [entry["step"] for entry in logs] == list(range(1, 21)) and seen == logs and final == logs[-1]
    scores = [entry["objective/scores"] for entry in logs]
    first, last = sum(scores[:3]) / 3, sum(scores[-3:]) / 3
    assert last > first + 0.3, f"reward did not rise: {first:.3f} -> {last:.3f}"
    assert all(math.isfinite(entry["objective/kl"]) for entry in logs)
    assert logs[0]["objective/kl"] == pytest.approx(0.0, abs=1e-6)  # the untouched adapter is the reference
    assert logs[-1]["episode"] == 16 * 20
    for key in ("objective/scores_std", "objective/entropy", "objective/non_score_reward", "objective/rlhf_reward",
                "response/length", "response/eos_fraction", "policy/clipfrac", "policy/approxkl", "loss/policy",
                "loss/value", "val/clipfrac", "val/explained_variance", "lr"):
        assert all(math.isfinite(entry[key]) for entry in logs), key
    assert all(0 <= entry["response/eos_fraction"] <= 1 and 1 <= entry["response/length"] <= 6 for entry in logs)
    samples = [entry for entry in trainer.log_history if "samples" in entry]
    assert [entry["step"] for entry in samples] == [10, 20]
    assert {"prompt", "response", "score"} <= samples[0]["samples"][0].keys()


def test_rollout_logprobs_are_those_of_the_sampling_distribution(tokenizer: PreTrainedTokenizerFast,
                                                                 tmp_path: Path) -> None:
    """Left padding, position ids and temperature must agree between generate() and the training forward."""
    trainer, _ = make_trainer(tokenizer, tmp_path, temperature=0.7)
    with torch.no_grad():
        for name, param in trainer.shared.named_parameters():  # a non-zero adapter: the policy is not its base
            if f".{POLICY}." in name:
                param.add_(0.05 * torch.randn_like(param))
    policy = trainer.shared.use(POLICY)
    batch = prompts(tokenizer)[:8]
    width = max(len(p) for p in batch)
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in batch])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
    settings = SamplingSettings(trainer.config.response_length, 0.7, 1.0, 0, tuple(trainer.stop_token_ids))
    out = policy.generate(input_ids=ids, attention_mask=mask,
                          generation_config=generation_config(settings, tokenizer.pad_token_id),
                          output_scores=True, return_dict_in_generate=True)
    responses = out.sequences[:, width:]
    response_mask, _ = truncate_after_stop(responses, trainer.stop_token_ids)
    sampling_logprobs = logprobs_of(torch.stack(out.scores, dim=1), responses)
    with torch.no_grad():
        logits = response_logits(trainer.model, POLICY, out.sequences, torch.cat([mask, response_mask.long()], 1),
                                 width)
        logprobs = logprobs_of(logits / 0.7, responses)
    assert torch.allclose(logprobs[response_mask], sampling_logprobs[response_mask], atol=1e-5)


def test_reference_is_the_base_model_and_the_policy_moves_away(tokenizer: PreTrainedTokenizerFast,
                                                               tmp_path: Path) -> None:
    trainer, pristine = make_trainer(tokenizer, tmp_path, total_episodes=16 * 3, temperature=0.7)
    batch = prompts(tokenizer)[:12]

    def base_logprobs(rollout: Rollout) -> torch.Tensor:
        """Teacher-forced log-probs of the rollout's responses under an untouched copy of the base model."""
        positions = (rollout.attention_mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            logits = pristine(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask,
                              position_ids=positions).logits
        logits = logits[:, rollout.context_length - 1:-1] / 0.7
        return logprobs_of(logits, rollout.responses)

    before = trainer.rollout(batch)
    valid = before.response_mask
    assert torch.allclose(before.ref_logprobs[valid], base_logprobs(before)[valid], atol=1e-5)
    assert torch.allclose(before.logprobs[valid], before.ref_logprobs[valid], atol=1e-6)

    trainer.train()
    after = trainer.rollout(batch)
    valid = after.response_mask
    assert torch.allclose(after.ref_logprobs[valid], base_logprobs(after)[valid], atol=1e-5)
    assert (after.logprobs[valid] - after.ref_logprobs[valid]).abs().max() > 1e-2


def test_resumed_run_retraces_the_uninterrupted_run(tokenizer: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    settings = dict(total_episodes=16 * 4, save_steps=1, save_total_limit=2, num_sample_generations=4)
    straight, _ = make_trainer(tokenizer, tmp_path / "straight", **settings)
    straight.train()

    class Preempted(Exception):
        pass

    def preempt_at_step_3(logs: dict[str, Any]) -> None:
        if logs["step"] == 3:
            raise Preempted

    interrupted, _ = make_trainer(tokenizer, tmp_path / "resumed", on_log=preempt_at_step_3, **settings)
    with pytest.raises(Preempted):
        interrupted.train()
    output_dir = tmp_path / "resumed"
    assert sorted(p.name for p in output_dir.iterdir()) == ["checkpoint-1", "checkpoint-2"]
    checkpoint = last_checkpoint(output_dir)
    assert checkpoint == output_dir / "checkpoint-2"
    assert {"adapter_config.json", "adapter_model.safetensors", "value_model", "optimizer.pt", "scheduler.pt",
            "rng_state_0.pth", "trainer_state.json"} <= {p.name for p in checkpoint.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "value_head.safetensors"} <= {
        p.name for p in (checkpoint / "value_model").iterdir()}

    resumed, _ = make_trainer(tokenizer, output_dir, **settings)
    resumed.train(resume_from_checkpoint=str(checkpoint))

    assert sorted(p.name for p in output_dir.iterdir()) == ["checkpoint-3", "checkpoint-4"]
    assert len(resumed.log_history) == len(straight.log_history)
    for mine, theirs in zip(resumed.log_history, straight.log_history, strict=True):
        assert mine.keys() == theirs.keys()
        for key, value in theirs.items():
            if key.startswith("time/"):  # seconds spent sampling, syncing, scoring, optimising: wall clock
                continue
            if isinstance(value, float):
                assert mine[key] == pytest.approx(value, rel=1e-5, abs=1e-7), (theirs["step"], key)
            else:
                assert mine[key] == value, (theirs["step"], key)
    trained = dict(straight.shared.named_parameters())
    for name, param in resumed.shared.named_parameters():
        if param.requires_grad:
            assert torch.allclose(param, trained[name], atol=1e-6), name


def test_saved_adapters_load_with_peft(tokenizer: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    trainer, pristine = make_trainer(tokenizer, tmp_path / "run", total_episodes=16)
    trainer.train()
    save_weights(trainer.shared, tmp_path / "final")

    critic_base = copy.deepcopy(pristine)
    loaded = PeftModel.from_pretrained(pristine, tmp_path / "final")
    ids = torch.tensor([prompts(tokenizer)[0]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, trainer.shared(POLICY, ids, mask), atol=1e-6)

    head = torch.nn.Linear(pristine.config.hidden_size, 1)
    head.load_state_dict(load_file(str(tmp_path / "final" / "value_model" / "value_head.safetensors")))
    critic = SharedBase(critic_base)
    critic.add_role(CRITIC, tmp_path / "final" / "value_model", head=head)
    with torch.no_grad():
        assert torch.allclose(critic(CRITIC, ids, mask), trainer.shared(CRITIC, ids, mask), atol=1e-6)


def test_one_base_copy_and_only_policy_and_critic_train(tokenizer: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    """The four roles hold one copy of the base weights; a PPO step changes the policy and critic alone."""
    trainer, pristine = make_trainer(tokenizer, tmp_path, total_episodes=16)
    base_numel = sum(p.numel() for p in pristine.parameters())
    storages = {p.untyped_storage().data_ptr(): p.numel() for name, p in trainer.shared.named_parameters()
                if "lora_" not in name and not name.startswith("heads.")}
    assert sum(storages.values()) == base_numel  # one copy: every frozen base tensor stored once
    trainable = {name for name, p in trainer.shared.named_parameters() if p.requires_grad}
    assert trainable and all(f".{POLICY}." in n or f".{CRITIC}." in n or n.startswith(f"heads.{CRITIC}.")
                             for n in trainable)
    before = {name: p.detach().clone() for name, p in trainer.shared.named_parameters()}
    trainer.train()
    changed = {name for name, p in trainer.shared.named_parameters() if not torch.equal(p, before[name])}
    assert changed and changed <= trainable
    assert any(f".{POLICY}." in n for n in changed) and any(n.startswith(f"heads.{CRITIC}.") for n in changed)


def test_each_role_backpropagates_under_its_own_adapter(tokenizer: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    """With activation checkpointing the backward recomputes the forward: it must see the role's own adapter.

    The gradients of one micro-batch are the same with and without checkpointing (a backward run after
    switching to the critic would recompute the policy's layers with the critic's adapter).
    """
    grads = []
    for checkpointing in (False, True):
        trainer, _ = make_trainer(tokenizer, tmp_path / str(checkpointing), total_episodes=16)
        with torch.no_grad():
            for name, param in trainer.shared.named_parameters():  # adapters that differ from each other
                if "lora_B" in name:
                    param.add_(0.1 * torch.randn_like(param))
        if checkpointing:
            trainer.shared.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        rollout = trainer.rollout(prompts(tokenizer)[:8])
        trainer.model.train()
        trainer.update.train_micro_batch(rollout.select(torch.arange(4)), last=True)
        grads.append({name: p.grad.clone() for name, p in trainer.shared.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name, grad in grads[0].items():
        assert torch.allclose(grads[1][name], grad, atol=1e-5), name


@pytest.mark.parametrize(
    ("overrides", "field"),
    [({"response_length": 0}, "response_length"), ({"cliprange": 1.5}, "cliprange"),
     ({"kl_estimator": "k2"}, "kl_estimator"), ({"stop_token": "eot"}, "stop_token"),
     ({"per_device_train_batch_size": 0}, "per_device_train_batch_size"),
     ({"stop_token": None, "missing_eos_penalty": 1.0}, "missing_eos_penalty"), ({"lam": 1.5}, "lam")],
)
def test_config_errors_name_the_field(overrides: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        PPOConfig(**overrides)


def test_normalize_reward_needs_the_reward_stats(tokenizer: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="reward_stats"):
        make_trainer(tokenizer, tmp_path, normalize_reward=True)


WORKER = """
import json, sys
from pathlib import Path
sys.path[:0] = [{root!r}, {tests!r}, {here!r}]
import conftest  # noqa: F401  (offline Hugging Face settings)
import torch
from test_trainer import make_trainer, numeric_logs, tiny_tokenizer
torch.set_num_threads(1)
out = Path(sys.argv[1])
trainer, _ = make_trainer(tiny_tokenizer(), out, per_device_train_batch_size=4, total_episodes=16 * 4, save_steps=2)
trainer.train(resume_from_checkpoint=sys.argv[2] if len(sys.argv) > 2 else None)
acc = trainer.accelerator
result = {{"world_size": acc.num_processes, "type": str(acc.distributed_type),
          "weights": torch.cat([p.detach().flatten() for p in trainer.trainable_params]).tolist(),
          "scores": [e["objective/scores"] for e in numeric_logs(trainer.log_history)]}}
(out / f"rank{{acc.process_index}}-{{len(sys.argv)}}.json").write_text(json.dumps(result))
acc.wait_for_everyone()  # neither rank leaves while the other still talks to it
torch.distributed.destroy_process_group()
"""


@pytest.mark.slow
def test_two_processes_stay_in_sync_and_resume_exactly(tmp_path: Path) -> None:
    """Each rank samples its own prompts, DDP keeps the weights equal, and resume works per rank."""
    here = Path(__file__).resolve().parent
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(root=str(here.parent.parent), tests=str(here.parent), here=str(here)))
    output_dir = tmp_path / "run"
    launch_two_processes(script, str(output_dir))
    straight = [json.loads((output_dir / f"rank{rank}-2.json").read_text()) for rank in (0, 1)]
    assert [r["world_size"] for r in straight] == [2, 2] and "MULTI_CPU" in straight[0]["type"]
    assert straight[0]["weights"] == straight[1]["weights"]

    launch_two_processes(script, str(output_dir), str(output_dir / "checkpoint-2"))
    resumed = [json.loads((output_dir / f"rank{rank}-3.json").read_text()) for rank in (0, 1)]
    assert resumed[0]["scores"] == pytest.approx(straight[0]["scores"], rel=1e-5)
    assert torch.allclose(torch.tensor(resumed[0]["weights"]), torch.tensor(straight[0]["weights"]), atol=1e-6)
    assert resumed[0]["weights"] == resumed[1]["weights"]


ROLLOUT_WORKER = """
import sys
from pathlib import Path
sys.path[:0] = [{root!r}, {tests!r}, {here!r}]
import conftest  # noqa: F401  (offline Hugging Face settings)
import torch
from test_trainer import make_trainer, tiny_tokenizer
torch.set_num_threads(1)
out = Path(sys.argv[1])
trainer, _ = make_trainer(tiny_tokenizer(), out, per_device_train_batch_size=4, total_episodes=16 * 4)
rollout = trainer.rollout(trainer.schedule.prompts_for_step(1))
torch.save({{name: getattr(rollout, name) for name in ("rewards", "values", "response_mask", "advantages")}},
           out / f"rollout{{trainer.accelerator.process_index}}.pt")
trainer.accelerator.wait_for_everyone()  # neither rank leaves while the other still talks to it
torch.distributed.destroy_process_group()
"""


def test_two_processes_whiten_advantages_over_the_global_batch(tmp_path: Path) -> None:
    """Advantages of a 2-process rollout equal one process's GAE + whitening over both ranks' rows together."""
    from rlhf_pipeline.ppo.formulas import gae_advantages_and_returns, masked_whiten

    here = Path(__file__).resolve().parent
    script = tmp_path / "rollout.py"
    script.write_text(ROLLOUT_WORKER.format(root=str(here.parent.parent), tests=str(here.parent), here=str(here)))
    (tmp_path / "run").mkdir()
    launch_two_processes(script, str(tmp_path / "run"))
    ranks = [torch.load(tmp_path / "run" / f"rollout{rank}.pt") for rank in (0, 1)]
    width = max(part["response_mask"].shape[1] for part in ranks)

    def joined(name: str) -> torch.Tensor:
        return torch.cat([torch.nn.functional.pad(part[name], (0, width - part[name].shape[1])) for part in ranks])

    mask = joined("response_mask").bool()
    config = PPOConfig()
    raw, _ = gae_advantages_and_returns(joined("rewards"), joined("values"), mask, config.gamma, config.lam)
    torch.testing.assert_close(joined("advantages"), masked_whiten(raw, mask), atol=1e-5, rtol=1e-4)
    per_rank = torch.cat([torch.nn.functional.pad(masked_whiten(*gae_advantages_and_returns(
        part["rewards"], part["values"], part["response_mask"], config.gamma, config.lam)[:1],
        part["response_mask"]), (0, width - part["response_mask"].shape[1])) for part in ranks])
    assert not torch.allclose(per_rank, masked_whiten(raw, mask), atol=1e-3)  # each rank's own statistics differ


# ------------------------------------------------------------------------------------------ the knobs


def _policy_and_critic(trainer: PPOTrainer) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    params = {name: p.detach().clone() for name, p in trainer.shared.named_parameters() if p.requires_grad}
    policy = {name: value for name, value in params.items() if f".{POLICY}." in name}
    return policy, {name: value for name, value in params.items() if name not in policy}


def _policy_grads(trainer: PPOTrainer, batch: Rollout) -> dict[str, torch.Tensor]:
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.model.train()
    trainer.update.train_micro_batch(batch, last=True)
    return {name: p.grad.clone() for name, p in trainer.shared.named_parameters()
            if p.grad is not None and f".{POLICY}." in name}


def _perturbed_trainer(tokenizer: PreTrainedTokenizerFast, output_dir: Path, **overrides: Any) -> PPOTrainer:
    """The same trainer every time (build_model seeds), with its adapters moved off zero."""
    trainer, _ = make_trainer(tokenizer, output_dir, **overrides)
    torch.manual_seed(3)
    with torch.no_grad():  # a policy that differs from the rollout's, so every loss term has a gradient
        for name, param in trainer.shared.named_parameters():
            if "lora_B" in name:
                param.add_(0.05 * torch.randn_like(param))
    return trainer


def _gradients_of(trainer: PPOTrainer, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    names = [name for name, p in trainer.shared.named_parameters() if p.requires_grad and f".{POLICY}." in name]
    params = dict(trainer.shared.named_parameters())
    grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
    return {n: g if g is not None else torch.zeros_like(params[n]) for n, g in zip(names, grads, strict=True)}


def test_entropy_bonus_subtracts_its_coefficient_times_the_entropy(tokenizer: PreTrainedTokenizerFast,
                                                                   tmp_path: Path) -> None:
    from trl.trainer.utils import entropy_from_logits

    from rlhf_pipeline.ppo.formulas import masked_mean

    coef = 0.3
    plain = _perturbed_trainer(tokenizer, tmp_path / "plain")
    bonus = _perturbed_trainer(tokenizer, tmp_path / "bonus", entropy_coef=coef)
    torch.manual_seed(5)
    batch = plain.rollout(prompts(tokenizer)[:8]).select(torch.arange(8))
    without, with_bonus = _policy_grads(plain, batch), _policy_grads(bonus, batch)
    logits = response_logits(bonus.shared, POLICY, batch.input_ids, batch.attention_mask, batch.context_length)
    entropy = masked_mean(entropy_from_logits(logits.float() / bonus.config.temperature), batch.response_mask)
    expected = _gradients_of(bonus, -coef * entropy)
    assert without.keys() == with_bonus.keys()
    for name, grad in with_bonus.items():
        torch.testing.assert_close(grad, without[name] + expected[name], atol=1e-6, rtol=1e-4)
    assert any(expected[name].abs().max() > 1e-6 for name in expected)


def test_ptx_adds_its_coefficient_times_the_demonstrations_loss(tokenizer: PreTrainedTokenizerFast,
                                                               tmp_path: Path) -> None:
    from rlhf_pipeline.ppo.ptx import Demonstration, Demonstrations

    letters = [tokenizer.convert_tokens_to_ids(c) for c in "abcdefgh"]
    demos = Demonstrations([Demonstration([tokenizer.bos_token_id, letters[i]], letters[i:i + 3])
                            for i in range(5)], micro_batch_size=2, pad_id=tokenizer.pad_token_id, seed=1)
    coef = 0.5
    plain = _perturbed_trainer(tokenizer, tmp_path / "plain")
    trainer = _perturbed_trainer(tokenizer, tmp_path / "ptx", ptx_coef=coef, ptx_loss=demos.loss)
    torch.manual_seed(5)
    batch = plain.rollout(prompts(tokenizer)[:8]).select(torch.arange(8))
    without, with_ptx = _policy_grads(plain, batch), _policy_grads(trainer, batch)

    rows = demos.rows(0)  # the first micro-batch of step 0
    ids = [demos.examples[i].prompt + demos.examples[i].answer for i in rows]
    nll = []
    for row, sequence in zip(rows, ids, strict=True):  # the NLL of each answer token, written out per token
        logits = trainer.shared(POLICY, torch.tensor([sequence]), torch.ones(1, len(sequence), dtype=torch.long))[0]
        start = len(demos.examples[row].prompt)
        nll += [-torch.log_softmax(logits[t - 1].float(), -1)[sequence[t]] for t in range(start, len(sequence))]
    expected = _gradients_of(trainer, coef * torch.stack(nll).mean())
    for name, grad in with_ptx.items():
        torch.testing.assert_close(grad, without[name] + expected[name], atol=1e-6, rtol=1e-4)
    assert any(expected[name].abs().max() > 1e-6 for name in expected)


def test_ptx_batches_follow_the_position_and_split_over_processes() -> None:
    from rlhf_pipeline.ppo.ptx import Demonstration, Demonstrations

    examples = [Demonstration([1], [i]) for i in range(5)]
    single = Demonstrations(examples, micro_batch_size=2, pad_id=0, seed=3)
    ranks = [Demonstrations(examples, micro_batch_size=1, pad_id=0, seed=3, process_index=r, num_processes=2)
             for r in (0, 1)]
    served = [i for position in range(5) for i in single.rows(position)]
    assert sorted(served[:5]) == sorted(served[5:10]) == list(range(5))  # every demonstration once per pass
    assert served != list(range(10)) and single.rows(3) == Demonstrations(examples, 2, 0, 3).rows(3)
    assert [i for position in range(5) for rank in ranks for i in rank.rows(position)] == served


def test_critic_warmup_leaves_the_policy_unchanged(tokenizer: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    trainer, _ = make_trainer(tokenizer, tmp_path, total_episodes=16 * 3, critic_warmup_steps=2,
                              critic_learning_rate=1e-2)
    assert [group["lr"] for group in trainer.optimizer.param_groups] == [3e-3, 1e-2]
    policy, critic = _policy_and_critic(trainer)
    for step in (1, 2):
        trainer.ppo_update(trainer.rollout(trainer.schedule.prompts_for_step(step)))
        trainer.global_step = step
        now_policy, now_critic = _policy_and_critic(trainer)
        assert all(torch.equal(now_policy[name], value) for name, value in policy.items()), step
        assert any(not torch.equal(now_critic[name], value) for name, value in critic.items()), step
        critic = now_critic
    stats = trainer.ppo_update(trainer.rollout(trainer.schedule.prompts_for_step(3)))
    assert "loss/policy" in stats
    assert any(not torch.equal(p, policy[n]) for n, p in _policy_and_critic(trainer)[0].items())


def test_update_epochs_stop_at_the_first_minibatch_past_the_target_kl(tokenizer: PreTrainedTokenizerFast,
                                                                      tmp_path: Path) -> None:
    seen: list[float] = []

    def run(target_kl: float) -> dict[str, float]:
        trainer, _ = make_trainer(tokenizer, tmp_path / str(target_kl), early_stopping=True, target_kl=target_kl,
                                  learning_rate=3e-2)
        real = trainer.update._kl_over_target

        def recording(stats: dict[str, list[torch.Tensor]], micro_batches: int) -> bool:
            seen.append(torch.stack(stats["policy/approxkl"][-micro_batches:]).mean().item())
            return real(stats, micro_batches)

        trainer.update._kl_over_target = recording
        torch.manual_seed(0)
        return trainer.ppo_update(trainer.rollout(trainer.schedule.prompts_for_step(1)))

    planned = 4 * 2  # num_ppo_epochs x num_mini_batches
    assert run(1e6)["policy/early_stopped"] == 0.0
    kls, seen[:] = list(seen), []
    assert len(kls) == planned and kls[0] < max(kls)
    first_past = next(i for i, kl in enumerate(kls) if kl > kls[0] * 1.01)
    target = (kls[0] * 1.01 + kls[first_past]) / 2 / 1.5  # 1.5 × target lies between the first and that one
    assert all(kl <= 1.5 * target for kl in kls[:first_past]) and kls[first_past] > 1.5 * target
    stats = run(target)
    assert seen == pytest.approx(kls[:first_past + 1], rel=1e-6)  # stopped right after the first one past it
    assert stats["policy/early_stopped"] == pytest.approx(1 - (first_past + 1) / planned)


def test_adaptive_kl_coefficient_follows_the_controller_and_resumes(tokenizer: PreTrainedTokenizerFast,
                                                                   tmp_path: Path) -> None:
    from rlhf_pipeline.ppo.formulas import adaptive_kl_coef

    settings = dict(total_episodes=16 * 3, save_steps=1, adap_kl_ctrl=True, kl_coef=0.2, target=0.01, horizon=100)
    trainer, _ = make_trainer(tokenizer, tmp_path / "run", **settings)
    trainer.train()
    logs = numeric_logs(trainer.log_history)
    coef = 0.2
    for entry in logs:  # each step uses the coefficient the previous steps' KL set
        assert entry["objective/kl_coef"] == pytest.approx(coef)
        coef = adaptive_kl_coef(coef, entry["objective/kl"], 0.01, 100, 16)
    assert trainer.kl_coef == pytest.approx(coef) and coef != 0.2
    state = json.loads((tmp_path / "run" / "checkpoint-2" / "trainer_state.json").read_text())
    resumed, _ = make_trainer(tokenizer, tmp_path / "run", **settings)
    resumed.load_checkpoint(tmp_path / "run" / "checkpoint-2")
    assert resumed.kl_coef == state["kl_coef"] == pytest.approx(
        adaptive_kl_coef(logs[1]["objective/kl_coef"], logs[1]["objective/kl"], 0.01, 100, 16))


def test_answers_stop_at_the_end_of_turn_token_when_it_is_not_eos(tmp_path: Path) -> None:
    """A chat template that closes turns with <|end|> (not </s>): PPO stops there and does not penalise it."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<|end|>": 3} | {c: 4 + i for i, c in enumerate(string.ascii_lowercase)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    eot_tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                            pad_token="<pad>", additional_special_tokens=["<|end|>"])
    eot_tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] == 'assistant' %}{{ m['content'] }}"
                                   "<|end|>{% else %}<s>{{ m['content'] }}{% endif %}{% endfor %}")
    eot = eot_tokenizer.convert_tokens_to_ids("<|end|>")
    config = PPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=16, response_length=8, temperature=1.0,
                       missing_eos_penalty=1.0, total_episodes=16, disable_tqdm=True, seed=1)
    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_config(eot_tokenizer))
    shared = SharedBase(base)
    shared.add_role(REFERENCE)
    shared.add_role(POLICY, config=LoraConfig(r=4, target_modules="all-linear"), trainable=True)
    shared.add_role(CRITIC, config=LoraConfig(r=4, target_modules="all-linear"), trainable=True,
                    head=torch.nn.Linear(32, 1))
    trainer = PPOTrainer(config, shared, lambda ids, mask, prompt_lengths: torch.zeros(len(ids)), eot_tokenizer,
                         [[1, 4 + i % 4] for i in range(16)])
    assert trainer.stop_token_ids == [eot_tokenizer.eos_token_id, eot]
    torch.manual_seed(2)
    rollout = trainer.rollout([[1, 4 + i % 4] for i in range(16)])
    lengths = rollout.response_mask.sum(dim=1)
    last = rollout.responses[torch.arange(16), lengths - 1]
    ended_at_eot = last == eot
    assert ended_at_eot.any()  # the random model emits <|end|> within 8 tokens in some answers
    for row in range(16):
        valid = rollout.responses[row, : lengths[row]].tolist()
        assert eot not in valid[:-1] and eot_tokenizer.eos_token_id not in valid[:-1]  # cut at the first stop
    assert torch.equal(rollout.has_stop[ended_at_eot], torch.ones(int(ended_at_eot.sum()), dtype=torch.bool))
    assert torch.equal(rollout.scores[ended_at_eot], torch.zeros(int(ended_at_eot.sum())))  # no missing-EOS penalty
    assert (rollout.scores[~rollout.has_stop] == -1.0).all()
