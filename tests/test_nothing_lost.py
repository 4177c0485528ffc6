"""Nothing lost, nothing leaks (issue 19): the cases a hostile audit still broke, each as a careful user expects it.

Wrong or lost (1-6): gc keeps what it cannot prove unused; a deployment run's source is checked where it resolves
to; CLI numbers are checked like config numbers; verify and status check what run checks. One line instead of a
traceback (7-13): a damaged cached manifest, a full disk, a lost Prefect server, `--batch-size 0`, `.inf` epochs, a
model without a reward head. And: a killed run's flow run is marked Crashed by the next run (14), a run says which
server and PREFECT_HOME it uses (15), a missing path is not taken for a hub id (16), `.nan` is refused (17), a split
that a selected stage needs is checked before anything runs (18).
"""
from __future__ import annotations

import json
import re
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tasks import PIPELINE
from worldpm import cli
from worldpm.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
RB = ROOT / "tests" / "fixtures" / "rewardbench_small.jsonl"
WORLDPM = shutil.which("worldpm") or str(Path(sys.executable).parent / "worldpm")


def no_flow(**params):
    pytest.fail(f"the flow must not start: {params}")


def worldpm(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv), pipeline=PIPELINE, run_flow=no_flow)
    out, err = capsys.readouterr()
    return code, out, err


def only_line(err: str) -> str:
    """stderr is exactly one line, `worldpm: ...`, and no traceback."""
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("worldpm: "), err
    return lines[0]


def write_config(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# ---- 11, 17: every number in the config is finite ------------------------------------------------------------------
@pytest.mark.parametrize("override, key", [("train.epochs=.inf", "train.epochs"),
                                           ("clean.min_margin=.nan", "clean.min_margin"),
                                           ("clean.chars_per_token=.inf", "clean.chars_per_token"),
                                           ("train.timeout_s=-.inf", "train.timeout_s")])
def test_infinite_or_nan_numbers_are_refused_by_validation(capsys, monkeypatch, tmp_path, override, key):
    """`.inf` epochs passed validation and failed in the trainer (OverflowError, 25 lines of stderr); `.nan`
    min_margin passed and rejected every pair. Both are one config error naming the key, before anything runs,
    and a deployment run (train.epochs and clean.* are in the default allowlist) is refused the same way."""
    monkeypatch.chdir(tmp_path)  # no ./pipeline.yaml: the built-in defaults
    got = float(override.split("=")[1].replace(".", ""))  # yaml's .inf / -.inf / .nan
    code, _, err = worldpm(capsys, "status", "--set", override)
    assert code == 2 and only_line(err) == (f"worldpm: config error: <defaults> + --set: `{key}`: Input should be a "
                                            f"finite number (got {got!r})")
    from flows.policy import Served, check_run

    with pytest.raises(ConfigError, match=f"`{key}`: Input should be a finite number"):
        check_run(Served(None), None, [override], None)


# ---- 3, 4, 10: command-line numbers are checked as the config key they stand for ----------------------------------
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny random-initialised BERT reward model with MiniLM's tokenizer, saved as the train stage saves one."""
    import torch
    from transformers import AutoModelForSequenceClassification, BertConfig

    from worldpm.modeling import models

    tok = models.load_tokenizer(str(models.minilm_dir()))
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=512, num_labels=1, pad_token_id=tok.pad_token_id)
    d = tmp_path_factory.mktemp("tiny") / "model"
    AutoModelForSequenceClassification.from_config(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.mark.parametrize("size", ["-1", "0"])
@pytest.mark.parametrize("command", ["evaluate", "score"])
def test_a_batch_size_below_one_is_refused_as_evaluate_batch_size_would_be(tiny_dir, capsys, command, size):
    """`--batch-size -1` exited 0 with accuracy 48% (rewards ~2.7e33, scores ~1e-41: np.empty's leftovers, no batch
    was scored); `--batch-size 0` raised ZeroDivisionError. A usage error now, like `evaluate.batch_size: 0`."""
    data = ["--data", str(RB)] if command == "evaluate" else [str(RB)]
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--model", str(tiny_dir), *data, "--batch-size", size], pipeline=PIPELINE,
                 run_flow=no_flow)
    out, err = capsys.readouterr()
    assert e.value.code == 2 and out == "" and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (f"worldpm {command}: error: argument --batch-size: input should be "
                                            f"greater than or equal to 1, got {size!r} (as evaluate.batch_size in "
                                            "pipeline.yaml)")


def test_the_scorer_itself_refuses_a_batch_size_below_one(tiny_dir):
    """Below the CLI too: a caller of the library gets an error, not np.empty's leftovers as rewards."""
    from worldpm.modeling.scoring import load_model_dir, score_sequences

    model, tok, pad_id = load_model_dir(str(tiny_dir), device="cpu")
    for size in (0, -1):
        with pytest.raises(ValueError, match=f"batch_size must be >= 1, got {size}"):
            score_sequences(model, [[101, 2000, 102]], pad_id, size, device="cpu")


