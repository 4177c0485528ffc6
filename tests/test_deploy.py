"""Deployments worldpm/full and worldpm/clean: built from pipeline.yaml, served against a real Prefect server.

The slow tests start `worldpm serve` in its own process group against the session's server (conftest
`prefect_api_url`), trigger runs with `prefect deployment run ... --watch`, and read what happened back from the
Prefect API (task run states, logs) and the artifact store. Every process they start is stopped by its group id.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from uuid import UUID

import pytest
import yaml

from tasks import PIPELINE as pipeline
from flows import deploy

RUN_TIMEOUT = 1200  # a hang guard for one `prefect deployment run --watch`, not a performance bound


# ---- fast: the deployment objects and the CLI ------------------------------------------------------------------
def _write_config(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_deployments_follow_the_config(tmp_path):
    cfg = _write_config(tmp_path / "pipeline.yaml",
                        {"schedule": {"cron": "15 4 * * 2", "timezone": "America/New_York"}})
    full, clean, sweep = deploy.build_deployments(str(cfg), ["clean.min_margin=1"])
    assert (full.flow_name, full.name) == ("worldpm", "full")
    assert (clean.flow_name, clean.name) == ("worldpm", "clean")
    assert (sweep.flow_name, sweep.name, sweep.entrypoint) == ("worldpm", "sweep", "flows.sweep.worldpm_sweep")
    assert not sweep.schedules and sweep.parameters == full.parameters and sweep.concurrency_limit == 1
    [sched] = full.schedules
    assert (sched.schedule.cron, sched.schedule.timezone, sched.active) == ("15 4 * * 2", "America/New_York", True)
    assert not clean.schedules
    assert full.parameters == {"config_path": str(cfg), "overrides": ["clean.min_margin=1"]}
    assert clean.parameters == {"config_path": str(cfg), "overrides": ["clean.min_margin=1"], "until": "clean"}
    for d in (full, clean):
        assert d.concurrency_limit == 1
        assert d.concurrency_options.collision_strategy.value == "ENQUEUE"
        assert d.entrypoint == "flows.worldpm.worldpm"  # importable from any working directory
    full, *_ = deploy.build_deployments(str(cfg), schedule=False, on_overlap="cancel-new")
    assert full.schedules == []
    assert full.concurrency_options.collision_strategy.value == "CANCEL_NEW"


def test_default_schedule_is_nightly_utc():
    full, *_ = deploy.build_deployments(None)
    [sched] = full.schedules
    assert (sched.schedule.cron, sched.schedule.timezone) == ("0 2 * * *", "UTC")


@pytest.mark.parametrize("override, needle", [
    ("schedule.cron=every night", "schedule.cron 'every night'"),
    ("schedule.timezone=Mars/Olympus", "Invalid timezone"),
    ("clean.min_chars_typo=3", "unknown key `clean.min_chars_typo`"),
])
def test_bad_schedule_or_config_fails_at_serve_time(tmp_path, override, needle):
    cfg = _write_config(tmp_path / "p.yaml", {"name": "x"})
    with pytest.raises(Exception) as e:
        deploy.build_deployments(str(cfg), [override])
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_cli_registers_serve_and_server(tmp_path, monkeypatch, capsys):
    parser = argparse.ArgumentParser(prog="worldpm")
    deploy.register(parser.add_subparsers(dest="command", required=True))
    a = parser.parse_args(["serve", "-c", "x.yaml", "--set", "a.b=1", "--set", "c.d=2", "--no-schedule"])
    assert (a.config, a.overrides, a.schedule, a.on_overlap, a.func) == (
        "x.yaml", ["a.b=1", "c.d=2"], False, "enqueue", deploy._serve_cmd)
    a = parser.parse_args(["server", "--port", "4300"])
    assert (a.host, a.port, a.schedule, a.func) == ("127.0.0.1", 4300, True, deploy._server_cmd)
    # a missing config is a one-line error and exit code 2, before anything starts
    monkeypatch.chdir(tmp_path)
    assert deploy.main(["serve", "--config", "missing.yaml"]) == 2
    assert "config file not found: missing.yaml" in capsys.readouterr().err
    # without --config, ./pipeline.yaml is used when present, as an absolute path
    assert deploy.resolve_config_path(None) is None
    (tmp_path / "pipeline.yaml").write_text("name: here\n")
    assert deploy.resolve_config_path(None) == str(tmp_path / "pipeline.yaml")


def test_server_refuses_a_port_in_use(capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert deploy.main(["server", "--port", str(port)]) == 2
    assert f"127.0.0.1:{port} is in use" in capsys.readouterr().err


# ---- what a deployment run may override (issue 12 case 6) --------------------------------------------------------
def test_a_deployment_run_validates_each_config_once(tmp_path, monkeypatch):
    """The run's config once, and the served config it is checked against once (it was loaded three times more)."""
    import flows.policy as policy
    from worldpm.config import load_config

    cfg = _write_config(tmp_path / "pipeline.yaml", {"name": "served"})
    loaded = []
    monkeypatch.setattr(policy, "load_config", lambda *a, **k: loaded.append(a) or load_config(*a, **k))
    served = policy.Served(str(cfg), ["train.max_steps=20"])
    run_cfg = policy.check_run(served, str(cfg), ["train.lr=1e-5"], None)  # as flows/worldpm.py does
    roots = served.roots
    assert run_cfg.train.lr == 1e-5 and run_cfg.train.max_steps == 20 and tmp_path.resolve() in roots
    assert loaded == [(str(cfg), ["train.max_steps=20"]), (str(cfg), ["train.max_steps=20", "train.lr=1e-5"], None)]


