"""Training throughput: worldpm's trainer (packed, padded, ZeRO-3) side by side with TRL's RewardTrainer.

Same model, data, max_length, pairs a step and precision, in one run that writes each result as it comes.

    python bench/bench_train.py --gpu      # GPU: random Qwen2 of Qwen2.5-0.5B's shape (configs/qwen2-0.5b-random.yaml),
                                           # bf16, max_length 1024, 8 and 32 pairs a step, 30 steps; MFU
    python bench/bench_train.py --tiny     # the same matrix on the CPU with a tiny random Qwen2 (checks the script)
    python bench/bench_train.py            # CPU: MiniLM (the embedded default), fp32, max_length 256, 8 pairs a step

Variants (``--variants``): ``ours`` (the train stage as the pipeline runs it, packed: on a GPU in one row through
``attn_implementation: worldpm_varlen``, torch's varlen flash attention), ``ours-sdpa`` (packed into rows as wide
as the longest sequence, sdpa with a block mask), ``ours-padded`` (train.packing=false: the padded batches of
before), ``ours-zero3`` (as ``ours``, under DeepSpeed ZeRO-3; on the CPU through DeepSpeed's CPU accelerator),
``ours-ckpt`` (as ``ours`` with train.gradient_checkpointing=true: the knob that fits 32 pairs x 1024 tokens in
80 GB), ``trl`` (trl.RewardTrainer, in its own process; needs `pip install -e '.[bench]'`). On the CPU ``ours`` keeps
the configured attention (varlen's CPU stand-in is a loop, for tests).
Every variant runs in its own process(es), so each peak memory is its own; a variant that fails (out of memory, TRL
missing) is recorded with its error and the others still run. After each variant its row is appended to
``<out>/results-<mode>.jsonl`` and the table ``<out>/results-<mode>.md`` is rewritten.

All sides train on the same token ids: the shared StackExchange sample (../shared/data/stack-exchange-paired, or
``--data``) through worldpm's own download adapter, shard and tokenize stages, cached in ``<out>/store`` (carry
that folder to a GPU machine: with ``--prepare`` this script only tokenizes). Reported per variant: pairs/s and
real (non-pad) tokens/s over the steps after the first log window (warm-up left out), padding fed (pad tokens /
tokens fed), peak memory (GPU: torch max allocated, the largest over processes; CPU: peak RSS), ours' time from
`accelerate launch` to the end of the first step, and on a GPU the MFU:

    MFU = 6 * N * tokens/s / peak bf16 FLOP/s, N = non-embedding parameters

(the 6N rule counts the matmuls of forward + backward; attention's own FLOPs are left out, so it understates).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED_SE = ROOT.parent / "shared" / "data" / "stack-exchange-paired" / "data"
OUT = ROOT / "bench" / "out" / "train"  # git-ignored
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}
VARIANTS = ("ours", "ours-sdpa", "ours-padded", "ours-zero3", "ours-ckpt", "trl")
TINY_QWEN = {"model_type": "qwen2", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "intermediate_size": 128, "max_position_embeddings": 512}

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
log = logging.getLogger("bench")


# ---- shared data --------------------------------------------------------------------------------------------------

def tokenized_artifact(cfg, store, data_dir: Path):
    """download adapter -> (fixture clean) -> shard -> tokenize, through worldpm's stages (cached in the store)."""
    from tasks import PIPELINE as pipeline

    clean = store.get("clean", "bench")
    if clean is None:
        import polars as pl

        from worldpm.data.sources import read_source_file

        files = sorted(data_dir.rglob("*.parquet"))
        if not files:
            raise SystemExit(f"no StackExchange parquet files under {data_dir} (--data); the tokenized store is "
                             f"not in {store.root} either")
        pairs = pl.concat([read_source_file(p, "stack_exchange_paired").pairs.collect() for p in files])
        tmp = store.new_tmp("clean", "bench")
        pairs.write_parquet(tmp / "pairs.parquet")
        clean = store.commit("clean", "bench", tmp, {"rows_out": pairs.height})
    shard = pipeline.execute("shard", cfg, {"clean": clean}, store, log=log).ref
    return pipeline.execute("tokenize", cfg, {"shard": shard}, store, log=log).ref


def accuracy(model_dir, ref, device: str) -> float:
    import numpy as np

    from worldpm.data.splits import read_split
    from worldpm.modeling import models

    model = models.load_reward_model(model_dir, device=device)
    test = read_split(ref, "test")
    pad = model.config.pad_token_id
    rc = models.score_token_ids(model, test["chosen_ids"].to_list(), pad, batch_size=16)
    rr = models.score_token_ids(model, test["rejected_ids"].to_list(), pad, batch_size=16)
    return round(float(np.mean(rc > rr)), 4)


