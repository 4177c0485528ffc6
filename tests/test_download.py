"""The download stage through the stage runner: demo, local files/dirs/globs, hf offline, accounting, the key."""
from __future__ import annotations

import json
import os
from pathlib import Path

import polars as pl
import pytest

from tasks import PIPELINE as pipeline
from worldpm.data.splits import pair_files
from worldpm.errors import StageError
from tasks import download
from worldpm.data import demo
from worldpm.config import load_config
from worldpm.data.sources import REJECTS_SCHEMA
from worldpm.data.schema import CANONICAL_SCHEMA
from worldpm.store import ArtifactStore


def run_download(tmp_path, sources: list[str], *overrides: str):
    cfg = load_config(None, [f"artifacts_dir={tmp_path / 'a'}", *overrides], sources)
    store = ArtifactStore(cfg.artifacts_dir)
    return pipeline.execute("download", cfg, {}, store), cfg, store


def test_demo_is_deterministic_and_offline():
    a, b = demo.generate(200, seed=1, max_pairs_per_question=3), demo.generate(200, seed=1, max_pairs_per_question=3)
    assert a.equals(b) and not a.equals(demo.generate(200, seed=2, max_pairs_per_question=3))
    assert (a["margin"] > 0).all() and a["group_id"].n_unique() == 200  # every question gives a pair
    assert (a["margin"] == a["chosen_score"] - a["rejected_score"]).all()
    assert a.group_by("group_id").len()["len"].max() <= 3
    # quality follows votes, with noise: a model can learn it, but it is not a lookup
    longer = (a["chosen"].str.len_chars() > a["rejected"].str.len_chars()).mean()
    assert 0.6 < longer < 1.0
    assert a["domain"].n_unique() == len(demo.DOMAINS)


def test_local_directory_of_every_format(tmp_path, shared_data):
    res, _, _ = run_download(tmp_path, [str(shared_data)])
    m = res.manifest
    files = [f for s in m["sources"] for f in s["files"]]
    assert {f["format"] for f in files} == {"stack_exchange_paired", "stack_exchange_preferences", "hh_rlhf",
                                            "stackexchange_posts_xml", "ultrafeedback", "sharegpt",
                                            "question_response"}
    # every record accounted for: it gave pairs or was rejected, per file and in total
    assert all(f["records"] == f["records_used"] + f["rejected"] for f in files)
    assert m["rows_in"] == m["rows_out"] + m["rows_rejected"]
    assert m["rows_in"] - m["records_in"] == m["rows_out"] - m["records_used"] > 0  # questions with several pairs
    answers = [f for f in files if f["format"] in ("stack_exchange_preferences", "stackexchange_posts_xml")]
    assert len(answers) == 4
    for f in answers:  # every candidate pair is written, tied or beyond the cap of 10 per question
        assert f["candidate_pairs"] == f["pairs"] + f["equal_score_pairs"] + f["capped_pairs"]
    rejects = pl.read_parquet(Path(res.path) / "rejects.parquet")
    assert rejects.height == m["records_rejected"] == sum(m["rejected_by_reason"].values())
    pairs = pl.scan_parquet(pair_files(res.ref)).collect()
    assert pairs.height == m["rows_out"] and pairs["pair_id"].null_count() == 0
    assert json.loads((Path(res.path) / "sources.json").read_text())[0]["kind"] == "local"


def test_second_run_is_cached_and_a_changed_file_is_not(tmp_path, se_paired):
    src = tmp_path / "in.parquet"
    pl.read_parquet(se_paired / "reward" / "coffee.stackexchange.com-00000-of-00001.parquet").write_parquet(src)
    first, _, _ = run_download(tmp_path, [str(src)])
    again, _, _ = run_download(tmp_path, [str(src)])
    assert (first.status, again.status) == ("ran", "cached") and first.key == again.key
    os.utime(src, (1, 1))  # touched, same bytes: same key
    assert run_download(tmp_path, [str(src)])[0].status == "cached"
    pl.read_parquet(src).head(50).write_parquet(src)
    changed, _, _ = run_download(tmp_path, [str(src)])
    assert changed.status == "ran" and changed.key != first.key and changed.manifest["rows_out"] == 50


