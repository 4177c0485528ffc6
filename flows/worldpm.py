"""Prefect flow `worldpm`: one task per stage, wiring only (stage logic lives in tasks/, the engine in worldpm/).

What passes between tasks is an artifact reference (stage, key, path, digest), never a DataFrame or a model; the
config is loaded once, in the flow, and handed to every task as the typed object. Prefect's own caching is off (its
default policy keys on the run id, and INPUTS/TASK_SOURCE would hash paths, not content): the artifact store
decides, and a hit is reported as a `Cached` state in Prefect and the CLI.
"""
from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.states import Completed

from flows import policy
from flows.artifacts import publish_prefect_artifacts
from flows.runinfo import RunLabel
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
    with store.run_lock(f"{'flow run ' + repr(run_name) if run_name else 'a run'} of pipeline {cfg.name!r}"):
        return PIPELINE.run(cfg, store, until=until, only=only, start=start, force=force or [], run_one=run_one,
                            log=get_run_logger())


@flow(name="worldpm", persist_result=False, log_prints=True)
def worldpm(config_path: str | None = None, overrides: list[str] | None = None, sources: list[str] | None = None,
            until: str | None = None, only: str | None = None, start: str | None = None,
            force: list[str] | None = None) -> list[dict]:
    """download -> normalise -> clean -> shard -> tokenize -> ref_logps -> train -> evaluate -> plot, each stage
    cached by content."""
    served = policy.served_run()
    roots = None
    if served is not None:  # a deployment run: only what the served config allows (flows/policy.py)
        cfg = policy.check_run(served, config_path, overrides, sources)
        roots = served.roots  # and data files are checked again where they are opened
    else:
        cfg = load_config(config_path, overrides or [], sources or None)
    log = get_run_logger()
    label = RunLabel(cfg, log, until=until, only=only, start=start)
    label.started(config_path, overrides, sources)  # name, tags, the resolved configuration (flows/runinfo.py)
    with read_root(roots):
        results = run_pipeline(cfg, until=until, only=only, start=start, force=force)
    ran = [r["stage"] for r in results if r["status"] == "ran"]
    # the console script's summary line says both (worldpm/cli.py): here for the log file and the Prefect UI
    log.info("stages run: %s; cached: %s", ", ".join(ran) or "none",
             ", ".join(r["stage"] for r in results if r["status"] == "cached") or "none", extra=engine.DETAIL)
    if not ran:
        log.info("nothing changed: every stage was a cache hit", extra=engine.DETAIL)
    label.finished(results)
    publish_prefect_artifacts(cfg, results)  # markdown report + table of stages, metrics and the data funnel
    return results
