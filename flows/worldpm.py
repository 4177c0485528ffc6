"""Prefect flow `worldpm`: one task per stage, wiring only (stage logic lives in tasks/, the engine in worldpm/).

What passes between tasks is an artifact reference (stage, key, path, digest), never a DataFrame or a model; the
config is loaded once, in the flow, and handed to every task as the typed object. Prefect's own caching is off (its
default policy keys on the run id, and INPUTS/TASK_SOURCE would hash paths, not content): the artifact store
decides, and a hit is reported as a `Cached` state in Prefect and the CLI.
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.settings import PREFECT_API_URL
from prefect.states import Completed

from flows import policy
from flows.artifacts import publish_prefect_artifacts
from tasks import PIPELINE
from worldpm import engine
from worldpm.config import PipelineConfig, load_config
from worldpm.data.sources import read_root
from worldpm.store import ArtifactRef, ArtifactStore


@task(cache_policy=NO_CACHE, persist_result=False, task_run_name="{stage}")
def run_stage(stage: str, cfg: PipelineConfig, inputs: dict[str, ArtifactRef], force: bool = False,
              cache_only: bool = False) -> Any:
    st, store = PIPELINE[stage], ArtifactStore(cfg.artifacts_dir)
    if cache_only:
        res = engine.cached_only(st, cfg, inputs, store)
    else:
        res = engine.execute(st, cfg, inputs, store, force=force, log=get_run_logger())
    if res.status == "cached":
        return Completed(name="Cached", data=res, message=f"{stage}: cached artifact {res.key}")
    return res


def run_pipeline(cfg: PipelineConfig, until: str | None = None, only: str | None = None,
                 start: str | None = None, force: list[str] | None = None) -> list[dict]:
    """Resolve or run the selected stages in DAG order; returns [{stage, key, status, path, seconds}].

    The run holds the artifact store (shared) from its first stage to its last, so `worldpm artifacts gc` refuses
    while it is in progress instead of deleting what a later stage of it reads."""
    store = ArtifactStore(cfg.artifacts_dir)

    def run_one(name: str, inputs: dict[str, ArtifactRef], force_it: bool, cache_only: bool) -> engine.StageResult:
        state = run_stage.with_options(name=name)(name, cfg, inputs, force=force_it, cache_only=cache_only,
                                                  return_state=True)
        return state.result()  # raises the stage's error if the task failed

    run_name = flow_run.get_name()
    mark_dead_flow_runs(store)
    flow_run_note(store)
    with store.run_lock(f"{'flow run ' + repr(run_name) if run_name else 'a run'} of pipeline {cfg.name!r}"):
        return PIPELINE.run(cfg, store, until=until, only=only, start=start, force=force or [], run_one=run_one,
                            log=get_run_logger())


# ---- a run's own flow runs, so that the next run can end one whose process died -----------------------------------
FLOW_RUNS = ".flow-runs"  # <artifacts_dir>/.flow-runs/<flow run id>.json while a flow run of this store is going


_notes: list[Path] = []  # this process's notes, removed once the flow run's final state is on the server


def flow_run_note(store: ArtifactStore) -> None:
    """A note in the store while this flow run is going: its id, the process, the API it reports to. It is removed
    by `end_flow_run_notes` once Prefect has reported the flow run's final state (`worldpm run` calls it when the
    flow call returns or raises); a process killed before that (SIGKILL, the machine, a lost server) leaves it, and
    its flow run Running on the server, for the next run of this store to end (`mark_dead_flow_runs`)."""
    run_id = flow_run.get_id()
    if not run_id:
        return
    note = store.root / FLOW_RUNS / f"{run_id}.json"
    try:
        note.parent.mkdir(parents=True, exist_ok=True)
        note.write_text(json.dumps({"flow_run_id": str(run_id), "pid": os.getpid(), "host": socket.gethostname(),
                                    "api_url": PREFECT_API_URL.value(), "started": time.time()}))
    except OSError:  # a read-only or full store: the stage that writes will say so
        return
    _notes.append(note)


def end_flow_run_notes() -> None:
    """The flow runs of this process have ended and their final state is reported: their notes go."""
    while _notes:
        _notes.pop().unlink(missing_ok=True)


def mark_dead_flow_runs(store: ArtifactStore) -> list[str]:
    """Flow runs of this store whose process died (on this host) and that this server still shows as running (the
    background server may come back on another port, with the same database): set Crashed, saying which process
    died. Their notes are removed. Returns their ids."""
    from prefect.client.orchestration import get_client
    from prefect.states import Crashed

    log = get_run_logger()
    api, host, marked = PREFECT_API_URL.value(), socket.gethostname(), []
    for note in sorted((store.root / FLOW_RUNS).glob("*.json")):
        try:
            d = json.loads(note.read_text())
            pid = int(d["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            note.unlink(missing_ok=True)
            continue
        if d.get("host") != host or pid == os.getpid() or _alive(pid):
            continue  # another machine's, or still going
        try:
            with get_client(sync_client=True) as client:
                fr = client.read_flow_run(d["flow_run_id"])
                if not fr.state or not fr.state.is_final():
                    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(d.get("started", 0)))
                    client.set_flow_run_state(fr.id, Crashed(message=(
                        f"the worldpm process that ran it (pid {pid} on {host}, started {started}) died without "
                        "ending it (killed?); marked Crashed by the next run of this store")), force=True)
                    log.warning("flow run %r (%s): its process (pid %d) died without ending it; marked Crashed",
                                fr.name, fr.id, pid)
                    marked.append(str(fr.id))
        except Exception as e:  # not on this server (another database: kept for when that one is back), or busy
            stale = time.time() - float(d.get("started") or 0) > 7 * 86400
            if type(e).__name__ != "ObjectNotFound" or (d.get("api_url") != api and not stale):
                continue
        note.unlink(missing_ok=True)
    return marked


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (killed, not yet reaped by its parent) is dead
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][:1] != "Z"
    except OSError:
        return True


@flow(name="worldpm", persist_result=False, log_prints=True)
def worldpm(config_path: str | None = None, overrides: list[str] | None = None, sources: list[str] | None = None,
            until: str | None = None, only: str | None = None, start: str | None = None,
            force: list[str] | None = None) -> list[dict]:
    """download -> normalise -> clean -> shard -> tokenize -> ref_logps -> train -> evaluate -> plot, each stage
    cached by content."""
    served = policy.served_run()
    roots = None
    if served is not None:  # a deployment run: only what the served config allows (flows/policy.py)
        policy.check_run(served, config_path, overrides, sources)
        overrides = policy.effective_overrides(served, overrides)
        roots = policy.read_roots(served)  # and data files are checked again where they are opened
    cfg = load_config(config_path, overrides or [], sources or None)
    log = get_run_logger()
    with read_root(roots):
        results = run_pipeline(cfg, until=until, only=only, start=start, force=force)
    ran = [r["stage"] for r in results if r["status"] == "ran"]
    log.info("stages run: %s; cached: %s", ", ".join(ran) or "none",
             ", ".join(r["stage"] for r in results if r["status"] == "cached") or "none")
    if not ran:
        log.info("nothing changed: every stage was a cache hit")
    publish_prefect_artifacts(cfg, results)  # markdown report + table of stages, metrics and the data funnel
    return results
