"""Length control, measured: MiniLM trained on one StackExchange site, scored on held-out preference sets, plain BT
against each length option (train.length_balance / train.length_debias), with the length rule beside them.

    python bench/bench_length.py                      # every variant, results in bench/out/length/results.json
    python bench/bench_length.py --variants plain poe # some of them
    python bench/bench_length.py --report             # print the tables of the last results again
    python bench/bench_length.py --seed 7 --variants plain subsample --results bench/out/length/results-seed7.json

Training data: the shared lvwerra/stack-exchange-paired sample's beer.stackexchange.com pairs (1,267), through the
pipeline's own stages (download -> clean -> shard -> tokenize -> train -> evaluate; the stages before train are
cached and shared by every variant). The beer test split (15% of the questions) is the in-domain check. Held-out
sets, never trained on, read and normalised by the evaluate stage exactly as training text:
  * coffee: coffee.stackexchange.com pairs of the same sample (another site, same labelling recipe);
  * hh_rlhf: Anthropic hh-rlhf harmless-base test, a seeded sample of --hh-pairs pairs (there the chosen response
    is the shorter one in 55% of pairs, so "longer wins" is below chance);
  * ultrafeedback: trl-lib/ultrafeedback_binarized sample, eval_clean (200) + the first --uf-pairs - 200 of
    train_clean (GPT-4 labels).
Per set and variant: accuracy, length-controlled accuracy (mean of the accuracy on chosen-longer and on chosen-shorter
pairs), Pearson correlation of the reward margin with the response-token length difference, how often the higher
reward goes to the longer response, and the length rule's accuracy on the same pairs; 95% intervals and n.
Every variant starts from the same seed and sees the same number of steps.
"""
from __future__ import annotations

import argparse
import gzip
import json
import logging
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "data"
OUT = ROOT / "bench" / "out" / "length"  # git-ignored
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
log = logging.getLogger("bench_length")

VARIANTS = {
    "plain": [],
    "reweight": ["train.length_balance=reweight"],
    "subsample": ["train.length_balance=subsample"],
    "poe": ["train.length_debias=poe"],
    "decorrelate": ["train.length_debias=decorrelate"],
    "reweight+poe": ["train.length_balance=reweight", "train.length_debias=poe"],
}
SETS = ("test", "coffee", "hh_rlhf", "ultrafeedback")


def eval_files(hh_pairs: int, uf_pairs: int, seed: int) -> dict[str, Path]:
    """The held-out files (written once under bench/out/length/data)."""
    import random

    d = OUT / "data"
    d.mkdir(parents=True, exist_ok=True)
    coffee = SHARED / "stack-exchange-paired" / "data" / "reward" / "coffee.stackexchange.com-00000-of-00001.parquet"
    hh = d / f"hh_rlhf_harmless_{hh_pairs}.jsonl"
    if not hh.exists():
        with gzip.open(SHARED / "hh_rlhf" / "harmless-base_test.jsonl.gz", "rt") as f:
            lines = [ln for ln in f if ln.strip()]
        random.Random(seed).shuffle(lines)
        hh.write_text("".join(lines[:hh_pairs]))
    uf = d / f"ultrafeedback_{uf_pairs}.jsonl"
    if not uf.exists():
        base = SHARED / "ultrafeedback_binarized_sample"
        rows = (base / "eval_clean.jsonl").read_text().splitlines()
        rows += (base / "train_clean.jsonl").read_text().splitlines()[: max(0, uf_pairs - len(rows))]
        uf.write_text("".join(r + "\n" for r in rows[:uf_pairs]))
    return {"coffee": coffee, "hh_rlhf": hh, "ultrafeedback": uf}


def config_yaml(args, files: dict[str, Path]) -> Path:
    beer = SHARED / "stack-exchange-paired" / "data" / "reward" / "beer.stackexchange.com-00000-of-00001.parquet"
    text = f"""name: bench-length
artifacts_dir: {OUT / 'artifacts'}
sources: [{{kind: local, path: {beer}, name: stack-exchange-beer}}]
shard: {{train: 0.85, eval: 0.0, test: 0.15, min_split_pairs: 100}}
tokenize: {{max_length: {args.max_length}, num_proc: 2}}
model: {{name_or_path: minilm}}
train:
  epochs: 1
  max_steps: {args.steps}
  batch_size: {args.batch_size}
  lr: {args.lr}
  warmup_ratio: 0.1
  log_every: 10
  checkpoint_every: 100000
  eval_max_pairs: 0
  seed: {args.seed}
evaluate:
  batch_size: 64
  regression_delta: null
  eval_sets:
""" + "".join(f"    - {{name: {k}, path: {v}}}\n" for k, v in files.items())
    path = OUT / "pipeline.yaml"
    path.write_text(text)
    return path


