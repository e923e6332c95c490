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
                  reward stage's ``data.path: sqlite:///labels.db``
    stats.py      counts, per-labeler throughput, agreement
    agreement.py  Cohen's and Fleiss' kappa, as pure functions
    cli.py        rlhf label pairs | project | add-labeler | serve | export | stats
    testing.py    a server subprocess, a throwaway PostgreSQL and simulated
                  labelers, shared by the tests and benchmarks/
"""
