"""Typed configs of a labeling project and of an export.

Both are built strictly by :func:`rlhf.config.build` (unknown keys and wrong
types are errors naming the key), like the recipe stages' configs.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml

from rlhf.config import build, opt, require_positive, to_dict
from rlhf.errors import BadInput

DEFAULT_GUIDELINES = """\
Read the prompt, then both responses in full.
Choose the response that is more helpful, honest and harmless.
Choose Tie only when neither is better; Skip when you cannot judge (e.g. you
do not understand the prompt). A short reason helps us audit the labels."""


@dataclass
class ProjectConfig:
    """A labeling project: what labelers see and how pairs are shared out."""

    guidelines: str = opt(DEFAULT_GUIDELINES, "instructions shown to labelers above every pair (plain text)")
    overlap: int = opt(1, "distinct labelers per pair (skips do not count); >= 2 to measure agreement")
    lease_seconds: int = opt(900, "how long a pair shown to a labeler is held for them before its slot is "
                                  "offered to someone else")

    def check(self, fail):
        require_positive(self, fail, "overlap")
        if self.lease_seconds < 10:
            raise fail("lease_seconds", f"expected >= 10, got {self.lease_seconds}")
        if not self.guidelines.strip():
            raise fail("guidelines", "must not be empty")

    def to_json(self) -> str:
        return json.dumps(to_dict(self), ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> ProjectConfig:
        return build(cls, json.loads(text))


def load_project_config(path: str | Path | None, **overrides) -> ProjectConfig:
    """A ProjectConfig from a YAML file (or defaults), then non-None overrides.

    Raises BadInput naming the file and key on anything malformed.
    """
    data: dict = {}
    where = lambda key: ""  # noqa: E731 - build() wants a callable
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise BadInput(f"--config {path}: file not found")
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise BadInput(f"{path}: malformed YAML ({getattr(e, 'problem', e)})") from None
        if not isinstance(data, dict):
            raise BadInput(f"{path}: expected a mapping of project settings (guidelines, overlap, ...)")
        where = lambda key: f"{path}: "  # noqa: E731
    data.update({k: v for k, v in overrides.items() if v is not None})
    return build(ProjectConfig, data, "", where)


@dataclass
class ExportConfig:
    """How labels become preference pairs (majority vote per pair)."""

    project: str | None = opt(None, "project to export (default: the database's only project)")
    min_votes: int = opt(1, "leave out pairs with fewer non-skip labels than this")
    ties: Literal["drop", "random"] = opt(
        "drop", "a pair whose vote has no strict winner (or whose majority is 'tie'): drop it, or pick "
                "a side at random (seeded)")
    margin: bool | Literal["votes", "strength"] = opt(
        False, "add a `margin` column for margin losses: `votes` (or true): (winner votes - loser votes) / "
               "votes; `strength`: the winners' mean preference strength, significantly better 3, better 2, "
               "slightly better 1, negligibly better or unsure 0 (votes without one left out of the mean; 0 "
               "when none has one or the side was picked at random)")
    seed: int = opt(0, "seed of the random tie-breaks")
    exclude_labelers: list[str] = opt([], "labelers whose labels are left out (e.g. ones revoked for bad work)")
    include_both_bad: bool = opt(False, "keep pairs most of whose voters marked both responses bad (exported "
                                        "with both_bad: true); by default they are left out")

    def check(self, fail):
        require_positive(self, fail, "min_votes")


def replace(cfg, **changes):
    """``dataclasses.replace`` that ignores None values (unset CLI flags)."""
    return dataclasses.replace(cfg, **{k: v for k, v in changes.items() if v is not None})
