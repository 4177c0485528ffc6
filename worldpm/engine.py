"""How one stage is keyed, skipped or run, and which stages a run selects. No Prefect here: flows/ wires these.

A stage is a module of ``tasks/`` that follows one small protocol (see tasks/__init__.py, which lists the stages
and their edges: the DAG, written once):

    stage_config(cfg: PipelineConfig) -> dict   the part of the config its output depends on (goes into the key)
    run(stage_cfg, inputs: dict[str, ArtifactRef], out: Path, log, work: Path) -> dict
                                                writes its artifact into `out` (a temporary folder renamed into
                                                place on success) and returns manifest fields (rows_in, rows_out,
                                                rows_rejected, ...). `work` is a per-key scratch folder that
                                                survives a crash (training checkpoints live there) and is deleted
                                                after the commit.
    optional:
    INPUT_FILES: {upstream: (glob, ...)}        read only these files of an upstream artifact (their digest is
                                                what the key sees): early cutoff on what the stage really reads
    NOT_IN_KEY: (top-level stage_config keys)   change how a stage runs (a timeout), never what it writes
    CONFIG_SECTION: str                         the pipeline.yaml section its stage_config keys live in, when
                                                not the stage's name (normalise: "clean"), for `worldpm status`
    READS: {upstream: (glob, ...)}              the files of an upstream artifact the stage opens: checked against
                                                their content digests before it runs (default: INPUT_FILES, else
                                                the whole artifact)
    after_commit(cfg, ref, log)                 runs after a new artifact is committed (evaluate: the history of
                                                runs and the regression guard, which lives outside the store)
    preflight(cfg)                              ConfigError when the config cannot work for this stage (evaluate
                                                without a test split): checked for every stage a run selects,
                                                before any stage runs

The engine knows stages only through the `Pipeline` it is handed: nothing in worldpm/ imports tasks/ or flows/.
"""
from __future__ import annotations

import ast
import fnmatch
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterable

from worldpm.config import PipelineConfig
from worldpm.errors import ConfigError, DiskFull, StageError, disk_full, free_space
from worldpm.store import ArtifactRef, ArtifactStore, canonical_json, sha256_text, stage_key


@dataclass(frozen=True)
class Stage:
    """One node of the DAG: its name, the module that implements it, the stages whose artifacts it reads."""

    name: str
    module: ModuleType
    upstream: tuple[str, ...] = ()

    def config(self, cfg: PipelineConfig) -> dict:
        return self.module.stage_config(cfg)

    @property
    def input_files(self) -> dict[str, tuple[str, ...]]:
        return getattr(self.module, "INPUT_FILES", {})

    @property
    def not_in_key(self) -> tuple[str, ...]:
        return tuple(getattr(self.module, "NOT_IN_KEY", ()))

    def reads(self, upstream: str) -> tuple[str, ...] | None:
        """The files of `upstream` this stage opens (globs), None for all of them."""
        return (getattr(self.module, "READS", {}).get(upstream) or self.input_files.get(upstream)) or None


