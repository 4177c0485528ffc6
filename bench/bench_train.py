"""Training throughput: worldpm's trainer vs TRL's RewardTrainer, same model, data, max_length, batch size, precision.

    python bench/bench_train.py                       # CPU: MiniLM (the embedded default), fp32
    python bench/bench_train.py --gpu                 # GPU: random-init Qwen2 ~0.5B (configs/qwen2-0.5b-random.yaml),
                                                      # bf16, real Qwen tokenizer; adds MFU

Both sides train on the same token ids: the shared StackExchange sample (../shared/data/stack-exchange-paired)
through worldpm's own download adapter, shard and tokenize stages. Ours runs as the pipeline runs it (the train
stage: `accelerate launch` of worldpm/modeling/trainer/main.py); TRL runs in its own process (this file with --trl-worker), so
each side's peak memory is its own. Reported per side: pairs/s and (non-pad) tokens/s over the steps after the first
(warm-up excluded), peak memory (GPU: torch max allocated; CPU: peak RSS), the fraction of padded tokens actually fed,
and held-out accuracy on the test split. The padding fraction of one epoch with and without the length-grouped
sampler is computed from the sampler itself.

MFU (GPU) = 6 * N * tokens/s / peak bf16 FLOP/s, N = non-embedding parameters (the 6N rule counts matmuls; the
embedding lookup is no matmul and attention's own FLOPs are left out, so this slightly understates the work).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED_SE = ROOT.parent / "shared" / "data" / "stack-exchange-paired" / "data"
CACHE = ROOT / "bench" / "out" / "train"  # git-ignored
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
log = logging.getLogger("bench")


# ---- shared data --------------------------------------------------------------------------------------------------

def tokenized_artifact(cfg, store):
    """download adapter -> (fixture clean) -> shard -> tokenize, through worldpm's stages (cached in the store)."""
    import polars as pl

    from tasks import PIPELINE as pipeline
    from worldpm.data.sources import read_source_file

    pairs = pl.concat([read_source_file(p, "stack_exchange_paired").pairs.collect()
                       for p in sorted(SHARED_SE.rglob("*.parquet"))])
    clean = store.get("clean", "bench")
    if clean is None:
        tmp = store.new_tmp("clean", "bench")
        pairs.write_parquet(tmp / "pairs.parquet")
        clean = store.commit("clean", "bench", tmp, {"rows_out": pairs.height})
    shard = pipeline.execute("shard", cfg, {"clean": clean}, store, log=log).ref
    return pipeline.execute("tokenize", cfg, {"shard": shard}, store, log=log).ref


def sampler_padding(ref, batch_size: int, seed: int, window: int) -> dict:
    from worldpm.modeling.trainer.data import PairBatchSampler, load_pairs, padding_fraction

    d = load_pairs(Path(ref.path) / "train.parquet")
    lens = (d.chosen_len, d.rejected_len)
    grouped = list(PairBatchSampler(d.pair_len, batch_size, seed=seed, window=window))
    plain = list(PairBatchSampler(d.pair_len, batch_size, seed=seed, group_by_length=False))
    return {"grouped": round(padding_fraction(lens, grouped), 4), "random": round(padding_fraction(lens, plain), 4)}


def accuracy(model, ref) -> float:
    import numpy as np

    from worldpm.data.splits import read_split
    from worldpm.modeling import models

    test = read_split(ref, "test")
    pad = model.config.pad_token_id
    rc = models.score_token_ids(model, test["chosen_ids"].to_list(), pad, batch_size=32)
    rr = models.score_token_ids(model, test["rejected_ids"].to_list(), pad, batch_size=32)
    return float(np.mean(rc > rr))


def non_embedding_params(model) -> int:
    emb = model.get_input_embeddings().weight.numel()
    return sum(p.numel() for p in model.parameters()) - emb


# ---- ours ---------------------------------------------------------------------------------------------------------

