"""The training recipe, read top to bottom: setup, train, evaluate, save.

    python -m accelerate.commands.launch --config_file accelerate.yaml \\
        -m worldpm.modeling.trainer.recipe --args-json ARGS.json

(launch.py starts it so and writes ARGS.json, an args.TrainerArgs; tests call ``train(args, callbacks)`` in
process.)

* ``main``: first, the process dies with its launcher and holds its work folder (guard.py), so no trainer
  outlives its run and no two share a checkpoint folder; a failure's root cause goes to <work>/failure.json for
  the stage's one-line error.
* ``Recipe.setup``: the accelerator; the tokenized train split; length control; the objective's model (bt:
  AutoModelForSequenceClassification, num_labels=1) built on its device in its training dtype, optionally LoRA/QLoRA
  and gradient checkpointing; the layout (packed where the model can); the step plan (data.StepPlan: P processes x
  grad_accum micro-batches a step, each pair once an epoch); AdamW (fused on CUDA) with warmup + cosine/linear/
  constant decay; a resume from the newest complete checkpoint in <work>/checkpoints (save.resume); pairs and tokens
  seen after each step (StepPlan.seen); the trackers of train.report_to (accelerate's, modeling/tracking.py); and
  the eval sets of evaluation during training (train.eval_at, evalcurve.py), tokenized once.
* ``Recipe.train``: each step, this process's grad_accum micro-batches (B pairs, or a token budget), each ONE
  forward pass over the 2B sequences (packed end to end, or padded), collated ahead on a thread; the fp32 loss
  weighted by pairs; gradient clipping; a log line (and a line of metrics.jsonl) every log_every steps, where a
  non-finite loss stops the run naming the step and the pair ids (no host sync per step, step.py); a checkpoint
  every checkpoint_every steps; at each train.eval_at step, the eval split and every eval set scored by the training
  processes (evalcurve.py: <work>/eval_curve.jsonl, to the trackers too).
* ``Recipe.evaluate``: the eval split, sharded over the processes, batched by the same token budget.
* ``Recipe.save``: the model in HF format (safetensors + config + tokenizer + worldpm.json with the text path) into
  <out>/model; metrics.jsonl, eval_curve.jsonl and train_summary.json into <out>.

Callbacks (``Callback``; train.callbacks names them by import path, tests hand them in) observe each of these
points: a trace of the pairs each process ran, faults (a crash, a nan, an out-of-memory), trackers.
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import torch

from worldpm.config import ModelConfig, TrainConfig
from worldpm.modeling import length as length_control
from worldpm.modeling import models, packing
from worldpm.modeling.objectives import build_objective
from worldpm.modeling.trainer import guard, save
from worldpm.data.tokstore import TokenStoreError, store_path
from worldpm.modeling.trainer.data import (Layout, PairBatchSampler, PairData, PairDataError, StepPlan,
                                           check_token_budget, read_split_pairs, shard_for_scoring)
from worldpm.modeling.trainer.args import FAILURE, TrainerArgs
from worldpm.modeling.trainer.step import (FiniteGuard, OutOfMemory, Prefetcher, StepLog, TrainingStop, hms,
                                           oom_message, to_device)

T_IMPORTED = time.time()  # this module's imports (torch, numpy, polars ...) are done


class Callback:
    """A hook at each point of the recipe; every method is a no-op here. A callback observes (a trace, a tracker)
    or injects a fault (tests): it may raise to stop the run, and ``on_loss`` returns the loss the step goes on
    with. It is in no cache key, so it must not change what a successful run trains."""

    def on_train_start(self, recipe: "Recipe") -> None: ...

    def on_micro_batch(self, recipe: "Recipe", step: int, micro: int, pair_ids: list[str]) -> None: ...

    def on_loss(self, recipe: "Recipe", step: int, loss: torch.Tensor) -> torch.Tensor:
        return loss

    def on_step_end(self, recipe: "Recipe", step: int) -> None: ...

    def on_log(self, recipe: "Recipe", record: dict) -> None: ...

    def on_train_end(self, recipe: "Recipe", summary: dict) -> None: ...


class Callbacks(Callback):
    """Several callbacks called in order."""

    def __init__(self, items: list[Callback]):
        self.items = list(items)

    def on_train_start(self, recipe):
        for c in self.items:
            c.on_train_start(recipe)

    def on_micro_batch(self, recipe, step, micro, pair_ids):
        for c in self.items:
            c.on_micro_batch(recipe, step, micro, pair_ids)

    def on_loss(self, recipe, step, loss):
        for c in self.items:
            loss = c.on_loss(recipe, step, loss)
        return loss

    def on_step_end(self, recipe, step):
        for c in self.items:
            c.on_step_end(recipe, step)

    def on_log(self, recipe, record):
        for c in self.items:
            c.on_log(recipe, record)

    def on_train_end(self, recipe, summary):
        for c in self.items:
            c.on_train_end(recipe, summary)


def load_callbacks(specs: list[str]) -> list[Callback]:
    """train.callbacks: `module:Class` import paths, each made with no arguments."""
    out = []
    for spec in specs:
        module, _, attr = spec.partition(":")
        if not module or not attr:
            raise TrainingStop(f"train.callbacks: {spec!r} is not `module:Class`")
        try:
            obj = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise TrainingStop(f"train.callbacks: cannot import {spec!r}: {e}") from None
        out.append(obj())
    return out


# ---- the program -----------------------------------------------------------------------------------------------

# Where the trainer's own lines (progress, what it did) go: the launcher relays this process's stdout to the stage's
# log, line by line. A launched trainer (main) keeps the real stdout for them and points file descriptor 1 at stderr,
# so what libraries print to stdout (DeepSpeed's "Setting accelerator to CPU" notice, ...) lands in the trainer's
# stderr log with the rest of their output, not among its progress lines. In process (tests): sys.stdout.
OWN_STDOUT = None


def main(argv: list[str] | None = None) -> int:
    global OWN_STDOUT
    OWN_STDOUT = os.fdopen(os.dup(1), "w", buffering=1)
    sys.stdout.flush()
    os.dup2(2, 1)
    ap = argparse.ArgumentParser(description="worldpm trainer (run through `accelerate launch`)")
    ap.add_argument("--args-json", required=True)
    args = TrainerArgs.read(ap.parse_args(argv).args_json)
    guard.guard_trainer(args.work)  # dies with its launcher; the only trainer in its work folder (before anything
    # that could write failure.json: a second trainer must not leave its refusal in the first one's folder)
    try:
        train(args)
        end_process_group()
    except TrainingStop as e:  # a reason the user can act on: one line, no traceback
        print(f"ERROR: {e}", file=sys.stderr, flush=True)
        record_failure(args.work, str(e))
        return 3
    except SystemExit as e:
        if isinstance(e.code, str):
            record_failure(args.work, e.code)
        raise
    except BaseException as e:
        record_failure(args.work, f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}")
        raise
    exit_after_success()


def exit_after_success() -> NoReturn:
    """A successful trainer's exit, once everything is written (model, summary, trackers ended) and the process group
    is gone: the streams flushed, then no interpreter teardown. In that teardown, C++ destructors of torch's
    communication backend now and then aborted a finished process ("terminate called without an active exception",
    SIGABRT, after the model was saved), which failed the run: in about 1 full test run of 5 before
    end_process_group, and once since (the two-node resume, 4 gloo processes)."""
    logging.shutdown()
    for stream in (OWN_STDOUT, sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()
    os._exit(0)


def end_process_group() -> None:
    """Every process has finished: leave the process group before exiting. Left to interpreter exit, its
    communication threads were now and then destroyed while still running ("terminate called without an active
    exception", SIGABRT after the model was saved: the ZeRO-3 CPU test failed so in about 1 full test run of 5)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


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


def train(args: TrainerArgs, callbacks: list[Callback] | None = None) -> dict:
    """The whole recipe: setup, train, evaluate, save. Returns train_summary.json's content (on every process)."""
    r = Recipe(args, Callbacks(load_callbacks(args.train.callbacks) + list(callbacks or [])))
    r.setup()
    r.train()
    r.evaluate()
    return r.save()


# ---- the recipe ----------------------------------------------------------------------------------------------------

@dataclass
class Timeline:
    """time.time() at each startup phase: where the time from `accelerate launch` to the first step went."""

    marks: dict

    def mark(self, name: str) -> None:
        self.marks[name] = time.time()

    def seconds(self) -> dict:
        order = ["launch", "imports", "accelerator", "data", "model", "prepare", "first_step"]
        out = {f"{b}_s": round(self.marks[b] - self.marks[a], 2) for a, b in zip(order, order[1:])}
        out["launch_to_first_step_s"] = round(self.marks["first_step"] - self.marks["launch"], 2)
        return out


class Recipe:
    def __init__(self, args: TrainerArgs, callbacks: Callback):
        self.args, self.t, self.cb = args, args.train, callbacks
        # launched: from `accelerate launch` on; called in process (tests): from here
        now = time.time()
        self.time = Timeline({"launch": args.launched_at or now, "imports": T_IMPORTED if args.launched_at else now})
        self.ckpt_dir, self.metrics_path = args.work / "checkpoints", args.work / "metrics.jsonl"

    def say(self, msg: str) -> None:
        if self.accelerator.is_main_process:
            print(msg, file=OWN_STDOUT or sys.stdout, flush=True)

    # ---- setup ---------------------------------------------------------------------------------------------------
    def setup(self) -> None:
        from accelerate.utils import set_seed
        from transformers import AutoTokenizer

        t, A = self.t, self.args
        self.tracking = make_tracking(A)
        self.accelerator = make_accelerator(A, self.tracking)
        self.time.mark("accelerator")
        set_seed(t.seed)
        self.tokenizer = AutoTokenizer.from_pretrained(str(A.tokenizer_dir))
        self.objective = build_objective(t)
        self.data = self.load_split("train")
        if len(self.data) == 0:
            raise TrainingStop(f"{store_path(A.data_dir, 'train')}: no training pairs (the train split is empty: see "
                               "the shard stage's splits and the clean stage's report)")
        self.length_info = None
        if self.objective.name == "bt" and (t.length_balance != "none" or t.length_debias != "none"):
            self.data, self.length_info = length_control.apply(self.data, t.length_balance, t.length_debias,
                                                               t.length_debias_coef, t.seed)
            self.say(f"length control: {json.dumps(self.length_info)}")
        try:  # a budget below the longest pair's real tokens fails in any layout: say so before building the model
            check_token_budget(t.max_tokens_per_batch, int(self.data.packed_len.max()))
        except ValueError as e:
            raise TrainingStop(str(e)) from None
        self.time.mark("data")

        model = build_model(self.objective, A.model, self.tokenizer, self.accelerator, t.gradient_checkpointing,
                            A.precision)
        self.time.mark("model")
        self.n_params, self.n_trainable = parameter_counts(model)
        self.layout = choose_layout(model, t, self.accelerator, self.objective.name)
        try:
            self.plan = make_plan(self.data, t, self.accelerator, self.layout.packed)
        except ValueError as e:
            raise TrainingStop(str(e)) from None
        # pairs and tokens seen after each step, over every process: the x-axis of the curves (metrics.jsonl rows,
        # eval_curve.jsonl), a function of the plan alone
        self.pairs_seen, self.tokens_seen = self.plan.seen(self.data.packed_len)
        optimizer, scheduler = optimizer_and_schedule(model, t, self.plan.total_steps, self.accelerator)
        self.model, self.optimizer, self.scheduler = self.accelerator.prepare(model, optimizer, scheduler)
        self.start_step, ckpt = save.resume(self.accelerator, self.ckpt_dir, self.plan.micro_per_step)
        self.time.mark("prepare")
        if ckpt is not None:
            self.say(f"resumed from checkpoint {ckpt.name}: step {self.start_step}/{self.plan.total_steps}")
        if self.accelerator.is_main_process:
            keep_metrics_until(self.metrics_path, self.start_step)
        micro = (f"micro-batches of <= {t.max_tokens_per_batch} tokens" if t.max_tokens_per_batch
                 else f"micro-batches of {t.batch_size} pairs")
        self.say(f"training: {len(self.data)} pairs, {self.plan.total_steps} steps of {self.plan.micro_per_epoch} "
                 f"{micro} an epoch, x {t.grad_accum} accumulation x {self.accelerator.num_processes} processes a "
                 f"step, {'packed' if self.layout.packed else 'padded'}, {self.n_trainable:,}/{self.n_params:,} "
                 f"parameters trainable, precision {A.precision}, device {self.accelerator.device}, ready "
                 f"{self.time.marks['prepare'] - self.time.marks['launch']:.1f}s after launch")
        if self.tracking is not None:
            self.start_tracking()
        # evaluation during training (train.eval_at): a step of its own after each optimizer step (evalcurve.py)
        self.curve = None
        if t.evaluates_during_training:
            from worldpm.modeling.trainer.evalcurve import EvalCurve

            self.curve = EvalCurve(self)
            self.curve.start()
        self.cb.on_train_start(self)

    def start_tracking(self) -> None:
        """train.report_to: accelerate's trackers started under this run's names and tags; the main process records
        where they write (<tracking>/runs/<train key>.json) for the evaluate stage's final metrics, and a resumed
        run continues its MLflow run."""
        from worldpm.modeling import tracking as T

        record = self.tracking.start(self.accelerator)
        if self.accelerator.is_main_process:
            T.write_record(self.args.tracking.folder, self.args.tracking.train_key,
                           {**record, "steps": self.plan.total_steps})
            self.say(f"report_to: {', '.join(self.tracking.trackers)} as run {self.tracking.run_name} under "
                     f"{self.tracking.folder}")

    def load_split(self, split: str) -> PairData:
        """A tokenized split, memory-mapped from its token store (data.read_split_pairs), with its cached reference
        log-probs for dpo."""
        try:
            return read_split_pairs(self.args.data_dir, split,
                                    self.args.ref_dir if self.objective.name == "dpo" else None)
        except (TokenStoreError, PairDataError) as e:
            raise TrainingStop(str(e)) from None

    # ---- train -----------------------------------------------------------------------------------------------------
    def train(self) -> None:
        """Steps start_step+1 .. plan.total_steps."""
        t, acc, plan, cb = self.t, self.accelerator, self.plan, self.cb
        keys = ("loss", "accuracy", "margin", "reward_chosen", "reward_rejected",
                *getattr(self.objective, "extra_metrics", ()))
        self.log = StepLog(keys, acc.device, self.metrics_path, acc.is_main_process, self.start_step,
                           plan.total_steps)
        finite = FiniteGuard()
        self.epoch = self.start_step / max(plan.micro_per_epoch / plan.micro_per_step, 1e-9)
        grad_norm = None
        scale = plan.micro_per_step  # P x ga: undone by accelerate (/ga) and the gradient all-reduce (mean over P)
        cuda = acc.device.type == "cuda"
        pad_id = self.tokenizer.pad_token_id
        self.t_start = time.perf_counter()
        self.model.train()
        for work, batches in Prefetcher(plan.steps(self.start_step),
                                        lambda idx: self.layout.collate(self.data, idx, pad_id), pin=cuda):
            step = work.step
            for j, batch in enumerate(batches):
                pair_ids = batch.pop("pair_ids")
                batch = to_device(batch, acc.device)
                try:
                    cb.on_micro_batch(self, step, j, pair_ids)
                    with acc.accumulate(self.model):
                        with acc.autocast():
                            loss, stats = self.objective.compute(self.model, batch)
                        loss = cb.on_loss(self, step, loss)
                        finite.add(loss, step, pair_ids)
                        acc.backward(loss * (batch["n_pairs"] * scale / work.pairs))
                        if acc.sync_gradients:
                            grad_norm = acc.clip_grad_norm_(self.model.parameters(), t.max_grad_norm)
                        self.optimizer.step()
                        self.optimizer.zero_grad(set_to_none=True)
                except torch.OutOfMemoryError:
                    raise OutOfMemory(oom_message(step, batch, t, self.layout.packed)) from None
                self.log.add(loss, stats, batch)
            self.scheduler.step()
            if self.log.first_step_at is None:  # the one host sync outside log lines: when did the first step end
                if cuda:
                    torch.cuda.synchronize(acc.device)
                self.log.first_step_at = time.time()
            self.epoch = work.epoch
            self.log.n += 1
            if step % t.log_every == 0 or step == plan.total_steps:
                self.say(self.log.line(acc, step, self.epoch, self.scheduler.get_last_lr()[0], grad_norm, finite,
                                       seen=(self.pairs_seen[step], self.tokens_seen[step])))
                if self.tracking is not None:
                    self.tracking.log_train(acc, self.log.last)
                cb.on_log(self, self.log.last)
            if step % t.checkpoint_every == 0 and step < plan.total_steps:
                finite.check(acc)  # never checkpoint weights a nan has reached
                path = save.save_checkpoint(acc, self.ckpt_dir, step, {
                    "step": step, "epoch": self.epoch, "total_steps": plan.total_steps,
                    "micro_per_step": plan.micro_per_step}, t.keep_checkpoints)
                self.say(f"checkpoint {path.name} saved (step {step})")
            if self.curve is not None:
                self.curve.after_step(step)
            cb.on_step_end(self, step)
        # training time without the evaluation points (their share: eval_curve.seconds in train_summary.json)
        self.train_seconds = time.perf_counter() - self.t_start - (self.curve.seconds if self.curve else 0.0)
        self.time.marks["first_step"] = self.log.first_step_at or time.time()
        self.say("startup: " + ", ".join(f"{k} {v:.1f}s" for k, v in self.time.seconds().items()))

    # ---- evaluate ----------------------------------------------------------------------------------------------------
    def evaluate(self) -> None:
        """The first train.eval_max_pairs pairs of the eval split (0: all), for train_summary.json."""
        t = self.t
        has_eval = store_path(self.args.data_dir, "eval").exists()
        data = self.load_split("eval") if has_eval else None
        self.eval_metrics = evaluate_split(self.model, self.objective, data, self.accelerator,
                                           self.tokenizer.pad_token_id, t.batch_size, t.eval_max_pairs, self.layout,
                                           t.max_tokens_per_batch)
        if self.eval_metrics:
            m = self.eval_metrics
            self.say(f"eval: {m['pairs']} pairs, loss {m['loss']:.4f}, accuracy {m['accuracy']:.3f}")

    # ---- save --------------------------------------------------------------------------------------------------------
    def save(self) -> dict:
        A, t, acc, plan = self.args, self.t, self.accelerator, self.plan
        elapsed = time.perf_counter() - self.t_start  # training and evaluation
        save.save_final(acc, self.model, self.tokenizer, A.out / "model", A.model, self.objective.name,
                        card=A.text.card())
        peak = save.peak_memory_gb(acc)
        summary = {
            "objective": self.objective.name, "steps": plan.total_steps, "resumed_from_step": self.start_step,
            "steps_this_run": plan.total_steps - self.start_step, "epochs": round(self.epoch, 4),
            "train_pairs": len(self.data), "batch_size": t.batch_size, "max_tokens_per_batch": t.max_tokens_per_batch,
            "grad_accum": t.grad_accum, "num_processes": acc.num_processes, "packed": self.layout.packed,
            "precision": A.precision, "parameters": self.n_params, "trainable_parameters": self.n_trainable,
            "startup": self.time.seconds(),
            "seconds": round(elapsed, 2), "train_seconds": round(self.train_seconds, 2),
            "tokens_per_s": round(self.log.run_tokens / max(self.train_seconds, 1e-9), 1),
            "pairs_per_s": round(self.log.run_pairs / max(self.train_seconds, 1e-9), 2),
            "peak_memory_gb": round(peak, 3),
            "final": self.log.last, "eval": self.eval_metrics, "length_control": self.length_info,
            **({"eval_curve": self.curve.summary()} if self.curve is not None else {}),
        }
        if acc.is_main_process:
            shutil.copyfile(self.metrics_path, A.out / "metrics.jsonl")
            if self.curve is not None:
                self.curve.copy_to(A.out)
            (A.out / "train_summary.json").write_text(json.dumps(summary, indent=2))
            # not the folder: it is the stage's temporary output, renamed into the store when the stage commits
            self.say(f"saved the model ({plan.total_steps - self.start_step} steps in {hms(elapsed)})")
        self.cb.on_train_end(self, summary)
        acc.wait_for_everyone()
        acc.end_training()
        return summary


# ---- setup, piece by piece -----------------------------------------------------------------------------------------

def make_tracking(args: TrainerArgs):
    """train.report_to as modeling/tracking.Tracking, or None."""
    tr = args.tracking
    if tr is None or not tr.report_to:
        return None
    from worldpm.modeling.tracking import read_record, setup_tracking

    resume = (read_record(tr.folder, tr.train_key).get("mlflow") or {}).get("run_id")  # a resumed key: its run
    return setup_tracking(tr.report_to, tr.folder, run_config=tr.config, tags=tr.tags, run_name=tr.run_name,
                          experiment=tr.experiment, run_id=resume)


def make_accelerator(args: TrainerArgs, tracking=None):
    """The Accelerator. On CPU: ``cpu=True`` (several processes: MULTI_CPU over gloo); under DeepSpeed on CPU
    (its CPU accelerator, DS_ACCELERATOR=cpu) the process group is named gloo explicitly, without which accelerate
    leaves the backend unset and every process believes it is process 0 of 1. Across machines (train.nodes) the
    process group's timeout is train.nodes.timeout_s. The process-wide accelerate state of an earlier run in this
    process (a test calling ``train`` twice) is reset first."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import InitProcessGroupKwargs

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    kw: dict = {}
    init: dict = {}
    if args.cpu and deepspeed:
        init["backend"] = "gloo"
    elif args.cpu:
        kw["cpu"] = True
    if args.train.nodes.count > 1:  # a node that drops off the network ends the run after this, not torch's 30 min
        from datetime import timedelta

        init["timeout"] = timedelta(seconds=args.train.nodes.timeout_s)
    if init:
        kw["kwargs_handlers"] = [InitProcessGroupKwargs(**init)]
    if tracking is not None:
        kw.update(tracking.accelerator_kwargs)  # log_with, project_dir
    return Accelerator(
        mixed_precision="bf16" if args.precision == "bf16" else "no",
        gradient_accumulation_steps=args.train.grad_accum,
        step_scheduler_with_optimizer=False,  # stepped once per optimizer step, whatever the process count
        **kw,
    )


def zero_stage(accelerator) -> int | None:
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return None if plugin is None else int(plugin.zero_stage)


def make_plan(data: PairData, t: TrainConfig, accelerator, packed: bool) -> StepPlan:
    """The steps: PairBatchSampler's micro-batches (batch_size pairs, or a token budget) over processes and
    accumulation (data.StepPlan)."""
    sampler = PairBatchSampler(data.pair_len, t.batch_size, seed=t.seed, group_by_length=t.group_by_length,
                               window=t.length_group_window, max_tokens_per_batch=t.max_tokens_per_batch,
                               packed_cost=data.packed_len if packed else None)
    return StepPlan(sampler, accelerator.num_processes, t.grad_accum, t.epochs, t.max_steps,
                    rank=accelerator.process_index)


def choose_layout(model, t: TrainConfig, accelerator, objective_name: str) -> Layout:
    """Packed (padding-free) where the model can and train.packing allows, else padded (data.Layout)."""
    kind = packing.pack_kind(model) if objective_name == "bt" else None
    if t.packing is True and kind is None:
        what = "objective dpo" if objective_name != "bt" else type(models.unwrap(model)).__name__
        raise TrainingStop(f"train.packing=true: {what} cannot be trained packed (packing.py: decoders with a score "
                           "head, BERT encoders with sdpa/eager attention); set train.packing=auto or false")
    if kind is not None and t.packing is not False:
        return Layout(packed=True, row_tokens=None if packing.one_row(model) else 0)
    return Layout(packed=False, pad_multiple=8 if accelerator.device.type == "cuda" else None)


def head_modules(model) -> list[str]:
    """The freshly initialised reward head, trained in full and saved with a LoRA adapter (modules_to_save)."""
    return [n for n in ("score", "classifier") if isinstance(getattr(model, n, None), torch.nn.Module)]


def build_placement(accelerator, precision: str, quantized: bool) -> tuple[torch.dtype | None, torch.device | None]:
    """(dtype, device) to build the model with, so that it is made where and as it will train, with no copy.

    Under DeepSpeed the engine holds bf16 weights (fp32 masters live in the optimizer): built in bf16. Plain bf16
    is autocast over fp32 weights (the optimizer updates fp32): built in fp32. On a GPU the weights are made on
    it (random init there, a checkpoint loaded straight to it); under ZeRO-3 zero.Init partitions them as they
    are made, so no device is given."""
    stage = zero_stage(accelerator)
    dtype = torch.bfloat16 if precision == "bf16" and stage is not None else None
    device = None
    if accelerator.device.type == "cuda" and stage != 3 and not quantized:
        device = accelerator.device
    return dtype, device


def build_model(objective, mcfg: ModelConfig, tokenizer, accelerator, gradient_checkpointing: bool = False,
                precision: str = "fp32"):
    """The objective's model, with LoRA (peft) or QLoRA (NF4 base, GPU only) when configured."""
    lc = mcfg.lora
    quant = device_map = None
    if lc.enabled and lc.quantize_4bit:
        if not torch.cuda.is_available():
            raise TrainingStop("model.lora.quantize_4bit (QLoRA, 4-bit NF4 through bitsandbytes) needs a CUDA GPU; "
                               "this machine has none: set model.lora.quantize_4bit=false")
        from transformers import BitsAndBytesConfig

        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16)
        device_map = {"": accelerator.local_process_index}
    dtype, device = build_placement(accelerator, precision, quant is not None)
    model = objective.build_model(mcfg, tokenizer, dtype=dtype, quantization_config=quant, device_map=device_map,
                                  device=device)
    if lc.enabled:
        from peft import LoraConfig, TaskType, get_peft_model, prepare_model_for_kbit_training

        if quant is not None:
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        # bt: a sequence classifier whose new score head is trained in full; dpo: a causal LM (no new head)
        task = TaskType[getattr(objective, "lora_task_type", "SEQ_CLS")]
        pcfg = LoraConfig(task_type=task, r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
                          target_modules=lc.target_modules, modules_to_save=head_modules(model) or None)
        model = get_peft_model(model, pcfg)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    return model


