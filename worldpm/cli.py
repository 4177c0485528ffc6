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
import contextlib
import json
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

from worldpm.config import PipelineConfig, handing_on, load_config
from worldpm.engine import Pipeline
from worldpm.errors import EXIT_CONFIG, EXIT_STAGE, ConfigError, NeedsTheLog, StageError, disk_full, free_space


def _config_path(arg: str | None) -> str | None:
    if arg:
        return str(Path(arg).resolve())
    default = Path.cwd() / "pipeline.yaml"
    return str(default) if default.exists() else None


def _load(args) -> tuple[str | None, PipelineConfig]:
    path = _config_path(getattr(args, "config", None))
    sources = getattr(args, "source", None) or None
    cfg = load_config(path, getattr(args, "set", None) or [], sources)
    for text in sources or []:
        _check_hub_reading(text)
    return path, cfg


def _check_hub_reading(text: str) -> None:
    """`--source mydata/pairs` with no ./mydata/pairs: a path that is missing, or a hub dataset id. One question to
    the hub (a single try, no retries) tells; when it cannot answer, or says there is no such dataset, the source is
    a ConfigError naming both readings, before anything runs. `hf://owner/name` skips this (no doubt)."""
    from worldpm.config import hub_reading_only, source_from_cli

    if not hub_reading_only(text):
        return
    d = source_from_cli(text)
    here = f"no file or folder {text!r} in {Path.cwd()}"
    if os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in ("1", "true", "yes", "on"):
        if re.fullmatch(r"[0-9a-f]{40}", d.get("revision") or ""):
            return  # a pinned commit can come from the hub cache offline; the download stage says if it cannot
        raise ConfigError(f"--source {text!r}: {here}, and as a hub dataset id it cannot be looked up: "
                          "HF_HUB_OFFLINE is set; fix the path, or unset HF_HUB_OFFLINE and write --source "
                          f"hf://{text}")
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        HfApi().dataset_info(d["repo_id"], revision=d.get("revision"), timeout=10)
    except GatedRepoError:
        return  # it exists
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise ConfigError(f"--source {text!r}: {here}, and the hub has no dataset {text} ({type(e).__name__}): fix "
                          "the path") from None
    except Exception as e:  # no network, a timeout, an id the hub refuses: the hub cannot say it exists
        raise ConfigError(f"--source {text!r}: {here}, and the Hugging Face hub cannot be asked about a dataset "
                          f"{text} ({type(e).__name__}); fix the path, or once the hub is reachable write --source "
                          f"hf://{text}") from None


run_page: str | None = None  # the flow run's page in the Prefect UI, once the console script's run_flow knows it


def _print_results(results: list[dict], stream=sys.stdout) -> None:
    """A line per stage (status, key, seconds, artifact) and the summary line."""
    width = max(len(r["stage"]) for r in results)
    for r in results:
        key = r["key"] or "-"
        secs = f"{r['seconds']:.1f}s" if r["status"] != "skipped" else ""
        print(f"{r['stage']:<{width}}  {r['status']:<7}  {key:<20}  {secs:>7}  {r['path'] or ''}", file=stream)
    print(summary_line(results, run_page), file=stream)


def summary_line(results: list[dict], page: str | None = None) -> str:
    """What the run did, its headline metric (the test split's accuracy with its 95% interval and n, when the run
    reached evaluate), where its report is (plot's report.md) and its page in the Prefect UI."""
    ran = [r["stage"] for r in results if r["status"] == "ran"]
    cached = [r["stage"] for r in results if r["status"] == "cached"]
    if ran:
        parts = [f"{len(ran)} stage(s) ran, {len(cached)} from the cache, in "
                 f"{sum(r['seconds'] or 0 for r in results):.1f}s"]
    elif cached:
        parts = ["nothing changed: every stage was a cache hit, no stage work done"]
    else:
        parts = ["no stage selected"]
    by = {r["stage"]: r for r in results if r.get("path")}
    test = _read_json_or_none(Path(by["evaluate"]["path"]) / "metrics.json").get("test") if "evaluate" in by else None
    if test and test.get("accuracy") is not None:
        ci = test.get("accuracy_ci")
        parts.append(f"test accuracy {100 * test['accuracy']:.1f}%"
                     + (f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else "") + f" (n={test.get('n')})")
    if "plot" in by and (Path(by["plot"]["path"]) / "report.md").is_file():
        parts.append(f"report {Path(by['plot']['path']) / 'report.md'}")
    if page:
        parts.append(f"run {page}")
    return "; ".join(parts)