# ---- 13: a model without a reward head: the one line, and nothing before it -------------------------------------
@pytest.mark.parametrize("command", ["evaluate", "score"])
def test_a_model_without_a_reward_head_is_refused_in_one_line_and_nothing_else(tmp_path, command):
    """The refusal was right, but transformers printed its load report (a MISSING table, ~10 lines) and a progress
    bar before it. The console script, as a user runs it: stderr is the one line."""
    from worldpm.modeling.models import minilm_dir

    plain = minilm_dir()
    data = ["--data", str(RB)] if command == "evaluate" else [str(RB)]
    p = subprocess.run([WORLDPM, command, "--model", str(plain), *data], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 1 and p.stdout == ""
    assert only_line(p.stderr) == (
        f"worldpm: {plain} is not a trained reward model: its checkpoint has no classifier.bias, classifier.weight, "
        "which would be initialised at random; give a model trained as a reward model (worldpm's train artifact, "
        "or a sequence-classification checkpoint with num_labels=1)")


# ---- a store with real artifacts: the demo data up to tokenize, once a module, copied per test -------------------
@pytest.fixture(scope="module")
def staged(tmp_path_factory) -> Path:
    """A project folder (pipeline.yaml with artifacts_dir: artifacts) whose store holds download .. tokenize of the
    demo data, and a second tokenize artifact (max_length 128) that the config does not use."""
    from worldpm.config import load_config
    from worldpm.store import ArtifactStore

    root = tmp_path_factory.mktemp("staged")
    cfg_path = write_config(root / "pipeline.yaml", {"artifacts_dir": "artifacts"})
    cfg = load_config(cfg_path)
    PIPELINE.run(cfg, ArtifactStore(cfg.artifacts_dir), until="tokenize")
    other = load_config(cfg_path, ["tokenize.max_length=128"])
    PIPELINE.run(other, ArtifactStore(other.artifacts_dir), until="tokenize")
    return root


def project(staged: Path, tmp_path: Path) -> tuple[Path, dict[str, Path]]:
    """A copy of the staged project: (its pipeline.yaml, {stage: the folder of the artifact the config uses})."""
    from worldpm.config import load_config
    from worldpm.status import pipeline_status

    dst = tmp_path / "project"
    shutil.copytree(staged, dst)
    cfg = load_config(dst / "pipeline.yaml")
    rows = pipeline_status(PIPELINE, cfg)
    return dst / "pipeline.yaml", {r["stage"]: Path(r["why"].removeprefix("cached at ")) for r in rows
                                   if r["status"] == "cached"}


def run_direct(cfg_path: Path, *overrides: str, until: str = "tokenize") -> dict[str, str]:
    """The pipeline through the engine (no Prefect): {stage: ran|cached}."""
    from worldpm.config import load_config
    from worldpm.store import ArtifactStore

    cfg = load_config(cfg_path, list(overrides))
    return {r["stage"]: r["status"] for r in PIPELINE.run(cfg, ArtifactStore(cfg.artifacts_dir), until=until)}


# ---- 1: gc keeps what it cannot prove unused --------------------------------------------------------------------
def test_gc_keeps_the_artifacts_below_a_stage_that_would_rerun(staged, tmp_path, capsys):
    """`gc --set clean.min_margin=-1000` deleted shard, tokenize and train: their keys wait for clean's new output,
    and gc took "not computable yet" for "unused". clean's output is byte-identical (no margin is that low), so the
    next run gets the same keys back: it must find them cached. What gc can prove unused (a tokenize artifact of
    another max_length, clean's artifact of the old threshold) still goes."""
    cfg_path, used = project(staged, tmp_path)
    store = cfg_path.parent / "artifacts"
    unused_tokenize = [p for p in (store / "tokenize").iterdir() if not p.name.startswith(".")
                       and p.is_dir() and p != used["tokenize"]]
    assert len(unused_tokenize) == 1
    code, out, err = worldpm(capsys, "artifacts", "gc", "--config", str(cfg_path), "--set", "clean.min_margin=-1000")
    assert code == 0, err
    assert used["shard"].is_dir() and used["tokenize"].is_dir()
    assert not unused_tokenize[0].exists() and not used["clean"].exists()
    kept = next(line for line in out.splitlines() if line.startswith("kept 2 artifact(s) of shard, tokenize that "))
    assert "may still use: their keys wait for the output of clean, which would run first" in kept
    assert f"shard/{used['shard'].name}" in kept and f"tokenize/{used['tokenize'].name}" in kept
    assert run_direct(cfg_path, "clean.min_margin=-1000") == {
        "download": "cached", "normalise": "cached", "clean": "ran", "shard": "cached", "tokenize": "cached",
        "ref_logps": "skipped", "train": "skipped", "evaluate": "skipped", "plot": "skipped"}


# ---- 5, 6, 7: verify, status and run check an artifact the same way -----------------------------------------------
def test_verify_names_an_artifact_whose_manifest_cannot_be_read(staged, tmp_path, capsys):
    """`artifacts verify` said "7 ok, 0 damaged" with one manifest.json unreadable, and never named it: it listed
    artifacts by their manifests. It is damaged, named, and set aside (kept, not deleted) unless --dry-run."""
    cfg_path, used = project(staged, tmp_path)
    broken = used["shard"]
    (broken / "manifest.json").write_text('{"stage": "shard", "key": ')
    code, out, err = worldpm(capsys, "artifacts", "verify", "--config", str(cfg_path), "--dry-run")
    assert code == 1 and broken.is_dir()
    assert f"shard/{broken.name}  DAMAGED: its manifest.json is not valid JSON (Expecting value, line 1)" in out
    assert "verified 6 artifact(s): 5 ok, 1 damaged" in out
    assert only_line(err) == (f"worldpm: artifacts verify: 1 damaged artifact(s), first shard/{broken.name}: its "
                              "manifest.json is not valid JSON (Expecting value, line 1)")
    code, out, _ = worldpm(capsys, "artifacts", "verify", "--config", str(cfg_path))
    aside = list(broken.parent.glob(f".bad-{broken.name}-*"))
    assert code == 1 and not broken.exists() and len(aside) == 1
    assert f"set aside {broken} as {aside[0].name}" in out
    assert "its manifest.json is not valid JSON" in (aside[0] / "SET_ASIDE.txt").read_text()


def test_status_calls_a_truncated_artifact_damaged_as_run_would(staged, tmp_path, capsys):
    """`status` called an artifact with a truncated pairs.parquet "cached"; `run` then found it damaged and rebuilt
    it. status applies run's checks, and changes nothing."""
    cfg_path, used = project(staged, tmp_path)
    pairs = used["clean"] / "pairs.parquet"
    size = pairs.stat().st_size
    with open(pairs, "r+b") as f:
        f.truncate(size // 2)
    code, out, _ = worldpm(capsys, "status", "--config", str(cfg_path))
    rows = {line.split()[0]: line.split(None, 3)[1:] for line in out.splitlines()}
    assert code == 0 and rows["download"][0] == "cached" and rows["normalise"][0] == "cached"
    assert rows["clean"][:2] == ["damaged", used["clean"].name]
    assert rows["clean"][2] == (f"the cached artifact {used['clean']} is damaged (pairs.parquet has {size // 2} bytes, "
                                f"its manifest says {size}): the next run sets it aside and rebuilds it")
    assert rows["shard"][0] == "would" and "after clean" in rows["shard"][2]
    assert pairs.stat().st_size == size // 2  # status moved nothing
    assert run_direct(cfg_path, until="clean")["clean"] == "ran"


def test_status_checks_the_content_of_what_a_stage_that_would_run_reads(staged, tmp_path, capsys):
    """Run checks the files a stage reads against their sha256 before it runs; status does too: a same-size change
    in clean's pairs.parquet, with shard about to run (its config changed), is damage status names."""
    cfg_path, used = project(staged, tmp_path)
    pairs = used["clean"] / "pairs.parquet"
    data = bytearray(pairs.read_bytes())
    data[len(data) // 2] ^= 0xFF
    pairs.write_bytes(bytes(data))
    code, out, _ = worldpm(capsys, "status", "--config", str(cfg_path))
    assert code == 0 and "clean      cached" in out  # nobody reads it now: sizes are all a lookup checks
    code, out, _ = worldpm(capsys, "status", "--config", str(cfg_path), "--set", "shard.salt=other")
    clean = next(line for line in out.splitlines() if line.startswith("clean "))
    assert code == 0 and clean.split()[1] == "damaged"
    assert clean.endswith("is damaged (pairs.parquet: its content (sha256) differs from its manifest): shard reads "
                          "it, so the next run sets it aside and rebuilds it first")


@pytest.mark.parametrize("damage", ["broken", "missing"])
def test_a_cached_artifact_without_a_readable_manifest_is_set_aside_and_rebuilt(staged, tmp_path, caplog, damage):
    """A broken or missing manifest.json made the next run rerun the stage and then fail in commit (~210 lines, 3
    tracebacks: commit's "final exists" branch deleted the fresh output, then renamed it); the damaged folder was
    deleted. Now the lookup names it and sets it aside, and the stage is rebuilt; its output is byte-identical, so
    what follows stays cached."""
    cfg_path, used = project(staged, tmp_path)
    clean = used["clean"]
    if damage == "broken":
        (clean / "manifest.json").write_text("{not json")
    else:
        (clean / "manifest.json").unlink()
    with caplog.at_level("WARNING"):
        statuses = run_direct(cfg_path)
    assert statuses["clean"] == "ran" and statuses["shard"] == "cached" and statuses["tokenize"] == "cached"
    aside = list(clean.parent.glob(f".bad-{clean.name}-*"))
    assert len(aside) == 1 and (clean / "manifest.json").is_file()
    problem = "its manifest.json is not valid JSON (Expecting property name enclosed in double quotes, line 1)" \
        if damage == "broken" else "its manifest.json is missing"
    assert (f"clean: the cached artifact {clean} is damaged ({problem}): set aside as {aside[0].name}; it is rebuilt"
            in caplog.messages)


def test_commit_never_deletes_the_fresh_output(tmp_path):
    """The store level of case 7: a folder at the key without a readable manifest is set aside, and the new
    artifact takes its place; a sound one of the same key (a concurrent run won) is kept and ours dropped."""
    from worldpm.store import ArtifactStore

    store = ArtifactStore(tmp_path)
    key = "0" * 20
    final = store.path("clean", key)
    final.mkdir(parents=True)
    (final / "half.parquet").write_bytes(b"x")  # no manifest
    tmp = store.new_tmp("clean", key)
    (tmp / "pairs.parquet").write_bytes(b"new")
    ref = store.commit("clean", key, tmp, {})
    assert (final / "pairs.parquet").read_bytes() == b"new" and store.find("clean", key) == ref
    aside = list(final.parent.glob(f".bad-{key}-*"))
    assert len(aside) == 1 and (aside[0] / "half.parquet").is_file()
    tmp = store.new_tmp("clean", key)
    (tmp / "pairs.parquet").write_bytes(b"later")
    assert store.commit("clean", key, tmp, {}) == ref and not tmp.exists()
    assert (final / "pairs.parquet").read_bytes() == b"new"


# ---- 18: a split a selected stage needs is checked before any stage runs -----------------------------------------
def test_a_config_without_a_test_split_is_refused_before_any_stage_runs(tmp_path, capsys, monkeypatch):
    """shard.test: 0 was refused only by evaluate, after download .. train had run (minutes to hours). The run
    refuses it at once (the flow never starts), and so does the engine itself (deployment runs, direct callers),
    before the first stage writes anything; a run that stops before evaluate is fine."""
    from worldpm.config import load_config
    from worldpm.store import ArtifactStore

    monkeypatch.chdir(tmp_path)
    splits = ["--set", "shard.test=0", "--set", "shard.train=0.9"]
    code, _, err = worldpm(capsys, "run", *splits)
    assert code == 2 and only_line(err) == (
        "worldpm: config error: evaluate scores the test split, and shard.test is 0: give shard.test a fraction above "
        "0 (shard.train + shard.eval + shard.test = 1), or stop the run before evaluate (--until train)")
    code, _, err = worldpm(capsys, "run", "--set", "shard.train=0", "--set", "shard.test=0.9", "--until", "shard")
    assert code == 2 and "shard.train is 0: no pair would go to the train split" in only_line(err)
    cfg = load_config(None, [f"artifacts_dir={tmp_path / 'store'}", "shard.test=0", "shard.train=0.9"])
    with pytest.raises(ConfigError, match="evaluate scores the test split, and shard.test is 0"):
        PIPELINE.run(cfg, ArtifactStore(cfg.artifacts_dir))
    assert not (tmp_path / "store").exists()
    assert PIPELINE.preflight(cfg, until="train")[-1] == "train"


# ---- 16: a missing path is not quietly taken for a hub dataset -------------------------------------------------------
def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("hub", ["offline", "unreachable"])
@pytest.mark.parametrize("command", ["run", "status"])
def test_a_missing_path_fails_at_once_naming_both_readings(tmp_path, hub, command):
    """`--source mydata/pairs` with no such folder became the hub dataset mydata/pairs: ~10 s of retries, then only
    "cannot reach the hub". Now one try (no network in tests: HF_HUB_OFFLINE, or an endpoint where nothing listens)
    and a config error naming the path that is missing and the hub id that cannot be looked up; no stage runs. The
    console script, in a fresh process (huggingface_hub reads HF_HUB_OFFLINE once, at import)."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    if hub == "offline":
        env["HF_HUB_OFFLINE"] = "1"
        why = "as a hub dataset id it cannot be looked up: HF_HUB_OFFLINE is set; fix the path, or unset " \
              "HF_HUB_OFFLINE and write --source hf://mydata/pairs"
    else:
        env.update(HF_HUB_OFFLINE="0", HF_ENDPOINT=f"http://127.0.0.1:{_closed_port()}")
        why = "the Hugging Face hub cannot be asked about a dataset mydata/pairs (ConnectError); fix the path, or " \
              "once the hub is reachable write --source hf://mydata/pairs"
    p = subprocess.run([WORLDPM, command, "--source", "mydata/pairs"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 2 and p.stdout == "" and not (tmp_path / ".worldpm").exists()
    assert only_line(p.stderr) == f"worldpm: config error: --source 'mydata/pairs': no file or folder " \
                                  f"'mydata/pairs' in {tmp_path}, and {why}"


# ---- 2: a deployment run reads inside its project, through globs and symlinks too -----------------------------------
@pytest.fixture
def linked_project(tmp_path, monkeypatch) -> tuple[Path, Path]:
    """A served project whose data/shared is a real symlink to a folder outside it, holding secret.jsonl."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.jsonl").write_text(json.dumps({"prompt": "p", "chosen": "the secret", "rejected": "r"}) + "\n")
    project = tmp_path / "project"
    (project / "data" / "own").mkdir(parents=True)
    (project / "data" / "own" / "pairs.jsonl").write_text(
        json.dumps({"prompt": "p", "chosen": "mine", "rejected": "r"}) + "\n")
    (project / "data" / "shared").symlink_to(outside, target_is_directory=True)
    write_config(project / "pipeline.yaml", {"artifacts_dir": "artifacts"})
    monkeypatch.chdir(project)  # where `worldpm serve` runs
    return project, outside


def test_a_deployment_run_cannot_read_outside_the_project_through_a_glob(linked_project):
    """`--param sources='["data/share*/secret.jsonl"]'` read a file outside the project: the policy checked the
    pattern as text (inside), the reader expanded it through the link. It is refused, naming where it resolves to;
    so is the same glob given as a `sources` override."""
    from flows.policy import Served, check_run

    project, outside = linked_project
    cfg = str(project / "pipeline.yaml")
    served = Served(cfg)
    secret = project / "data" / "shared" / "secret.jsonl"
    refused = f"reads {secret}, which resolves to {outside / 'secret.jsonl'}, outside the project folder {project}"
    with pytest.raises(ConfigError) as e:
        check_run(served, cfg, [], ["data/share*/secret.jsonl"])
    assert str(e.value) == (f"a deployment run (worldpm serve): sources.0.path "
                            f"'{project / 'data/share*/secret.jsonl'}' {refused}")
    with pytest.raises(ConfigError, match=re.escape(refused)):
        check_run(served, cfg, ['sources=[{kind: local, path: "data/sh*/*.jsonl"}]'], None)
    check_run(served, cfg, [], ["data/ow*/pairs.jsonl"])  # a glob that stays inside is fine
    check_run(served, cfg, [], ["data"])  # a folder source is walked without following links to folders:
    from worldpm.data.sources import local_files

    assert local_files(str(project / "data")) == [project / "data" / "own" / "pairs.jsonl"]


def test_a_deployment_run_checks_what_it_reads_where_it_opens_it(linked_project, tmp_path):
    """The read-time half: under the roots a served run reads within (the flow sets them), the download stage
    refuses a file that resolves outside, as it would if the link appeared after the policy's check; without them
    (a run from the terminal, the user's own authority) the same source reads."""
    from flows.policy import Served
    from worldpm.config import load_config
    from worldpm.data.sources import read_root
    from worldpm.errors import StageError
    from worldpm.store import ArtifactStore

    project, outside = linked_project
    cfg = load_config(project / "pipeline.yaml", [], ["data/share*/secret.jsonl"])
    store = ArtifactStore(cfg.artifacts_dir)
    with read_root(Served(str(project / "pipeline.yaml")).roots):
        with pytest.raises(StageError) as e:
            PIPELINE.run(cfg, store, until="download")
    assert str(e.value) == (f"download: {project / 'data/shared/secret.jsonl'} (from {project}/data/share*/secret"
                            f".jsonl) resolves to {outside / 'secret.jsonl'}, outside {project}: this run may read "
                            "only files inside it (a deployment run reads inside its project)")
    assert "WORLDPM_READ_ROOT" not in os.environ
    assert [r["status"] for r in PIPELINE.run(cfg, store, until="download")][0] == "ran"


# ---- 8: a full disk is one line naming the stage, the place and what to do; the full log is in a file -------------
class FullDiskStore:
    """The write error injected at the store, for machines where no small filesystem can be mounted: every new
    output folder's manifest.json is a link to /dev/full, whose writes fail with ENOSPC (the kernel's own error)."""

    def __new__(cls, root):
        from worldpm.store import ArtifactStore

        class _Store(ArtifactStore):
            def new_tmp(self, stage, key):
                tmp = super().new_tmp(stage, key)
                (tmp / "manifest.json").symlink_to("/dev/full")
                return tmp

        return _Store(root)


def test_a_full_disk_is_one_line_with_the_log_kept_injected(tmp_path, capsys, monkeypatch):
    """Always runs (no root needed). A full disk ended in polars' ComputeError or an OSError from commit and ~250
    lines of tracebacks. Now: DiskFull naming the stage, the store's device and what to do; nothing committed, the
    unfinished output removed; the CLI adds the run's log file, which holds the tracebacks; a rerun with space
    works."""
    from worldpm.config import load_config
    from worldpm.errors import DiskFull
    from worldpm.store import ArtifactStore

    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, [f"artifacts_dir={tmp_path / 'store'}"])
    store = FullDiskStore(cfg.artifacts_dir)
    with pytest.raises(DiskFull) as e:
        PIPELINE.run(cfg, store, until="download")
    assert str(e.value).startswith(f"download: the disk is full (no space left on the device of {store.root}, ")
    assert str(e.value).endswith(" free): nothing was committed and its unfinished output is removed; free space "
                                 "there (`worldpm artifacts gc` removes what the config does not use) or set "
                                 "artifacts_dir to a larger disk, then run again: the stages before download are "
                                 "cached")
    assert [p.name for p in (store.root / "download").iterdir() if not p.name.endswith(".lock")] == \
        [f".work-{p.name[6:]}" for p in (store.root / "download").glob(".work-*")]  # no .tmp-, no artifact

    code = cli.main(["run", "--until", "download"], pipeline=PIPELINE,
                    run_flow=lambda **p: PIPELINE.run(cfg, FullDiskStore(cfg.artifacts_dir), until=p["until"]))
    err = capsys.readouterr().err
    logs = sorted((tmp_path / ".worldpm" / "logs").glob("run-*.log"))
    assert code == 1 and len(logs) == 1 and "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"worldpm: download: the disk is full (no space left on the device of {store.root}, ")
    assert line.endswith(f"(full log: {logs[0]}; `worldpm run --verbose` prints it here)")
    assert [r["status"] for r in PIPELINE.run(cfg, ArtifactStore(cfg.artifacts_dir), until="download")][0] == "ran"


def test_a_library_reports_a_full_disk_in_text_and_it_is_recognised(tmp_path):
    """polars says "No space left on device" inside a ComputeError (no errno): disk_full finds it, as it finds the
    OSError of a plain write, both from real writes to /dev/full."""
    import polars as pl

    from worldpm.errors import disk_full

    with pytest.raises(pl.exceptions.ComputeError) as e:
        pl.DataFrame({"a": list(range(100_000))}).write_parquet("/dev/full")
    assert disk_full(e.value) is e.value
    with pytest.raises(OSError) as e2:
        with open("/dev/full", "w") as f:
            f.write("x" * 10)
    assert disk_full(e2.value) is e2.value
    assert disk_full(ValueError("no space for a name")) is None


def _mount_tmpfs(path: Path, size: str) -> str | None:
    """Mount a small tmpfs at `path`; None when it worked, else why not (no root, no mount(8), a container)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return "mounting a tmpfs needs root and mount(8)"
    path.mkdir(parents=True, exist_ok=True)
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                       text=True)
    return None if p.returncode == 0 else f"mount -t tmpfs failed: {p.stderr.strip()}"


def test_a_full_disk_is_one_line_on_a_real_small_filesystem(worldpm_cli, tmp_path):
    """The real thing where a tmpfs can be mounted (root): artifacts_dir on a 150 KB filesystem, `worldpm run`
    through the console script and Prefect. download fits, normalise does not."""
    store = tmp_path / "store"
    why = _mount_tmpfs(store, "150k")
    if why is not None:
        pytest.skip(f"{why}; test_a_full_disk_is_one_line_with_the_log_kept_injected covers the same path")
    try:
        write_config(tmp_path / "pipeline.yaml", {"artifacts_dir": "store"})
        p = worldpm_cli("run", "--until", "clean", check=False)
        logs = sorted((tmp_path / ".worldpm" / "logs").glob("run-*.log"))
        assert p.returncode == 1 and "Traceback" not in p.stderr and len(logs) == 1
        line = p.stderr.strip().splitlines()[-1]
        assert line.startswith(f"worldpm: normalise: the disk is full (no space left on the device of {store}, ")
        assert line.endswith("then run again: the stages before normalise are cached (full log: "
                             f"{logs[0]}; `worldpm run --verbose` prints it here)")
        assert "No space left on device" in logs[0].read_text() and "Traceback" in logs[0].read_text()
        assert len([d for d in (store / "download").iterdir() if (d / "manifest.json").is_file()]) == 1
        assert not [d for d in (store / "normalise").iterdir() if d.name.startswith(".tmp-")
                    or (d / "manifest.json").exists()]
        loud = worldpm_cli("run", "--until", "clean", "--verbose", check=False)
        assert loud.returncode == 1 and "Traceback" in loud.stderr
        assert loud.stderr.strip().splitlines()[-1].startswith("worldpm: normalise: the disk is full")
    finally:
        subprocess.run(["umount", str(store)], check=False)


# ---- 9, 14, 15: the Prefect server a run uses, losing it, and a run whose process died ---------------------------
def _env_without_api(tmp_path: Path, port: int) -> dict:
    """A `worldpm run` that picks its own server: no PREFECT_API_URL, a client PREFECT_HOME of its own, the
    background server's preferred port."""
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "WORLDPM_BACKGROUND_SERVER")}
    env.update(WORLDPM_PREFECT_PORT=str(port), PREFECT_HOME=str(tmp_path / "client-home"))
    return env


