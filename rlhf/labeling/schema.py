"""The labeling database's tables (SQLAlchemy ORM; SQLite and PostgreSQL alike).

Invariants the tables enforce, so no code path can break them:

- ``labels`` is append-only, enforced by database triggers that abort any
  UPDATE or DELETE. A labeler changing their mind inserts a new row with
  ``revision`` one higher and ``supersedes_id`` pointing at the previous
  row; ``(pair_id, labeler_id, revision)`` is unique, so two concurrent
  revisions of the same label cannot both land.
- ``(labeler_id, client_id)`` is unique: a retried submission (same
  client-generated id) can never count twice.
- tokens are stored as SHA-256 digests only.

Times are Unix seconds (float): portable across both databases and what the
throughput statistics compute with.

Schema versions: ``SCHEMA_VERSION`` is what this code reads and writes; an
older database is upgraded in place when opened (``MIGRATIONS``, applied by
the store in one transaction). Steps are additive only (new columns, with
defaults or NULL; new indexes), so they never touch a stored label and the
append-only triggers never fire.
"""

from __future__ import annotations

from typing import Literal

from sqlalchemy import DDL, Boolean, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint, event, false
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

SCHEMA_VERSION = "5"

# version -> the statements that take a database of that version to the next.
MIGRATIONS: dict[str, list[str]] = {
    # 1 -> 2: preference strength and the "both bad" flag on labels.
    "1": ["ALTER TABLE labeling_labels ADD COLUMN strength VARCHAR(24)",
          "ALTER TABLE labeling_labels ADD COLUMN both_bad BOOLEAN NOT NULL DEFAULT FALSE"],
    # 2 -> 3: per-project pair counters (NULL until the store first counts them, under the project
    # lock) and an index on live leases, so progress never scans the project's pairs.
    "2": ["ALTER TABLE labeling_projects ADD COLUMN pair_count INTEGER",
          "ALTER TABLE labeling_projects ADD COLUMN complete_count INTEGER",
          "CREATE INDEX ix_labeling_assignments_live ON labeling_assignments (status, expires_at)"],
    # 3 -> 4: ranking items (K responses to order, InstructGPT-style) and the order a label gives.
    "3": ["ALTER TABLE labeling_pairs ADD COLUMN responses TEXT",
          "ALTER TABLE labeling_pairs ADD COLUMN sources TEXT",
          "ALTER TABLE labeling_labels ADD COLUMN ranking VARCHAR(256)"],
    # 4 -> 5: per-labeler counters (see Labeler), so progress never scans a labeler's history.
    # NULL until counted; the project's counters are cleared too, so that the next write under
    # the project lock counts both.
    "4": ["ALTER TABLE labeling_labelers ADD COLUMN done_count INTEGER",
          "ALTER TABLE labeling_labelers ADD COLUMN open_seen_count INTEGER",
          "UPDATE labeling_projects SET pair_count = NULL, complete_count = NULL"],
}

# Responses per ranking item: 3 to 9 (InstructGPT ranked 4 to 9); 2 is an A/B pair.
MIN_RANKED, MAX_RANKED = 3, 9

# How much better the chosen side is (Llama 2's four grades), for A/B labels;
# optional. Exported as a numeric ``margin`` (see export.py): the margin a
# margin loss demands between the chosen and rejected rewards.
Strength = Literal["significantly_better", "better", "slightly_better", "negligibly_better"]
STRENGTH_MARGIN: dict[str, int] = {"significantly_better": 3, "better": 2, "slightly_better": 1,
                                   "negligibly_better": 0}  # "negligibly better or unsure"


class Base(DeclarativeBase):
    pass


class Meta(Base):
    """Key/value facts about the database itself (schema version)."""

    __tablename__ = "labeling_meta"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(256))


class Project(Base):
    __tablename__ = "labeling_projects"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    config: Mapped[str] = mapped_column(Text)  # ProjectConfig as JSON
    created_at: Mapped[float] = mapped_column(Float)
    # Counters kept in the same transaction as what changes them, so progress
    # need not count the project's pairs: its pairs, and those with
    # ``labeled_count >= overlap`` (complete, for the overlap in ``config``).
    # NULL: not known (a database upgraded from version 2 or 4, or the overlap
    # just changed); the next write under the project lock counts them afresh,
    # with its labelers' counters (see Labeler).
    pair_count: Mapped[int | None] = mapped_column(Integer, nullable=True)
    complete_count: Mapped[int | None] = mapped_column(Integer, nullable=True)