def run_variant(cfg_path: Path, name: str, extra: list[str]) -> dict:
    from tasks import PIPELINE as pipeline
    from worldpm.config import load_config
    from worldpm.store import ArtifactStore

    cfg = load_config(cfg_path, extra)
    store = ArtifactStore(cfg.artifacts_dir)
    refs: dict = {}
    timing: dict = {}
    for stage in [*pipeline.ancestors("evaluate"), "evaluate"]:
        st = pipeline[stage]
        t0 = time.perf_counter()
        res = pipeline.execute(stage, cfg, {u: refs[u] for u in st.upstream}, store, log=log)
        refs[stage] = res.ref
        timing[stage] = {"status": res.status, "seconds": round(time.perf_counter() - t0, 1)}
        log.info("%s: %s %s in %.0fs", name, stage, res.status, timing[stage]["seconds"])
    metrics = json.loads((Path(refs["evaluate"].path) / "metrics.json").read_text())
    summary = json.loads((Path(refs["train"].path) / "train_summary.json").read_text())
    keep = ("n", "accuracy", "accuracy_ci", "lc_accuracy", "lc_accuracy_ci", "lc_n", "margin_length_corr",
            "margin_length_corr_ci", "corr_n", "prefers_longer", "length_rule_accuracy", "length_rule_accuracy_ci",
            "bt_loss", "ece", "confidence_mean", "truncated")
    return {"variant": name, "settings": extra, "timing": timing,
            "train": {k: summary.get(k) for k in ("steps", "train_pairs", "train_seconds", "pairs_per_s",
                                                   "peak_memory_gb", "length_control")},
            "sets": {s: {k: m.get(k) for k in keep} for s, m in metrics.items()}}


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _ci(ci) -> str:
    return "" if not ci else f" [{100 * ci[0]:.0f}, {100 * ci[1]:.0f}]"


def report(results: list[dict]) -> str:
    """Markdown tables: one per held-out set, a row per variant, the length rule as the last row."""
    lines = []
    for s in SETS:
        rows = [r for r in results if s in r["sets"]]
        if not rows:
            continue
        m0 = rows[0]["sets"][s]
        lines += [f"**{s}** (n={m0['n']}; chosen longer / shorter: {m0['lc_n'][0]} / {m0['lc_n'][1]})", "",
                  "| variant | accuracy % [95% CI] | LC accuracy % [95% CI] | corr(margin, length diff) [95% CI] "
                  "| prefers longer % |", "|---|---:|---:|---:|---:|"]
        for r in rows:
            m = r["sets"][s]
            corr, cci = m["margin_length_corr"], m["margin_length_corr_ci"]
            lines.append(f"| {r['variant']} | {_pct(m['accuracy'])}{_ci(m['accuracy_ci'])} | {_pct(m['lc_accuracy'])}"
                         f"{_ci(m['lc_accuracy_ci'])} | {'-' if corr is None else f'{corr:+.2f}'}"
                         + (f" [{cci[0]:+.2f}, {cci[1]:+.2f}]" if cci else "") + f" | {_pct(m['prefers_longer'])} |")
        lines.append(f"| length rule (longer wins) | {_pct(m0['length_rule_accuracy'])}"
                     f"{_ci(m0['length_rule_accuracy_ci'])} | 50.0 (by construction) | +1 | 100 |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--steps", type=int, default=100, help="optimizer steps per variant (100 x 8 pairs: 0.7 epoch)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-4, help="high for MiniLM: few steps must move it (as in tests/test_train.py)")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--hh-pairs", type=int, default=400)
    ap.add_argument("--uf-pairs", type=int, default=400)
    ap.add_argument("--report", action="store_true", help="print the tables of the saved results and stop")
    ap.add_argument("--results", type=Path, default=OUT / "results.json",
                    help="where results are kept (a run with other settings starts a new table there)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    res_path = args.results
    if args.report:
        print(report(json.loads(res_path.read_text())["results"]))
        return 0
    OUT.mkdir(parents=True, exist_ok=True)
    files = eval_files(args.hh_pairs, args.uf_pairs, args.seed)
    cfg_path = config_yaml(args, files)
    saved = json.loads(res_path.read_text()) if res_path.exists() else {"results": []}
    if saved.get("args") and {k: v for k, v in saved["args"].items() if k != "variants"} != \
            {k: v for k, v in vars(args).items() if k not in ("variants", "report", "results")}:
        saved = {"results": []}  # other settings: start a new table
    done = {r["variant"]: r for r in saved["results"]}
    t0 = time.perf_counter()
    for name in args.variants:
        done[name] = run_variant(cfg_path, name, VARIANTS[name])
        ordered = [done[v] for v in VARIANTS if v in done]
        res_path.write_text(json.dumps({"args": {k: v for k, v in vars(args).items()
                                                 if k not in ("report", "results")},
                                        "load_average_at_end": os.getloadavg(), "results": ordered}, indent=2))
        log.info("%s done (%.0f s so far)", name, time.perf_counter() - t0)
    print(report([done[v] for v in VARIANTS if v in done]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