def _wait_for(predicate, proc: subprocess.Popen, what: str, limit: float = 600):
    """Poll until predicate() is truthy (a hang guard, not a timing assertion): its value."""
    import time

    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc.poll() is not None:
            pytest.fail(f"the run ended before {what}: {proc.returncode}\n{proc.stderr.read()}")
        time.sleep(0.05)
    pytest.fail(f"no {what} in {limit:.0f}s")


def _running_flow_run(api: str | None, config: Path):
    """The id of the flow run of `config` that the server at `api` shows Running, or None (None too while there is no
    server to ask)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if api is None:
        return None
    try:
        with temporary_settings(updates={PREFECT_API_URL: api}), get_client(sync_client=True) as c:
            runs = c.read_flow_runs(flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=["RUNNING"]))))
    except Exception:  # not up yet
        return None
    return next((str(r.id) for r in runs if r.parameters.get("config_path") == str(config)), None)


def _stop_servers_of(project: Path, env: dict) -> None:
    """After a test that starts background servers in `project`: `worldpm server stop`, and any Prefect server whose
    PREFECT_HOME is the project's that the record no longer names (started, then replaced)."""
    import signal as sig

    subprocess.run([WORLDPM, "server", "stop"], cwd=project, env=env, capture_output=True, timeout=120)
    home = f"PREFECT_HOME={project / '.worldpm' / 'prefect'}".encode()
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        try:
            if b"prefect" in Path(f"/proc/{pid}/cmdline").read_bytes() and \
                    home in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                os.killpg(int(pid), sig.SIGTERM)
        except OSError:
            continue


