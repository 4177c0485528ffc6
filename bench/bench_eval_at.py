"""What evaluation during training (train.eval_at) costs: the train stage with and without it, side by side.

    python bench/bench_eval_at.py                       # MiniLM, the shared StackExchange sample, one epoch, 3 repeats
    python bench/bench_eval_at.py --max-pairs 32 64     # also with fewer pairs scored per point
    python bench/bench_eval_at.py --repeats 1 --max-steps 10 --tiny   # checks the script in a minute

The data: the shared StackExchange sample (../shared/data/stack-exchange-paired, 1,396 pairs; or ``--data``) through
worldpm's download adapter, shard (80/10/10) and tokenize stages, cached in ``<out>/store``. Each repeat runs the
train stage (launched as the pipeline runs it, `accelerate launch`) once without evaluation during training
(``train.eval_at: {}``) and once per ``--max-pairs`` value with ``train.eval_at: {log_points: 10, max_pairs: N}``
(N = 0: the whole eval split), in alternating order, forced (no cache hit). Reported per run: the stage's wall time,
the trainer's training time (train_summary.json ``train_seconds``, the loop without the evaluation points) and its
evaluation time (``eval_curve.seconds``), and the machine's load average (``os.getloadavg``, what `uptime` prints)
before and after. Two shares:

* within a run: eval seconds / train seconds of that run (the same machine state for both parts);
* across runs: (wall with - wall without) / wall without, the paired runs of a repeat (sensitive to the load of a
  shared machine, so both are shown).

Each row is appended to ``<out>/results.jsonl`` as it is measured and ``<out>/results.md`` is rewritten.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED_SE = ROOT.parent / "shared" / "data" / "stack-exchange-paired" / "data"
OUT = ROOT / "bench" / "out" / "eval_at"  # git-ignored
TINY_BERT = {"model_type": "bert", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
             "intermediate_size": 128}

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
log = logging.getLogger("bench")


def tokenized(cfg, store, data_dir: Path):
    """download adapter -> (fixture clean) -> shard -> tokenize, through worldpm's stages (cached in the store)."""
    from tasks import PIPELINE as pipeline

    clean = store.get("clean", "bench")
    if clean is None:
        import polars as pl

        from worldpm.data.sources import read_source_file

        files = sorted(data_dir.rglob("*.parquet"))
        if not files:
            raise SystemExit(f"no StackExchange parquet files under {data_dir} (--data)")
        pairs = pl.concat([read_source_file(p, "stack_exchange_paired").pairs.collect() for p in files])
        tmp = store.new_tmp("clean", "bench")
        pairs.write_parquet(tmp / "pairs.parquet")
        clean = store.commit("clean", "bench", tmp, {"rows_out": pairs.height})
    shard = pipeline.execute("shard", cfg, {"clean": clean}, store, log=log).ref
    tok = pipeline.execute("tokenize", cfg, {"shard": shard}, store, log=log).ref
    return tok, pipeline.execute("ref_logps", cfg, {"tokenize": tok}, store, log=log).ref


def run_one(cfg, store, inputs: dict, max_pairs: int | None) -> dict:
    from tasks import PIPELINE as pipeline

    cfg = cfg.model_copy(deep=True)
    from worldpm.config import EvalAtConfig

    cfg.train.eval_at = EvalAtConfig() if max_pairs is None else EvalAtConfig(log_points=10, max_pairs=max_pairs)
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    res = pipeline.execute("train", cfg, inputs, store, log=log, force=True)
    wall = time.perf_counter() - t0
    load1 = os.getloadavg()
    s = json.loads((Path(res.ref.path) / "train_summary.json").read_text())
    ec = s.get("eval_curve") or {}
    return {"variant": "no eval_at" if max_pairs is None else f"10 points, max_pairs {max_pairs or 'all'}",
            "max_pairs": max_pairs, "wall_s": round(wall, 1), "train_s": s["train_seconds"],
            "eval_s": ec.get("seconds", 0.0), "eval_pairs_per_point": sum(v["pairs"] for v in
                                                                          (ec.get("sets") or {}).values()),
            "points": len(ec.get("points") or []), "steps": s["steps"], "train_pairs": s["train_pairs"],
            "load_before": [round(x, 2) for x in load0], "load_after": [round(x, 2) for x in load1]}


