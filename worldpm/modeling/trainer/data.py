"""Pairs in memory, the length-grouped pair sampler, the plan of steps over processes, and the collates that
put chosen and rejected in one forward batch.

A tokenized split (tokenize's ``<split>.parquet``) is held as two flat int32 arrays plus offsets per side (Arrow's
own list layout): no Python list per pair, a few bytes per token. A micro-batch of B pairs becomes ONE forward
batch of 2B sequences, the B chosen then the B rejected ones: packed end to end (collate_packed, padding-free,
for models that can: packing.py) or padded to the longest of all 2B (collate_pairs).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch

from worldpm.data.splits import flat_ids
from worldpm.modeling import models, packing


class PairDataError(ValueError):
    """A tokenized split or its reference log-probs that cannot be used (one line naming the file)."""


@dataclass
class PairData:
    pair_ids: list[str]
    chosen: tuple[np.ndarray, np.ndarray]    # (offsets int64 [n+1], flat int32 ids)
    rejected: tuple[np.ndarray, np.ndarray]
    chosen_len: np.ndarray                   # int32 [n]
    rejected_len: np.ndarray
    margin: np.ndarray                       # float32 [n], nan where the pair has none
    prompt_len: np.ndarray | None = None     # int32 [n]: tokens before the response (tokenize), for DPO
    ref_chosen: np.ndarray | None = None     # float64 [n]: cached reference log-probs (ref_logps stage), DPO
    ref_rejected: np.ndarray | None = None
    # length control (worldpm/modeling/length.py): response tokens before truncation, and per-pair numbers the
    # BT loss reads (None: off)
    chosen_tokens: np.ndarray | None = None  # int32 [n]
    rejected_tokens: np.ndarray | None = None
    weight: np.ndarray | None = None         # float32 [n], mean 1: length_balance reweight
    length_diff: np.ndarray | None = None    # float32 [n]: log(1 + L_chosen) - log(1 + L_rejected)
    length_offset: np.ndarray | None = None  # float32 [n]: the fixed length expert's logit (length_debias poe)

    def __len__(self) -> int:
        return len(self.pair_ids)

    def subset(self, idx: np.ndarray) -> "PairData":
        """The pairs at `idx` (in that order), every per-pair field cut alike."""
        idx = np.asarray(idx, dtype=np.int64)

        def ids(side: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
            off, flat = side
            starts = off[idx].astype(np.int64)
            lens = off[idx + 1].astype(np.int64) - starts
            new_off = np.zeros(len(idx) + 1, dtype=np.int64)
            np.cumsum(lens, out=new_off[1:])
            # token p of the new flat array is token p - new_off[j] of pair j: one gather, no loop over pairs
            return new_off, flat[np.repeat(starts - new_off[:-1], lens) + np.arange(new_off[-1])]

        def cut(a):
            return None if a is None else a[idx]
        return PairData(
            pair_ids=[self.pair_ids[i] for i in idx], chosen=ids(self.chosen), rejected=ids(self.rejected),
            chosen_len=self.chosen_len[idx], rejected_len=self.rejected_len[idx], margin=self.margin[idx],
            prompt_len=cut(self.prompt_len), ref_chosen=cut(self.ref_chosen), ref_rejected=cut(self.ref_rejected),
            chosen_tokens=cut(self.chosen_tokens), rejected_tokens=cut(self.rejected_tokens), weight=cut(self.weight),
            length_diff=cut(self.length_diff), length_offset=cut(self.length_offset))

    def response_tokens(self) -> tuple[np.ndarray, np.ndarray]:
        """(chosen, rejected) response tokens before truncation (never the lengths as cut: after a cut at
        max_length both sides of a long pair look equally long)."""
        if self.chosen_tokens is None or self.rejected_tokens is None:
            raise PairDataError("this tokenized split has no chosen_response_tokens / rejected_response_tokens (a "
                                "tokenize artifact from before length control); rerun tokenize")
        return self.chosen_tokens, self.rejected_tokens

    @property
    def pair_len(self) -> np.ndarray:
        """What a pair costs in a batch: its longer side (both sides are padded to the batch's longest)."""
        return np.maximum(self.chosen_len, self.rejected_len)

    @property
    def packed_len(self) -> np.ndarray:
        """What a pair costs in a packed batch: the real tokens of both sides (int64)."""
        return self.chosen_len.astype(np.int64) + self.rejected_len

    def seq(self, side: str, i: int) -> np.ndarray:
        off, flat = self.chosen if side == "chosen" else self.rejected
        return flat[off[i]:off[i + 1]]


def load_pairs(path: str | Path, ref_path: str | Path | None = None) -> PairData:
    """A tokenized split; with ``ref_path`` (the ref_logps stage's <split>.parquet, DPO) its cached reference
    log-probs joined on pair_id. The reference rows are in the split's order (ref_logps writes them so), which is
    checked pair by pair, as is the number of response tokens each side was summed over."""
    cols = ["pair_id", "chosen_ids", "rejected_ids", "chosen_len", "rejected_len", "margin"]
    schema = pl.read_parquet_schema(path)
    has_prompt_len = "prompt_len" in schema
    has_tokens = "chosen_response_tokens" in schema and "rejected_response_tokens" in schema
    df = pl.read_parquet(path, columns=cols + (["prompt_len"] if has_prompt_len else [])
                         + (["chosen_response_tokens", "rejected_response_tokens"] if has_tokens else []))
    prompt_len = df["prompt_len"].to_numpy().astype(np.int32) if has_prompt_len else None
    ref_c = ref_r = None
    if ref_path is not None:
        if prompt_len is None:
            raise PairDataError(f"{path}: no prompt_len column (a tokenize artifact from before DPO); rerun tokenize")
        ref = pl.read_parquet(ref_path)
        if ref.height != df.height or not ref["pair_id"].equals(df["pair_id"]):
            raise PairDataError(f"{ref_path}: its pair_ids are not those of {path} in order (reference log-probs of "
                                "another tokenize artifact?)")
        start = np.maximum(prompt_len, 1)
        for side in ("chosen", "rejected"):
            want = df[f"{side}_len"].to_numpy() - start
            got = ref[f"{side}_tokens"].to_numpy()
            if not np.array_equal(want, got):
                i = int(np.flatnonzero(want != got)[0])
                raise PairDataError(f"{ref_path}: pair {df['pair_id'][i]}: {side} log-prob over {got[i]} response "
                                    f"tokens, the split has {want[i]}")
        ref_c = ref["ref_chosen_logp"].to_numpy().astype(np.float64)
        ref_r = ref["ref_rejected_logp"].to_numpy().astype(np.float64)
    return PairData(
        pair_ids=df["pair_id"].to_list(),
        chosen=flat_ids(df["chosen_ids"]),
        rejected=flat_ids(df["rejected_ids"]),
        chosen_len=df["chosen_len"].to_numpy().astype(np.int32),
        rejected_len=df["rejected_len"].to_numpy().astype(np.int32),
        margin=df["margin"].cast(pl.Float32).fill_null(float("nan")).to_numpy().astype(np.float32),
        prompt_len=prompt_len, ref_chosen=ref_c, ref_rejected=ref_r,
        chosen_tokens=df["chosen_response_tokens"].to_numpy().astype(np.int32) if has_tokens else None,
        rejected_tokens=df["rejected_response_tokens"].to_numpy().astype(np.int32) if has_tokens else None,
    )


def cut_micro_batches(order: np.ndarray, lengths: np.ndarray, batch_size: int,
                      max_tokens_per_batch: int | None = None,
                      packed_cost: np.ndarray | None = None) -> list[np.ndarray]:
    """`order` cut into consecutive micro-batches: of ``batch_size`` pairs, or with ``max_tokens_per_batch`` as many
    pairs as fit in the budget (packed: a pair costs ``packed_cost``, its real tokens; padded: n pairs cost 2 n x
    the longest side, ``lengths``). A pair over the budget on its own is a micro-batch of one."""
    if max_tokens_per_batch is None:
        return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    budget, out, start = max_tokens_per_batch, [], 0
    if packed_cost is not None:
        used = 0
        for j, c in enumerate(packed_cost[order].tolist()):
            if used + c > budget and j > start:
                out.append(order[start:j])
                start, used = j, 0
            used += c
    else:  # padded: n pairs x 2 sides x the longest side of the micro-batch
        longest = 0
        for j, L in enumerate(lengths[order].tolist()):
            longest = max(longest, L)
            if 2 * (j - start + 1) * longest > budget and j > start:
                out.append(order[start:j])
                start, longest = j, L
    out.append(order[start:])
    return out


class PairBatchSampler:
    """The micro-batches of an epoch (pair indices, over all processes), grouped by length, deterministic in
    (seed, epoch).

    HF Trainer's ``group_by_length`` looks at one ``input_ids`` column and so does nothing useful for pairs; here
    a pair's length is max(chosen_len, rejected_len). Per epoch: shuffle all pairs, cut the order into windows of
    ``window`` x ``batch_size`` pairs, sort each window by length (longest first), cut it into micro-batches, then
    shuffle the micro-batches (the one holding the longest pair first: out-of-memory shows at step 1). A larger
    window means less padding and less mixing. With ``group_by_length=False`` it is a plain shuffle.

    A micro-batch is ``batch_size`` pairs, or with ``max_tokens_per_batch`` as many consecutive pairs as fit in that
    many tokens: packed, a pair costs its real tokens (``packed_cost``, chosen + rejected); padded, a micro-batch of n
    pairs costs 2 n x its longest side. Which process runs which micro-batch is StepPlan's business.
    """

    def __init__(self, lengths: np.ndarray, batch_size: int, *, seed: int = 0, group_by_length: bool = True,
                 window: int = 64, max_tokens_per_batch: int | None = None, packed_cost: np.ndarray | None = None):
        if len(lengths) == 0:
            raise ValueError("PairBatchSampler: no pairs")
        self.lengths = np.asarray(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.group_by_length = group_by_length
        self.window = max(1, window)
        self.max_tokens_per_batch = max_tokens_per_batch
        self.packed_cost = None if packed_cost is None else np.asarray(packed_cost, dtype=np.int64)
        if max_tokens_per_batch is not None:
            worst = int(self.packed_cost.max()) if self.packed_cost is not None else 2 * int(self.lengths.max())
            if worst > max_tokens_per_batch:
                raise ValueError(f"train.max_tokens_per_batch {max_tokens_per_batch} is below the {worst} tokens of "
                                 f"the longest pair (chosen + rejected"
                                 f"{'' if self.packed_cost is not None else ', padded'}): "
                                 f"raise it to at least {worst} or lower tokenize.max_length")
        self._cache: dict[int, list[np.ndarray]] = {}

    def _cut(self, order: np.ndarray) -> list[np.ndarray]:
        return cut_micro_batches(order, self.lengths, self.batch_size, self.max_tokens_per_batch, self.packed_cost)

    def global_batches(self, epoch: int) -> list[np.ndarray]:
        if epoch in self._cache:
            return self._cache[epoch]
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.lengths))
        if self.group_by_length:
            span = self.batch_size * self.window
            parts = []
            for s in range(0, len(order), span):
                w = order[s:s + span]
                parts.append(w[np.argsort(-self.lengths[w], kind="stable")])
            order = np.concatenate(parts)
        batches = self._cut(order)
        if self.group_by_length:
            # batch order shuffled so lengths do not trend within an epoch (a window's longest batch comes first
            # otherwise), the longest batch overall first: where out-of-memory would show, it shows at once
            perm = rng.permutation(len(batches))
            longest = int(np.argmax([self.lengths[b].max() for b in batches]))
            perm = np.concatenate([[longest], perm[perm != longest]])
            batches = [batches[i] for i in perm]
        if len(self._cache) > 4:
            self._cache.pop(min(self._cache))
        self._cache[epoch] = batches
        return batches