def _flow_run(api: str, run_id: str):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api}), get_client(sync_client=True) as c:
        return c.read_flow_run(run_id)


def test_a_run_does_not_adopt_another_folders_server_and_says_which_it_uses(prefect_api_url, tmp_path):
    """Without PREFECT_API_URL, a run used any server answering on 127.0.0.1:4200, another folder's too (its runs
    in that folder's database; the run stalled when that server went). Here the session's server, started with
    another PREFECT_HOME, answers on the preferred port: the run says so, starts this folder's own, says its URL
    and PREFECT_HOME, and runs there."""
    from flows import server

    port = int(prefect_api_url.rsplit(":", 1)[1].split("/")[0])
    write_config(tmp_path / "pipeline.yaml", {"artifacts_dir": "store"})
    env = _env_without_api(tmp_path, port)
    try:
        p = subprocess.run([WORLDPM, "run", "--until", "download"], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=600)
        rec = server.read_record(tmp_path / ".worldpm" / "prefect")
        assert p.returncode == 0 and rec is not None, p.stderr
        assert not rec.url.startswith(f"http://127.0.0.1:{port}/")
        lines = p.stderr.splitlines()
        assert (f"worldpm: a Prefect server answers on http://127.0.0.1:{port}, but not this folder's (it keeps its "
                f"runs in its own PREFECT_HOME, and goes when its owner stops it): this run starts this folder's own "
                f"on port {rec.url.split(':')[2].split('/')[0]}; to use that one, set PREFECT_API_URL="
                f"http://127.0.0.1:{port}/api") in lines
        assert f"PREFECT_HOME {tmp_path / '.worldpm' / 'prefect'}]" in p.stderr
        assert f"; run {rec.ui}/runs/flow-run/" in p.stdout  # the run is in this folder's server (summary line)
    finally:
        _stop_servers_of(tmp_path, env)


