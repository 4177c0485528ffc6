"""Sweeps: `worldpm sweep`, the flow `worldpm_sweep` and its deployment `worldpm/sweep`.

The `sweep:` section of the config (worldpm/sweep.py) is a grid; each point is the same DAG with the point's
``--set`` overrides (and the pipeline name ``<name>-<point>``), run as a subflow ``worldpm-sweep-point`` of its own.
Points share every cached artifact their overrides do not change (the engine's keys decide): one tokenize for all
models that share a tokenizer, and a second run of the same sweep is all cache hits.

Concurrency is Prefect's own: global concurrency limits (worldpm.sweep.plan_slots), one slot per GPU of this host
(a point holds the GPUs of its processes, all at once, and is pinned to them through train.devices), or one slot
for the whole CPU host (points run one at a time). Every point starts at once in a thread of its own and waits for
its slots on the server, so a sweep over GPUs keeps every block busy. A point that fails is recorded with its
one-line error; the others go on. At the end the sweep report (worldpm/report/sweep.py: every model's eval curve
and power-law fit, per category, a table of alpha by model and set, the failed points named) is written to
``<artifacts_dir>/sweeps/<name>/`` (outside the store: it reads the points' artifacts, replaced as a whole each
run) and published as the markdown artifact ``<name>-sweep`` with its figure embedded.
"""
from __future__ import annotations

import contextvars
import os
import re
import shutil
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from prefect import flow, get_run_logger

from flows import policy
from flows.artifacts import _artifact_key, publish_prefect_artifacts
from flows.worldpm import run_pipeline
from worldpm.config import PipelineConfig, load_config
from worldpm.data.sources import read_root
from worldpm.errors import ConfigError, StageError

SWEEPS_DIR = "sweeps"


def sweep_dir(cfg: PipelineConfig) -> Path:
    return Path(cfg.artifacts_dir) / SWEEPS_DIR / (re.sub(r"[^A-Za-z0-9_.-]+", "_", cfg.name).strip("._") or "sweep")


def _one_line(e: BaseException) -> str:
    text = (str(e).strip().splitlines() or [""])[0]
    return text if isinstance(e, (StageError, ConfigError)) else f"{type(e).__name__}: {text}"


@flow(name="worldpm-sweep-point", persist_result=False, log_prints=True, flow_run_name="point {label}")
def sweep_point(label: str, cfg: PipelineConfig, limits: list[str], devices: list[int] | None = None) -> list[dict]:
    """One point of a sweep: wait for its concurrency slots, then the DAG with its config (already checked by the
    sweep flow), then its run report as its own Prefect artifacts."""
    from prefect.concurrency.sync import concurrency

    log = get_run_logger()
    if devices is not None:
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"devices": list(devices)})})
    log.info("sweep point %s: waiting for %s", label, ", ".join(limits))
    with concurrency(limits, occupy=1, strict=True):
        log.info("sweep point %s: running%s", label, f" on GPUs {devices}" if devices is not None else "")
        results = run_pipeline(cfg)
    publish_prefect_artifacts(cfg, results)
    return results


def _gpus() -> list[int] | None:
    import torch

    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else None


def _processes(cfg: PipelineConfig, gpus: list[int] | None) -> int:
    n = cfg.train.num_processes
    return (len(gpus) if gpus else 1) if n == "auto" else int(n)


