"""The artifact store: keys, atomic commit, crash leftovers, locks, gc."""
from __future__ import annotations

import json
import multiprocessing as mp
import time
from pathlib import Path

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


def test_gc_keeps_referenced_and_removes_the_rest(tmp_path):
    store = ArtifactStore(tmp_path)
    keep = _commit(store, "clean", "keep", "1")
    drop = _commit(store, "clean", "drop", "2")
    stale = store.new_tmp("clean", "x")
    work = store.work_dir("train", "gone")
    (tmp_path / "history").mkdir()
    (tmp_path / "history" / "worldpm.jsonl").write_text("{}\n")
    planned = store.gc({("clean", "keep")}, dry_run=True, stages=("clean", "train"))
    assert Path(drop.path).exists() and set(planned) == {Path(drop.path), stale, work}
    store.gc({("clean", "keep")}, stages=("clean", "train"))
    assert Path(keep.path).exists() and not Path(drop.path).exists() and not stale.exists() and not work.exists()
    assert (tmp_path / "history" / "worldpm.jsonl").exists()


def test_dir_digest_sees_every_byte(tmp_path):
    (tmp_path / "a").write_bytes(b"abc")
    d1, n, files = dir_digest(tmp_path)
    (tmp_path / "a").write_bytes(b"abd")
    assert dir_digest(tmp_path)[0] != d1 and n == 3 and len(files) == 1
