"""The token store (worldpm/data/tokstore.py) that tokenize writes beside each <split>.parquet: the same pairs, read
back through a memory map; random access by pair index; a process reading its own pairs sees only those (and
touches only their pages); a store cut short or of another format version fails with one line naming it."""
from __future__ import annotations

import logging
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from tasks import PIPELINE as pipeline
from worldpm.config import load_config
from worldpm.data.sources import read_source_file
from worldpm.data.splits import SPLITS, read_split
from worldpm.data.tokstore import TokenStore, TokenStoreError, TokenStoreWriter, store_path
from worldpm.store import ArtifactStore

LOG = logging.getLogger("test")


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory, se_paired):
    """The shared stack-exchange-paired sample (1,396 pairs) through shard and tokenize (max_length 128, so that
    many pairs are cut)."""
    store = ArtifactStore(tmp_path_factory.mktemp("tokstore") / "store")
    pairs = pl.concat([read_source_file(p, "stack_exchange_paired").pairs.collect()
                       for p in sorted(se_paired.rglob("*.parquet"))])
    tmp = store.new_tmp("clean", "fixture")
    pairs.write_parquet(tmp / "pairs.parquet")
    clean = store.commit("clean", "fixture", tmp, {"rows_out": pairs.height})
    cfg = load_config(None, ["tokenize.max_length=128", "tokenize.batch_size=100"])
    shard = pipeline.execute("shard", cfg, {"clean": clean}, store, log=LOG).ref
    return pipeline.execute("tokenize", cfg, {"shard": shard}, store, log=LOG)


def test_the_store_holds_exactly_the_parquet_split(tokenized):
    assert tokenized.manifest["token_store"]["files"] == {s: f"{s}.tok" for s in SPLITS}
    total = 0
    for split in SPLITS:
        want = read_split(tokenized.ref, split)
        s = TokenStore(store_path(tokenized.path, split))
        assert len(s) == want.height and s.meta["split"] == split
        got = s.to_frame()
        assert got.schema == want.schema
        assert got.equals(want), split
        total += len(s)
        # the per-pair arrays are views of the mapping, equal to the columns
        assert np.array_equal(s.chosen_len, want["chosen_len"].to_numpy())
        assert np.array_equal(s.rejected_response_tokens, want["rejected_response_tokens"].to_numpy())
        assert not s.chosen_len.flags.writeable
        s.close()
    assert total == 1396
    assert any(read_split(tokenized.ref, s)["truncated"].any() for s in SPLITS)


def test_random_access_by_pair_index(tokenized):
    want = read_split(tokenized.ref, "train")
    s = TokenStore(store_path(tokenized.path, "train"))
    idx = np.random.default_rng(0).permutation(len(s))[:200]
    batch = s.read(idx)
    for j, i in enumerate(idx.tolist()):
        assert batch.seq("chosen", j).tolist() == want["chosen_ids"][i].to_list()
        assert batch.seq("rejected", j).tolist() == want["rejected_ids"][i].to_list()
        assert s.seq("rejected", i).tolist() == want["rejected_ids"][i].to_list()
    assert s.strings("pair_id", idx[:5]) == want["pair_id"].gather(idx[:5]).to_list()
    with pytest.raises(IndexError):
        s.read([len(s)])


def test_two_processes_see_disjoint_pairs_that_cover_the_split(tokenized):
    """Two readers of one mapped split, each given its own pairs (every other pair, as a sampler deals them out),
    see disjoint pairs whose union is the split, with the tokens of the Parquet split."""
    path = store_path(tokenized.path, "train")
    want = read_split(tokenized.ref, "train")
    n = want.height
    seen: list[str] = []
    for rank in range(2):
        reader = TokenStore(path)  # each process maps the file itself
        mine = np.arange(n)[rank::2]
        batch = reader.read(mine)
        ids = reader.strings("pair_id", mine)
        assert ids == want["pair_id"].gather(mine).to_list()
        assert [batch.seq("chosen", j).tolist() for j in range(len(mine))] == \
            want["chosen_ids"].gather(mine).to_list()
        seen += ids
        reader.close()
    assert len(seen) == len(set(seen)) == n and set(seen) == set(want["pair_id"].to_list())


