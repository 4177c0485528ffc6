"""`worldpm`: run the pipeline, see what is cached and why, manage artifacts, evaluate and score, serve deployments.

    worldpm run [--config FILE] [--source PATH_OR_HUB_ID]... [--until STAGE | --only STAGE] [--from STAGE]
                [--force STAGE]... [--set section.key=value]... [--json] [--verbose]
    worldpm status [--config FILE] [--json]
    worldpm artifacts list|show|gc|verify
    worldpm evaluate --model DIR --data FILE       worldpm score --model DIR [FILE]
    worldpm serve | server | server status | server stop
    worldpm train-node [--config FILE] [--set section.key=value]... [--rank R]    (another machine of a training run)

Without --config, ./pipeline.yaml is used when it exists, else the built-in defaults (the offline demo).
Errors in the config, the command line or the input are printed as one line and the exit status is 2 (config or
usage) or 1 (a stage); a failed stage's Prefect tracebacks only with `run --verbose`.

The commands know the stages only through the Pipeline they are given and run the flow through the function they
are given: the console script (flows/cli.py) hands in tasks.PIPELINE and the Prefect flow.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Callable, Iterable

from worldpm.config import PipelineConfig, load_config
from worldpm.engine import Pipeline
from worldpm.errors import EXIT_CONFIG, EXIT_STAGE, ConfigError, StageError


def _config_path(arg: str | None) -> str | None:
    if arg:
        return str(Path(arg).resolve())
    default = Path.cwd() / "pipeline.yaml"
    return str(default) if default.exists() else None


def _load(args) -> tuple[str | None, PipelineConfig]:
    path = _config_path(getattr(args, "config", None))
    cfg = load_config(path, getattr(args, "set", None) or [], getattr(args, "source", None) or None)
    return path, cfg


def _print_results(results: list[dict], stream=sys.stdout) -> None:
    width = max(len(r["stage"]) for r in results)
    for r in results:
        key = r["key"] or "-"
        secs = f"{r['seconds']:.1f}s" if r["status"] != "skipped" else ""
        print(f"{r['stage']:<{width}}  {r['status']:<7}  {key:<20}  {secs:>7}  {r['path'] or ''}", file=stream)
    ran = [r["stage"] for r in results if r["status"] == "ran"]
    if not ran and any(r["status"] == "cached" for r in results):
        print("nothing changed: every stage was a cache hit, no stage work done", file=stream)


# ---- run ------------------------------------------------------------------------------------------------------
def cmd_run(args) -> int:
    path, cfg = _load(args)  # validate before Prefect starts: a typo fails in milliseconds
    if args.until and args.only:
        raise ConfigError("--until and --only cannot be combined")
    args.pipeline.select(until=args.until, only=args.only, start=args.start)  # --from after --until: exit 2, now
    if not args.verbose:
        quiet_expected_tracebacks()
    results = args.run_flow(
        config_path=path, overrides=args.set or [], sources=args.source or None,
        until=args.until, only=args.only, start=args.start, force=args.force or [],
    )
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        _print_results(results)
    return 0


class _NoTracebackFor(logging.Formatter):
    """Wraps a console handler's formatter: a record carrying one of our one-line errors (StageError, ConfigError)
    is printed without its traceback (Prefect logs each failed task and flow run with one); other exceptions, bugs,
    keep theirs. The record itself is left as it was, so the Prefect API (the UI) still gets the traceback."""

    def __init__(self, inner: logging.Formatter | None):
        super().__init__()
        self.inner = inner or logging.Formatter("%(message)s")

    def format(self, record: logging.LogRecord) -> str:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, (StageError, ConfigError)):
            return self.inner.format(record)
        saved = record.exc_info, record.exc_text
        record.exc_info, record.exc_text = None, None
        try:
            return self.inner.format(record)
        finally:
            record.exc_info, record.exc_text = saved


def quiet_expected_tracebacks() -> None:
    """Keep the terminal to one line per expected failure (`run` without --verbose): the console handlers of the
    root logger print StageError/ConfigError records without their traceback. (Prefect's logging setup keeps a
    root logger that has handlers of its own, as main() gives it, and its run loggers propagate to it.)"""
    for h in logging.getLogger().handlers:
        if isinstance(h, logging.StreamHandler) and not isinstance(h.formatter, _NoTracebackFor):
            h.setFormatter(_NoTracebackFor(h.formatter))


# ---- status ---------------------------------------------------------------------------------------------------
def cmd_status(args) -> int:
    from worldpm.status import pipeline_status

    _, cfg = _load(args)
    rows = pipeline_status(args.pipeline, cfg)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    width = max(len(s) for s in args.pipeline.names)
    for r in rows:
        print(f"{r['stage']:<{width}}  {r['status']:<9}  {r['key'] or '-':<20}  {r['why']}")
    return 0


# ---- artifacts ------------------------------------------------------------------------------------------------
def cmd_artifacts(args) -> int:
    from worldpm.store import ArtifactStore

    path, cfg = _load(args)
    store = ArtifactStore(cfg.artifacts_dir)
    action = args.action or "list"
    if action == "list":
        mans = [m for s in args.pipeline.names for m in store.manifests(s) if not args.stage or s == args.stage]
        rows = [{"stage": m["stage"], "key": m["key"], "pipeline": m.get("pipeline"), "bytes": m.get("bytes"),
                 "rows_out": m.get("rows_out"), "seconds": m.get("seconds"), "finished_at": m.get("finished_at"),
                 "path": m["path"]} for m in mans]
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            if not rows:
                print(f"no artifacts in {store.root}")
            for r in rows:
                print(f"{r['stage']:<9} {r['key']}  {_size(r['bytes']):>9}  rows {r['rows_out'] if r['rows_out'] is not None else '-':>8}  "
                      f"{r['seconds'] or 0:>8.1f}s  {r['path']}")
        return 0
    if action == "show":
        if not args.ref:
            raise ConfigError("artifacts show needs STAGE/KEY, KEY (or a prefix of 6+ characters) or an artifact folder")
        found = _find(store, args.ref, args.pipeline.names)
        print(json.dumps(found, indent=2))
        return 0
    if action == "gc":
        from worldpm.status import referenced_keys

        keep: set[tuple[str, str]] = set()
        configs = [(path or "the built-in defaults", cfg)] + [
            (c, load_config(str(Path(c).resolve()))) for c in (args.keep_config or [])]
        for origin, c in configs:
            try:
                keep |= referenced_keys(args.pipeline, c, origin)
            except StageError as e:
                raise StageError(f"artifacts gc: {e}; nothing was removed (gc keeps what a config uses, so it must "
                                 "resolve every stage: fix the cause, or gc with a config that resolves)") from None
        plan = store.gc(keep, dry_run=args.dry_run, stages=args.pipeline.names)
        verb = "would remove" if args.dry_run else "removed"
        for p in plan.removed:
            print(f"{verb} {p}")
        for p in plan.foreign:
            print(f"left alone {p} (not a worldpm artifact)")
        print(f"{verb} {len(plan.removed)} folder(s); kept {len(keep)} artifact(s) the config(s) reference"
              + (f"; left {len(plan.foreign)} folder(s) that are not worldpm's" if plan.foreign else ""))
        return 0
    if action == "verify":
        return _verify(store, args)
    raise ConfigError(f"unknown artifacts action {action!r}: list, show, gc, verify")


def _verify(store, args) -> int:
    """Every artifact (or one) against its manifest's content digests; damaged ones are set aside (the next run
    rebuilds them) unless --dry-run. Reading takes no lock (runs go on meanwhile); setting aside takes the store
    exclusive for a moment, and is refused while a run is in progress."""
    from worldpm.store import ArtifactRef

    if args.ref:
        mans = [_find(store, args.ref, args.pipeline.names)]
    else:
        mans = [m for s in args.pipeline.names for m in store.manifests(s) if not args.stage or s == args.stage]
    refs = [ArtifactRef(m["stage"], m["key"], m["path"], m.get("digest", "")) for m in mans]
    bad: list[tuple[ArtifactRef, str]] = []
    for i, ref in enumerate(refs, 1):
        problem = store.verify(ref, deep=True)
        print(f"[{i}/{len(refs)}] {ref.stage}/{ref.key}  {'ok' if problem is None else f'DAMAGED: {problem}'}",
              flush=True)
        if problem is not None:
            bad.append((ref, problem))
    if bad and not args.dry_run:
        with store.exclusive(f"artifacts verify (found {len(bad)} damaged artifact(s), not set aside)"):
            for ref, problem in bad:
                if Path(ref.path).is_dir() and store.verify(ref, deep=True) is not None:
                    print(f"set aside {ref.path} as {store.set_aside(ref, problem).name}: the next run rebuilds it")
    print(f"verified {len(refs)} artifact(s): {len(refs) - len(bad)} ok, {len(bad)} damaged")
    if bad:
        raise StageError(f"artifacts verify: {len(bad)} damaged artifact(s), first {bad[0][0].stage}/{bad[0][0].key}: "
                         f"{bad[0][1]}")
    return 0


def _find(store, ref: str, stages: Iterable[str]) -> dict:
    """The manifest of STAGE/KEY, KEY, a key prefix (6+ characters) or an artifact folder."""
    p = Path(ref)
    if p.is_dir() and (p / "manifest.json").is_file():
        try:
            m = json.loads((p / "manifest.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise StageError(f"{p / 'manifest.json'}: cannot be read ({type(e).__name__})") from None
        return {**m, "path": str(p.resolve())}
    stage, _, key = ref.rpartition("/")
    if stage and stage not in stages:
        raise ConfigError(f"no artifact {ref!r}: {stage!r} is no stage ({', '.join(stages)}) and {ref} is no "
                          "artifact folder")
    for m in (store.manifests(stage) if stage else [m for s in stages for m in store.manifests(s)]):
        if m["key"] == key or (len(key) >= 6 and m["key"].startswith(key)):
            return m
    raise ConfigError(f"no artifact {ref!r} in {store.root}")


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)


# ---- parser ---------------------------------------------------------------------------------------------------
def _config_args(p: argparse.ArgumentParser, sources: bool = True) -> None:
    p.add_argument("--config", "-c", metavar="FILE", help="pipeline.yaml (default: ./pipeline.yaml if present, "
                   "else the built-in offline demo)")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                   help="override a config value (YAML-parsed), e.g. --set clean.min_margin=1; repeatable")
    if sources:
        p.add_argument("--source", action="append", metavar="PATH_OR_HUB_ID",
                       help="replaces the configured sources: a file, directory or glob (format detected), or a hub "
                            "dataset id owner/name[@revision]; repeatable")


def build_parser(pipeline: Pipeline, run_flow: Callable[..., list[dict]],
                 commands: Iterable[Callable] = ()) -> argparse.ArgumentParser:
    """The `worldpm` parser over `pipeline`'s stages; `commands` add more subcommands (serve, server)."""
    stages = pipeline.names
    parser = argparse.ArgumentParser(
        prog="worldpm",
        description="WorldPM-style reward-model pipeline: download -> normalise -> clean -> shard -> tokenize -> "
                    "ref_logps -> train -> evaluate -> plot, each stage a cached artifact, run as a Prefect flow.",
    )
    parser.set_defaults(pipeline=pipeline, run_flow=run_flow)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run the pipeline (cached stages are skipped)",
                       description="Run the pipeline as the Prefect flow `worldpm`. A stage whose key (code version, "
                                   "its config, its inputs' content digests) is in the artifact store is a cache hit. "
                                   "Prefect server: PREFECT_API_URL when set, else one started in the background "
                                   "once and reused (`worldpm server status|stop`).")
    _config_args(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--until", metavar="STAGE", choices=stages, help="stop after this stage")
    g.add_argument("--only", metavar="STAGE", choices=stages,
                   help="run only this stage; its upstream must be cached")
    p.add_argument("--from", dest="start", metavar="STAGE", choices=stages,
                   help="start at this stage; the stages before it must be cached")
    p.add_argument("--force", action="append", metavar="STAGE", choices=stages,
                   help="recompute this stage even if cached; repeatable")
    p.add_argument("--json", action="store_true",
                   help="print a JSON list of {stage, key, status: ran|cached|skipped, path, seconds}")
    p.add_argument("--verbose", "-v", action="store_true",
                   help="print Prefect's tracebacks of a failed stage too (by default a failure is one line)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("status", help="which stages are cached for the current config, which would run, and why")
    _config_args(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("artifacts", help="list artifacts, show a manifest, garbage-collect unreferenced keys, verify")
    p.add_argument("action", nargs="?", choices=("list", "show", "gc", "verify"), default="list",
                   help="list | show STAGE/KEY | gc: delete the artifacts the config (and --keep-config) do not use; "
                        "refused while a run is in progress or when a stage cannot be resolved | verify [STAGE/KEY]: "
                        "check the files against their manifest's content digests, set damaged ones aside (the next "
                        "run rebuilds them)")
    p.add_argument("ref", nargs="?", metavar="STAGE/KEY",
                   help="for show and verify: STAGE/KEY, KEY, a key prefix or an artifact folder")
    _config_args(p)
    p.add_argument("--stage", choices=stages, help="list, verify: only this stage")
    p.add_argument("--dry-run", action="store_true", help="gc: say what would be removed; verify: set nothing aside")
    p.add_argument("--keep-config", action="append", metavar="FILE",
                   help="gc: also keep what this config references; repeatable")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_artifacts)

    from worldpm import cli_eval

    cli_eval.register(sub)  # evaluate, score
    for register in commands:
        register(sub)
    return parser


def main(argv: list[str] | None = None, *, pipeline: Pipeline, run_flow: Callable[..., list[dict]],
         commands: Iterable[Callable] = ()) -> int:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    parser = build_parser(pipeline, run_flow, commands)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for noisy in ("httpx", "httpcore", "urllib3", "filelock"):  # one line per HTTP request to the Prefect API
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return args.func(args) or 0
    except ConfigError as e:
        print(f"worldpm: config error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except StageError as e:
        print(f"worldpm: {e}", file=sys.stderr)
        return EXIT_STAGE
    except KeyboardInterrupt:
        print("worldpm: interrupted", file=sys.stderr)
        return 130
