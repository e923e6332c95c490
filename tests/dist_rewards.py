"""Reward functions for the multi-process tests (importable as `dist_rewards:...` with tests/ on sys.path)."""

import json
import os


def rank_and_log(prompts, responses):
    """Score = this process's rank, so a correctly reduced metric is the mean rank.

    With RLHF_TEST_PROMPT_LOG set, also appends each prompt to
    ``$RLHF_TEST_PROMPT_LOG/rank<RANK>.jsonl``, to check that ranks get disjoint prompts.
    """
    rank = int(os.environ.get("RANK", "0"))
    log_dir = os.environ.get("RLHF_TEST_PROMPT_LOG")
    if log_dir:
        with open(os.path.join(log_dir, f"rank{rank}.jsonl"), "a", encoding="utf-8") as f:
            for p in prompts:
                f.write(json.dumps(p) + "\n")
    return [float(rank)] * len(responses)