def _read_json_or_none(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


# ---- run ------------------------------------------------------------------------------------------------------
def cmd_run(args) -> int:
    path, cfg = _load(args)  # validate before Prefect starts: a typo fails in milliseconds
    if args.until and args.only:
        raise ConfigError("--until and --only cannot be combined")
    # --from after --until, or a split a selected stage needs set to 0: exit 2 now, before Prefect and any stage
    args.pipeline.preflight(cfg, until=args.until, only=args.only, start=args.start)
    if not args.verbose:
        quiet_expected_tracebacks()
        logging.captureWarnings(True)  # Python warnings (third parties') through logging: the log file, not here
    # Without --verbose, a handler that cannot write (Prefect's API log worker when the server has gone: "--- Error
    # logging to API ---" after every batch) says nothing on the terminal; the run's log file keeps the run.
    raise_before, logging.raiseExceptions = logging.raiseExceptions, bool(args.verbose)
    try:
        with keep_run_log(), handing_on(cfg):  # the flow, in this process, takes cfg: not validated again
            results = args.run_flow(
                config_path=path, overrides=args.set or [], sources=args.source or None,
                until=args.until, only=args.only, start=args.start, force=args.force or [],
            )
    finally:
        logging.raiseExceptions = raise_before
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        _print_results(results)
    return 0


class _NoTracebackFor(logging.Formatter):
    """Wraps a console handler's formatter: a record carrying one of our one-line errors (StageError, ConfigError,
    or a lost Prefect API: `_expected`) is printed without its traceback (Prefect logs each failed task and flow run
    with one); other exceptions, bugs, keep theirs. The record itself is left as it was, so the Prefect API (the UI)
    and the run's log file still get the traceback."""

    def __init__(self, inner: logging.Formatter | None):
        super().__init__()
        self.inner = inner or logging.Formatter("%(message)s")

    def format(self, record: logging.LogRecord) -> str:
        exc = record.exc_info[1] if record.exc_info else None
        if not _expected(exc):
            return self.inner.format(record)
        saved = record.exc_info, record.exc_text
        record.exc_info, record.exc_text = None, None
        try:
            return self.inner.format(record)
        finally:
            record.exc_info, record.exc_text = saved


# ---- the run's full log -------------------------------------------------------------------------------------------
RUN_LOGS = Path(".worldpm") / "logs"  # under the folder `worldpm run` runs in, beside the background server's home
KEEP_RUN_LOGS = 20
run_log: Path | None = None  # this process's, once keep_run_log() has opened it


class RunLogHandler(logging.FileHandler):
    """Everything the run logs (every stage's lines, Prefect's, each traceback in full) into the run's log file.
    A write that fails (the disk that is full may be this one) is dropped without the stdlib's "--- Logging error
    ---" report on the terminal."""

    def __init__(self, path: Path):
        super().__init__(path, encoding="utf-8", delay=True)
        self.setLevel(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))

    def handleError(self, record: logging.LogRecord) -> None:
        pass


@contextlib.contextmanager
def keep_run_log(folder: Path | None = None) -> Iterator[Path | None]:
    """Within: the run's full log goes to .worldpm/logs/run-<time>-<pid>.log (the newest KEEP_RUN_LOGS are kept):
    the terminal shows one line per failure, the file keeps what led to it. A failure whose cause is outside the
    input (NeedsTheLog: a full disk, the Prefect server gone) names this file; `--verbose` prints the tracebacks on
    the terminal as well."""
    global run_log
    folder = (folder or Path.cwd() / RUN_LOGS).resolve()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        old = sorted(folder.glob("run-*.log"))
        for f in old[: max(0, len(old) - KEEP_RUN_LOGS + 1)]:
            f.unlink(missing_ok=True)
    except OSError:  # a read-only or full folder: the run goes on without its file
        yield None
        return
    run_log = folder / f"run-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    handler = RunLogHandler(run_log)
    root = logging.getLogger()
    root.addHandler(handler)

    def note(level: int, msg: str, *args, exc: BaseException | None = None) -> None:
        handler.handle(logging.LogRecord("worldpm", level, __file__, 0, msg, args,
                                         (type(exc), exc, exc.__traceback__) if exc is not None else None))

    note(logging.INFO, "worldpm %s (in %s)", " ".join(sys.argv[1:]), Path.cwd())
    try:
        yield run_log
    except BaseException as e:  # what ended the run, in full (the terminal gets its one line)
        note(logging.ERROR, "the run ended: %s: %s", type(e).__name__, e, exc=e)
        raise
    finally:
        root.removeHandler(handler)
        handler.close()


def _with_log(message: str) -> str:
    if run_log is None or not run_log.is_file():
        return message
    return f"{message} (full log: {run_log}; `worldpm run --verbose` prints it here)"


def _expected(exc: BaseException | None) -> bool:
    """One of our one-line errors, or the Prefect client failing to reach its server (httpx: a lost server ends the
    run in one line of its own, flows/cli.py): printed without the traceback; the run's log file keeps it."""
    if exc is None:
        return False
    return isinstance(exc, (StageError, ConfigError)) or any(
        c.__module__.split(".")[0] in ("httpx", "httpcore") for c in type(exc).__mro__)


# the project's packages (siblings: worldpm/ beside tasks/ and flows/, in a checkout and in site-packages alike)
_OURS = tuple(str(Path(__file__).resolve().parents[1] / top) + os.sep for top in ("worldpm", "tasks", "flows"))


