"""Scale benchmark: what each data stage costs as the data grows (wall time, peak RSS, artifact size), the tokenize
stage against the tokenizer's own speed, the StackExchange Posts.xml reader, and the trainer's start.

    .venv/bin/python bench/bench_scale.py                          # everything below at 20k, 200k and 1M pairs
    .venv/bin/python bench/bench_scale.py --sizes 20000 200000     # some sizes
    .venv/bin/python bench/bench_scale.py --modes stages --stages tokenize   # one stage again (its inputs cached)
    .venv/bin/python bench/bench_scale.py --modes tokenizer        # tokenize stage vs a plain encode_batch
    .venv/bin/python bench/bench_scale.py --modes posts --posts 100000 1000000   # the Posts.xml reader
    .venv/bin/python bench/bench_scale.py --modes train            # trainer start: tiny model, 2 processes, 5 steps

Inputs (built once, cached under --cache, default ~/.cache/worldpm-bench, never in the repo):
* pairs-<N>/: N synthetic StackExchange pairs in lvwerra/stack-exchange-paired's schema (qid, question, date,
  metadata, response_j, response_k), files of FILE_PAIRS pairs, made from the shared sample
  (../shared/data/stack-exchange-paired, 1,396 pairs of 440 questions): copy c of the sample gets new question ids
  (so a question's pairs stay one group and the splits work), and every distinct question and answer text of the
  copy is perturbed once (so an answer shared by two pairs stays shared): its length is scaled by a log-normal
  factor (sigma LEN_SIGMA, the text repeated or cut at a word), and REPLACE of its words are replaced by words drawn
  from the word stream of the shared texts (the paired sample and the Posts.xml dumps, so some HTML residue comes
  in): realistic lengths, no exact copies, a real-text vocabulary.
* posts-<N>/synthetic.stackexchange.com/Posts.xml: N posts made from the shared Posts.xml dumps (beer + coffee)
  the same way: copy c shifts every Id, ParentId and AcceptedAnswerId, perturbs every Body and Title, jitters
  Score by -1..1.

Modes (each measurement in its own subprocess; peak RSS is that process's ru_maxrss from wait4, imports included,
next to its RSS before the stage started):
  stages     download, normalise, clean, shard, tokenize at every size, each through the engine
             (tasks.PIPELINE.run(only=stage, force=[stage]), Prefect left out) with bench/out/scale config
             files: wall time of the process, the stage's own seconds (its manifest), peak RSS, artifact size
  tokenizer  the tokenize stage's pairs/s (its manifest, at each size; this run is also the stages table's
             tokenize row when both modes run) beside a plain encode_batch of the same
             rendered texts (full_text of chosen and rejected, special tokens written out) by one
             `tokenizers.Tokenizer` with RAYON_NUM_THREADS = tokenize.num_proc, ids taken out as lists
             (`[e.ids for e in enc]`); also encode_batch_fast (no offsets). Reported as a ratio.
  posts      the download stage's Posts.xml path (read_source_file + the sinks) on synthetic dumps: posts/s,
             pairs/s, peak RSS
  train      the train stage (accelerate launch, 2 CPU processes, a tiny random BERT, 5 steps) on each size's
             tokenize artifact: peak RSS of each trainer process (polled) and launch-to-first-step (the
             trainer's own startup record)

Results: bench/out/scale/results.json (every row, merged across runs by (mode, size, stage)) and a table printed.
Never a timed test; numbers depend on the machine and its load, which each row records (os.getloadavg).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
SE_PAIRED = SHARED / "stack-exchange-paired" / "data"
DUMPS = SHARED / "stackexchange-dumps"
OUT = ROOT / "bench" / "out" / "scale"
DEFAULT_CACHE = Path(os.environ.get("WORLDPM_BENCH_CACHE", Path.home() / ".cache" / "worldpm-bench"))
SIZES = (20_000, 200_000, 1_000_000)
DATA_STAGES = ("download", "normalise", "clean", "shard", "tokenize")
FILE_PAIRS = 500_000   # pairs a synthetic input file: big files, so that a per-file cost that grows shows
LEN_SIGMA = 0.45       # log-normal length factor of a perturbed text
REPLACE = 0.25         # fraction of its words replaced
QID_STRIDE = 1_000_000  # copy c's question ids: c * QID_STRIDE + qid
SEED = 20
ENCODE_PAIRS = 200_000  # pairs the plain-encode floor encodes at most (every k-th batch of a larger input)


# ---- synthetic inputs ------------------------------------------------------------------------------------------

_WORD = re.compile(r"\S+\s*")


class Perturber:
    """Texts as arrays of word ids (a word with its trailing whitespace); a perturbed copy is a length-scaled,
    partly replaced sequence of those words, joined."""

    def __init__(self, texts: list[str], extra: list[str]):
        import numpy as np

        vocab: dict[str, int] = {}
        self.texts = []
        for t in texts:
            lead = t[: len(t) - len(t.lstrip())]
            words = ([lead] if lead else []) + _WORD.findall(t)
            ids = [vocab.setdefault(w, len(vocab)) for w in words] or [vocab.setdefault("", len(vocab))]
            self.texts.append(np.array(ids, dtype=np.int64))
        stream = [w for arr in self.texts for w in arr.tolist()]
        for t in extra:
            stream += [vocab.setdefault(w, len(vocab)) for w in _WORD.findall(t)]
        self.words = np.array(list(vocab), dtype=object)
        self.stream = np.array(stream, dtype=np.int64)  # frequency-weighted word pool

    def copy(self, i: int, rng) -> str:
        import numpy as np

        a = self.texts[i]
        n = max(1, int(round(len(a) * float(np.clip(rng.lognormal(0.0, LEN_SIGMA), 0.2, 5.0)))))
        idx = a[np.arange(n) % len(a)]
        mask = rng.random(n) < REPLACE
        idx[mask] = self.stream[rng.integers(0, len(self.stream), int(mask.sum()))]
        return "".join(self.words[idx]).rstrip()


def _posts_rows() -> list[dict]:
    import xml.etree.ElementTree as ET

    rows = []
    for i, f in enumerate(sorted(DUMPS.glob("*/Posts.xml"))):
        for _, el in ET.iterparse(f):
            if el.tag == "row":
                rows.append({**el.attrib, "_dump": i})
                el.clear()
    return rows


def build_pairs(n: int, cache: Path) -> Path:
    """cache/pairs-<n>/part-<i>.parquet: n synthetic pairs (see the module docstring). Cached."""
    import numpy as np
    import polars as pl

    out = cache / f"pairs-{n}"
    done = cache / f"pairs-{n}.done"
    if done.exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.parquet"):
        old.unlink()
    base = pl.read_parquet(sorted(SE_PAIRED.rglob("*.parquet")))
    texts = pl.concat([base["question"], base["response_j"], base["response_k"]]).unique(maintain_order=True)
    code = {t: i for i, t in enumerate(texts.to_list())}
    q = np.array([code[t] for t in base["question"].to_list()])
    j = np.array([code[t] for t in base["response_j"].to_list()])
    k = np.array([code[t] for t in base["response_k"].to_list()])
    extra = [r.get("Body") or "" for r in _posts_rows()]  # HTML words join the pool
    pert = Perturber(texts.to_list(), extra)
    t0 = time.perf_counter()
    frames, have, part = [], 0, 0
    copies = -(-n // base.height)
    for c in range(copies):
        rng = np.random.default_rng([SEED, c])
        new = pl.Series([pert.copy(i, rng) for i in range(len(texts))], dtype=pl.String)
        frame = base.select(
            qid=pl.col("qid") + c * QID_STRIDE,
            question=new.gather(q), date=pl.col("date"),
            metadata=pl.concat_list([pl.col("metadata").list.get(1) + "/questions/"
                                     + (pl.col("qid") + c * QID_STRIDE).cast(pl.String),
                                     pl.col("metadata").list.get(1), pl.col("metadata").list.get(2)]),
            response_j=new.gather(j), response_k=new.gather(k),
        )
        frame = frame.head(n - have)
        frames.append(frame)
        have += frame.height
        if sum(f.height for f in frames) >= FILE_PAIRS or have >= n:
            pl.concat(frames).write_parquet(out / f"part-{part:05d}.parquet", compression="zstd",
                                            row_group_size=50_000)
            frames, part = [], part + 1
            print(f"  pairs-{n}: {have} pairs ({time.perf_counter() - t0:.0f}s)", flush=True)
        if have >= n:
            break
    done.write_text(json.dumps({"pairs": n, "files": part}))
    return out


def _xml_attr(v: str) -> str:
    return (v.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")
            .replace("\n", "&#xA;").replace("\r", "&#xD;"))


def build_posts(n: int, cache: Path) -> Path:
    """cache/posts-<n>/synthetic.stackexchange.com/Posts.xml: n synthetic posts (see the module docstring)."""
    import numpy as np

    out = cache / f"posts-{n}" / "synthetic.stackexchange.com" / "Posts.xml"
    done = cache / f"posts-{n}.done"
    if done.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = _posts_rows()  # beer's then coffee's: their Ids overlap, so each dump gets its own range of Ids
    site = 10 ** len(str(max(int(r["Id"]) for r in rows)))
    stride = site * (max(r["_dump"] for r in rows) + 1)
    bodies = [r.get("Body") or "" for r in rows]
    titles = [r.get("Title") or "" for r in rows]
    pb, pt = Perturber(bodies, []), Perturber(titles, [])
    written, c = 0, 0
    t0 = time.perf_counter()
    with open(out.with_suffix(".tmp"), "w", encoding="utf-8") as f:
        f.write('\ufeff<?xml version="1.0" encoding="utf-8"?>\n<posts>\n')
        while written < n:
            rng = np.random.default_rng([SEED, 7, c])
            shift = c * stride
            for i, r in enumerate(rows):
                if written >= n:
                    break
                a = dict(r)
                own = a.pop("_dump") * site
                for key in ("Id", "ParentId", "AcceptedAnswerId"):
                    if key in a:
                        a[key] = str(int(a[key]) + own + shift)
                if a.get("Body"):
                    a["Body"] = pb.copy(i, rng)
                if a.get("Title"):
                    a["Title"] = pt.copy(i, rng)
                if "Score" in a:
                    a["Score"] = str(int(a["Score"]) + int(rng.integers(-1, 2)))
                f.write("  <row " + " ".join(f'{k}="{_xml_attr(v)}"' for k, v in a.items()) + " />\n")
                written += 1
            c += 1
            if c % 50 == 0:
                print(f"  posts-{n}: {written} posts ({time.perf_counter() - t0:.0f}s)", flush=True)
        f.write("</posts>\n")
    os.replace(out.with_suffix(".tmp"), out)
    done.write_text(json.dumps({"posts": n}))
    return out


# ---- configs and measured subprocesses -------------------------------------------------------------------------

def write_config(cache: Path, name: str, source: Path, fmt: str, extra: dict | None = None) -> Path:
    """A pipeline config (bench/out/scale/<name>.yaml) over one local source, the store under the cache."""
    import yaml

    cfg = {"name": f"bench-scale-{name}", "artifacts_dir": str(cache / "artifacts"),
           "sources": [{"kind": "local", "path": str(source), "format": fmt}]}
    for section, values in (extra or {}).items():
        cfg.setdefault(section, {}).update(values)
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def measured(cmd: list[str], env: dict | None = None, log: Path | None = None, poll=None) -> dict:
    """Run cmd as a child; its wall seconds, CPU seconds (user + system) and peak RSS (ru_maxrss from wait4, KB ->
    MB); `poll(proc)` is called every 0.1 s while it runs. The child's last stdout line, if JSON, is merged in."""
    t0 = time.perf_counter()
    load0 = os.getloadavg()[0]
    out = open(log, "a") if log else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
                            stdout=subprocess.PIPE, stderr=out, text=True)
    lines: list[str] = []
    import threading

    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    while True:  # wait4 reaps the child itself (Popen.poll would, and take its rusage with it)
        pid, status, ru = os.wait4(proc.pid, os.WNOHANG if poll is not None else 0)
        if pid:
            break
        poll(proc)
        time.sleep(0.1)
    proc.returncode = os.waitstatus_to_exitcode(status)
    reader.join()
    wall = time.perf_counter() - t0
    res = {"wall_s": round(wall, 2), "cpu_s": round(ru.ru_utime + ru.ru_stime, 2),
           "peak_rss_mb": round(ru.ru_maxrss / 1024, 1),
           "load_1min": [round(load0, 2), round(os.getloadavg()[0], 2)], "exit": os.waitstatus_to_exitcode(status)}
    for line in reversed(lines):
        if line.strip().startswith("{"):
            res.update(json.loads(line))
            break
    if res["exit"] != 0:
        res["error"] = (lines[-1].strip() if lines else "") or f"exit {res['exit']}; see {log}"
    return res