class Pipeline:
    """The stages in a topological order; checked when built (an edge to a later or unknown stage is a bug)."""

    def __init__(self, stages: Iterable[Stage]):
        self.stages = tuple(stages)
        self._by_name: dict[str, Stage] = {}
        for s in self.stages:
            if s.name in self._by_name:
                raise ValueError(f"stage {s.name!r} is listed twice")
            bad = [u for u in s.upstream if u not in self._by_name]
            if bad:
                raise ValueError(f"stage {s.name!r} reads {', '.join(bad)}, which must come before it")
            self._by_name[s.name] = s

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.stages)

    def __iter__(self):
        return iter(self.stages)

    def __getitem__(self, name: str) -> Stage:
        try:
            return self._by_name[name]
        except KeyError:
            raise ConfigError(f"unknown stage {name!r}; stages: {', '.join(self.names)}") from None

    def ancestors(self, name: str) -> list[str]:
        """Every stage `name` reads from, directly or not, in DAG order."""
        seen: set[str] = set()
        todo = list(self[name].upstream)
        while todo:
            u = todo.pop()
            if u not in seen:
                seen.add(u)
                todo.extend(self[u].upstream)
        return [s for s in self.names if s in seen]

    def preflight(self, cfg: PipelineConfig, until: str | None = None, only: str | None = None,
                  start: str | None = None) -> list[str]:
        """The stages a run with these options runs, after each one's `preflight(cfg)`: what a stage needs of the
        config (a split) fails here, before the stages above it spend minutes, not when the stage is reached."""
        _, to_run = self.select(until=until, only=only, start=start)
        for name in to_run:
            check = getattr(self[name].module, "preflight", None)
            if check is not None:
                check(cfg)
        return to_run

    def resolve(self, name: str, cfg: PipelineConfig, inputs: dict[str, ArtifactRef]) -> tuple[str, dict]:
        """The key and stage config of stage `name` (see `resolve`)."""
        return resolve(self[name], cfg, inputs)

    def execute(self, name: str, cfg: PipelineConfig, inputs: dict[str, ArtifactRef], store: ArtifactStore,
                force: bool = False, log: logging.Logger | logging.LoggerAdapter | None = None) -> "StageResult":
        """Run stage `name` or take it from the cache (see `execute`): usable without Prefect."""
        return execute(self[name], cfg, inputs, store, force=force, log=log)

    def select(self, until: str | None = None, only: str | None = None,
               start: str | None = None) -> tuple[list[str], list[str]]:
        """(stages to resolve from the cache only, stages to run) for --until / --only / --from."""
        names = list(self.names)
        for opt, v in (("--until", until), ("--only", only), ("--from", start)):
            if v is not None and v not in names:
                raise ConfigError(f"{opt} {v}: unknown stage; stages: {', '.join(names)}")
        if only:
            if until or start:
                raise ConfigError("--only cannot be combined with --until or --from")
            return self.ancestors(only), [only]
        end = names.index(until) + 1 if until else len(names)
        begin = names.index(start) if start else 0
        if begin >= end:
            raise ConfigError(f"--from {start} comes after --until {until}")
        return (self.ancestors(start) if start else []), names[begin:end]

    def run(self, cfg: PipelineConfig, store: ArtifactStore, *, until: str | None = None, only: str | None = None,
            start: str | None = None, force: Iterable[str] = (), run_one: "RunOne | None" = None,
            log: logging.Logger | logging.LoggerAdapter | None = None) -> list[dict]:
        """Resolve or run the selected stages in DAG order: [{stage, key, status, path, seconds}] for every stage.

        ``run_one(name, inputs, force, cache_only) -> StageResult`` runs one stage (the flow passes its Prefect
        task; default: `execute` / `cached_only` here). Before a stage runs, the files it reads from its inputs are
        checked against their content digests; a damaged input is set aside and rebuilt first (then the walk
        starts again, since the stages after it may key on its new digest). A damaged cache hit (sizes) is set
        aside and rebuilt by `execute` itself."""
        log = log or logging.getLogger("worldpm")
        force_set = set(force or [])
        for f in force_set:
            self[f]  # an unknown stage is a one-line error before anything runs
        self.preflight(cfg, until=until, only=only, start=start)
        from_cache, to_run = self.select(until=until, only=only, start=start)

        def direct(name: str, inputs: dict[str, ArtifactRef], force_it: bool, cache_only: bool) -> StageResult:
            if cache_only:
                return cached_only(self[name], cfg, inputs, store)
            return execute(self[name], cfg, inputs, store, force=force_it, log=log)

        run_one = run_one or direct
        ran: dict[str, dict] = {}  # what ran in any walk (a rebuilt input is reported as run, not as cached)

        class Rebuilt(Exception):
            pass

        def build(name: str, refs: dict[str, ArtifactRef], cache_only: bool, force_it: bool) -> StageResult:
            stage = self[name]
            inputs = {u: refs[u] for u in stage.upstream}
            key, _ = resolve(stage, cfg, inputs)
            cached = None if force_it else store.find(name, key, log)
            if cache_only and cached is None and store.bad_copies(name, key):
                cache_only = False  # it was cached but damaged (and set aside just now): rebuild it
            if not cache_only and cached is None:
                damaged = damaged_inputs(stage, inputs, store, log)
                for u in damaged:  # rebuild each from its own (checked) inputs, then walk again
                    build(u, refs, cache_only=False, force_it=False)
                if damaged:
                    raise Rebuilt()
            res = run_one(name, inputs, force_it, cache_only)
            if res.status == "ran":
                ran[name] = res.to_json()
            return res

        for _ in range(2 * len(self.stages) + 2):
            refs: dict[str, ArtifactRef] = {}
            results: list[dict] = []
            try:
                for stage in self.stages:
                    name = stage.name
                    if name not in from_cache and name not in to_run:
                        results.append({"stage": name, "key": None, "status": "skipped", "path": None,
                                        "seconds": 0.0})
                        continue
                    res = build(name, refs, cache_only=name in from_cache, force_it=name in force_set)
                    refs[name] = res.ref
                    done = ran.get(name)
                    results.append(done if done and done["key"] == res.key else res.to_json())
                return results
            except Rebuilt:
                force_set = {f for f in force_set if f not in ran}  # a forced stage that ran is not forced again
                continue
        raise StageError("the run kept finding damaged artifacts after rebuilding them; see the warnings above")