def test_a_lost_prefect_server_ends_the_run_in_one_line_and_the_next_run_marks_it_crashed(tmp_path):
    """The background server SIGKILLed during a run: Prefect's client retried for 4-5 minutes, printing httpx
    tracebacks and "Error logging to API", and never a worldpm line. Now the stage in progress finishes and is
    committed, no stage starts after it, and the run ends with one line naming the server, what finished and what
    to do, plus its log file. The flow run it leaves Running is marked Crashed by the next run (case 14)."""
    write_config(tmp_path / "pipeline.yaml", {"artifacts_dir": "store"})
    env = _env_without_api(tmp_path, _closed_port())
    env["WORLDPM_API_WATCH_S"] = "1"
    notes = tmp_path / ".worldpm" / "runs"
    try:
        _a_lost_server_and_the_next_run(tmp_path, env, notes)
    finally:
        _stop_servers_of(tmp_path, env)


def _a_lost_server_and_the_next_run(tmp_path: Path, env: dict, notes: Path) -> None:
    import signal as sig

    from flows import server
    from worldpm.store import ArtifactStore

    proc = subprocess.Popen([WORLDPM, "run", "--until", "tokenize"], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        home = tmp_path / ".worldpm" / "prefect"
        run_id = _wait_for(lambda: _running_flow_run(getattr(server.read_record(home), "url", None),
                                                     tmp_path / "pipeline.yaml"), proc, "running flow run")
        rec = server.read_record(home)
        os.killpg(rec.pid, sig.SIGKILL)  # the server, mid-run
        out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    logs = sorted((tmp_path / ".worldpm" / "logs").glob("run-*.log"))
    assert proc.returncode == 1 and out == "" and len(logs) == 1
    assert "Traceback" not in err and "Error logging to API" not in err and "httpx" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"worldpm: lost the background Prefect server at {rec.url} during ")
    assert last.endswith("; run again (`worldpm run` starts a new background server; `worldpm server status` says "
                         "what runs): what finished is a cache hit (full log: "
                         f"{logs[0]}; `worldpm run --verbose` prints it here)")
    kept = last.split("(it stopped answering: stopped or killed?): ")[1].split("; run again")[0]
    finished = [] if kept == "no stage finished" else kept.removesuffix(" finished and cached").split(", ")
    store = ArtifactStore(tmp_path / "store")
    for stage in ("download", "normalise", "clean", "shard", "tokenize"):  # committed and whole, or not there
        folders = [d for d in (store.root / stage).glob("*") if d.is_dir()] if (store.root / stage).is_dir() else []
        assert not [d for d in folders if d.name.startswith(".tmp-")]
        committed = [d for d in folders if not d.name.startswith(".")]
        assert len(committed) == (1 if stage in finished else 0), (stage, finished)
        for d in committed:
            assert store.check(stage, d.name)[1] is None
    again = subprocess.run([WORLDPM, "run", "--until", "download"], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=600)
    rec2 = server.read_record(tmp_path / ".worldpm" / "prefect")
    assert again.returncode == 0, again.stderr
    state = _flow_run(rec2.url, run_id).state
    assert state.type.value == "CRASHED" and state.message.startswith(
        f"the worldpm process that ran it (pid {proc.pid} on ")
    assert f"its process (pid {proc.pid}) died without ending it; marked Crashed" in again.stderr
    assert not notes.exists() or not list(notes.glob("*.json"))