def _du(path: str | Path) -> int:
    p = Path(path)
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size


def child_stage(config: str, stage: str) -> None:
    """In a subprocess: one stage through the engine, forced; prints a JSON line."""
    import logging

    from tasks import PIPELINE
    from worldpm.config import load_config
    from worldpm.store import ArtifactStore

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    cfg = load_config(config, [])
    store = ArtifactStore(cfg.artifacts_dir)
    rss0 = _status_kb("VmRSS") / 1024
    results = PIPELINE.run(cfg, store, only=stage, force=[stage])
    r = next(x for x in results if x["stage"] == stage)
    man = json.loads((Path(r["path"]) / "manifest.json").read_text())
    print(json.dumps({"stage_s": man.get("seconds"), "rows_in": man.get("rows_in"), "rows_out": man.get("rows_out"),
                      "path": r["path"], "rss_start_mb": round(rss0, 1),
                      **({"pairs_per_s": man["pairs_per_s"]} if "pairs_per_s" in man else {}),
                      **({"records_in": man["records_in"]} if "records_in" in man else {})}), flush=True)


def child_prepare(config: str, stage: str) -> None:
    """In a subprocess, not measured: build (or find cached) every stage before `stage`."""
    import logging

    from tasks import PIPELINE
    from worldpm.config import load_config
    from worldpm.store import ArtifactStore

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    cfg = load_config(config, [])
    before = PIPELINE.ancestors(stage)
    if before:
        PIPELINE.run(cfg, ArtifactStore(cfg.artifacts_dir), until=before[-1])
    print("{}", flush=True)


