"""shard on real StackExchange pairs: leak-free, deterministic, loadable with datasets."""
from __future__ import annotations

import logging
from pathlib import Path

import polars as pl
import pytest

from tasks import PIPELINE as pipeline
from worldpm.errors import StageError
from tasks import shard
from worldpm.data.splits import data_files
from worldpm.config import load_config
from worldpm.data.schema import CANONICAL_SCHEMA, COLUMNS
from worldpm.store import ArtifactStore

LOG = logging.getLogger("test")


def canonical_from_se_paired(se_paired: Path) -> pl.DataFrame:
    raw = pl.read_parquet(sorted(se_paired.rglob("*.parquet")))
    return raw.select(
        pl.col("qid").cast(pl.String).alias("pair_id"),
        pl.lit("se").alias("source"),
        pl.lit(None, pl.String).alias("domain"),
        pl.col("qid").cast(pl.String).alias("group_id"),
        pl.concat_list(pl.struct(pl.lit("user").alias("role"), pl.col("question").alias("content"))).alias("prompt"),
        pl.col("response_j").alias("chosen"),
        pl.col("response_k").alias("rejected"),
        pl.lit(None, pl.Float64).alias("chosen_score"),
        pl.lit(None, pl.Float64).alias("rejected_score"),
        pl.lit(None, pl.Float64).alias("margin"),
        pl.col("date").cast(pl.String),
    ).with_columns((pl.col("pair_id") + "-" + pl.int_range(pl.len()).cast(pl.String)).alias("pair_id")
                   ).cast(CANONICAL_SCHEMA).select(COLUMNS)


def commit_clean(store: ArtifactStore, frame: pl.DataFrame, key: str = "fixture"):
    tmp = store.new_tmp("clean", key)
    frame.write_parquet(tmp / "pairs.parquet")
    return store.commit("clean", key, tmp, {"rows_out": frame.height})


@pytest.fixture(scope="module")
def pairs(se_paired) -> pl.DataFrame:
    return canonical_from_se_paired(se_paired)


def test_splits_are_leak_free_deterministic_and_loadable(tmp_path, pairs):
    cfg = load_config(None, ["shard.rows_per_file=300", "shard.train=0.6", "shard.eval=0.2", "shard.test=0.2"])
    outs = []
    for run in ("a", "b"):
        store = ArtifactStore(tmp_path / run)
        clean = commit_clean(store, pairs)
        res = pipeline.execute("shard", cfg, {"clean": clean}, store, log=LOG)
        assert res.status == "ran"
        outs.append(res)
    a, b = outs
    assert a.key == b.key and a.ref.digest == b.ref.digest  # same input, same split, same bytes

    files = data_files(a.ref)
    frames = {s: pl.read_parquet(fs) for s, fs in files.items()}
    assert sum(f.height for f in frames.values()) == pairs.height
    groups = {s: set(f["group_id"]) for s, f in frames.items()}
    assert not groups["train"] & groups["eval"] and not groups["train"] & groups["test"]
    assert not groups["eval"] & groups["test"]
    # fractions are over questions, roughly
    n = sum(len(g) for g in groups.values())
    assert 0.45 < len(groups["train"]) / n < 0.75
    # rows per file honoured; manifest lists files, rows and bytes
    m = a.manifest
    for s, info in m["splits"].items():
        assert info["rows"] == frames[s].height if s in frames else info["rows"] == 0
        assert all(pl.read_parquet(Path(a.path) / f).height <= 300 for f in info["files"])
        assert info["bytes"] == sum((Path(a.path) / f).stat().st_size for f in info["files"])
    assert m["rows_in"] == m["rows_out"] == pairs.height

    import datasets

    ds = datasets.load_dataset("parquet", data_files=files, cache_dir=str(tmp_path / "hf"))
    assert {s: len(ds[s]) for s in ds} == {s: f.height for s, f in frames.items()}
    assert ds["train"][0]["chosen"] == frames["train"]["chosen"][0]


def test_assignment_depends_only_on_group_and_salt(pairs):
    ids = pairs["group_id"]
    full = shard.assign_splits(ids, {"train": 0.8, "eval": 0.1, "test": 0.1}, "s")
    part = shard.assign_splits(ids.head(200).reverse(), {"train": 0.8, "eval": 0.1, "test": 0.1}, "s")
    joined = part.join(full, on="group_id", suffix="_full")
    assert joined.height == part.height and (joined["split"] == joined["split_full"]).all()
    other = shard.assign_splits(ids, {"train": 0.8, "eval": 0.1, "test": 0.1}, "another salt")
    assert not (other["split"] == full["split"]).all()


