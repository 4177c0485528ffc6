"""The `worldpm` console script: worldpm/cli.py's commands over this project's stages (tasks.PIPELINE), the Prefect
flow (flows/worldpm.py) run against a reused Prefect server (flows/server.py), and the deployment commands `serve`
and `server` (flows/deploy.py)."""
from __future__ import annotations

import contextlib
import os
import sys
import threading
import time

from flows import deploy
from tasks import PIPELINE
from worldpm import cli
from worldpm.errors import EXIT_STAGE, StageError


def run_flow(**params) -> list[dict]:
    """The flow `worldpm`, imported when a run starts (Prefect takes seconds to import; `status` does not need it),
    against the user's PREFECT_API_URL or the project's background server (flows/server.py), started once. A
    watcher (`ApiWatch`) ends the run in one line if that server goes away during it."""
    from flows import server

    url = server.api_for_run()
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    from flows.worldpm import end_flow_run_notes, worldpm

    watched = url or (get_current_settings().api.url if server.user_api_url() else None)
    watch = ApiWatch(watched, ours=url is not None) if watched else None
    try:
        if watch is not None:
            watch.start()
        if url is None:  # the user's own server, or Prefect's temporary one
            return worldpm(**params)
        with temporary_settings(updates={PREFECT_API_URL: url}):
            return worldpm(**params)
    except RuntimeError as e:  # Prefect's own, with a traceback: the API is down or the URL is wrong
        if not str(e).startswith("Failed to reach API"):
            raise
        if url is not None:  # ours, gone during the run (stopped, killed)
            raise StageError(f"cannot reach the background Prefect server at {url} any more (stopped during the "
                             "run?): `worldpm server status` says what runs; the next run starts it again") from None
        raise StageError(f"cannot reach the Prefect API at {get_current_settings().api.url} (PREFECT_API_URL): start "
                         "the server (`worldpm server` or `prefect server start`), or unset PREFECT_API_URL to let "
                         "worldpm start one in the background") from None
    finally:
        if watch is not None:
            watch.stop()
        end_flow_run_notes()  # the flow run's final state is reported (or the flow never started)


class ApiWatch(threading.Thread):
    """Asks the run's Prefect server for /health every `interval` s. When it has not answered `misses` times in a
    row (stopped, killed), Prefect's client would retry each call for minutes and print "Error logging to API" over
    and over; instead the watcher mutes the API log sink, lets the stage that is executing finish (its artifact is
    committed: the artifact store does not need the server), and ends the process with one line that names the
    stage, the server and what to do, plus the run's log file. The flow run left Running on that server is marked
    Crashed by the next run that reaches it (flows/worldpm.py)."""

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
        running, done = engine.activity()
        during = running[0] if running else (f"the run, after {done[-1]}" if done else "the run, before any stage")
        if running:
            print(f"worldpm: the Prefect server at {self.url} stopped answering; {', '.join(running)} goes on to its "
                  "end and is kept, then this run stops", file=sys.stderr, flush=True)
        while running and not self._stop.is_set():
            time.sleep(0.5)
            running, _ = engine.activity()
        if self._stop.is_set():  # the run ended on its own meanwhile
            return
        _, done = engine.activity()
        kept = f"{', '.join(dict.fromkeys(done))} finished and cached" if done else "no stage finished"
        where = ("the background Prefect server" if self.ours else "the Prefect server (PREFECT_API_URL)")
        todo = ("run again (`worldpm run` starts a new background server; `worldpm server status` says what runs)"
                if self.ours else "start it again (`worldpm server` or `prefect server start`) and run again")
        msg = (f"lost {where} at {self.url} during {during} (it stopped answering: stopped or killed?): {kept}; "
               f"{todo}: what finished is a cache hit")
        if cli.run_log is not None:
            with contextlib.suppress(OSError), open(cli.run_log, "a") as f:
                f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} ERROR   worldpm: {msg}\n")
        print(f"worldpm: {cli._with_log(msg)}", file=sys.stderr, flush=True)
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        os._exit(EXIT_STAGE)  # Prefect's threads would go on retrying the dead server: end the process here


def main(argv: list[str] | None = None) -> int:
    return cli.main(argv, pipeline=PIPELINE, run_flow=run_flow, commands=(deploy.register,))


if __name__ == "__main__":
    sys.exit(main())
