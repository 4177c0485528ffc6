"""Packed vs padded micro-batches, side by side in one process: forward + backward of the BT loss on the same real
pairs, layouts interleaved micro-batch by micro-batch (so load on a shared machine hits all of them alike).

    python bench/bench_packing.py                           # MiniLM, max_length 256, 8 pairs a micro-batch
    python bench/bench_packing.py --max-length 512 --pairs 16 --micro 12

Layouts: ``padded`` (collate_pairs: 2B rows padded to the longest), ``rows`` (collate_packed, rows as wide as the
longest sequence: what the trainer does with sdpa/eager), ``one-row`` (everything in one row under a dense
block mask: what one row costs without a varlen kernel; ``--one-row``). Reported per layout: padding fed, median seconds a
micro-batch, real tokens/s, and the ratio to padded. The pairs: the shared StackExchange sample through the
tokenize stage (bench/out/train/store, as bench_train.py), micro-batches from the trainer's own sampler.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="minilm", help="minilm, or a from_config JSON")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--pairs", type=int, default=8, help="pairs a micro-batch")
    ap.add_argument("--micro", type=int, default=10, help="micro-batches timed (after one warm-up each)")
    ap.add_argument("--random-order", action="store_true", help="no length grouping")
    ap.add_argument("--one-row", action="store_true",
                    help="also time one row under a dense mask (memory grows with the square of the micro-batch's "
                         "tokens: GBs for MiniLM at 8 pairs x 256)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "train")
    a = ap.parse_args()
    import logging

    import torch

    from bench_train import SHARED_SE, tokenized_artifact
    from worldpm.config import load_config
    from worldpm.modeling import models, packing
    from worldpm.modeling.objectives import BradleyTerry, bt_loss
    from worldpm.modeling.trainer.data import PairBatchSampler, collate_packed, collate_pairs, load_pairs
    from worldpm.store import ArtifactStore

    logging.basicConfig(level=logging.WARNING)
    sets = [f"tokenize.max_length={a.max_length}", "shard.train=0.8", "shard.eval=0.1", "shard.test=0.1"]
    sets.append(f"model.from_config={a.model}" if a.model.startswith("{") else f"model.name_or_path={a.model}")
    cfg = load_config(None, sets)
    store = ArtifactStore(a.out / "store")
    ref = tokenized_artifact(cfg, store, SHARED_SE)
    data = load_pairs(Path(ref.path) / "train.parquet")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(Path(ref.path) / "tokenizer"))
    torch.manual_seed(0)
    model = models.build_reward_model(cfg.model.model_dump(mode="json"), tok).train()
    pad = tok.pad_token_id
    sampler = PairBatchSampler(data.pair_len, a.pairs, seed=0, group_by_length=not a.random_order)
    batches = [list(map(int, b)) for b in sampler.global_batches(0)[1:a.micro + 2]]  # not the longest-first one
    layouts = {
        "padded": lambda idx: collate_pairs(data, idx, pad),
        "rows": lambda idx: collate_packed(data, idx, pad, 0),
    }
    if a.one_row:
        layouts["one-row"] = lambda idx: collate_packed(data, idx, pad, None)
    objective = BradleyTerry(cfg.train)
    times = {k: [] for k in layouts}
    fed = {k: [0, 0] for k in layouts}
    for n, idx in enumerate(batches):
        for name, collate in layouts.items():
            b = collate(idx)
            t0 = time.perf_counter()
            model.zero_grad(set_to_none=True)
            rc, rr = objective.rewards(model, b)
            bt_loss(rc, rr).backward()
            dt = time.perf_counter() - t0
            if n:  # the first micro-batch of each layout warms up
                times[name].append(dt)
                fed[name][0] += b["tokens"]
                fed[name][1] += b["padded_tokens"]
    rows = {}
    base = statistics.median(times["padded"])
    for name in layouts:
        med = statistics.median(times[name])
        real, padded = fed[name]
        rows[name] = {"padding_fed": round(1 - real / padded, 4), "median_s": round(med, 4),
                      "tokens_per_s": round(real / sum(times[name]), 1), "speed_vs_padded": round(base / med, 3)}
    print(json.dumps({"model": a.model, "max_length": a.max_length, "pairs": a.pairs, "micro": len(batches) - 1,
                      "grouped": not a.random_order, "kind": packing.pack_kind(model),
                      "threads": torch.get_num_threads(), "layouts": rows}, indent=1))
    print("| layout | padding fed | median s / micro-batch | tokens/s | x padded |\n|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['padding_fed']:.1%} | {r['median_s']} | {r['tokens_per_s']} | {r['speed_vs_padded']} |")


if __name__ == "__main__":
    main()
