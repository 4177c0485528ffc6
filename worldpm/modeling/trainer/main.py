"""The training program that `accelerate launch` runs: setup, train, evaluate, save.

    python -m accelerate.commands.launch [--cpu | --config_file accelerate.yaml] \\
        -m worldpm.modeling.trainer.main --args-json ARGS.json

ARGS.json is written by the train stage (tasks/train.py): see setup.TrainerArgs.

What it does, one module a part:
* setup.py: the objective's model (bt: AutoModelForSequenceClassification, num_labels=1), optionally LoRA/QLoRA and
  gradient checkpointing, AdamW over the trainable parameters, warmup + cosine/linear/constant schedule;
* save.py: resumes from the newest complete checkpoint in <work>/checkpoints (accelerator.load_state), skipping the
  batches already seen (the sampler is a pure function of seed and epoch, so nothing is re-read);
* step.py: each step, grad_accum micro-batches of B pairs, each ONE forward pass over 2B sequences, fp32 loss, a
  loss that is nan/inf stops the run naming the step and the pair ids; gradient clipping; a progress line every
  log_every steps and a line in metrics.jsonl; checkpoints every checkpoint_every steps (accelerator.save_state,
  written under a temporary name and renamed);
* evaluate.py: the eval split, sharded over the processes;
* save.py: the final model in HF format (safetensors + config + tokenizer) into <out>/model; metrics.jsonl and
  train_summary.json into <out>.

Test hooks (environment, setup.FaultInjection): WORLDPM_TRAIN_CRASH_AFTER_STEP=K exits hard (code 17) right after
step K, as a killed run would; WORLDPM_TRAIN_NAN_AT_STEP=K makes step K's loss nan (to check that it stops the run).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from worldpm.modeling import length as length_control
from worldpm.modeling.objectives import build_objective
from worldpm.modeling.trainer import save, setup
from worldpm.modeling.trainer.evaluate import evaluate_split
from worldpm.modeling.trainer.step import NonFiniteLoss, hms, train_loop


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="worldpm trainer (run through `accelerate launch`)")
    ap.add_argument("--args-json", required=True)
    A = setup.TrainerArgs.read(ap.parse_args(argv).args_json)
    t = A.train

    from accelerate.utils import set_seed
    from transformers import AutoTokenizer

    accelerator = setup.accelerator_for(A)
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
        raise SystemExit(f"{A.data_dir / 'train.parquet'}: no training pairs")
    length_info = None
    if objective.name == "bt" and (t.length_balance != "none" or t.length_debias != "none"):
        train, length_info = length_control.apply(train, t.length_balance, t.length_debias, t.length_debias_coef,
                                                  t.seed)
        say(f"length control: {json.dumps(length_info)}")
    sched = setup.schedule(train, t, accelerator)

    model = setup.setup_model(objective, A.model, tokenizer, accelerator, t.gradient_checkpointing)
    n_params, n_trainable = setup.parameter_counts(model)
    optimizer, scheduler = setup.optimizer_and_schedule(model, t, sched.total_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    ckpt_dir, metrics_path = A.work / "checkpoints", A.work / "metrics.jsonl"
    start_step, ckpt = save.resume(accelerator, ckpt_dir)
    if ckpt is not None:
        say(f"resumed from checkpoint {ckpt.name}: step {start_step}/{sched.total_steps}")
    if main_proc:
        keep_metrics_until(metrics_path, start_step)
    say(f"training: {len(train)} pairs, {sched.total_steps} steps of {t.batch_size} pairs x {t.grad_accum} "
        f"accumulation x {accelerator.num_processes} processes, {n_trainable:,}/{n_params:,} parameters trainable, "
        f"precision {A.precision}, device {accelerator.device}")

    t_start = time.perf_counter()
    try:
        slog, epoch = train_loop(accelerator, model, optimizer, scheduler, objective, train, tokenizer.pad_token_id,
                                 t, sched, start_step, ckpt_dir, metrics_path, setup.FaultInjection.from_env(), say)
    except NonFiniteLoss as e:
        print(f"ERROR: {e}", file=sys.stderr, flush=True)
        if main_proc:
            (A.work / "failure.json").write_text(json.dumps({"error": str(e)}))
        return 3
    train_seconds = time.perf_counter() - t_start

    eval_data = load_split("eval") if (A.data_dir / "eval.parquet").exists() else None
    eval_metrics = evaluate_split(model, objective, eval_data, accelerator, tokenizer.pad_token_id, t.batch_size,
                                  t.eval_max_pairs)
    if eval_metrics:
        say(f"eval: {eval_metrics['pairs']} pairs, loss {eval_metrics['loss']:.4f}, accuracy "
            f"{eval_metrics['accuracy']:.3f}")

    elapsed = time.perf_counter() - t_start
    save.save_final(accelerator, model, tokenizer, A.out / "model", A.model, objective.name)
    if main_proc:
        shutil.copyfile(metrics_path, A.out / "metrics.jsonl")
        summary = {
            "objective": objective.name, "steps": sched.total_steps, "resumed_from_step": start_step,
            "steps_this_run": sched.total_steps - start_step, "epochs": round(epoch, 4), "train_pairs": len(train),
            "batch_size": t.batch_size, "grad_accum": t.grad_accum, "num_processes": accelerator.num_processes,
            "precision": A.precision, "parameters": n_params, "trainable_parameters": n_trainable,
            "seconds": round(elapsed, 2), "train_seconds": round(train_seconds, 2),
            "tokens_per_s": round(slog.run_tokens / max(train_seconds, 1e-9), 1),
            "pairs_per_s": round(slog.run_pairs / max(train_seconds, 1e-9), 2),
            "peak_memory_gb": round(save.peak_memory_gb(accelerator), 3),
            "final": slog.last, "eval": eval_metrics, "length_control": length_info,
        }
        (A.out / "train_summary.json").write_text(json.dumps(summary, indent=2))
        say(f"saved {A.out / 'model'} ({sched.total_steps - start_step} steps in {hms(elapsed)})")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0


def keep_metrics_until(metrics_path: Path, step: int) -> None:
    """metrics.jsonl without the lines of steps after `step` (they are redone after a resume)."""
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    kept = []
    if step and metrics_path.exists():
        kept = [ln for ln in metrics_path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
    metrics_path.write_text("".join(ln + "\n" for ln in kept))


if __name__ == "__main__":
    sys.exit(main())
