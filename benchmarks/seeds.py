"""What the benchmarks repeated over seeds share (rounds.py, hacking.py,
quickstart_seeds.py): a mean with its 95% t-interval across seeds, and one
SFT run per seed that every arm of that seed starts from. A module beside
the scripts, which import it as ``seeds`` (a script's own folder is first
on ``sys.path``)."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

# Student's t, two-sided 95%, by degrees of freedom (scipy is not a dependency).
T_95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26}


def interval(xs: list[float | None]) -> str:
    """"mean ± half-width" over the values that are not None; the mean alone
    for one value, "–" for none."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return "–"
    m = statistics.mean(xs)
    if len(xs) < 2:
        return f"{m:.3f}"
    return f"{m:.3f} ± {T_95[len(xs) - 1] * statistics.stdev(xs) / math.sqrt(len(xs)):.3f}"


def shared_sft(sft_stage: dict, seed: int, work: Path) -> Path:
    """Train (or reuse) the SFT stage for ``seed`` in ``<work>/seed<seed>/shared``; returns its stage dir."""
    import yaml

    from rlhf import recipe as recipe_mod

    out = work / f"seed{seed}" / "shared"
    path = work / f"seed{seed}" / "sft.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"output_dir": str(out), "seed": seed, "stages": {"sft": sft_stage}},
                                   sort_keys=False))
    recipe_mod.run(recipe_mod.load_recipe(path))
    return out / "sft"


def seed_table(rows: dict[int, dict[str, dict]], names: list[str], figures: list[tuple[str, str]],
               first: str = "model") -> list[str]:
    """A Markdown table: one row per name, one ``interval`` cell per figure
    (key, label) over the seeds of ``rows`` (seed -> name -> key -> value)."""
    lines = [f"| {first} | " + " | ".join(label for _, label in figures) + " |", "|---" * (len(figures) + 1) + "|"]
    for name in names:
        cells = [interval([rows[s][name].get(key) for s in rows]) for key, _ in figures]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines

