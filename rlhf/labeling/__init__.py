"""Preference labeling: pairs -> people -> preference dataset -> reward stage.

The data flow, one module per step::

    pairs.py      prompts + one or two checkpoints (or a file of pairs)
                  -> de-duplicated pairs with randomised sides
    store.py      the durable store (SQLite WAL by default, PostgreSQL by URL):
                  projects, labelers (hashed tokens), pairs, assignments and
                  append-only labels; tables in schema.py, settings in config.py
    server.py     FastAPI app: the labeling and admin API and the static
                  single-page UI in static/
    export.py     labels -> {prompt, chosen, rejected} by majority vote
                  (JSONL, Parquet, HF datasets); also the reader behind a
                  reward stage's ``data.path: sqlite:///labels.db``, which
                  importing this package registers with ``rlhf.data``
    images.py     image pairs: PNG data URIs in and out of the store, sampled
                  from a diffusion checkpoint (``label pairs --diffusion``)
    stats.py      counts, per-labeler throughput, agreement
    agreement.py  Cohen's and Fleiss' kappa, as pure functions
    cli.py        rlhf label pairs | project | add-labeler | serve | export | stats

Test and benchmark helpers (a server subprocess, a throwaway PostgreSQL,
simulated labelers) live outside the package, in ``tests/helpers/labeling.py``.
"""

from __future__ import annotations

from rlhf.data import Record, register_reader


def _read_label_db(path: str) -> list[Record]:
    # Imported on first use: the store pulls in SQLAlchemy.
    from rlhf.labeling.export import read_db_records

    return read_db_records(path)


register_reader(("sqlite", "postgresql", "postgres"), _read_label_db)