def full_text(r, prompt: list[dict], response: str) -> str:
    """One side as a single string, special tokens written out ("[CLS]...[SEP]" for BERT, the chat template's markers
    without the trailing newline after the end marker): what a caller outside the pipeline hands a tokenizer with
    add_special_tokens=False. Before any cut at max_length. (Renderer.full_text before issue 18 removed it.)"""
    if r.chat:
        return r.render(prompt, response).rstrip()
    msgs = [{"role": m["role"], "content": m["content"] or ""} for m in prompt]
    if len(msgs) == 1 and msgs[0]["role"] == "user":
        body = msgs[0]["content"]
    else:
        body = "\n\n".join(f"{m['role'].title()}: {m['content']}" for m in msgs)

    def specials(ids):
        return "".join(r.tok.convert_ids_to_tokens(ids))
    tail_special = r.tail_ids[len(r.encode(r.suffix_text)):] if r.suffix_text else r.tail_ids
    return specials(r.head_ids) + r.head_text + body + r.mid_text + response + r.suffix_text + specials(tail_special)


def child_encode(config: str) -> None:
    """In a subprocess: the plain-tokenizer floor of the tokenize stage on the same pairs (its shard artifact), a
    batch of tokenize.batch_size pairs at a time. Untimed: the batch rendered to its two full texts
    (full_text, special tokens written out, as a caller outside the pipeline feeds a tokenizer) and to the
    three parts the stage encodes (prompt body, chosen, rejected). Timed, each on the same batch, by one
    tokenizers.Tokenizer whose rayon pool has RAYON_NUM_THREADS (set by the parent to tokenize.num_proc) threads,
    ids taken out as Python lists:
      encode       encode_batch of the full texts, truncation at max_length (keeping the end): the plain way
      encode_fast  encode_batch_fast (no character offsets) of the same
      parts_fast   encode_batch_fast of the stage's three parts, no truncation: the tokenizer's share of the stage
    Above ENCODE_PAIRS pairs, every k-th batch only (pairs/s is a rate; the stage itself does every pair)."""
    import polars as pl
    from tokenizers import Tokenizer

    from tasks import PIPELINE
    from worldpm.config import load_config
    from worldpm.data.render import _bodies, renderer
    from worldpm.data.textpath import RenderSettings
    from worldpm.data.splits import SPLITS, data_files
    from worldpm.modeling import models
    from worldpm.store import ArtifactStore

    cfg = load_config(config, [])
    store = ArtifactStore(cfg.artifacts_dir)
    shard = next(r for r in PIPELINE.run(cfg, store, until="shard") if r["stage"] == "shard")
    files = data_files(shard["path"])
    tok = models.load_tokenizer({"name_or_path": cfg.model.tokenizer or cfg.model.name_or_path,
                                 "revision": cfg.model.revision, "trust_remote_code": cfg.model.trust_remote_code})
    r = renderer(tok, RenderSettings.of(cfg.tokenize))
    plain = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    plain.no_padding()
    plain.enable_truncation(cfg.tokenize.max_length, direction="left")
    parts = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    parts.no_padding()
    parts.no_truncation()
    rss0 = _status_kb("VmRSS") / 1024
    secs = {"encode": 0.0, "encode_fast": 0.0, "parts_fast": 0.0}
    pairs = tokens = 0
    paths = [p for s in SPLITS for p in files.get(s, [])]
    total = pl.scan_parquet(paths).select(pl.len()).collect().item()
    every = max(1, total // ENCODE_PAIRS)  # a rate: every k-th batch is a fair sample of a large input
    for i, batch in enumerate(pl.scan_parquet(paths).select("prompt", "chosen", "rejected").collect_batches(
            chunk_size=cfg.tokenize.batch_size, engine="streaming")):
        if i % every:
            continue
        prompts = batch["prompt"].to_list()
        full = [full_text(r, p, c) for p, c in zip(prompts, batch["chosen"].to_list())]
        full += [full_text(r, p, c) for p, c in zip(prompts, batch["rejected"].to_list())]
        three = _bodies(batch, r)["_body"].to_list() + batch["chosen"].to_list() + batch["rejected"].to_list()
        for name, fn, texts in (("encode", plain.encode_batch, full), ("encode_fast", plain.encode_batch_fast, full),
                                ("parts_fast", parts.encode_batch_fast, three)):
            t = time.perf_counter()
            ids = [e.ids for e in fn(texts, add_special_tokens=False)]
            secs[name] += time.perf_counter() - t
            if name == "encode":
                tokens += sum(map(len, ids))
            del ids
        pairs += batch.height
    print(json.dumps({"pairs": pairs, "tokens": tokens, "rss_start_mb": round(rss0, 1),
                      "threads": int(os.environ.get("RAYON_NUM_THREADS", "0")),
                      **{f"{k}_s": round(v, 2) for k, v in secs.items()},
                      **{f"{k}_pairs_per_s": round(pairs / v, 1) for k, v in secs.items()}}), flush=True)


def _tree_rss(root_pid: int) -> dict[int, tuple[str, float, float]]:
    """{pid: (cmdline, RSS MB, anonymous RSS MB)} of root_pid and every descendant, from /proc (RSS counts the
    pages of mapped files a process touched, shared with every other process that maps them; RssAnon is its own)."""
    kids: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d.name))
    out, todo = {}, [root_pid]
    while todo:
        pid = todo.pop()
        todo += kids.get(pid, [])
        try:
            cmd = (Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))[:200]
            status = dict(x.split(":", 1) for x in Path(f"/proc/{pid}/status").read_text().splitlines()
                          if ":" in x)
            rss, anon = (int(status[k].split()[0]) / 1024 for k in ("VmRSS", "RssAnon"))
        except (OSError, KeyError, ValueError):
            continue
        out[pid] = (cmd, rss, anon)
    return out


