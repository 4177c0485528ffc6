"""The training loop: micro-batches from the sampler, one optimizer step per grad_accum of them, a log line (and a
line in metrics.jsonl) every log_every steps, a checkpoint every checkpoint_every steps."""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from worldpm.config import TrainConfig
from worldpm.modeling.trainer.data import PairData, collate_pairs
from worldpm.modeling.trainer.save import save_checkpoint
from worldpm.modeling.trainer.setup import FaultInjection, Schedule


class NonFiniteLoss(RuntimeError):
    pass


def check_finite(loss: torch.Tensor, step: int, pair_ids: list[str]) -> None:
    """A nan/inf loss stops the run, naming the step and the pairs: never masked, never skipped."""
    if not bool(torch.isfinite(loss.detach()).all()):
        shown = ", ".join(pair_ids[:16]) + (f" ... ({len(pair_ids)} pairs)" if len(pair_ids) > 16 else "")
        raise NonFiniteLoss(f"non-finite loss ({loss.item()}) at step {step}; pair ids: {shown}")


def micro_batches(sched: Schedule, first_micro: int):
    """(fractional epoch, pair indices) of every micro-batch from `first_micro` on, epoch after epoch."""
    epoch, offset = divmod(first_micro, sched.micro_per_epoch)
    while True:
        sched.sampler.set_epoch(epoch, offset)
        for j, idx in enumerate(sched.sampler, start=offset):
            yield epoch + (j + 1) / sched.micro_per_epoch, idx
        epoch, offset = epoch + 1, 0


@dataclass
class StepLog:
    """Statistics summed over the steps since the last log line. The sums stay on the device: one host sync per
    log line, not one per statistic per step. Lines are reduced (averaged) over the processes."""

    keys: tuple[str, ...]
    device: torch.device
    path: Path
    main: bool
    start_step: int
    total_steps: int
    t_start: float = field(default_factory=time.perf_counter)
    run_tokens: float = 0.0
    run_pairs: float = 0.0
    last: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.t_log = self.t_start
        self.window = torch.zeros(len(self.keys), dtype=torch.float64, device=self.device)
        self._reset()

    def _reset(self) -> None:
        self.window.zero_()
        self.n = self.tokens = self.padded = self.pairs = 0

    def add(self, loss: torch.Tensor, stats: dict, batch: dict, weight: float) -> None:
        self.window += torch.stack([loss.detach(), *(stats[k] for k in self.keys[1:])]).double() * weight
        self.tokens += batch["tokens"]
        self.padded += batch["padded_tokens"]
        self.pairs += batch["n_pairs"]

    def line(self, accelerator, step: int, epoch: float, lr: float, grad_norm) -> str:
        now = time.perf_counter()
        t = torch.cat([self.window / max(self.n, 1), torch.tensor([self.tokens, self.padded, self.pairs],
                                                                  dtype=torch.float64, device=self.device)])
        t = accelerator.reduce(t, reduction="sum")
        P = accelerator.num_processes
        vals = {k: float(t[i]) / P for i, k in enumerate(self.keys)}
        tokens, padded, pairs = float(t[-3]), float(t[-2]), float(t[-1])
        self.run_tokens += tokens
        self.run_pairs += pairs
        dt = max(now - self.t_log, 1e-9)
        gn = float(grad_norm) if grad_norm is not None else float("nan")
        self.last = {
            "step": step, "epoch": round(epoch, 4), **{k: round(v, 6) for k, v in vals.items()},
            "lr": lr, "grad_norm": round(gn, 6),
            "tokens_per_s": round(tokens / dt, 1), "pairs_per_s": round(pairs / dt, 2),
            "padding": round(1 - tokens / padded, 4) if padded else 0.0,
            "elapsed_s": round(now - self.t_start, 2),
        }
        if self.main:
            with self.path.open("a") as f:
                f.write(json.dumps(self.last) + "\n")
        eta = (now - self.t_start) / (step - self.start_step) * (self.total_steps - step)
        self._reset()
        self.t_log = now
        return (f"step {step}/{self.total_steps} epoch {epoch:.2f} loss {vals['loss']:.4f} acc "
                f"{vals['accuracy']:.3f} margin {vals['margin']:.3f} "
                + "".join(f"{k} {vals[k]:.3f} " for k in self.keys[5:]) + f"lr {lr:.2e} grad_norm {gn:.3f} "
                f"tokens/s {self.last['tokens_per_s']:.0f} pairs/s {self.last['pairs_per_s']:.1f} "
                f"pad {self.last['padding']:.1%} ETA {hms(eta)}")


def train_loop(accelerator, model, optimizer, scheduler, objective, data: PairData, pad_id: int, t: TrainConfig,
               sched: Schedule, start_step: int, ckpt_dir: Path, metrics_path: Path, faults: FaultInjection,
               say) -> tuple[StepLog, float]:
    """Steps start_step+1 .. total_steps. Returns the log (running totals, last line) and the final epoch."""
    ga = t.grad_accum
    pad_multiple = 8 if accelerator.device.type == "cuda" else None
    stream = micro_batches(sched, start_step * ga)
    keys = ("loss", "accuracy", "margin", "reward_chosen", "reward_rejected", *getattr(objective, "extra_metrics", ()))
    slog = StepLog(keys, accelerator.device, metrics_path, accelerator.is_main_process, start_step, sched.total_steps)
    epoch_f = start_step / sched.steps_per_epoch
    grad_norm = None
    model.train()
    for step in range(start_step + 1, sched.total_steps + 1):
        for _ in range(ga):
            epoch_f, idx = next(stream)
            batch = collate_pairs(data, idx, pad_id, pad_to_multiple_of=pad_multiple)
            pair_ids = batch.pop("pair_ids")
            batch = {k: (v.to(accelerator.device) if torch.is_tensor(v) else v) for k, v in batch.items()}
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    loss, stats = objective.compute(model, batch)
                if faults.nan_at == step:
                    loss = loss * float("nan")
                check_finite(loss, step, pair_ids)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            slog.add(loss, stats, batch, 1.0 / ga)
        scheduler.step()
        slog.n += 1
        if step % t.log_every == 0 or step == sched.total_steps:
            say(slog.line(accelerator, step, epoch_f, scheduler.get_last_lr()[0], grad_norm))
        if step % t.checkpoint_every == 0 and step < sched.total_steps:
            path = save_checkpoint(accelerator, ckpt_dir, step, {"step": step, "epoch": epoch_f,
                                                                "total_steps": sched.total_steps}, t.keep_checkpoints)
            say(f"checkpoint {path.name} saved (step {step})")
        if faults.crash_after and step == faults.crash_after:
            say(f"crash_after={faults.crash_after} (test hook): exiting hard after step {step}")
            sys.stdout.flush()
            os._exit(17)
    return slog, epoch_f


def hms(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
