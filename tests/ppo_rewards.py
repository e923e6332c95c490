"""Reward functions for PPO tests (importable as `ppo_rewards:...` with tests/ on sys.path)."""


def count_letter_e(prompts, responses):
    """Trivially learnable: the number of 'e' characters, scaled."""
    return [r.count("e") / 5.0 for r in responses]


def constant(prompts, responses):
    return [0.0 for _ in responses]