def is_matrix(p: torch.Tensor) -> bool:
    """A weight matrix (weight decay applies) rather than a bias or a norm; ZeRO-3 flattens partitions to 1-D, so
    the real shape is ds_shape."""
    return len(getattr(p, "ds_shape", p.shape)) >= 2


def optimizer_and_schedule(model, t: TrainConfig, total_steps: int, accelerator=None):
    """AdamW over the trainable parameters (no weight decay on biases and norms) and the warmup + decay schedule.

    On CUDA the fused AdamW kernel (one launch for all parameters); with DeepSpeed's optimizer offload,
    DeepSpeedCPUAdam (DeepSpeed refuses a torch optimizer there)."""
    from transformers import get_scheduler

    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [g for g in ({"params": [p for p in trainable if is_matrix(p)], "weight_decay": t.weight_decay},
                          {"params": [p for p in trainable if not is_matrix(p)], "weight_decay": 0.0}) if g["params"]]
    kw = {"lr": t.lr, "betas": (0.9, 0.95), "eps": 1e-8}
    offload = t.deepspeed.enabled and t.deepspeed.offload_optimizer and accelerator is not None \
        and zero_stage(accelerator) is not None
    if offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizer = DeepSpeedCPUAdam(groups, adamw_mode=True, **kw)
    else:
        cuda = accelerator is not None and accelerator.device.type == "cuda"
        on_gpu = all(p.device.type == "cuda" for g in groups for p in g["params"])
        optimizer = torch.optim.AdamW(groups, fused=True if cuda and on_gpu else None, **kw)
    warmup = int(round(t.warmup_ratio * total_steps))
    scheduler = get_scheduler(t.scheduler if t.scheduler != "constant" else "constant_with_warmup",
                              optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
    return optimizer, scheduler


def parameter_counts(model) -> tuple[int, int]:
    """(all parameters, trainable ones), whole sizes under ZeRO-3 (ds_numel; numel() is the local partition)."""
    params = list(models.unwrap(model).parameters())
    return (sum(models.parameter_count(p) for p in params),
            sum(models.parameter_count(p) for p in params if p.requires_grad))


def keep_metrics_until(metrics_path: Path, step: int) -> None:
    """metrics.jsonl without the lines of steps after `step` (they are redone after a resume)."""
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    kept = []
    if step and metrics_path.exists():
        kept = [ln for ln in metrics_path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
    metrics_path.write_text("".join(ln + "\n" for ln in kept))


# ---- evaluation -------------------------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate_split(model, objective, data: PairData | None, accelerator, pad_id: int, batch_size: int,
                   max_pairs: int, layout: Layout, max_tokens_per_batch: int | None = None) -> dict | None:
    """{pairs, loss, accuracy} of the first max_pairs pairs of `data` (0: all), or None without pairs.

    Every pair once, batched as in training (the memory limit holds here too), under ZeRO-3 too:
    data.shard_for_scoring."""
    if data is None:
        return None
    n = len(data) if not max_pairs else min(len(data), max_pairs)
    if n == 0:
        return None
    was = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=accelerator.device)  # loss sum, correct, pairs
    for idx, batch, real in shard_for_scoring(data, n, accelerator.num_processes, accelerator.process_index, layout,
                                              pad_id, batch_size, max_tokens_per_batch):
        batch = to_device(batch, accelerator.device)
        with accelerator.autocast():
            loss, stats = objective.compute(model, batch)
        if real:
            sums += torch.stack([loss.detach().double() * len(idx), stats["accuracy"].double() * len(idx),
                                 torch.tensor(float(len(idx)), dtype=torch.float64, device=sums.device)])
    sums = accelerator.reduce(sums, reduction="sum")
    if was:
        model.train()
    return {"pairs": int(sums[2]), "loss": float(sums[0] / sums[2]), "accuracy": float(sums[1] / sums[2])}


if __name__ == "__main__":
    sys.exit(main())
