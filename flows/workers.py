"""Runs executed by Prefect workers (prefect.yaml, docs/deploy.md "Work pools"): what such a run is checked against.

A worker's run is a deployment run like a served one (flows/policy.py): its baseline is its deployment's own
parameters (config_path, overrides), read from the API. But a worker also applies the run's *job variables*, and a
process pool's default base job template lets a run set its ``command`` (anything runs instead of the flow) and its
``env`` (``WORLDPM_SERVED``, which would hand the policy a baseline of the run's choosing, or ``PYTHONPATH``). So a
run on such a pool could step around ``serve.allowed_overrides`` before the flow ever sees it. worldpm's pools are
made from ``flows/work-pool.json`` (``prefect work-pool create cpu --type process --base-job-template
flows/work-pool.json``): it names only harmless variables and closes the rest (``additionalProperties: false``), so
the Prefect server itself refuses such a run at creation (422). A run on a pool whose template is open is refused
by the flow, in one line that says how to close it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

POOL_TEMPLATE = Path(__file__).with_name("work-pool.json")
HARMLESS = ("name", "labels", "stream_output")  # what a run may still set: a name, labels, where its output goes


def pool_problem(base_job_template: dict[str, Any] | None) -> str | None:
    """Why a run on a work pool with this base job template could change more than its deployment allows (its
    command, environment or working directory), or None when it cannot."""
    template = base_job_template or {}
    variables = template.get("variables") or {}
    names = set((variables.get("properties") or {}).keys())
    if variables.get("additionalProperties", True) is not False:
        return "its base job template lets a run set any job variable (variables.additionalProperties is not false)"
    opened = sorted(names - set(HARMLESS))
    if opened:
        return f"its base job template lets a run set {', '.join(opened)}"
    return None  # (a placeholder in job_configuration of a variable that is not declared resolves to nothing)


def worker_baseline(flow_run_id) -> tuple[str | None, list[str], str] | None:
    """The policy's baseline of a flow run executed by a worker: its deployment's parameters (config_path,
    overrides) and where they come from, after checking that its work pool lets no run step around them
    (ConfigError, one line, otherwise). None when the run is not a worker's (no work pool: `worldpm serve`,
    `worldpm run`). flows/policy.py makes its Served of them (this module does not import it: no import circle)."""
    from prefect.client.orchestration import get_client

    from worldpm.errors import ConfigError

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(flow_run_id)
        if not run.work_pool_name or not run.deployment_id:
            return None
        pool = client.read_work_pool(run.work_pool_name)
        problem = pool_problem(pool.base_job_template)
        if problem:
            raise ConfigError(
                f"a deployment run on work pool {pool.name!r} is refused: {problem}, so a run could step around "
                f"serve.allowed_overrides; close it with `prefect work-pool update {pool.name} --base-job-template "
                "flows/work-pool.json` (docs/deploy.md)")
        dep = client.read_deployment(run.deployment_id)
    params = dep.parameters or {}
    return (params.get("config_path"), list(params.get("overrides") or []),
            f"deployment {dep.name} on work pool {pool.name}")
