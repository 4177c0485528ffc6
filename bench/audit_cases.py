"""The 19 cases of issue 19 ("Nothing lost, nothing leaks"), run again through the real console script, each outcome
classified as the audit classified them:

    clean       a refusal or failure in one line (`worldpm: ...`, or argparse's `worldpm CMD: error: ...`), exit != 0,
                no traceback and no foreign noise (a library's report, the trainer's stderr) before it
    correct     the command did what a careful user expects (gc kept, verify named, a rebuilt artifact, ...)
    traceback   a traceback, or lines of noise where one line was promised
    wrong/lost  exit 0 with a wrong result, data read that must not be, an artifact deleted that is in use

    .venv/bin/python bench/audit_cases.py                 # all 19 (about 10 minutes on 2 busy cores)
    .venv/bin/python bench/audit_cases.py --only 1,8,12    # some of them

Each case works in its own folder under a scratch directory (--work, default a temp dir) against a Prefect server
the script starts for itself (its own PREFECT_HOME); cases 9 and 15 start and kill background servers of their own.
The table (per case, then per family) is printed and written as JSON to bench/out/audit_cases.json. Nothing here is
a test: the tests of each case are in tests/test_nothing_lost.py.
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
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
WORLDPM = str(BIN / "worldpm")
RB = ROOT / "tests" / "fixtures" / "rewardbench_small.jsonl"
NOISE = ("trainer stderr:", "Error logging to API", "LOAD REPORT", "Loading weights", "CalledProcessError")

FAMILIES = {
    "store: gc, verify, status, cached artifacts": (1, 5, 6, 7),
    "deployment policy": (2,),
    "evaluate / score command line": (3, 4, 10, 13),
    "config values": (11, 17, 18),
    "sources": (16,),
    "the Prefect server": (9, 14, 15),
    "resources and the trainer": (8, 12, 19),
}


@dataclass
class Outcome:
    kind: str  # clean | correct | traceback | wrong/lost | n/a
    detail: str


# ---- helpers ---------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


class Ctx:
    def __init__(self, work: Path, api: str):
        self.work, self.api = work, api
        self._base: Path | None = None
        self._model: Path | None = None

    def env(self, api: str | None = "same", **extra: str) -> dict:
        env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "WORLDPM_BACKGROUND_SERVER")}
        env.update(HF_HUB_OFFLINE=env.get("HF_HUB_OFFLINE", "1"), TOKENIZERS_PARALLELISM="false",
                   PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_HOME=str(self.work / "client-home"))
        if api == "same":
            env["PREFECT_API_URL"] = self.api
        elif api is not None:
            env["PREFECT_API_URL"] = api
        env.update(extra)
        return env

    def cli(self, *args: str, cwd: Path, env: dict | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
        return subprocess.run([WORLDPM, *args], cwd=cwd, env=env or self.env(), capture_output=True, text=True,
                              timeout=timeout)

    def project(self, name: str, config: dict | None = None) -> Path:
        d = self.work / name
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        (d / "pipeline.yaml").write_text(json.dumps({"artifacts_dir": "store", **(config or {})}))
        return d

    def staged(self, name: str) -> Path:
        """A copy of a project whose store holds download .. tokenize of the demo data (made once)."""
        if self._base is None:
            self._base = self.project("_base")
            p = self.cli("run", "--until", "tokenize", cwd=self._base)
            if p.returncode != 0:
                raise SystemExit(f"could not stage the demo data:\n{p.stderr[-3000:]}")
        d = self.work / name
        if d.exists():
            shutil.rmtree(d)
        shutil.copytree(self._base, d, ignore=shutil.ignore_patterns(".worldpm"))
        return d

    def model(self) -> Path:
        """A tiny random-initialised BERT reward model (MiniLM's tokenizer), saved as the train stage saves one."""
        if self._model is None:
            d = self.work / "_model"
            code = ("import sys, torch\nfrom transformers import AutoModelForSequenceClassification, BertConfig\n"
                    "from worldpm.modeling import models\n"
                    "tok = models.load_tokenizer(str(models.minilm_dir())); torch.manual_seed(0)\n"
                    "cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,"
                    " intermediate_size=64, max_position_embeddings=512, num_labels=1, pad_token_id=tok.pad_token_id)\n"
                    "AutoModelForSequenceClassification.from_config(cfg).save_pretrained(sys.argv[1])\n"
                    "tok.save_pretrained(sys.argv[1])\n")
            subprocess.run([sys.executable, "-c", code, str(d)], check=True, capture_output=True, cwd=ROOT)
            self._model = d
        return self._model


def text_of(p: subprocess.CompletedProcess) -> str:
    return (p.stdout or "") + (p.stderr or "")


def refusal(p: subprocess.CompletedProcess, *, only_line: bool = False, needs: str = "") -> Outcome:
    """A command that must refuse or fail: clean in one line, else traceback (noise counts) or wrong (exit 0)."""
    out = text_of(p)
    lines = [ln for ln in (p.stderr or "").strip().splitlines() if ln.strip()]
    last = lines[-1] if lines else ""
    if "Traceback (most recent call last)" in out:
        return Outcome("traceback", f"exit {p.returncode}, {out.count('Traceback (most recent')} traceback(s), "
                                    f"{len(lines)} stderr lines; last: {last[:160]}")
    if p.returncode == 0:
        return Outcome("wrong/lost", f"exit 0: {(p.stdout or '').strip()[-160:]}")
    noise = [n for n in NOISE if n in out]
    usage = [ln for ln in lines if not ln.startswith(("usage:", " "))]  # argparse: usage lines, then the error
    extra = len(usage) > 1 if only_line else False
    if noise or extra or not (last.startswith("worldpm: ") or re.match(r"worldpm \w+: error: ", last)):
        return Outcome("traceback", f"exit {p.returncode}, noise {noise or f'{len(lines)} lines'}; last: {last[:160]}")
    if needs and needs not in last:
        return Outcome("wrong/lost", f"the line does not say {needs!r}: {last[:200]}")
    return Outcome("clean", last[:240])


# ---- the cases ---------------------------------------------------------------------------------------------------
CASES: dict[int, tuple[str, Callable[[Ctx], Outcome]]] = {}


def case(n: int, title: str):
    def deco(fn):
        CASES[n] = (title, fn)
        return fn
    return deco


@case(1, "gc with clean.min_margin=-1000 keeps shard/tokenize the config goes on to use")
def c01(ctx: Ctx) -> Outcome:
    d = ctx.staged("c01")
    gc = ctx.cli("artifacts", "gc", "--set", "clean.min_margin=-1000", cwd=d)
    if gc.returncode != 0:
        return refusal(gc)
    run = ctx.cli("run", "--until", "tokenize", "--set", "clean.min_margin=-1000", "--json", cwd=d)
    if run.returncode != 0:
        return refusal(run)
    st = {r["stage"]: r["status"] for r in json.loads(run.stdout)}
    kept = next((ln for ln in gc.stdout.splitlines() if ln.startswith("kept ") and "may still use" in ln), "")
    if st["shard"] == "cached" and st["tokenize"] == "cached":
        return Outcome("correct", f"gc: {kept[:120]}...; the next run: shard, tokenize cached")
    return Outcome("wrong/lost", f"the next run: shard {st['shard']}, tokenize {st['tokenize']} (gc deleted them)")


@case(2, "a deployment run's glob through a symlinked folder reads outside the project")
def c02(ctx: Ctx) -> Outcome:
    d = ctx.project("c02")
    outside = ctx.work / "c02-outside"
    outside.mkdir(exist_ok=True)
    (outside / "secret.jsonl").write_text(json.dumps({"prompt": "p", "chosen": "THE SECRET", "rejected": "r"}) + "\n")
    (d / "data").mkdir()
    (d / "data" / "shared").symlink_to(outside, target_is_directory=True)
    env = ctx.env(PREFECT_RUNNER_POLL_FREQUENCY="2")
    serve = subprocess.Popen([WORLDPM, "serve", "--config", str(d / "pipeline.yaml")], cwd=d, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            p = subprocess.run([str(BIN / "prefect"), "deployment", "inspect", "worldpm/clean"], env=env,
                               capture_output=True, text=True)
            if p.returncode == 0:
                break
            time.sleep(2)
        p = subprocess.run([str(BIN / "prefect"), "deployment", "run", "worldpm/clean", "--param",
                            'sources=["data/share*/secret.jsonl"]', "--watch", "--watch-timeout", "600"], cwd=d,
                           env=env, capture_output=True, text=True, timeout=900)
    finally:
        os.killpg(serve.pid, signal.SIGTERM)
        serve.wait(timeout=60)
    read = [f for f in (d / "store").rglob("*.parquet")] if (d / "store").exists() else []
    if any(b"THE SECRET" in f.read_bytes() for f in read):
        return Outcome("wrong/lost", "the secret file was read into the store")
    m = re.search(r"UUID:\s*([0-9a-f-]{36})", text_of(p))
    if not m:
        return Outcome("n/a", f"no flow run was created: {text_of(p)[-300:]}")
    code = ("import sys\nfrom prefect.client.orchestration import get_client\n"
            "with get_client(sync_client=True) as c:\n s = c.read_flow_run(sys.argv[1]).state\n"
            " print(s.type.value, s.message)")
    state = subprocess.run([sys.executable, "-c", code, m.group(1)], env=env, capture_output=True,
                           text=True).stdout.strip()
    if state.startswith("FAILED") and "outside the project folder" in state:
        return Outcome("clean", f"the flow run: {state[:230]}")
    return Outcome("wrong/lost", f"not refused: {state[:300]}")


def _eval_score(ctx: Ctx, command: str, size: str) -> Outcome:
    model = ctx.model()
    data = ["--data", str(RB)] if command == "evaluate" else [str(RB)]
    p = ctx.cli(command, "--model", str(model), *data, "--batch-size", size, cwd=ctx.work)
    return refusal(p, only_line=True, needs="--batch-size")


@case(3, "evaluate --batch-size -1 exits 0 with a wrong accuracy")
def c03(ctx: Ctx) -> Outcome:
    return _eval_score(ctx, "evaluate", "-1")


@case(4, "score --batch-size -1 exits 0 with scores around 1e-41")
def c04(ctx: Ctx) -> Outcome:
    return _eval_score(ctx, "score", "-1")


@case(10, "--batch-size 0 on evaluate and score: ZeroDivisionError")
def c10(ctx: Ctx) -> Outcome:
    a, b = _eval_score(ctx, "evaluate", "0"), _eval_score(ctx, "score", "0")
    worst = a if a.kind != "clean" else b
    return Outcome(worst.kind, f"evaluate: {a.detail[:110]} | score: {b.detail[:110]}")


@case(5, "verify says all ok when a manifest.json is unreadable")
def c05(ctx: Ctx) -> Outcome:
    d = ctx.staged("c05")
    shard = next(p for p in (d / "store" / "shard").iterdir() if not p.name.startswith("."))
    (shard / "manifest.json").write_text('{"stage": "shard", "key": ')
    p = ctx.cli("artifacts", "verify", "--dry-run", cwd=d)
    if "Traceback (most recent call last)" in text_of(p):
        return refusal(p)
    if p.returncode != 0 and f"shard/{shard.name}  DAMAGED" in p.stdout:
        return Outcome("correct", next(ln for ln in p.stdout.splitlines() if "DAMAGED" in ln)[:200])
    return Outcome("wrong/lost", (p.stdout.strip().splitlines() or [""])[-1])


@case(6, "status calls an artifact with a truncated pairs.parquet cached")
def c06(ctx: Ctx) -> Outcome:
    d = ctx.staged("c06")
    clean = next(p for p in (d / "store" / "clean").iterdir() if not p.name.startswith("."))
    f = clean / "pairs.parquet"
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size // 2)
    p = ctx.cli("status", cwd=d)
    row = next((ln for ln in p.stdout.splitlines() if ln.startswith("clean ")), "")
    if p.returncode != 0:
        return refusal(p)
    return Outcome("correct" if row.split()[1:2] == ["damaged"] else "wrong/lost", row[:200])


@case(7, "a cached artifact with a broken manifest.json: commit deletes the fresh output")
def c07(ctx: Ctx) -> Outcome:
    d = ctx.staged("c07")
    clean = next(p for p in (d / "store" / "clean").iterdir() if not p.name.startswith("."))
    (clean / "manifest.json").write_text("{not json")
    p = ctx.cli("run", "--until", "tokenize", "--json", cwd=d)
    if p.returncode != 0 or "Traceback (most recent call last)" in text_of(p):
        return refusal(p)
    st = {r["stage"]: r["status"] for r in json.loads(p.stdout)}
    aside = list(clean.parent.glob(f".bad-{clean.name}-*"))
    ok = st["clean"] == "ran" and st["shard"] == "cached" and aside
    return Outcome("correct" if ok else "wrong/lost", f"clean {st['clean']}, shard {st['shard']}, set aside: "
                                                       f"{[a.name for a in aside]}")


@case(8, "a full disk (artifacts_dir on a 150 KB tmpfs)")
def c08(ctx: Ctx) -> Outcome:
    d = ctx.project("c08")
    store = d / "store"
    store.mkdir()
    if os.geteuid() != 0:
        return Outcome("n/a", "mounting a tmpfs needs root (tests/test_nothing_lost.py injects the error instead)")
    m = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=150k", "tmpfs", str(store)], capture_output=True,
                       text=True)
    if m.returncode != 0:
        return Outcome("n/a", f"mount failed: {m.stderr.strip()}")
    try:
        p = ctx.cli("run", "--until", "clean", cwd=d)
    finally:
        subprocess.run(["umount", str(store)], check=False)
    return refusal(p, needs="the disk is full")


@case(9, "the background Prefect server killed during a run")
def c09(ctx: Ctx) -> Outcome:
    d = ctx.project("c09")
    env = ctx.env(api=None, WORLDPM_PREFECT_PORT=str(free_port()))
    proc = subprocess.Popen([WORLDPM, "run", "--until", "tokenize"], cwd=d, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    rec_path = d / ".worldpm" / "prefect" / "server.json"
    t0 = time.monotonic()
    while time.monotonic() - t0 < 600 and proc.poll() is None:
        logs = list((d / ".worldpm" / "logs").glob("run-*.log"))
        if rec_path.is_file() and logs and ": running (key" in logs[0].read_text():  # during a stage
            break
        time.sleep(0.05)
    rec = json.loads(rec_path.read_text())
    os.killpg(rec["pid"], signal.SIGKILL)
    t_kill = time.monotonic()
    try:
        out, err = proc.communicate(timeout=900)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    p = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    o = refusal(p, needs=f"lost the background Prefect server at {rec['url']}")
    o.detail = f"{time.monotonic() - t_kill:.0f}s after the kill: {o.detail}"
    return o


def _flow_run_state(api: str, run_id: str) -> str:
    code = ("import sys\nfrom prefect.client.orchestration import get_client\n"
            "with get_client(sync_client=True) as c: print(c.read_flow_run(sys.argv[1]).state.type.value)")
    p = subprocess.run([sys.executable, "-c", code, run_id], env={**os.environ, "PREFECT_API_URL": api},
                       capture_output=True, text=True)
    return p.stdout.strip() or p.stderr.strip()[-200:]


@case(14, "a killed run's flow run stays Running forever")
def c14(ctx: Ctx) -> Outcome:
    d = ctx.project("c14")
    proc = subprocess.Popen([WORLDPM, "run", "--until", "tokenize"], cwd=d, env=ctx.env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    run_id = None
    t0 = time.monotonic()
    while time.monotonic() - t0 < 600 and proc.poll() is None and run_id is None:
        m = re.search(r"/runs/flow-run/([0-9a-f-]{36})", "".join(
            f.read_text() for f in (d / ".worldpm" / "logs").glob("run-*.log")) if (d / ".worldpm").exists() else "")
        run_id = m.group(1) if m else None
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    if run_id is None:
        return Outcome("n/a", "the run ended before its flow run could be seen")
    before = _flow_run_state(ctx.api, run_id)
    ctx.cli("run", "--until", "download", cwd=d)
    after = _flow_run_state(ctx.api, run_id)
    return Outcome("correct" if after == "CRASHED" else "wrong/lost", f"after the kill {before}; after the next run "
                                                                       f"{after}")


@case(15, "without PREFECT_API_URL a run adopts another folder's server on the preferred port")
def c15(ctx: Ctx) -> Outcome:
    d = ctx.project("c15")
    port = ctx.api.split(":")[2].split("/")[0]
    env = ctx.env(api=None, WORLDPM_PREFECT_PORT=port)
    try:
        p = ctx.cli("run", "--until", "download", cwd=d, env=env)
    finally:
        ctx.cli("server", "stop", cwd=d, env=env)
    if p.returncode != 0:
        return refusal(p)
    used = re.search(r"View at (http://127\.0\.0\.1:\d+)/runs", p.stderr)
    said = [ln for ln in p.stderr.splitlines() if "PREFECT_HOME" in ln or "not this folder's" in ln]
    if used and not used.group(1).endswith(f":{port}") and said:
        return Outcome("correct", " | ".join(s[:110] for s in said))
    return Outcome("wrong/lost", f"ran on {used.group(1) if used else '?'}: {said}")


@case(11, "--set train.epochs=.inf passes validation")
def c11(ctx: Ctx) -> Outcome:
    return refusal(ctx.cli("run", "--set", "train.epochs=.inf", cwd=ctx.project("c11")), needs="train.epochs")


@case(17, "clean.min_margin=.nan passes validation and rejects every pair")
def c17(ctx: Ctx) -> Outcome:
    return refusal(ctx.cli("run", "--until", "clean", "--set", "clean.min_margin=.nan", cwd=ctx.project("c17")),
                   needs="clean.min_margin")


@case(18, "a config without a test split is refused only by evaluate, after training")
def c18(ctx: Ctx) -> Outcome:
    d = ctx.project("c18")
    p = ctx.cli("run", "--set", "shard.test=0", "--set", "shard.train=0.9", cwd=d)
    o = refusal(p, needs="shard.test")
    if o.kind == "clean" and (d / "store").exists():
        return Outcome("wrong/lost", f"refused, but after stages ran: {o.detail}")
    return o


@case(16, "--source mydata/pairs (no such folder) tries the hub, then says only that it cannot be reached")
def c16(ctx: Ctx) -> Outcome:
    d = ctx.project("c16")
    t0 = time.monotonic()
    p = ctx.cli("run", "--source", "mydata/pairs", cwd=d, env=ctx.env(HF_HUB_OFFLINE="0"))
    o = refusal(p, only_line=True, needs="no file or folder 'mydata/pairs'")
    o.detail = f"{time.monotonic() - t0:.1f}s: {o.detail}"
    return o


@case(13, "evaluate on a model without a reward head prints transformers' load report first")
def c13(ctx: Ctx) -> Outcome:
    code = "from worldpm.modeling.models import minilm_dir; print(minilm_dir())"
    plain = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    return refusal(ctx.cli("evaluate", "--model", plain, "--data", str(RB), cwd=ctx.work), only_line=True,
                   needs="is not a trained reward model")


@case(12, "a trainer failure (train.max_tokens_per_batch=32) prints trainer stderr before its final line")
def c12(ctx: Ctx) -> Outcome:
    d = ctx.staged("c12")
    return refusal(ctx.cli("run", "--until", "train", "--set", "train.max_tokens_per_batch=32", cwd=d))


@case(19, "the trainer SIGKILLed: the cause shown is an unrelated log line")
def c19(ctx: Ctx) -> Outcome:
    d = ctx.staged("c19")
    proc = subprocess.Popen([WORLDPM, "run", "--until", "train", "--set", "train.max_steps=2000"], cwd=d,
                            env=ctx.env(), text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    trainer = None
    t0 = time.monotonic()
    while time.monotonic() - t0 < 600 and proc.poll() is None and trainer is None:
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"worldpm.modeling.trainer.recipe" in cmd and b"accelerate.commands.launch" not in cmd \
                    and str(d).encode() in b" ".join(cmd):
                trainer = int(pid)
        time.sleep(0.2)
    if trainer is None:
        proc.kill()
        return Outcome("n/a", "no trainer process was seen")
    while time.monotonic() - t0 < 900 and proc.poll() is None:  # let it load the model and start training
        logs = list((d / ".worldpm" / "logs").glob("run-*.log"))
        if logs and "training: " in logs[0].read_text(errors="replace"):
            break
        time.sleep(0.2)
    os.kill(trainer, signal.SIGKILL)
    out, err = proc.communicate(timeout=600)
    p = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    o = refusal(p, needs="killed by SIGKILL")
    last = (err.strip().splitlines() or [""])[-1]
    cause = last.split("SIGKILL", 1)[-1]
    if o.kind == "clean" and re.search(r"MISSING|LOAD REPORT|Loading weights|newly initialized|transformers", cause):
        return Outcome("wrong/lost", f"the cause shown is unrelated: {last[:240]}")
    return o


# ---- run ---------------------------------------------------------------------------------------------------------
def start_server(home: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    home.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
                             str(port)], env=env, stdout=open(home / "server.log", "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 300
    while not healthy(url):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the audit's Prefect server did not start: {(home / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)
    return proc, url


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", help="comma-separated case numbers")
    ap.add_argument("--work", help="scratch folder (default: a temp dir, removed after)")
    ap.add_argument("--json", default=str(ROOT / "bench" / "out" / "audit_cases.json"))
    args = ap.parse_args(argv)
    only = sorted(int(x) for x in args.only.split(",")) if args.only else sorted(CASES)
    work = Path(args.work or tempfile.mkdtemp(prefix="worldpm-audit-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    server, api = start_server(work / "prefect-home")
    ctx = Ctx(work, api)
    results: dict[int, dict] = {}
    try:
        for n in only:
            title, fn = CASES[n]
            t0 = time.monotonic()
            try:
                o = fn(ctx)
            except Exception as e:  # the audit itself failed on this case: said, never counted as passing
                o = Outcome("n/a", f"the audit could not run it: {type(e).__name__}: {e}")
            results[n] = {"case": n, "title": title, "outcome": o.kind, "detail": o.detail,
                          "seconds": round(time.monotonic() - t0, 1)}
            print(f"{n:>2}  {o.kind:<10}  {title}\n      {o.detail}", flush=True)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
        if not args.work:
            subprocess.run(["umount", str(work / "c08" / "store")], capture_output=True)
            shutil.rmtree(work, ignore_errors=True)
    kinds = ("clean", "correct", "traceback", "wrong/lost")
    print(f"\n| family | cases | {' | '.join(kinds)} |\n|---|---|" + "---:|" * len(kinds))
    total = {k: 0 for k in kinds}
    for family, cases in FAMILIES.items():
        mine = [results[c] for c in cases if c in results]
        if not mine:
            continue
        counts = {k: sum(r["outcome"] == k for r in mine) for k in kinds}
        for k in kinds:
            total[k] += counts[k]
        print(f"| {family} | {', '.join(str(r['case']) for r in mine)} | "
              + " | ".join(str(counts[k]) for k in kinds) + " |")
    print(f"| **all** | {len(results)} | " + " | ".join(f"**{total[k]}**" for k in kinds) + " |")
    na = [r["case"] for r in results.values() if r["outcome"] == "n/a"]
    if na:
        print(f"not run (n/a): {na}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(list(results.values()), indent=2))
    return 0 if total["traceback"] == 0 and total["wrong/lost"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
