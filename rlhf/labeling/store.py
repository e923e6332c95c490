"""The durable labeling store: SQLite (WAL) by default, PostgreSQL by URL.

Every operation is one short transaction; a label is acknowledged only after
its transaction commits, so an acknowledged label survives a crash (SQLite:
WAL with ``synchronous=FULL`` fsyncs each commit; PostgreSQL: its default
``synchronous_commit=on``). Labels submitted at the same time in one process
share a transaction (group commit, :mod:`rlhf.labeling.group_commit`): one
writer thread stores each batch under one project lock and one commit, each
label with its own outcome, and answers each caller after that commit.

Concurrency:

- SQLite has one writer at a time. Transactions start with
  ``BEGIN IMMEDIATE`` (take the write lock up front, so a read-then-write
  transaction cannot fail half way with "database is locked"), and threads of
  one process queue on a lock instead of SQLite's sleep-and-retry busy
  handler, which would turn contention into long tail latencies. The
  processes of one server (``serve --workers N``) also queue, on a file lock
  (see :class:`_WriterQueue`); other processes (``rlhf label`` commands while
  the server runs) wait via ``busy_timeout``.
- Nothing that decides about pairs, labels or progress is kept between
  requests in a process: the project's settings, counters, leases and labels
  are read inside each transaction, so any number of server processes (and
  commands changing the settings or labelers meanwhile) see one state. The
  parsed settings are cached by their stored text only (:func:`project_config`).
- PostgreSQL: handing out pairs and storing labels (a batch of them) lock the project row
  (``SELECT ... FOR NO KEY UPDATE``) first, so every decision about a pair's
  slots is made one at a time per project: two labelers cannot both take a
  pair's last slot, whether by being given the pair or by a late label. The
  unique constraints are the backstop; a submission that trips one retries
  and comes back as a replay.

Slots: a pair takes ``overlap`` distinct non-skip labels. A labeler shown a
pair holds one of its slots until their lease expires; a label sent after
that (or after their pair was released) is accepted only while the pair
still has a free slot, else refused (:class:`PairFull`).

Cost per label does not grow with the project: the project row keeps its
pair and complete-pair counts, moved in the same transaction as the pairs
and labels they count, and progress ("remaining" for a labeler) is derived
from them, the labeler's own assignments and the live leases (see
``_Q.mine`` and ``_Q.progress_counts``), never by counting the project's pairs.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from sqlalchemy import (Connection, Engine, Float, Integer, Row, any_, bindparam, case, cast, create_engine, event,
                        func, insert, inspect, literal, literal_column, select, true, update)
from sqlalchemy.dialects import postgresql
from sqlalchemy import text as sql_text
from sqlalchemy.engine import URL, Compiled, make_url
from sqlalchemy.exc import ArgumentError, DatabaseError, DBAPIError, IntegrityError, OperationalError
from sqlalchemy.orm import Session, aliased
from sqlalchemy.sql import Executable

from rlhf.errors import BadInput
from rlhf.labeling.config import ProjectConfig
from rlhf.labeling.group_commit import GroupCommitter, Outcome
from rlhf.labeling.schema import (MIGRATIONS, SCHEMA_VERSION, Assignment, Base, Label, Labeler, Meta, Pair,
                                  Project)

log = logging.getLogger(__name__)

# URL query keys that select what to read, not how to connect (see export.py).
READ_OPTIONS = ("project", "min_votes", "ties", "margin", "seed", "exclude_labelers", "include_both_bad")


class InvalidLabel(Exception):
    """A label that does not fit its item (HTTP 422 naming ``field``): e.g. a
    ranking that is not a permutation of the item's responses."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


class NotFound(Exception):
    """The requested pair or label does not exist in this project (HTTP 404)."""


class Conflict(Exception):
    """The request contradicts stored state (HTTP 409): e.g. a pair not
    assigned to this labeler, or a client id reused for a different label."""


class PairFull(Conflict):
    """A late label (the labeler's lease on the pair expired or was released)
    for a pair whose slots are all taken meanwhile (HTTP 409). Nothing was
    stored; the labeler should move on to their next pair."""


class DbUrl(NamedTuple):
    url: URL  # what SQLAlchemy connects to
    options: dict[str, str]  # READ_OPTIONS found in the query string
    display: str  # the URL with any password hidden, for messages


def parse_db_url(text: str, flag: str = "--db") -> DbUrl:
    """``sqlite:///labels.db``, ``postgresql://user@host/db`` or a bare path.

    A bare path (no ``://``) means an SQLite file. ``postgresql://`` uses the
    psycopg 3 driver. Raises BadInput naming ``flag`` on anything else.
    """
    if "://" not in text:
        text = f"sqlite:///{text}"
    try:
        url = make_url(text)
    except ArgumentError:
        raise BadInput(f"{flag} {text!r}: not a database URL (expected sqlite:///PATH.db or "
                       "postgresql://USER@HOST/DB)") from None
    options = {k: str(url.query[k]) for k in READ_OPTIONS if k in url.query}
    url = url.difference_update_query(READ_OPTIONS)
    display = url.render_as_string(hide_password=True)  # as the user wrote it, less the secret
    backend = url.get_backend_name()
    if backend == "postgres":
        url = url.set(drivername="postgresql")
        backend = "postgresql"
    if backend == "postgresql" and url.drivername == "postgresql":
        url = url.set(drivername="postgresql+psycopg")
    if backend not in ("sqlite", "postgresql"):
        raise BadInput(f"{flag} {text!r}: unsupported database '{backend}' (expected sqlite or postgresql)")
    if backend == "sqlite" and (not url.database or url.database == ":memory:"):
        raise BadInput(f"{flag} {text!r}: expected a file path, e.g. sqlite:///runs/labels.db")
    return DbUrl(url, options, display)


