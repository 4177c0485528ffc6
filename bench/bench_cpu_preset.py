"""The CPU preset's memory and time: configs/stack-exchange-minilm.yaml on the shared StackExchange sample, a few
optimizer steps, peak RSS of the training process and seconds per step.

    python bench/bench_cpu_preset.py                          # the preset as shipped, 6 steps
    python bench/bench_cpu_preset.py --set train.gradient_checkpointing=false --steps 4

The preset's source (a slice of lvwerra/stack-exchange-paired on the hub) is replaced by the shared sample
(../shared/data/stack-exchange-paired, 1,396 pairs), so it runs offline; everything else is the preset's. Reported:
peak RSS of the trainer process (train_summary.json peak_memory_gb: ru_maxrss), the median seconds per optimizer
step after the first (from metrics.jsonl), and the expected time of one epoch of the sample and of 1,000 steps.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
SHARED_SE = ROOT.parent / "shared" / "data" / "stack-exchange-paired" / "data"
OUT = ROOT / "bench" / "out" / "cpu_preset"  # git-ignored
log = logging.getLogger("bench_cpu_preset")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more overrides")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    from tasks import PIPELINE as pipeline
    from worldpm.config import load_config
    from worldpm.store import ArtifactStore

    overrides = [f"artifacts_dir={OUT / 'artifacts'}", f"train.max_steps={args.steps}", "train.log_every=1",
                 "train.checkpoint_every=100000", "train.eval_max_pairs=64", *args.set]
    cfg = load_config(ROOT / "configs" / "stack-exchange-minilm.yaml", overrides, sources=[str(SHARED_SE)])
    store = ArtifactStore(cfg.artifacts_dir)
    refs: dict = {}
    for stage in [*pipeline.ancestors("train"), "train"]:
        st = pipeline[stage]
        res = pipeline.execute(stage, cfg, {u: refs[u] for u in st.upstream}, store, log=log,
                               force=stage == "train")
        refs[stage] = res.ref
    out = Path(refs["train"].path)
    summary = json.loads((out / "train_summary.json").read_text())
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    per_step = [b["elapsed_s"] - a["elapsed_s"] for a, b in zip(steps, steps[1:])]
    s_step = statistics.median(per_step) if per_step else steps[0]["elapsed_s"]
    t = cfg.train
    pairs_per_step = t.batch_size * t.grad_accum
    train_pairs = refs["tokenize"].manifest()["splits"]["train"]["rows_out"]
    epoch_steps = -(-train_pairs // pairs_per_step)
    result = {
        "overrides": args.set, "max_length": cfg.tokenize.max_length, "batch_size": t.batch_size,
        "grad_accum": t.grad_accum, "gradient_checkpointing": t.gradient_checkpointing,
        "peak_rss_gb": summary["peak_memory_gb"], "seconds_per_step_median": round(s_step, 2),
        "seconds_per_step": [round(x, 2) for x in per_step], "sample_train_pairs": train_pairs,
        "sample_epoch_minutes": round(epoch_steps * s_step / 60, 1),
        "hours_per_1000_steps": round(1000 * s_step / 3600, 2), "load_average": os.getloadavg(),
        "cpus": len(os.sched_getaffinity(0)),
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
