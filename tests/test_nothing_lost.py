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
import os
import shutil
import signal
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
