"""The training program that `accelerate launch` runs: setup, train, evaluate, save.

    python -m accelerate.commands.launch [--cpu | --config_file accelerate.yaml] \\
        -m worldpm.modeling.trainer.main --args-json ARGS.json

ARGS.json is written by the train stage (tasks/train.py): see setup.TrainerArgs.

What it does, one module a part:
* guard.py: first, it dies with its launcher (parent-death signal + watchdog) and locks its work folder, so no
  trainer outlives its run and no two share a checkpoint folder;
* setup.py: the objective's model (bt: AutoModelForSequenceClassification, num_labels=1) built on its device in
  its training dtype, optionally LoRA/QLoRA and gradient checkpointing, AdamW over the trainable parameters (fused
  on CUDA), warmup + cosine/linear/constant schedule; the layout (packed where the model can) and the step plan
  (data.StepPlan: P processes x grad_accum micro-batches a step, each pair once an epoch);
* save.py: resumes from the newest complete checkpoint in <work>/checkpoints (accelerator.load_state), skipping the
  batches already seen (the sampler is a pure function of seed and epoch, so nothing is re-read);
* step.py: each step, grad_accum micro-batches (B pairs, or a token budget), each ONE forward pass over the 2B
  sequences (packed end to end, or padded), collated ahead on a thread; fp32 loss weighted by pairs; a loss that is
  nan/inf stops the run (checked at log lines, no host sync per step) naming the step and the pair ids; gradient
  clipping; a progress line every log_every steps and a line in metrics.jsonl; checkpoints every
  checkpoint_every steps (accelerator.save_state, written under a temporary name and renamed);
* evaluate.py: the eval split, sharded over the processes;
* save.py: the final model in HF format (safetensors + config + tokenizer) into <out>/model; metrics.jsonl and
  train_summary.json into <out>.

Test hooks (environment, setup.FaultInjection): WORLDPM_TRAIN_CRASH_AFTER_STEP=K exits hard (code 17) right after
step K, as a killed run would; WORLDPM_TRAIN_NAN_AT_STEP=K makes step K's loss nan (to check that it stops the run);
WORLDPM_TRAIN_OOM_AT_STEP=K raises out-of-memory in step K; WORLDPM_TRAIN_TRACE_DIR=D logs the pairs each process ran.

A run that fails writes its root cause to <work>/failure.json (the stage's one-line error): a TrainingStop's
message (non-finite loss, out of memory, no training pairs), or the exception's type and first line.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from worldpm.modeling import length as length_control
from worldpm.modeling.objectives import build_objective
from worldpm.modeling.trainer import guard, save, setup
from worldpm.modeling.trainer.evaluate import evaluate_split
from worldpm.modeling.trainer.step import TrainingStop, hms, train_loop

FAILURE = "failure.json"


T_IMPORTED = time.time()  # this module's imports (torch, numpy, polars ...) are done


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="worldpm trainer (run through `accelerate launch`)")
    ap.add_argument("--args-json", required=True)
    A = setup.TrainerArgs.read(ap.parse_args(argv).args_json)
    guard.guard_trainer(A.work)  # dies with its launcher; the only trainer in its work folder (before anything that
    # could write failure.json: a second trainer must not leave its refusal in the first one's folder)
    try:
        return run(A)
    except TrainingStop as e:  # a reason the user can act on: one line, no traceback
        print(f"ERROR: {e}", file=sys.stderr, flush=True)
        record_failure(A.work, str(e))
        return 3
    except SystemExit as e:
        if isinstance(e.code, str):
            record_failure(A.work, e.code)
        raise
    except BaseException as e:
        record_failure(A.work, f"{type(e).__name__}: {first_line(e)}")
        raise


def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0]


def record_failure(work: Path, message: str) -> None:
    """<work>/failure.json: the root cause, for the stage's one-line error. The first process to fail writes it
    (the others usually fail because of it)."""
    rank = os.environ.get("RANK", "0")
    try:
        fd = os.open(work / FAILURE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except OSError:
        return
    with os.fdopen(fd, "w") as f:
        json.dump({"error": message, "rank": int(rank) if rank.isdigit() else rank}, f)


def run(A) -> int:
    t = A.train
    marks = {"launch": A.launched_at or T_IMPORTED, "imports": T_IMPORTED}

    from accelerate.utils import set_seed
    from transformers import AutoTokenizer

    accelerator = setup.accelerator_for(A)
    marks["accelerator"] = time.time()
    main_proc = accelerator.is_main_process

    def say(msg: str) -> None:
        if main_proc:
            print(msg, flush=True)

    set_seed(t.seed)
    tokenizer = AutoTokenizer.from_pretrained(str(A.tokenizer_dir))
    objective = build_objective(t)
    load_split = setup.split_loader(A, objective.name)
    train = load_split("train")
    if len(train) == 0:
        raise TrainingStop(f"{A.data_dir / 'train.parquet'}: no training pairs (the train split is empty: see the "
                           "shard stage's splits and the clean stage's report)")
    length_info = None
    if objective.name == "bt" and (t.length_balance != "none" or t.length_debias != "none"):
        train, length_info = length_control.apply(train, t.length_balance, t.length_debias, t.length_debias_coef,
                                                  t.seed)
        say(f"length control: {json.dumps(length_info)}")

    marks["data"] = time.time()
    model = setup.setup_model(objective, A.model, tokenizer, accelerator, t.gradient_checkpointing, A.precision)
    marks["model"] = time.time()
    n_params, n_trainable = setup.parameter_counts(model)
    layout = setup.layout(model, t, accelerator, objective.name)
    try:
        plan = setup.plan(train, t, accelerator, layout.packed)
    except ValueError as e:
        raise TrainingStop(str(e)) from None
    optimizer, scheduler = setup.optimizer_and_schedule(model, t, plan.total_steps, accelerator)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    ckpt_dir, metrics_path = A.work / "checkpoints", A.work / "metrics.jsonl"
    start_step, ckpt = save.resume(accelerator, ckpt_dir, plan.micro_per_step)
    marks["prepare"] = time.time()
    if ckpt is not None:
        say(f"resumed from checkpoint {ckpt.name}: step {start_step}/{plan.total_steps}")
    if main_proc:
        keep_metrics_until(metrics_path, start_step)
    micro = (f"micro-batches of <= {t.max_tokens_per_batch} tokens" if t.max_tokens_per_batch
             else f"micro-batches of {t.batch_size} pairs")
    say(f"training: {len(train)} pairs, {plan.total_steps} steps of {plan.micro_per_epoch} {micro} an epoch, "
        f"x {t.grad_accum} accumulation x {accelerator.num_processes} processes a step, "
        f"{'packed' if layout.packed else 'padded'}, {n_trainable:,}/{n_params:,} parameters trainable, "
        f"precision {A.precision}, device {accelerator.device}, ready {marks['prepare'] - marks['launch']:.1f}s after "
        f"launch")

    t_start = time.perf_counter()
    slog, epoch = train_loop(accelerator, model, optimizer, scheduler, objective, train, tokenizer.pad_token_id,
                             t, plan, layout, start_step, ckpt_dir, metrics_path, setup.FaultInjection.from_env(),
                             say)
    train_seconds = time.perf_counter() - t_start
    marks["first_step"] = slog.first_step_at or time.time()
    startup = startup_seconds(marks)
    say("startup: " + ", ".join(f"{k} {v:.1f}s" for k, v in startup.items()))

    eval_data = load_split("eval") if (A.data_dir / "eval.parquet").exists() else None
    eval_metrics = evaluate_split(model, objective, eval_data, accelerator, tokenizer.pad_token_id, t.batch_size,
                                  t.eval_max_pairs, layout, t.max_tokens_per_batch)
    if eval_metrics:
        say(f"eval: {eval_metrics['pairs']} pairs, loss {eval_metrics['loss']:.4f}, accuracy "
            f"{eval_metrics['accuracy']:.3f}")

    elapsed = time.perf_counter() - t_start
    save.save_final(accelerator, model, tokenizer, A.out / "model", A.model, objective.name)
    peak = save.peak_memory_gb(accelerator)
    if main_proc:
        shutil.copyfile(metrics_path, A.out / "metrics.jsonl")
        summary = {
            "objective": objective.name, "steps": plan.total_steps, "resumed_from_step": start_step,
            "steps_this_run": plan.total_steps - start_step, "epochs": round(epoch, 4), "train_pairs": len(train),
            "batch_size": t.batch_size, "max_tokens_per_batch": t.max_tokens_per_batch, "grad_accum": t.grad_accum,
            "num_processes": accelerator.num_processes, "packed": layout.packed,
            "precision": A.precision, "parameters": n_params, "trainable_parameters": n_trainable,
            "startup": startup,
            "seconds": round(elapsed, 2), "train_seconds": round(train_seconds, 2),
            "tokens_per_s": round(slog.run_tokens / max(train_seconds, 1e-9), 1),
            "pairs_per_s": round(slog.run_pairs / max(train_seconds, 1e-9), 2),
            "peak_memory_gb": round(peak, 3),
            "final": slog.last, "eval": eval_metrics, "length_control": length_info,
        }
        (A.out / "train_summary.json").write_text(json.dumps(summary, indent=2))
        say(f"saved {A.out / 'model'} ({plan.total_steps - start_step} steps in {hms(elapsed)})")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0


def startup_seconds(marks: dict) -> dict:
    """Where the time from `accelerate launch` to the end of the first step went (seconds per phase): python +
    the launcher + imports, the Accelerator (process group, DeepSpeed), tokenizer + data + plan, the model,
    prepare (wrapping, ZeRO partitioning, optimizer) + resume, the first step; and the total."""
    order = ["launch", "imports", "accelerator", "data", "model", "prepare", "first_step"]
    out = {f"{b}_s": round(marks[b] - marks[a], 2) for a, b in zip(order, order[1:])}
    out["launch_to_first_step_s"] = round(marks["first_step"] - marks["launch"], 2)
    return out


def keep_metrics_until(metrics_path: Path, step: int) -> None:
    """metrics.jsonl without the lines of steps after `step` (they are redone after a resume)."""
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    kept = []
    if step and metrics_path.exists():
        kept = [ln for ln in metrics_path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
    metrics_path.write_text("".join(ln + "\n" for ln in kept))


if __name__ == "__main__":
    sys.exit(main())
