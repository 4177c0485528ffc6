"""The `worldpm` console script: worldpm/cli.py's commands over this project's stages (tasks.PIPELINE), the Prefect
flow (flows/worldpm.py) run against a reused Prefect server (flows/server.py), `sweep` (flows/sweep.py) and the
deployment commands `serve` and `server` (flows/deploy.py)."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from flows import deploy
from tasks import PIPELINE
from worldpm import cli
from worldpm.errors import StageError


def run_flow(**params) -> list[dict]:
    """The flow `worldpm`, imported when a run starts (Prefect takes seconds to import; `status` does not need it),
    against the user's PREFECT_API_URL or the project's background server (flows/server.py), started once."""
    from flows.worldpm import worldpm

    return with_prefect(worldpm, **params)


def with_prefect(flow_fn, **params):
    """A flow (`worldpm`, `worldpm_sweep`) run against the user's PREFECT_API_URL or the project's background
    server; an unreachable API is one line."""
    from flows import server

    url = server.api_for_run()
    from prefect.settings import PREFECT_API_URL, temporary_settings

    try:
        if url is None:  # the user's own server, or Prefect's temporary one
            return flow_fn(**params)
        with temporary_settings(updates={PREFECT_API_URL: url}):
            return flow_fn(**params)
    except RuntimeError as e:  # Prefect's own, with a traceback: the API is down or the URL is wrong
        if not str(e).startswith("Failed to reach API"):
            raise
        from prefect.settings import get_current_settings

        if url is not None:  # ours, gone during the run (stopped, killed)
            raise StageError(f"cannot reach the background Prefect server at {url} any more (stopped during the "
                             "run?): `worldpm server status` says what runs; the next run starts it again") from None
        raise StageError(f"cannot reach the Prefect API at {get_current_settings().api.url} (PREFECT_API_URL): start "
                         "the server (`worldpm server` or `prefect server start`), or unset PREFECT_API_URL to let "
                         "worldpm start one in the background") from None


# ---- `worldpm sweep` ------------------------------------------------------------------------------------------
def _sweep_cmd(args: argparse.Namespace) -> int:
    from flows.sweep import worldpm_sweep
    from worldpm.cli import _config_path, quiet_expected_tracebacks
    from worldpm.config import load_config
    from worldpm.errors import ConfigError

    path = _config_path(args.config)
    cfg = load_config(path, args.set or [], args.source or None)  # a typo fails here, before Prefect starts
    if cfg.sweep is None:
        raise ConfigError(f"{path or 'the built-in defaults'}: no `sweep:` section; a sweep needs its grid "
                          "(pipeline.yaml shows one)")
    if not args.verbose:
        quiet_expected_tracebacks()
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
    return cli.main(argv, pipeline=PIPELINE, run_flow=run_flow, commands=(register_sweep, deploy.register))


if __name__ == "__main__":
    sys.exit(main())