def _mapped_kb(path: Path) -> int:
    """Resident kB of this process's mappings of `path` (/proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            inside = line.rstrip().endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


def test_a_reader_touches_only_the_pages_of_the_pairs_it_reads(tmp_path):
    """20,000 synthetic pairs of 200 tokens a side (32 MB of tokens): reading 500 of them (800 kB) maps a small part
    of the file. (The kernel maps the page cache in folios of up to 2 MB, so the bounds leave room for a few.)"""
    n, length = 20_000, 200
    rng = np.random.default_rng(1)
    frame = pl.DataFrame({
        "pair_id": [f"p{i}" for i in range(n)], "source": "s", "domain": None, "group_id": "g",
        "margin": rng.normal(size=n),
        "chosen_ids": pl.Series(rng.integers(0, 30_000, (n, length), dtype=np.int32).tolist(), dtype=pl.List(pl.Int32)),
        "rejected_ids": pl.Series(rng.integers(0, 30_000, (n, length), dtype=np.int32).tolist(),
                                  dtype=pl.List(pl.Int32)),
        "chosen_len": length, "rejected_len": length, "truncated": False, "prompt_len": 10,
        "chosen_response_tokens": length, "rejected_response_tokens": length,
    }, schema_overrides={"domain": pl.String, "chosen_len": pl.Int32, "rejected_len": pl.Int32,
                         "prompt_len": pl.Int32, "chosen_response_tokens": pl.Int32,
                         "rejected_response_tokens": pl.Int32})
    path = tmp_path / "train.tok"
    w = TokenStoreWriter(path)
    for part in frame.iter_slices(5000):
        w.append(part)
    w.close()
    size_kb = path.stat().st_size // 1024
    s = TokenStore(path, madvise_random=True)
    assert _mapped_kb(path) < 0.15 * size_kb  # opening reads the footer only
    mine = np.arange(1000, 1500)
    batch = s.read(mine)
    assert batch.seq("chosen", 0).tolist() == frame["chosen_ids"][1000].to_list()
    assert _mapped_kb(path) < 0.4 * size_kb, (_mapped_kb(path), size_kb)


@pytest.mark.parametrize("cut", ["half", "footer", "last_byte", "empty"])
def test_a_truncated_store_fails_with_one_line_naming_it(tokenized, tmp_path, cut):
    src = store_path(tokenized.path, "train")
    data = src.read_bytes()
    n_footer = struct.unpack("<Q", data[-16:-8])[0]
    keep = {"half": len(data) // 2, "footer": len(data) - 16 - n_footer // 2, "last_byte": len(data) - 1,
            "empty": 0}[cut]
    bad = tmp_path / "train.tok"
    bad.write_bytes(data[:keep])
    with pytest.raises(TokenStoreError) as e:
        TokenStore(bad)
    msg = str(e.value)
    assert "\n" not in msg and str(bad) in msg
    assert ("truncated" in msg or "not a worldpm token store" in msg), msg


def test_an_older_format_version_fails_with_one_line_naming_it(tokenized, tmp_path):
    bad = tmp_path / "test.tok"
    shutil.copyfile(store_path(tokenized.path, "test"), bad)
    with open(bad, "r+b") as f:
        f.seek(8)
        f.write(struct.pack("<I", 0))
    with pytest.raises(TokenStoreError) as e:
        TokenStore(bad)
    msg = str(e.value)
    assert "\n" not in msg and str(bad) in msg and "format version 0" in msg and "rerun tokenize" in msg
    with pytest.raises(TokenStoreError, match="no token store"):
        TokenStore(tmp_path / "eval.tok")
    (tmp_path / "x.tok").write_bytes(b"PAR1" + b"\0" * 100)
    with pytest.raises(TokenStoreError, match="not a worldpm token store"):
        TokenStore(tmp_path / "x.tok")


def test_an_empty_split_gives_an_empty_store(tmp_path):
    w = TokenStoreWriter(tmp_path / "eval.tok")
    w.close({"split": "eval"})
    s = TokenStore(tmp_path / "eval.tok")
    assert len(s) == 0 and s.read([]).chosen[0].tolist() == [0] and s.to_frame().height == 0
