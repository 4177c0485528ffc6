"""The data half of the DAG through the real CLI and a real Prefect server, on real StackExchange pairs."""
from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

pytestmark = pytest.mark.slow


def statuses(proc) -> dict[str, str]:
    return {r["stage"]: r["status"] for r in json.loads(proc.stdout)}


@pytest.fixture
def se_config(tmp_path, se_paired) -> Path:
    cfg = tmp_path / "pipeline.yaml"
    cfg.write_text(
        "sources:\n"
        f"  - kind: local\n    path: {se_paired}\n    name: se\n"
        "shard:\n  train: 0.8\n  eval: 0.1\n  test: 0.1\n  rows_per_file: 400\n"
    )
    return cfg


def test_until_shard_then_cache_then_clean_tweak(worldpm_cli, se_config, tmp_path):
    first = worldpm_cli("run", "--config", str(se_config), "--until", "shard", "--json")
    st = statuses(first)
    assert st["download"] == st["normalise"] == st["clean"] == st["shard"] == "ran"
    assert all(v == "skipped" for k, v in st.items() if k not in ("download", "normalise", "clean", "shard"))
    shard = next(r for r in json.loads(first.stdout) if r["stage"] == "shard")
    splits = json.loads((Path(shard["path"]) / "splits.json").read_text())
    assert sum(s["rows"] for s in splits.values()) > 1000
    assert "Cached" not in first.stderr

    # second run: no stage work, and it says so (in the CLI and as Prefect Cached states)
    again = worldpm_cli("run", "--config", str(se_config), "--until", "shard")
    assert "nothing changed" in again.stdout
    assert again.stdout.count(" cached ") == 4
    assert "Cached" in again.stderr  # Prefect's task-run state names

    # a clean threshold that drops nothing here (these pairs carry no margin): clean reruns (the normalised
    # texts are a cache hit), its output is byte-identical, so shard is a cache hit (early cutoff)
    tweak = worldpm_cli("run", "--config", str(se_config), "--until", "shard", "--set", "clean.min_margin=1", "--json")
    st = statuses(tweak)
    assert (st["download"], st["normalise"], st["clean"], st["shard"]) == ("cached", "cached", "ran", "cached")

    # a threshold that drops pairs: clean and shard rerun, download still cached
    drop = worldpm_cli("run", "--config", str(se_config), "--until", "shard",
                       "--set", "clean.chosen.max_chars=1500", "--json")
    st = statuses(drop)
    assert (st["download"], st["normalise"], st["clean"], st["shard"]) == ("cached", "cached", "ran", "ran")
    clean = next(r for r in json.loads(drop.stdout) if r["stage"] == "clean")
    report = json.loads((Path(clean["path"]) / "report.json").read_text())
    rejects = pl.read_parquet(Path(clean["path"]) / "rejects.parquet")
    assert rejects.height == sum(report["rejected_by_rule"].values()) > 0
    assert report["rows_in"] == report["rows_out"] + rejects.height

    # status: with the tweak, the stages are cached; with a new setting, clean would run and says why
    status = worldpm_cli("status", "--config", str(se_config), "--set", "clean.chosen.max_chars=1500", "--json")
    st = {r["stage"]: r for r in json.loads(status.stdout)}
    assert st["normalise"]["status"] == st["clean"]["status"] == st["shard"]["status"] == "cached"
    status = worldpm_cli("status", "--config", str(se_config), "--set", "clean.chosen.max_chars=900")
    line = next(ln for ln in status.stdout.splitlines() if ln.startswith("clean"))
    assert "would run" in line and "chosen.max_chars: 1500 -> 900" in line

    # artifacts: list, show, gc keeps what the config references
    listing = json.loads(worldpm_cli("artifacts", "list", "--config", str(se_config), "--json").stdout)
    assert sum(1 for r in listing if r["stage"] == "clean") == 3
    shown = json.loads(worldpm_cli("artifacts", "show", f"clean/{clean['key']}", "--config", str(se_config)).stdout)
    assert shown["rows_in"] == report["rows_in"] and shown["upstream"]["download"]["digest"]
    worldpm_cli("artifacts", "gc", "--config", str(se_config), "--set", "clean.chosen.max_chars=1500")
    listing = json.loads(worldpm_cli("artifacts", "list", "--config", str(se_config), "--json").stdout)
    assert sorted(r["stage"] for r in listing) == ["clean", "download", "normalise", "shard"]
    assert next(r for r in listing if r["stage"] == "clean")["key"] == clean["key"]


def test_bad_input_stops_with_one_line_naming_the_file(worldpm_cli, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    p = worldpm_cli("run", "--source", str(empty), "--until", "clean", check=False)
    assert p.returncode == 1
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("worldpm: ") and str(empty) in last

    cols = tmp_path / "cols.jsonl"
    cols.write_text('{"foo": 1, "bar": "x"}\n')
    p = worldpm_cli("run", "--source", str(cols), "--until", "clean", check=False)
    assert p.returncode == 1 and "foo" in p.stderr.strip().splitlines()[-1]


def test_config_errors_are_one_line(worldpm_cli, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("clean:\n  min_chars: 3\n")
    p = worldpm_cli("run", "--config", str(bad), check=False)
    assert p.returncode == 2
    assert p.stderr.strip() == f"worldpm: config error: {bad}: unknown key `clean.min_chars`"
    p = worldpm_cli("run", "--source", "./does-not-exist.jsonl", check=False)
    assert p.returncode == 2 and "no such file" in p.stderr
    p = worldpm_cli("run", "--until", "nosuchstage", check=False)
    assert p.returncode == 2 and "invalid choice" in p.stderr