def test_a_deployment_run_may_change_only_what_the_served_config_allows(tmp_path):
    from flows.policy import Served, check_run
    from worldpm.errors import ConfigError

    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    (project / "data" / "more.jsonl").write_text("{}\n")
    cfg = _write_config(project / "pipeline.yaml", {"name": "served"})
    served = Served(str(cfg), ["train.max_steps=2000"])
    ok = [
        ([], None),
        (["train.max_steps=2000"], None),                    # serve's own --set
        (["clean.min_margin=1", "train.lr=1e-5"], None),      # in the default allowlist
        (["train.eval_at={every: 5}", "train.eval_at.max_pairs=64", "train.report_to=[tensorboard]"], None),
        ([], ["owner/dataset@v2"]),                           # a hub id
        ([], [str(project / "data" / "more.jsonl")]),         # a file inside the project
    ]
    for overrides, sources in ok:
        check_run(served, str(cfg), overrides, sources)
    refused = [
        (str(cfg), ["artifacts_dir=/elsewhere"], None, "may not override artifacts_dir ('artifacts_dir=/elsewhere'): never"),
        (str(cfg), ["model.trust_remote_code=true"], None, "may not override model.trust_remote_code"),
        (str(cfg), ["model={trust_remote_code: true}"], None, "may not override model ("),
        (str(cfg), ["serve.allowed_overrides=['*']"], None, "may not override serve.allowed_overrides"),
        (str(cfg), ["train.accelerate_args=[--config_file, /tmp/x]"], None, "may not override train.accelerate_args"),
        (str(cfg), ["sweep={axes: {train.lr: [1, 2]}}"], None, "may not override sweep ("),
        (str(cfg), ["sweep.axes.model=[]"], None, "may not override sweep.axes.model"),
        (str(cfg), ['tokenize.plain_template="Q: {prompt} A: {response}"'], None, "not in serve.allowed_overrides of"),
        (str(cfg), ["train.deepspeed.config_file=/etc/passwd"], None, "not in serve.allowed_overrides"),
        (str(cfg), [], ["/etc"], "source '/etc' is outside the project folder"),
        (str(tmp_path / "other.yaml"), [], None, "cannot change config_path"),
    ]
    _write_config(tmp_path / "other.yaml", {"model": {"trust_remote_code": True}})
    for config_path, overrides, sources, needle in refused:
        with pytest.raises(ConfigError) as e:
            check_run(served, config_path, overrides, sources)
        assert needle in str(e.value) and "\n" not in str(e.value), (overrides, sources, str(e.value))

    # the list is the served config's; even "*" never opens a path outside the project or the store
    _write_config(cfg, {"name": "served", "serve": {"allowed_overrides": ["*"]}})
    served = Served(str(cfg), ["train.max_steps=2000"])  # each run reads the served config anew (once)
    check_run(served, str(cfg), ['tokenize.plain_template="Q: {prompt} A: {response}"'], None)
    for overrides, needle in (
            (["evaluate.eval_sets=[{name: x, path: /etc/passwd}]"], "evaluate.eval_sets.0.path '/etc/passwd' is "
                                                                     "outside the project folder"),
            (["model.name_or_path=/home/someone/model"], "model.name_or_path '/home/someone/model' is outside"),
            (["artifacts_dir=elsewhere"], "may not override artifacts_dir"),
            (["sweep.axes={train.lr: [1, 2]}"], "may not override sweep.axes"),
            (["model.trust_remote_code=true"], "may not override model.trust_remote_code")):
        with pytest.raises(ConfigError, match=re.escape(needle)):
            check_run(served, str(cfg), overrides, None)
    _write_config(cfg, {"name": "served", "serve": {"allowed_overrides": ["train.lr"]}})
    served = Served(str(cfg), ["train.max_steps=2000"])
    with pytest.raises(ConfigError, match="may not override clean.min_margin"):
        check_run(served, str(cfg), ["clean.min_margin=1"], None)
    with pytest.raises(ConfigError, match="may not replace the sources"):
        check_run(served, str(cfg), [], ["owner/dataset"])


