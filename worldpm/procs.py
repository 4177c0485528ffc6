"""Child processes that lead their own process group (the trainer's launcher, a Prefect server, `worldpm serve`):
stopping a whole group, and asking whether a local port is free or a Prefect API healthy. One copy of each, for
the train stage (worldpm/modeling/trainer/launch.py), `worldpm server` (flows/deploy.py) and the background server
(flows/server.py)."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.request


def stop_group(leader: int | subprocess.Popen, grace: float = 30.0) -> bool:
    """SIGTERM the process group that `leader` (a pid or a Popen started with start_new_session=True) leads, wait
    up to `grace` s for the group to go, then SIGKILL whatever is left of it. True if it went within `grace`.

    A Popen leader is reaped (no zombie); a bare pid is reaped when it is our child."""
    pid = leader.pid if isinstance(leader, subprocess.Popen) else int(leader)
    try:
        os.killpg(pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        _reap(leader)
        return True
    deadline = time.monotonic() + grace
    gone = False
    while time.monotonic() < deadline:
        _reap(leader)
        try:
            os.killpg(pid, 0)
        except (ProcessLookupError, PermissionError):
            gone = True
            break
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError, PermissionError):  # what the leader left behind in its group
        os.killpg(pid, signal.SIGKILL)
    if isinstance(leader, subprocess.Popen):
        leader.wait()
    else:
        _reap(leader)
    return gone


def _reap(leader: int | subprocess.Popen) -> None:
    if isinstance(leader, subprocess.Popen):
        leader.poll()
        return
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(int(leader), os.WNOHANG)


def port_free(host: str, port: int) -> bool:
    """Whether `port` can be bound on `host` (SO_REUSEADDR, as uvicorn binds: a socket in TIME_WAIT is no
    conflict)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port the system hands out as free on `host` now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def healthy(url: str, timeout: float = 2.0) -> bool:
    """Whether a Prefect API answers at `url` (…/api): GET /health returns 200."""
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=timeout) as r:
            return r.status == 200
    except (OSError, ValueError):
        return False