def hash_token(token: str) -> str:
    """SHA-256 of a token. Tokens are 256-bit random strings, so a fast hash
    is enough: there is no low-entropy password to brute-force."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def pair_key(prompt: Any, response_1: str, response_2: str, *more: str) -> str:
    """Identity of a pair (or ranking item) for de-duplication: the prompt and
    the *unordered* responses, so the same responses in another order are one item."""
    blob = json.dumps([prompt, sorted([response_1, response_2, *more])], ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------- records returned to callers


class ProjectInfo(NamedTuple):
    id: int
    name: str
    config: ProjectConfig


class LabelerInfo(NamedTuple):
    id: int
    project_id: int
    name: str
    role: str  # "labeler" or "admin"


class NewPair(NamedTuple):
    """A pair to load, sides already randomised."""

    prompt: Any  # str or chat messages
    response_a: str
    response_b: str
    source_a: str = ""
    source_b: str = ""
    meta: dict | None = None
    # A ranking item: all K >= 3 responses in the order shown (response_a/b: the first two).
    responses: list[str] | None = None
    sources: list[str] | None = None


def new_ranking(prompt: Any, responses: list[str], sources: list[str] | None = None,
                meta: dict | None = None) -> NewPair:
    """A ranking item of K >= 3 responses (order already randomised)."""
    sources = list(sources) if sources is not None else [""] * len(responses)
    return NewPair(prompt, responses[0], responses[1], sources[0], sources[1], meta, list(responses), sources)


class PairView(NamedTuple):
    id: int
    prompt: Any
    response_a: str
    response_b: str
    responses: list[str] | None = None  # a ranking item's K responses; None for an A/B pair
    kind: str = "text"  # "image": the responses are PNG data URIs (rlhf/labeling/images.py)


class LabelRow(NamedTuple):
    id: int
    pair_id: int
    labeler: str
    choice: str
    reason: str
    revision: int
    created_at: float
    duration_ms: int | None
    strength: str | None = None  # a schema.Strength, on A/B labels that say how much better
    both_bad: bool = False
    ranking: tuple[int, ...] | None = None  # with choice "rank": response indices, best first


class SubmitResult(NamedTuple):
    label_id: int
    revision: int
    replayed: bool  # True: this client id was already stored; nothing new was written


@dataclass(frozen=True)
class Submission:
    client_id: str
    pair_id: int
    choice: str
    reason: str = ""
    supersedes: int | None = None
    duration_ms: int | None = None
    strength: str | None = None  # a schema.Strength; A and B only (the server checks)
    both_bad: bool = False  # not with skip (the server checks)
    ranking: tuple[int, ...] | None = None  # with choice "rank": a permutation of the item's response indices


class _Stored(NamedTuple):
    """What :meth:`Store._store_label` did."""
    result: SubmitResult
    # Asked to hand out the next pair too: whether it did (``view``, None when
    # none is left). If not (the labeler may hold another pair open, or this was
    # a replay), :meth:`Store._assign_next` decides.
    leased: bool = False
    view: PairView | None = None


class _Plan(NamedTuple):
    """A label that passed the rules (see :meth:`Store._plan_label`), to write."""
    params: dict[str, Any]  # the label row's columns
    delta: int  # the change to the pair's non-skip labels
    complete: int  # the change to the project's full pairs: +1 the pair fills, -1 it opens again (SQLite)
    status: str  # the labeler's assignment to the pair, after
    needs_room: bool  # takes a slot without a live lease on it: Store._check_room first
    first: bool  # the labeler's first label on the pair (not a revision): one more done
    other_open: int  # the labeler's other open assignments
    open_seen: int | None  # the labeler's open_seen_count (see FRESH_FIRST_AFTER); None: not known
    overlap: int  # the project's labels per pair, when judged (PostgreSQL works out ``complete`` itself)


class _Seen(NamedTuple):
    """A label already stored under a client id (``_Q.by_client_id``), named as in ``_Q.label_context``."""

    seen_id: int
    seen_revision: int
    seen_pair_id: int
    seen_choice: str
    seen_reason: str
    seen_supersedes_id: int | None
    seen_strength: str | None
    seen_both_bad: bool
    seen_ranking: str | None


class _Unclean(Exception):
    """A submission of a batch failed after it may have written: the batch is
    rolled back and run again with a savepoint per submission."""


# Labeler id -> (labels/skips newly done, assignments newly seen): what a batch
# moves the labelers' counters by (see Store._count_for_labelers).
Counts = dict[int, tuple[int, int]]


def _count(counts: Counts, labeler_id: int, done: int = 0, seen: int = 0) -> None:
    d, n = counts.get(labeler_id, (0, 0))
    counts[labeler_id] = (d + done, n + seen)


# A stored submission's outcome in the writer: the label, the next pair handed
# out (with assign_next) and the labeler's progress (see Store._finish_batch).
_Submitted = tuple[SubmitResult, PairView | None, dict[str, int] | None]


class _Pending(NamedTuple):
    """A submission waiting for the group commit (see :meth:`Store.submit`)."""

    labeler: LabelerInfo
    sub: Submission
    assign_next: bool
    now: float | None
    progress: bool = False  # the labeler's progress after it, read in the same transaction (PostgreSQL)


# ---------------------------------------------------------------- the store


# Connections each engine keeps open (it opens them as they are first needed):
# one per request thread of a server process (server.REQUEST_THREADS is
# POOL_SIZE - 2), the label writer's and a spare. A pool smaller than the
# number of threads using it opens a connection for each request beyond it
# and closes it after: on SQLite a file open and four PRAGMAs, on PostgreSQL a
# new backend process. Under 25 labelers that cost more than the label itself
# (PostgreSQL stored 200 labels/s with a pool of 8, 300 with one this size).
# The overflow serves other users of the store in the same process. With
# ``serve --workers N``, PostgreSQL sees up to N * (POOL_SIZE + POOL_OVERFLOW)
# connections; its default max_connections is 100.
# A labeler with more pairs behind them that others have not filled yet than
# this (their open_seen_count) is given pairs nobody labeled first, while there
# are any. The fullest-first search passes over each of their own incomplete
# pairs, the fullest, before it finds one for them: with one labeler far ahead
# on an overlap above 1 its cost grew with their history.
FRESH_FIRST_AFTER = 64

POOL_SIZE = 18
POOL_OVERFLOW = 4


def _sqlite_engine(url: URL, begin: str) -> Engine:
    """An engine whose transactions start with ``begin`` (``BEGIN IMMEDIATE``
    for writers; plain ``BEGIN`` for readers, which WAL never blocks)."""
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30.0},
                           pool_size=POOL_SIZE, max_overflow=POOL_OVERFLOW)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):
        # Let SQLAlchemy's "begin" event, not pysqlite, decide how transactions start.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")  # WAL + FULL: a committed label survives power loss
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):
        conn.exec_driver_sql(begin)

    return engine


def _postgres_engine(url: URL) -> Engine:
    """An engine whose connections plan with indexes only (``enable_seqscan``
    off: a table without a usable index is still scanned), and keep one plan
    per prepared statement (``plan_cache_mode = force_generic_plan``).

    Every statement the store runs per request finds its rows through an
    index. psycopg prepares a statement it has run 5 times, and PostgreSQL may
    then keep one plan for it, made with the planner's statistics of the
    moment. On a project's first labels those still describe a few hundred
    assignments, so the kept plan read the whole table by a sequential scan,
    in progress's count once per live lease: 3-4 ms a call at 3,000 labels
    and growing with each label until autovacuum's next ANALYZE (0.2 ms with
    the index plan, measured under 25 labelers).

    And PostgreSQL plans a prepared statement afresh on every call when its
    plan for unknown parameters looks costlier than the ones made for the
    values: so it did for the batch's progress read (``= ANY(:ids)``, sized
    for ten labelers when one or eight are asked for) and for handing out a
    pair nobody labeled, 120-180 µs of planning a call. The store runs a
    fixed set of statements whose plans do not depend on the values (by
    index, whatever they are): one plan each, made once per connection. One
    labeler alone: 317 -> 376 labels/s (``pg_stat_statements``; one run each).
    """
    engine = create_engine(url, pool_size=POOL_SIZE, max_overflow=POOL_OVERFLOW)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):
        # Outside a transaction, so that no rollback can undo the setting.
        dbapi_conn.autocommit = True
        dbapi_conn.execute("SET enable_seqscan = off")
        dbapi_conn.execute("SET plan_cache_mode = force_generic_plan")
        dbapi_conn.autocommit = False

    return engine


@functools.lru_cache(maxsize=64)
def project_config(text: str) -> ProjectConfig:
    """A project's settings parsed from their stored JSON, cached by that text:
    a changed config is different text, so it is parsed afresh (no stale
    entry to invalidate). Callers must not modify the result (it is shared)."""
    return ProjectConfig.from_json(text)


# What a PairView is built from.
_VIEW = (Pair.id, Pair.prompt, Pair.response_a, Pair.response_b, Pair.responses, Pair.meta)


def _kind(meta: str | None) -> str:
    """What a pair's responses are: "image" when its meta says so (image pairs), else "text"."""
    try:
        kind = json.loads(meta or "{}").get("kind")
    except (ValueError, AttributeError):
        return "text"
    return "image" if kind == "image" else "text"


def _label_row(lab: Label, labeler_name: str) -> LabelRow:
    return LabelRow(lab.id, lab.pair_id, labeler_name, lab.choice, lab.reason, lab.revision, lab.created_at,
                    lab.duration_ms, lab.strength, bool(lab.both_bad),
                    None if lab.ranking is None else tuple(json.loads(lab.ranking)))


def _check_fits(sub: Submission, k: int | None) -> None:
    """A label's kind must fit its item: a ranking (a permutation of the K
    responses, best first) or skip for a ranking item; A, B, tie or skip for a
    pair. Raises :class:`InvalidLabel` naming the field."""
    if k is None:
        if sub.choice == "rank" or sub.ranking is not None:
            raise InvalidLabel("ranking", f"pair {sub.pair_id} is an A/B pair, not a ranking item; "
                                          "send choice A, B, tie or skip without a ranking")
        return
    if sub.choice in ("A", "B", "tie"):
        raise InvalidLabel("choice", f"item {sub.pair_id} is a ranking of {k} responses; send choice 'rank' "
                                     "with a ranking (or 'skip')")
    if sub.choice == "rank":
        order = list(sub.ranking or ())
        if sorted(order) != list(range(k)):
            raise InvalidLabel("ranking", f"expected a permutation of the item's {k} responses "
                                          f"(each of 0..{k - 1} once, best first), got {order}")
    elif sub.ranking is not None:
        raise InvalidLabel("ranking", "only with choice 'rank'")


def _lease_picked(pick):
    """A data-modifying CTE leasing the pair that the CTE ``pick`` chose to the
    labeler ``:me`` (PostgreSQL; see ``_Q.lease_next``)."""
    return (insert(Assignment.__table__)
            .from_select(["pair_id", "labeler_id", "status", "assigned_at", "expires_at"],
                         select(pick.c.id, bindparam("me", type_=Integer), literal("open"),
                                bindparam("now", type_=Float), bindparam("expires", type_=Float)))
            .cte("lease"))


# Assignment statuses the statements compare with, written into their SQL as
# constants rather than bound as parameters. PostgreSQL keeps one plan per
# statement, made without the parameters' values (see _postgres_engine): for
# `status = $1` it guessed a third of all assignments, for 'open' its
# statistics know how few are open. With a bound status, progress's plan hashed
# every assignment of the labeler instead of probing a few pairs by key, and
# cost 3.6 times as much by a labeler's 10,000th label.
_OPEN = literal_column("'open'")
_DONE = (literal_column("'labeled'"), literal_column("'skipped'"))