TINY_BERT = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
             "intermediate_size": 64}
TRAIN_SETTINGS = {"num_processes": 2, "max_steps": 5, "batch_size": 8, "log_every": 1, "checkpoint_every": 1000,
                  "eval_max_pairs": 64}


def _cached_tokenize(cfg, store, n: int):
    """The newest committed tokenize artifact of n pairs made with this config's tokenizer and template and holding
    a token store, whatever the code version that keyed it (the train rows measure the trainer, and a tokenize rerun
    at 1M pairs is half an hour on 2 cores); None if there is none."""
    from worldpm.store import ArtifactRef

    t, m = cfg.tokenize, cfg.model
    want = {"max_length": t.max_length, "overlength": t.overlength, "plain_template": t.plain_template,
            "system_prompt": t.system_prompt, "tokenizer": m.tokenizer or m.name_or_path}
    found = []
    for man_path in (Path(cfg.artifacts_dir) / "tokenize").glob("*/manifest.json"):
        man = json.loads(man_path.read_text())
        c = man.get("config", {})
        flat = {**c.get("tokenize", {}), "tokenizer": (c.get("tokenizer") or {}).get("name_or_path")} \
            if isinstance(c.get("tokenizer"), dict) else c
        if man.get("rows_in") == n and man.get("token_store") and all(flat.get(k) == v for k, v in want.items()):
            found.append((man.get("finished_at", 0), man_path.parent, man))
    if not found:
        return None
    _, path, man = max(found, key=lambda x: x[0])
    return ArtifactRef("tokenize", man["key"], str(path), man["digest"])


