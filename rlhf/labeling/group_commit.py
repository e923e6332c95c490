"""Group commit: requests that arrive together share one transaction.

A label must be durable (committed, fsynced) before it is acknowledged, so
one transaction per label costs one commit per label, and on PostgreSQL one
hold of the project row lock per label, for its whole transaction: labels
queue on that lock, each waiting out the others' round trips and commits.
Here the callers hand their items to one writer thread per process and wait;
the writer takes whatever has queued meanwhile and runs it as one batch (one
transaction, one lock, one commit, see ``Store._submit_batch``), then gives
each caller its own outcome. Nothing waits on purpose for a batch to fill:
a lone request is written at once, and under load the batch is whatever
arrived while the previous one was being committed.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

# An outcome of one item: its result, or the exception that refused it.
Outcome = R | BaseException

_STOP = object()  # put on the queue by close(): the writer thread ends


class GroupCommitter(Generic[T, R]):
    """One writer thread running ``run_batch`` over the items queued meanwhile.

    ``run_batch(items)`` returns one outcome per item, in order: a result, or
    an exception for that item alone (the others still commit). If it raises,
    every item of the batch gets that exception (nothing of it was committed).
    """

    def __init__(self, run_batch: Callable[[list[T]], list[Outcome]], name: str, max_batch: int = 128):
        self._run_batch = run_batch
        self._name = name
        self._max_batch = max_batch
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def submit(self, item: T) -> R:
        """Queue ``item``, wait for the commit of its batch, return its result
        (or raise its exception)."""
        future: Future = Future()
        # Under the lock, so that close() cannot retire the queue between the check and the put.
        with self._start_lock:
            if self._thread is None:
                # Started on first use: most Store users (the CLI's commands) never submit a label.
                self._thread = threading.Thread(target=self._loop, args=(self._queue,), name=self._name,
                                                daemon=True)
                self._thread.start()
            self._queue.put((item, future))
        return future.result()

    def _take_batch(self, q: queue.SimpleQueue) -> tuple[list, bool]:
        """Block for one item, then take whatever else is queued (up to
        ``max_batch``). Returns (batch, stop after it)."""
        first = q.get()
        if first is _STOP:
            return [], True
        batch = [first]
        while len(batch) < self._max_batch:
            try:
                entry = q.get_nowait()
            except queue.Empty:
                break
            if entry is _STOP:
                return batch, True
            batch.append(entry)
        return batch, False

    def _loop(self, q: queue.SimpleQueue) -> None:
        stop = False
        while not stop:
            batch, stop = self._take_batch(q)
            if not batch:
                continue
            items = [item for item, _ in batch]
            try:
                outcomes = self._run_batch(items)
                if len(outcomes) != len(items):  # a bug in run_batch: fail loudly, never hang the callers
                    raise RuntimeError(f"group commit: {len(outcomes)} outcomes for {len(items)} items")
            except BaseException as e:  # noqa: BLE001 - handed to every caller of the batch
                outcomes = [e] * len(items)
            for (_, future), outcome in zip(batch, outcomes):
                if isinstance(outcome, BaseException):
                    future.set_exception(outcome)
                else:
                    future.set_result(outcome)

    def close(self) -> None:
        """Finish what is queued, then end the writer thread (a later
        :meth:`submit` starts a new one, on a new queue)."""
        with self._start_lock:
            thread, old = self._thread, self._queue
            self._thread, self._queue = None, queue.SimpleQueue()
            old.put(_STOP)  # after every item already queued: those are written first
        if thread is not None:
            thread.join()
