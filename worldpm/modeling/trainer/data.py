"""Pairs in memory, the length-grouped pair sampler, and the collate that puts chosen and rejected in one batch.

A tokenized split (tokenize's ``<split>.parquet``) is held as two flat int32 arrays plus offsets per side (Arrow's
own list layout): no Python list per pair, a few bytes per token. A batch of B pairs becomes ONE forward batch of
2B rows: the B chosen sequences then the B rejected ones, padded to the longest of all 2B (so a pair's two
sequences are always padded alike and the loss is computed from one forward pass).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch

from worldpm.data.splits import flat_ids
from worldpm.modeling import models


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
            lens = (off[idx + 1] - off[idx]).astype(np.int64)
            new_off = np.zeros(len(idx) + 1, dtype=np.int64)
            np.cumsum(lens, out=new_off[1:])
            parts = [flat[off[i]:off[i + 1]] for i in idx]
            return new_off, (np.concatenate(parts) if parts else flat[:0]).astype(flat.dtype, copy=False)

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


class PairBatchSampler:
    """Batches of pair indices, grouped by length, deterministic in (seed, epoch), sharded over processes.

    HF Trainer's ``group_by_length`` looks at one ``input_ids`` column and so does nothing useful for pairs; here
    a pair's length is max(chosen_len, rejected_len). Per epoch: shuffle all pairs, cut the order into windows of
    ``window`` batches, sort each window by length (longest first), cut it into batches, then shuffle the batches.
    A larger window means less padding and less mixing. With ``group_by_length=False`` it is a plain shuffle.

    Every process gets the same number of batches (the global list is wrapped around to a multiple of the process
    count, as DistributedSampler does); ``start`` skips the first batches of the epoch (resume mid-epoch) without
    touching the data.
    """

    def __init__(self, lengths: np.ndarray, batch_size: int, *, seed: int = 0, group_by_length: bool = True,
                 window: int = 64, num_replicas: int = 1, rank: int = 0, drop_last: bool = False):
        if len(lengths) == 0:
            raise ValueError("PairBatchSampler: no pairs")
        self.lengths = np.asarray(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.group_by_length = group_by_length
        self.window = max(1, window)
        self.num_replicas = num_replicas
        self.rank = rank
        self.drop_last = drop_last
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def global_batches(self, epoch: int) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.lengths))
        bs = self.batch_size
        if self.group_by_length:
            span = bs * self.window
            parts = []
            for s in range(0, len(order), span):
                w = order[s:s + span]
                parts.append(w[np.argsort(-self.lengths[w], kind="stable")])
            order = np.concatenate(parts)
        batches = [order[s:s + bs] for s in range(0, len(order), bs)]
        if self.drop_last and len(batches) > 1 and len(batches[-1]) < bs:
            batches.pop()
        if self.group_by_length:
            # batch order shuffled so lengths do not trend within an epoch (a window's longest batch comes first
            # otherwise, which is also where out-of-memory would show: the longest batch overall stays first)
            perm = rng.permutation(len(batches))
            longest = int(np.argmax([self.lengths[b].max() for b in batches]))
            perm = np.concatenate([[longest], perm[perm != longest]])
            batches = [batches[i] for i in perm]
        n = self.num_replicas
        if len(batches) % n:
            batches += batches[: n - len(batches) % n]  # wrap around: every process steps the same number of times
        return batches

    def __len__(self) -> int:
        n_pairs = len(self.lengths)
        nb = n_pairs // self.batch_size if self.drop_last and n_pairs >= self.batch_size else math.ceil(
            n_pairs / self.batch_size)
        return math.ceil(nb / self.num_replicas)

    def __iter__(self):
        mine = self.global_batches(self.epoch)[self.rank::self.num_replicas]
        for b in mine[self.start:]:
            yield b.tolist()


def padding_fraction(lengths: np.ndarray, batches: list) -> float:
    """Fraction of the tokens in padded batches (2B rows padded to the longest pair side) that are padding."""
    real = padded = 0
    for b in batches:
        b = np.asarray(b)
        real += int(lengths[0][b].sum() + lengths[1][b].sum())
        padded += 2 * len(b) * int(max(lengths[0][b].max(), lengths[1][b].max()))
    return 1.0 - real / padded if padded else 0.0


def collate_pairs(data: PairData, idx: list[int], pad_id: int, padding_side: str = "right",
                  pad_to_multiple_of: int | None = None) -> dict:
    """One forward batch: rows [0, B) are the chosen sides, rows [B, 2B) the rejected ones, padded alike.

    position_ids count real tokens only (the padding side never changes a sequence's positions)."""
    seqs = [data.seq("chosen", i) for i in idx] + [data.seq("rejected", i) for i in idx]
    width = max(len(s) for s in seqs)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    n = len(seqs)
    ids, mask_t, pos = models.pad_sequences(seqs, pad_id, side=padding_side, pad_to=width)
    margin = torch.from_numpy(data.margin[idx].copy())
    batch = {
        "input_ids": ids, "attention_mask": mask_t, "position_ids": pos,
        "margin": margin, "n_pairs": len(idx), "tokens": int(mask_t.sum()), "padded_tokens": n * width,
        "pair_ids": [data.pair_ids[i] for i in idx],
    }
    if data.prompt_len is not None:  # DPO: where each pair's response starts (both sides)
        batch["prompt_len"] = torch.from_numpy(data.prompt_len[idx].astype(np.int64))
    if data.ref_chosen is not None:
        batch["ref_chosen_logps"] = torch.from_numpy(data.ref_chosen[idx].copy())
        batch["ref_rejected_logps"] = torch.from_numpy(data.ref_rejected[idx].copy())
    for key in ("weight", "length_diff", "length_offset"):  # length control (bt), per pair
        if getattr(data, key) is not None:
            batch[key] = torch.from_numpy(getattr(data, key)[idx].copy())
    return batch