def child_train(config: str, n: str) -> None:
    """In a subprocess: ref_logps (bt: a marker) then the train stage, forced, on the tokenize artifact of n pairs
    (_cached_tokenize, else built); prints the trainer's startup."""
    import logging

    from tasks import PIPELINE
    from worldpm.config import load_config
    from worldpm.store import ArtifactStore

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    cfg = load_config(config, [])
    store = ArtifactStore(cfg.artifacts_dir)
    tok = _cached_tokenize(cfg, store, int(n))
    if tok is None:
        PIPELINE.run(cfg, store, until="tokenize")
        tok = _cached_tokenize(cfg, store, int(n))
    rl = PIPELINE.execute("ref_logps", cfg, {"tokenize": tok}, store).ref
    r = PIPELINE.execute("train", cfg, {"tokenize": tok, "ref_logps": rl}, store, force=True)
    summary = json.loads((Path(r.ref.path) / "train_summary.json").read_text())
    print(json.dumps({"stage_s": round(r.seconds, 2), "startup": summary.get("startup"),
                      "launch_to_first_step_s": (summary.get("startup") or {}).get("launch_to_first_step_s"),
                      "train_pairs": summary.get("train_pairs"), "path": r.ref.path, "tokenize": tok.path}),
          flush=True)


# ---- modes -----------------------------------------------------------------------------------------------------

def _self(*args: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), *args]


def _pairs_config(cache: Path, n: int, num_proc: int | None = None) -> Path:
    """The config over n synthetic pairs (tokenize.num_proc as pipeline.yaml has it, or `num_proc`)."""
    if num_proc is None:
        return write_config(cache, f"pairs-{n}", build_pairs(n, cache), "stack_exchange_paired")
    return write_config(cache, f"pairs-{n}-np{num_proc}", build_pairs(n, cache), "stack_exchange_paired",
                        {"tokenize": {"num_proc": num_proc}})


def mode_stages(cache: Path, sizes, stages, log: Path) -> list[dict]:
    rows = []
    for n in sizes:
        config = _pairs_config(cache, n)
        for stage in stages:
            print(f"[stages] {n} pairs: {stage} ...", flush=True)
            prep = measured(_self("_prepare", str(config), stage), log=log)
            if prep["exit"]:
                rows.append({"mode": "stages", "size": n, "stage": stage, **prep})
                _print_row(rows[-1])
                break
            res = measured(_self("_stage", str(config), stage), log=log)
            if "path" in res:
                res["artifact_mb"] = round(_du(res["path"]) / 1e6, 1)
            rows.append({"mode": "stages", "size": n, "stage": stage, **res})
            _print_row(rows[-1])
            if res["exit"]:
                break
    return rows


