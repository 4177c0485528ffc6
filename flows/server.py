"""The Prefect server that `worldpm run` uses when the user names none: started once in the background, reused.

Without a server, every Prefect flow run starts a temporary one (15-30 s on a small machine) and stops it at the
end. `worldpm run` avoids that: `api_for_run()` picks, in this order,

1. the server the user set: PREFECT_API_URL (environment, or the active Prefect profile) is used exactly as set;
   nothing is started (one /health request, to say it is used);
2. this project's background server, when it answers: its record is ``.worldpm/prefect/server.json`` under the
   project (the folder `worldpm` runs in);
3. a new background server: ``prefect server start --host 127.0.0.1 --port PORT`` (PORT = $WORLDPM_PREFECT_PORT,
   default 4200; another free port when PORT is taken), in its own session (it outlives this process), with its own
   PREFECT_HOME (``.worldpm/prefect``: the SQLite database, ``server.log``), recorded with its process id. Its URL
   (the UI) and how to stop it are printed. `worldpm server stop` stops it (SIGTERM to its process group, by the
   recorded id); `worldpm server status` says what runs. A server that already answers on PORT without being this
   folder's (another project's, `prefect server start`, `worldpm server`) is not adopted: its runs would go to
   another database, and the run would stall when its owner stops it. One line says so, and how to use it
   (PREFECT_API_URL);
4. if it cannot start (it exits, or does not answer in $WORLDPM_SERVER_STARTUP_TIMEOUT s, default 180): one line
   saying so, and the run uses the temporary server as before.

WORLDPM_BACKGROUND_SERVER=0 skips 2-3 (the temporary server, as plain Prefect does). Whichever it is, the run says
in one line which server it uses and where that server keeps its runs (PREFECT_HOME): on the terminal when it starts
one, finds another folder's or cannot start one; in the run's log file (and with --verbose) when it reuses one,
whose run page the run's summary line names. Only loopback is ever bound;
the server has no authentication (docs/deploy.md says how to expose one safely).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from worldpm.procs import free_port, healthy, port_free, stop_group

HOST = "127.0.0.1"
DEFAULT_PORT = 4200
STATE_DIR = Path(".worldpm") / "prefect"
RECORD = "server.json"


def _say(msg: str) -> None:
    print(f"worldpm: {msg}", file=sys.stderr, flush=True)


def _note(msg: str) -> None:
    """A line every run would repeat (the server it reuses): into the run's log file, on the terminal with
    `--verbose`; the run's summary line names its page on that server."""
    logging.getLogger("worldpm.server").info("worldpm: %s", msg, extra={"worldpm_detail": True})


def project_home(project: Path | None = None) -> Path:
    """PREFECT_HOME of the project's background server (and where its record and log live)."""
    return (project or Path.cwd()).resolve() / STATE_DIR


def preferred_port() -> int:
    raw = os.environ.get("WORLDPM_PREFECT_PORT", str(DEFAULT_PORT))
    try:
        return int(raw)
    except ValueError:
        raise SystemExit(f"worldpm: WORLDPM_PREFECT_PORT={raw!r} is not a port number") from None


@dataclass
class Record:
    """What is written to server.json when a background server starts."""

    pid: int
    url: str
    home: str
    log: str
    started_at: float

    @property
    def ui(self) -> str:
        return self.url.removesuffix("/api")