# ---- the stage code version: the source files a stage's module imports, followed through the project ------------

_code_cache: dict[str, str] = {}
# Imported by every stage, yet unable to change what a stage writes except through values that are in its key
# already: the settings (a default or a validator changes the stage_config a key is made of), the store (digests
# are keyed), the one-line errors; and the trainer's process guard (who may run, never what it computes). Left
# out, so that editing them does not recompute every artifact.
KEY_NEUTRAL = ("worldpm/config.py", "worldpm/errors.py", "worldpm/store.py", "worldpm/modeling/trainer/guard.py")


def _project_roots() -> dict[str, Path]:
    """{top-level package: its folder} of the packages whose code can change a stage's output."""
    roots = {}
    for top in ("worldpm", "tasks"):
        spec = importlib.util.find_spec(top)
        if spec and spec.submodule_search_locations:
            roots[top] = Path(list(spec.submodule_search_locations)[0]).resolve()
    return roots


def _module_file(name: str, roots: dict[str, Path]) -> Path | None:
    top, _, rest = name.partition(".")
    if top not in roots:
        return None
    base = roots[top].joinpath(*rest.split(".")) if rest else roots[top]
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def _package_of(path: Path, roots: dict[str, Path]) -> str:
    for top, root in roots.items():
        if path.is_relative_to(root):
            parts = [top, *path.relative_to(root).with_suffix("").parts]
            return ".".join(parts[:-1])  # the package a module (or an __init__.py) is in
    return ""


_parse_lock = threading.Lock()


def _parse(f: Path) -> ast.AST:
    """ast.parse, retried: CPython 3.11's AST constructor keeps its recursion depth in per-interpreter state, so a
    parse that overlaps one in another thread of a flow run can fail with "SystemError: AST constructor recursion
    depth mismatch" (seen here in a served flow run; python/cpython#106905 and the reports around it). Our own
    parses take a lock; one that collides with another thread's is retried."""
    text = f.read_text()
    for attempt in range(10):
        try:
            with _parse_lock:
                return ast.parse(text, filename=str(f))
        except SystemError:
            if attempt == 9:
                raise
            time.sleep(0.01 * (attempt + 1))
    raise AssertionError("unreachable")


_names_cache: dict[str, list[str]] | None = None  # "file|package|size|mtime_ns" -> the names it imports
_names_dirty = False
_memo_lock = threading.RLock()  # stages resolve in the threads of a flow run


def _names_file() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "worldpm" / "imports.json"


