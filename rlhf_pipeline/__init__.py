"""rlhf_pipeline: InstructGPT's SFT, reward-model and PPO stages as YAML recipes on the Hugging Face stack."""

__version__ = "0.1.0"