def run_ours(cfg, store, ref, group: bool) -> dict:
    from tasks import PIPELINE as pipeline
    from worldpm.modeling import models

    cfg = cfg.model_copy(deep=True)
    cfg.train.group_by_length = group
    ref_logps = pipeline.execute("ref_logps", cfg, {"tokenize": ref}, store, log=log).ref  # bt: a marker
    res = pipeline.execute("train", cfg, {"tokenize": ref, "ref_logps": ref_logps}, store, log=log, force=True)
    out = Path(res.ref.path)
    summary = json.loads((out / "train_summary.json").read_text())
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    after = steps[1:] or steps  # log_every=1: step 1 (warm-up) left out
    secs = after[-1]["elapsed_s"] - steps[0]["elapsed_s"] if len(steps) > 1 else steps[0]["elapsed_s"]
    # metrics carry rates per window; with log_every=1 a window is one step: tokens = rate * step time
    tokens = pairs = 0.0
    prev = steps[0]["elapsed_s"]
    for m in after:
        dt = m["elapsed_s"] - prev
        tokens += m["tokens_per_s"] * dt
        pairs += m["pairs_per_s"] * dt
        prev = m["elapsed_s"]
    padding = sum(m["padding"] for m in steps) / len(steps)
    model = models.load_reward_model(out)
    return {"pairs_per_s": round(pairs / secs, 3), "tokens_per_s": round(tokens / secs, 1),
            "peak_memory_gb": summary["peak_memory_gb"], "padding_fed": round(padding, 4),
            "steps": summary["steps"], "final_loss": summary["final"]["loss"], "test_accuracy": accuracy(model, ref),
            "non_embedding_params": non_embedding_params(model)}


# ---- TRL (own process) --------------------------------------------------------------------------------------------