def test_glob_and_several_tagged_sources(tmp_path, se_paired, shared_data):
    cfg_file = tmp_path / "p.yaml"
    cfg_file.write_text(
        f"artifacts_dir: {tmp_path / 'a'}\nsources:\n"
        f"  - {{kind: local, path: '{se_paired}/reward/*.parquet', name: paired}}\n"
        f"  - {{kind: local, path: {shared_data}/medicalgpt_zh/medical_reward_test.jsonl, name: med}}\n"
        "  - {kind: demo, rows: 20}\n")
    cfg = load_config(cfg_file)
    res = pipeline.execute("download", cfg, {}, ArtifactStore(cfg.artifacts_dir))
    counts = dict(pl.scan_parquet(pair_files(res.ref)).group_by("source").len().collect().rows())
    assert counts["paired"] == 1396 and counts["med"] == 100 and counts["demo"] > 20


def test_hf_source_offline_fails_with_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(StageError) as e:
        run_download(tmp_path, ["lvwerra/stack-exchange-paired"])
    msg = str(e.value)
    assert "cannot reach the Hugging Face hub" in msg and "--source /path/to/files" in msg and "\n" not in msg


def test_hf_pinned_sha_needs_no_network_for_the_key(tmp_path):
    sha = "0" * 40
    cfg = load_config(None, [], [f"owner/name@{sha}"])
    assert download.stage_config(cfg).sources[0].resolved_revision == sha


