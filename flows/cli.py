"""The `worldpm` console script: worldpm/cli.py's commands over this project's stages (tasks.PIPELINE), the Prefect
flow (flows/worldpm.py) run against a reused Prefect server (flows/server.py), `sweep` (flows/sweep.py), the
deployment commands `serve` and `server` (flows/deploy.py), and `train-node` (worldpm/train_node.py:
another machine's part in a training run)."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from flows import deploy
from tasks import PIPELINE
from worldpm import cli, train_node
from worldpm.errors import EXIT_STAGE, NeedsTheLog, StageError


def run_flow(**params) -> list[dict]:
    """The flow `worldpm`, imported when a run starts (Prefect takes seconds to import; `status` does not need it),
    against the user's PREFECT_API_URL or the project's background server (flows/server.py), started once."""
    from flows.worldpm import worldpm

    return with_prefect(worldpm, **params)


def with_prefect(flow_fn, **params):
    """A flow (`worldpm`, `worldpm_sweep`) run against the user's PREFECT_API_URL or the project's background
    server; an unreachable API is one line. A watcher (`ApiWatch`) ends the run in one line if that server goes away
    during it; a note (`RunNote`) lets the next run mark this one's flow run Crashed if this process dies before
    Prefect has reported its end."""
    from flows import server

    url = server.api_for_run()
    from prefect.flow_engine import run_flow as run_flow_engine
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    api = url or (get_current_settings().api.url if server.user_api_url() else None)
    watch = ApiWatch(api, ours=url is not None) if api else None
    note = None
    try:
        with temporary_settings(updates={PREFECT_API_URL: url}) if url else contextlib.nullcontext():
            if api is None:  # Prefect's temporary server: it goes with this process, and its runs with it
                return flow_fn(**params)
            if not server.healthy(api):
                raise _unreachable(url)
            RunNote.end_dead_ones(api)
            fr = _create_flow_run(flow_fn, params)  # its id is in the note before the run starts
            note = RunNote.write(api, str(fr.id))
            cli.run_page = _run_page(fr)  # the summary line names it (Prefect's own "View at" is --verbose's)
            if watch is not None:
                watch.start()
            return run_flow_engine(flow_fn, flow_run=fr, parameters=params)
    except RuntimeError as e:  # Prefect's own, with a traceback: the API is down or the URL is wrong
        if not str(e).startswith("Failed to reach API"):
            raise
        raise _unreachable(url) from None
    finally:
        if watch is not None:
            watch.stop()
        if note is not None and server.healthy(api):  # the flow call has returned or raised, and the server is
            note.remove()  # there: Prefect has reported the final state (else the next run looks at it)


def _run_page(fr) -> str | None:
    """The flow run's page in the Prefect UI of the current settings (None if there is none to say)."""
    try:
        from prefect.utilities.urls import url_for

        return url_for("flow-run", obj_id=fr.id)
    except Exception:  # a UI URL Prefect cannot form: the summary line goes without it
        return None


class ApiLost(NeedsTheLog):
    """The run's Prefect server stopped answering during the run."""


def lost_message(url: str, ours: bool, during: str | None = None) -> str:
    """The one line for a run whose Prefect server went away: the server, what finished (engine.activity), what to
    do."""
    from worldpm import engine

    running, done = engine.activity()
    if during is None:
        during = running[0] if running else (f"the run, after {done[-1]}" if done else "the run, before any stage")
    kept = f"{', '.join(dict.fromkeys(done))} finished and cached" if done else "no stage finished"
    where = "the background Prefect server" if ours else "the Prefect server (PREFECT_API_URL)"
    todo = ("run again (`worldpm run` starts a new background server; `worldpm server status` says what runs)"
            if ours else "start it again (`worldpm server` or `prefect server start`) and run again")
    return (f"lost {where} at {url} during {during} (it stopped answering: stopped or killed?): {kept}; {todo}: what "
            "finished is a cache hit")


def _unreachable(url: str | None) -> StageError:
    """The one line for a Prefect API that does not answer: ours (`url`: it answered when the run started, so it is
    gone: stopped, killed) or the user's."""
    from prefect.settings import get_current_settings

    if url is not None:
        return ApiLost(lost_message(url, ours=True))
    return StageError(f"cannot reach the Prefect API at {get_current_settings().api.url} (PREFECT_API_URL): start "
                      "the server (`worldpm server` or `prefect server start`), or unset PREFECT_API_URL to let "
                      "worldpm start one in the background")


