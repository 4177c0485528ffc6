"""Readers of what the data stages write: a download artifact's pair files, shard's split files, a tokenized (or
reference log-prob) split, and token-id columns as flat numpy arrays. Stages read their inputs through these, never
through another stage's module."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl

from worldpm.store import ArtifactRef

SPLITS = ("train", "eval", "test")


def _root(ref: ArtifactRef | str | Path) -> Path:
    return Path(ref.path if isinstance(ref, ArtifactRef) else ref)


def pair_files(ref: ArtifactRef | str | Path) -> list[Path]:
    """The canonical pair files of a download or normalise artifact (pairs/*.parquet), sorted."""
    return sorted((_root(ref) / "pairs").glob("*.parquet"))


def data_files(ref: ArtifactRef | str | Path) -> dict[str, list[str]]:
    """{split: [absolute parquet paths]} of a shard artifact, for `datasets.load_dataset("parquet", data_files=...)`."""
    root = _root(ref)
    splits = json.loads((root / "splits.json").read_text())
    return {s: [str(root / f) for f in info["files"]] for s, info in splits.items() if info["files"]}


def read_split(ref: ArtifactRef | str | Path, split: str, columns: list[str] | None = None) -> pl.DataFrame:
    """One split of a tokenize or ref_logps artifact (<split>.parquet) as a DataFrame."""
    return pl.read_parquet(_root(ref) / f"{split}.parquet", columns=columns)


def flat_ids(col: pl.Series) -> tuple[np.ndarray, np.ndarray]:
    """A List[Int32] column as (offsets int64 [n+1], values int32): Arrow's own layout, no Python list per token."""
    arr = col.cast(pl.List(pl.Int32)).rechunk().to_arrow()
    if hasattr(arr, "combine_chunks"):
        arr = arr.combine_chunks()
    offsets = np.asarray(arr.offsets, dtype=np.int64)
    values = np.asarray(arr.values, dtype=np.int32)
    # a sliced Arrow array keeps its parent's values: rebase so offsets index `values` from 0
    return offsets - offsets[0], values[offsets[0]:offsets[-1]]


def token_arrays(col: pl.Series) -> list[np.ndarray]:
    """A List[Int32] column as one numpy view per row into a single flat array."""
    off, flat = flat_ids(col)
    return [flat[off[i]:off[i + 1]] for i in range(len(off) - 1)]