def test_a_killed_runs_flow_run_is_marked_crashed_by_the_next_run(prefect_api_url, worldpm_cli, tmp_path):
    """`worldpm run` SIGKILLed mid-run left its flow run "Running" on the server forever. The next run in the same
    folder marks it Crashed, naming the process that died."""
    import signal as sig

    write_config(tmp_path / "pipeline.yaml", {"artifacts_dir": "store"})
    notes = tmp_path / ".worldpm" / "runs"
    env = dict(os.environ, PREFECT_API_URL=prefect_api_url)
    proc = subprocess.Popen([WORLDPM, "run", "--until", "tokenize"], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        run_id = _wait_for(lambda: _running_flow_run(prefect_api_url, tmp_path / "pipeline.yaml"), proc,
                           "running flow run")
        proc.send_signal(sig.SIGKILL)
        proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert _flow_run(prefect_api_url, run_id).state.type.value == "RUNNING"  # what it stayed, for good
    import socket
    import time

    left = list(notes.glob("*.json"))  # the note the killed run left
    started = json.loads(left[0].read_text())["started"] if left else 0
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started))
    p = worldpm_cli("run", "--until", "download")
    state = _flow_run(prefect_api_url, run_id).state
    assert state.type.value == "CRASHED", state
    assert state.message == (
        f"the worldpm process that ran it (pid {proc.pid} on {socket.gethostname()}, started {started}) died "
        "without ending it (killed?); marked Crashed by the next run in this folder")
    assert f"its process (pid {proc.pid}) died without ending it; marked Crashed" in p.stderr
    assert not list(notes.glob("*.json"))