def test_a_deployment_run_keeps_the_served_set_entries_and_adds_its_own(tmp_path):
    """A run's `overrides` parameter replaces the deployment's default list in Prefect: the run still has serve's
    --set entries (an artifacts_dir moved by serve is not "moved by the run"), followed by its own."""
    from flows.policy import Served, check_run, effective_overrides
    from worldpm.config import load_config

    (tmp_path / "project").mkdir()
    cfg = _write_config(tmp_path / "project" / "pipeline.yaml", {"name": "served"})
    store = str(tmp_path / "project" / "store")
    served = Served(str(cfg), [f"artifacts_dir={store}", "train.lr=1e-5"])
    check_run(served, str(cfg), ["clean.min_margin=1"], None)  # was refused: "may not move artifacts_dir"
    run = load_config(str(cfg), effective_overrides(served, ["clean.min_margin=1"]))
    assert run.artifacts_dir == store and run.train.lr == 1e-5 and run.clean.min_margin == 1
    # the run's own entry of a served key comes last (it wins), and serve's entries are not repeated
    assert effective_overrides(served, ["train.lr=2e-5", "train.lr=1e-5"]) == [
        f"artifacts_dir={store}", "train.lr=1e-5", "train.lr=2e-5"]


# ---- slow: served deployments against a real server ------------------------------------------------------------
def _tiny_config(tmp_path: Path, se_paired: Path) -> Path:
    """The coffee StackExchange pairs (129) and settings that keep every available stage tiny."""
    coffee = se_paired / "reward" / "coffee.stackexchange.com-00000-of-00001.parquet"
    data = {
        "name": "deploy-test",
        "artifacts_dir": "artifacts",
        "sources": [{"kind": "local", "path": str(coffee), "format": "stack_exchange_paired"}],
        "schedule": {"cron": "45 3 29 2 *", "timezone": "Europe/Berlin"},  # from the config, and rarely due
        "shard": {"train": 0.6, "eval": 0.2, "test": 0.2},
        "tokenize": {"max_length": 64, "num_proc": 1, "batch_size": 64},
        "train": {"max_steps": 2, "batch_size": 4, "log_every": 1, "checkpoint_every": 1, "num_processes": 1,
                  "warmup_ratio": 0.0},
        "evaluate": {"batch_size": 16},
        "plot": {"formats": ["png"]},
    }
    return _write_config(tmp_path / "pipeline.yaml", data)


def _worldpm_serve_cmd() -> list[str]:
    """`worldpm serve` once the CLI registers it, else the same parser through `python -m`."""
    exe = shutil.which("worldpm") or str(Path(sys.executable).parent / "worldpm")
    if Path(exe).exists():
        p = subprocess.run([exe, "serve", "--help"], capture_output=True, text=True, timeout=120)
        if p.returncode == 0 and "--no-schedule" in p.stdout:
            return [exe, "serve"]
    return [sys.executable, "-m", "flows.deploy", "serve"]


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _client():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def _wait_for_deployments(proc: subprocess.Popen, log: Path, names=("worldpm/full", "worldpm/clean"),
                          timeout: float = 300) -> dict:
    from prefect.exceptions import ObjectNotFound

    deadline = time.monotonic() + timeout
    with _client() as c:
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"`worldpm serve` exited ({proc.returncode}):\n{log.read_text()[-4000:]}")
            try:
                return {n: c.read_deployment_by_name(n) for n in names}
            except ObjectNotFound:
                if time.monotonic() > deadline:
                    raise AssertionError(f"deployments not registered:\n{log.read_text()[-4000:]}") from None
                time.sleep(1)


