"""The token store: one tokenized split in a single file that processes memory-map instead of loading.

Every process on a node maps the same file, so the node holds one copy of the tokens in the page cache, and a
process touches only the pages of the pairs it reads. Why this layout and not an Arrow IPC file:
docs/training.md ("The token store").

Layout of ``<split>.tok`` (format version 1; all numbers little-endian):

    0        b"WPMTOKS\\0", uint32 version, uint32 0                       the head: 16 bytes
    16...    the arrays, each starting at a multiple of 64 bytes:
             tokens                  int32 [T]     chosen then rejected of pair 0, of pair 1, ... (template included)
             offsets                 int64 [2n+1]  pair i: chosen = tokens[offsets[2i]:offsets[2i+1]],
                                                   rejected = tokens[offsets[2i+1]:offsets[2i+2]]
             chosen_len, rejected_len, prompt_len, chosen_response_tokens, rejected_response_tokens   int32 [n]
             margin                  float64 [n]   NaN where the pair has none
             truncated               uint8 [n]
             <s>.offsets int64 [n+1], <s>.data uint8, <s>.valid uint8 [n]   for the strings s = pair_id, source,
                                                   domain, group_id (utf-8; valid 0 = null)
    F        the footer: JSON {"format", "version", "pairs", "tokens", "arrays": {name: [dtype, offset, count]},
             "meta": {...}}
    end-16   uint64 len(footer), b"WPMTOKE\\0"                            the tail: 16 bytes

The head names the version before anything else is read; the tail is written last, so a file cut short anywhere
has no tail; the footer's offsets are checked against the file's size. Either way the error is one line naming
the file (TokenStoreError). Columns are those of tokenize's ``<split>.parquet`` (tasks/tokenize.py OUT_SCHEMA),
pair for pair in the same order: `to_frame` gives that table back.

    w = TokenStoreWriter(path); w.append(frame); ...; w.close(meta)   # tokenize: a batch at a time, streamed
    s = TokenStore(path)                                              # mapped: nothing read yet
    s.chosen_len, s.margin, ...                                       # read-only views, for samplers and plans
    b = s.read(indices)                                               # only the tokens of those pairs
    s.strings("pair_id", indices)                                     # ids only when asked for
"""
from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from worldpm.errors import StageError

VERSION = 1
HEAD_MAGIC = b"WPMTOKS\0"
TAIL_MAGIC = b"WPMTOKE\0"
ALIGN = 64
SUFFIX = ".tok"
INT_COLUMNS = ("chosen_len", "rejected_len", "prompt_len", "chosen_response_tokens", "rejected_response_tokens")
STRING_COLUMNS = ("pair_id", "source", "domain", "group_id")


class TokenStoreError(StageError):
    """A token store that cannot be used: missing, cut short, another format version; one line naming the file."""


def store_path(root: str | Path, split: str) -> Path:
    """``<root>/<split>.tok``: the token store of a split in a tokenize artifact."""
    return Path(root) / f"{split}{SUFFIX}"


# ---- writing ----------------------------------------------------------------------------------------------------

def _dtypes() -> dict[str, str]:
    d = {"tokens": "<i4", "offsets": "<i8", **{c: "<i4" for c in INT_COLUMNS}, "margin": "<f8", "truncated": "|u1"}
    for s in STRING_COLUMNS:
        d.update({f"{s}.offsets": "<i8", f"{s}.data": "|u1", f"{s}.valid": "|u1"})
    return d


DTYPES = _dtypes()  # every array of a version-1 store, in file order


def _utf8(col: pl.Series) -> tuple[np.ndarray, np.ndarray]:
    """A string column as (offsets int64 [n+1] from 0, utf-8 bytes): Arrow's own buffers, no Python str per row."""
    import pyarrow as pa

    arr = col.cast(pl.String).fill_null("").to_arrow()
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    arr = arr.cast(pa.large_string())
    _, off_buf, data_buf = arr.buffers()
    off = np.frombuffer(off_buf, dtype=np.int64)[arr.offset:arr.offset + len(arr) + 1]
    data = np.frombuffer(data_buf, dtype=np.uint8)[off[0]:off[-1]] if data_buf is not None else np.zeros(0, np.uint8)
    return off - off[0], data