# ---- 12, 19, and 8 in training: the trainer's failures are one line; its stderr is detail ------------------------
@pytest.mark.launch
def test_a_sigkilled_trainer_is_said_killed_with_no_unrelated_cause(tokenized):
    """The trainer SIGKILLed (here by itself, after step 1, through a test callback): the line said "killed by
    SIGKILL" and then, as its "cause", whatever its stderr said last (a transformers load report line, or the
    launcher's bare "RuntimeError:"). A killed process writes no error: the line says it was killed, and where the
    log is."""
    from support import LOG, tiny_cfg, train_inputs
    from worldpm.errors import StageError

    store, ref, _ = tokenized
    with pytest.raises(StageError) as e:
        PIPELINE.execute("train", tiny_cfg("train.callbacks=[support:SigkillAfter1]"), train_inputs(store, ref),
                         store, log=LOG)
    msg = str(e.value)
    log = msg.split("(full log: ")[1].rstrip(")")
    assert msg == ("train: the training program was killed by SIGKILL (the OOM killer? lower "
                   f"train.max_tokens_per_batch or train.batch_size) (full log: {log})")
    assert Path(log).is_file()


@pytest.mark.launch
def test_a_full_disk_in_training_is_the_disk_full_line_injected(tokenized):
    """Always runs: the trainer gets the kernel's ENOSPC in step 1 (a write to /dev/full, as a checkpoint on a full
    disk gets it); the stage's line is the full-disk line, naming the store's device, not the trainer's stderr."""
    from support import LOG, tiny_cfg, train_inputs
    from worldpm.errors import DiskFull

    store, ref, _ = tokenized
    with pytest.raises(DiskFull) as e:
        PIPELINE.execute("train", tiny_cfg("train.callbacks=[support:DiskFullAt1]"), train_inputs(store, ref),
                         store, log=LOG)
    assert str(e.value).startswith(f"train: the disk is full (no space left on the device of {store.root}, ")
    assert "\n" not in str(e.value) and not list((store.root / "train").glob(".tmp-*"))