class _Q:
    """The per-request statements, built once.

    Building a SQLAlchemy statement (especially with aliases and correlated
    subqueries) costs more Python time than SQLite takes to run it; these
    run with bound parameters on every request. The hot ones (authenticate,
    next pair, submit, progress) select columns and run on a Connection, not
    through ORM objects and a Session's unit of work, which cost several
    times the database's own time per label.
    """

    _live = aliased(Assignment)
    # Other labelers' unexpired leases on the pair of the enclosing query.
    live_leases = (select(func.count()).select_from(_live)
                   .where(_live.pair_id == Pair.id, _live.status == _OPEN, _live.expires_at > bindparam("now"),
                          _live.labeler_id != bindparam("me"))
                   .scalar_subquery())
    # FOR NO KEY UPDATE (key_share): serialises assignment and label storing per
    # project (see Store._lock_project) without conflicting with the KEY SHARE
    # locks that inserting a label, pair or labeler takes on the project row
    # through its foreign key. Taken first in every such transaction, so the
    # pair-row locks that follow are always acquired in the same order.
    project = (select(Project.config, Project.pair_count, Project.complete_count)
               .where(Project.id == bindparam("project")).with_for_update(key_share=True))
    project_row = select(Project.config, Project.pair_count, Project.complete_count).where(
        Project.id == bindparam("project"))
    # The project's counters, moved in the same transaction as the pairs and labels they count.
    counters_up = (update(Project).where(Project.id == bindparam("project"))
                   .values(pair_count=Project.pair_count + bindparam("pairs"),
                           complete_count=Project.complete_count + bindparam("complete")))
    counters_set = (update(Project).where(Project.id == bindparam("project"))
                    .values(pair_count=bindparam("pairs"), complete_count=bindparam("complete")))
    own_open = (select(Assignment.expires_at, *_VIEW).join(Pair, Pair.id == Assignment.pair_id)
                .where(Assignment.labeler_id == bindparam("me"), Assignment.status == _OPEN)
                .order_by(Assignment.assigned_at).limit(1))
    # Slots of the pair taken by others: its non-skip labels plus others' live leases (< overlap: room left).
    taken = select(Pair.labeled_count + live_leases).where(Pair.id == bindparam("pair"))
    # Pairs never shown to this labeler with a free slot: what assignment may hand out.
    _new_to_me = (
        # NOT EXISTS, a primary-key probe per candidate pair; NOT IN (SELECT ...) built the
        # set of every pair ever shown to this labeler on each call (cost grew with their history).
        ~select(Assignment.pair_id).where(Assignment.pair_id == Pair.id,
                                          Assignment.labeler_id == bindparam("me")).exists(),
        Pair.labeled_count + live_leases < bindparam("overlap"))
    # Fullest pairs first; the index on (project_id, labeled_count DESC, id) serves this order.
    next_pair = (select(*_VIEW).where(Pair.project_id == bindparam("project"),
                                      Pair.labeled_count < bindparam("overlap"), *_new_to_me)
                 .order_by(Pair.labeled_count.desc(), Pair.id).limit(1))
    # Pairs nobody labeled yet, oldest first, for a labeler far ahead of the others (see
    # FRESH_FIRST_AFTER): the same index's labeled_count = 0 range, already in id order. (With
    # next_pair's `labeled_count < :overlap` as well, SQLite scanned that range and sorted it.)
    next_fresh = (select(*_VIEW).where(Pair.project_id == bindparam("project"), Pair.labeled_count == 0,
                                       *_new_to_me).order_by(Pair.id).limit(1))
    open_seen = select(Labeler.open_seen_count).where(Labeler.id == bindparam("me"))
    by_token = (select(Labeler.id, Labeler.project_id, Labeler.name, Labeler.role)
                .where(Labeler.token_hash == bindparam("hash"), Labeler.revoked_at.is_(None)))
    by_client_id = (select(Label.id, Label.revision, Label.pair_id, Label.choice, Label.reason, Label.supersedes_id,
                           Label.strength, Label.both_bad, Label.ranking)
                    .where(Label.labeler_id == bindparam("me"), Label.client_id == bindparam("client_id")))
    _seen, _cur, _rev = aliased(Label), aliased(Label), aliased(Label)
    _asg, _other = aliased(Assignment), aliased(Assignment)
    # Everything storing a label reads, in one statement (one round trip to PostgreSQL
    # instead of four): the pair's slots, this labeler's assignment to it and current
    # label on it, and the label already stored under this client id (a retry).
    label_context = (
        select(Pair.project_id, Pair.labeled_count, Pair.responses,
               _asg.status.label("asg_status"), _asg.expires_at.label("asg_expires"),
               _cur.id.label("cur_id"), _cur.choice.label("cur_choice"), _cur.revision.label("cur_revision"),
               _seen.id.label("seen_id"), _seen.revision.label("seen_revision"),
               _seen.pair_id.label("seen_pair_id"), _seen.choice.label("seen_choice"),
               _seen.reason.label("seen_reason"), _seen.supersedes_id.label("seen_supersedes_id"),
               _seen.strength.label("seen_strength"), _seen.both_bad.label("seen_both_bad"),
               _seen.ranking.label("seen_ranking"),
               # Whether this labeler holds another pair open: if not, handing out their
               # next pair can skip looking for one (see Store._assign_next).
               select(func.count()).select_from(_other).where(
                   _other.labeler_id == bindparam("me"), _other.status == _OPEN,
                   _other.pair_id != Pair.id).scalar_subquery().label("other_open"),
               # How far ahead of the others this labeler is (see FRESH_FIRST_AFTER).
               open_seen.scalar_subquery().label("open_seen"))
        .select_from(Pair)
        .outerjoin(_asg, (_asg.pair_id == Pair.id) & (_asg.labeler_id == bindparam("me")))
        .outerjoin(_cur, (_cur.pair_id == Pair.id) & (_cur.labeler_id == bindparam("me"))
                   & (_cur.revision == select(func.max(_rev.revision))
                      .where(_rev.pair_id == Pair.id, _rev.labeler_id == bindparam("me")).scalar_subquery()))
        .outerjoin(_seen, (_seen.labeler_id == bindparam("me")) & (_seen.client_id == bindparam("client_id")))
        .where(Pair.id == bindparam("pair")))
    _this_assignment = update(Assignment.__table__).where(Assignment.pair_id == bindparam("pair"),
                                                          Assignment.labeler_id == bindparam("me"))
    renew_lease = _this_assignment.values(expires_at=bindparam("expires"))
    set_status = _this_assignment.values(status=bindparam("new_status"))
    add_assignment = insert(Assignment.__table__)
    add_label = insert(Label.__table__).returning(Label.__table__.c.id)
    schema_version = select(Meta).where(Meta.key == "schema_version").with_for_update()
    current_label = (select(Label).where(Label.pair_id == bindparam("pair"), Label.labeler_id == bindparam("me"))
                     .order_by(Label.revision.desc()).limit(1))
    count_up = (update(Pair).where(Pair.id == bindparam("pair"))
                .values(labeled_count=Pair.labeled_count + bindparam("delta")))
    # Counts the whole project: only when its counters are unknown (see schema.Project).
    pair_counts = select(func.count(), func.sum(case((Pair.labeled_count >= bindparam("overlap"), 1), else_=0))
                         ).where(Pair.project_id == bindparam("project"))
    # Progress without scanning the project: "new to me" = open pairs (from the
    # project's counters) - open pairs ever shown to me (from my counters) - open
    # pairs never shown to me that others' live leases fill (read from the live
    # leases, about one per labeler), whatever the project's size or my history.
    # `mine` counts my two terms outright: only while my counters are unknown.
    mine = (select(func.count(case((Assignment.status.in_(_DONE), 1))),
                   func.count(case((Pair.labeled_count < bindparam("overlap"), 1))))
            .select_from(Assignment).join(Pair, Pair.id == Assignment.pair_id)
            .where(Assignment.labeler_id == bindparam("me")))
    _live_all, _leased, _shown, _own = (aliased(Assignment) for _ in range(4))
    # Pairs with a slot free that others' live leases fill: not complete, and
    # their labels plus every live lease on them reach the overlap. Driven by the
    # live leases (index on status, expires_at), each pair then looked up by its
    # key. Whose leases they are does not matter to a labeler's progress: the
    # pairs ever shown to them are left out (`blocked`), and a pair never shown
    # to them holds no lease of theirs. So this is read once for every labeler of
    # a batch (``progress_of_labelers``); MATERIALIZED keeps PostgreSQL from
    # inlining it into each labeler's count.
    _filled_by_leases = (
        select(Pair.id).distinct().select_from(_leased).join(Pair, Pair.id == _leased.pair_id)
        .where(_leased.status == _OPEN, _leased.expires_at > bindparam("now"),
               Pair.project_id == bindparam("project"), Pair.labeled_count < bindparam("overlap"),
               Pair.labeled_count + select(func.count()).select_from(_live_all).where(
                   _live_all.pair_id == Pair.id, _live_all.status == _OPEN,
                   _live_all.expires_at > bindparam("now")).scalar_subquery() >= bindparam("overlap"))
        .cte("filled_by_leases").prefix_with("MATERIALIZED", dialect="postgresql"))
    # What progress needs after the project row, per labeler, in one statement
    # (one round trip): the labeler's counters (mine's two counts, kept up to
    # date), blocked (the pairs above never shown to them) and their earliest
    # open assignment (as own_open, ties broken by pair id).
    _own_first = (select(_own.pair_id, _own.expires_at).where(_own.labeler_id == Labeler.id, _own.status == _OPEN)
                  .order_by(_own.assigned_at, _own.pair_id).limit(1))
    _progress_columns = (
        Labeler.id, Labeler.done_count.label("done"), Labeler.open_seen_count.label("mine_open"),
        select(func.count()).select_from(_filled_by_leases).where(
            # Two levels down: correlated to the labeler of the outer row by hand.
            ~select(_shown.pair_id).where(_shown.pair_id == _filled_by_leases.c.id,
                                          _shown.labeler_id == Labeler.id).correlate_except(_shown).exists()
        ).correlate(Labeler).scalar_subquery().label("blocked"),
        _own_first.with_only_columns(_own.pair_id).scalar_subquery().label("own_id"),
        _own_first.with_only_columns(_own.expires_at).scalar_subquery().label("own_expires"))
    progress_counts = select(*_progress_columns).where(Labeler.id == bindparam("me"))
    # PostgreSQL: the same for the labelers ``:ids`` (an array) of one project, a row each.
    progress_of_labelers = select(*_progress_columns).where(
        Labeler.id == any_(bindparam("ids", type_=postgresql.ARRAY(Integer))))
    # The labeler counters (see schema.Labeler) moved by a batch's labels and assignments.
    labeler_counters_up = (update(Labeler).where(Labeler.id == bindparam("me"))
                           .values(done_count=Labeler.done_count + bindparam("done"),
                                   open_seen_count=Labeler.open_seen_count + bindparam("seen")))
    # A pair that fills (or opens again): it leaves (or rejoins) the open pairs seen by each labeler it was given to.
    seen_pair_filled = (update(Labeler)
                        .where(Labeler.id.in_(select(Assignment.labeler_id)
                                              .where(Assignment.pair_id == bindparam("pair"))))
                        .values(open_seen_count=Labeler.open_seen_count - bindparam("complete")))
    # Counts every labeler of the project afresh (their counters unknown: see schema.Labeler).
    _cnt = aliased(Assignment)
    labeler_counters_set = (
        update(Labeler).where(Labeler.project_id == bindparam("project"))
        .values(done_count=select(func.count()).select_from(_cnt)
                .where(_cnt.labeler_id == Labeler.id, _cnt.status.in_(_DONE)).scalar_subquery(),
                open_seen_count=select(func.count()).select_from(_cnt).join(Pair, Pair.id == _cnt.pair_id)
                .where(_cnt.labeler_id == Labeler.id, Pair.labeled_count < bindparam("overlap")).scalar_subquery()))

    # PostgreSQL only (SQLite has no data-modifying WITH): a label's writes, and
    # handing out the next pair, each as one statement of data-modifying CTEs.
    # Statements in one WITH all see the same snapshot, so none of these may read
    # what another writes, except through RETURNING: the counters are SQL-side
    # increments, seen_filled reads the assignments' labeler ids (which `close`
    # leaves alone), and `pick` never chooses a pair this labeler was given. A
    # `:delta` of 0 makes `bump` match no row, and `filled` (whether the label
    # fills the pair, +1, or opens it again, -1) is then NULL: fill and
    # seen_filled match none either, as skipping those statements does on
    # SQLite. The UPDATEs move what SQLite's own statements (count_up,
    # counters_up, seen_pair_filled, set_status) move, so both stores write the
    # same. The
    # label's columns are bound as `new_<column>`: SQLAlchemy would take a
    # parameter named like a column of an UPDATEd table as a value to SET.
    _delta, _overlap = bindparam("delta", type_=Integer), bindparam("overlap", type_=Integer)
    _LT = Label.__table__
    _new_label = (insert(_LT).values({c.name: bindparam(f"new_{c.name}") for c in _LT.c if c.name != "id"})
                  .returning(_LT.c.id).cte("new_label"))
    _bump = count_up.where(_delta != 0).returning(Pair.labeled_count).cte("bump")
    # From the count the pair has after this label (bump's RETURNING), not the
    # one read before: labels of one batch on the same pair, sent in one round
    # (see Store._write_together), each see the ones before them.
    _filled = (select(cast(_bump.c.labeled_count >= _overlap, Integer)
                      - cast(_bump.c.labeled_count - _delta >= _overlap, Integer)).scalar_subquery())
    _fill = (update(Project).where(Project.id == bindparam("project"), _filled != 0)
             .values(complete_count=Project.complete_count + _filled).cte("fill"))
    _seen_filled = seen_pair_filled.where(_filled != 0).values(
        open_seen_count=Labeler.open_seen_count - _filled).cte("seen_filled")
    _close = set_status.cte("close")
    write_label = select(_new_label.c.id).add_cte(_bump, _fill, _seen_filled, _close)
    _pick = next_pair.cte("pick")
    _lease = _lease_picked(_pick)
    lease_next = select(_pick).add_cte(_lease)
    _fresh = next_fresh.cte("pick")
    lease_fresh = select(_fresh).add_cte(_lease_picked(_fresh))
    # Both in one statement: the label, and the labeler's next pair (a row of
    # NULLs after the label's id when none is left).
    write_label_lease_next = (select(_new_label.c.id.label("label_id"), *_pick.c)
                              .select_from(_new_label.outerjoin(_pick, true()))
                              .add_cte(_bump, _fill, _seen_filled, _close, _lease))