def _names_memo() -> dict[str, list[str]]:
    """The import lists of the project's files, memoised by (file, size, mtime) across processes (parsing ~100
    files was ~0.8 s of every `worldpm run`, cached or not). Only what a file imports is memoised, never its
    content: the code version always hashes the files as they are. Call with _memo_lock held."""
    global _names_cache
    if _names_cache is None:
        try:
            loaded = json.loads(_names_file().read_text())
            _names_cache = loaded if isinstance(loaded, dict) else {}
        except (OSError, ValueError):
            _names_cache = {}
    return _names_cache


def _save_names_memo() -> None:
    global _names_dirty
    with _memo_lock:
        if not _names_dirty:
            return
        path = _names_file()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(_names_memo()))
            os.replace(tmp, path)  # atomic: a reader sees the old memo or the new one
        except OSError:  # a read-only home: the memo stays in this process
            pass
        _names_dirty = False


def _imported_names(f: Path, pkg: str) -> list[str]:
    """The module names file `f` imports anywhere in its body, memoised per (file, size, mtime) (_names_memo)."""
    global _names_dirty
    st = f.stat()
    prefix = f"{f}|{pkg}|"
    memo = f"{prefix}{st.st_size}|{st.st_mtime_ns}"
    with _memo_lock:
        cache = _names_memo()
        if memo in cache:
            return cache[memo]
        names: list[str] = []
        for node in ast.walk(_parse(f)):
            if isinstance(node, ast.Import):
                names += [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                    base = ".".join([*up, base] if base else up)
                names.append(base)
                names += [f"{base}.{a.name}" for a in node.names]  # `from pkg import module`
        for old in [k for k in cache if k.startswith(prefix)]:  # the file's earlier versions
            del cache[old]
        cache[memo] = names
        _names_dirty = True
        return names


def imported_files(path: Path, roots: dict[str, Path] | None = None) -> list[Path]:
    """`path` and every project source file it imports, directly or not, at module level or inside a function
    (a stage imports heavy libraries lazily), with the __init__.py of every package on the way."""
    roots = roots or _project_roots()
    seen: set[Path] = set()
    todo = [path.resolve()]
    while todo:
        f = todo.pop()
        if f in seen:
            continue
        seen.add(f)
        for name in _imported_names(f, _package_of(f, roots)):
            parts = name.split(".")
            for i in range(1, len(parts) + 1):  # the packages on the way are executed too
                m = _module_file(".".join(parts[:i]), roots)
                if m is not None and m.resolve() not in seen:
                    todo.append(m.resolve())
    return sorted(seen)


def code_version(stage: Stage) -> str:
    """sha256 of the stage module's source and of every project file it imports (not Prefect's TASK_SOURCE,
    which misses the helpers a task calls, and not a hand-kept list, which drifts from the imports)."""
    if stage.name in _code_cache:
        return _code_cache[stage.name]
    roots = _project_roots()
    h = hashlib.sha256()
    for f in imported_files(Path(stage.module.__file__), roots):
        top = next(t for t, r in roots.items() if f.is_relative_to(r))
        rel = f"{top}/{f.relative_to(roots[top]).as_posix()}"
        if rel in KEY_NEUTRAL:
            continue
        h.update(rel.encode())
        h.update(f.read_bytes())
    _save_names_memo()
    _code_cache[stage.name] = h.hexdigest()[:16]
    return _code_cache[stage.name]


# ---- keys, execution ----------------------------------------------------------------------------------------------

RunOne = Callable[[str, "dict[str, ArtifactRef]", bool, bool], "StageResult"]


@dataclass
class StageResult:
    stage: str
    key: str
    status: str  # ran | cached
    path: str | None
    seconds: float
    ref: ArtifactRef | None = None
    manifest: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"stage": self.stage, "key": self.key, "status": self.status, "path": self.path,
                "seconds": round(self.seconds, 3)}


