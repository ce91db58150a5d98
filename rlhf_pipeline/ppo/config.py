"""`PPOConfig`: the PPO stage's knobs, with TRL's `PPOConfig` names and meanings.

A plain dataclass with no torch/transformers import, so `rlhf-pipeline validate` can build it (and get
its ValueErrors, each naming the field) in milliseconds.

Batch sizes, per PPO step: each process generates `per_device_train_batch_size` responses (one per
prompt); that rollout is split into `num_mini_batches` minibatches, one optimizer step each, and each
minibatch into `gradient_accumulation_steps` micro-batches, repeated for `num_ppo_epochs` passes.
(TRL instead reads `per_device_train_batch_size` as the micro-batch; the two agree when
`gradient_accumulation_steps` and `num_mini_batches` are 1.)
"""

from __future__ import annotations

from dataclasses import dataclass

_KL_ESTIMATORS = ("k1", "k3")
_STOP_TOKENS = ("eos", None)


@dataclass
class PPOConfig:
    """Rollout, reward shaping, PPO and bookkeeping settings of one PPO run."""

    output_dir: str = "outputs/ppo"
    seed: int = 42

    # Rollout
    per_device_train_batch_size: int = 16
    local_rollout_forward_batch_size: int = 16
    max_prompt_length: int | None = None
    response_length: int = 53
    temperature: float = 0.7
    stop_token: str | None = "eos"
    stop_token_id: int | None = None

    # Reward shaping
    kl_coef: float = 0.05
    kl_estimator: str = "k1"
    missing_eos_penalty: float | None = None
    normalize_reward: bool = False
    reward_clip: float | None = None
    whiten_rewards: bool = False

    # PPO
    num_ppo_epochs: int = 4
    num_mini_batches: int = 1
    gradient_accumulation_steps: int = 1
    cliprange: float = 0.2
    cliprange_value: float | None = 0.2
    vf_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95

    # Optimisation
    learning_rate: float = 1e-5
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    lr_scheduler_type: str = "linear"
    warmup_ratio: float = 0.0

    # Length of training
    total_episodes: int | None = None
    num_train_epochs: float = 1.0

    # Bookkeeping
    logging_steps: int = 1
    save_steps: int = 50
    save_total_limit: int | None = None
    num_sample_generations: int = 10
    report_to: str | list[str] = "none"
    disable_tqdm: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.report_to, str):
            self.report_to = [] if self.report_to == "none" else [self.report_to]
        self.report_to = [name for name in self.report_to if name != "none"]
        for name in ("per_device_train_batch_size", "local_rollout_forward_batch_size", "response_length",
                     "num_ppo_epochs", "num_mini_batches", "gradient_accumulation_steps", "logging_steps",
                     "save_steps"):
            _require(getattr(self, name) > 0, f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("temperature", "learning_rate", "num_train_epochs"):
            _require(getattr(self, name) > 0, f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("kl_coef", "vf_coef", "weight_decay", "num_sample_generations"):
            _require(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        _require(self.missing_eos_penalty is None or self.missing_eos_penalty >= 0,
                 f"missing_eos_penalty must be >= 0 (it is subtracted) or null, got {self.missing_eos_penalty}")
        for name in ("max_prompt_length", "total_episodes", "save_total_limit", "reward_clip", "max_grad_norm"):
            value = getattr(self, name)
            _require(value is None or value > 0, f"{name} must be > 0 (or null), got {value}")
        _require(0 < self.cliprange < 1, f"cliprange must be in (0, 1), got {self.cliprange}")
        _require(self.cliprange_value is None or self.cliprange_value > 0,
                 f"cliprange_value must be > 0 (or null for no value clipping), got {self.cliprange_value}")
        _require(0 <= self.gamma <= 1, f"gamma must be in [0, 1], got {self.gamma}")
        _require(0 <= self.lam <= 1, f"lam must be in [0, 1], got {self.lam}")
        _require(0 <= self.warmup_ratio < 1, f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        _require(self.kl_estimator in _KL_ESTIMATORS,
                 f"kl_estimator must be one of {', '.join(_KL_ESTIMATORS)}, got {self.kl_estimator!r}")
        _require(self.stop_token in _STOP_TOKENS, f"stop_token must be 'eos' or null, got {self.stop_token!r}")
        _require(self.stop_token_id is None or self.stop_token_id >= 0,
                 f"stop_token_id must be a token id >= 0 (or null), got {self.stop_token_id}")
        _require(self.missing_eos_penalty is None or self.stop_token is not None or self.stop_token_id is not None,
                 "missing_eos_penalty needs a stop token: set stop_token: eos or a stop_token_id")
        micro = self.num_mini_batches * self.gradient_accumulation_steps
        _require(self.per_device_train_batch_size % micro == 0,
                 f"per_device_train_batch_size ({self.per_device_train_batch_size}) must be divisible by "
                 f"num_mini_batches × gradient_accumulation_steps ({micro})")

    @property
    def mini_batch_size(self) -> int:
        """Responses per optimizer step, per process."""
        return self.per_device_train_batch_size // self.num_mini_batches

    @property
    def micro_batch_size(self) -> int:
        """Responses per forward/backward pass, per process."""
        return self.mini_batch_size // self.gradient_accumulation_steps


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)
