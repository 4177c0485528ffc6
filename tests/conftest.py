"""Shared fixtures. Tests never touch the network: HF_HUB_OFFLINE is set for the whole session.

One real Prefect server is started per test session (on loopback, a fresh SQLite database under a temp folder),
not one ephemeral server per test: `prefect_api_url` starts it on first use and stops it by its process group.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("WORLDPM_SHARED_DATA", ROOT.parent / "shared" / "data")).resolve()  # or where set

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # each of the test processes (pytest-xdist, pyproject's addopts) computes on one thread, and so do the trainers
    # they launch (launch.py keeps OMP_NUM_THREADS): two processes of two spinning threads each on two cores ran a
    # training test 3x slower than alone. Set before torch is imported.
    os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data: the real preference samples. Missing data fails the tests that need it (never a silent
    skip: CI must not pass without having tested on real data)."""
    if not SHARED_DATA.is_dir():
        pytest.fail(f"the shared preference data is not at {SHARED_DATA}: tests on real data cannot run")
    return SHARED_DATA


@pytest.fixture(scope="session")
def se_paired(shared_data) -> Path:
    """The lvwerra/stack-exchange-paired sample (beer + coffee parquet files)."""
    return shared_data / "stack-exchange-paired" / "data"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def prefect_home(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("prefect_home")
    return home


def _drain_prefect_workers() -> None:
    """Send what this process's Prefect log and event workers still hold while their server is up, as Prefect's own
    test harness does: left to interpreter exit, they retry against the stopped server for a minute or more."""
    if "prefect.logging.handlers" in sys.modules:
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=60)
    if "prefect.events.worker" in sys.modules:
        from prefect.events.worker import EventsWorker

        EventsWorker.drain_all(timeout=60)


@contextlib.contextmanager
def _prefect_settings(url: str, home: Path):
    """This process's Prefect settings with PREFECT_API_URL and PREFECT_HOME set, whatever imported prefect first:
    Prefect reads the environment once, at import, so a test that imported it before the server started (any order
    under pytest-xdist) would otherwise run its in-process flows, and its log and event workers' threads, on a
    temporary server of their own. Set both as Prefect's own test harness does (prefect.testing.utilities): the
    current settings context, and the process-global one that new threads read."""
    import prefect.context
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: url, PREFECT_HOME: str(home)}), \
            prefect.context._temporary_global_settings_context(prefect.context.get_settings_context()):
        yield


