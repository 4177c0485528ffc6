"""The `worldpm` commands on bad input: one line and the right exit status (2 usage/config, 1 a stage), nothing
removed by a gc that cannot tell what a config uses, models without a trained head refused. In-process (no Prefect
server: none of these may start a flow)."""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import yaml

from tasks import PIPELINE
from worldpm import cli
from worldpm.store import ArtifactStore

RB = Path(__file__).parent / "fixtures" / "rewardbench_small.jsonl"


def no_flow(**params):
    pytest.fail(f"the flow must not start: {params}")


def worldpm(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv), pipeline=PIPELINE, run_flow=no_flow)
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> str:
    """The error: the last line of stderr, which starts with `worldpm:`; no traceback anywhere."""
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("worldpm: "), err
    return last


def write_config(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# ---- gc: never deletes what it cannot account for (issue 12 case 2) -----------------------------------------------
def _stored_artifacts(root: Path) -> list[Path]:
    """Two committed artifacts (a trained model, its evaluation) that nothing in these configs resolves to."""
    store = ArtifactStore(root)
    out = []
    for stage, key in (("train", "a" * 20), ("evaluate", "b" * 20)):
        tmp = store.new_tmp(stage, key)
        (tmp / "weights.bin").write_bytes(b"days of GPU time")
        out.append(Path(store.commit(stage, key, tmp, {}).path))
    return out


@pytest.mark.parametrize("case", ["hub offline", "missing source file", "missing eval set"])
def test_gc_refuses_when_it_cannot_resolve_what_the_config_uses(tmp_path, capsys, monkeypatch, case):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data: dict = {"artifacts_dir": "store"}
    if case == "hub offline":
        data["sources"] = [{"kind": "hf", "repo_id": "lvwerra/stack-exchange-paired"}]
        why = "cannot reach the Hugging Face hub"
    elif case == "missing source file":
        data["sources"] = [{"kind": "local", "path": "gone.jsonl"}]
        why = "gone.jsonl: no such file"
    else:
        data["evaluate"] = {"eval_sets": [{"name": "rb", "path": "gone.jsonl"}]}
        why = "no such file"
    cfg = write_config(tmp_path / "pipeline.yaml", data)
    kept = _stored_artifacts(tmp_path / "store")
    for dry in ([], ["--dry-run"]):
        code, out, err = worldpm(capsys, "artifacts", "gc", "--config", str(cfg), *dry)
        line = one_line(err)
        assert code == 1 and "cannot tell which artifacts" in line and why in line and "nothing was removed" in line
        assert "remove" not in out
        assert all(p.is_dir() for p in kept)
    # with the cause fixed, the same gc removes what the config does not use
    data.pop("sources", None), data.pop("evaluate", None)
    write_config(cfg, data)
    code, out, _ = worldpm(capsys, "artifacts", "gc", "--config", str(cfg))
    assert code == 0 and not any(p.exists() for p in kept) and "removed 2 folder(s)" in out


# ---- one line, not a traceback (issue 12 case 8, and case 12's --from/--until) -------------------------------------
def test_config_that_is_a_directory_or_not_utf8_is_one_line_exit_2(tmp_path, capsys):
    code, _, err = worldpm(capsys, "run", "--config", str(tmp_path))
    assert code == 2 and one_line(err) == (f"worldpm: config error: {tmp_path} is a directory; --config takes a YAML "
                                           f"file (e.g. {tmp_path / 'pipeline.yaml'})")
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("name: caf\u00e9\n".encode("latin-1"))
    for command in (["run"], ["status"], ["artifacts", "list"]):
        code, _, err = worldpm(capsys, *command, "--config", str(latin1))
        assert code == 2 and f"{latin1}: not UTF-8 text (byte 9" in one_line(err)


def test_from_after_until_is_a_usage_error_before_anything_starts(capsys):
    code, _, err = worldpm(capsys, "run", "--from", "train", "--until", "shard")
    assert code == 2 and one_line(err) == "worldpm: config error: --from train comes after --until shard"


def test_artifacts_show_of_an_unknown_reference(tmp_path, capsys):
    cfg = write_config(tmp_path / "pipeline.yaml", {"artifacts_dir": "store"})
    store = ArtifactStore(tmp_path / "store")
    tmp = store.new_tmp("clean", "c" * 20)
    (tmp / "pairs.parquet").write_bytes(b"x")
    ref = store.commit("clean", "c" * 20, tmp, {"rows_out": 1})
    other = tmp_path / "elsewhere" / "some_tool_output"  # a folder of another tool, with its own manifest.json
    other.mkdir(parents=True)
    (other / "manifest.json").write_text('["not", "ours"]')
    for ref_arg in (f"{tmp_path / 'elsewhere'}/unknown", "/abs/unknown", "clean/0123456789", "nosuchstage/abc", "abc"):
        code, _, err = worldpm(capsys, "artifacts", "show", ref_arg, "--config", str(cfg))
        assert code == 2 and f"no artifact {ref_arg!r}" in one_line(err)
    # an artifact folder given by its path is shown
    for arg in (ref.path, f"clean/{ref.key}", ref.key[:8]):
        code, out, _ = worldpm(capsys, "artifacts", "show", arg, "--config", str(cfg))
        assert code == 0 and json.loads(out)["digest"] == ref.digest


# ---- models: a plain encoder or a pickle is refused (issue 12 cases 7 and 8) ---------------------------------------
def test_evaluate_refuses_a_model_without_a_trained_score_head(capsys):
    """A plain MiniLM encoder loads into AutoModelForSequenceClassification with a freshly random head: transformers
    only prints a MISSING table; `worldpm evaluate` used to report a meaningless accuracy and exit 0."""
    from worldpm.modeling.models import minilm_dir

    plain = minilm_dir()
    for command in ("evaluate", "score"):
        extra = ["--data", str(RB)] if command == "evaluate" else [str(RB)]
        code, out, err = worldpm(capsys, command, "--model", str(plain), *extra)
        line = one_line(err)
        assert code == 1 and out == ""
        assert line == (f"worldpm: {plain} is not a trained reward model: its checkpoint has no classifier.bias, "
                        "classifier.weight, which would be initialised at random; give a model trained as a reward "
                        "model (worldpm's train artifact, or a sequence-classification checkpoint with num_labels=1)")


class _Payload:
    def __reduce__(self):
        return (os.getpid, ())  # harmless, but not a tensor: torch's weights-only unpickler refuses it


def test_a_pickle_checkpoint_is_one_line(tmp_path, capsys):
    from worldpm.modeling.models import minilm_dir

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text((minilm_dir() / "config.json").read_text())
    with open(model / "pytorch_model.bin", "wb") as f:
        pickle.dump({"bert.embeddings.word_embeddings.weight": _Payload()}, f)
    code, _, err = worldpm(capsys, "evaluate", "--model", str(model), "--data", str(RB))
    assert code == 1 and one_line(err) == (
        f"worldpm: cannot load the reward model in {model}: its weights are a pickle that torch refuses to load "
        "weights-only (loading it could run code); give safetensors weights")


def test_an_unreachable_prefect_api_is_one_line(tmp_path):
    """PREFECT_API_URL pointing at no server used to end in Prefect's httpx traceback (~60 lines)."""
    import shutil
    import socket
    import subprocess
    import sys

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = shutil.which("worldpm") or str(Path(sys.executable).parent / "worldpm")
    env = dict(os.environ, PREFECT_API_URL=f"http://127.0.0.1:{port}/api")
    p = subprocess.run([exe, "run", "--until", "download"], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 1 and p.stderr.strip() == (
        f"worldpm: cannot reach the Prefect API at http://127.0.0.1:{port}/api (PREFECT_API_URL): start the server "
        "(`worldpm server` or `prefect server start`), or unset PREFECT_API_URL to run with a temporary one")
