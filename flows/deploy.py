"""Deployments of the `worldpm` flow, served with Prefect: `worldpm serve` and `worldpm server`.

* ``worldpm/full``  the whole DAG on the cron schedule of pipeline.yaml (``schedule.cron`` in
  ``schedule.timezone``; nightly at 02:00 UTC by default). A nightly run re-resolves an hf source without a
  pinned revision to its current commit (the download stage's key includes it), so an unchanged upstream and
  config make every stage a cache hit and the run ends in seconds, logging "nothing changed".
* ``worldpm/sweep`` the config's ``sweep:`` grid (flows/sweep.py: every point the DAG with overrides, under
  Prefect's global concurrency limits, then the sweep report); run by hand; a deployment run may not change
  ``sweep.*``.
* ``worldpm/clean`` download, normalise and clean (``until="clean"``): rerun the filters after a config change (the
  normalised texts are a cache hit unless ``clean.normalize_markup`` changed).

Both take the config path and ``--set`` style overrides as parameters (a run may pass its own), and allow one
run at a time per deployment (a deployment concurrency limit of 1; an overlapping run waits for its slot, or is
cancelled with ``--on-overlap cancel-new``).

`serve` registers the deployments with the Prefect API (PREFECT_API_URL) and runs their flow runs in
subprocesses of this process, via ``prefect.serve(..., pause_on_shutdown=False)``: stopping it leaves the
schedule active (``flow.serve`` would pause it), so runs due while it is down show as Late and start when it
is back. `server` is a convenience for one machine: `prefect server start` on 127.0.0.1 plus `serve` against it,
both stopped cleanly on Ctrl-C / SIGTERM.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from flows import policy
from worldpm.procs import healthy, port_free, stop_group

FLOW_NAME = "worldpm"
DEPLOYMENTS = ("full", "clean", "sweep")
DEFAULT_CONFIG = "pipeline.yaml"


class DeployError(RuntimeError):
    """A bad schedule, config or server option; the message is one line."""


# ---- deployments ------------------------------------------------------------------------------------------------
def resolve_config_path(config: str | None) -> str | None:
    """The config file as an absolute path (runs execute later, in another process), or None for the defaults.

    Without --config, ./pipeline.yaml is used when it exists (as `worldpm run` does)."""
    if config is None:
        return str(Path(DEFAULT_CONFIG).resolve()) if Path(DEFAULT_CONFIG).is_file() else None
    p = Path(config)
    if not p.is_file():
        raise DeployError(f"config file not found: {p}")
    return str(p.resolve())


def build_deployments(config_path: str | None = None, overrides: list[str] | None = None, *,
                      schedule: bool = True, on_overlap: str = "enqueue") -> list[Any]:
    """RunnerDeployments `full` (scheduled), `clean` and `sweep` of the flow `worldpm`, ready for `prefect.serve`.

    The config is loaded and validated here, so a bad pipeline.yaml or cron fails at `serve`, not at 02:00."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.schedules import Cron
    from prefect.types.entrypoint import EntrypointType

    from flows.worldpm import worldpm
    from worldpm.config import load_config

    overrides = list(overrides or [])
    cfg = load_config(config_path, overrides)  # ConfigError names the file and key
    origin = config_path or "<defaults>"
    strategy = {"enqueue": ConcurrencyLimitStrategy.ENQUEUE,
                "cancel-new": ConcurrencyLimitStrategy.CANCEL_NEW}[on_overlap]
    common: dict[str, Any] = {
        "concurrency_limit": ConcurrencyLimitConfig(limit=1, collision_strategy=strategy),
        # a module path, not a file path relative to the cwd: the package is installed, the cwd may be anywhere
        "entrypoint_type": EntrypointType.MODULE_PATH,
        "tags": ["worldpm"],
    }
    params = {"config_path": config_path, "overrides": overrides}
    when = f"{cfg.schedule.cron!r} {cfg.schedule.timezone}" if schedule else "no schedule"
    try:  # the cron string is checked by Cron, the time zone when the deployment model is built
        full = worldpm.to_deployment(
            name="full",
            schedules=[Cron(cfg.schedule.cron, timezone=cfg.schedule.timezone)] if schedule else [],
            parameters=params,
            description=f"The whole DAG (download -> ... -> plot), each stage cached by content; {when}.",
            **common,
        )
    except ValueError as e:  # pydantic's ValidationError is a ValueError
        msg = e.errors()[0]["msg"] if hasattr(e, "errors") else str(e)
        raise DeployError(f"{origin}: bad schedule (schedule.cron {cfg.schedule.cron!r}, schedule.timezone "
                          f"{cfg.schedule.timezone!r}): {' '.join(msg.split())}") from None
    clean = worldpm.to_deployment(
        name="clean",
        parameters={**params, "until": "clean"},
        description="download, normalise, clean (until=clean): rerun the filters after a config change.",
        **common,
    )
    from flows.sweep import worldpm_sweep  # the flow named "worldpm" too: its deployment is worldpm/sweep

    sweep = worldpm_sweep.to_deployment(
        name="sweep",
        parameters=params,
        description="The config's sweep: grid, each point the DAG with overrides sharing the cache, under Prefect's "
                    "global concurrency limits (a slot per GPU; one at a time on CPU), then the sweep report"
                    + ("" if cfg.sweep else " (this config has no sweep: section: a run fails saying so)") + ".",
        **common,
    )
    return [full, clean, sweep]