def trl_worker(spec_path: str) -> None:
    import resource

    import datasets
    import torch
    from transformers import AutoTokenizer, TrainerCallback
    from trl import RewardConfig, RewardTrainer
    from trl.trainer.reward_trainer import DataCollatorForPreference

    from worldpm.data.splits import read_split
    from worldpm.modeling import models

    spec = json.loads(Path(spec_path).read_text())
    tok = AutoTokenizer.from_pretrained(spec["tokenizer_dir"])
    df = read_split(spec["data_dir"], "train").select("chosen_ids", "rejected_ids")
    ds = datasets.Dataset.from_polars(df)
    torch.manual_seed(spec["seed"])
    model = models.build_reward_model(spec["model"], tok)

    counts = {"tokens": 0, "padded": 0}

    class CountingCollator(DataCollatorForPreference):
        def torch_call(self, examples):
            b = super().torch_call(examples)
            counts["tokens"] += int(b["attention_mask"].sum())
            counts["padded"] += int(b["attention_mask"].numel())
            return b

    times: list[float] = []

    class StepTimes(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.perf_counter())

    bf16 = spec["precision"] == "bf16"
    args = RewardConfig(
        output_dir=spec["out"], per_device_train_batch_size=spec["batch_size"], max_steps=spec["steps"],
        learning_rate=spec["lr"], lr_scheduler_type="cosine", warmup_steps=0, max_grad_norm=1.0,
        bf16=bf16, use_cpu=not torch.cuda.is_available(), logging_steps=1, save_strategy="no", report_to=[],
        max_length=spec["max_length"], disable_dropout=False, seed=spec["seed"], dataloader_num_workers=0,
        gradient_checkpointing=False, remove_unused_columns=False,
    )
    trainer = RewardTrainer(model=model, args=args, train_dataset=ds, processing_class=tok,
                            data_collator=CountingCollator(pad_token_id=tok.pad_token_id), callbacks=[StepTimes()])
    step_tokens: list[int] = []

    orig = trainer.training_step

    def training_step(*a, **k):  # tokens of each step, to leave the warm-up step out of the rate
        before = counts["tokens"]
        out = orig(*a, **k)
        step_tokens.append(counts["tokens"] - before)
        return out

    trainer.training_step = training_step
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    secs = times[-1] - times[0]
    n = len(times) - 1
    peak = (torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available()
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    trainer.save_model(spec["out"] + "/model")
    loss = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    Path(spec["result"]).write_text(json.dumps({
        "pairs_per_s": round(n * spec["batch_size"] / secs, 3), "tokens_per_s": round(sum(step_tokens[1:]) / secs, 1),
        "peak_memory_gb": round(peak, 3), "padding_fed": round(1 - counts["tokens"] / counts["padded"], 4),
        "steps": len(times), "final_loss": loss[-1] if loss else None, "model_dir": spec["out"] + "/model"}))


def run_trl(cfg, ref, precision: str, work: Path) -> dict:
    from worldpm.modeling import models

    work.mkdir(parents=True, exist_ok=True)
    spec = {"tokenizer_dir": str(Path(ref.path) / "tokenizer"), "data_dir": ref.path,
            "model": cfg.model.model_dump(mode="json"), "batch_size": cfg.train.batch_size,
            "steps": cfg.train.max_steps, "lr": cfg.train.lr, "max_length": cfg.tokenize.max_length,
            "precision": precision, "seed": cfg.train.seed, "out": str(work / "trl"), "result": str(work / "trl.json")}
    (work / "trl_spec.json").write_text(json.dumps(spec))
    subprocess.run([sys.executable, __file__, "--trl-worker", str(work / "trl_spec.json")], check=True)
    r = json.loads((work / "trl.json").read_text())
    model = models.load_reward_model(r.pop("model_dir"))
    r["test_accuracy"] = accuracy(model, ref)
    return r


# ---- main ---------------------------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", action="store_true", help="Qwen2 ~0.5B random init, bf16 (needs CUDA)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--max-length", type=int, default=None)
    ap.add_argument("--deepspeed", action="store_true", help="GPU: ours under DeepSpeed ZeRO-3 (default: plain)")
    ap.add_argument("--qwen-tiktoken", default=None, help="qwen.tiktoken or a dashscope wheel (default: installed)")
    ap.add_argument("--skip-ungrouped", action="store_true", help="do not rerun ours without length grouping")
    ap.add_argument("--out", default=None, help="results JSON (default bench/out/train/results-{cpu,gpu}.json)")
    ap.add_argument("--trl-worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.trl_worker:
        trl_worker(a.trl_worker)
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    import torch

    from worldpm.config import load_config
    from worldpm.store import ArtifactStore

    if a.gpu:
        if not torch.cuda.is_available():
            raise SystemExit("--gpu: no CUDA device")
        tokdir = CACHE / "qwen-tokenizer"
        if not (tokdir / "tokenizer.json").exists():
            sys.path.insert(0, str(ROOT / "bench"))
            from qwen_tokenizer import build

            build(tokdir, a.qwen_tiktoken)
        steps, bs, ml, precision = a.steps or 30, a.batch_size or 8, a.max_length or 1024, "bf16"
        sets = [f"model.tokenizer={tokdir}", f"train.deepspeed.enabled={str(a.deepspeed).lower()}"]
        cfg_file = ROOT / "configs" / "qwen2-0.5b-random.yaml"
    else:
        steps, bs, ml, precision = a.steps or 12, a.batch_size or 8, a.max_length or 256, "fp32"
        sets, cfg_file = ["model.name_or_path=minilm"], None
    sets += [f"tokenize.max_length={ml}", f"train.batch_size={bs}", f"train.max_steps={steps}",
             "train.log_every=1", "train.checkpoint_every=100000", f"train.precision={precision}",
             "train.warmup_ratio=0", "train.lr=2e-5", "train.eval_max_pairs=0", "shard.train=0.8", "shard.eval=0.1",
             "shard.test=0.1"]
    cfg = load_config(cfg_file, sets)
    cfg.artifacts_dir = str(CACHE / "store")
    store = ArtifactStore(Path(cfg.artifacts_dir))
    ref = tokenized_artifact(cfg, store)
    device = torch.cuda.get_device_name(0) if a.gpu else f"CPU ({len(os.sched_getaffinity(0))} cores)"
    res: dict = {"device": device, "model": cfg.model.name_or_path, "max_length": ml, "batch_size_pairs": bs,
                 "steps": steps, "precision": precision,
                 "epoch_padding": sampler_padding(ref, bs, cfg.train.seed, cfg.train.length_group_window)}
    res["ours"] = run_ours(cfg, store, ref, group=True)
    if not a.skip_ungrouped:
        res["ours_ungrouped"] = run_ours(cfg, store, ref, group=False)
    res["trl"] = run_trl(cfg, ref, precision, CACHE / "trl-work")
    res["speedup_pairs_per_s"] = round(res["ours"]["pairs_per_s"] / res["trl"]["pairs_per_s"], 3)
    if a.gpu:
        name = torch.cuda.get_device_name(0)
        peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
        n = res["ours"]["non_embedding_params"]
        for side in ("ours", "ours_ungrouped", "trl"):
            if side in res and peak:
                res[side]["mfu"] = round(6 * n * res[side]["tokens_per_s"] / peak, 4)
    out = Path(a.out) if a.out else CACHE / f"results-{'gpu' if a.gpu else 'cpu'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))
    print(table(res))


def table(res: dict) -> str:
    rows = ["| side | pairs/s | tokens/s | peak mem (GB) | padding fed | test acc | MFU |", "|---|---|---|---|---|---|---|"]
    for side in ("ours", "ours_ungrouped", "trl"):
        if side in res:
            r = res[side]
            rows.append(f"| {side} | {r['pairs_per_s']} | {r['tokens_per_s']} | {r['peak_memory_gb']} | "
                        f"{r['padding_fed']:.1%} | {r['test_accuracy']:.3f} | {r.get('mfu', '-')} |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