def table(rows: list[dict]) -> str:
    out = ["| repeat | variant | steps | eval pairs/point | wall s | train s | eval s | eval / train | wall vs "
           "no eval_at | load (1, 5, 15 min) before -> after |", "|---:|:--|--:|--:|--:|--:|--:|--:|--:|:--|"]
    base = {r["repeat"]: r["wall_s"] for r in rows if r["max_pairs"] is None}
    for r in rows:
        share = f"{100 * r['eval_s'] / r['train_s']:.1f}%" if r["max_pairs"] is not None else "-"
        vs = (f"{100 * (r['wall_s'] - base[r['repeat']]) / base[r['repeat']]:+.1f}%"
              if r["max_pairs"] is not None and r["repeat"] in base else "-")
        out.append(f"| {r['repeat']} | {r['variant']} | {r['steps']} | {r['eval_pairs_per_point'] or '-'} | "
                   f"{r['wall_s']:.0f} | {r['train_s']:.0f} | {r['eval_s']:.0f} | {share} | {vs} | "
                   f"{' '.join(f'{x:.1f}' for x in r['load_before'])} -> "
                   f"{' '.join(f'{x:.1f}' for x in r['load_after'])} |")
    by: dict = {}
    for r in rows:
        if r["max_pairs"] is not None:
            by.setdefault(r["variant"], []).append(100 * r["eval_s"] / r["train_s"])
    out += ["", "| variant | eval / train, median over repeats (min - max) |", "|:--|--:|"]
    out += [f"| {v} | {statistics.median(x):.1f}% ({min(x):.1f} - {max(x):.1f}) |" for v, x in by.items()]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=SHARED_SE)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-pairs", type=int, nargs="+", default=[0],
                    help="eval_at.max_pairs values to run (0: the whole eval split)")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--max-steps", type=int, default=None, help="default: one epoch")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--tiny", action="store_true", help="a tiny random BERT instead of MiniLM (checks the script)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from worldpm.config import load_config
    from worldpm.store import ArtifactStore

    sets = [f"tokenize.max_length={args.max_length}", f"train.batch_size={args.batch_size}", "train.log_every=5",
            "train.checkpoint_every=100000", "train.eval_max_pairs=0", "shard.min_split_pairs=0"]
    if args.max_steps:
        sets.append(f"train.max_steps={args.max_steps}")
    if args.tiny:
        sets.append(f"model.from_config={json.dumps(TINY_BERT)}")
    cfg = load_config(None, sets)
    args.out.mkdir(parents=True, exist_ok=True)
    store = ArtifactStore(args.out / "store")
    tok, ref = tokenized(cfg, store, args.data)
    inputs = {"tokenize": tok, "ref_logps": ref}
    results = args.out / "results.jsonl"
    rows = []
    for rep in range(1, args.repeats + 1):
        variants: list[int | None] = [None, *args.max_pairs]
        if rep % 2 == 0:  # alternate the order: a load that drifts during a repeat favours neither side
            variants.reverse()
        for v in variants:
            r = {"repeat": rep, **run_one(cfg, store, inputs, v), "model": "tiny-bert" if args.tiny else "minilm",
                 "max_length": args.max_length, "batch_size": args.batch_size,
                 "date": time.strftime("%Y-%m-%d %H:%M")}
            rows.append(r)
            with results.open("a") as f:
                f.write(json.dumps(r) + "\n")
            (args.out / "results.md").write_text(table(rows))
            print(table(rows), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
