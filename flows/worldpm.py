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
from prefect.states import Completed

from flows.artifacts import publish_prefect_artifacts
from tasks import PIPELINE
from worldpm import engine
from worldpm.config import PipelineConfig, load_config
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
    """Resolve or run the selected stages in DAG order; returns [{stage, key, status, path, seconds}]."""
    force_set = set(force or [])
    for f in force_set:
        PIPELINE[f]  # an unknown stage is a one-line error before anything runs
    from_cache, to_run = PIPELINE.select(until=until, only=only, start=start)
    refs: dict[str, ArtifactRef] = {}
    results: list[dict] = []
    for stage in PIPELINE:
        name = stage.name
        if name not in from_cache and name not in to_run:
            results.append({"stage": name, "key": None, "status": "skipped", "path": None, "seconds": 0.0})
            continue
        state = run_stage.with_options(name=name)(
            name, cfg, {u: refs[u] for u in stage.upstream}, force=name in force_set,
            cache_only=name in from_cache, return_state=True)
        res = state.result()  # raises the stage's error if the task failed
        refs[name] = res.ref
        results.append(res.to_json())
    return results


@flow(name="worldpm", persist_result=False, log_prints=True)
def worldpm(config_path: str | None = None, overrides: list[str] | None = None, sources: list[str] | None = None,
            until: str | None = None, only: str | None = None, start: str | None = None,
            force: list[str] | None = None) -> list[dict]:
    """download -> normalise -> clean -> shard -> tokenize -> ref_logps -> train -> evaluate -> plot, each stage cached by
    content."""
    cfg = load_config(config_path, overrides or [], sources or None)
    log = get_run_logger()
    results = run_pipeline(cfg, until=until, only=only, start=start, force=force)
    ran = [r["stage"] for r in results if r["status"] == "ran"]
    log.info("stages run: %s; cached: %s", ", ".join(ran) or "none",
             ", ".join(r["stage"] for r in results if r["status"] == "cached") or "none")
    if not ran:
        log.info("nothing changed: every stage was a cache hit")
    publish_prefect_artifacts(cfg, results)  # markdown report + table of stages, metrics and the data funnel
    return results
