"""The canonical pair table every source adapter produces (DESIGN.md)."""
from __future__ import annotations

import polars as pl

MESSAGE = pl.Struct({"role": pl.String, "content": pl.String})

CANONICAL_SCHEMA: dict[str, pl.DataType] = {
    "pair_id": pl.String,        # stable hash of (source, prompt, chosen, rejected)
    "source": pl.String,         # the source tag from pipeline.yaml
    "domain": pl.String,         # e.g. the StackExchange site; nullable
    "group_id": pl.String,       # what splits are keyed on: qid, or the normalised prompt
    "prompt": pl.List(MESSAGE),  # the conversation before the response
    "chosen": pl.String,
    "rejected": pl.String,
    "chosen_score": pl.Float64,  # votes, pm_score, rating ... nullable
    "rejected_score": pl.Float64,
    "margin": pl.Float64,        # nullable: chosen is better by this much
    "date": pl.String,           # ISO date where known
}
COLUMNS = list(CANONICAL_SCHEMA)