class _WriterQueue:
    """Where an SQLite store's write transactions wait for their turn.

    Threads of this process queue on a lock. With ``path`` (a server running
    in several processes), the thread holding it then takes an exclusive
    ``flock`` on that file, so processes queue too. Written by hand because
    SQLite's own wait (``busy_timeout``) is a sleep-and-retry loop, sleeping
    1, 2, 5, ... up to 100 ms between tries: while one process keeps the
    write lock busy, the other's tries keep missing the short gaps and its
    requests wait tens of ms, whereas the kernel wakes a process blocked in
    ``flock`` the moment the lock is free. ``BEGIN IMMEDIATE`` and the busy
    timeout stay: they make each transaction atomic whatever the queue, and
    cover writers that do not queue here (``rlhf label`` commands).
    """

    def __init__(self, path: Path | None = None):
        self._threads = threading.Lock()
        # Read-only is enough for flock; nothing is ever written to the file.
        self._fd = None if path is None else os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)

    def __enter__(self) -> None:
        self._threads.acquire()
        if self._fd is not None:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX)  # blocks in the kernel, without the GIL
            except BaseException:
                self._threads.release()
                raise

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        self._threads.release()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _reconnecting(method):
    """Run a Store method once more when the database connection was lost
    under it (PostgreSQL restarted, or a proxy dropped an idle connection):
    SQLAlchemy then discards every pooled connection, so the second run gets a
    fresh one. This replaces testing each connection as it leaves the pool
    (``pool_pre_ping``), a round trip per checkout: three per label. Only for
    methods that are safe to run twice: reads, and writes that find their own
    earlier effect if it was committed after all (a label by its client id, a
    lease by its holder)."""

    @functools.wraps(method)
    def run(self: Store, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except DBAPIError as e:
            if not e.connection_invalidated:
                raise
            log.warning("%s: lost the database connection (%s); trying again on a new one", self.display,
                        str(e.orig).strip().splitlines()[0] if str(e.orig).strip() else type(e.orig).__name__)
            return method(self, *args, **kwargs)

    return run


class Store:
    """All reads and writes of the labeling database."""

    def __init__(self, engine: Engine, display: str, read_engine: Engine | None = None,
                 writer_lock_file: Path | None = None):
        self.engine = engine
        self.read_engine = read_engine or engine
        self.display = display
        self.is_sqlite = engine.dialect.name == "sqlite"
        # PostgreSQL: no queue here; the project row lock orders the writers (see _lock_project).
        self._lock = _WriterQueue(writer_lock_file) if self.is_sqlite else contextlib.nullcontext()
        # Label submissions: one writer thread, batching what arrives together (see submit).
        self._compiled: dict[Executable, tuple[Compiled, str]] = {}  # see _pipeline
        self._committer: GroupCommitter[_Pending, _Submitted] = GroupCommitter(
            self._submit_batch, name="label-writer")

    # ------------------------------------------------------------ opening

    @classmethod
    def open(cls, url: str | DbUrl, create: bool = False, flag: str = "--db", shared: bool = False) -> Store:
        """Open (and with ``create`` initialise) a labeling database.

        Never modifies a database that is not a labeling database, and never
        creates an empty SQLite file when ``create`` is False. ``shared``: one
        of several server processes writing to it; with SQLite they queue for
        the write lock on the file ``PATH-writers.lock`` (see :class:`_WriterQueue`).
        """
        db = url if isinstance(url, DbUrl) else parse_db_url(url, flag)
        writer_lock_file = None
        if db.url.get_backend_name() == "sqlite":
            path = Path(db.url.database)
            if not path.exists() and not create:
                raise BadInput(f"{flag} {db.display}: no labeling database there "
                               "(create one with `rlhf label pairs`)")
            if path.is_dir():
                raise BadInput(f"{flag} {db.display}: is a directory, expected a database file")
            if create:
                path.parent.mkdir(parents=True, exist_ok=True)
            engine, read_engine = _sqlite_engine(db.url, "BEGIN IMMEDIATE"), _sqlite_engine(db.url, "BEGIN")
            if shared:
                writer_lock_file = path.with_name(path.name + "-writers.lock")
        else:
            try:
                # No pool_pre_ping: a lost connection is replaced by a retry instead (see _reconnecting).
                engine = _postgres_engine(db.url)
                # Reads (sign-in checks, progress) without BEGIN and COMMIT, two round trips
                # fewer each: under PostgreSQL's default READ COMMITTED each statement sees
                # what is committed when it starts, inside a transaction or not. Same pool.
                read_engine = engine.execution_options(isolation_level="AUTOCOMMIT")
            except ImportError:
                raise BadInput(f"{flag} {db.display}: the PostgreSQL driver is missing "
                               "(pip install 'rlhf[postgres]')") from None
        try:
            store = cls(engine, db.display, read_engine, writer_lock_file)
        except OSError as e:
            engine.dispose()
            read_engine.dispose()
            raise BadInput(f"{flag} {db.display}: cannot open the writers' lock file {writer_lock_file} "
                           f"({e.strerror})") from None
        try:
            store._check_schema(create, flag)
        except (DatabaseError, OperationalError) as e:
            store.close()
            raise BadInput(f"{flag} {db.display}: cannot open ({str(e.orig).splitlines()[0]})") from None
        except BadInput:
            store.close()
            raise
        return store

    def _check_schema(self, create: bool, flag: str) -> None:
        tables = set(inspect(self.engine).get_table_names())
        if Meta.__tablename__ not in tables:
            # An SQLite file is ours alone; a PostgreSQL database may hold other apps' tables.
            if not create or (self.is_sqlite and tables):
                raise BadInput(f"{flag} {self.display}: not a labeling database (no labeling tables)")
            Base.metadata.create_all(self.engine)
            with self.transaction() as s:
                s.merge(Meta(key="schema_version", value=SCHEMA_VERSION))
            return
        with self.reading() as s:
            version = s.get(Meta, "schema_version")
        found = version.value if version else "none"
        if found == SCHEMA_VERSION:
            return
        if found not in MIGRATIONS:
            raise BadInput(f"{flag} {self.display}: labeling schema version {found}, this rlhf reads "
                           f"{SCHEMA_VERSION} (and upgrades {', '.join(sorted(MIGRATIONS))}); a newer rlhf "
                           "wrote it?")
        self._migrate()

    def _migrate(self) -> None:
        """Upgrade an older schema in place, every step in one transaction:
        a crash leaves the old version, whole (DDL is transactional in both
        databases). Another process opening the database at the same time
        waits on the version row and then finds nothing left to do."""
        with self.transaction() as s:
            row = s.scalar(_Q.schema_version)
            start = version = row.value
            while version != SCHEMA_VERSION:
                for statement in MIGRATIONS[version]:
                    s.execute(sql_text(statement))
                version = str(int(version) + 1)
            row.value = version
        if start != version:
            log.info("%s: labeling schema upgraded from version %s to %s", self.display, start, version)

    def close(self) -> None:
        self._committer.close()  # writes what is queued first
        self.engine.dispose()
        self.read_engine.dispose()
        if isinstance(self._lock, _WriterQueue):
            self._lock.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Session]:
        """One write transaction, committed on success: the unit of durability."""
        with self._lock, Session(self.engine, expire_on_commit=False) as session, session.begin():
            yield session

    @contextlib.contextmanager
    def _writing(self) -> Iterator[Connection]:
        """:meth:`transaction` on a bare Connection, for the per-label hot path."""
        with self._lock, self.engine.begin() as conn:
            yield conn

    @contextlib.contextmanager
    def _read_conn(self) -> Iterator[Connection]:
        """:meth:`reading` on a bare Connection."""
        with self.read_engine.begin() as conn:
            yield conn

    @contextlib.contextmanager
    def reading(self) -> Iterator[Session]:
        """A read-only snapshot; with SQLite WAL it runs beside the writer."""
        with Session(self.read_engine, expire_on_commit=False) as session, session.begin():
            yield session

    # ------------------------------------------------------------ projects

    def create_project(self, name: str, config: ProjectConfig) -> ProjectInfo:
        with self.transaction() as s:
            if s.scalar(select(Project).where(Project.name == name)) is not None:
                raise BadInput(f"--project {name}: already exists")
            p = Project(name=name, config=config.to_json(), created_at=time.time(), pair_count=0,
                        complete_count=0)
            s.add(p)
            s.flush()
            return ProjectInfo(p.id, p.name, config)

    def set_project_config(self, project: ProjectInfo, config: ProjectConfig) -> ProjectInfo:
        with self.transaction() as s:
            # The complete count depends on the overlap: counted afresh by the next write (under the lock).
            s.execute(update(Project).where(Project.id == project.id)
                      .values(config=config.to_json(), pair_count=None, complete_count=None))
        return project._replace(config=config)

    def projects(self) -> list[ProjectInfo]:
        with self.reading() as s:
            rows = s.scalars(select(Project).order_by(Project.id)).all()
        return [ProjectInfo(p.id, p.name, project_config(p.config)) for p in rows]

    def project(self, name: str | None, flag: str = "--project") -> ProjectInfo:
        """A project by name; with no name, the database's only project."""
        projects = self.projects()
        if name is None:
            if len(projects) == 1:
                return projects[0]
            if not projects:
                raise BadInput(f"{self.display}: has no projects yet (create one with `rlhf label pairs`)")
            raise BadInput(f"{flag}: required, {self.display} has several projects: "
                           f"{', '.join(p.name for p in projects)}")
        for p in projects:
            if p.name == name:
                return p
        known = ", ".join(p.name for p in projects) or "none"
        raise BadInput(f"{flag} {name}: no such project in {self.display} (projects: {known})")

    @_reconnecting
    def project_by_id(self, project_id: int) -> ProjectInfo:
        with self.reading() as s:
            name, config = s.execute(select(Project.name, Project.config).where(Project.id == project_id)).one()
        return ProjectInfo(project_id, name, project_config(config))

    # ------------------------------------------------------------ labelers

    def add_labeler(self, project: ProjectInfo, name: str, token: str, role: str = "labeler",
                    replace_token: bool = False) -> LabelerInfo:
        """Register a labeler (or admin) with a token; only its hash is stored.

        With ``replace_token`` an existing labeler gets the new token (the old
        one stops working); their labels are untouched.
        """
        with self.transaction() as s:
            row = s.scalar(select(Labeler).where(Labeler.project_id == project.id, Labeler.name == name))
            if row is not None and not replace_token:
                raise BadInput(f"--name {name}: already a labeler of project {project.name} "
                               "(use --new-token to issue a new token)")
            if row is None:
                row = Labeler(project_id=project.id, name=name, role=role, token_hash=hash_token(token),
                              created_at=time.time())
                s.add(row)
            else:
                row.token_hash, row.role, row.revoked_at = hash_token(token), role, None
            s.flush()
            return LabelerInfo(row.id, row.project_id, row.name, row.role)

    def revoke_labeler(self, project: ProjectInfo, name: str) -> tuple[bool, int]:
        """Revoke a labeler's token: their next request is refused. Pairs they
        hold open go back to the pool; their labels stay (labels are
        append-only; leave them out of an export with ``exclude_labelers``).
        Returns (newly revoked, open pairs released). ``add-labeler
        --new-token`` reinstates them."""
        with self.transaction() as s:
            # Under the project lock, as every change to leases and labeler counters: the label
            # writer updates assignments and then labeler rows, and this the other way round.
            self._lock_project(s.connection(), project.id, None)
            row = s.scalar(select(Labeler).where(Labeler.project_id == project.id, Labeler.name == name))
            if row is None:
                names = s.scalars(select(Labeler.name).where(Labeler.project_id == project.id)).all()
                raise BadInput(f"--name {name}: not a labeler of project {project.name} "
                               f"(labelers: {', '.join(sorted(names)) or 'none'})")
            if row.revoked_at is not None:
                return False, 0
            row.revoked_at = time.time()
            released = s.execute(update(Assignment).where(Assignment.labeler_id == row.id,
                                                          Assignment.status == "open")
                                 .values(status="released")).rowcount
            return True, released

    @_reconnecting
    def authenticate(self, token: str) -> LabelerInfo | None:
        with self._read_conn() as c:
            row = c.execute(_Q.by_token, {"hash": hash_token(token)}).first()
        return None if row is None else LabelerInfo(*row)

    def labelers(self, project: ProjectInfo) -> list[LabelerInfo]:
        with self.reading() as s:
            rows = s.scalars(select(Labeler).where(Labeler.project_id == project.id).order_by(Labeler.id))
            return [LabelerInfo(r.id, r.project_id, r.name, r.role) for r in rows]

    # ------------------------------------------------------------ pairs

    def add_pairs(self, project: ProjectInfo, pairs: list[NewPair]) -> tuple[int, int]:
        """Insert pairs not already in the project. Returns (added, duplicates)."""
        now = time.time()
        added = 0
        with self.transaction() as s:
            existing = set(s.scalars(select(Pair.key).where(Pair.project_id == project.id)))
            for p in pairs:
                key = pair_key(p.prompt, *(p.responses or (p.response_a, p.response_b)))
                if key in existing:
                    continue
                existing.add(key)
                s.add(Pair(project_id=project.id, key=key, prompt=json.dumps(p.prompt, ensure_ascii=False),
                           response_a=p.response_a, response_b=p.response_b, source_a=p.source_a,
                           source_b=p.source_b, meta=json.dumps(p.meta or {}, ensure_ascii=False),
                           responses=None if p.responses is None else json.dumps(p.responses, ensure_ascii=False),
                           sources=None if p.responses is None else json.dumps(p.sources or [""] * len(p.responses),
                                                                               ensure_ascii=False),
                           labeled_count=0, created_at=now))
                added += 1
            if added:
                s.execute(_Q.counters_up, {"project": project.id, "pairs": added, "complete": 0})
        if added and not self.is_sqlite:
            self._analyze()
        return added, len(pairs) - added

    def _analyze(self) -> None:
        """PostgreSQL: refresh the planner's statistics of the pair and
        assignment tables now, not when autovacuum gets round to it. Without
        them, progress's count of pairs that other labelers' leases fill
        (``_Q.progress_counts``) walked every unfilled pair of the project (3 ms a call
        at 800 pairs, growing with the project) instead of the live leases
        (0.1 ms): seen in a benchmark started right after loading the pairs."""
        with self.engine.begin() as c:
            c.execute(sql_text(f"ANALYZE {Pair.__tablename__}, {Assignment.__tablename__}"))

    def pairs(self, project: ProjectInfo) -> dict[int, Pair]:
        """Every pair of the project by id (detached ORM rows, read-only use)."""
        with self.reading() as s:
            return {p.id: p for p in s.scalars(select(Pair).where(Pair.project_id == project.id))}

    @staticmethod
    def _view(p) -> PairView:
        """A PairView from a Pair or a row with the ``_VIEW`` columns."""
        return PairView(p.id, json.loads(p.prompt), p.response_a, p.response_b,
                        None if p.responses is None else json.loads(p.responses), _kind(p.meta))

    @_reconnecting
    def next_pair(self, labeler: LabelerInfo, now: float | None = None) -> PairView | None:
        """The pair this labeler should label next, leased to them; None when done."""
        with self._writing() as c:
            cfg, now = self._lock_project(c, labeler.project_id, now)
            counts: Counts = {}
            view = self._assign_next(c, labeler, cfg, now, counts)
            self._count_for_labelers(c, counts)
            return view

    @staticmethod
    def _lock_project(s: Connection, project_id: int, now: float | None,
                      row: Row | None = None) -> tuple[ProjectConfig, float]:
        """Inside a write transaction, first: lock the project's row and read
        its settings (``row``: that row, when the caller read it, with its lock).

        Every decision about a pair's slots (handing it out, counting a label
        into it) is made under this lock, so they happen one at a time per
        project (PostgreSQL; SQLite has one writer anyway). The time they are
        judged at is read once the lock is granted, so a request that queued
        behind others sees the leases as they are when it runs.
        """
        config, pairs, _complete = row if row is not None else s.execute(_Q.project, {"project": project_id}).one()
        cfg = project_config(config)
        if pairs is None:  # counters unknown (see schema.Project): count once, under the lock
            pairs, complete = s.execute(_Q.pair_counts, {"project": project_id, "overlap": cfg.overlap}).one()
            s.execute(_Q.counters_set, {"project": project_id, "pairs": pairs, "complete": complete or 0})
            s.execute(_Q.labeler_counters_set, {"project": project_id, "overlap": cfg.overlap})
        return cfg, time.time() if now is None else now

    @staticmethod
    def _lease_params(labeler: LabelerInfo, cfg: ProjectConfig, now: float,
                      open_seen: int | None = None) -> dict[str, Any]:
        """The parameters of ``_Q.next_pair`` and of leasing the pair it picks.
        ``open_seen``: the labeler's counter, when the caller read it; it decides
        ``fresh_first`` (None: :meth:`_lease_next` reads it)."""
        return {"me": labeler.id, "now": now, "project": labeler.project_id, "overlap": cfg.overlap,
                "expires": now + cfg.lease_seconds,
                "fresh_first": None if open_seen is None else open_seen > FRESH_FIRST_AFTER}

    def _assign_next(self, s: Connection, labeler: LabelerInfo, cfg: ProjectConfig, now: float,
                     counts: Counts) -> PairView | None:
        """Under :meth:`_lock_project`: this labeler's unfinished pair (a page
        reload shows the same pair), else a new one. A new assignment is added
        to ``counts``, for :meth:`_count_for_labelers`.

        New pairs: ones this labeler was never given whose non-skip labels
        plus others' live leases leave a slot under ``overlap``, fullest
        first so that pairs reach their overlap early.
        """
        params = self._lease_params(labeler, cfg, now)
        own = s.execute(_Q.own_open, params).first()
        if own is not None:
            if own.expires_at - now > cfg.lease_seconds / 2:
                return self._view(own)  # fresh lease: no write, so no commit to wait for
            mine = {"pair": own.id, "me": labeler.id}
            if own.expires_at > now or s.scalar(_Q.taken, {**params, "pair": own.id}) < cfg.overlap:
                s.execute(_Q.renew_lease, {**mine, "expires": now + cfg.lease_seconds})
                return self._view(own)
            # Its slot went to someone else while the lease was lapsed.
            s.execute(_Q.set_status, {**mine, "new_status": "released"})
        pair = self._lease_next(s, params)
        if pair is None:
            return None
        _count(counts, labeler.id, seen=1)  # a pair is handed out only while it has room: open
        return self._view(pair)

    def _lease_next(self, s: Connection, params: dict[str, Any]) -> Row | None:
        """Lease this labeler the next pair (``params`` from :meth:`_lease_params`);
        that pair, or None: ``_Q.next_pair``'s choice, or for a labeler far
        ahead (``fresh_first``) a pair nobody labeled yet while there is one.
        PostgreSQL: one statement each (see :meth:`_write_label` for why)."""
        fresh_first = params["fresh_first"]
        if fresh_first is None:
            fresh_first = (s.scalar(_Q.open_seen, params) or 0) > FRESH_FIRST_AFTER
        picks = [(_Q.next_fresh, _Q.lease_fresh)] if fresh_first else []
        for pick, lease in picks + [(_Q.next_pair, _Q.lease_next)]:
            if not self.is_sqlite:
                pair = s.execute(lease, params).first()
            else:
                pair = s.execute(pick, params).first()
                if pair is not None:
                    s.execute(_Q.add_assignment, {"pair_id": pair.id, "labeler_id": params["me"], "status": "open",
                                                  "assigned_at": params["now"], "expires_at": params["expires"]})
            if pair is not None:
                return pair
        return None

    @_reconnecting
    def pair_for(self, labeler: LabelerInfo, pair_id: int) -> tuple[PairView, LabelRow | None]:
        """A pair this labeler was given and their current label on it (to
        review or revise it)."""
        with self.reading() as s:
            pair = s.get(Pair, pair_id)
            if pair is None or pair.project_id != labeler.project_id:
                raise NotFound(f"pair {pair_id} not found")
            if s.get(Assignment, (pair_id, labeler.id)) is None:
                raise Conflict(f"pair {pair_id} was not assigned to you")
            lab = s.scalar(_Q.current_label, {"pair": pair_id, "me": labeler.id})
            return self._view(pair), None if lab is None else _label_row(lab, labeler.name)

    # ------------------------------------------------------------ labels

    def submit(self, labeler: LabelerInfo, sub: Submission, assign_next: bool = False,
               now: float | None = None) -> tuple[SubmitResult, PairView | None]:
        """Store one label, exactly once per ``client_id``; optionally hand out
        the next pair in the same transaction.

        Labels submitted at the same time (from this process's threads) share
        one transaction and one commit (see :mod:`group_commit` and
        :meth:`_submit_batch`); this returns once the commit holding this
        label is done, so an acknowledged label is durable.

        A replay (same client id, same content) returns the stored label with
        ``replayed=True``; the same client id with different content, a pair
        not assigned to this labeler, or a second label for a pair without
        ``supersedes`` naming the current one is a Conflict. A late label that
        would exceed the pair's overlap is a :class:`PairFull`. ``now``: the
        time to judge leases at (tests); default, the time it is written.
        """
        result, view, _progress = self._committer.submit(_Pending(labeler, sub, assign_next, now))
        return result, view

    def submit_and_next(self, labeler: LabelerInfo, sub: Submission) -> tuple[SubmitResult, PairView | None,
                                                                               dict[str, int]]:
        """What the web page's submit needs: :meth:`submit` with the next pair
        (one commit), and the labeler's :meth:`progress` after both.

        PostgreSQL reads the progress in the label's transaction, sent with
        the batch's last writes (see :meth:`_finish_batch`). Read after the
        commit, its two statements took a pool connection and two round trips
        of their own per label: reading them here cut the server's CPU per
        label by about 0.2 ms and PostgreSQL's by 0.17 ms under 25 labelers.
        SQLite reads it after the commit: its readers never wait for the
        writer, and the writer, which holds the database's one write lock,
        does not do their work.
        """
        result, view, progress = self._committer.submit(_Pending(labeler, sub, True, None, progress=True))
        return result, view, self.progress(labeler) if progress is None else progress

    @_reconnecting
    def _submit_batch(self, batch: list[_Pending]) -> list[Outcome]:
        """The group committer's writer: every submission of ``batch`` in one
        transaction, then one commit.

        The batch's projects are locked once, first, in id order (one lock per
        batch instead of one per label, taken in the same order in every
        process). Each submission's outcome is its own: one refused (409, 404,
        422) or failed does not stop the others being stored. A refusal comes
        before any write (see :meth:`_store_label`), so it needs no undoing;
        a submission that fails after writing (a database error, a unique
        constraint another process won) rolls the batch back, which is then
        run again with a savepoint around each submission. Savepoints are not
        the default because each costs two more round trips to PostgreSQL.
        If the commit fails, every submission of the batch gets that error
        and none was acknowledged.
        """
        try:
            return self._write_batch(batch, isolate=False)
        except _Unclean:
            return self._write_batch(batch, isolate=True)

    def _write_batch(self, batch: list[_Pending], isolate: bool) -> list[Outcome]:
        with self._writing() as c:
            counts: Counts = {}
            if not self.is_sqlite and not isolate:
                configs, outcomes, one_by_one = self._write_together(c, batch, counts)
            else:
                configs = {pid: self._lock_project(c, pid, None)[0]
                           for pid in sorted({item.labeler.project_id for item in batch})}
                outcomes, one_by_one = [None] * len(batch), list(range(len(batch)))
            for i in one_by_one:
                outcomes[i] = self._submit_one(c, batch[i], configs[batch[i].labeler.project_id], isolate, counts)
            if self.is_sqlite:
                self._count_for_labelers(c, counts)
                return [o if isinstance(o, BaseException) else (*o, None) for o in outcomes]
            return self._finish_batch(c, batch, outcomes, configs, counts)

    def _finish_batch(self, c: Connection, batch: list[_Pending], outcomes: list[Any],
                      configs: dict[int, ProjectConfig], counts: Counts) -> list[Outcome]:
        """PostgreSQL, the last round trip of a batch before its commit: the
        labelers' counters moved (see :meth:`_count_for_labelers`), and the
        progress of each stored label that asked for it, read after every
        write of the batch (see :meth:`submit_and_next`): one statement for the
        labelers of a project (``_Q.progress_of_labelers``). One per labeler
        read the pairs that others' leases fill once for each; per label that
        was PostgreSQL's second costliest statement."""
        now = time.time()
        groups: dict[tuple[int, float], list[int]] = {}  # (project, time judged at) -> its items
        for i, item in enumerate(batch):
            if item.progress and not isinstance(outcomes[i], BaseException):
                groups.setdefault((item.labeler.project_id, now if item.now is None else item.now), []).append(i)
        projects = sorted({pid for pid, _ in groups})
        params = {key: {**self._progress_params(batch[items[0]].labeler, configs[key[0]].overlap, key[1]),
                        "ids": sorted({batch[i].labeler.id for i in items})} for key, items in groups.items()}
        runs = ([(_Q.labeler_counters_up, p) for p in self._counter_params(counts)]
                + [(_Q.project_row, {"project": pid}) for pid in projects]
                + [(_Q.progress_of_labelers, params[key]) for key in groups])
        rows = self._pipeline(c, runs, every_row=True) if runs else []
        project_rows = dict(zip(projects, (r[0] for r in rows[len(counts):])))
        progress = {}
        for key, labelers in zip(groups, rows[len(counts) + len(projects):]):
            by_id = {row.id: row for row in labelers}
            for i in groups[key]:
                progress[i] = self._progress(c, {**params[key], "me": batch[i].labeler.id},
                                             project_rows[key[0]], by_id[batch[i].labeler.id])
        return [o if isinstance(o, BaseException) else (*o, progress.get(i)) for i, o in enumerate(outcomes)]

    def _write_together(self, c: Connection, batch: list[_Pending],
                        counts: Counts) -> tuple[dict[int, ProjectConfig], list[Any], list[int]]:
        """PostgreSQL: lock the batch's projects and store what can be of the
        batch in rounds of two round trips each, whatever the number of labels
        in a round: their contexts (with the locks, in the first round), then
        their writes, each sent as a pipeline (see :meth:`_pipeline`). One by
        one, a label takes two round trips of its own. Returns the projects'
        settings, the outcomes so far and the indices left for
        :meth:`_submit_one`, which runs them after.

        A round takes the labels sharing no labeler with an earlier one of the
        batch still waiting, so that no write of the round changes what another
        label of it read: reading every context first reads what one by one
        would. Labels of different labelers on the same pair go in one round:
        what one reads of the pair that another's write changes (its count of
        labels) is the count its write works out again, in SQL, to tell whether
        the pair fills (see ``_Q.write_label``). Under 25 labelers on an
        overlap of 3 about a third of a batch's labels shared their pair with
        an earlier one, which took 2-3 rounds a batch instead of 1. The next
        round takes the rest. Left for
        one by one: a replay, a label needing a room check (its lease
        lapsed), a labeler holding another pair open (their next pair may
        be that one), a pair that does not exist. A failure is raised as
        :class:`_Unclean`: the batch is then run again one by one, in
        savepoints.
        """
        projects = sorted({item.labeler.project_id for item in batch})
        configs: dict[int, ProjectConfig] = {}
        outcomes: list[Any] = [None] * len(batch)
        waiting, one_by_one = list(range(len(batch))), []
        try:
            while waiting:
                claimed: set[int] = set()
                this_round, later = [], []
                for i in waiting:
                    me = batch[i].labeler.id
                    (later if me in claimed else this_round).append(i)
                    claimed.add(me)
                locks = [] if configs else [(_Q.project, {"project": pid}) for pid in projects]
                rows = self._pipeline(c, locks + [(_Q.label_context, {
                    "pair": batch[i].sub.pair_id, "me": batch[i].labeler.id, "client_id": batch[i].sub.client_id})
                    for i in this_round])
                for pid, row in zip(projects, rows[:len(locks)]):
                    configs[pid] = self._lock_project(c, pid, None, row)[0]
                plans = self._plan_round(batch, this_round, rows[len(locks):], configs, outcomes, one_by_one)
                self._write_round(c, batch, plans, configs, outcomes, counts)
                waiting = later
        except Exception as e:  # noqa: BLE001 - a database error: the batch runs again, one by one
            raise _Unclean from e
        return configs, outcomes, sorted(one_by_one)

    def _plan_round(self, batch: list[_Pending], this_round: list[int], contexts: list[Any],
                    configs: dict[int, ProjectConfig], outcomes: list[Any],
                    one_by_one: list[int]) -> list[tuple[int, _Plan, float]]:
        """A round of :meth:`_write_together`: the rules applied to each label's
        context; refusals go to ``outcomes``, what needs more than the context
        to ``one_by_one``; returns (index, plan, time judged at) to write."""
        plans = []
        for i, ctx in zip(this_round, contexts):
            item = batch[i]
            # Read per label once its context is in (the lock granted): leases are judged as they are then.
            at = time.time() if item.now is None else item.now
            try:
                plan = (None if ctx is None else
                        self._plan_label(ctx, item.labeler, item.sub, configs[item.labeler.project_id], at))
            except (InvalidLabel, NotFound, Conflict) as e:
                outcomes[i] = e  # refused: nothing to write
                continue
            if not isinstance(plan, _Plan) or plan.needs_room or (item.assign_next and plan.other_open):
                one_by_one.append(i)
            else:
                plans.append((i, plan, at))
        return plans

    def _write_round(self, c: Connection, batch: list[_Pending], plans: list[tuple[int, _Plan, float]],
                     configs: dict[int, ProjectConfig], outcomes: list[Any], counts: Counts) -> None:
        """A round of :meth:`_write_together`: write its planned labels (and
        hand out the next pairs asked for), in one round trip."""
        if not plans:
            return
        leases = [self._lease_params(batch[i].labeler, configs[batch[i].labeler.project_id], at, plan.open_seen or 0)
                  if batch[i].assign_next else None for i, plan, at in plans]
        runs = [self._pg_write(plan, lease) for (_i, plan, _at), lease in zip(plans, leases)]
        for (i, plan, _at), lease, row in zip(plans, leases, self._pipeline(c, runs)):
            label_id, pair = self._pg_written(c, row, lease)
            stored = self._stored(plan, label_id, lease is not None, pair, counts)
            outcomes[i] = stored.result, stored.view

    def _pipeline(self, c: Connection, runs: list[tuple[Executable, dict[str, Any]]],
                  every_row: bool = False) -> list[Any]:
        """PostgreSQL: run each (statement, parameters) in order, in the
        transaction of ``c``, all in one round trip; each run's first row
        (attributes named as the columns), or None (no row, or a statement
        returning none); with ``every_row``, each run's list of rows ([] for a
        statement returning none).

        psycopg's pipeline mode sends them together and PostgreSQL runs them
        one after the other, each seeing what the ones before wrote; a
        statement's error aborts the rest (and the transaction). SQLAlchemy
        has no pipeline mode, hence the driver's connection and cursors, with
        the SQL SQLAlchemy compiles for each statement (once).
        """
        from psycopg.rows import namedtuple_row  # PostgreSQL's driver: installed with it, not for SQLite

        conn = c.connection.driver_connection
        cursors = []
        with conn.pipeline():
            for stmt, params in runs:
                compiled = self._compiled.get(stmt)
                if compiled is None:
                    compiled = self._compiled[stmt] = (sql := stmt.compile(dialect=c.dialect), str(sql))
                cur = conn.cursor(row_factory=namedtuple_row)
                cur.execute(compiled[1], compiled[0].construct_params(params))
                cursors.append(cur)
        if every_row:
            rows = [[] if cur.description is None else cur.fetchall() for cur in cursors]
        else:
            rows = [None if cur.description is None else cur.fetchone() for cur in cursors]
        for cur in cursors:
            cur.close()
        return rows

    @staticmethod
    def _count_for_labelers(s: Connection, counts: Counts) -> None:
        """Move the labelers' counters (see schema.Labeler) by what a batch
        stored: one statement for the batch (an executemany: with psycopg, one
        round trip), not one per label."""
        if counts:
            s.execute(_Q.labeler_counters_up, Store._counter_params(counts))

    @staticmethod
    def _counter_params(counts: Counts) -> list[dict[str, Any]]:
        """The parameters of ``_Q.labeler_counters_up``, one set per labeler of ``counts``."""
        return [{"me": me, "done": done, "seen": seen} for me, (done, seen) in sorted(counts.items())]

    def _submit_one(self, c: Connection, item: _Pending, cfg: ProjectConfig, isolate: bool,
                    counts: Counts) -> Outcome:
        """One submission of a batch, under its project's lock; with ``isolate``
        in a savepoint, else raising :class:`_Unclean` if it fails after writing.
        What it stored is added to ``counts`` once it has succeeded."""
        for _attempt in range(3):
            # Read per submission, after the lock was granted: leases are judged as they are when it runs.
            at = time.time() if item.now is None else item.now
            # Kept apart until the submission succeeds: one undone by its savepoint counts nothing.
            own: Counts = {}
            try:
                with c.begin_nested() if isolate else contextlib.nullcontext():
                    stored = self._store_label(c, item.labeler, item.sub, cfg, at, own, item.assign_next)
                    view = stored.view
                    if item.assign_next and not stored.leased:
                        view = self._assign_next(c, item.labeler, cfg, at, own)
                for me, (done, seen) in own.items():
                    _count(counts, me, done, seen)
                return stored.result, view
            except (InvalidLabel, NotFound, Conflict) as e:
                return e  # refused before writing anything
            except IntegrityError as e:
                # PostgreSQL: a concurrent transaction (another process) won a unique
                # constraint. If it stored this client id, the retry returns it as a replay.
                if not isolate:
                    raise _Unclean from e
            except Exception as e:  # noqa: BLE001 - this submission's outcome alone (a 500)
                if not isolate:
                    raise _Unclean from e
                return e
        return Conflict(f"pair {item.sub.pair_id}: concurrent labels for the same pair; reload and retry")

    def _store_label(self, s: Connection, labeler: LabelerInfo, sub: Submission, cfg: ProjectConfig,
                     now: float, counts: Counts, lease_next: bool = False) -> _Stored:
        """Store one label under its project's lock (see :meth:`submit` for the
        rules). ``lease_next``: also hand out the labeler's next pair, with the
        label's writes, when the labeler is known to hold no other pair open
        (else the caller's :meth:`_assign_next` does). A first label on the pair
        (not a revision) and a new assignment are added to ``counts``.

        Refuses (raises InvalidLabel, NotFound, Conflict, PairFull) only before
        its first write, so a refused submission leaves nothing to undo in the
        transaction it shares with others (see :meth:`_submit_one`).
        """
        ctx = s.execute(_Q.label_context, {"pair": sub.pair_id, "me": labeler.id, "client_id": sub.client_id}).first()
        if ctx is None:  # no such pair; but a retry's check comes first, whatever the pair
            row = s.execute(_Q.by_client_id, {"me": labeler.id, "client_id": sub.client_id}).first()
            if row is None:
                raise NotFound(f"pair {sub.pair_id} not found")
            return _Stored(self._replayed(_Seen(*row), sub))
        plan = self._plan_label(ctx, labeler, sub, cfg, now)
        if isinstance(plan, SubmitResult):
            return _Stored(plan)
        if plan.needs_room:
            self._check_room(s, labeler, sub.pair_id, cfg, now)
        # This pair's assignment closes with the label; ctx counted the labeler's other open ones.
        lease = (self._lease_params(labeler, cfg, now, plan.open_seen or 0)
                 if lease_next and not plan.other_open else None)
        label_id, pair = self._write_label(s, plan, lease)
        return self._stored(plan, label_id, lease is not None, pair, counts)

    @staticmethod
    def _replayed(seen: Row | _Seen, sub: Submission) -> SubmitResult:
        """The label already stored under ``sub.client_id`` (``seen``): returned
        again when ``sub`` is the same label (a retry), else a Conflict."""
        stored = (seen.seen_pair_id, seen.seen_choice, seen.seen_reason, seen.seen_supersedes_id,
                  seen.seen_strength, bool(seen.seen_both_bad),
                  None if seen.seen_ranking is None else tuple(json.loads(seen.seen_ranking)))
        ranking = None if sub.ranking is None else tuple(sub.ranking)
        if stored != (sub.pair_id, sub.choice, sub.reason, sub.supersedes, sub.strength, sub.both_bad, ranking):
            raise Conflict(f"client_id {sub.client_id} was already used for a different label")
        return SubmitResult(seen.seen_id, seen.seen_revision, True)

    @staticmethod
    def _plan_label(ctx: Row, labeler: LabelerInfo, sub: Submission, cfg: ProjectConfig,
                    now: float) -> _Plan | SubmitResult:
        """The rules of :meth:`submit`, judged from the label's context (a row of
        ``_Q.label_context`` read under the project lock): what to write, or
        for a retry the label stored before. A refusal raises."""
        if ctx.seen_id is not None:
            # Checked first: a retry of a stored label is answered even if the pair has filled since.
            return Store._replayed(ctx, sub)
        if ctx.project_id != labeler.project_id:
            raise NotFound(f"pair {sub.pair_id} not found")
        _check_fits(sub, None if ctx.responses is None else len(json.loads(ctx.responses)))
        if ctx.asg_status is None:
            raise Conflict(f"pair {sub.pair_id} was not assigned to you (GET /api/next first)")
        if ctx.cur_id is None and sub.supersedes is not None:
            raise Conflict(f"supersedes {sub.supersedes}: you have no label on pair {sub.pair_id} to revise")
        if ctx.cur_id is not None and sub.supersedes != ctx.cur_id:
            raise Conflict(f"pair {sub.pair_id} already has your label {ctx.cur_id}; to change it, "
                           f"send supersedes={ctx.cur_id}")
        delta = int(sub.choice != "skip") - int(ctx.cur_id is not None and ctx.cur_choice != "skip")
        leased = ctx.asg_status == "open" and ctx.asg_expires > now  # a live lease holds one of the pair's slots
        return _Plan(
            params={"project_id": labeler.project_id, "pair_id": sub.pair_id, "labeler_id": labeler.id,
                    "client_id": sub.client_id, "choice": sub.choice, "reason": sub.reason,
                    "strength": sub.strength, "both_bad": sub.both_bad,
                    "ranking": None if sub.ranking is None else json.dumps(list(sub.ranking)),
                    "duration_ms": sub.duration_ms, "revision": 0 if ctx.cur_id is None else ctx.cur_revision + 1,
                    "supersedes_id": sub.supersedes, "created_at": now},
            delta=delta,
            # labeled_count was read under the project lock: nothing changed it since.
            complete=int(ctx.labeled_count + delta >= cfg.overlap) - int(ctx.labeled_count >= cfg.overlap),
            status="skipped" if sub.choice == "skip" else "labeled",
            needs_room=delta > 0 and not leased, first=ctx.asg_status not in ("labeled", "skipped"),
            other_open=ctx.other_open, open_seen=ctx.open_seen, overlap=cfg.overlap)

    def _stored(self, plan: _Plan, label_id: int, leased: bool, pair: Row | None, counts: Counts) -> _Stored:
        """A written label's outcome; what it changed of its labeler's counters is added to ``counts``."""
        me = plan.params["labeler_id"]
        if plan.first:
            _count(counts, me, done=1)
        if pair is not None:
            _count(counts, me, seen=1)  # a pair is handed out only while it has room: open
        return _Stored(SubmitResult(label_id, plan.params["revision"], False), leased,
                       None if pair is None else self._view(pair))

    def _write_label(self, s: Connection, plan: _Plan, lease: dict[str, Any] | None) -> tuple[int, Row | None]:
        """Write a planned label (the label row, the pair's count, the
        project's and labelers' counters when the pair fills or opens again,
        the labeler's assignment); returns its id, and with ``lease``
        (:meth:`_lease_params`) the next pair leased to the labeler (None:
        none left).

        PostgreSQL: one statement (``_Q.write_label[_lease_next]``) instead of
        up to seven. The label writer (one thread; see :meth:`submit`) was busy
        all the time under load, most of it waiting on round trips to the
        server, so these set PostgreSQL's throughput. SQLite runs in this
        process (no round trips to save) and has no data-modifying WITH: one
        by one.
        """
        if not self.is_sqlite:
            return self._pg_written(s, s.execute(*self._pg_write(plan, lease)).one(), lease)
        label, pair = plan.params, plan.params["pair_id"]
        label_id = s.execute(_Q.add_label, label).scalar_one()
        if plan.delta:
            # A SQL-side increment: never a write-back of a count read earlier.
            s.execute(_Q.count_up, {"pair": pair, "delta": plan.delta})
        if plan.complete:
            s.execute(_Q.counters_up, {"project": label["project_id"], "pairs": 0, "complete": plan.complete})
            s.execute(_Q.seen_pair_filled, {"pair": pair, "complete": plan.complete})
        s.execute(_Q.set_status, {"pair": pair, "me": label["labeler_id"], "new_status": plan.status})
        return label_id, None if lease is None else self._lease_next(s, lease)

    @staticmethod
    def _pg_write(plan: _Plan, lease: dict[str, Any] | None) -> tuple[Executable, dict[str, Any]]:
        """PostgreSQL: the statement writing ``plan``, and its parameters. With
        ``lease``, the labeler's next pair is leased in the same statement,
        unless they are far ahead (``fresh_first``: see :meth:`_lease_next`)
        or that is not known yet; then :meth:`_pg_written` leases it after."""
        if Store._leases_with_label(lease):
            return _Q.write_label_lease_next, {**Store._pg_write_params(plan), **lease}
        return _Q.write_label, Store._pg_write_params(plan)

    @staticmethod
    def _leases_with_label(lease: dict[str, Any] | None) -> bool:
        return lease is not None and lease["fresh_first"] is False

    def _pg_written(self, s: Connection, row: Row, lease: dict[str, Any] | None) -> tuple[int, Row | None]:
        """PostgreSQL: from the row of :meth:`_pg_write`'s statement, the
        label's id and the pair leased to the labeler (None: none asked for,
        or none left), leasing it now if the statement did not."""
        if self._leases_with_label(lease):
            return row.label_id, None if row.id is None else row
        return row[0], None if lease is None else self._lease_next(s, lease)

    @staticmethod
    def _pg_write_params(plan: _Plan) -> dict[str, Any]:
        """The parameters of ``_Q.write_label`` for ``plan``."""
        label = plan.params
        return {**{f"new_{k}": v for k, v in label.items()}, "pair": label["pair_id"], "me": label["labeler_id"],
                "project": label["project_id"], "delta": plan.delta, "overlap": plan.overlap,
                "new_status": plan.status}

    @staticmethod
    def _check_room(s: Connection, labeler: LabelerInfo, pair_id: int, cfg: ProjectConfig, now: float) -> None:
        """A label that would take a slot without a live lease on it (the lease
        expired or was released; or a skip revised into a vote) needs a free
        slot: the pair's non-skip labels plus other labelers' live leases must
        be under ``overlap``. Runs under :meth:`_lock_project`, so nothing can
        take the slot between this check and the insert."""
        taken = s.scalar(_Q.taken, {"pair": pair_id, "me": labeler.id, "now": now})
        if taken >= cfg.overlap:
            raise PairFull(f"pair {pair_id}: your hold on it lapsed and its {cfg.overlap} label slot"
                           f"{'s' if cfg.overlap > 1 else ''} went to other labelers, so this label was not "
                           "stored; go on to your next pair (GET /api/next)")

    @_reconnecting
    def history(self, labeler: LabelerInfo, limit: int = 20) -> list[LabelRow]:
        """This labeler's current labels, newest first."""
        rows = [r for r in self.current_labels(labeler.project_id, labeler_id=labeler.id)]
        rows.sort(key=lambda r: r.created_at, reverse=True)
        return rows[:limit]

    def _label_rows(self, stmt) -> list[LabelRow]:
        with self.reading() as s:
            return [_label_row(lab, name) for lab, name in s.execute(stmt.join(Labeler, Labeler.id == Label.labeler_id)
                                                                     .add_columns(Labeler.name).order_by(Label.id))]

    def current_labels(self, project_id: int, labeler_id: int | None = None) -> list[LabelRow]:
        """Each labeler's latest revision per pair (what counts), oldest first."""
        newer = aliased(Label)
        stmt = select(Label).where(
            Label.project_id == project_id,
            ~select(newer.id).where(newer.pair_id == Label.pair_id, newer.labeler_id == Label.labeler_id,
                                    newer.revision > Label.revision).exists())
        if labeler_id is not None:
            stmt = stmt.where(Label.labeler_id == labeler_id)
        return self._label_rows(stmt)

    def all_labels(self, project_id: int) -> list[LabelRow]:
        """Every label row ever stored, superseded ones included (the history)."""
        return self._label_rows(select(Label).where(Label.project_id == project_id))

    # ------------------------------------------------------------ progress

    @_reconnecting
    def progress(self, labeler: LabelerInfo, now: float | None = None) -> dict[str, int]:
        """``done``: pairs this labeler finished (skips included).

        ``remaining``: pairs they can be given right now, by the same rules as
        :meth:`next_pair`: the pair they hold (if it is still theirs) plus pairs
        never shown to them with a free slot. So 0 exactly when ``next_pair``
        has nothing for them. Pairs held by other labelers are not counted;
        they come back if those leases lapse, and others may fill the counted
        ones first.
        """
        now = time.time() if now is None else now
        with self._read_conn() as s:
            project = s.execute(_Q.project_row, {"project": labeler.project_id}).one()
            params = self._progress_params(labeler, project_config(project.config).overlap, now)
            return self._progress(s, params, project, s.execute(_Q.progress_counts, params).one())

    @staticmethod
    def _progress_params(labeler: LabelerInfo, overlap: int, now: float) -> dict[str, Any]:
        """The parameters of ``_Q.progress_counts`` (and of :meth:`_progress`'s other reads)."""
        return {"me": labeler.id, "project": labeler.project_id, "overlap": overlap, "now": now}

    @staticmethod
    def _progress(s: Connection, params: dict[str, Any], project: Row, row: Row) -> dict[str, int]:
        """:meth:`progress` from the project's row (``_Q.project_row``) and the
        labeler's (``_Q.progress_counts``, run with ``params``); what those
        leave unknown is read on ``s``."""
        total, complete = project.pair_count, project.complete_count
        counted = total is None  # counters not known yet (see schema.Project): count
        if counted:
            total, complete = s.execute(_Q.pair_counts, params).one()
        complete = complete or 0
        done, mine_open = row.done, row.mine_open
        if counted or done is None:  # this labeler's counters not known yet (see schema.Labeler): count
            done, mine_open = s.execute(_Q.mine, params).one()
        remaining = max(0, total - complete - mine_open - row.blocked)
        if row.own_id is not None and (row.own_expires > params["now"]
                                       or s.scalar(_Q.taken, {**params, "pair": row.own_id}) < params["overlap"]):
            remaining += 1
        return {"done": done, "remaining": remaining, "project_pairs": total, "project_complete": complete}