def non_embedding_params(mcfg: dict, tokenizer_dir: Path) -> int:
    """Parameters outside the input embedding, counted on the meta device (nothing allocated)."""
    import torch
    from transformers import AutoTokenizer

    from worldpm.modeling import models

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    with torch.device("meta"):
        model = models.build_reward_model(mcfg, tok)
    emb = model.get_input_embeddings().weight.numel()
    return sum(p.numel() for p in model.parameters()) - emb


def shared_init(cfg, ref, out: Path, name: str, device: str):
    """A from_config model is drawn once (seeded, on the device) and saved: every variant then starts from these very
    weights (ZeRO-3's zero.Init draws a from_config model's weights differently, so its loss curve could not be set
    against plain's otherwise). Returns cfg loading that checkpoint."""
    import torch
    from transformers import AutoTokenizer

    from worldpm.modeling import models

    init = out / f"init-{name}"
    if not (init / "config.json").exists():
        tok = AutoTokenizer.from_pretrained(str(Path(ref.path) / "tokenizer"))
        torch.manual_seed(cfg.train.seed)
        model = models.build_reward_model(cfg.model.model_dump(mode="json"), tok, device=device)
        model.save_pretrained(str(init) + ".tmp")
        tok.save_pretrained(str(init) + ".tmp")
        Path(str(init) + ".tmp").rename(init)
    cfg = cfg.model_copy(deep=True)
    cfg.model.from_config = None
    cfg.model.name_or_path = str(init)
    cfg.model.tokenizer = None
    return cfg


def window_rates(lines: list[dict]) -> dict:
    """pairs/s and tokens/s over the log windows after the first (its steps hold the warm-up)."""
    after = lines[1:] or lines
    t0 = lines[0]["elapsed_s"] if len(lines) > 1 else 0.0
    secs = max(lines[-1]["elapsed_s"] - t0, 1e-9)
    return {"pairs_per_s": round(sum(m["pairs"] for m in after) / secs, 3),
            "tokens_per_s": round(sum(m["tokens"] for m in after) / secs, 1),
            "steps_timed": after[-1]["step"] - (lines[0]["step"] if len(lines) > 1 else 0)}


# ---- ours -----------------------------------------------------------------------------------------------------------

def run_ours(cfg, store, ref, variant: str, pairs: int, want_accuracy: bool, device: str) -> dict:
    from tasks import PIPELINE as pipeline

    cfg = cfg.model_copy(deep=True)
    cfg.train.batch_size = pairs
    cfg.train.packing = variant != "ours-padded"
    cfg.train.gradient_checkpointing = variant == "ours-ckpt"
    if device == "cuda" and variant in ("ours", "ours-zero3", "ours-ckpt") and varlen_kernel():
        cfg.model.attn_implementation = "worldpm_varlen"
    elif variant in ("ours-sdpa", "ours-padded"):
        cfg.model.attn_implementation = "sdpa"
    cfg.train.deepspeed.enabled = variant == "ours-zero3"
    if variant == "ours-zero3" and device == "cpu":
        cfg.train.deepspeed.offload_optimizer = cfg.train.deepspeed.offload_params = False
    ref_logps = pipeline.execute("ref_logps", cfg, {"tokenize": ref}, store, log=log).ref  # bt: a marker
    res = pipeline.execute("train", cfg, {"tokenize": ref, "ref_logps": ref_logps}, store, log=log, force=True)
    out = Path(res.ref.path)
    summary = json.loads((out / "train_summary.json").read_text())
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    fed = sum(m["fed_tokens"] for m in lines)
    r = {**window_rates(lines), "peak_memory_gb": summary["peak_memory_gb"],
         "attn_implementation": cfg.model.attn_implementation,
         "padding_fed": round(1 - sum(m["tokens"] for m in lines) / fed, 4) if fed else 0.0,
         "packed": summary["packed"], "steps": summary["steps"], "final_loss": summary["final"]["loss"],
         "launch_to_first_step_s": summary["startup"]["launch_to_first_step_s"], "startup": summary["startup"],
         "losses": [round(m["loss"], 5) for m in lines], "parameters": summary.get("parameters")}
    if variant == "ours-zero3":
        r["plain_transformers_load"] = plain_load(out / "model", summary.get("parameters"))
    if want_accuracy:
        r["test_accuracy"] = accuracy(out, ref, device)
    return r


