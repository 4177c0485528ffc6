"""A tokenized split as the trainer reads it, the length-grouped pair sampler, the plan of steps over processes, and
the collates that put chosen and rejected in one forward batch.

A split is read memory-mapped from tokenize's token store (``<split>.tok``, worldpm/data/tokstore.py): the tokens
are one flat int32 array (pair i's chosen then its rejected sequence) with int64 offsets, and the per-pair arrays
(lengths, margins, response tokens) are views of the same mapping. Every process on a node maps the same file, so
the node holds one copy in the page cache; a process reads only the tokens of its own micro-batches (a collate
copies them into its batch), and the sampler and the step plan read the length arrays alone. Pair ids are read
from the store only for the pairs of a micro-batch (for a non-finite loss's message), never as a list of the split.
``load_pairs(<split>.parquet)`` gives the same PairData from the Parquet split, in memory (tests compare the two).

A micro-batch of B pairs becomes ONE forward batch of 2B sequences, the B chosen then the B rejected ones: packed
end to end (collate_packed, padding-free, for models that can: packing.py) or padded to the longest of all 2B
(collate_pairs).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import polars as pl
import torch

from worldpm.data.splits import flat_ids
from worldpm.data.tokstore import SUFFIX as STORE_SUFFIX
from worldpm.data.tokstore import TokenStore
from worldpm.modeling import models, packing


class PairDataError(ValueError):
    """A tokenized split or its reference log-probs that cannot be used (one line naming the file)."""


@dataclass
class Side:
    """One side (chosen or rejected) of every pair of a source: pair k's ids are tokens[starts[k]:ends[k]]. A mapped
    store's two sides share one token array (pair k's chosen then rejected run; starts and ends are strided views
    of its offsets); a split read into memory has a token array per side (Arrow's own buffers)."""

    tokens: np.ndarray   # int32
    starts: np.ndarray   # int64 [N]
    ends: np.ndarray     # int64 [N]


@dataclass
class PairData:
    """The pairs of a split: each side's tokens (Side, over the N pairs of the source: a mapped store, or arrays in
    memory) and per-pair arrays, one number a pair. ``rows`` says which source pairs this data holds, in order
    (None: all N, as stored); every per-pair array has one entry per pair of this data. A subset (length control)
    cuts the per-pair arrays and ``rows``, never the tokens."""

    chosen: Side
    rejected: Side
    chosen_len: np.ndarray                   # int32 [n]
    rejected_len: np.ndarray
    margin: np.ndarray                       # float [n], nan where the pair has none (float64 mapped, float32)
    ids_of: Callable[[np.ndarray], list[str]]  # source pair indices -> their pair ids (read when asked for)
    rows: np.ndarray | None = None           # int64 [n]: source pair of each pair (None: 0..N-1)
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
    source: str = ""                         # the file it was read from (messages)
    mapped: bool = False                     # read through a memory map (the token store)

    def __len__(self) -> int:
        return len(self.chosen_len)

    def _source_rows(self, idx) -> np.ndarray:
        idx = np.asarray(idx, dtype=np.int64)
        return idx if self.rows is None else self.rows[idx]

    def subset(self, idx: np.ndarray) -> "PairData":
        """The pairs at `idx` (in that order), every per-pair field cut alike; the tokens are shared, not copied."""
        idx = np.asarray(idx, dtype=np.int64)

        def cut(a):
            return None if a is None else a[idx]
        return PairData(
            chosen=self.chosen, rejected=self.rejected, chosen_len=self.chosen_len[idx],
            rejected_len=self.rejected_len[idx], margin=self.margin[idx], ids_of=self.ids_of,
            rows=self._source_rows(idx), prompt_len=cut(self.prompt_len), ref_chosen=cut(self.ref_chosen),
            ref_rejected=cut(self.ref_rejected), chosen_tokens=cut(self.chosen_tokens),
            rejected_tokens=cut(self.rejected_tokens), weight=cut(self.weight), length_diff=cut(self.length_diff),
            length_offset=cut(self.length_offset), source=self.source, mapped=self.mapped)

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
        """What a pair costs in a packed batch: the real tokens of both sides (int32: two sides of at most
        tokenize.max_length tokens)."""
        return self.chosen_len.astype(np.int32) + self.rejected_len

    def seq(self, side: str, i: int) -> np.ndarray:
        """The ids of one side of pair i: a view (of the mapping, for a mapped split), nothing copied."""
        k = int(i) if self.rows is None else int(self.rows[i])
        s = self.chosen if side == "chosen" else self.rejected
        return s.tokens[s.starts[k]:s.ends[k]]

    def ids(self, idx) -> list[str]:
        """The pair ids of the pairs at `idx` (read from the store for a mapped split: only those)."""
        return self.ids_of(self._source_rows(idx))

    @property
    def pair_ids(self) -> list[str]:
        """Every pair id, as a list (tests and small splits; the trainer asks `ids` for a micro-batch's)."""
        return self.ids(np.arange(len(self)))


def _check_ref(ref_path: Path, ref: pl.DataFrame, pair_ids: pl.Series, source: str, chosen_len: np.ndarray,
               rejected_len: np.ndarray, prompt_len: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The cached reference log-probs (chosen, rejected), checked against the split: same pairs in the same order,
    each side summed over the response tokens the split has."""
    if ref.height != len(pair_ids) or not ref["pair_id"].equals(pair_ids, check_names=False):
        raise PairDataError(f"{ref_path}: its pair_ids are not those of {source} in order (reference log-probs of "
                            "another tokenize artifact?)")
    start = np.maximum(prompt_len, 1)
    for side, lens in (("chosen", chosen_len), ("rejected", rejected_len)):
        want = lens - start
        got = ref[f"{side}_tokens"].to_numpy()
        if not np.array_equal(want, got):
            i = int(np.flatnonzero(want != got)[0])
            raise PairDataError(f"{ref_path}: pair {pair_ids[i]}: {side} log-prob over {got[i]} response "
                                f"tokens, the split has {want[i]}")
    return (ref["ref_chosen_logp"].to_numpy().astype(np.float64),
            ref["ref_rejected_logp"].to_numpy().astype(np.float64))


def map_pairs(path: str | Path, ref_path: str | Path | None = None) -> PairData:
    """A tokenized split, memory-mapped from its token store (``<split>.tok``): nothing is read but the store's
    head and footer; the per-pair arrays are views of the mapping. With ``ref_path`` (DPO) the cached reference
    log-probs, checked as in load_pairs (they are read into this process: 16 bytes a pair)."""
    path = Path(path)
    # TokenStoreError: missing, cut short or another format, one line naming the file; MADV_RANDOM: a trainer reads
    # scattered pairs, so no read-ahead around each one
    store = TokenStore(path, madvise_random=True)

    def ids_of(rows: np.ndarray) -> list[str]:
        return store.strings("pair_id", rows)

    prompt_len = store.prompt_len
    ref_c = ref_r = None
    if ref_path is not None:
        ref = pl.read_parquet(ref_path)
        ref_c, ref_r = _check_ref(Path(ref_path), ref, store.string_series("pair_id"), str(path), store.chosen_len,
                                  store.rejected_len, prompt_len)
        del ref
    off, n = store.offsets, len(store)  # pair k: chosen tokens[off[2k]:off[2k+1]], rejected to off[2k+2]
    return PairData(
        chosen=Side(store.tokens, off[0:2 * n:2], off[1:2 * n + 1:2]),
        rejected=Side(store.tokens, off[1:2 * n + 1:2], off[2:2 * n + 1:2]),
        chosen_len=store.chosen_len, rejected_len=store.rejected_len,
        margin=store.margin, ids_of=ids_of, prompt_len=prompt_len, ref_chosen=ref_c, ref_rejected=ref_r,
        chosen_tokens=store.chosen_response_tokens, rejected_tokens=store.rejected_response_tokens,
        source=str(path), mapped=True)


def read_split_pairs(data_dir: str | Path, split: str, ref_dir: str | Path | None = None) -> PairData:
    """The trainer's read of a split: its token store mapped (``<data_dir>/<split>.tok``), with the cached reference
    log-probs of ``<ref_dir>/<split>.parquet`` when ref_dir is given (DPO)."""
    ref = None if ref_dir is None else Path(ref_dir) / f"{split}.parquet"
    return map_pairs(Path(data_dir) / f"{split}{STORE_SUFFIX}", ref_path=ref)


def load_pairs(path: str | Path, ref_path: str | Path | None = None) -> PairData:
    """A tokenized split in memory, from ``<split>.parquet`` (or mapped, given a ``.tok`` path); with ``ref_path``
    (the ref_logps stage's <split>.parquet, DPO) its cached reference log-probs joined on pair_id. The reference
    rows are in the split's order (ref_logps writes them so), which is checked pair by pair, as is the number of
    response tokens each side was summed over."""
    if str(path).endswith(STORE_SUFFIX):
        return map_pairs(path, ref_path)
    cols = ["pair_id", "chosen_ids", "rejected_ids", "chosen_len", "rejected_len", "margin"]
    schema = pl.read_parquet_schema(path)
    has_prompt_len = "prompt_len" in schema
    has_tokens = "chosen_response_tokens" in schema and "rejected_response_tokens" in schema
    df = pl.read_parquet(path, columns=cols + (["prompt_len"] if has_prompt_len else [])
                         + (["chosen_response_tokens", "rejected_response_tokens"] if has_tokens else []))
    prompt_len = df["prompt_len"].to_numpy().astype(np.int32) if has_prompt_len else None
    chosen_len = df["chosen_len"].to_numpy().astype(np.int32)
    rejected_len = df["rejected_len"].to_numpy().astype(np.int32)
    ref_c = ref_r = None
    if ref_path is not None:
        if prompt_len is None:
            raise PairDataError(f"{path}: no prompt_len column (a tokenize artifact from before DPO); rerun tokenize")
        ref_c, ref_r = _check_ref(Path(ref_path), pl.read_parquet(ref_path), df["pair_id"], str(path), chosen_len,
                                  rejected_len, prompt_len)
    (c_off, c_val), (r_off, r_val) = flat_ids(df["chosen_ids"]), flat_ids(df["rejected_ids"])
    pair_ids = df["pair_id"]

    def ids_of(rows: np.ndarray) -> list[str]:
        return pair_ids.gather(rows).to_list()

    return PairData(
        chosen=Side(c_val, c_off[:-1], c_off[1:]), rejected=Side(r_val, r_off[:-1], r_off[1:]),
        chosen_len=chosen_len, rejected_len=rejected_len,
        margin=df["margin"].cast(pl.Float32).fill_null(float("nan")).to_numpy().astype(np.float32),
        ids_of=ids_of, prompt_len=prompt_len, ref_chosen=ref_c, ref_rejected=ref_r,
        chosen_tokens=df["chosen_response_tokens"].to_numpy().astype(np.int32) if has_tokens else None,
        rejected_tokens=df["rejected_response_tokens"].to_numpy().astype(np.int32) if has_tokens else None,
        source=str(path))


CUT_CHUNK = 1 << 16  # pairs whose costs become Python ints at once in a budgeted cut (not the whole epoch's)


def check_token_budget(max_tokens_per_batch: int | None, worst: int, padded: bool = False) -> None:
    """A micro-batch must hold the most expensive pair: ``worst`` tokens (packed: its chosen + rejected tokens, a
    lower bound of any layout's cost; padded: 2 x its longer side). ValueError naming the knob otherwise."""
    if max_tokens_per_batch is not None and worst > max_tokens_per_batch:
        raise ValueError(f"train.max_tokens_per_batch {max_tokens_per_batch} is below the {worst} tokens of the "
                         f"longest pair (chosen + rejected{', padded' if padded else ''}): raise it to at least "
                         f"{worst} or lower tokenize.max_length")


def cut_points(order: np.ndarray, lengths: np.ndarray, batch_size: int, max_tokens_per_batch: int | None = None,
               packed_cost: np.ndarray | None = None) -> np.ndarray:
    """Where `order` is cut into consecutive micro-batches (int64 bounds: micro-batch k is order[b[k]:b[k+1]]): of
    ``batch_size`` pairs, or with ``max_tokens_per_batch`` as many pairs as fit in the budget (packed: a pair costs
    ``packed_cost``, its real tokens; padded: n pairs cost 2 n x the longest side, ``lengths``). A pair over the
    budget on its own is a micro-batch of one."""
    n = len(order)
    if max_tokens_per_batch is None:
        return np.append(np.arange(0, n, batch_size, dtype=np.int64), np.int64(n))
    budget, cuts, start = max_tokens_per_batch, [0], 0
    used = longest = 0
    for lo in range(0, n, CUT_CHUNK):
        if packed_cost is not None:
            for j, c in enumerate(packed_cost[order[lo:lo + CUT_CHUNK]].tolist(), lo):
                if used + c > budget and j > start:
                    cuts.append(j)
                    start, used = j, 0
                used += c
        else:  # padded: n pairs x 2 sides x the longest side of the micro-batch
            for j, L in enumerate(lengths[order[lo:lo + CUT_CHUNK]].tolist(), lo):
                longest = max(longest, L)
                if 2 * (j - start + 1) * longest > budget and j > start:
                    cuts.append(j)
                    start, longest = j, L
    cuts.append(n)
    return np.asarray(cuts, dtype=np.int64)


def cut_micro_batches(order: np.ndarray, lengths: np.ndarray, batch_size: int,
                      max_tokens_per_batch: int | None = None,
                      packed_cost: np.ndarray | None = None) -> list[np.ndarray]:
    """`order` cut into consecutive micro-batches (cut_points), as a list of index arrays."""
    b = cut_points(order, lengths, batch_size, max_tokens_per_batch, packed_cost)
    return [order[b[k]:b[k + 1]] for k in range(len(b) - 1)]


def shard_for_scoring(data: "PairData", n: int, num_processes: int, process_index: int, layout: "Layout",
                      pad_id: int, batch_size: int, max_tokens_per_batch: int | None = None):
    """Every pair of ``data[:n]`` once, for scoring on every process (ZeRO-3 included): contiguous length-sorted
    batches of ``batch_size`` pairs or ``max_tokens_per_batch`` tokens, batch i on process i % P (no wrap-around
    duplicates), the same number of forward passes on every process: a process short of batches reruns the first
    one, to be left uncounted. Yields (pair indices, the collated batch without pair_ids, real)."""
    order = np.argsort(-data.pair_len[:n], kind="stable")
    cost = data.packed_len[:n] if layout.packed else None
    batches = cut_micro_batches(order, data.pair_len[:n], batch_size, max_tokens_per_batch, cost)
    mine = batches[process_index::num_processes]
    for i in range(math.ceil(len(batches) / num_processes)):
        real = i < len(mine)
        idx = (mine[i] if real else batches[0]).tolist()
        batch = layout.collate(data, idx, pad_id)
        batch.pop("pair_ids")
        yield idx, batch, real


class Batches(Sequence):
    """An epoch's micro-batches as two arrays, not a list of arrays: batch k is order[starts[k]:ends[k]] (8 bytes a
    pair and 16 a micro-batch, whatever the count: 15M pairs in micro-batches of 8 would be 1.9M array objects)."""

    def __init__(self, order: np.ndarray, starts: np.ndarray, ends: np.ndarray):
        self.order, self.starts, self.ends = order, starts, ends

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self[i] for i in range(*k.indices(len(self)))]
        return self.order[self.starts[k]:self.ends[k]]


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
        self.packed_cost = None if packed_cost is None else np.asarray(packed_cost)
        if max_tokens_per_batch is not None:
            padded = self.packed_cost is None
            check_token_budget(max_tokens_per_batch, 2 * int(self.lengths.max()) if padded else
                               int(self.packed_cost.max()), padded)
        self._cache: dict[int, Batches] = {}

    def global_batches(self, epoch: int) -> Batches:
        if epoch in self._cache:
            return self._cache[epoch]
        rng = np.random.default_rng([self.seed, epoch])
        # rng.permutation(n) is arange(n) shuffled: the same order, 4 bytes a pair instead of 8 below 2**31 pairs
        n = len(self.lengths)
        order = np.arange(n, dtype=np.int32 if n < 2**31 else np.int64)
        rng.shuffle(order)
        if self.group_by_length:
            span = self.batch_size * self.window
            for s in range(0, n, span):  # each window sorted in place, longest first
                w = order[s:s + span]
                w[:] = w[np.argsort(-self.lengths[w], kind="stable")]
        bounds = cut_points(order, self.lengths, self.batch_size, self.max_tokens_per_batch, self.packed_cost)
        starts, ends = bounds[:-1], bounds[1:]
        if self.group_by_length:
            # batch order shuffled so lengths do not trend within an epoch (a window's longest batch comes first
            # otherwise), the longest batch overall first: where out-of-memory would show, it shows at once
            perm = rng.permutation(len(starts))
            longest = int(np.argmax(np.maximum.reduceat(self.lengths[order], starts)))
            perm = np.concatenate([[longest], perm[perm != longest]])
            starts, ends = starts[perm], ends[perm]
        batches = Batches(order, starts, ends)
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
    batch: dict = {"margin": torch.from_numpy(data.margin[idx].astype(np.float32)), "n_pairs": len(idx),
                   "pair_ids": data.ids(idx)}
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