def serve(config_path: str | None = None, overrides: list[str] | None = None, *, schedule: bool = True,
          on_overlap: str = "enqueue", limit: int | None = None) -> None:
    """Register `worldpm/full`, `worldpm/clean` and `worldpm/sweep` and execute their runs until interrupted."""
    import prefect
    from prefect.settings import get_current_settings

    deployments = build_deployments(config_path, overrides, schedule=schedule, on_overlap=on_overlap)
    if not get_current_settings().api.url:
        print("worldpm serve: PREFECT_API_URL is not set: serving against a temporary local Prefect server that "
              "stops with this process; start one with `worldpm server` or `prefect server start` and set "
              "PREFECT_API_URL=http://127.0.0.1:4200/api", file=sys.stderr)
    print(f"worldpm serve: config {config_path or '<defaults>'}"
          + (f" with --set {' '.join(overrides)}" if overrides else ""), flush=True)
    # the flow runs started here check their parameters against this config's serve.allowed_overrides
    policy.mark_served(config_path, list(overrides or []))
    # pause_on_shutdown=False: Ctrl-C on the server must not pause the nightly schedule
    prefect.serve(*deployments, pause_on_shutdown=False, limit=limit)


# ---- `worldpm server`: prefect server + serve, as two process groups ------------------------------------------
class _Stop(Exception):
    pass


def _raise_stop(signum, frame):  # noqa: ARG001
    raise _Stop(signal.Signals(signum).name)


def run_server(host: str = "127.0.0.1", port: int = 4200, config_path: str | None = None,
               overrides: list[str] | None = None, *, schedule: bool = True, on_overlap: str = "enqueue",
               limit: int | None = None, startup_timeout: float = 180.0, home: str | None = None) -> int:
    """`prefect server start` (SQLite under PREFECT_HOME) and `worldpm serve` against it, until a signal.

    Each child leads its own session, so a Ctrl-C in the terminal reaches this process only, and the children
    stop in order: the deployments first (their flow runs are in that group), then the server."""
    if not port_free(host, port):
        raise DeployError(f"{host}:{port} is in use (a Prefect server already running? then use `worldpm serve` "
                          "with PREFECT_API_URL set); choose another with --port")
    build_deployments(config_path, overrides, schedule=schedule, on_overlap=on_overlap)  # fail before starting
    url = f"http://{host}:{port}/api"
    # the UI asks the API at PREFECT_SERVER_API_HOST/PORT, not at `--port`: without these, the UI of a server on
    # another port than 4200 talks to whatever answers on 4200 (seen in headless Chromium on Prefect 3.8.8)
    env = dict(os.environ, PREFECT_SERVER_API_HOST=host, PREFECT_SERVER_API_PORT=str(port))
    env.pop("PREFECT_API_URL", None)
    if home:
        env["PREFECT_HOME"] = str(Path(home).resolve())
    procs: list[tuple[str, subprocess.Popen]] = []
    old = {s: signal.signal(s, _raise_stop) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", host,
                                   "--port", str(port)], env=env, start_new_session=True)
        procs.append(("prefect server", server))
        print(f"worldpm server: starting the Prefect server on {url} (pid {server.pid})", flush=True)
        deadline = time.monotonic() + startup_timeout
        while not healthy(url):
            if server.poll() is not None:
                raise DeployError(f"the Prefect server exited with code {server.returncode} before it was healthy")
            if time.monotonic() > deadline:
                raise DeployError(f"the Prefect server did not answer {url}/health in {startup_timeout:.0f}s")
            time.sleep(0.5)
        cmd = [sys.executable, "-m", "flows.deploy", "serve", "--on-overlap", on_overlap]
        if config_path:
            cmd += ["--config", config_path]
        for o in overrides or []:
            cmd += ["--set", o]
        if not schedule:
            cmd.append("--no-schedule")
        if limit is not None:
            cmd += ["--limit", str(limit)]
        served = subprocess.Popen(cmd, env=dict(env, PREFECT_API_URL=url), start_new_session=True)
        procs.append(("worldpm serve", served))
        print(f"worldpm server: serving {FLOW_NAME}/full, {FLOW_NAME}/clean and {FLOW_NAME}/sweep (pid {served.pid}); UI and API "
              f"at http://{host}:{port}; Ctrl-C stops both", flush=True)
        while True:
            for name, p in procs:
                if p.poll() is not None:
                    print(f"worldpm server: {name} exited with code {p.returncode}; stopping", file=sys.stderr)
                    return p.returncode or 1
            time.sleep(0.5)
    except _Stop as s:
        print(f"worldpm server: {s.args[0]} received; stopping the deployments, then the server", flush=True)
        return 0
    finally:
        # further signals must not interrupt the shutdown itself
        for s in old:
            signal.signal(s, signal.SIG_IGN)
        for name, p in reversed(procs):
            if not stop_group(p, grace=30.0):
                print(f"worldpm server: {name} did not stop in 30s; killed it", file=sys.stderr)
        for s, h in old.items():
            signal.signal(s, h)


