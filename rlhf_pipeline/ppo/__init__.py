"""Our own actor-critic PPO for RLHF (TRL removed its PPOTrainer in 1.13).

`formulas` holds the maths, `config` the knobs (import-light), `trainer` the rollout and optimisation
loop with checkpoint/resume. Import `PPOTrainer` from `rlhf_pipeline.ppo.trainer`: this package stays
free of torch so the recipe layer can import `PPOConfig` fast.
"""