def _trainer_project(staged: Path, tmp_path: Path) -> Path:
    """The staged demo project (download .. tokenize done) in tmp_path/project."""
    dst = tmp_path / "project"
    shutil.copytree(staged, dst)
    return dst


def test_a_trainer_failure_is_its_one_line_and_its_stderr_only_with_verbose(staged, tmp_path, worldpm_cli):
    """`train.max_tokens_per_batch=32` (below the longest pair): the right final line came after up to 25 lines of
    trainer stderr, accelerate's CalledProcessError traceback among them. Now the terminal has the one line; the
    stderr lines are in the run's log file, and on the terminal with --verbose."""
    project = _trainer_project(staged, tmp_path)
    p = worldpm_cli("run", "--until", "train", "--set", "train.max_tokens_per_batch=32", cwd=project, check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr and "trainer stderr:" not in p.stderr, p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("worldpm: train: the training program exited with 3: train.max_tokens_per_batch 32 is "
                           "below the 294 tokens of the longest pair (chosen + rejected): raise it to at least 294 "
                           "or lower tokenize.max_length (full log: ")
    assert last.endswith("/launch/stderr.log)")
    logs = sorted((project / ".worldpm" / "logs").glob("run-*.log"))
    assert "trainer stderr: " in logs[-1].read_text()
    loud = worldpm_cli("run", "--until", "train", "--set", "train.max_tokens_per_batch=32", "--verbose",
                       cwd=project, check=False)
    assert loud.returncode == 1 and "trainer stderr: " in loud.stderr
    assert loud.stderr.strip().splitlines()[-1] == last


@pytest.mark.slow
def test_a_full_disk_in_training_is_one_line_on_a_real_small_filesystem(staged, tmp_path, worldpm_cli):
    """Where a tmpfs can be mounted (root): the artifacts on 20 MB, the stages before train copied in (1.3 MB): the
    model (~90 MB) does not fit. The terminal has the full-disk line, not the trainer's stderr."""
    project = _trainer_project(staged, tmp_path)
    kept = tmp_path / "store-before"
    shutil.move(project / "artifacts", kept)
    why = _mount_tmpfs(project / "artifacts", "20m")
    if why is not None:
        pytest.skip(f"{why}; test_a_full_disk_in_training_is_the_disk_full_line_injected covers the same path")
    try:
        shutil.copytree(kept, project / "artifacts", dirs_exist_ok=True)
        # one step of 2 pairs, no evaluation on the way: what fills the disk is saving the model
        p = worldpm_cli("run", "--until", "train", "--set", "train.max_steps=1", "--set", "train.batch_size=2",
                        "--set", "train.eval_at.log_points=null", "--set", "train.eval_max_pairs=8", cwd=project,
                        check=False)
        assert p.returncode == 1 and "Traceback" not in p.stderr and "trainer stderr:" not in p.stderr, p.stderr
        last = p.stderr.strip().splitlines()[-1]
        assert last.startswith(f"worldpm: train: the disk is full (no space left on the device of "
                               f"{project / 'artifacts'}, ")
        assert "the stages before train are cached (full log: " in last
        assert not list((project / "artifacts" / "train").glob(".tmp-*"))
    finally:
        subprocess.run(["umount", str(project / "artifacts")], check=False)