class Labeler(Base):
    __tablename__ = "labeling_labelers"
    __table_args__ = (UniqueConstraint("project_id", "name"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("labeling_projects.id"))
    name: Mapped[str] = mapped_column(String(100))
    role: Mapped[str] = mapped_column(String(16))  # "labeler" or "admin"
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[float] = mapped_column(Float)
    revoked_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    # Counters kept in the same transaction as what changes them, so progress
    # need not count this labeler's assignments (thousands, for a prolific
    # labeler): those they labeled or skipped, and those whose pair is not yet
    # complete (``labeled_count < overlap``), whatever their status. NULL: not
    # known (an upgraded database, or the overlap just changed); counted afresh
    # with the project's counters (see Project).
    done_count: Mapped[int | None] = mapped_column(Integer, nullable=True, default=0)
    open_seen_count: Mapped[int | None] = mapped_column(Integer, nullable=True, default=0)


class Pair(Base):
    __tablename__ = "labeling_pairs"
    __table_args__ = (UniqueConstraint("project_id", "key"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("labeling_projects.id"))
    key: Mapped[str] = mapped_column(String(64))  # sha256 of prompt + the unordered responses: dedup
    prompt: Mapped[str] = mapped_column(Text)  # JSON: a string or a list of chat messages
    response_a: Mapped[str] = mapped_column(Text)
    response_b: Mapped[str] = mapped_column(Text)
    source_a: Mapped[str] = mapped_column(String(512), default="")  # which model wrote side A
    source_b: Mapped[str] = mapped_column(String(512), default="")
    meta: Mapped[str] = mapped_column(Text, default="{}")  # JSON: anything carried over from the input
    # A ranking item: JSON list of its K >= 3 responses (as shown, already shuffled) and of
    # their sources; NULL for an A/B pair. ``response_a``/``response_b`` then hold the first two.
    responses: Mapped[str | None] = mapped_column(Text, nullable=True)
    sources: Mapped[str | None] = mapped_column(Text, nullable=True)
    # Distinct labelers whose current label is not a skip. Kept with the labels
    # in the same transaction so assignment need not count labels.
    labeled_count: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[float] = mapped_column(Float)


# Assignment walks pairs with open slots, fullest first (labeled_count DESC, id):
# an index in exactly that order lets it stop at the first fit instead of sorting.
Index("ix_labeling_pairs_fill", Pair.project_id, Pair.labeled_count.desc(), Pair.id)


class Assignment(Base):
    """A pair shown to a labeler. One row per (pair, labeler), ever: a labeler
    is never given the same pair twice."""

    __tablename__ = "labeling_assignments"
    __table_args__ = (Index("ix_labeling_assignments_open", "pair_id", "status", "expires_at"),
                      Index("ix_labeling_assignments_labeler", "labeler_id", "status"),
                      # Live leases of a project (few: about one per labeler), for progress.
                      Index("ix_labeling_assignments_live", "status", "expires_at"))
    pair_id: Mapped[int] = mapped_column(ForeignKey("labeling_pairs.id"), primary_key=True)
    labeler_id: Mapped[int] = mapped_column(ForeignKey("labeling_labelers.id"), primary_key=True)
    status: Mapped[str] = mapped_column(String(16))  # open | labeled | skipped | released
    assigned_at: Mapped[float] = mapped_column(Float)
    expires_at: Mapped[float] = mapped_column(Float)


class Label(Base):
    __tablename__ = "labeling_labels"
    __table_args__ = (
        UniqueConstraint("labeler_id", "client_id"),
        UniqueConstraint("pair_id", "labeler_id", "revision"),
        Index("ix_labeling_labels_project", "project_id", "pair_id"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("labeling_projects.id"))
    pair_id: Mapped[int] = mapped_column(ForeignKey("labeling_pairs.id"))
    labeler_id: Mapped[int] = mapped_column(ForeignKey("labeling_labelers.id"))
    client_id: Mapped[str] = mapped_column(String(64))
    choice: Mapped[str] = mapped_column(String(8))  # A, B (the sides as shown), tie, skip; rank (ranking items)
    # With choice "rank": JSON list of the item's response indices (0-based, as shown), best first.
    ranking: Mapped[str | None] = mapped_column(String(256), nullable=True)
    strength: Mapped[str | None] = mapped_column(String(24), nullable=True)  # a Strength; A and B only
    # Neither response is acceptable (with A, B or tie: which is less bad). Pairs
    # most voters flag are left out of exports unless asked for.
    both_bad: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    reason: Mapped[str] = mapped_column(Text, default="")
    duration_ms: Mapped[int | None] = mapped_column(Integer, nullable=True)  # time the labeler spent
    revision: Mapped[int] = mapped_column(Integer, default=0)
    supersedes_id: Mapped[int | None] = mapped_column(ForeignKey("labeling_labels.id"), nullable=True)
    created_at: Mapped[float] = mapped_column(Float)


# Append-only, in the database itself: no code path (ours, a script, a
# migration gone wrong) can rewrite or delete a stored label.
_APPEND_ONLY = {
    "sqlite": [
        "CREATE TRIGGER labeling_labels_no_update BEFORE UPDATE ON labeling_labels "
        "BEGIN SELECT RAISE(ABORT, 'labeling_labels is append-only'); END",
        "CREATE TRIGGER labeling_labels_no_delete BEFORE DELETE ON labeling_labels "
        "BEGIN SELECT RAISE(ABORT, 'labeling_labels is append-only'); END",
    ],
    "postgresql": [
        "CREATE OR REPLACE FUNCTION labeling_labels_append_only() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN RAISE EXCEPTION 'labeling_labels is append-only'; END $$",
        "CREATE TRIGGER labeling_labels_append_only BEFORE UPDATE OR DELETE ON labeling_labels "
        "FOR EACH ROW EXECUTE FUNCTION labeling_labels_append_only()",
    ],
}
for _dialect, _statements in _APPEND_ONLY.items():
    for _sql in _statements:
        event.listen(Label.__table__, "after_create", DDL(_sql).execute_if(dialect=_dialect))