class _HideDetail(logging.Filter):
    """On the terminal without --verbose, a `worldpm run` shows the stages' own lines (what a stage that runs does,
    progress of long work) and every error, and keeps off it (the run's log file and the Prefect UI have them all):
    records a stage marks as detail (``extra={"worldpm_detail": True}``: a cache hit, the trainer's stderr lines
    before its one-line error, the rules clean applies), and the lines of code outside this project below ERROR:
    Prefect's own (its per-task "Finished in state ..." lines, "Beginning flow run", "View at"), the libraries'
    warnings; and Prefect's error records that only restate one of our one-line errors (the run's last line)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "worldpm_detail", False):
            return False
        if (record.pathname or "").startswith(_OURS):
            return True
        return record.levelno >= logging.ERROR and not _restates_our_error(record)


def _restates_our_error(record: logging.LogRecord) -> bool:
    """Prefect's records of a task or flow run that ended in one of our one-line errors (StageError, ConfigError):
    "Task run failed with exception: StageError(...)", "Finished in state Failed('... an exception StageError:
    ...')", "Encountered exception during execution: ...". The run ends with that line itself (`worldpm: ...`), so
    on the terminal they would say it three times more; the log file and the UI keep them."""
    exc = record.exc_info[1] if record.exc_info else None
    if exc is not None:
        return isinstance(exc, (StageError, ConfigError))
    message = record.getMessage()
    return any(f"exception {t.__name__}: " in message for t in (StageError, ConfigError))


def quiet_expected_tracebacks() -> None:
    """Keep the terminal to one line per expected failure (`run` without --verbose): the console handlers of the
    root logger print StageError/ConfigError records without their traceback, and none of the detail
    (`_HideDetail`). (Prefect's logging setup keeps a root logger that has handlers of its own, as main() gives it,
    and its run loggers propagate to it.)"""
    for h in logging.getLogger().handlers:
        if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler) \
                and not isinstance(h.formatter, _NoTracebackFor):
            h.setFormatter(_NoTracebackFor(h.formatter))
            h.addFilter(_HideDetail())


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
        said: list[str] = []
        configs = [(path or "the built-in defaults", cfg)] + [
            (c, load_config(str(Path(c).resolve()))) for c in (args.keep_config or [])]
        for origin, c in configs:
            try:
                keep |= referenced_keys(args.pipeline, c, origin, said)
            except StageError as e:
                raise StageError(f"artifacts gc: {e}; nothing was removed (gc keeps what a config uses, so it must "
                                 "resolve every stage: fix the cause, or gc with a config that resolves)") from None
        plan = store.gc(keep, dry_run=args.dry_run, stages=args.pipeline.names)
        verb = "would remove" if args.dry_run else "removed"
        for p in plan.removed:
            print(f"{verb} {p}")
        for p in plan.foreign:
            print(f"left alone {p} (not a worldpm artifact)")
        for line in said:
            print(line)
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
        mans, broken = [_find(store, args.ref, args.pipeline.names)], []
    else:
        stages = [s for s in args.pipeline.names if not args.stage or s == args.stage]
        mans = [m for s in stages for m in store.manifests(s)]
        broken = [b for s in stages for b in store.damaged_folders(s)]  # no manifest to list them by
    checks = [(ArtifactRef(m["stage"], m["key"], m["path"], m.get("digest", "")), None) for m in mans] + broken
    bad: list[tuple[ArtifactRef, str]] = []
    for i, (ref, known) in enumerate(checks, 1):
        problem = known or store.verify(ref, deep=True)
        print(f"[{i}/{len(checks)}] {ref.stage}/{ref.key}  {'ok' if problem is None else f'DAMAGED: {problem}'}",
              flush=True)
        if problem is not None:
            bad.append((ref, problem))
    if bad and not args.dry_run:
        with store.exclusive(f"artifacts verify (found {len(bad)} damaged artifact(s), not set aside)"):
            for ref, problem in bad:
                if os.path.lexists(ref.path) and store.verify(ref, deep=True) is not None:
                    print(f"set aside {ref.path} as {store.set_aside(ref, problem).name}: the next run rebuilds it")
    print(f"verified {len(checks)} artifact(s): {len(checks) - len(bad)} ok, {len(bad)} damaged")
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
                            "dataset id owner/name[@revision] (hf://owner/name when a folder of that name could be "
                            "meant; a missing path is refused at once); repeatable")


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
                   help="print everything the run logs: Prefect's own lines (each task's state), the cache hits, "
                        "the libraries' warnings, the tracebacks of a failed stage (by default: the stages' own "
                        "lines, a line per stage and a summary line at the end, a failure in one line; the full log "
                        "is kept in .worldpm/logs/ either way)")
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
        print(f"worldpm: {_with_log(str(e)) if isinstance(e, NeedsTheLog) else e}", file=sys.stderr)
        return EXIT_STAGE
    except OSError as e:  # outside any stage (the run's lock note, a report): a full disk is still one line
        if disk_full(e) is None:
            raise
        place = e.filename or Path.cwd()
        why = f"the disk is full (no space left on the device of {place}, {free_space(place)} free): free space there"
        print(f"worldpm: {_with_log(why + ' and run again')}", file=sys.stderr)
        return EXIT_STAGE
    except KeyboardInterrupt:
        print("worldpm: interrupted", file=sys.stderr)
        return 130
