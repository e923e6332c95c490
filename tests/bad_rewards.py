"""Misbehaving reward functions (importable as `bad_rewards:...` with tests/ on
sys.path), for tests/test_clean_errors.py."""

import math


def fine(prompts, responses):
    return [float(len(r)) for r in responses]


def raises(prompts, responses):
    raise ValueError("scorer exploded")


def returns_none(prompts, responses):
    return None


def returns_scalar(prompts, responses):
    return 1.0


def too_few(prompts, responses):
    return [1.0 for _ in responses][:-1]


def non_number(prompts, responses):
    return [1.0] + ["high"] * (len(responses) - 1)


def none_inside(prompts, responses):
    return [0.5, None] + [0.5] * (len(responses) - 2)


def nan_scores(prompts, responses):
    return [0.0, math.nan, 1.0, math.nan][: len(responses)]


def inf_score(prompts, responses):
    return [math.inf] + [0.0] * (len(responses) - 1)