def input_digest(stage: Stage, upstream: str, ref: ArtifactRef) -> str:
    """The digest of what a stage reads from an upstream artifact: the whole artifact, or only the files its
    module names in INPUT_FILES (shard reads clean's pairs.parquet, not its report.json, whose rule settings
    change with every threshold: a threshold that drops nothing must not rerun shard)."""
    patterns = stage.input_files.get(upstream)
    if not patterns:
        return ref.digest
    files = {f["path"]: f["sha256"] for f in ref.manifest().get("files", [])}
    picked = sorted((p, h) for p, h in files.items() if any(fnmatch.fnmatch(p, pat) for pat in patterns))
    if not picked:
        raise StageError(f"stage {stage.name}: upstream {upstream} artifact {ref.path} has none of {patterns}")
    return "files:" + sha256_text(canonical_json(picked))


def damaged_inputs(stage: Stage, inputs: dict[str, ArtifactRef], store: ArtifactStore,
                   log: logging.Logger | logging.LoggerAdapter | None = None) -> list[str]:
    """The upstream stages whose artifact, as far as `stage` reads it, no longer matches its manifest's content
    digests; each is set aside (named in the log) so that it is rebuilt. Called before a stage runs."""
    bad = []
    log = log or logging.getLogger("worldpm")
    for u in stage.upstream:
        ref = inputs[u]
        patterns = stage.reads(u)
        size = sum(f.get("bytes", 0) for f in ref.manifest().get("files", [])
                   if not patterns or any(fnmatch.fnmatch(f["path"], p) for p in patterns))
        if size > 1 << 30:  # model weights: seconds to minutes of hashing, said before it starts
            log.info("%s: checking the content digests of %s/%s (%.1f GB) before reading it", stage.name, u, ref.key,
                     size / (1 << 30))
        problem = store.verify(ref, deep=True, patterns=patterns)
        if problem is not None:
            aside = store.set_aside(ref, problem)
            log.warning(
                "%s: its input %s/%s is damaged (%s): set aside as %s; it is rebuilt first", stage.name, u, ref.key,
                problem, aside.name)
            bad.append(u)
    return bad


def resolve(stage: Stage, cfg: PipelineConfig, inputs: dict[str, ArtifactRef]) -> tuple[str, dict]:
    """The stage's key and config given its upstream artifacts."""
    missing = [u for u in stage.upstream if u not in inputs]
    if missing:
        raise StageError(f"stage {stage.name} needs {', '.join(missing)} first")
    scfg = stage.config(cfg)
    keyed = {k: v for k, v in scfg.items() if k not in stage.not_in_key}
    key = stage_key(stage.name, code_version(stage), keyed,
                    {u: input_digest(stage, u, inputs[u]) for u in stage.upstream})
    return key, scfg


# What this process is doing, for a watcher that must not stop it mid-stage (flows/cli.py stops a run whose Prefect
# server is gone only between stages, so a stage that was running is committed, not lost).
_activity_lock = threading.Lock()
_running: dict[str, int] = {}
_done: list[str] = []


_hold = threading.Event()


def activity() -> tuple[list[str], list[str]]:
    """(the stages executing now, the stages executed to their end: run and committed, or cached) in this process."""
    with _activity_lock:
        return [n for n, c in _running.items() if c], list(_done)


def hold_new_stages() -> None:
    """From now on no stage starts in this process (`execute` waits at its door): the process is about to end, and
    the stages executing now are let finish (flows/cli.py, when the Prefect server is gone)."""
    _hold.set()


def execute(stage: Stage, cfg: PipelineConfig, inputs: dict[str, ArtifactRef], store: ArtifactStore,
            force: bool = False, log: logging.Logger | logging.LoggerAdapter | None = None) -> StageResult:
    """Skip the stage if its key is committed (unless forced); otherwise run it and commit atomically."""
    with _activity_lock:
        held = _hold.is_set()
        if not held:
            _running[stage.name] = _running.get(stage.name, 0) + 1
    while held:  # the process ends without it (hold_new_stages)
        time.sleep(3600)
    try:
        res = _execute(stage, cfg, inputs, store, force, log)
    finally:
        with _activity_lock:
            _running[stage.name] -= 1
    with _activity_lock:
        _done.append(stage.name)
    return res


