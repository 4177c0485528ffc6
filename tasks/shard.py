"""shard: split the cleaned pairs into train/eval/test by a hash of group_id, as zstd Parquet shards.

The split of a pair is a function of (salt, group_id) alone: xxhash64 of the group id, mapped to [0, 1). Two
answers to one question share a group_id and so a split; the same input gives the same split on every run and
machine. (`pl.Expr.hash` is not stable across polars versions, so it is never used for this.)
"""
from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import xxhash

from worldpm.config import PipelineConfig, ShardConfig, StageConfig
from worldpm.data.splits import SPLITS
from worldpm.data.stream import RollingParquetWriter, read_batches
from worldpm.engine import StageSpec
from worldpm.errors import ConfigError, StageError
from worldpm.store import ArtifactRef

INPUT_FILES = {"clean": ("pairs.parquet",)}  # not report.json: its rule settings change with every threshold
_SCALE = float(2**64)


class ShardStageConfig(StageConfig):
    shard: ShardConfig


def stage_config(cfg: PipelineConfig) -> ShardStageConfig:
    return ShardStageConfig(shard=cfg.shard)


def split_fraction(group_ids: pl.Series, salt: str) -> pl.Series:
    """A stable number in [0, 1) per group id: xxhash64(salt + NUL + group_id) / 2**64.

    A batch function over the column (map_batches), not a per-row map_elements: there is no stable hash
    expression in polars. It hashes each distinct group id once: the caller passes unique ids.
    """
    h = xxhash.xxh64_intdigest
    prefix = salt.encode() + b"\0"
    values = [h(prefix + g.encode()) / _SCALE for g in group_ids.to_list()]
    return pl.Series(group_ids.name, values, dtype=pl.Float64)


def assign_splits(group_ids: pl.Series, fractions: dict[str, float], salt: str) -> pl.DataFrame:
    """group_id -> split for the distinct ids, by cumulative fraction thresholds."""
    uniq = group_ids.unique(maintain_order=True).drop_nulls()
    u = split_fraction(uniq, salt)
    t_train = fractions["train"]
    t_eval = t_train + fractions["eval"]
    split = (
        pl.when(pl.col("u") < t_train).then(pl.lit("train"))
        .when(pl.col("u") < t_eval).then(pl.lit("eval"))
        .otherwise(pl.lit("test"))
    )
    return pl.DataFrame({"group_id": uniq, "u": u}).select("group_id", split.alias("split"))


def check_no_empty_split(splits: dict[str, dict], fractions: dict[str, float], rows: int, groups: int,
                         salt: str, log) -> None:
    """train and test must hold pairs (test when its fraction is above 0): an empty one stops the stage here, naming
    the rule that emptied it, instead of a trainer failing on 0 pairs or an evaluation of 0 test pairs. An empty
    eval split (only the end-of-training eval metrics read it) is a warning."""
    for split in SPLITS:
        if splits[split]["rows"] or (fractions[split] == 0 and split != "train"):
            continue
        if fractions[split] == 0:
            raise StageError("shard: shard.train is 0: no pair goes to the train split; give it a fraction")
        msg = (f"shard: the {split} split is empty (shard.{split}={fractions[split]:g}): the {rows} pairs come from "
               f"{groups} question group(s) (group_id), and the split by a hash of (shard.salt={salt!r}, group_id) "
               f"put none of them in {split}; add data with more questions, change shard.salt, or set "
               f"shard.{split}=0 if you want no {split} split")
        if split == "eval":
            log.warning("%s", msg)
        else:
            raise StageError(msg)


def preflight(cfg: PipelineConfig) -> None:
    """Before a run starts: a train split with pairs in it is what every later stage is for (the engine's preflight)."""
    if cfg.shard.train == 0:
        raise ConfigError("shard.train is 0: no pair would go to the train split; give it a fraction (shard.train + "
                          "shard.eval + shard.test = 1)")