class TokenStoreWriter:
    """Streams pairs into a token store: tokens go straight to the file, the per-pair arrays to spool files beside
    it (a few bytes a pair), which `close` appends, then the footer and the tail. Memory: one batch."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.spool = self.path.with_name(self.path.name + ".spool")
        self.spool.mkdir(parents=True, exist_ok=True)
        self.f = open(self.path, "wb")
        self.f.write(HEAD_MAGIC + struct.pack("<II", VERSION, 0))
        self._pad()
        self.tokens_at = self.f.tell()
        self.n = 0
        self.n_tokens = 0
        self._spools = {name: open(self.spool / name, "wb") for name in DTYPES if name != "tokens"}
        self._ends = {"offsets": 0, **{f"{s}.offsets": 0 for s in STRING_COLUMNS}}
        for name in self._ends:  # every offsets array starts with 0
            self._put(name, np.zeros(1, dtype=np.int64))

    def _pad(self) -> None:
        pos = self.f.tell()
        if pos % ALIGN:
            self.f.write(b"\0" * (ALIGN - pos % ALIGN))

    def _put(self, name: str, arr: np.ndarray) -> None:
        self._spools[name].write(np.ascontiguousarray(arr, dtype=np.dtype(DTYPES[name])).tobytes())

    def append(self, frame: pl.DataFrame) -> None:
        """A batch of tokenized pairs with tokenize's columns (chosen_ids / rejected_ids List[Int32], ...)."""
        from worldpm.data.splits import flat_ids

        n = frame.height
        if n == 0:
            return
        c_off, c_val = flat_ids(frame["chosen_ids"])
        r_off, r_val = flat_ids(frame["rejected_ids"])
        c_len, r_len = np.diff(c_off), np.diff(r_off)
        # interleaved: pair i's chosen then its rejected, one contiguous run of tokens a pair
        seq = np.empty(2 * n, dtype=np.int64)
        seq[0::2], seq[1::2] = c_len, r_len
        ends = np.cumsum(seq)
        src_start = np.empty(2 * n, dtype=np.int64)
        src_start[0::2], src_start[1::2] = c_off[:-1], r_off[:-1] + len(c_val)
        total = int(ends[-1])
        pool = np.concatenate([c_val, r_val])
        self.f.write(pool[np.repeat(src_start - (ends - seq), seq) + np.arange(total)].astype("<i4").tobytes())
        self._put("offsets", ends + self.n_tokens)
        self.n_tokens += total
        self._put("chosen_len", c_len)
        self._put("rejected_len", r_len)
        for c in INT_COLUMNS[2:]:
            self._put(c, frame[c].cast(pl.Int32).fill_null(0).to_numpy())
        self._put("margin", frame["margin"].cast(pl.Float64).fill_null(float("nan")).to_numpy())
        self._put("truncated", frame["truncated"].fill_null(False).cast(pl.UInt8).to_numpy())
        for s in STRING_COLUMNS:
            off, data = _utf8(frame[s])
            self._put(f"{s}.offsets", off[1:] + self._ends[f"{s}.offsets"])
            self._ends[f"{s}.offsets"] += int(off[-1])
            self._put(f"{s}.data", data)
            self._put(f"{s}.valid", frame[s].is_not_null().cast(pl.UInt8).to_numpy())
        self.n += n

    def close(self, meta: dict | None = None) -> None:
        """Append the per-pair arrays, the footer and the tail; remove the spool."""
        arrays = {"tokens": [DTYPES["tokens"], self.tokens_at, self.n_tokens]}
        for name, sp in self._spools.items():
            sp.close()
            self._pad()
            at = self.f.tell()
            with open(self.spool / name, "rb") as r:
                while chunk := r.read(1 << 22):
                    self.f.write(chunk)
            arrays[name] = [DTYPES[name], at, (self.f.tell() - at) // np.dtype(DTYPES[name]).itemsize]
        footer = json.dumps({"format": "worldpm-tokstore", "version": VERSION, "pairs": self.n,
                             "tokens": self.n_tokens, "arrays": arrays, "meta": meta or {}}).encode()
        self.f.write(footer)
        self.f.write(struct.pack("<Q", len(footer)) + TAIL_MAGIC)
        self.f.close()
        self._drop_spool()

    def abort(self) -> None:
        """Close and remove what was written (a failed batch)."""
        for sp in self._spools.values():
            sp.close()
        self.f.close()
        self._drop_spool()
        self.path.unlink(missing_ok=True)

    def _drop_spool(self) -> None:
        for p in self.spool.iterdir():
            p.unlink()
        self.spool.rmdir()


# ---- reading ----------------------------------------------------------------------------------------------------

@dataclass
class PairTokens:
    """The tokens of some pairs (`read`): each side as (offsets int64 [k+1], flat int32 ids), Arrow's list layout,
    the pairs in the order asked for."""

    index: np.ndarray                       # the pairs' indices in the split
    chosen: tuple[np.ndarray, np.ndarray]
    rejected: tuple[np.ndarray, np.ndarray]

    def seq(self, side: str, j: int) -> np.ndarray:
        off, flat = self.chosen if side == "chosen" else self.rejected
        return flat[off[j]:off[j + 1]]


class Sequences:
    """Every sequence of a store, chosen sides then rejected sides (``seqs[k]``: a view of the mapping, nothing
    copied), with their ``lengths``: what a scorer of single sequences (the reference log-probs) walks."""

    def __init__(self, store: "TokenStore"):
        self.store, self.n = store, len(store)
        self.lengths = np.concatenate([store.chosen_len, store.rejected_len]).astype(np.int64)

    def __len__(self) -> int:
        return 2 * self.n

    def __getitem__(self, k: int) -> np.ndarray:
        k = int(k)
        if not 0 <= k < 2 * self.n:
            raise IndexError(k)
        return self.store.seq("rejected" if k >= self.n else "chosen", k % self.n if self.n else k)


class TokenStore:
    """A token store, memory-mapped read-only. Opening reads the head, the tail and the footer (and checks them);
    the arrays are views into the mapping, so a process reads from disk (or shares from the page cache) only the
    pages it touches. `madvise_random`: tell the kernel not to read ahead (a process that reads scattered pairs)."""

    def __init__(self, path: str | Path, madvise_random: bool = False):
        self.path = Path(path)
        if not self.path.is_file():
            raise TokenStoreError(f"{self.path}: no token store (a tokenize artifact from before the token store? "
                                  "rerun tokenize)")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(16)
            if len(head) < 16 or head[:8] != HEAD_MAGIC:
                raise TokenStoreError(f"{self.path}: not a worldpm token store (no header)")
            version = struct.unpack("<I", head[8:12])[0]
            if version != VERSION:
                raise TokenStoreError(f"{self.path}: token store format version {version}, this worldpm reads "
                                      f"version {VERSION}: rerun tokenize")
            f.seek(max(size - 16, 0))
            tail = f.read(16)
            if size < 32 or tail[8:] != TAIL_MAGIC:
                raise TokenStoreError(f"{self.path}: truncated token store ({size} bytes, no end marker): rerun "
                                      "tokenize")
            n_footer = struct.unpack("<Q", tail[:8])[0]
            if n_footer > size - 32:
                raise TokenStoreError(f"{self.path}: damaged token store (footer of {n_footer} bytes in a file of "
                                      f"{size}): rerun tokenize")
            f.seek(size - 16 - n_footer)
            try:
                self.footer = json.loads(f.read(n_footer))
            except ValueError:
                raise TokenStoreError(f"{self.path}: damaged token store (footer is not JSON): rerun tokenize") \
                    from None
        data_end = size - 16 - n_footer
        arrays = self.footer.get("arrays", {})
        missing = [k for k in DTYPES if k not in arrays]
        if missing:
            raise TokenStoreError(f"{self.path}: damaged token store (no {', '.join(missing)}): rerun tokenize")
        for name, (dtype, at, count) in arrays.items():
            if at + count * np.dtype(dtype).itemsize > data_end:
                raise TokenStoreError(f"{self.path}: damaged token store ({name} runs past the data): rerun tokenize")
        self._fd = os.open(self.path, os.O_RDONLY)
        self._mm = mmap.mmap(self._fd, 0, access=mmap.ACCESS_READ) if size else None
        if madvise_random and hasattr(self._mm, "madvise"):
            self._mm.madvise(mmap.MADV_RANDOM)
        self._arrays = {name: np.frombuffer(self._mm, dtype=np.dtype(dtype), count=count, offset=at)
                        for name, (dtype, at, count) in arrays.items()}
        self.n = int(self.footer["pairs"])
        self.meta = self.footer.get("meta", {})
        off = self._arrays["offsets"]
        if len(off) != 2 * self.n + 1 or (self.n and int(off[-1]) != len(self._arrays["tokens"])):
            raise TokenStoreError(f"{self.path}: damaged token store (offsets do not match the tokens): rerun "
                                  "tokenize")

    def __len__(self) -> int:
        return self.n

    def column(self, name: str) -> np.ndarray:
        """A per-pair array: chosen_len, rejected_len, prompt_len, chosen_response_tokens, rejected_response_tokens
        (int32), margin (float64, NaN: none), truncated (uint8); a read-only view, one number a pair."""
        if name not in INT_COLUMNS and name not in ("margin", "truncated"):
            raise KeyError(name)
        return self._arrays[name]

    chosen_len = property(lambda self: self.column("chosen_len"))
    rejected_len = property(lambda self: self.column("rejected_len"))
    prompt_len = property(lambda self: self.column("prompt_len"))
    chosen_response_tokens = property(lambda self: self.column("chosen_response_tokens"))
    rejected_response_tokens = property(lambda self: self.column("rejected_response_tokens"))
    margin = property(lambda self: self.column("margin"))
    truncated = property(lambda self: self.column("truncated"))

    @property
    def tokens(self) -> np.ndarray:
        return self._arrays["tokens"]

    @property
    def offsets(self) -> np.ndarray:
        return self._arrays["offsets"]

    def seq(self, side: str, i: int) -> np.ndarray:
        """The ids of one side of pair i: a view, nothing copied."""
        j = 2 * int(i) + (side == "rejected")
        return self.tokens[self.offsets[j]:self.offsets[j + 1]]

    def read(self, index) -> PairTokens:
        """The tokens of the pairs at `index` (in that order), gathered: only their pages are touched."""
        index = np.asarray(index, dtype=np.int64)
        if len(index) and (index.min() < 0 or index.max() >= self.n):
            raise IndexError(f"{self.path}: pair index out of range 0..{self.n - 1}")
        off = self.offsets

        def side(k: int) -> tuple[np.ndarray, np.ndarray]:
            starts = off[2 * index + k]
            lens = off[2 * index + k + 1] - starts
            new = np.zeros(len(index) + 1, dtype=np.int64)
            np.cumsum(lens, out=new[1:])
            return new, self.tokens[np.repeat(starts - new[:-1], lens) + np.arange(new[-1])]

        return PairTokens(index, side(0), side(1))

    def sequences(self) -> "Sequences":
        """The 2n token sequences as one list-like: k < n is pair k's chosen side, n + k its rejected side."""
        return Sequences(self)

    def strings(self, name: str, index=None) -> list[str | None]:
        """A string column (pair_id, source, domain, group_id) at `index` (default: every pair), decoded."""
        if name not in STRING_COLUMNS:
            raise KeyError(name)
        off, data, valid = (self._arrays[f"{name}.{k}"] for k in ("offsets", "data", "valid"))
        idx = range(self.n) if index is None else np.asarray(index, dtype=np.int64).tolist()
        return [bytes(data[off[i]:off[i + 1]]).decode() if valid[i] else None for i in idx]

    def string_series(self, name: str) -> pl.Series:
        """A whole string column (pair_id, source, domain, group_id) as a polars Series, made from the store's
        buffers (no Python str per pair): for a check over every pair (DPO's reference log-probs)."""
        import pyarrow as pa

        if name not in STRING_COLUMNS:
            raise KeyError(name)
        off, data, valid = (self._arrays[f"{name}.{k}"] for k in ("offsets", "data", "valid"))
        arr = pa.LargeStringArray.from_buffers(self.n, pa.py_buffer(off), pa.py_buffer(data))
        s = pl.Series(name, pl.from_arrow(arr), dtype=pl.String)
        return s if bool(np.all(valid)) else s.set(pl.Series(valid == 0), None)

    def to_frame(self) -> pl.DataFrame:
        """The whole split as tokenize's <split>.parquet table (tests, small splits): every pair loaded."""
        import pyarrow as pa

        IDS = pl.List(pl.Int32)  # render.IDS, not imported: the trainer's code version must not follow render.py
        every = self.read(np.arange(self.n))

        def ids(side: tuple[np.ndarray, np.ndarray]) -> pl.Series:
            return pl.Series(pl.from_arrow(pa.LargeListArray.from_arrays(pa.array(side[0]), pa.array(side[1])))) \
                .cast(IDS)

        cols = {s: pl.Series(s, self.strings(s), dtype=pl.String) for s in STRING_COLUMNS}
        margin = np.array(self.margin)
        return pl.DataFrame({
            **{s: cols[s] for s in ("pair_id", "source", "domain", "group_id")},
            "margin": pl.Series("margin", margin).fill_nan(None),
            "chosen_ids": ids(every.chosen), "rejected_ids": ids(every.rejected),
            "chosen_len": np.array(self.chosen_len), "rejected_len": np.array(self.rejected_len),
            "truncated": pl.Series(np.array(self.truncated)).cast(pl.Boolean),
            "prompt_len": np.array(self.prompt_len),
            "chosen_response_tokens": np.array(self.chosen_response_tokens),
            "rejected_response_tokens": np.array(self.rejected_response_tokens),
        })

    def close(self) -> None:
        self._arrays = {}
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:  # views still alive elsewhere: the mapping goes with them
                pass
        os.close(self._fd)
