"""The parts of a training step (recipe.py's loop): the micro-batches collated ahead on a thread, the statistics kept
on the device between log lines, the non-finite-loss guard, and the errors that stop a run in one line.

No host synchronisation per step: statistics and the losses stay on the device and are read (one all-reduce, one
copy to the host) at each log line; that is also where a non-finite loss stops the run, naming its step and pairs,
and before any checkpoint is written (so a checkpoint never holds weights updated by a nan). Micro-batches are
weighted by their pair counts (loss x pairs x P x ga / pairs in the step), so a step's gradient is the mean over
its pairs however they were split over processes and accumulation, and whatever each micro-batch held.
"""
from __future__ import annotations

import json
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from worldpm.config import TrainConfig


class TrainingStop(RuntimeError):
    """A run stopped for a reason the user can act on: its message is the stage's one-line error."""


class NonFiniteLoss(TrainingStop):
    pass


class OutOfMemory(TrainingStop):
    pass


def nonfinite_message(value: float, step: int, pair_ids: list[str]) -> str:
    shown = ", ".join(pair_ids[:16]) + (f" ... ({len(pair_ids)} pairs)" if len(pair_ids) > 16 else "")
    return f"non-finite loss ({value}) at step {step}; pair ids: {shown}"


class FiniteGuard:
    """A nan/inf loss stops the run, naming the step and the pairs: never masked, never skipped. The losses since
    the last check are kept on the device, with their steps and pair ids on the host; ``check`` costs one
    all-reduce and one copy: it runs at log lines and before checkpoints, not per step."""

    def __init__(self) -> None:
        self.losses: list[torch.Tensor] = []
        self.where: list[tuple[int, list[str]]] = []

    def add(self, loss: torch.Tensor, step: int, pair_ids: list[str]) -> None:
        self.losses.append(loss.detach().float().reshape(()))
        self.where.append((step, pair_ids))

    def local_bad(self) -> torch.Tensor:
        """0-d count of this process's non-finite losses since the last check (on the device, no sync)."""
        if not self.losses:
            return torch.zeros((), dtype=torch.float64)
        return (~torch.isfinite(torch.stack(self.losses))).sum().double()

    def raise_if(self, total_bad: float) -> None:
        """Stop the run when any process saw a non-finite loss (total_bad: the reduced count)."""
        if total_bad > 0:
            values = torch.stack(self.losses).cpu() if self.losses else torch.zeros(0)
            bad = (~torch.isfinite(values)).nonzero()
            if len(bad):
                i = int(bad[0])
                raise NonFiniteLoss(nonfinite_message(float(values[i]), *self.where[i]))
            raise NonFiniteLoss(f"non-finite loss on another process by step {self.where[-1][0]} "
                                "(its message names the pairs)")
        self.losses.clear()
        self.where.clear()

    def check(self, accelerator) -> None:
        bad = self.local_bad().to(accelerator.device)
        self.raise_if(float(accelerator.reduce(bad, reduction="sum")))


class Prefetcher:
    """Collates the next steps' micro-batches on a thread while the current step runs (pinned memory on CUDA, so
    the copy to the device can overlap too). Yields (StepWork, [batches]); an error on the thread is re-raised."""

    _END = object()

    def __init__(self, works, collate, depth: int = 2, pin: bool = False):
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()

        def run() -> None:
            try:
                for w in works:
                    batches = [collate(idx) for idx in w.mine]
                    if pin:
                        batches = [{k: (v.pin_memory() if torch.is_tensor(v) else v) for k, v in b.items()}
                                   for b in batches]
                    while not self.stop.is_set():
                        try:
                            self.q.put((w, batches), timeout=0.5)
                            break
                        except queue.Full:
                            continue
                    if self.stop.is_set():
                        return
                self.q.put(self._END)
            except BaseException as e:  # noqa: BLE001 - handed to the consumer
                self.q.put(e)

        self.thread = threading.Thread(target=run, name="collate", daemon=True)
        self.thread.start()

    def __iter__(self):
        try:
            while True:
                item = self.q.get()
                if item is self._END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.stop.set()


@dataclass
class StepLog:
    """Statistics summed (weighted by pairs) over the steps since the last log line, kept on the device: one
    all-reduce and one host copy per log line. Lines are reduced over the processes: the loss of a line is the
    mean over every pair of its steps."""

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
    first_step_at: float | None = None  # time.time() when this run's first step was done (startup timing)

    def __post_init__(self) -> None:
        self.t_log = self.t_start
        self.window = torch.zeros(len(self.keys), dtype=torch.float64, device=self.device)
        self._reset()

    def _reset(self) -> None:
        self.window.zero_()
        self.n = self.tokens = self.padded = self.pairs = 0

    def add(self, loss: torch.Tensor, stats: dict, batch: dict) -> None:
        n = batch["n_pairs"]
        self.window += torch.stack([loss.detach().float(), *(stats[k].float() for k in self.keys[1:])]).double() * n
        self.tokens += batch["tokens"]
        self.padded += batch["padded_tokens"]
        self.pairs += n

    def line(self, accelerator, step: int, epoch: float, lr: float, grad_norm, guard: FiniteGuard,
             seen: tuple[int, int] | None = None) -> str:
        """Reduce the window, write its metrics.jsonl row (with ``seen``: pairs_seen, tokens_seen since the start
        of training, every process) and return the progress line."""
        now = time.perf_counter()
        t = torch.cat([self.window, torch.tensor([self.tokens, self.padded, self.pairs], dtype=torch.float64,
                                                 device=self.device), guard.local_bad().to(self.device).reshape(1)])
        t = accelerator.reduce(t, reduction="sum").cpu()  # the one host sync of the window
        guard.raise_if(float(t[-1]))
        tokens, padded, pairs = float(t[-4]), float(t[-3]), float(t[-2])
        vals = {k: float(t[i]) / max(pairs, 1.0) for i, k in enumerate(self.keys)}
        self.run_tokens += tokens
        self.run_pairs += pairs
        dt = max(now - self.t_log, 1e-9)
        gn = float(grad_norm) if grad_norm is not None else float("nan")
        self.last = {
            "step": step, "epoch": round(epoch, 4), **{k: round(v, 6) for k, v in vals.items()},
            "lr": lr, "grad_norm": round(gn, 6), "pairs": int(pairs), "tokens": int(tokens), "fed_tokens": int(padded),
            **({"pairs_seen": int(seen[0]), "tokens_seen": int(seen[1])} if seen is not None else {}),
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


def oom_message(step: int, batch: dict, t: TrainConfig, packed: bool) -> str:
    knob = (f"train.max_tokens_per_batch (now {t.max_tokens_per_batch})" if t.max_tokens_per_batch
            else f"train.batch_size (now {t.batch_size}) or set train.max_tokens_per_batch")
    ckpt = "" if t.gradient_checkpointing else ", or set train.gradient_checkpointing=true"
    return (f"out of memory at step {step} in a micro-batch of {batch['n_pairs']} pairs, {batch['tokens']} tokens "
            f"({batch['padded_tokens']} {'packed' if packed else 'padded'}): lower {knob}{ckpt}")


def to_device(batch: dict, device: torch.device) -> dict:
    nb = device.type == "cuda"
    return {k: (v.to(device, non_blocking=nb) if torch.is_tensor(v) else v) for k, v in batch.items()}


def hms(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