def run(scfg: ShardStageConfig, inputs: dict[str, ArtifactRef], out: Path, log, work: Path) -> dict:
    src = Path(inputs["clean"].path) / "pairs.parquet"
    if not src.exists():
        raise StageError(f"shard: the clean artifact has no pairs.parquet ({src})")
    lf = pl.scan_parquet(src)
    # Only the distinct group ids are collected (for the groups per split); the pairs themselves stream through.
    gids = lf.select(pl.col("group_id").unique()).collect(engine="streaming").to_series()
    if gids.null_count():
        n_null = lf.select(pl.col("group_id").null_count()).collect().item()
        raise StageError(f"shard: {n_null} rows without group_id in {src}")
    sc = scfg.shard
    fractions = {s: getattr(sc, s) for s in SPLITS}
    groups = assign_splits(gids, fractions, sc.salt).group_by("split").len()
    groups_of = dict(groups.iter_rows())
    del gids

    # One pass over the cleaned table, a batch of whole row groups at a time (worldpm/data/stream.py): each pair's
    # split is a function of its group id alone, so it is computed per batch (the batch's distinct ids hashed);
    # each split is written in the cleaned table's order, rows_per_file rows a file, as the batches come.
    # (sink_parquet(PartitionBy) is marked unstable in polars, and a streaming join with the assignment held
    # 1.1-1.4 GB at 1M pairs: bench/README.md.)
    writers = {split: RollingParquetWriter(out, split, sc.rows_per_file) for split in SPLITS}
    rows_in = 0
    try:
        for batch in read_batches([src]):
            rows_in += batch.height
            assignment = assign_splits(batch["group_id"], fractions, sc.salt)
            batch = batch.join(assignment, on="group_id", how="left", maintain_order="left")
            for split, part in batch.partition_by("split", as_dict=True, maintain_order=True).items():
                writers[split[0]].write(part.drop("split"))
    finally:
        for w in writers.values():
            w.close()
    splits: dict[str, dict] = {}
    total = 0
    for split in SPLITS:
        w = writers[split]
        (out / split).mkdir(exist_ok=True)
        splits[split] = {"files": w.files, "rows": w.rows, "groups": groups_of.get(split, 0),
                         "bytes": sum((out / f).stat().st_size for f in w.files)}
        total += w.rows
        log.info("shard: %s: %d pairs from %d groups in %d files", split, w.rows, splits[split]["groups"],
                 len(w.files))
    if total != rows_in or rows_in != lf.select(pl.len()).collect().item():
        raise StageError(f"shard: wrote {total} rows of {rows_in}: rows were lost")
    check_no_empty_split(splits, fractions, rows_in, sum(groups_of.values()), sc.salt, log)
    (out / "splits.json").write_text(json.dumps(splits, indent=2))
    warnings = small_split_warnings(splits, fractions, sc.min_split_pairs)
    for w in warnings:
        log.warning("shard: %s", w)
    return {"rows_in": rows_in, "rows_out": total, "rows_rejected": 0, "splits": splits,
            **({"warnings": warnings} if warnings else {})}


def small_split_warnings(splits: dict[str, dict], fractions: dict[str, float], min_pairs: int) -> list[str]:
    """One line per split that was asked for (fraction > 0) but holds fewer than min_pairs pairs, with the width
    of the 95% interval an accuracy of 0.5 would have on it: a number on 2 pairs is no measurement."""
    from worldpm.modeling.metrics import wilson_interval

    out = []
    for split, info in splits.items():
        n = int(info["rows"])
        if min_pairs and fractions.get(split, 0) > 0 and n < min_pairs:
            ci = wilson_interval(n / 2, n)
            width = f"+-{(ci[1] - ci[0]) / 2:.2f}" if ci else "undefined"
            out.append(f"the {split} split has {n} pairs ({info['groups']} questions), under shard.min_split_pairs "
                       f"{min_pairs}: an accuracy on it has a 95% interval of {width}; raise shard.{split} or add data")
    return out


STAGE = StageSpec(config=stage_config, run=run, input_files=INPUT_FILES, preflight=preflight)
