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
    # Only the group ids are collected (a small column); the pairs themselves stream through.
    gids = lf.select(pl.col("group_id")).collect(engine="streaming").to_series()
    if gids.null_count():
        raise StageError(f"shard: {gids.null_count()} rows without group_id in {src}")
    sc = scfg.shard
    fractions = {s: getattr(sc, s) for s in SPLITS}
    assignment = assign_splits(gids, fractions, sc.salt)
    rows_per_file = sc.rows_per_file

    # Each split is written in order of the cleaned table, rows_per_file rows a file, from a streamed scan.
    splits: dict[str, dict] = {}
    total = 0
    joined = lf.join(assignment.lazy(), on="group_id", how="left", maintain_order="left")
    for split in SPLITS:
        d = out / split
        d.mkdir(parents=True)
        files, rows = [], 0
        part = joined.filter(pl.col("split") == split)
        # sink_parquet(PartitionBy) is marked unstable in polars: cut the stream into files of rows_per_file
        # ourselves, from record batches, so a split is never whole in memory.
        pending: list[pl.DataFrame] = []
        pending_rows = 0

        def write(frame: pl.DataFrame) -> None:
            nonlocal rows
            name = f"{split}/part-{len(files):05d}.parquet"
            frame.write_parquet(out / name, compression="zstd", statistics=True)
            files.append(name)
            rows += frame.height

        for batch in part.collect_batches(chunk_size=rows_per_file, engine="streaming"):
            pending.append(batch)
            pending_rows += batch.height
            if pending_rows >= rows_per_file:
                frame = pl.concat(pending)
                while frame.height >= rows_per_file:
                    write(frame.head(rows_per_file))
                    frame = frame.slice(rows_per_file)
                pending, pending_rows = [frame], frame.height
        if pending_rows:
            write(pl.concat(pending))
        groups = assignment.filter(pl.col("split") == split).height
        splits[split] = {"files": files, "rows": rows, "groups": groups,
                         "bytes": sum((out / f).stat().st_size for f in files)}
        total += rows
        log.info("shard: %s: %d pairs from %d groups in %d files", split, rows, groups, len(files))
    rows_in = lf.select(pl.len()).collect().item()
    if total != rows_in:
        raise StageError(f"shard: wrote {total} rows of {rows_in}: rows were lost")
    check_no_empty_split(splits, fractions, rows_in, assignment.height, sc.salt, log)
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
