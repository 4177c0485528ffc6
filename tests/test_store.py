"""The artifact store: keys, atomic commit, crash leftovers, locks, gc."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import re
import time
from pathlib import Path

import pytest

from worldpm.store import ArtifactStore, dir_digest, stage_key


def _commit(store: ArtifactStore, stage: str, key: str, text: str):
    tmp = store.new_tmp(stage, key)
    (tmp / "data.txt").write_text(text)
    return store.commit(stage, key, tmp, {"rows_in": 1})


def test_key_depends_on_config_code_and_upstream_content():
    base = stage_key("clean", "c1", {"a": 1, "b": [1, 2]}, {"download": "d1"})
    assert base == stage_key("clean", "c1", {"b": [1, 2], "a": 1}, {"download": "d1"})  # canonical order
    assert base != stage_key("clean", "c2", {"a": 1, "b": [1, 2]}, {"download": "d1"})
    assert base != stage_key("clean", "c1", {"a": 2, "b": [1, 2]}, {"download": "d1"})
    assert base != stage_key("clean", "c1", {"a": 1, "b": [1, 2]}, {"download": "d2"})
    assert base != stage_key("shard", "c1", {"a": 1, "b": [1, 2]}, {"download": "d1"})


def test_commit_writes_manifest_and_digest_is_content_only(tmp_path):
    a, b = ArtifactStore(tmp_path / "a"), ArtifactStore(tmp_path / "b")
    ra = _commit(a, "clean", "k1", "same bytes")
    rb = _commit(b, "clean", "other-key", "same bytes")
    assert ra.digest == rb.digest  # same content, same digest: what gives early cutoff downstream
    m = json.loads((Path(ra.path) / "manifest.json").read_text())
    for field in ("stage", "key", "digest", "bytes", "files", "libraries", "finished_at", "rows_in"):
        assert field in m
    assert m["files"][0]["path"] == "data.txt"
    assert a.get("clean", "k1") == ra
    assert _commit(a, "clean", "k2", "other bytes").digest != ra.digest


def test_unfinished_folders_are_never_taken_for_artifacts(tmp_path):
    store = ArtifactStore(tmp_path)
    tmp = store.new_tmp("clean", "k")  # a crash before commit leaves a tmp folder
    (tmp / "half.parquet").write_text("x")
    assert store.get("clean", "k") is None
    (tmp_path / "clean" / "k").mkdir()  # even a folder at the final name without a manifest is not finished
    assert store.get("clean", "k") is None
    assert store.clear_stale_tmp("clean", "k") == [tmp]
    assert not tmp.exists()


def _hold_lock(root: str, started, t_hold: float):
    store = ArtifactStore(root)
    with store.key_lock("clean", "k"):
        started.set()
        time.sleep(t_hold)
        (Path(root) / "holder_done").write_text(str(time.time()))


def test_key_lock_serialises_two_processes(tmp_path):
    ctx = mp.get_context("spawn")
    started = ctx.Event()
    p = ctx.Process(target=_hold_lock, args=(str(tmp_path), started, 1.0))
    p.start()
    assert started.wait(60)
    store = ArtifactStore(tmp_path)
    with store.key_lock("clean", "k"):
        acquired = time.time()
    p.join(30)
    assert float((tmp_path / "holder_done").read_text()) <= acquired


def K(n: int) -> str:
    """A key of the form stage_key gives (20 hex digits)."""
    return f"{n:020x}"


def test_gc_keeps_referenced_and_removes_the_rest(tmp_path):
    store = ArtifactStore(tmp_path)
    keep = _commit(store, "clean", K(1), "1")
    drop = _commit(store, "clean", K(2), "2")
    stale = store.new_tmp("clean", K(3))
    work = store.work_dir("train", K(4))
    kept_work = store.work_dir("train", K(1))
    (tmp_path / "history").mkdir()
    (tmp_path / "history" / "worldpm.jsonl").write_text("{}\n")
    keep_set = {("clean", K(1)), ("train", K(1))}
    planned = store.gc(keep_set, dry_run=True, stages=("clean", "train")).removed
    assert Path(drop.path).exists() and set(planned) == {Path(drop.path), stale, work}
    store.gc(keep_set, stages=("clean", "train"))
    assert Path(keep.path).exists() and not Path(drop.path).exists() and not stale.exists() and not work.exists()
    assert kept_work.exists() and (tmp_path / "history" / "worldpm.jsonl").exists()


def test_gc_deletes_only_folders_that_are_ours(tmp_path):
    """issue 12 case 3: `artifacts_dir: userdata` must not cost the user userdata/train/my_experiment_2024/."""
    store = ArtifactStore(tmp_path)
    ours = _commit(store, "train", K(7), "model")
    mine = tmp_path / "train" / "my_experiment_2024"
    (mine / "ckpt").mkdir(parents=True)
    (mine / "ckpt" / "weights.bin").write_bytes(b"years of work")
    hidden = tmp_path / "train" / ".my_notes"  # a dot folder that is not .tmp-/.work-/.bad-<key>
    hidden.mkdir()
    fake = tmp_path / "train" / K(8)  # named like a key, but with no manifest of ours
    fake.mkdir()
    (fake / "manifest.json").write_text('{"stage": "clean", "key": "something else"}')
    plan = store.gc(set(), stages=("train",))
    assert plan.removed == [Path(ours.path)] and not Path(ours.path).exists()
    assert set(plan.foreign) == {mine, hidden, fake}
    assert (mine / "ckpt" / "weights.bin").read_bytes() == b"years of work" and hidden.is_dir() and fake.is_dir()


def test_gc_and_verify_refuse_while_a_run_holds_the_store(tmp_path):
    """issue 12 case 1 (the lock; tests/test_pipeline_e2e.py races gc against a real run): while a run holds the
    store, gc deletes nothing and says which run; once it ended, gc works."""
    from worldpm.store import StoreBusy

    store = ArtifactStore(tmp_path)
    ref = _commit(store, "clean", K(1), "the run reads this later")
    with store.run_lock("flow run 'test' of pipeline 'x'"):
        with pytest.raises(StoreBusy, match=r"in use by a run in progress \(pid \d+ on .*flow run 'test'") as e:
            store.gc(set(), stages=("clean",))
        assert "\n" not in str(e.value) and "nothing was changed" in str(e.value)
        with pytest.raises(StoreBusy):
            with store.exclusive("artifacts verify"):
                pass
        assert Path(ref.path).exists()
    assert store.runs_in_progress() == []
    assert store.gc(set(), stages=("clean",)).removed == [Path(ref.path)]


def test_a_cache_hit_is_checked_against_its_manifest(tmp_path):
    """issue 12 case 4 (the store's part): a file shrunk, added or removed makes the artifact miss (it is set aside
    and named); the same size with other bytes is caught by the content digest check."""
    store = ArtifactStore(tmp_path)

    def fresh(n: int):
        tmp = store.new_tmp("clean", K(n))
        (tmp / "pairs.parquet").write_bytes(b"x" * 199)
        (tmp / "report.json").write_text("{}")
        return store.commit("clean", K(n), tmp, {})

    ref = fresh(1)
    assert store.find("clean", K(1)) == ref and store.verify(ref, deep=True) is None
    (Path(ref.path) / "pairs.parquet").write_bytes(b"x" * 99)
    assert store.verify(ref) == "pairs.parquet has 99 bytes, its manifest says 199"
    assert store.find("clean", K(1)) is None and store.get("clean", K(1)) is None
    [bad] = store.bad_copies("clean", K(1))
    assert "pairs.parquet has 99 bytes" in (bad / "SET_ASIDE.txt").read_text()

    ref = fresh(2)
    (Path(ref.path) / "stray.parquet").write_bytes(b"")
    assert store.verify(ref) == "stray.parquet is not in its manifest"
    ref = fresh(3)
    (Path(ref.path) / "report.json").unlink()
    assert store.verify(ref) == "report.json is missing"
    assert store.verify(ref, patterns=("pairs.parquet",)) is None  # only what a stage reads, when asked

    ref = fresh(4)
    (Path(ref.path) / "pairs.parquet").write_bytes(b"y" * 199)  # same size: only the digest sees it
    assert store.find("clean", K(4)) == ref
    assert store.verify(ref, deep=True) == "pairs.parquet: its content (sha256) differs from its manifest"
    # and gc removes what was set aside
    assert store.gc({("clean", K(n)) for n in (2, 3, 4)}, stages=("clean",)).removed == [bad]


def test_force_keeps_the_old_artifact_until_the_new_one_is_in_place(tmp_path, monkeypatch):
    """issue 12 case 12: a forced rerun swaps the new artifact in; if that fails midway, the old one is still
    there (with renameat2 one atomic swap; without it, the fallback puts the old one back)."""
    from worldpm import store as store_mod

    store = ArtifactStore(tmp_path)
    old = _commit(store, "clean", K(1), "old")
    for renameat2 in (getattr(store_mod, "_RENAMEAT2", None), None):
        monkeypatch.setattr(store_mod, "_RENAMEAT2", renameat2, raising=False)
        real_rename = os.rename

        def failing_rename(src, dst):
            if Path(dst) == Path(old.path) and ".tmp-" in Path(src).name and "-old-" not in Path(src).name:
                raise OSError("disk trouble while renaming the new artifact into place")
            return real_rename(src, dst)

        monkeypatch.setattr(os, "rename", failing_rename)
        if renameat2 is not None:  # the one-step swap itself fails
            monkeypatch.setattr(store_mod, "exchange", lambda a, b: (_ for _ in ()).throw(OSError("swap failed")),
                                raising=False)
        tmp = store.new_tmp("clean", K(1))
        (tmp / "data.txt").write_text("new")
        with pytest.raises(OSError):
            store.commit("clean", K(1), tmp, {}, replace=True)
        assert store.get("clean", K(1)) == old and (Path(old.path) / "data.txt").read_text() == "old"
        monkeypatch.undo()
    new = _commit(store, "clean", K(2), "new")  # and a forced commit that succeeds replaces it
    tmp = store.new_tmp("clean", K(1))
    (tmp / "data.txt").write_text("new")
    assert store.commit("clean", K(1), tmp, {}, replace=True).digest == new.digest
    assert (Path(old.path) / "data.txt").read_text() == "new"
    assert sorted(p.name for p in (tmp_path / "clean").iterdir() if p.is_dir() and "-old-" in p.name) == []


def test_dir_digest_sees_every_byte(tmp_path):
    (tmp_path / "a").write_bytes(b"abc")
    d1, n, files = dir_digest(tmp_path)
    (tmp_path / "a").write_bytes(b"abd")
    assert dir_digest(tmp_path)[0] != d1 and n == 3 and len(files) == 1


# ---- a damaged artifact in a real run: named, set aside, rebuilt (issue 12 case 4) --------------------------------
def _coffee_config(tmp_path: Path, se_paired: Path) -> Path:
    import yaml

    coffee = se_paired / "reward" / "coffee.stackexchange.com-00000-of-00001.parquet"
    cfg = tmp_path / "pipeline.yaml"
    cfg.write_text(yaml.safe_dump({"sources": [{"kind": "local", "path": str(coffee)}],
                                   "shard": {"rows_per_file": 1000}}))
    return cfg


def test_a_damaged_artifact_is_named_and_rebuilt(tmp_path, se_paired, caplog, capsys):
    import logging

    import polars as pl

    from tasks import PIPELINE
    from worldpm import cli
    from worldpm.config import load_config
    from worldpm.data.splits import data_files

    cfg_path = _coffee_config(tmp_path, se_paired)
    cfg = load_config(cfg_path)
    store = ArtifactStore(cfg.artifacts_dir)
    log = logging.getLogger("worldpm.test")

    def shard_rows(results) -> int:
        shard = next(r for r in results if r["stage"] == "shard")
        return pl.scan_parquet(data_files(store.get("shard", shard["key"]))["train"]).select(pl.len()).collect().item()

    first = PIPELINE.run(cfg, store, until="shard", log=log)
    clean = next(r for r in first if r["stage"] == "clean")
    pairs = Path(clean["path"]) / "pairs.parquet"
    n = pl.read_parquet(pairs).height
    train_rows = shard_rows(first)
    assert n > 100

    # 1. pairs.parquet rewritten with half its rows: the cache hit is refused by its size, named, and rebuilt
    pl.read_parquet(pairs).head(n // 2).write_parquet(pairs)
    with caplog.at_level(logging.WARNING):
        again = PIPELINE.run(cfg, store, until="shard", force=["shard"], log=log)
    st = {r["stage"]: r["status"] for r in again}
    assert st == {**{s: "skipped" for s in PIPELINE.names}, "download": "cached", "normalise": "cached",
                  "clean": "ran", "shard": "ran"}
    assert any(clean["path"] in m and "damaged" in m and "pairs.parquet has" in m for m in caplog.messages)
    assert pl.read_parquet(pairs).height == n and shard_rows(again) == train_rows
    assert next(r for r in again if r["stage"] == "clean")["key"] == clean["key"]

    # 2. the same size, other bytes: still a cache hit by size, but shard, about to read it, checks its digest
    data = bytearray(pairs.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = b"\0" * 64
    pairs.write_bytes(bytes(data))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        third = PIPELINE.run(cfg, store, until="shard", force=["shard"], log=log)
    assert {r["stage"]: r["status"] for r in third}["clean"] == "ran"
    assert any("shard: its input clean/" in m and "sha256" in m for m in caplog.messages), caplog.messages
    assert shard_rows(third) == train_rows

    # 3. `worldpm artifacts verify` checks every digest and sets the damaged one aside (the next run rebuilds it)
    pairs.write_bytes(bytes(data))
    code = cli.main(["artifacts", "verify", "--config", str(cfg_path)], pipeline=PIPELINE, run_flow=None)
    out, err = capsys.readouterr()
    assert code == 1 and f"clean/{clean['key']}  DAMAGED: pairs.parquet: its content (sha256)" in out
    assert err.strip().splitlines()[-1].startswith("worldpm: artifacts verify: 1 damaged artifact(s), first clean/")
    assert store.get("clean", clean["key"]) is None and store.bad_copies("clean", clean["key"])
    assert cli.main(["artifacts", "verify", "--config", str(cfg_path)], pipeline=PIPELINE, run_flow=None) == 0


def test_json_lines_readers_skip_blank_lines_and_name_a_bad_line(tmp_path):
    """metrics.jsonl / the run history (report.history.read_jsonl) and eval_curve.jsonl (read_eval_curve) share one
    reader (store.json_lines): a missing file is empty, blank lines are skipped, a bad line is named by file:line."""
    from worldpm.errors import StageError
    from worldpm.modeling.eval_curve import read_eval_curve
    from worldpm.report.history import read_jsonl

    assert read_jsonl(tmp_path / "missing.jsonl") == [] and read_eval_curve(tmp_path / "missing.jsonl") == []
    f = tmp_path / "m.jsonl"
    f.write_text('{"step": 1}\n\n{"step": 2}\n')
    assert read_jsonl(f) == [{"step": 1}, {"step": 2}]
    f.write_text('\n\n{"step": \n')  # (no good line first: an eval-curve record has fields of its own to check)
    for read in (read_jsonl, read_eval_curve):
        with pytest.raises(StageError, match=rf"^{re.escape(str(f))}:3: not a JSON line \("):
            read(f)
