"""Shared fixtures. Tests never touch the network: HF_HUB_OFFLINE is set for the whole session.

One real Prefect server is started per test session (on loopback, a fresh SQLite database under a temp folder),
not one ephemeral server per test: `prefect_api_url` starts it on first use and stops it by its process group.
"""
from __future__ import annotations

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
SHARED_DATA = (ROOT.parent / "shared" / "data").resolve()

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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


@pytest.fixture(scope="session")
def prefect_api_url(prefect_home):
    """A real `prefect server start` on 127.0.0.1 for the whole session; PREFECT_API_URL points at it."""
    port = _free_port()
    env = dict(os.environ, PREFECT_HOME=str(prefect_home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_UI_ENABLED="false")
    env.pop("PREFECT_API_URL", None)
    log = open(prefect_home / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited: {(prefect_home / 'server.log').read_text()[-2000:]}")
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
    os.environ["PREFECT_HOME"] = str(prefect_home)
    try:
        yield url
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