def _deployment_run(name: str, *params: str, cwd: Path) -> UUID:
    cmd = [sys.executable, "-m", "prefect", "deployment", "run", name, "--watch"]
    for p in params:
        cmd += ["--param", p]
    env = dict(os.environ, COLUMNS="200")
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    out = p.stdout + p.stderr
    assert p.returncode == 0, f"prefect deployment run {name} exited {p.returncode}:\n{out[-4000:]}"
    m = re.search(r"UUID: ([0-9a-f-]{36})", out)
    assert m, out
    return UUID(m.group(1))


def _wait_final(ids: list[UUID]) -> list:
    """The flow runs, once every one is in a final state (or RUN_TIMEOUT passed)."""
    deadline = time.monotonic() + RUN_TIMEOUT
    with _client() as c:
        while True:
            runs = [c.read_flow_run(i) for i in ids]
            if all(r.state.is_final() for r in runs) or time.monotonic() > deadline:
                return runs
            time.sleep(1)


def _task_states(flow_run_id: UUID) -> dict[str, str]:
    """task run name (the stage) -> its final state name (Completed, Cached, ...)."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with _client() as c:
        trs = c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {t.name: t.state.name for t in trs}


def _logs(flow_run_id: UUID, needle: str, timeout: float = 60) -> list[str]:
    """The flow run's log messages, once one contains `needle` (logs are shipped in batches)."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    deadline = time.monotonic() + timeout
    with _client() as c:
        while True:
            logs = [r.message for r in c.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), limit=200)]
            if any(needle in m for m in logs) or time.monotonic() > deadline:
                return logs
            time.sleep(1)


def _artifact_dirs(root: Path) -> set[str]:
    """Committed artifacts as 'stage/key' (hidden tmp/work/lock entries excluded)."""
    if not root.is_dir():
        return set()
    return {f"{d.parent.name}/{d.name}" for d in root.glob("*/*")
            if d.is_dir() and not d.name.startswith(".") and (d / "manifest.json").is_file()}


