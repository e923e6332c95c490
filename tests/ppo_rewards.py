"""Reward functions for PPO tests (importable as `ppo_rewards:...` with tests/ on sys.path)."""


def count_letter_e(prompts, responses):
    """Trivially learnable: the number of 'e' characters, scaled."""
    return [r.count("e") / 5.0 for r in responses]


def constant(prompts, responses):
    return [0.0 for _ in responses]


# nan_on_some_calls: count_letter_e, but one NaN score on the calls listed in
# NAN_CALLS (1-based). Tests set NAN_CALLS and reset CALLS.
CALLS = {"n": 0}
NAN_CALLS: set[int] = set()


def nan_on_some_calls(prompts, responses):
    CALLS["n"] += 1
    scores = count_letter_e(prompts, responses)
    if CALLS["n"] in NAN_CALLS:
        scores[0] = float("nan")
    return scores


def always_nan(prompts, responses):
    return [float("nan") for _ in responses]


# rising / falling: a proxy that keeps rising and a held-out signal that keeps
# falling, by call count (the shape of reward hacking), for the watch tests.
WATCH_CALLS = {"proxy": 0, "heldout": 0}


def rising(prompts, responses):
    WATCH_CALLS["proxy"] += 1
    return [0.1 * WATCH_CALLS["proxy"] for _ in responses]


def falling(prompts, responses):
    WATCH_CALLS["heldout"] += 1
    return [-0.1 * WATCH_CALLS["heldout"] for _ in responses]