def _execute(stage: Stage, cfg: PipelineConfig, inputs: dict[str, ArtifactRef], store: ArtifactStore,
             force: bool, log: logging.Logger | logging.LoggerAdapter | None) -> StageResult:
    name = stage.name
    log = log or logging.getLogger(f"worldpm.{name}")
    t0 = time.perf_counter()
    with store.using():
        key, scfg = resolve(stage, cfg, inputs)
        if not force and (ref := store.find(name, key, log)) is not None:
            log.info("%s: cached %s (%s)", name, key, ref.path)
            return StageResult(name, key, "cached", ref.path, time.perf_counter() - t0, ref, ref.manifest())
        with store.key_lock(name, key):
            if not force and (ref := store.get(name, key)) is not None:  # another run finished it while we waited
                log.info("%s: cached %s (finished by a concurrent run)", name, key)
                return StageResult(name, key, "cached", ref.path, time.perf_counter() - t0, ref, ref.manifest())
            for stale in store.clear_stale_tmp(name, key):
                log.warning("%s: removed the unfinished output of an earlier run: %s", name, stale)
            tmp = None
            try:
                tmp = store.new_tmp(name, key)
                log.info("%s: running (key %s)", name, key)
                upstream = {u: inputs[u] for u in stage.upstream}
                stats = stage.module.run(scfg, upstream, tmp, log, store.work_dir(name, key)) or {}
                seconds = time.perf_counter() - t0
                _check_counts(name, stats)
                manifest = {
                    "pipeline": cfg.name,
                    "code_version": code_version(stage),
                    "config": scfg,
                    "upstream": {u: {"key": ref.key, "digest": input_digest(stage, u, ref)}
                                 for u, ref in upstream.items()},
                    "seconds": round(seconds, 3),
                    **stats,
                }
                ref = store.commit(name, key, tmp, manifest, replace=force)
            except BaseException as e:
                if tmp is not None:
                    shutil.rmtree(tmp, ignore_errors=True)
                full = disk_full(e)
                if full is None:
                    raise
                place = getattr(full, "filename", None)  # a file of its own output: name the store
                place = place if place and not Path(place).resolve().is_relative_to(store.root) else store.root
                raise DiskFull(
                    f"{name}: the disk is full (no space left on the device of {place}, {free_space(place)} free): "
                    f"nothing was committed and its unfinished output is removed; free space there (`worldpm "
                    f"artifacts gc` removes what the config does not use) or set artifacts_dir to a larger disk, "
                    f"then run again: the stages before {name} are cached") from e
            store.drop_work_dir(name, key)
    log.info("%s: done in %.1fs -> %s", name, seconds, ref.path)
    hook = getattr(stage.module, "after_commit", None)
    if hook is not None:
        hook(cfg, ref, log)
    return StageResult(name, key, "ran", ref.path, time.perf_counter() - t0, ref, ref.manifest())


def _check_counts(name: str, stats: dict[str, Any]) -> None:
    if {"rows_in", "rows_out", "rows_rejected"} <= stats.keys():
        if stats["rows_in"] != stats["rows_out"] + stats["rows_rejected"]:
            raise StageError(
                f"stage {name}: rows_in {stats['rows_in']} != rows_out {stats['rows_out']} + rejected "
                f"{stats['rows_rejected']}: rows were lost"
            )


def cached_only(stage: Stage, cfg: PipelineConfig, inputs: dict[str, ArtifactRef],
                store: ArtifactStore) -> StageResult:
    """Resolve an upstream stage that --only/--from must not run: it has to be in the cache."""
    key, _ = resolve(stage, cfg, inputs)
    ref = store.find(stage.name, key, logging.getLogger(f"worldpm.{stage.name}"))
    if ref is None:
        raise StageError(f"stage {stage.name} is not cached for this config (key {key}); run it first "
                         "(without --only/--from)")
    return StageResult(stage.name, key, "cached", ref.path, 0.0, ref, ref.manifest())
