"""`PPOConfig`: the PPO stage's knobs, with TRL's `PPOConfig` names (and meanings, but for one batch-size detail below).

A plain dataclass with no torch/transformers import, so `rlhf-pipeline validate` can build it (and get
its ValueErrors, each naming the field) in milliseconds.

Batch sizes: `per_device_train_batch_size` is the micro-batch of one forward/backward pass, as in TRL;
`gradient_accumulation_steps` micro-batches make a minibatch (one optimizer step); `num_mini_batches`
minibatches make the rollout, so each process answers
per_device_train_batch_size × gradient_accumulation_steps × num_mini_batches prompts per PPO step, and
the rollout is replayed for `num_ppo_epochs` passes. TRL 1.12 differed when num_mini_batches > 1: its
rollout was per_device_train_batch_size × gradient_accumulation_steps, split into num_mini_batches. To
port a TRL recipe with num_mini_batches = m, divide its gradient_accumulation_steps by m.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

_KL_ESTIMATORS = ("k1", "k3")
_STOP_TOKENS = ("eos", None)


@dataclass
class PPOConfig:
    """Rollout, reward shaping, PPO and bookkeeping settings of one PPO run."""

    output_dir: str = "outputs/ppo"
    seed: int = 42

    # Rollout
    reward_model_path: str | None = None  # a finished rm stage: the reward model and the critic's start
    policy_init: str | None = None  # a finished policy stage the trainable policy starts from; null: the reference
    per_device_train_batch_size: int = 4
    local_rollout_forward_batch_size: int = 16  # rows per no-grad generate/forward chunk during rollout
    max_prompt_length: int | None = None  # longer prompts are dropped (and counted), never truncated
    response_length: int = 53
    temperature: float = 0.7
    stop_token: str | None = "eos"  # "eos": stop at the tokenizer's EOS; null: always response_length tokens
    stop_token_id: int | None = None  # overrides stop_token

    # Reward shaping
    kl_coef: float = 0.05  # β of the per-token KL penalty; with adap_kl_ctrl, its starting value
    adap_kl_ctrl: bool = False  # steer β so the KL per answer approaches `target` (Ziegler et al. 2019)
    target: float = 6.0  # the adaptive controller's KL per answer, nats (TRL <= 0.11's names and defaults)
    horizon: float = 10000.0  # episodes over which the controller corrects (at most 20% of episodes/horizon)
    kl_estimator: str = "k1"  # per-token KL: k1 = log π − log π_ref; k3 = (r − 1) − log r, r = π_ref/π
    missing_eos_penalty: float | None = None  # subtracted from the score of answers with no stop token
    normalize_reward: bool = False  # (score − mean)/std with the reward model's training statistics
    reward_clip: float | None = None  # clip the (normalised) score to ±reward_clip
    whiten_rewards: bool = False

    # PPO
    num_ppo_epochs: int = 4
    num_mini_batches: int = 1
    gradient_accumulation_steps: int = 1
    cliprange: float = 0.2
    cliprange_value: float | None = 0.2  # null: unclipped value loss
    vf_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95
    entropy_coef: float = 0.0  # entropy bonus: the policy loss minus entropy_coef × its mean entropy per token
    early_stopping: bool = False  # end an update's epochs once a minibatch's approx KL > 1.5 × target_kl
    target_kl: float = 1.0  # (TRL <= 0.11's early_stopping and target_kl)
    critic_warmup_steps: int = 0  # first PPO steps train the critic only (OpenRLHF's freezing_actor_steps)
    ptx_coef: float = 0.0  # PPO-ptx: plus ptx_coef × the SFT loss on the recipe's data.ptx demonstrations

    # Optimisation
    learning_rate: float = 1e-5
    critic_learning_rate: float | None = None  # null: learning_rate
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    lr_scheduler_type: str = "linear"
    warmup_ratio: float = 0.0

    # Length of training
    total_episodes: int | None = None  # responses over all processes; overrides num_train_epochs
    num_train_epochs: float = 1.0

    # Bookkeeping
    logging_steps: int = 1  # a log entry averages the steps since the previous one
    save_steps: int = 50
    save_total_limit: int | None = None
    num_sample_generations: int = 10  # times a few decoded samples are kept in the log history; 0: never
    report_to: str | list[str] = "none"  # accelerate trackers (tensorboard, wandb, trackio, ...)
    disable_tqdm: bool = False

    # Health monitors (ppo/monitors.py), checked on every log entry; null = off. An alert is a warning
    # and an entry {"step", "alerts"} in the log history; with early_stop_on_alert the run saves a
    # checkpoint and stops, and the stage still saves the adapter (metrics: stopped_early, stop).
    max_kl: float | None = None  # mean KL(policy || reference) per answer, nats
    min_entropy: float | None = None  # mean policy entropy per response token, nats
    max_length_drift: float | None = None  # |mean length / first logged mean length - 1|
    max_missing_eos_fraction: float | None = None  # share of answers without the stop token
    max_reward_jump: float | None = None  # |change of mean score| between log entries, in score std units
    max_logprob_gap: float | None = 0.05  # a sampling engine's log-probs vs PPO's own, mean |difference| per token
    early_stop_on_alert: bool = False

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
        for name in ("kl_coef", "vf_coef", "weight_decay", "num_sample_generations", "entropy_coef", "ptx_coef",
                     "critic_warmup_steps"):
            _require(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        _require(self.missing_eos_penalty is None or self.missing_eos_penalty >= 0,
                 f"missing_eos_penalty must be >= 0 (it is subtracted) or null, got {self.missing_eos_penalty}")
        for name in ("target", "horizon", "target_kl"):
            _require(getattr(self, name) > 0, f"{name} must be > 0, got {getattr(self, name)}")
        _require(not self.adap_kl_ctrl or self.kl_coef > 0,
                 "adap_kl_ctrl scales kl_coef up and down, so kl_coef must be > 0 (its starting value)")
        for name in ("max_prompt_length", "total_episodes", "save_total_limit", "reward_clip", "max_grad_norm",
                     "critic_learning_rate"):
            value = getattr(self, name)
            _require(value is None or value > 0, f"{name} must be > 0 (or null), got {value}")
        for name in ("max_kl", "max_length_drift", "max_reward_jump", "max_logprob_gap"):
            value = getattr(self, name)
            _require(value is None or value > 0, f"{name} must be > 0 (or null: off), got {value}")
        _require(self.min_entropy is None or self.min_entropy >= 0,
                 f"min_entropy must be >= 0 (or null: off), got {self.min_entropy}")
        _require(self.max_missing_eos_fraction is None or 0 <= self.max_missing_eos_fraction < 1,
                 f"max_missing_eos_fraction must be in [0, 1) (or null: off), got {self.max_missing_eos_fraction}")
        _require(self.max_missing_eos_fraction is None or self.stop_token is not None
                 or self.stop_token_id is not None,
                 "max_missing_eos_fraction needs a stop token: set stop_token: eos or a stop_token_id")
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

    def tracker_values(self) -> dict[str, int | float | str | bool | None]:
        """The knobs as experiment trackers take them: scalars only."""
        return {key: value if isinstance(value, (int, float, str, bool)) or value is None else str(value)
                for key, value in asdict(self).items()}

    @property
    def rollout_batch_size(self) -> int:
        """Prompts answered per PPO step, per process (TRL's local batch): micro × accumulation × mini-batches."""
        return self.mini_batch_size * self.num_mini_batches

    @property
    def mini_batch_size(self) -> int:
        """Responses per optimizer step, per process."""
        return self.micro_batch_size * self.gradient_accumulation_steps

    @property
    def micro_batch_size(self) -> int:
        """Responses per forward/backward pass, per process: `per_device_train_batch_size`, as in TRL."""
        return self.per_device_train_batch_size


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)
