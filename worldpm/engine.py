"""The DAG and its execution: how one stage is keyed, skipped or run, and which stages a run selects. No Prefect
here (flows/ wires these); the code version of a stage is worldpm/codeversion.py's.

A stage is a module of ``tasks/`` that declares ``STAGE = StageSpec(...)`` (see tasks/__init__.py, which lists the
stages and their edges: the DAG, written once):

    config(cfg: PipelineConfig) -> C            the stage's typed config (a config.StageConfig): the part of the
                                                config its output depends on; its canonical JSON goes into the key
                                                (fields marked config.runtime_field stay out of it)
    run(scfg: C, inputs: dict[str, ArtifactRef], out: Path, log, work: Path) -> dict
                                                writes its artifact into `out` (a temporary folder renamed into
                                                place on success) and returns manifest fields (rows_in, rows_out,
                                                rows_rejected, ...). `work` is a per-key scratch folder that
                                                survives a crash (training checkpoints live there) and is deleted
                                                after the commit.
    input_files: {upstream: (glob, ...)}        read only these files of an upstream artifact (their digest is
                                                what the key sees): early cutoff on what the stage really reads
    reads: {upstream: (glob, ...)}              the files of an upstream artifact the stage opens: checked against
                                                their content digests before it runs (default: input_files, else
                                                the whole artifact)
    after_commit(cfg, ref, log)                 runs after a new artifact is committed (evaluate: the history of
                                                runs and the regression guard, which lives outside the store)
    preflight(cfg)                              ConfigError when the config cannot work for this stage (evaluate
                                                without a test split): checked for every stage a run selects,
                                                before any stage runs

The engine knows stages only through the `Pipeline` it is handed: nothing in worldpm/ imports tasks/ or flows/.
"""
from __future__ import annotations

import fnmatch
import logging
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Generic, Iterable, Mapping, TypeVar

from worldpm.codeversion import code_version as _code_version
from worldpm.codeversion import remember_loaded_sources
from worldpm.config import PipelineConfig, StageConfig, key_dict
from worldpm.errors import ConfigError, DiskFull, StageError, disk_full, free_space
from worldpm.store import ArtifactRef, ArtifactStore, canonical_json, sha256_text, stage_key

C = TypeVar("C", bound=StageConfig)
Log = logging.Logger | logging.LoggerAdapter


@dataclass(frozen=True)
class StageSpec(Generic[C]):
    """What a stage module declares as ``STAGE``: its typed config, its run, and what it reads of its inputs."""

    config: Callable[[PipelineConfig], C]
    run: Callable[[C, dict[str, ArtifactRef], Path, Log, Path], dict]
    input_files: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    reads: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    after_commit: Callable[[PipelineConfig, ArtifactRef, Log], None] | None = None
    preflight: Callable[[PipelineConfig], None] | None = None


@dataclass(frozen=True)
class Stage:
    """One node of the DAG: its name, the module that implements it (its STAGE; its source files are the stage's
    code version), the stages whose artifacts it reads."""

    name: str
    module: ModuleType
    upstream: tuple[str, ...] = ()

    @property
    def spec(self) -> StageSpec:
        return self.module.STAGE

    def config(self, cfg: PipelineConfig) -> StageConfig:
        return self.spec.config(cfg)

    @property
    def input_files(self) -> Mapping[str, tuple[str, ...]]:
        return self.spec.input_files

    def reads(self, upstream: str) -> tuple[str, ...] | None:
        """The files of `upstream` this stage opens (globs), None for all of them."""
        return (self.spec.reads.get(upstream) or self.input_files.get(upstream)) or None

    @property
    def code_version(self) -> str:
        return _code_version(self.name, self.module)


class Pipeline:
    """The stages in a topological order; checked when built (an edge to a later or unknown stage is a bug)."""

    def __init__(self, stages: Iterable[Stage]):
        self.stages = tuple(stages)
        remember_loaded_sources()  # the stage modules are loaded: their code versions follow what was loaded
        self._by_name: dict[str, Stage] = {}
        for s in self.stages:
            if s.name in self._by_name:
                raise ValueError(f"stage {s.name!r} is listed twice")
            if not isinstance(getattr(s.module, "STAGE", None), StageSpec):
                raise ValueError(f"stage {s.name!r}: {s.module.__name__} declares no STAGE = StageSpec(...)")
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
            check = self[name].spec.preflight
            if check is not None:
                check(cfg)
        return to_run

    def resolve(self, name: str, cfg: PipelineConfig, inputs: dict[str, ArtifactRef]) -> tuple[str, StageConfig]:
        """The key and stage config of stage `name` (see `resolve`)."""
        return resolve(self[name], cfg, inputs)

    def execute(self, name: str, cfg: PipelineConfig, inputs: dict[str, ArtifactRef], store: ArtifactStore,
                force: bool = False, log: Log | None = None) -> "StageResult":
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
            log: Log | None = None) -> list[dict]:
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


# ---- keys, execution ----------------------------------------------------------------------------------------------

# A line the terminal leaves to --verbose (the run's log file and the Prefect UI keep it): the CLI's line per stage
# says it already (worldpm/cli.py)
DETAIL = {"worldpm_detail": True}

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
    spec names in input_files (shard reads clean's pairs.parquet, not its report.json, whose rule settings
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
                   log: Log | None = None) -> list[str]:
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


def resolve(stage: Stage, cfg: PipelineConfig, inputs: dict[str, ArtifactRef]) -> tuple[str, StageConfig]:
    """The stage's key and typed config given its upstream artifacts. The key hashes the config's canonical JSON
    without its runtime fields (config.key_dict)."""
    missing = [u for u in stage.upstream if u not in inputs]
    if missing:
        raise StageError(f"stage {stage.name} needs {', '.join(missing)} first")
    scfg = stage.config(cfg)
    key = stage_key(stage.name, stage.code_version, key_dict(scfg),
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
            force: bool = False, log: Log | None = None) -> StageResult:
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
            log.info("%s: cached %s (%s)", name, key, ref.path, extra=DETAIL)
            return StageResult(name, key, "cached", ref.path, time.perf_counter() - t0, ref, ref.manifest())
        with store.key_lock(name, key):
            if not force and (ref := store.get(name, key)) is not None:  # another run finished it while we waited
                log.info("%s: cached %s (finished by a concurrent run)", name, key, extra=DETAIL)
                return StageResult(name, key, "cached", ref.path, time.perf_counter() - t0, ref, ref.manifest())
            for stale in store.clear_stale_tmp(name, key):
                log.warning("%s: removed the unfinished output of an earlier run: %s", name, stale)
            tmp = None
            try:
                tmp = store.new_tmp(name, key)
                log.info("%s: running (key %s)", name, key)
                upstream = {u: inputs[u] for u in stage.upstream}
                stats = stage.spec.run(scfg, upstream, tmp, log, store.work_dir(name, key)) or {}
                seconds = time.perf_counter() - t0
                _check_counts(name, stats)
                manifest = {
                    "pipeline": cfg.name,
                    "code_version": stage.code_version,
                    "config": key_dict(scfg),
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
    log.info("%s: done in %.1fs -> %s", name, seconds, ref.path, extra=DETAIL)
    if stage.spec.after_commit is not None:
        stage.spec.after_commit(cfg, ref, log)
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