@contextlib.contextmanager
def prefect_server(home: Path):
    """A real `prefect server start` on 127.0.0.1 with its database under `home`; yields its API URL. While it
    runs, PREFECT_API_URL and PREFECT_HOME point at it in os.environ (for subprocesses) and in this process's
    Prefect settings (`_prefect_settings`)."""
    port = _free_port()
    env = dict(os.environ, PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_UI_ENABLED="false",
               # a run that finds its deployment's one slot taken waits this long before it tries again (Prefect's
               # default 30 s): the waits happen as in production, only shorter
               PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS="2")
    env.pop("PREFECT_API_URL", None)
    log = open(home / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited: {(home / 'server.log').read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            time.sleep(0.5)
    else:
        os.killpg(proc.pid, signal.SIGTERM)
        raise RuntimeError("prefect server did not come up in 180 s")
    old = {k: os.environ.get(k) for k in ("PREFECT_API_URL", "PREFECT_HOME")}
    os.environ["PREFECT_API_URL"] = url
    os.environ["PREFECT_HOME"] = str(home)
    try:
        with _prefect_settings(url, home):
            try:
                yield url
            finally:
                _drain_prefect_workers()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


@pytest.fixture(scope="session")
def start_prefect_server():
    """`prefect_server`, for a test module that needs a server of its own."""
    return prefect_server


@pytest.fixture(scope="session")
def prefect_api_url(prefect_home):
    """The session's Prefect server (`prefect_server`); PREFECT_API_URL points at it."""
    with prefect_server(prefect_home) as url:
        yield url


@pytest.fixture
def worldpm_cli(prefect_api_url, tmp_path):
    """Run the `worldpm` console script in a subprocess against the session's Prefect server."""
    exe = shutil.which("worldpm") or str(Path(sys.executable).parent / "worldpm")

    def run(*args: str, cwd: Path | None = None, check: bool = True, env: dict | None = None,
            timeout: float = 900) -> subprocess.CompletedProcess:
        e = dict(os.environ, PREFECT_API_URL=prefect_api_url, **(env or {}))
        p = subprocess.run([exe, *args], cwd=cwd or tmp_path, env=e, capture_output=True, text=True, timeout=timeout)
        if check and p.returncode != 0:
            raise AssertionError(f"worldpm {' '.join(args)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
        return p

    return run


# ---- the trainer in process --------------------------------------------------------------------------------------
# The train stage launches the recipe through `accelerate launch` (a new Python process, its imports, torch's start):
# ~10 s a run on 2 cores. Here every train stage runs the recipe in this process instead, through the stage itself
# (its checks, its manifest, the commit), unless a test is marked `launch`: those are the tests where several
# processes are the point (2 CPU processes, ZeRO-3, the launched end to end run, the launcher's failure line).

# The modules that take longest (about 90, 85, 50, 40, 30, 30, 30, 20 and 20 s of a 2-core run, `--durations=0`),
# handed out first: with pyproject's `--dist loadfile` each test process takes the next whole module when it is free,
# and a long module taken last would leave the other process idle. Only the order changes, not what runs.
LONGEST_FIRST = ("test_nothing_lost", "test_train", "test_deploy", "test_workers", "test_nodes", "test_pipeline_e2e",
                 "test_server", "test_sweep", "test_downstream")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(Path(str(item.fspath)).stem, len(rank)))  # stable: the rest as collected


def pytest_configure(config):
    config.addinivalue_line("markers", "launch: launches the trainer for real (`accelerate launch`), not in process")


class InProcessTrainer:
    """tasks.train's launch.run, replaced: the recipe in this process, its progress lines to the stage's log.
    `callbacks` (recipe.Callback objects) go to the next runs."""

    def __init__(self):
        self.callbacks: list = []
        self.runs = 0

    def __call__(self, args, gpus, log, timeout_s=None):
        import contextlib
        import io

        from worldpm.modeling.trainer import recipe

        class Lines(io.TextIOBase):
            def write(self, s):
                for line in s.splitlines():
                    if line.strip():
                        log.info("%s", line)
                return len(s)

        self.runs += 1
        with contextlib.redirect_stdout(Lines()):
            summary = recipe.train(args, list(self.callbacks))
        return summary, 1


@pytest.fixture(autouse=True)
def in_process_trainer(request, monkeypatch):
    trainer = InProcessTrainer()
    if request.node.get_closest_marker("launch") is None:
        from worldpm.modeling.trainer import launch

        monkeypatch.setattr(launch, "run", trainer)
    else:  # launched processes import the test callbacks (tests/support.py) by name
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT / "tests"),
                                                                       os.environ.get("PYTHONPATH")])))
    return trainer


@pytest.fixture(scope="session")
def tokenized(tmp_path_factory, se_paired):
    """240 real StackExchange pairs sharded and tokenized at max_length 64 (MiniLM's tokenizer):
    (store, tokenize ref, shard ref)."""
    from support import LOG, se_shard
    from tasks import PIPELINE
    from worldpm.config import load_config
    from worldpm.store import ArtifactStore

    store = ArtifactStore(tmp_path_factory.mktemp("train") / "store")
    cfg = load_config(None, ["tokenize.max_length=64", "shard.train=0.9", "shard.eval=0.05", "shard.test=0.05"])
    shard = se_shard(store, se_paired, cfg, head=240)
    tok = PIPELINE.execute("tokenize", cfg, {"shard": shard}, store, log=LOG)
    return store, tok.ref, shard


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory, tokenized) -> Path:
    """A random tiny Qwen2 reward model saved as a checkpoint: plain, DDP and ZeRO-3 runs then start from the very
    same weights (zero.Init draws a from_config model's weights differently)."""
    import torch
    import yaml
    from transformers import AutoTokenizer

    from support import TINY_QWEN
    from worldpm.modeling import models

    d = tmp_path_factory.mktemp("tiny-qwen")
    tok = AutoTokenizer.from_pretrained(Path(tokenized[1].path) / "tokenizer")
    torch.manual_seed(0)
    models.build_reward_model({"from_config": yaml.safe_load(TINY_QWEN)}, tok).save_pretrained(d)
    tok.save_pretrained(d)
    return d