def test_a_source_with_only_bad_records_stops(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text("{not json\n{also not\n")
    with pytest.raises(StageError, match=f"{f}.*no readable record"):
        run_download(tmp_path, [str(f)])


def test_stack_exchange_paired_end_to_end(tmp_path, se_paired):
    """`--source ../shared/data/stack-exchange-paired/data` through the stage runner, as the CLI does."""
    res, cfg, store = run_download(tmp_path, [str(se_paired)])
    assert res.status == "ran" and cfg.sources[0].kind == "local"
    m = res.manifest
    assert (m["rows_in"], m["rows_out"], m["rows_rejected"]) == (1396, 1396, 0)
    pairs = pl.scan_parquet(pair_files(res.ref)).collect()
    assert dict(pairs.schema) == CANONICAL_SCHEMA
    assert dict(pairs.group_by("domain").len().rows()) == {"beer.stackexchange.com": 1267,
                                                          "coffee.stackexchange.com": 129}
    assert pairs["pair_id"].n_unique() == 1396 and pairs["margin"].null_count() == 1396
    raw = pl.read_parquet(se_paired / "reward" / "beer.stackexchange.com-00000-of-00001.parquet")
    first = pairs.filter(pl.col("domain") == "beer.stackexchange.com").row(0, named=True)
    assert (first["chosen"], first["rejected"]) == (raw["response_j"][0], raw["response_k"][0])
    rejects = pl.read_parquet(Path(res.path) / "rejects.parquet")
    assert dict(rejects.schema) == REJECTS_SCHEMA and rejects.height == 0
    info = json.loads((Path(res.path) / "sources.json").read_text())
    assert info[0]["format"] == "stack_exchange_paired" and info[0]["pairs"] == 1396 and len(info[0]["files"]) == 2
    names = sorted(p.name for p in (Path(res.path) / "pairs").iterdir())
    assert names == [f"0000{i}-{se_paired.name}.parquet" for i in range(2)]
    # the same config again: a cache hit, same key, nothing run
    again = pipeline.execute("download", cfg, {}, store)
    assert again.status == "cached" and again.key == res.key


def test_bad_input_through_the_stage(tmp_path):
    # quarantined, counted and the rest read
    f = tmp_path / "mixed.jsonl"
    good = json.dumps({"prompt": "p", "chosen": "c", "rejected": "r"})
    f.write_bytes((good + "\n{broken\n" + good.replace('"p"', '"p2"') + "\n").encode() + b'{"prompt": "\xff"}\n')
    res, _, _ = run_download(tmp_path, [str(f)])
    m = res.manifest
    assert (m["rows_in"], m["rows_out"], m["rows_rejected"]) == (4, 2, 2)
    assert m["rejected_by_reason"] == {"invalid_utf8": 1, "malformed_json": 1}
    rejects = pl.read_parquet(Path(res.path) / "rejects.parquet").sort("line")
    assert rejects.select("file", "line").rows() == [(str(f), 2), (str(f), 4)]
    # stops with one line naming the file: missing columns, an empty file
    cols = tmp_path / "cols.jsonl"
    cols.write_text('{"foo": 1, "bar": "x"}\n')
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    for bad, needle in ((cols, "columns found: bar, foo"), (empty, "empty file")):
        with pytest.raises(StageError) as e:
            run_download(tmp_path, [str(bad)])
        msg = str(e.value)
        assert msg.startswith(f"download: {bad}") and needle in msg and "\n" not in msg


def _cached_hf_snapshot(cache: Path, repo: str, sha: str, files: dict[str, Path]) -> None:
    """The Hugging Face cache layout (what snapshot_download leaves behind) for `repo` at commit `sha`."""
    root = cache / f"datasets--{repo.replace('/', '--')}"
    for rel, src in files.items():
        (root / "snapshots" / sha / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / "snapshots" / sha / rel).write_bytes(src.read_bytes())
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(sha)


def test_hf_source_pinned_to_a_commit_reads_the_hub_cache_offline(tmp_path, monkeypatch, se_paired, shared_data):
    from huggingface_hub import constants

    sha = "1f" * 20
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    _cached_hf_snapshot(tmp_path / "hub", "owner/se-pairs", sha, {
        "README.md": shared_data / "SOURCES.md",
        "data/reward/coffee-00000.parquet": se_paired / "reward" / "coffee.stackexchange.com-00000-of-00001.parquet",
        "data/evaluation/beer-00000.parquet": se_paired / "reward" / "beer.stackexchange.com-00000-of-00001.parquet",
    })
    cfg_file = tmp_path / "p.yaml"
    cfg_file.write_text(f"artifacts_dir: {tmp_path / 'a'}\nsources:\n"
                        f"  - {{kind: hf, repo_id: owner/se-pairs, revision: '{sha}', data_dir: data/reward}}\n")
    cfg = load_config(cfg_file)
    res = pipeline.execute("download", cfg, {}, ArtifactStore(cfg.artifacts_dir))
    info = json.loads((Path(res.path) / "sources.json").read_text())[0]
    assert info["resolved_revision"] == sha and info["allow_patterns"] == ["data/reward/**"]
    assert [Path(f["file"]).name for f in info["files"]] == ["coffee-00000.parquet"]  # data_dir only
    assert res.manifest["rows_out"] == 129
    # the tag is the repo id; the file name is made safe
    assert [p.name for p in (Path(res.path) / "pairs").iterdir()] == ["00000-owner_se-pairs.parquet"]
    # a data_dir with no data files in it is one line
    cfg = load_config(cfg_file, ["sources.0.data_dir=data/nothing"])
    with pytest.raises(StageError, match="no data files"):
        pipeline.execute("download", cfg, {}, ArtifactStore(cfg.artifacts_dir))


def test_hf_key_follows_the_upstream_commit(tmp_path):
    keys = set()
    for sha in ("a" * 40, "b" * 40, "a" * 40):
        cfg = load_config(None, [f"artifacts_dir={tmp_path}"], [f"owner/name@{sha}"])
        keys.add(pipeline.resolve("download", cfg, {})[0])
    assert len(keys) == 2  # a new commit is a new key; the same commit the same key


def test_output_is_byte_identical_on_a_forced_rerun(tmp_path, shared_data):
    """Same input, same bytes: a forced rerun keeps the content digest, so nothing downstream reruns."""
    sources = [str(shared_data / "stack-exchange-preferences"), str(shared_data / "stackexchange-dumps"), "demo"]
    cfg = load_config(None, [f"artifacts_dir={tmp_path / 'a'}"], sources)
    store = ArtifactStore(cfg.artifacts_dir)
    digests = {pipeline.execute("download", cfg, {}, store, force=i > 0).ref.digest for i in range(3)}
    assert len(digests) == 1