def _create_flow_run(flow, params: dict):
    """The flow run of `flow` with these parameters, created (Pending) before it runs, as Prefect's runners do."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.create_flow_run(flow, parameters=flow.serialize_parameters(params))


class RunNote:
    """`.worldpm/runs/<flow run id>.json` while a `worldpm run` of this folder is in progress: its process and the
    API it reports to. Written once its flow run is created and before it runs, removed after Prefect has reported
    its final state, so a process killed in between (SIGKILL, the machine, a lost server) leaves it behind, and the
    next run of this folder ends that flow run: Crashed, naming the process (a killed run's flow run used to stay
    Running on the server for good)."""

    FOLDER = Path(".worldpm") / "runs"

    def __init__(self, path: Path, data: dict):
        self.path, self.data = path, data

    @classmethod
    def write(cls, api: str, flow_run_id: str) -> "RunNote | None":
        data = {"flow_run_id": flow_run_id, "pid": os.getpid(), "host": socket.gethostname(), "api_url": api,
                "started": time.time(), "argv": sys.argv[1:]}
        path = (Path.cwd() / cls.FOLDER / f"{flow_run_id}.json").resolve()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(data))
        except OSError:  # a read-only or full folder: the run goes on without it
            return None
        return cls(path, data)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)

    @classmethod
    def end_dead_ones(cls, api: str) -> list[str]:
        """Flow runs left by this folder's runs whose process died (on this host), still not final on the server
        at `api` (the current settings'): set Crashed. Their notes go once that server has answered for them (a
        note of another server's run waits for it, a week at most). The names of the runs marked."""
        from prefect.client.orchestration import get_client
        from prefect.exceptions import ObjectNotFound
        from prefect.states import Crashed

        host, marked = socket.gethostname(), []
        for path in sorted((Path.cwd() / cls.FOLDER).glob("*.json")):
            try:
                d = json.loads(path.read_text())
                pid, run_id = int(d["pid"]), str(d["flow_run_id"])
            except (OSError, ValueError, KeyError, TypeError):
                path.unlink(missing_ok=True)
                continue
            if d.get("host") != host or pid == os.getpid() or _alive(pid):
                continue  # another machine's, or still going
            stale = time.time() - float(d.get("started") or 0) > 7 * 86400
            try:
                with get_client(sync_client=True) as client:
                    fr = client.read_flow_run(run_id)
                    if fr.state is None or not fr.state.is_final():
                        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(d.get("started", 0)))
                        client.set_flow_run_state(fr.id, Crashed(message=(
                            f"the worldpm process that ran it (pid {pid} on {host}, started {started}) died without "
                            "ending it (killed?); marked Crashed by the next run in this folder")), force=True)
                        print(f"worldpm: flow run {fr.name!r} ({fr.id}): its process (pid {pid}) died without ending "
                              "it; marked Crashed", file=sys.stderr, flush=True)
                        marked.append(fr.name)
            except ObjectNotFound:  # another server's run (kept for when that one is back, a week at most)
                if d.get("api_url") != api and not stale:
                    continue
            except Exception:  # the server is busy or refuses: the note stays for the next run
                continue
            path.unlink(missing_ok=True)
        return marked


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (killed, not yet reaped by its parent) is dead
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[-1][:1] != "Z"
    except OSError:
        return True