def test_rows_without_group_id_stop_the_stage(tmp_path, pairs):
    store = ArtifactStore(tmp_path)
    bad = pairs.head(10).with_columns(pl.lit(None, pl.String).alias("group_id"))
    clean = commit_clean(store, bad)
    with pytest.raises(StageError, match="without group_id"):
        pipeline.execute("shard", load_config(None), {"clean": clean}, store, log=LOG)
    assert not list((tmp_path / "shard").glob("*/manifest.json"))


def test_an_empty_split_stops_shard_naming_the_rule(tmp_path, pairs):
    """issue 12 case 9: all pairs in one split used to exit 0 with an evaluation of 0 test pairs."""
    store = ArtifactStore(tmp_path)
    one_question = pairs.filter(pl.col("group_id") == pairs["group_id"][0])  # one group: one split holds all
    clean = commit_clean(store, one_question, key="one")
    cfg = load_config(None)
    [where] = shard.assign_splits(one_question["group_id"], {"train": 0.8, "eval": 0.1, "test": 0.1},
                                  cfg.shard.salt)["split"]
    empty = next(s for s in ("train", "test") if s != where)
    with pytest.raises(StageError, match=rf"shard: the {empty} split is empty \(shard.{empty}=0.\d\): the "
                                         rf"{one_question.height} pairs come from 1 question group") as e:
        pipeline.execute("shard", cfg, {"clean": clean}, store, log=LOG)
    assert "shard.salt" in str(e.value) and "\n" not in str(e.value)
    assert not list((tmp_path / "shard").glob("*/manifest.json"))
    # a split given no fraction may be empty; train may not
    others = [s for s in ("train", "eval", "test") if s != where]
    ok = load_config(None, [f"shard.{where}=1.0"] + [f"shard.{s}=0" for s in others])
    if where == "train":
        assert pipeline.execute("shard", ok, {"clean": clean}, store, log=LOG).status == "ran"
    else:
        with pytest.raises(StageError, match="shard.train is 0"):
            pipeline.execute("shard", ok, {"clean": clean}, store, log=LOG)


def test_a_small_split_is_a_warning_with_its_interval(tmp_path, pairs, caplog):
    """The preset once had a test split of 2 pairs and an eval split of 5, silently: now a split asked for but
    under shard.min_split_pairs is a warning (log and manifest) that says how wide its accuracy's interval is."""
    store = ArtifactStore(tmp_path / "store")
    clean = commit_clean(store, pairs.head(300))
    cfg = load_config(None, ["shard.train=0.96", "shard.eval=0.02", "shard.test=0.02", "shard.min_split_pairs=50"])
    with caplog.at_level(logging.WARNING, logger="test"):
        res = pipeline.execute("shard", cfg, {"clean": clean}, store, log=LOG)
    splits = res.manifest["splits"]
    small = [s for s in ("eval", "test") if splits[s]["rows"] < 50]
    assert small == ["eval", "test"] and splits["train"]["rows"] >= 50
    assert len(res.manifest["warnings"]) == 2
    for split, w in zip(small, res.manifest["warnings"]):
        n = splits[split]["rows"]
        assert w.startswith(f"the {split} split has {n} pairs") and "shard.min_split_pairs 50" in w
        assert "95% interval of +-" in w and f"raise shard.{split}" in w
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        f"shard: {w}" for w in res.manifest["warnings"]]
    # the threshold is configurable: 0 turns it off; a split not asked for (fraction 0) never warns
    quiet = pipeline.execute("shard", load_config(None, ["shard.train=0.96", "shard.eval=0.02", "shard.test=0.02",
                                                         "shard.min_split_pairs=0"]), {"clean": clean}, store, log=LOG)
    assert "warnings" not in quiet.manifest
    none_asked = pipeline.execute("shard", load_config(None, ["shard.train=0.9", "shard.eval=0.0", "shard.test=0.1",
                                                              "shard.min_split_pairs=1"]),
                                  {"clean": clean}, store, log=LOG)
    assert "warnings" not in none_asked.manifest and none_asked.manifest["splits"]["eval"]["rows"] == 0