def read_record(home: Path) -> Record | None:
    try:
        return Record(**json.loads((home / RECORD).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _is_our_server(pid: int) -> bool:
    """The recorded process is alive and still a `prefect server` (a recycled pid is not ours to signal)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return True  # no /proc (macOS): the pid is alive, trust the record
    return b"prefect" in b" ".join(cmd) and b"server" in cmd


@contextlib.contextmanager
def _locked(home: Path) -> Iterator[None]:
    """One process at a time checks and starts the project's server (two runs at once start one server)."""
    home.mkdir(parents=True, exist_ok=True)
    with open(home / "server.lock", "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def user_api_url() -> str | None:
    """PREFECT_API_URL as Prefect sees it: the environment, else the active profile (imports prefect.settings)."""
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    from prefect.settings import get_current_settings

    return get_current_settings().api.url or None


def server_command(port: int) -> list[str]:
    return [sys.executable, "-m", "prefect", "server", "start", "--host", HOST, "--port", str(port)]


def start_background(home: Path, port: int, *, command: Callable[[int], list[str]] = server_command,
                     timeout: float | None = None) -> Record | None:
    """Start a detached Prefect server on loopback with PREFECT_HOME=home; its Record once /api/health answers,
    None (and one line why) when it exits first or does not answer in time."""
    if timeout is None:
        timeout = float(os.environ.get("WORLDPM_SERVER_STARTUP_TIMEOUT", "180"))
    home.mkdir(parents=True, exist_ok=True)
    log_path = home / "server.log"
    env = dict(os.environ, PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_SERVER_API_HOST=HOST, PREFECT_SERVER_API_PORT=str(port))
    env.pop("PREFECT_API_URL", None)
    url = f"http://{HOST}:{port}/api"
    _say(f"starting a background Prefect server on {url} (once: later runs reuse it; 15-30 s on a small "
         f"machine) ...")
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(command(port), env=env, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)
    deadline = time.monotonic() + timeout
    why = None
    while not healthy(url, timeout=1.0):
        if proc.poll() is not None:
            why = f"it exited with code {proc.returncode}"
            break
        if time.monotonic() > deadline:
            why = f"it did not answer {url}/health in {timeout:.0f}s"
            stop_group(proc.pid)
            break
        time.sleep(0.25)
    if why is not None:
        _say(f"could not start a background Prefect server ({why}; log: {log_path}): this run uses a temporary "
             "one")
        return None
    rec = Record(pid=proc.pid, url=url, home=str(home), log=str(log_path), started_at=time.time())
    tmp = home / (RECORD + ".tmp")
    tmp.write_text(json.dumps(rec.__dict__, indent=2))
    os.replace(tmp, home / RECORD)
    _say(f"Prefect server (UI): {rec.ui}  [background, pid {rec.pid}, PREFECT_HOME {home}]; stop it with "
         "`worldpm server stop`")
    return rec


def api_for_run(project: Path | None = None) -> str | None:
    """The Prefect API URL this run should use (see the module doc); None: the user's own setting or Prefect's
    temporary server. Whichever it is, one line says which server and which PREFECT_HOME (the log file's, for a
    server reused)."""
    user = user_api_url()
    if user:  # exactly what the user set; said when it answers (else the run's one line says it does not)
        if healthy(user):
            _note(f"Prefect server (UI): {user.removesuffix('/api')}  [PREFECT_API_URL; its runs are in the "
                 "PREFECT_HOME of whoever started it]")
        return None
    if os.environ.get("WORLDPM_BACKGROUND_SERVER", "1").lower() in ("0", "false", "no", "off"):
        _say(f"Prefect: a temporary server for this run only (WORLDPM_BACKGROUND_SERVER=0), PREFECT_HOME "
             f"{_prefect_home()}")
        return None
    home = project_home(project)
    with _locked(home):
        rec = read_record(home)
        if rec is not None:
            if healthy(rec.url):
                _note(f"Prefect server (UI): {rec.ui}  [this folder's background server, pid {rec.pid}, PREFECT_HOME "
                     f"{rec.home}; `worldpm server stop` stops it]")
                return rec.url
            if _is_our_server(rec.pid):  # alive but not answering (starting up, or stuck): ours to replace
                stop_group(rec.pid)
            (home / RECORD).unlink(missing_ok=True)
        port = preferred_port()
        url = f"http://{HOST}:{port}/api"
        if healthy(url):  # not this folder's (no record): another project's, or someone's `prefect server start`
            port = free_port(HOST)
            _say(f"a Prefect server answers on {url.removesuffix('/api')}, but not this folder's (it keeps its runs in "
                 "its own PREFECT_HOME, and goes when its owner stops it): this run starts this folder's own on port "
                 f"{port}; to use that one, set PREFECT_API_URL={url}")
        rec = start_background(home, port if port_free(HOST, port) else free_port(HOST), command=server_command)
        return rec.url if rec else None


def _prefect_home() -> str:
    """The PREFECT_HOME this process's Prefect uses (the temporary server keeps its database there)."""
    from prefect.settings import get_current_settings

    return str(get_current_settings().home)


# ---- `worldpm server status | stop` ---------------------------------------------------------------------------
def status(project: Path | None = None) -> int:
    home = project_home(project)
    env_url = os.environ.get("PREFECT_API_URL")
    if env_url:
        print(f"PREFECT_API_URL={env_url}: `worldpm run` uses that server "
              f"({'answering' if healthy(env_url) else 'NOT answering'})")
    rec = read_record(home)
    if rec is None:
        print(f"no background Prefect server recorded for this project ({home / RECORD}); `worldpm run` starts "
              "one when it needs one")
        return 0
    up = healthy(rec.url)
    alive = _is_our_server(rec.pid)
    state = "running" if up else ("not answering" if alive else "not running (stale record)")
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(rec.started_at))
    print(f"background Prefect server: {state}\n  UI/API  {rec.ui}  ({rec.url})\n  pid     {rec.pid}\n"
          f"  home    {rec.home}\n  log     {rec.log}\n  started {started}"
          + ("\n  stop it with `worldpm server stop`" if alive else ""))
    return 0


def stop(project: Path | None = None) -> int:
    home = project_home(project)
    with _locked(home):
        rec = read_record(home)
        if rec is None:
            print(f"no background Prefect server recorded for this project ({home / RECORD})")
            return 0
        if not _is_our_server(rec.pid):
            (home / RECORD).unlink(missing_ok=True)
            print(f"the background Prefect server (pid {rec.pid}) was not running; removed its record")
            return 0
        gone = stop_group(rec.pid)
        (home / RECORD).unlink(missing_ok=True)
    print(f"stopped the background Prefect server {rec.ui} (pid {rec.pid})"
          + ("" if gone else " (it had to be killed)"))
    return 0