@flow(name="worldpm", flow_run_name="sweep", persist_result=False, log_prints=True)
def worldpm_sweep(config_path: str | None = None, overrides: list[str] | None = None,
                  sources: list[str] | None = None) -> dict:
    """The sweep of the config's `sweep:` section: every point of its grid through the DAG, under Prefect's
    concurrency limits, then the sweep report. A failed point is named in the report; the others go on."""
    from prefect.client.orchestration import get_client

    from worldpm.modeling.eval_curve import FILE, read_eval_curve
    from worldpm.report.sweep import PointOutcome, write_sweep_report
    from worldpm.sweep import plan_slots, point_configs

    log = get_run_logger()
    served = policy.served_run()
    roots = None
    if served is not None:  # a deployment run: only what the served config allows, never its sweep: section
        cfg = policy.check_run(served, config_path, overrides, sources)
        overrides = policy.effective_overrides(served, overrides)
        roots = served.roots  # and data files are checked again where they are opened
    else:
        cfg = load_config(config_path, overrides or [], sources or None)
    if cfg.sweep is None:
        raise ConfigError(f"{config_path or 'the built-in defaults'}: no `sweep:` section; a sweep needs its grid "
                          "(pipeline.yaml shows one)")
    points = point_configs(cfg.sweep, lambda ovs: load_config(config_path, list(overrides or []) + ovs,
                                                              sources or None), cfg.name)
    gpus = _gpus()
    plan = plan_slots([_processes(c, gpus) for _, c in points], gpus, host=socket.gethostname())
    with get_client(sync_client=True) as client:
        for name, slots in plan.limits.items():
            client.upsert_global_concurrency_limit_by_name(name, slots)
    log.info("sweep %s: %d points (%s); concurrency limits %s", cfg.name, len(points),
             "; ".join(p.label for p, _ in points), ", ".join(f"{k} ({v} slot)" for k, v in plan.limits.items()))

    def one(i: int) -> PointOutcome:
        p, c = points[i]
        try:
            dev = plan.devices[i]
            results = sweep_point(p.label, c, list(plan.per_point[i]), list(dev) if dev is not None else None)
        except BaseException as e:  # noqa: BLE001 - a failed point is reported, the sweep goes on
            if isinstance(e, KeyboardInterrupt):
                raise
            log.error("sweep point %s failed: %s", p.label, _one_line(e))
            return PointOutcome(p.label, "failed", error=_one_line(e))
        by = {r["stage"]: r for r in results}
        train = by.get("train") or {}
        pts = tuple(read_eval_curve(Path(train["path"]) / FILE)) if train.get("path") else ()
        keys = {s: by[s]["key"] for s in ("train", "evaluate") if by.get(s, {}).get("key")}
        statuses[p.label] = {r["stage"]: r["status"] for r in results}
        return PointOutcome(p.label, "ok", points=pts, keys=keys)

    statuses: dict[str, dict[str, str]] = {}

    # every point in a thread of its own, each a subflow of this run (the context copied into the thread); the
    # limits decide how many run at once
    with read_root(roots), ThreadPoolExecutor(max_workers=len(points), thread_name_prefix="sweep-point") as pool:
        futures = [pool.submit(contextvars.copy_context().run, one, i) for i in range(len(points))]
        outcomes = [f.result() for f in futures]

    out = sweep_dir(cfg)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    written = write_sweep_report(cfg.name, outcomes, tmp, list(cfg.plot.formats) or ["png"])
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
    _publish(cfg, out)
    failed = [o for o in outcomes if o.status != "ok"]
    log.info("sweep %s: %d of %d points finished%s; report %s", cfg.name, len(outcomes) - len(failed), len(outcomes),
             f", failed: {', '.join(o.label for o in failed)}" if failed else "", out / "report.md")
    return {"name": cfg.name, "report": str(out / "report.md"), "figures": written["figures"],
            "points": [{"label": o.label, "status": o.status, "keys": o.keys, "error": o.error,
                        "eval_points": len({x.step for x in o.points}), "stages": statuses.get(o.label, {})}
                       for o in outcomes],
            "failed": [o.label for o in failed]}


def _publish(cfg: PipelineConfig, out: Path) -> None:
    from prefect.artifacts import create_markdown_artifact

    from worldpm.report.markdown import embed_images

    md = embed_images((out / "report.md").read_text(), out)
    create_markdown_artifact(markdown=f"Sweep files (figure, report.md, fits.json): `{out}`\n\n" + md,
                             key=f"{_artifact_key(cfg.name)}-sweep", description=f"{cfg.name}: sweep report")
