"""Runs you can tell apart on Prefect's runs page, and a quiet `worldpm run`, against the session's real server.

A tiny pipeline (the demo data, a tiny BERT trained two steps in process) runs once through the flow; then the same
config through the console script is a cached run: a line per stage and a summary line on the terminal, a name and
tags that say nothing ran, and no new report. A second pipeline name publishes under its own keys.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from support import TINY_BERT

pytestmark = pytest.mark.slow

NAME = "tiny-alpha"


def write_config(folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"name": name, "artifacts_dir": "store", "tokenize": {"max_length": 64},
           "model": {"from_config": yaml.safe_load(TINY_BERT)},
           "train": {"max_steps": 2, "batch_size": 4, "eval_max_pairs": 16, "checkpoint_every": 100},
           "plot": {"formats": ["png"]}}
    path = folder / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def flow_runs(name_part: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as c:
        return c.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(like_=name_part)),
                                sort=FlowRunSort.START_TIME_ASC)


def artifacts(**by) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    f = ArtifactFilter(key=ArtifactFilterKey(any_=by["keys"])) if "keys" in by else \
        ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[by["flow_run_id"]]))
    with get_client(sync_client=True) as c:
        return c.read_artifacts(artifact_filter=f)


@pytest.fixture(scope="module")
def first_run(prefect_api_url, tmp_path_factory):
    """The tiny pipeline's first run, through the flow in this process (the trainer in process, as conftest does
    for every test): every stage runs."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from conftest import InProcessTrainer
    from flows.worldpm import worldpm
    from worldpm.modeling.trainer import launch

    folder = tmp_path_factory.mktemp("runs-page")
    config = write_config(folder, NAME)
    mp = pytest.MonkeyPatch()
    mp.setattr(launch, "run", InProcessTrainer())
    try:
        with temporary_settings(updates={PREFECT_API_URL: prefect_api_url}):
            results = worldpm(config_path=str(config))
    finally:
        mp.undo()
    return folder, config, results


def test_a_run_says_what_ran_and_a_cached_run_is_quiet_and_publishes_nothing(first_run, worldpm_cli):
    folder, config, results = first_run
    assert all(r["status"] == "ran" for r in results)
    (fresh,) = flow_runs(NAME)
    assert fresh.name == f"{NAME}: ran download .. plot (9 stages)"
    assert {NAME, "objective:bt", "model:bert (from_config)"} <= set(fresh.tags) and "cached" not in fresh.tags
    own = artifacts(flow_run_id=fresh.id)
    assert {a.key for a in own} == {f"{NAME}-report", f"{NAME}-run", None}
    resolved = next(a for a in own if a.key is None)  # the resolved configuration, this run's only
    assert "the resolved configuration" in resolved.data and "max_steps: 2" in resolved.data
    assert str(config) in resolved.data

    again = worldpm_cli("run", cwd=folder)  # ./pipeline.yaml, as a user reruns it
    lines = (again.stdout + again.stderr).splitlines()
    assert len(lines) <= 9 + 1, again.stdout + again.stderr  # a line per stage, then the summary
    assert again.stdout.count(" cached ") == 9 and again.stderr == ""
    summary = again.stdout.splitlines()[-1]
    plot = next(r for r in results if r["stage"] == "plot")
    assert summary.startswith("nothing changed: every stage was a cache hit")
    assert "test accuracy " in summary and f"report {plot['path']}/report.md" in summary
    cached = flow_runs(NAME)[-1]
    assert summary.endswith(f"/runs/flow-run/{cached.id}")
    assert cached.name == f"{NAME}: nothing ran (cached)" and "cached" in cached.tags
    # no new report (or run table): the latest of each key is still the first run's
    assert [a.key for a in artifacts(flow_run_id=cached.id)] == [None]
    assert len(artifacts(keys=[f"{NAME}-report"])) == 1 and len(artifacts(keys=[f"{NAME}-run"])) == 1
    log = sorted((folder / ".worldpm" / "logs").glob("run-*.log"))[-1].read_text()
    assert "Finished in state Cached" in log and "download: cached" in log  # kept for --verbose and the log


def test_two_pipelines_publish_under_their_own_keys(first_run, worldpm_cli, tmp_path):
    folder, _, _ = first_run
    other = write_config(tmp_path / "beta", "tiny-beta")
    worldpm_cli("run", "--config", str(other), "--until", "download")
    (run,) = flow_runs("tiny-beta")
    assert run.name == "tiny-beta: ran download" and "tiny-beta" in run.tags
    keys = {a.key for a in artifacts(flow_run_id=run.id)} - {None}
    assert keys == {"tiny-beta-run"}  # no plot in this run: no report
    alpha = {a.key for r in flow_runs(NAME) for a in artifacts(flow_run_id=r.id)} - {None}
    assert alpha and not keys & alpha


def test_worldpm_run_validates_its_config_once(first_run, monkeypatch, capsys):
    """`worldpm run` validates its config before Prefect starts (a typo fails in milliseconds), and the flow it then
    runs in the same process takes that config (config.handing_on) instead of validating it again from its
    parameters: one validation a process (it was two)."""
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    from flows.worldpm import worldpm as flow
    from tasks import PIPELINE
    from worldpm import cli
    from worldpm.config import PipelineConfig

    folder, config, _ = first_run
    validate = PipelineConfig.model_validate.__func__
    validated = []
    monkeypatch.setattr(PipelineConfig, "model_validate",
                        classmethod(lambda cls, *a, **k: validated.append(a) or validate(cls, *a, **k)))
    ran = []

    def run_flow(**params):  # the console script's run_flow, less its background-server handling (flows/cli.py)
        with temporary_settings(updates={PREFECT_API_URL: get_current_settings().api.url}):
            ran.append(flow(**params))
        return ran[-1]

    monkeypatch.chdir(folder)
    # an override in no key (train.timeout_s): the run is the first run's, every stage from the cache
    code = cli.main(["run", "--verbose", "--config", str(config), "--set", "train.timeout_s=600"], pipeline=PIPELINE,
                    run_flow=run_flow)
    assert code == 0, capsys.readouterr()
    [results] = ran
    assert [r["status"] for r in results] == ["cached"] * len(PIPELINE.names)
    assert len(validated) == 1, validated
