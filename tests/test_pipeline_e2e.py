"""The data half of the DAG through the real CLI and a real Prefect server, on real StackExchange pairs."""
from __future__ import annotations

import json
import os
import shutil
import sys
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

    # second run: no stage work, and it says so (in the CLI, and as Prefect Cached states in the run's log file and
    # the UI: on the terminal only with --verbose)
    again = worldpm_cli("run", "--config", str(se_config), "--until", "shard")
    assert "nothing changed" in again.stdout
    assert again.stdout.count(" cached ") == 4
    assert "Cached" not in again.stderr
    assert "Cached" in sorted((tmp_path / ".worldpm" / "logs").glob("run-*.log"))[-1].read_text()

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
    assert shown["rows_in"] == report["rows_in"] and shown["upstream"]["normalise"]["digest"]
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


def test_a_failing_stage_is_one_line_and_verbose_keeps_the_tracebacks(worldpm_cli, tmp_path):
    """issue 12 case 8: every failing stage printed two Prefect tracebacks (~90 lines) before its one line."""
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    quiet = worldpm_cli("run", "--source", str(empty), "--until", "download", check=False)
    assert quiet.returncode == 1 and "Traceback" not in quiet.stderr
    assert quiet.stderr.strip().splitlines()[-1] == f"worldpm: download: {empty}: empty file"
    loud = worldpm_cli("run", "--source", str(empty), "--until", "download", "--verbose", check=False)
    assert loud.returncode == 1 and loud.stderr.count("Traceback (most recent call last)") >= 2
    assert loud.stderr.strip().splitlines()[-1] == f"worldpm: download: {empty}: empty file"


def test_gc_racing_a_real_run_deletes_nothing_the_run_uses(worldpm_cli, prefect_api_url, se_paired, tmp_path):
    """issue 12 case 1: `worldpm run --config s2.yaml` in progress, `worldpm artifacts gc --config s1.yaml` used to
    delete the run's download artifact between two of its stages. The run holds the store from its first stage to
    its last: gc refuses, naming it, and deletes nothing; once the run has ended, gc works."""
    import subprocess
    import time

    import yaml

    from tasks import PIPELINE
    from worldpm.config import load_config
    from worldpm.status import pipeline_status
    from worldpm.store import ArtifactStore

    coffee = se_paired / "reward" / "coffee.stackexchange.com-00000-of-00001.parquet"
    beer = se_paired / "reward" / "beer.stackexchange.com-00000-of-00001.parquet"
    s1, s2 = tmp_path / "s1.yaml", tmp_path / "s2.yaml"
    s1.write_text(yaml.safe_dump({"artifacts_dir": "store", "sources": [{"kind": "local", "path": str(beer)}]}))
    s2.write_text(yaml.safe_dump({"artifacts_dir": "store", "sources": [{"kind": "local", "path": str(coffee)}]}))
    cfg2 = load_config(s2)
    store = ArtifactStore(cfg2.artifacts_dir)
    download = PIPELINE.execute("download", cfg2, {}, store)  # s2's download and normalise: committed, nothing
    PIPELINE.execute("normalise", cfg2, {"download": download.ref}, store)  # else yet (clean's key needs normalise's)
    clean_key = next(r["key"] for r in pipeline_status(PIPELINE, cfg2) if r["stage"] == "clean")

    # the run reaches clean and waits there (this test holds clean's key lock, as a concurrent run would): the
    # run is in progress, between two of its stages, with its download artifact still to be read
    out_log, err_log = tmp_path / "run.out", tmp_path / "run.err"
    with store.key_lock("clean", clean_key), open(out_log, "w") as out, open(err_log, "w") as err:
        run = subprocess.Popen([shutil.which("worldpm") or str(Path(sys.executable).parent / "worldpm"), "run",
                                "--config", str(s2), "--until", "shard", "--verbose"], cwd=tmp_path, stdout=out, stderr=err,
                               text=True, env=dict(os.environ, PREFECT_API_URL=prefect_api_url))
        try:
            deadline = time.monotonic() + 300  # a hang guard for the run to start
            while "download: cached" not in err_log.read_text():  # past download (then normalise), waiting at
                # clean (a cache hit's line is --verbose's)
                assert run.poll() is None, err_log.read_text()[-3000:]
                assert time.monotonic() < deadline, "the run did not start"
                time.sleep(0.2)
            gc = worldpm_cli("artifacts", "gc", "--config", str(s1), check=False, timeout=120)
            assert gc.returncode == 1 and "removed" not in gc.stdout
            line = gc.stderr.strip().splitlines()[-1]
            assert line.startswith(f"worldpm: artifacts gc: the store {store.root} is in use by a run in progress (pid "
                                   f"{run.pid} on "), gc.stderr
            assert "nothing was changed" in line
            assert Path(download.path).is_dir()
        except BaseException:
            run.kill()
            raise
    assert run.wait(timeout=600) == 0, err_log.read_text()[-3000:]
    lines = out_log.read_text().splitlines()
    assert [ln.split()[1] for ln in lines[:4]] == ["cached", "cached", "ran", "ran"]  # download, normalise, clean, shard
    # the run has ended: now gc removes what s1 does not use: s2's download. What lies below it stays, said (issue
    # 19 case 1): s1's download would run first, and gc cannot prove that its output differs from s2's
    gc = worldpm_cli("artifacts", "gc", "--config", str(s1))
    assert "removed 1 folder(s)" in gc.stdout and not Path(download.path).exists()
    assert "kept 3 artifact(s) of normalise, clean, shard that" in gc.stdout
