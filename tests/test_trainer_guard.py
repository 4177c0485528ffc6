"""No orphan trainers (issue 12 case 5), with real processes: a SIGKILL of `worldpm run`'s process group takes
`accelerate launch` and the trainer with it (they run in a session of their own, out of that group); a second
trainer never starts on a work folder that one is using."""
from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tasks import PIPELINE
from worldpm.config import load_config
from worldpm.status import pipeline_status
from worldpm.store import ArtifactStore

LOG = logging.getLogger("test")
HANG_GUARD = 300  # seconds: a bound for a process to start, never a performance threshold


def procs_with(needle: str) -> list[int]:
    """Live processes whose command line contains `needle`."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = next((ln for ln in (d / "status").read_text().splitlines() if ln.startswith("State:")), "")
        except OSError:
            continue
        if needle in cmd and "zombie" not in state:
            out.append(int(d.name))
    return out


def wait_for(what: str, check, proc: subprocess.Popen | None = None, log: Path | None = None,
             timeout: float = HANG_GUARD):
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"exited ({proc.returncode}) before {what}:\n"
                                 f"{log.read_text()[-4000:] if log else ''}")
        assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f}s"
        time.sleep(0.2)


def kill(pids) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_the_launcher_runs_with_a_parent_death_signal():
    """The shim execs the command with PR_SET_PDEATHSIG set (/proc shows no such flag, so the child reports it)."""
    from worldpm.modeling.trainer import guard

    probe = ("import ctypes, signal; v = ctypes.c_int(); ctypes.CDLL(None).prctl(2, ctypes.byref(v), 0, 0, 0); "
             "print(v.value)")
    out = subprocess.run(guard.parent_death_command([sys.executable, "-c", probe]), capture_output=True, text=True,
                         check=True).stdout
    assert int(out) == signal.SIGKILL


@pytest.mark.slow
@pytest.mark.launch
def test_sigkill_of_the_run_group_takes_the_trainer_with_it(prefect_api_url, se_paired, tmp_path):
    coffee = se_paired / "reward" / "coffee.stackexchange.com-00000-of-00001.parquet"
    cfg_path = tmp_path / "pipeline.yaml"
    cfg_path.write_text(yaml.safe_dump({
        "sources": [{"kind": "local", "path": str(coffee)}],
        "tokenize": {"max_length": 64, "num_proc": 1},
        # far more steps than the test lets it run: it trains until killed. And silently: a trainer that prints
        # into the dead run's pipe dies of SIGPIPE at its next progress line, which hides an orphan for a while
        "train": {"max_steps": 100000, "batch_size": 4, "log_every": 100000, "checkpoint_every": 100000},
    }))
    cfg = load_config(cfg_path)
    store = ArtifactStore(cfg.artifacts_dir)
    refs: dict = {}
    for name in PIPELINE.ancestors("train"):  # the data stages, in this process
        refs[name] = PIPELINE.execute(name, cfg, {u: refs[u] for u in PIPELINE[name].upstream}, store, log=LOG).ref
    train_key = next(r["key"] for r in pipeline_status(PIPELINE, cfg) if r["stage"] == "train")
    work = store.root / "train" / f".work-{train_key}"
    args_json = str(work / "launch" / "args.json")

    exe = shutil.which("worldpm") or str(Path(sys.executable).parent / "worldpm")
    log = tmp_path / "run.log"
    env = dict(os.environ, PREFECT_API_URL=prefect_api_url)
    with open(log, "w") as fh:  # as a shell starts a job: its own process group
        run = subprocess.Popen([exe, "run", "--config", str(cfg_path), "--only", "train"], env=env, cwd=tmp_path,
                               stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # the trainer is training (its "training: N pairs, ..." line reached the run's log)
        wait_for("the trainer to start training", lambda: "training: " in log.read_text(), run, log)
        launched = procs_with(args_json)  # `accelerate launch` and the trainer (both name the args file)
        assert len(launched) >= 2, launched
        assert all(os.getsid(p) != os.getsid(run.pid) for p in launched)  # out of the run's session and group
        os.killpg(run.pid, signal.SIGKILL)
        run.wait()
        # they die within a second; without the guards they train on for hours (a bound, not a measurement)
        wait_for("the launcher and the trainer to be gone", lambda: not procs_with(args_json), timeout=30)
    finally:
        kill(procs_with(args_json))
        try:
            os.killpg(run.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    # one trainer a work folder: a second one on the folder a first one trains in refuses at once
    lock = work / "trainer.lock"
    cmd = [sys.executable, "-m", "worldpm.modeling.trainer.recipe", "--args-json", args_json]
    first_log = tmp_path / "first.log"
    with open(first_log, "w") as fh:
        first = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for("the first trainer to hold its work folder",
                 lambda: lock.is_file() and lock.read_text().startswith(f"pid {first.pid} "), first, first_log)
        second = subprocess.run(cmd, capture_output=True, text=True, timeout=HANG_GUARD)
        assert second.returncode != 0
        last = second.stderr.strip().splitlines()[-1]
        assert last.startswith(f"worldpm.modeling.trainer.guard.WorkFolderInUseError: another trainer (pid "
                               f"{first.pid} on "), second.stderr[-2000:]
        assert str(work) in last
        assert first.poll() is None  # the first one trains on
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()


def test_a_trainer_whose_parent_dies_stops(tmp_path):
    """die_with_parent in a child whose parent is killed: the child (a stand-in for the trainer) is gone too."""
    script = ("import time; from worldpm.modeling.trainer import guard; guard.die_with_parent(); "
              "print('ready', flush=True); time.sleep(600)")
    parent_code = ("import subprocess, sys; p = subprocess.Popen([sys.executable, '-c', sys.argv[1]]); "
                   "print(p.pid, flush=True); p.wait()")
    parent = subprocess.Popen([sys.executable, "-c", parent_code, script], stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    child = int(parent.stdout.readline())
    try:
        assert parent.stdout.readline().strip() == "ready"  # the child's line: it guards itself now
        parent.kill()
        parent.wait()
        wait_for("the child to stop with its parent", lambda: not _alive(child), timeout=30)
    finally:
        kill([child])


def _alive(pid: int) -> bool:
    try:
        state = next(ln for ln in Path(f"/proc/{pid}/status").read_text().splitlines() if ln.startswith("State:"))
    except (OSError, StopIteration):
        return False
    return "zombie" not in state