def mode_tokenizer(cache: Path, sizes, log: Path, num_proc: int | None = None) -> list[dict]:
    """Per size: plain encode, the tokenize stage, plain encode again (side by side; the ratio is to their mean)."""
    from worldpm.config import load_config

    rows = []
    for n in sizes:
        config = _pairs_config(cache, n, num_proc)
        threads = load_config(config, []).tokenize.num_proc
        label = "tokenize-vs-encode" + (f"-np{threads}" if num_proc is not None else "")
        env = {"RAYON_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "true"}
        print(f"[tokenizer] {n} pairs ...", flush=True)
        measured(_self("_prepare", str(config), "tokenize"), log=log)
        a = measured(_self("_encode", str(config)), env=env, log=log)
        s = measured(_self("_stage", str(config), "tokenize"), log=log)
        b = measured(_self("_encode", str(config)), env=env, log=log)
        if a["exit"] or s["exit"] or b["exit"]:
            rows.append({"mode": "tokenizer", "size": n, "stage": label,
                         "error": a.get("error") or s.get("error") or b.get("error")})
            if "path" in s and not s["exit"] and num_proc is None:  # the stage's own row stands
                rows.append({"mode": "stages", "size": n, "stage": "tokenize", **s,
                             "artifact_mb": round(_du(s["path"]) / 1e6, 1)})
            continue
        mean = {k: (a[f"{k}_pairs_per_s"] + b[f"{k}_pairs_per_s"]) / 2 for k in ("encode", "encode_fast", "parts_fast")}
        row = {"mode": "tokenizer", "size": n, "stage": label, "threads": threads,
               "stage_pairs_per_s": s["pairs_per_s"], **{f"{k}_pairs_per_s": round(v, 1) for k, v in mean.items()},
               **{f"ratio_{k}": round(s["pairs_per_s"] / v, 3) for k, v in mean.items()},
               "stage_peak_rss_mb": s["peak_rss_mb"], "encode_peak_rss_mb": max(a["peak_rss_mb"], b["peak_rss_mb"]),
               "stage_wall_s": s["wall_s"], "stage_s": s["stage_s"], "encode_runs": [a, b],
               "load_1min": a["load_1min"] + s["load_1min"] + b["load_1min"]}
        rows.append(row)
        _print_row(row)
        if "path" in s and num_proc is None:  # the stage run is the tokenize row of the stages table too
            rows.append({"mode": "stages", "size": n, "stage": "tokenize", **s,
                         "artifact_mb": round(_du(s["path"]) / 1e6, 1)})
            _print_row(rows[-1])
    return rows


def mode_posts(cache: Path, posts_sizes, log: Path) -> list[dict]:
    rows = []
    for n in posts_sizes:
        xml = build_posts(n, cache)
        config = write_config(cache, f"posts-{n}", xml, "stackexchange_posts_xml")
        print(f"[posts] {n} posts ...", flush=True)
        measured(_self("_prepare", str(config), "download"), log=log)
        res = measured(_self("_stage", str(config), "download"), log=log)
        if not res["exit"]:
            res.update(posts=n, xml_mb=round(xml.stat().st_size / 1e6, 1),
                       posts_per_s=round(n / res["stage_s"], 1), pairs_per_s=round(res["rows_out"] / res["stage_s"], 1),
                       artifact_mb=round(_du(res["path"]) / 1e6, 1))
        rows.append({"mode": "posts", "size": n, "stage": "download(Posts.xml)", **res})
        _print_row(rows[-1])
    return rows


TRAIN_VARIANTS = {  # how the trainer reads its splits: the token store (what it does) and the baseline
    "mapped": {},
    "in-memory": {"callbacks": ["inmemory_reads:InMemory"]},  # bench/inmemory_reads.py: load_pairs of the Parquet
}


def _train_once(config: Path, n: int, env: dict, log: Path) -> dict:
    """One measured launch: the stage's process, each trainer process's peak RSS and anonymous RSS (polled)."""
    peaks: dict[int, list] = {}

    def poll(proc):
        for pid, (cmd, rss, anon) in _tree_rss(proc.pid).items():
            if pid != proc.pid:
                entry = peaks.setdefault(pid, [cmd, 0.0, 0.0])  # the latest cmdline: a worker is forked from
                entry[0] = cmd  # the launcher before it execs the trainer
                entry[1], entry[2] = max(entry[1], rss), max(entry[2], anon)

    res = measured(_self("_train", str(config), str(n)), env=env, log=log, poll=poll)
    workers = [v for v in peaks.values() if "trainer" in v[0] and "accelerate" not in v[0]]
    res.update(worker_peak_rss_mb=sorted(round(v[1], 1) for v in workers),
               worker_peak_anon_mb=sorted(round(v[2], 1) for v in workers))
    return res


def mode_train(cache: Path, sizes, log: Path, repeat: int = 1) -> list[dict]:
    """Each size x variant launched `repeat` times, the sizes interleaved (round r runs every size once), so that
    the machine's load falls on all sizes alike; a row holds every run and their medians."""
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "bench"), str(ROOT), os.environ.get("PYTHONPATH")]))}
    configs = {(n, v): write_config(cache, f"train-{n}-{v}", build_pairs(n, cache), "stack_exchange_paired",
                                    {"model": {"from_config": TINY_BERT, "tokenizer": "minilm"},
                                     "train": {**TRAIN_SETTINGS, **extra}})
               for n in sizes for v, extra in TRAIN_VARIANTS.items()}
    # one launch first, not recorded: the first Python + torch start after a while reads its files from disk, which
    # would be charged to the smallest size's launch-to-first-step
    print("[train] warm-up launch (not recorded) ...", flush=True)
    measured(_self("_train", str(configs[(sizes[0], "mapped")]), str(sizes[0])), env=env, log=log)
    runs: dict[tuple, list[dict]] = {k: [] for k in configs}
    for r in range(repeat):
        for (n, variant), config in configs.items():
            print(f"[train] round {r + 1}/{repeat}: {n} pairs, {variant} ...", flush=True)
            runs[(n, variant)].append(_train_once(config, n, env, log))
    rows = []
    for (n, variant), rs in runs.items():
        ok = [x for x in rs if not x["exit"]]
        if not ok:
            rows.append({"mode": "train", "size": n, "stage": f"train-start ({variant})", "error": rs[-1].get("error")})
            continue

        def med(xs):
            xs = sorted(x for x in xs if x is not None)
            return xs[len(xs) // 2] if xs else None
        row = {**ok[-1], "mode": "train", "size": n, "stage": f"train-start ({variant})", "runs": len(ok),
               "worker_peak_rss_mb": max(max(x["worker_peak_rss_mb"] or [0]) for x in ok),
               "worker_peak_anon_mb": max(max(x["worker_peak_anon_mb"] or [0]) for x in ok),
               "launch_to_first_step_s": med([x.get("launch_to_first_step_s") for x in ok]),
               "launch_to_first_step_all": [x.get("launch_to_first_step_s") for x in ok],
               "data_s": med([(x.get("startup") or {}).get("data_s") for x in ok]),
               "worker_peak_rss_all": [x["worker_peak_rss_mb"] for x in ok],
               "load_1min": [x["load_1min"] for x in ok]}
        rows.append(row)
        _print_row(row)
    return rows


# ---- results ---------------------------------------------------------------------------------------------------

def _print_row(r: dict) -> None:
    if r.get("error"):
        print(f"  {r['mode']:<9} {r['size']:>9} {r['stage']:<22} ERROR {r['error']}", flush=True)
        return
    if r["mode"] == "tokenizer":
        print(f"  tokenizer {r['size']:>9} stage {r['stage_pairs_per_s']:>7.0f} pairs/s; encode_batch "
              f"{r['encode_pairs_per_s']:>7.0f} (stage/it {r['ratio_encode']:.2f}), encode_batch_fast "
              f"{r['encode_fast_pairs_per_s']:>7.0f} ({r['ratio_encode_fast']:.2f}), parts "
              f"{r['parts_fast_pairs_per_s']:>7.0f} ({r['ratio_parts_fast']:.2f}); stage peak RSS "
              f"{r['stage_peak_rss_mb']:.0f} MB; load {r['load_1min']}", flush=True)
        return
    extra = ""
    if r["mode"] == "posts":
        extra = f" {r['posts_per_s']:.0f} posts/s {r['pairs_per_s']:.0f} pairs/s ({r['xml_mb']} MB xml)"
    if r["mode"] == "train":
        extra = (f" worker peak {r['worker_peak_rss_mb']} MB (anon {r.get('worker_peak_anon_mb')}), launch->first "
                 f"step {r.get('launch_to_first_step_s')} s (median of {r.get('launch_to_first_step_all')})")
    print(f"  {r['mode']:<9} {r['size']:>9} {r['stage']:<22} wall {r['wall_s']:>8.1f}s stage "
          f"{(r.get('stage_s') or 0):>8.1f}s peak RSS {r['peak_rss_mb']:>7.0f} MB (start "
          f"{r.get('rss_start_mb', 0):.0f}) artifact {r.get('artifact_mb', 0):>8.1f} MB load {r['load_1min']}{extra}",
          flush=True)


def save(rows: list[dict]) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / "results.json"
    old = json.loads(path.read_text()) if path.exists() else []
    new_keys = {(r["mode"], r["size"], r["stage"]) for r in rows}
    merged = [r for r in old if (r["mode"], r["size"], r["stage"]) not in new_keys] + rows
    for r in rows:
        r["when"] = time.strftime("%Y-%m-%d %H:%M:%S")
    path.write_text(json.dumps(merged, indent=1))
    return path


def table(results) -> str:
    """Markdown tables of results.json: the stages (wall, stage seconds, pairs/s, peak RSS, artifact), tokenize
    against the plain tokenizer, the Posts.xml reader and the trainer's start."""
    rows = json.loads(Path(results).read_text())
    key = {s: i for i, s in enumerate((*DATA_STAGES, "tokenize"))}
    out = ["| stage | pairs | wall s | stage s | pairs/s (stage) | peak RSS MB | artifact MB | load (1 min) |",
           "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in sorted((r for r in rows if r["mode"] == "stages" and not r.get("error")),
                    key=lambda r: (key.get(r["stage"], 99), r["size"])):
        rate = r["size"] / r["stage_s"] if r.get("stage_s") else 0
        out.append(f"| {r['stage']} | {r['size']:,} | {r['wall_s']:.1f} | {r.get('stage_s') or 0:.1f} | {rate:,.0f} | "
                   f"{r['peak_rss_mb']:,.0f} | {r.get('artifact_mb', 0):,.1f} | {r['load_1min']} |")
    out += ["", "| pairs | tokenize stage pairs/s | encode_batch pairs/s | ratio | encode_batch_fast | ratio | "
                "stage peak RSS MB | load (1 min) |", "|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in sorted((r for r in rows if r["mode"] == "tokenizer" and not r.get("error")), key=lambda r: r["size"]):
        out.append(f"| {r['size']:,} | {r['stage_pairs_per_s']:,.0f} | {r['encode_pairs_per_s']:,.0f} | "
                   f"{r['ratio_encode']:.2f} | {r['encode_fast_pairs_per_s']:,.0f} | {r['ratio_encode_fast']:.2f} | "
                   f"{r['stage_peak_rss_mb']:,.0f} | {r['load_1min']} |")
    out += ["", "| posts | XML MB | wall s | posts/s | pairs/s | peak RSS MB | artifact MB | load (1 min) |",
            "|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in sorted((r for r in rows if r["mode"] == "posts" and not r.get("error")), key=lambda r: r["size"]):
        out.append(f"| {r['size']:,} | {r['xml_mb']} | {r['wall_s']:.1f} | {r['posts_per_s']:,.0f} | "
                   f"{r['pairs_per_s']:,.0f} | {r['peak_rss_mb']:,.0f} | {r['artifact_mb']:,.1f} | {r['load_1min']} |")
    out += ["", "| pairs | trainer reads | train pairs | peak RSS per process MB (max) | anonymous MB (max) | "
                "data_s (median) | launch to first step s: median (runs) |", "|---:|---|---:|---:|---:|---:|---|"]
    for r in sorted((r for r in rows if r["mode"] == "train" and not r.get("error") and "runs" in r),
                    key=lambda r: (r["size"], r["stage"])):
        out.append(f"| {r['size']:,} | {r['stage'].split('(')[-1].rstrip(')')} | {r.get('train_pairs') or 0:,} | "
                   f"{r['worker_peak_rss_mb']:,.0f} | {r['worker_peak_anon_mb']:,.0f} | {r['data_s']} | "
                   f"{r['launch_to_first_step_s']} ({', '.join(str(x) for x in r['launch_to_first_step_all'])}) |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0].startswith("_"):  # a measured child
        {"_stage": child_stage, "_prepare": child_prepare, "_encode": child_encode,
         "_train": child_train}[argv[0]](*argv[1:])
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="synthetic inputs and the artifact store")
    p.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), help="pairs (default: %(default)s)")
    p.add_argument("--modes", nargs="+", default=["stages", "tokenizer", "posts"],
                   choices=["stages", "tokenizer", "posts", "train"])
    p.add_argument("--stages", nargs="+", default=list(DATA_STAGES), choices=DATA_STAGES)
    p.add_argument("--posts", type=int, nargs="+", default=[100_000, 1_000_000], help="posts in a synthetic dump")
    p.add_argument("--num-proc", type=int, default=None,
                   help="tokenizer mode: tokenize.num_proc and the floor's threads (default: pipeline.yaml's)")
    p.add_argument("--repeat", type=int, default=3, help="train mode: launches per size and variant (median)")
    p.add_argument("--table", action="store_true", help="print results.json as the markdown tables of bench/README.md")
    a = p.parse_args(argv)
    if a.table:
        print(table(OUT / "results.json"))
        return 0
    log = OUT / "bench_scale.log"
    OUT.mkdir(parents=True, exist_ok=True)
    print(f"cache {a.cache}; child logs in {log}; load {os.getloadavg()}", flush=True)
    rows: list[dict] = []
    try:
        for mode in a.modes:
            if mode == "stages":  # with the tokenizer mode, tokenize is measured there (once, side by side)
                stages = [x for x in a.stages if not (x == "tokenize" and "tokenizer" in a.modes)]
                rows += mode_stages(a.cache, a.sizes, stages, log)
            elif mode == "tokenizer":
                rows += mode_tokenizer(a.cache, a.sizes, log, a.num_proc)
            elif mode == "posts":
                rows += mode_posts(a.cache, a.posts, log)
            elif mode == "train":
                rows += mode_train(a.cache, a.sizes, log, a.repeat)
    finally:
        if rows:
            print(f"results: {save(rows)}")
    return 1 if any(r.get("error") for r in rows) else 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
