"""Evaluation during training (train.eval_at): the recipe's step that writes <work>/eval_curve.jsonl.

* **Where** (``eval_steps``): every N optimizer steps, or K steps spaced evenly on a log scale of pairs seen from
  the first step to the last; the last step always. Pairs seen are a function of the step plan (data.StepPlan.seen),
  so 1 process x 2 accumulations and 2 processes x 1 evaluate at the same steps with the same pairs seen.
* **What**: the eval split (tokenize's eval.parquet, set ``eval``) and every ``evaluate.eval_sets`` entry, each a
  fixed random sample of at most ``eval_at.max_pairs`` pairs (the same pairs at every point). Eval sets go through
  the training text path (TextPath: normalisation, then render and cut as the tokenize stage does; scoring.py's
  prepare_pairs and render.tokenize_pairs), tokenized once at setup by the main process into <work>/eval_sets/.
* **How**: the training model itself, in eval mode under no_grad (no second copy), length-sorted batches of the
  training micro-batch size (or token budget), batch i on process i % P; every process runs the same number of
  forward passes (ZeRO-3 needs all of them in each), then one all-reduce gathers the rewards. The main process
  turns them into records (modeling/eval_curve.py: step, pairs_seen, tokens_seen, set, subset, category, n, bt_loss,
  accuracy, lc_accuracy), appends them to the file and hands them to the trackers.
* **Resume**: records after the resumed step are dropped (they are redone); a point at the resumed step whose
  records a crash lost (the checkpoint is written before the point is evaluated) is evaluated first.

Evaluation reads no random numbers and leaves the model as it found it (train mode), so a run with eval_at trains
the same weights as one without.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from worldpm.config import EvalAtConfig
from worldpm.modeling.trainer.data import PairData, load_pairs, shard_for_scoring
from worldpm.modeling.trainer.step import hms, to_device
from worldpm.modeling import eval_curve as EC

SAMPLE_SEED = 0  # the sample of a large set: the same whatever train.seed, so runs of a sweep score the same pairs


def eval_steps(pairs_seen: np.ndarray, rule: EvalAtConfig) -> list[int]:
    """The steps to evaluate at. ``pairs_seen[s]``: pairs seen after step s (index 0: none), total = len - 1.

    every N: N, 2N, ... and the last step. log_points K: for K targets spaced evenly on a log scale between the
    pairs seen after step 1 and after the last step, the first step that reaches each; points that would share a
    step are moved apart (forward, then back from the last step), so there are min(K, steps) distinct steps."""
    total = len(pairs_seen) - 1
    if total < 1 or not rule.enabled:
        return []
    if rule.every is not None:
        steps = list(range(rule.every, total + 1, rule.every))
        return steps if steps and steps[-1] == total else steps + [total]
    k = min(int(rule.log_points), total)
    if k == 1:
        return [total]
    targets = np.geomspace(max(float(pairs_seen[1]), 1.0), max(float(pairs_seen[total]), 1.0), k)
    s = np.searchsorted(pairs_seen, targets * (1 - 1e-12), side="left").astype(np.int64)
    s = np.clip(s, 1, total)
    for i in range(1, k):
        s[i] = max(s[i], s[i - 1] + 1)
    s[-1] = total
    for i in range(k - 2, -1, -1):
        s[i] = min(s[i], s[i + 1] - 1)
    return [int(x) for x in s]


@dataclass
class EvalSet:
    name: str
    category: str | None
    data: PairData
    subset: list[str | None] | None  # per pair (RewardBench's subsets), None when the set has none


def _sample(n: int, max_pairs: int) -> np.ndarray | None:
    """The indices of a fixed random sample of ``max_pairs`` of n (sorted), None for all."""
    if not max_pairs or n <= max_pairs:
        return None
    return np.sort(np.random.default_rng(SAMPLE_SEED).choice(n, size=max_pairs, replace=False))


def tokenize_eval_set(es, text, tokenizer, dest: Path) -> int:
    """An eval set read by the source adapters, normalised and tokenized through the training text path, written to
    ``dest`` (what load_pairs reads, plus `subset`). Returns its number of pairs."""
    import polars as pl

    from worldpm.data.render import tokenize_pairs
    from worldpm.modeling.scoring import prepare_pairs, read_eval_file

    pairs, _rejects, _info = read_eval_file(es.path, es.format, es.name)
    pairs, _ = prepare_pairs(pairs, text)
    t = tokenize_pairs(pairs, tokenizer, text.render)
    keep = ["pair_id", "chosen_ids", "rejected_ids", "chosen_len", "rejected_len", "margin", "prompt_len",
            "chosen_response_tokens", "rejected_response_tokens", "subset"]
    if "subset" not in t.columns:
        t = t.with_columns(subset=pl.lit(None, pl.String))
    t = t.select([c for c in keep if c in t.columns])
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    t.write_parquet(tmp)
    tmp.replace(dest)
    return t.height


@torch.no_grad()
def score_rewards(model, objective, data: PairData, accelerator, pad_id: int, layout, batch_size: int,
                  max_tokens_per_batch: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(chosen, rejected) rewards of every pair of ``data``, on every process: length-sorted batches, batch i on
    process i % P, the same number of forward passes on every process (a process short of batches reruns its
    first, uncounted), one all-reduce of the rewards."""
    n = len(data)
    out = torch.zeros(2, n, dtype=torch.float64, device=accelerator.device)
    for idx, batch, real in shard_for_scoring(data, n, accelerator.num_processes, accelerator.process_index, layout,
                                              pad_id, batch_size, max_tokens_per_batch):
        batch = to_device(batch, accelerator.device)
        with accelerator.autocast():
            rc, rr = objective.rewards(model, batch)
        if real:
            where = torch.as_tensor(np.asarray(idx, dtype=np.int64), device=out.device)
            out[0, where] = rc.detach().double().reshape(-1)
            out[1, where] = rr.detach().double().reshape(-1)
    out = accelerator.reduce(out, reduction="sum").cpu().numpy()
    return out[0], out[1]


