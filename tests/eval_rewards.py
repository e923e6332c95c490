"""Reward functions for the evaluation tests (importable as `eval_rewards:...` with tests/ on sys.path)."""


def length(prompts, responses):
    """Words per response: ties between checkpoints are common, which win rates must count as half."""
    return [float(len(r.split())) for r in responses]
