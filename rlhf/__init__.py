"""rlhf: SFT -> reward model -> PPO -> eval, chained by one YAML recipe."""

__version__ = "0.1.0"