class EvalCurve:
    """The recipe's evaluation during training (module doc), made by Recipe.setup when train.eval_at is on:
    ``start`` at the end of setup, ``after_step`` after each step (after its checkpoint, before the callbacks'
    on_step_end)."""

    def __init__(self, recipe):
        self.r = recipe
        self.rule: EvalAtConfig = recipe.t.eval_at
        self.path = recipe.args.work / EC.FILE
        self.sets: list[EvalSet] = []
        self.steps: set[int] = set()
        self.seconds = 0.0
        self.points_done: list[int] = []

    # ---- setup ---------------------------------------------------------------------------------------------------
    def load_sets(self) -> None:
        r, A, acc = self.r, self.r.args, self.r.accelerator
        max_pairs = self.rule.max_pairs
        sets: list[EvalSet] = []
        eval_path = A.data_dir / "eval.parquet"
        if eval_path.exists():
            data = r.load_split("eval")
            if len(data):
                idx = _sample(len(data), max_pairs)
                sets.append(EvalSet("eval", None, data if idx is None else data.subset(idx), None))
        folder = A.work / "eval_sets"
        if acc.is_main_process:
            for es in A.eval_sets:
                dest = folder / f"{_safe_name(es.name)}-{_safe_name(es.digest.split(':')[-1][:16])}.parquet"
                if not dest.exists():  # the work folder is this key's: same file, same text path
                    n = tokenize_eval_set(es, A.text, r.tokenizer, dest)
                    r.say(f"eval_at: {es.name}: {n} pairs tokenized through the training text path ({dest})")
        acc.wait_for_everyone()
        import polars as pl

        for es in A.eval_sets:
            dest = folder / f"{_safe_name(es.name)}-{_safe_name(es.digest.split(':')[-1][:16])}.parquet"
            data = load_pairs(dest)
            if not len(data):
                r.say(f"eval_at: {es.name}: no pairs; not evaluated during training")
                continue
            subset = pl.read_parquet(dest, columns=["subset"])["subset"].to_list()
            idx = _sample(len(data), max_pairs)
            if idx is not None:
                data, subset = data.subset(idx), [subset[i] for i in idx]
            sets.append(EvalSet(es.name, es.category, data, subset if any(s for s in subset) else None))
        self.sets = sets

    def start(self) -> None:
        r = self.r
        self.load_sets()
        self.steps = set(eval_steps(r.pairs_seen, self.rule))
        if r.accelerator.is_main_process:
            dropped = EC.truncate_after(self.path, r.start_step) if r.start_step else 0
            if not r.start_step:
                self.path.unlink(missing_ok=True)
            if dropped:
                r.say(f"eval_at: {dropped} record(s) after step {r.start_step} dropped (redone after the resume)")
        r.say(f"eval_at: {len(self.steps)} points at steps {sorted(self.steps)} over "
              f"{', '.join(f'{s.name} ({len(s.data)} pairs)' for s in self.sets) or 'no set'}")
        s0 = r.start_step
        if s0 in self.steps:  # its checkpoint is written before its point: a crash in between lost the records
            have = float(any(p.step == s0 for p in EC.read_eval_curve(self.path))) if \
                r.accelerator.is_main_process else 0.0
            have = float(r.accelerator.reduce(torch.tensor([have], device=r.accelerator.device), "sum")[0])
            if not have:
                self.evaluate(s0)

    def after_step(self, step: int) -> None:
        if step in self.steps:
            self.evaluate(step)

    # ---- a point -------------------------------------------------------------------------------------------------
    def evaluate(self, step: int) -> list:
        r, acc = self.r, self.r.accelerator
        t0 = time.perf_counter()
        model = r.model
        was = model.training
        model.eval()
        pairs_seen, tokens_seen = int(r.pairs_seen[step]), int(r.tokens_seen[step])
        points = []
        try:
            for s in self.sets:
                c, j = score_rewards(model, r.objective, s.data, acc, r.tokenizer.pad_token_id, r.layout,
                                     r.t.batch_size, r.t.max_tokens_per_batch)
                if acc.is_main_process:
                    points += EC.points_from_scores(
                        step=step, pairs_seen=pairs_seen, tokens_seen=tokens_seen, set_name=s.name,
                        category=s.category, chosen=c, rejected=j, chosen_len=s.data.chosen_tokens,
                        rejected_len=s.data.rejected_tokens, subset=s.subset)
        finally:
            if was:
                model.train()
        dt = time.perf_counter() - t0
        self.seconds += dt
        self.points_done.append(step)
        if getattr(r, "log", None) is not None:
            r.log.t_log += dt  # the next log line's tokens/s is training's, not evaluation's
        if acc.is_main_process:
            EC.append_points(self.path, points)
            whole = [p for p in points if p.subset is None]
            r.say(f"eval at step {step}/{r.plan.total_steps} ({pairs_seen:,} pairs seen): "
                  + "; ".join(f"{p.set} BT loss {p.bt_loss:.4f} acc {p.accuracy:.3f}" for p in whole)
                  + f" ({hms(dt)})")
        if r.tracking is not None:
            r.tracking.log_eval(acc, points)
        return points

    def summary(self) -> dict:
        """What train_summary.json says about it."""
        return {"points": sorted(self.steps), "sets": {s.name: {"pairs": len(s.data), "category": s.category}
                                                      for s in self.sets},
                "seconds": round(self.seconds, 2), "file": EC.FILE}

    def copy_to(self, out: Path) -> None:
        import shutil

        if self.path.exists():
            shutil.copyfile(self.path, out / EC.FILE)


def _safe_name(name: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "set"