@dataclass
class StepWork:
    step: int                    # 1-based optimizer step
    epoch: float                 # fractional epoch reached at the end of this step
    mine: list[np.ndarray]       # this process's grad_accum micro-batches (pair indices)
    pairs: int                   # pairs in the whole step, over every process


class StepPlan:
    """Optimizer steps over the stream of micro-batches (epoch after epoch, PairBatchSampler's order): step s
    takes the next P x grad_accum micro-batches, process r runs those at r*ga .. r*ga+ga-1 of them.

    So every pair is seen once an epoch across the processes (no wrap-around duplicates), and the same global
    batches come out whatever P and grad_accum are, as long as P x grad_accum is the same: 2 processes x 1 and
    1 process x 2 accumulations take the same pairs each step. Every process knows the whole step (the sampler is
    a pure function of seed and epoch), so the loss is normalised by the step's pair count without a collective.
    ``total_steps``: max_steps, or enough steps to cover ``epochs`` (the last step may run into the next epoch)."""

    def __init__(self, sampler: PairBatchSampler, num_processes: int, grad_accum: int, epochs: float,
                 max_steps: int | None = None, rank: int = 0):
        self.sampler, self.P, self.ga, self.rank = sampler, num_processes, grad_accum, rank
        self.micro_per_step = num_processes * grad_accum
        self.micro_per_epoch = len(sampler.global_batches(0))
        if max_steps:
            self.total_steps = max_steps
        else:
            full = int(epochs)
            micro = sum(len(sampler.global_batches(e)) for e in range(full))
            if epochs > full:
                micro += math.ceil((epochs - full) * len(sampler.global_batches(full)))
            self.total_steps = max(1, math.ceil(micro / self.micro_per_step))

    def _stream(self, start_step: int):
        """(epoch reached, global micro-batch) from step start_step+1 on."""
        skip = start_step * self.micro_per_step
        epoch = 0
        while skip >= len(self.sampler.global_batches(epoch)):
            skip -= len(self.sampler.global_batches(epoch))
            epoch += 1
        e, j = epoch, skip
        while True:
            batches = self.sampler.global_batches(e)
            while j < len(batches):
                yield e + (j + 1) / len(batches), batches[j]
                j += 1
            e, j = e + 1, 0

    def steps(self, start_step: int = 0):
        """StepWork of steps start_step+1 .. total_steps (resume: the batches before are skipped, not read)."""
        it = self._stream(start_step)
        lo, hi = self.rank * self.ga, (self.rank + 1) * self.ga
        for step in range(start_step + 1, self.total_steps + 1):
            got = [next(it) for _ in range(self.micro_per_step)]
            yield StepWork(step, got[-1][0], [b for _, b in got[lo:hi]], sum(len(b) for _, b in got))

    def seen(self, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(pairs seen, tokens seen) after each step, over every process: arrays of total_steps + 1 (index 0: none
        yet). ``tokens``: a pair's real tokens (chosen + rejected, no padding). A function of the plan alone, so
        every process knows it without a collective, and 1 process x 2 accumulations count as 2 processes x 1."""
        it = self._stream(0)
        pairs = np.zeros(self.total_steps + 1, dtype=np.int64)
        toks = np.zeros(self.total_steps + 1, dtype=np.int64)
        for step in range(1, self.total_steps + 1):
            got = [next(it)[1] for _ in range(self.micro_per_step)]
            pairs[step] = sum(len(b) for b in got)
            toks[step] = sum(int(tokens[b].sum()) for b in got)
        return np.cumsum(pairs), np.cumsum(toks)


def padding_fraction(lengths: np.ndarray, batches: list) -> float:
    """Fraction of the tokens in padded batches (2B rows padded to the longest pair side) that are padding."""
    real = padded = 0
    for b in batches:
        b = np.asarray(b)
        real += int(lengths[0][b].sum() + lengths[1][b].sum())
        padded += 2 * len(b) * int(max(lengths[0][b].max(), lengths[1][b].max()))
    return 1.0 - real / padded if padded else 0.0


def pair_fields(data: PairData, idx: list[int]) -> dict:
    """What a batch carries per pair, whatever its layout: margins, pair ids, DPO's prompt lengths and cached
    reference log-probs."""
    batch: dict = {"margin": torch.from_numpy(data.margin[idx].copy()), "n_pairs": len(idx),
                   "pair_ids": [data.pair_ids[i] for i in idx]}
    if data.prompt_len is not None:  # DPO: where each pair's response starts (both sides)
        batch["prompt_len"] = torch.from_numpy(data.prompt_len[idx].astype(np.int64))
    if data.ref_chosen is not None:
        batch["ref_chosen_logps"] = torch.from_numpy(data.ref_chosen[idx].copy())
        batch["ref_rejected_logps"] = torch.from_numpy(data.ref_rejected[idx].copy())
    for key in ("weight", "length_diff", "length_offset"):  # length control (bt), per pair
        if getattr(data, key) is not None:
            batch[key] = torch.from_numpy(getattr(data, key)[idx].copy())
    return batch


def collate_pairs(data: PairData, idx: list[int], pad_id: int, padding_side: str = "right",
                  pad_to_multiple_of: int | None = None) -> dict:
    """One padded forward batch: rows [0, B) are the chosen sides, rows [B, 2B) the rejected ones, padded alike.

    position_ids count real tokens only (the padding side never changes a sequence's positions)."""
    seqs = [data.seq("chosen", i) for i in idx] + [data.seq("rejected", i) for i in idx]
    width = max(len(s) for s in seqs)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    ids, mask_t, pos = models.pad_sequences(seqs, pad_id, side=padding_side, pad_to=width)
    return {"input_ids": ids, "attention_mask": mask_t, "position_ids": pos, "tokens": int(mask_t.sum()),
            "padded_tokens": len(seqs) * width, **pair_fields(data, idx)}


def collate_packed(data: PairData, idx: list[int], pad_id: int, row_tokens: int | None = None) -> dict:
    """One padding-free forward batch: the B chosen then the B rejected sequences packed end to end into rows
    (packing.pack_sequences; ``row_tokens`` None: one row). Sequence i < B is pair i's chosen side, B + i its
    rejected side, wherever they landed."""
    seqs = [data.seq("chosen", i) for i in idx] + [data.seq("rejected", i) for i in idx]
    return {**packing.pack_sequences(seqs, pad_id, row_tokens), **pair_fields(data, idx)}


@dataclass(frozen=True)
class Layout:
    """How micro-batches are laid out: packed (padding-free; row_tokens None = one row, 0 = rows as wide as the
    longest sequence) or padded (to a multiple of pad_multiple)."""

    packed: bool
    row_tokens: int | None = None
    pad_multiple: int | None = None

    def collate(self, data: PairData, idx, pad_id: int) -> dict:
        idx = [int(i) for i in idx]
        if self.packed:
            return collate_packed(data, idx, pad_id, self.row_tokens)
        return collate_pairs(data, idx, pad_id, pad_to_multiple_of=self.pad_multiple)
