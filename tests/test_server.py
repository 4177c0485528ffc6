"""The Prefect server `worldpm run` uses: the user's PREFECT_API_URL exactly; else one background server a project,
started once and reused, stopped by `worldpm server stop` (by its recorded process id); a server that cannot
start falls back to Prefect's temporary one with one line. And the CLI imports torch/transformers only for the
stages that need them."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows import server

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def no_api(monkeypatch, tmp_path):
    """No PREFECT_API_URL (nor a profile that sets one), a port of our own, the project in tmp_path."""
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setattr(server, "user_api_url", lambda: os.environ.get("PREFECT_API_URL"))
    monkeypatch.setenv("WORLDPM_PREFECT_PORT", str(_free_port()))
    monkeypatch.delenv("WORLDPM_BACKGROUND_SERVER", raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_a_prefect_api_url_the_user_set_is_used_exactly(no_api, monkeypatch, capsys):
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # nothing answers there: not our business
    started = []
    monkeypatch.setattr(server, "start_background", lambda *a, **k: started.append(a))
    assert server.api_for_run() is None          # the flow runs with the user's setting, untouched
    assert not started and not (no_api / ".worldpm").exists()
    assert capsys.readouterr().err == ""


def test_a_server_that_cannot_start_falls_back_to_the_temporary_one_in_one_line(no_api, monkeypatch, capsys):
    monkeypatch.setattr(server, "server_command", lambda port: [sys.executable, "-c", "import sys; sys.exit(3)"])
    assert server.api_for_run() is None
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("worldpm: could not start a background Prefect server (it exited with code 3; log: ")
    assert err[-1].endswith("this run uses a temporary one")
    assert server.read_record(server.project_home()) is None   # nothing recorded, nothing left running


def test_background_server_can_be_switched_off(no_api, monkeypatch):
    monkeypatch.setenv("WORLDPM_BACKGROUND_SERVER", "0")
    monkeypatch.setattr(server, "start_background", lambda *a, **k: pytest.fail("started a server"))
    assert server.api_for_run() is None


def test_status_imports_neither_torch_nor_transformers(tmp_path, se_paired):
    """`worldpm status` (and the CLI's import) stays light: torch/transformers load only in the stages that use
    them (tokenize, train, evaluate), which status does not run."""
    probe = ("import json, sys\nfrom flows.cli import main\nrc = main(['status', '--source', sys.argv[1]])\n"
             "print(json.dumps({'rc': rc, 'heavy': [m for m in ('torch', 'transformers', 'datasets', 'accelerate', "
             "'prefect') if m in sys.modules]}))")
    p = subprocess.run([sys.executable, "-c", probe, str(se_paired)], cwd=tmp_path, capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=300)
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out == {"rc": 0, "heavy": []}, p.stderr
    assert p.stdout.startswith("download ") and "would run" in p.stdout.splitlines()[0]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


@pytest.mark.slow
def test_runs_reuse_one_background_server_until_it_is_stopped(tmp_path):
    exe = shutil.which("worldpm") or str(Path(sys.executable).parent / "worldpm")
    (tmp_path / "pipeline.yaml").write_text("sources:\n  - kind: demo\n    rows: 30\n")
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(WORLDPM_PREFECT_PORT=str(_free_port()), PREFECT_HOME=str(tmp_path / "client-home"),
               PYTHONPATH=str(ROOT))
    env.pop("WORLDPM_BACKGROUND_SERVER", None)
    home = tmp_path / ".worldpm" / "prefect"
    probe = ("import json, sys\nfrom flows.cli import main\nrc = main(sys.argv[1:])\n"
             "print(json.dumps({'rc': rc, 'heavy': [m for m in ('torch', 'transformers') if m in sys.modules]}))")

    def run(*args: str) -> subprocess.CompletedProcess:
        p = subprocess.run([sys.executable, "-c", probe, *args], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=600)
        assert p.returncode == 0, p.stderr
        assert json.loads(p.stdout.strip().splitlines()[-1]) == {"rc": 0, "heavy": []}, p.stdout
        return p

    def worldpm(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([exe, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)

    pids: list[int] = []
    try:
        first = run("run", "--until", "clean")
        assert "starting a background Prefect server" in first.stderr
        rec = server.read_record(home)
        assert rec is not None and rec.url.startswith("http://127.0.0.1:") and _alive(rec.pid)
        pids.append(rec.pid)
        assert f"Prefect server (UI): {rec.ui}" in first.stderr and "worldpm server stop" in first.stderr

        # the second run finds it: no server started, neither ours nor Prefect's temporary one
        second = run("run", "--until", "clean")
        assert "starting a background" not in second.stderr and "temporary server" not in second.stderr.lower()
        assert server.read_record(home).pid == rec.pid and _alive(rec.pid)
        assert second.stdout.count(" cached ") == 3   # and it ran the flow against it

        st = worldpm("server", "status")
        assert st.returncode == 0 and "running" in st.stdout and str(rec.pid) in st.stdout

        stop = worldpm("server", "stop")
        assert stop.returncode == 0 and f"pid {rec.pid}" in stop.stdout
        assert not _alive(rec.pid) and server.read_record(home) is None
        assert not server.healthy(rec.url)

        third = run("run", "--until", "clean")
        assert "starting a background Prefect server" in third.stderr
        again = server.read_record(home)
        assert again is not None and again.pid != rec.pid and _alive(again.pid)
        pids.append(again.pid)
    finally:
        for pid in pids:
            if _alive(pid):
                os.killpg(pid, signal.SIGTERM)
                deadline = time.monotonic() + 30
                while _alive(pid) and time.monotonic() < deadline:
                    time.sleep(0.2)
                if _alive(pid):
                    os.killpg(pid, signal.SIGKILL)