@pytest.mark.slow
def test_served_deployments_run_cache_and_rerun_clean(prefect_api_url, se_paired, tmp_path):
    stages = list(pipeline.names)
    assert "clean" in stages and "download" in stages, f"the DAG has no download/clean yet: {stages}"
    cfg = _tiny_config(tmp_path, se_paired)
    artifacts = tmp_path / "artifacts"
    log = tmp_path / "serve.log"
    env = dict(os.environ, PREFECT_API_URL=prefect_api_url, PREFECT_RUNNER_POLL_FREQUENCY="2")
    with open(log, "w") as fh:
        serve = subprocess.Popen([*_worldpm_serve_cmd(), "--config", str(cfg)], cwd=tmp_path, env=env,
                                 stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deps = _wait_for_deployments(serve, log)
        full, clean = deps["worldpm/full"], deps["worldpm/clean"]
        # what the server holds: the schedule from pipeline.yaml, one run at a time, the config as a parameter
        [sched] = full.schedules
        assert (sched.schedule.cron, sched.schedule.timezone, sched.active) == ("45 3 29 2 *", "Europe/Berlin", True)
        assert not clean.schedules
        for d in (full, clean):  # the server keeps a deployment's limit as a global concurrency limit
            limit = d.global_concurrency_limit.limit if d.global_concurrency_limit else d.concurrency_limit
            assert limit == 1, d
        assert full.parameters["config_path"] == str(cfg)
        assert clean.parameters["until"] == "clean"

        # 1. the whole DAG, as available, runs and commits one artifact a stage
        first = _deployment_run("worldpm/full", cwd=tmp_path)
        states = _task_states(first)
        assert set(states) == set(stages), states
        assert set(states.values()) == {"Completed"}, states
        after_first = _artifact_dirs(artifacts)
        assert sorted(a.split("/")[0] for a in after_first) == sorted(stages)

        # 2. unchanged upstream and config: every stage a cache hit, nothing new on disk, "nothing changed" logged
        # (runs from here on are created through the client, as the UI or an automation does)
        with _client() as c:
            second = c.create_flow_run_from_deployment(full.id).id
        [run] = _wait_final([second])
        assert run.state.name == "Completed", run.state
        states = _task_states(second)
        assert set(states) == set(stages) and set(states.values()) == {"Cached"}, states
        assert _artifact_dirs(artifacts) == after_first
        assert any("nothing changed" in m for m in _logs(second, "nothing changed"))

        # 3. worldpm/clean with a filter change as a run parameter, two runs submitted together: one run at a time per
        # deployment, so they do not overlap (whether the second had to wait for its slot depends on timing: a fast
        # first run can end before the second is picked up). The first reruns clean alone (download and the
        # normalised texts cached, nothing after clean); the second finds it done: every stage a cache hit
        with _client() as c:
            ids = [c.create_flow_run_from_deployment(clean.id, parameters={"overrides": ["clean.min_margin=2"]}).id
                   for _ in range(2)]
        runs = _wait_final(ids)
        assert [r.state.name for r in runs] == ["Completed", "Completed"], [r.state for r in runs]
        a, b = sorted(runs, key=lambda r: r.start_time)
        assert a.end_time <= b.start_time, (a.start_time, a.end_time, b.start_time, b.end_time)
        assert _task_states(a.id) == {"download": "Cached", "normalise": "Cached", "clean": "Completed"}
        assert _task_states(b.id) == {"download": "Cached", "normalise": "Cached", "clean": "Cached"}
        new = _artifact_dirs(artifacts) - after_first
        assert [x.split("/")[0] for x in new] == ["clean"], new
        report = json.loads((artifacts / next(iter(new)) / "report.json").read_text())
        assert report["rules"]["min_margin"] == 2

        # 4. a run may override only what the served config allows: never artifacts_dir (issue 12 case 6)
        elsewhere = tmp_path / "elsewhere"
        with _client() as c:
            refused = c.create_flow_run_from_deployment(clean.id, parameters={
                "overrides": [f"artifacts_dir={elsewhere}"]}).id
        [run] = _wait_final([refused])
        state = run.state
        assert state.is_failed() and "a deployment run (worldpm serve) may not override artifacts_dir" in state.message
        assert not elsewhere.exists() and _task_states(refused) == {}
    finally:
        _stop(serve)
    # stopping the server process left the nightly schedule active (pause_on_shutdown=False)
    with _client() as c:
        full = c.read_deployment_by_name("worldpm/full")
    assert not full.paused and full.schedules and all(s.active for s in full.schedules)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
def test_worldpm_server_starts_and_stops_both(tmp_path):
    """`server`: prefect server + serve in their own groups; SIGTERM stops both and the port is free again."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = _write_config(tmp_path / "pipeline.yaml", {"name": "server-test"})
    env = dict(os.environ, PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_UI_ENABLED="false")
    env.pop("PREFECT_API_URL", None)
    log = tmp_path / "server.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "flows.deploy", "server", "--port", str(port),
                                 "--prefect-home", str(tmp_path / "home"), "--config", str(cfg)],
                                cwd=tmp_path, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 300
        found = None
        while found is None:
            assert proc.poll() is None, log.read_text()[-4000:]
            assert time.monotonic() < deadline, log.read_text()[-4000:]
            try:
                req = urllib.request.Request(url + "/deployments/name/worldpm/full")
                with urllib.request.urlopen(req, timeout=2) as r:
                    found = json.loads(r.read())
            except OSError:
                time.sleep(1)
        assert found["name"] == "full" and found["schedules"][0]["schedule"]["cron"] == "0 2 * * *"
        pids = [int(p) for p in re.findall(r"\(pid (\d+)\)", log.read_text())]
        assert len(pids) == 2, log.read_text()
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, log.read_text()[-4000:]
        assert not any(_pid_alive(p) for p in pids), pids
        with socket.socket() as s:  # nothing listens on the server's port any more
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))
            s.listen()
    finally:
        _stop(proc)