def plain_load(model_dir: Path, parameters: int | None) -> str:
    """'ok' when transformers alone (no worldpm, no DeepSpeed) loads the saved folder whole: no missing or unexpected
    weights, the trained parameter count, a finite score; else what is wrong."""
    import torch
    from transformers import AutoModelForSequenceClassification

    model, info = AutoModelForSequenceClassification.from_pretrained(str(model_dir), output_loading_info=True)
    bad = {k: v for k, v in info.items() if v}
    n = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        score = float(model(input_ids=torch.tensor([[1, 2, 3, 4]])).logits[0, 0])
    if bad or (parameters and n != parameters) or not torch.isfinite(torch.tensor(score)):
        return f"not ok: loading info {bad}, {n} parameters (trained {parameters}), score {score}"
    return "ok"


def varlen_kernel() -> bool:
    from worldpm.modeling import varlen

    return varlen._kernel() is not None


# ---- TRL (own process) --------------------------------------------------------------------------------------------

def trl_worker(spec_path: str) -> None:
    import resource

    import datasets
    import torch
    from transformers import AutoTokenizer, TrainerCallback
    from trl import RewardConfig, RewardTrainer

    from worldpm.data.splits import read_split
    from worldpm.modeling import models

    spec = json.loads(Path(spec_path).read_text())
    cuda = torch.cuda.is_available()
    tok = AutoTokenizer.from_pretrained(spec["tokenizer_dir"])
    df = read_split(spec["data_dir"], "train").select("chosen_ids", "rejected_ids")
    ds = datasets.Dataset.from_polars(df)
    torch.manual_seed(spec["seed"])
    model = models.build_reward_model(spec["model"], tok, device="cuda" if cuda else None)

    steps = spec["steps"]
    marks: dict[int, float] = {}
    fed = {"tokens": [], "padded": 0, "real": 0}

    class StepTimes(TrainerCallback):  # a sync at the first and the last step only, as ours reads its log lines
        def on_step_end(self, args, state, control, **kw):
            if state.global_step in (spec["warmup_steps"], steps):
                if cuda:
                    torch.cuda.synchronize()
                marks[state.global_step] = time.perf_counter()

    bf16 = spec["precision"] == "bf16"
    args = RewardConfig(
        output_dir=spec["out"], per_device_train_batch_size=spec["batch_size"], max_steps=steps,
        learning_rate=spec["lr"], lr_scheduler_type="cosine", warmup_steps=0, max_grad_norm=1.0,
        bf16=bf16, use_cpu=not cuda, logging_steps=spec["log_every"], save_strategy="no", report_to=[],
        max_length=spec["max_length"], disable_dropout=False, seed=spec["seed"], dataloader_num_workers=0,
        gradient_checkpointing=False, remove_unused_columns=False,
    )
    trainer = RewardTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, callbacks=[StepTimes()])
    orig = trainer.training_step

    def training_step(model, inputs, *a, **k):  # the tokens each step is fed: counted from its own inputs
        mask = inputs["attention_mask"]
        fed["tokens"].append(int(mask.sum()))
        fed["padded"] += mask.numel()
        return orig(model, inputs, *a, **k)

    trainer.training_step = training_step
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    w = spec["warmup_steps"]
    secs = marks[steps] - marks[w]
    peak = (torch.cuda.max_memory_allocated() / 2**30 if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    trainer.save_model(spec["out"] + "/model")
    loss = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    Path(spec["result"]).write_text(json.dumps({
        "pairs_per_s": round((steps - w) * spec["batch_size"] / secs, 3),
        "tokens_per_s": round(sum(fed["tokens"][w:steps]) / secs, 1), "steps_timed": steps - w,
        "peak_memory_gb": round(peak, 3), "padding_fed": round(1 - sum(fed["tokens"]) / fed["padded"], 4),
        "packed": False, "steps": steps, "final_loss": loss[-1] if loss else None, "model_dir": spec["out"] + "/model"}))


def run_trl(cfg, ref, pairs: int, precision: str, work: Path, want_accuracy: bool, device: str) -> dict:
    import importlib.util

    if importlib.util.find_spec("trl") is None:
        raise RuntimeError("trl is not installed (pip install -e '.[bench]')")
    work.mkdir(parents=True, exist_ok=True)
    spec = {"tokenizer_dir": str(Path(ref.path) / "tokenizer"), "data_dir": ref.path,
            "model": cfg.model.model_dump(mode="json"), "batch_size": pairs, "steps": cfg.train.max_steps,
            "warmup_steps": cfg.train.log_every, "log_every": cfg.train.log_every, "lr": cfg.train.lr,
            "max_length": cfg.tokenize.max_length, "precision": precision, "seed": cfg.train.seed,
            "out": str(work / "trl"), "result": str(work / "trl.json")}
    (work / "trl_spec.json").write_text(json.dumps(spec))
    (work / "trl.json").unlink(missing_ok=True)
    p = subprocess.run([sys.executable, __file__, "--trl-worker", str(work / "trl_spec.json")], capture_output=True,
                       text=True)
    if p.returncode != 0:
        lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
        err = next((ln for ln in reversed(lines) if "Error" in ln.split(":")[0]), lines[-1] if lines else "?")
        raise RuntimeError(f"TRL worker exited with {p.returncode}: {err}")
    r = json.loads((work / "trl.json").read_text())
    model_dir = r.pop("model_dir")
    if want_accuracy:
        r["test_accuracy"] = accuracy(model_dir, ref, device)
    return r


# ---- the run ------------------------------------------------------------------------------------------------------

def settings(a) -> tuple[str, object, list[str], dict]:
    """(mode, config file, --set overrides, run facts) for --gpu / --tiny / the CPU default."""
    if a.gpu:
        tokdir = a.out / "qwen-tokenizer"
        if not (tokdir / "tokenizer.json").exists():
            sys.path.insert(0, str(ROOT / "bench"))
            from qwen_tokenizer import build

            build(tokdir, a.qwen_tiktoken)
        facts = {"steps": a.steps or 30, "max_length": a.max_length or 1024, "precision": "bf16", "log_every": 5}
        if tokdir.resolve().is_relative_to(Path.cwd()):  # relative: the tokenize key is the same on both machines
            tokdir = tokdir.resolve().relative_to(Path.cwd())
        return "gpu", ROOT / "configs" / "qwen2-0.5b-random.yaml", [f"model.tokenizer={tokdir}"], facts
    if a.tiny:
        facts = {"steps": a.steps or 6, "max_length": a.max_length or 128, "precision": "fp32", "log_every": 2}
        return "tiny", None, [f"model.from_config={json.dumps(TINY_QWEN)}"], facts
    facts = {"steps": a.steps or 12, "max_length": a.max_length or 256, "precision": "fp32", "log_every": 2}
    return "cpu", None, ["model.name_or_path=minilm"], facts


def table(rows: list[dict]) -> str:
    head = ("| pairs/step | variant | pairs/s | tokens/s | MFU | padding fed | peak mem (GB) | launch->1st step (s) "
            "| test acc | x TRL pairs/s |")
    out = [head, "|---" * (head.count("|") - 1) + "|"]
    trl = {r["pairs"]: r for r in rows if r["variant"] == "trl" and "error" not in r}
    for r in rows:
        if "error" in r:
            out.append(f"| {r['pairs']} | {r['variant']} | failed: {r['error']} | | | | | | | |")
            continue
        t = trl.get(r["pairs"])
        ratio = f"{r['pairs_per_s'] / t['pairs_per_s']:.2f}" if t and r["variant"] != "trl" else "-"
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-"
        out.append(f"| {r['pairs']} | {r['variant']} | {r['pairs_per_s']} | {r['tokens_per_s']} | {mfu} | "
                   f"{r['padding_fed']:.1%} | {r['peak_memory_gb']} | {r.get('launch_to_first_step_s', '-')} | "
                   f"{r.get('test_accuracy', '-')} | {ratio} |")
    return "\n".join(out)


def zero3_against_plain(rows: list[dict]) -> str:
    """Per pairs a step: ZeRO-3's loss windows against plain's (same seed, same global batch) and its step time."""
    out = []
    for pairs in sorted({r["pairs"] for r in rows}):
        by = {r["variant"]: r for r in rows if r["pairs"] == pairs and "error" not in r}
        a, b = by.get("ours"), by.get("ours-zero3")
        if not (a and b):
            continue
        diff = max(abs(x - y) for x, y in zip(a["losses"], b["losses"])) if len(a["losses"]) == len(b["losses"]) \
            else float("nan")
        out.append(f"- {pairs} pairs a step: ZeRO-3 loss windows {b['losses']} against plain {a['losses']} "
                   f"(largest difference {diff:.4f}); step time {a['pairs_per_s'] / b['pairs_per_s']:.2f}x plain's; "
                   f"saved model with plain transformers: {b.get('plain_transformers_load', '-')}")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--gpu", action="store_true", help="Qwen2 ~0.5B random init, bf16 (needs CUDA)")
    mode.add_argument("--tiny", action="store_true", help="a tiny random Qwen2 on the CPU: the GPU matrix, cheaply")
    ap.add_argument("--pairs", default=None, help="pairs a step, comma-separated (default: 8,32 GPU; 8 CPU)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--max-length", type=int, default=None)
    ap.add_argument("--data", type=Path, default=SHARED_SE, help="the stack-exchange-paired parquet folder")
    ap.add_argument("--out", type=Path, default=OUT, help="store, results and work folders (default bench/out/train)")
    ap.add_argument("--qwen-tiktoken", default=None, help="qwen.tiktoken or a dashscope wheel (default: installed)")
    ap.add_argument("--prepare", action="store_true", help="tokenize only (then carry --out to the GPU machine)")
    ap.add_argument("--no-accuracy", action="store_true", help="skip scoring the test split after each run")
    ap.add_argument("--trl-worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.trl_worker:
        trl_worker(a.trl_worker)
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    import torch

    from worldpm.config import load_config
    from worldpm.store import ArtifactStore

    cuda = torch.cuda.is_available()
    if a.gpu and not cuda and not a.prepare:
        raise SystemExit("--gpu: no CUDA device (use --prepare to tokenize here, --tiny to check the script)")
    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise SystemExit(f"--variants: unknown {', '.join(bad)}; known: {', '.join(VARIANTS)}")
    name, cfg_file, sets, facts = settings(a)
    pairs_list = [int(x) for x in (a.pairs or ("8,32" if a.gpu else "8")).split(",")]
    sets += [f"tokenize.max_length={facts['max_length']}", f"train.max_steps={facts['steps']}",
             f"train.log_every={facts['log_every']}", "train.checkpoint_every=100000",
             f"train.precision={facts['precision']}", "train.warmup_ratio=0", "train.lr=2e-5",
             "train.eval_max_pairs=0", "train.grad_accum=1", "shard.train=0.8", "shard.eval=0.1", "shard.test=0.1"]
    cfg = load_config(cfg_file, sets)
    cfg.artifacts_dir = str(a.out / "store")
    store = ArtifactStore(Path(cfg.artifacts_dir))
    ref = tokenized_artifact(cfg, store, a.data)
    if a.prepare:
        print(f"tokenized: {ref.path}; carry {a.out} to the GPU machine")
        return
    device = "cuda" if cuda else "cpu"
    facts.update(mode=name, device=torch.cuda.get_device_name(0) if cuda else f"CPU ({len(os.sched_getaffinity(0))} cores)",
                 model=cfg.model.name_or_path if not cfg.model.from_config else json.dumps(cfg.model.from_config))
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in facts["device"]), None) if cuda else None
    n_params = non_embedding_params(cfg.model.model_dump(mode="json"), Path(ref.path) / "tokenizer")
    if cfg.model.from_config:
        cfg = shared_init(cfg, ref, a.out, name, device)
    results = a.out / f"results-{name}.jsonl"
    a.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    for pairs in pairs_list:
        for variant in variants:
            log.info("bench: %s, %d pairs a step", variant, pairs)
            row = {"started": started, **facts, "pairs": pairs, "variant": variant, "non_embedding_params": n_params}
            try:
                if variant == "trl":
                    r = run_trl(cfg, ref, pairs, facts["precision"], a.out / "trl-work", not a.no_accuracy, device)
                else:
                    r = run_ours(cfg, store, ref, variant, pairs, not a.no_accuracy, device)
                if peak:
                    r["mfu"] = round(6 * n_params * r["tokens_per_s"] / peak, 4)
                row.update(r)
            except Exception as e:  # noqa: BLE001 - recorded; the other variants still run
                row["error"] = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
                log.error("bench: %s failed: %s", variant, row["error"])
                log.debug("%s", traceback.format_exc())
            rows.append(row)
            with results.open("a") as f:
                f.write(json.dumps(row) + "\n")
            (a.out / f"results-{name}.md").write_text(
                f"{facts['device']}, {facts['precision']}, max_length {facts['max_length']}, {facts['steps']} steps, "
                f"{n_params:,} non-embedding parameters ({started})\n\n" + table(rows) + "\n\n"
                + zero3_against_plain(rows) + "\n")
            print(table(rows), flush=True)
    print(f"results: {results} and {a.out / f'results-{name}.md'}")


if __name__ == "__main__":
    main()