class ApiWatch(threading.Thread):
    """Asks the run's Prefect server for /health every `interval` s. When it has not answered `misses` times in a
    row (stopped, killed), Prefect's client would retry each call for minutes and print "Error logging to API" over
    and over; instead the watcher mutes the API log sink, lets the stage that is executing finish (its artifact is
    committed: the artifact store does not need the server), and ends the process with one line that names the
    stage, the server and what to do, plus the run's log file. The flow run left Running on that server is marked
    Crashed by the next run that reaches it (`RunNote`)."""

    def __init__(self, url: str, ours: bool, interval: float | None = None, misses: int | None = None):
        super().__init__(name="worldpm-api-watch", daemon=True)
        self.url, self.ours = url, ours
        self.interval = float(os.environ.get("WORLDPM_API_WATCH_S", "2")) if interval is None else interval
        self.misses = int(os.environ.get("WORLDPM_API_WATCH_MISSES", "3")) if misses is None else misses
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        from flows import server

        missed = 0
        while not self._stop.wait(self.interval):
            missed = 0 if server.healthy(self.url, timeout=self.interval) else missed + 1
            if missed >= self.misses:
                self._lost()
                return

    def _lost(self) -> None:
        import logging

        from prefect.logging.handlers import set_api_log_sink

        from worldpm import engine

        set_api_log_sink(lambda _log: None)  # nothing to send them to: no "Error logging to API" on the terminal
        logging.raiseExceptions = False
        engine.hold_new_stages()  # Prefect 3 starts task runs without the API: the next stage would start anyway
        running, _ = engine.activity()
        during = running[0] if running else None
        if running:
            print(f"worldpm: the Prefect server at {self.url} stopped answering; {', '.join(running)} goes on to its "
                  "end and is kept, then this run stops", file=sys.stderr, flush=True)
        while running and not self._stop.is_set():
            time.sleep(0.5)
            running, _ = engine.activity()
        if self._stop.is_set():  # the run ended on its own meanwhile
            return
        msg = lost_message(self.url, self.ours, during)
        if cli.run_log is not None:
            with contextlib.suppress(OSError), open(cli.run_log, "a") as f:
                f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} ERROR   worldpm: {msg}\n")
        print(f"worldpm: {cli._with_log(msg)}", file=sys.stderr, flush=True)
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        os._exit(EXIT_STAGE)  # Prefect's threads would go on retrying the dead server: end the process here


# ---- `worldpm sweep` ------------------------------------------------------------------------------------------
def _sweep_cmd(args: argparse.Namespace) -> int:
    from flows.sweep import worldpm_sweep
    from worldpm.cli import _config_path, quiet_expected_tracebacks
    from worldpm.config import handing_on, load_config
    from worldpm.errors import ConfigError

    path = _config_path(args.config)
    cfg = load_config(path, args.set or [], args.source or None)  # a typo fails here, before Prefect starts
    if cfg.sweep is None:
        raise ConfigError(f"{path or 'the built-in defaults'}: no `sweep:` section; a sweep needs its grid "
                          "(pipeline.yaml shows one)")
    if not args.verbose:
        quiet_expected_tracebacks()
    with handing_on(cfg):  # the sweep flow, in this process, takes cfg: not validated again
        result = with_prefect(worldpm_sweep, config_path=path, overrides=args.set or [], sources=args.source or None)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        width = max(len(p["label"]) for p in result["points"])
        for p in result["points"]:
            what = ("  ".join(f"{s} {k}" for s, k in p["keys"].items()) + f"  {p['eval_points']} eval points"
                    if p["status"] == "ok" else p["error"])
            print(f"{p['label']:<{width}}  {p['status']:<6}  {what}")
        print(f"sweep report: {result['report']}")
    if result["failed"]:
        print(f"worldpm sweep: {len(result['failed'])} point(s) failed: {', '.join(result['failed'])} (named in the "
              "report; the others finished)", file=sys.stderr)
        return 1
    return 0


def register_sweep(subparsers: Any) -> None:
    """Add `sweep` to the `worldpm` CLI (flows/sweep.py, imported when it runs: Prefect takes seconds to import)."""
    from worldpm.cli import _config_args

    p = subparsers.add_parser(
        "sweep", help="run the config's sweep: grid (each point the DAG with overrides, sharing the cache) and "
                      "write the sweep report",
        description="Run every point of the `sweep:` grid of the config as the DAG with the point's overrides "
                    "(pipeline name <name>-<point>), under Prefect global concurrency limits (one slot per GPU, or "
                    "one for a CPU host: points one at a time), then write the sweep report (eval curves and "
                    "power-law fits per category, alpha by model and set, failed points named) to "
                    "<artifacts_dir>/sweeps/<name>/ and as a Prefect artifact. A failed point does not stop the "
                    "others; the exit status is 1 when any failed. Prefect server: as for `worldpm run`.")
    _config_args(p)
    p.add_argument("--json", action="store_true", help="print the sweep's result (points, keys, report) as JSON")
    p.add_argument("--verbose", "-v", action="store_true", help="print Prefect's tracebacks of a failed stage too")
    p.set_defaults(func=_sweep_cmd)


def main(argv: list[str] | None = None) -> int:
    return cli.main(argv, pipeline=PIPELINE, run_flow=run_flow,
                    commands=(register_sweep, deploy.register, train_node.register))


if __name__ == "__main__":
    sys.exit(main())
