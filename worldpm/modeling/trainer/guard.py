"""A trainer never outlives the run that started it, and never shares a work folder with another trainer.

The train stage starts `accelerate launch` in a session of its own (so a timeout or Ctrl-C can kill the whole
group). The flip side: a SIGKILL of `worldpm run`'s process group, which runs no cleanup, used to leave the
launcher and the trainer training on under PID 1, writing checkpoints into the work folder (and holding a GPU),
while a rerun put a second trainer on the same folder. Three guards:

* ``parent_death_command(cmd)``: the stage runs the launcher through this module's ``main``, which asks the kernel
  for SIGKILL when its parent dies (prctl PR_SET_PDEATHSIG; the setting survives exec) and then execs the launcher.
  (Popen's preexec_fn could do the same in the child, but is not safe in a process with threads.)
* ``die_with_parent()``: the trainer (the launcher's child) asks the same for itself, and a watchdog thread polls
  its parent id each second: where there is no prctl (not Linux), or the parent died before the request, a trainer
  whose parent is gone kills itself.
* ``hold_work_folder(work)``: the trainer of rank 0 holds an exclusive flock on ``<work>/trainer.lock`` for its
  whole life (the kernel drops it when the process dies, however it dies). A second trainer on that folder fails
  at once with WorkFolderInUseError naming the first one.

The trainer calls ``guard_trainer(work)`` (both) first thing.
"""
from __future__ import annotations

import ctypes
import fcntl
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import IO

PR_SET_PDEATHSIG = 1
LOCK_NAME = "trainer.lock"
_held: IO[str] | None = None  # the open lock file: kept for the life of the process


class WorkFolderInUseError(RuntimeError):
    """Another trainer holds the work folder (its checkpoints would be written by two processes)."""


def set_parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send `sig` to this process when its parent (the thread that started it) ends. False
    where the system has no prctl."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def parent_death_command(cmd: list[str]) -> list[str]:
    """`cmd`, started so that it is killed when the process that starts it dies (see ``main``)."""
    return [sys.executable, "-m", __name__, "--parent", str(os.getpid()), "--", *cmd]


def die_with_parent(poll_s: float = 1.0) -> None:
    """This process gets SIGKILL when its parent dies: prctl where there is one, and a watchdog thread that polls
    the parent id either way."""
    parent = os.getppid()
    set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the request took effect
        os.kill(os.getpid(), signal.SIGKILL)

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            if os.getppid() != parent:
                print(f"worldpm trainer: its parent (pid {parent}) is gone; stopping", file=sys.stderr, flush=True)
                os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def hold_work_folder(work: Path) -> None:
    """An exclusive lock on <work>/trainer.lock for the life of this process (rank 0 only: the ranks of one run
    share the folder); WorkFolderInUseError if another trainer holds it."""
    global _held
    if os.environ.get("RANK", "0") != "0":
        return
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    fh = open(work / LOCK_NAME, "a+")
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "pid unknown"
        fh.close()
        raise WorkFolderInUseError(
            f"another trainer ({holder}) is training in {work}; two trainers must not write one checkpoint folder: "
            "wait for it to end, or stop it") from None
    fh.seek(0)
    fh.truncate()
    fh.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    fh.flush()
    _held = fh


def guard_trainer(work: Path) -> None:
    """What the trainer program calls first: die with the launcher, and hold the work folder."""
    die_with_parent()
    hold_work_folder(work)


def main(argv: list[str] | None = None) -> int:
    """`python -m worldpm.modeling.trainer.guard --parent PID -- CMD ...`: exec CMD with the parent-death signal
    set (if PID, the process that started this one, is already gone, CMD never starts)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 4 or argv[0] != "--parent" or argv[2] != "--":
        print("usage: python -m worldpm.modeling.trainer.guard --parent PID -- CMD ...", file=sys.stderr)
        return 2
    parent, cmd = int(argv[1]), argv[3:]
    set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != parent:
        print(f"worldpm: the process that started {cmd[0]} (pid {parent}) is gone; not starting it", file=sys.stderr)
        return 1
    os.execvp(cmd[0], cmd)
    return 127  # not reached


if __name__ == "__main__":
    sys.exit(main())
