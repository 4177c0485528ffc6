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