# ---- CLI --------------------------------------------------------------------------------------------------------
def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", default=None,
                   help=f"pipeline config (default: ./{DEFAULT_CONFIG} if it exists, else the built-in defaults); "
                        "passed to every run as an absolute path")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="config override passed to every run (repeatable); a run's own `overrides` parameter "
                        "replaces these")
    p.add_argument("--no-schedule", dest="schedule", action="store_false",
                   help="register worldpm/full without its cron schedule (manual runs only)")
    p.add_argument("--on-overlap", choices=("enqueue", "cancel-new"), default="enqueue",
                   help="a run started while one of the same deployment runs: wait for its slot (default) or "
                        "be cancelled")
    p.add_argument("--limit", type=int, default=None,
                   help="at most this many flow runs at once in this process (all deployments together)")


def _serve_cmd(args: argparse.Namespace) -> int:
    from worldpm.errors import ConfigError

    try:
        serve(resolve_config_path(args.config), args.overrides, schedule=args.schedule,
              on_overlap=args.on_overlap, limit=args.limit)
    except (DeployError, ConfigError) as e:
        print(f"worldpm serve: {e}", file=sys.stderr)
        return 2
    return 0


def _server_cmd(args: argparse.Namespace) -> int:
    from worldpm.errors import ConfigError

    if args.action:  # the background server `worldpm run` starts (flows/server.py)
        from flows import server

        return server.status() if args.action == "status" else server.stop()
    try:
        return run_server(args.host, args.port, resolve_config_path(args.config), args.overrides,
                          schedule=args.schedule, on_overlap=args.on_overlap, limit=args.limit,
                          startup_timeout=args.startup_timeout, home=args.prefect_home)
    except (DeployError, ConfigError) as e:
        print(f"worldpm server: {e}", file=sys.stderr)
        return 2


def register(subparsers) -> None:
    """Add `serve` and `server` to the `worldpm` CLI (an argparse subparsers object)."""
    p = subparsers.add_parser(
        "serve", help="serve the deployments worldpm/full (nightly), worldpm/clean and worldpm/sweep against "
                       "PREFECT_API_URL",
        description="Register the deployments worldpm/full (the whole DAG on pipeline.yaml's schedule.cron in "
                    "schedule.timezone), worldpm/clean (download, normalise, clean) and worldpm/sweep (the sweep: "
                    "grid) with the Prefect API and run their flow runs here until Ctrl-C. One run at a time per deployment. Trigger one with "
                    "`prefect deployment run worldpm/full --watch`.")
    _add_common(p)
    p.set_defaults(func=_serve_cmd)

    p = subparsers.add_parser(
        "server", help="start a local Prefect server (127.0.0.1) and serve the deployments against it; "
                       "`server status|stop`: the background server of `worldpm run`",
        description="Start `prefect server start` (SQLite under PREFECT_HOME, default ~/.prefect) on 127.0.0.1 "
                    "and, once it is healthy, `worldpm serve` against it, in the foreground. Ctrl-C or SIGTERM "
                    "stops both. `worldpm server status` / `worldpm server stop`: the Prefect server that "
                    "`worldpm run` started in the background for this project (./.worldpm/prefect) when no "
                    "PREFECT_API_URL was set.")
    p.add_argument("action", nargs="?", choices=("status", "stop"),
                   help="status: what the project's background server is doing; stop: stop it (by its recorded "
                        "process id; the next `worldpm run` starts it again)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=4200)
    p.add_argument("--prefect-home", default=None, help="PREFECT_HOME for the server (its SQLite database)")
    p.add_argument("--startup-timeout", type=float, default=180.0, help="seconds to wait for the server")
    _add_common(p)
    p.set_defaults(func=_server_cmd)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.deploy", description=__doc__.split("\n")[0])
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
