"""What the clean filters measure on a normalised pair, computed once by the normalise stage and kept beside the
pairs (measures.parquet: one row per pair, in the order of the pairs/ files), so that a threshold change never reads
the texts again.

    n_prompt, n_chosen, n_rejected   characters (a prompt: its message contents joined by "\\n"; 0 when null/empty)
    margin                           the pair's margin (NaN and infinite are null already)
    same                             chosen and rejected are equal once lower-cased with whitespace, punctuation and
                                     symbols removed; compared only when their lengths (chars) are within
                                     IDENTICAL_LENGTH_RATIO (text-only copies differing by more are no copies)
    sim                              word-set Jaccard of chosen and rejected (words: runs of letters/digits, a CJK
                                     character is a word), for pairs that are not `same` and whose length ratio is
                                     >= SIM_FLOOR; null otherwise. A near_identical threshold t compares only pairs
                                     whose length ratio is >= t, so any t >= SIM_FLOOR finds every value it needs
                                     here; below SIM_FLOOR the clean stage computes the missing ones from the texts.
    first                            the row number of the first pair with the same (prompt, chosen, rejected):
                                     exact duplicates share it. A plain integer: the two 64-bit `pl.Expr.hash`es that
                                     find it (not stable across polars versions) are used within one run, never
                                     stored.
"""
from __future__ import annotations

import polars as pl

from worldpm.data import text

IDENTICAL_LENGTH_RATIO = 0.8
SIM_FLOOR = 0.8

MEASURES_SCHEMA: dict[str, pl.DataType] = {
    "n_prompt": pl.Int64, "n_chosen": pl.Int64, "n_rejected": pl.Int64, "margin": pl.Float64,
    "same": pl.Boolean, "sim": pl.Float64, "first": pl.UInt32,
}
_K1, _K2 = "__k1", "__k2"


def prompt_chars(prompt: pl.Expr) -> pl.Expr:
    """Characters of the message contents joined by "\\n" (0 for a null or empty prompt)."""
    n = prompt.list.eval(pl.element().struct.field("content").fill_null("").str.len_chars()).list.sum()
    return (n + (prompt.list.len() - 1).clip(0)).fill_null(0)


def length_ratio(n_a: pl.Expr, n_b: pl.Expr) -> pl.Expr:
    """min/max of two lengths (0 when one is empty)."""
    return pl.min_horizontal(n_a, n_b).cast(pl.Float64) / pl.max_horizontal(n_a, n_b).clip(1).cast(pl.Float64)


def masked(c: str, where: pl.Expr) -> pl.Expr:
    """Column c where `where` holds, "" elsewhere: the text comparisons run on candidates only (cheap elsewhere)."""
    return pl.when(where).then(pl.col(c)).otherwise(pl.lit(""))


def with_sim(lf: pl.LazyFrame, where: pl.Expr, name: str) -> pl.LazyFrame:
    """lf with column `name`: the word-set Jaccard of chosen and rejected where `where` holds, null elsewhere
    (`where` is evaluated once, into a helper column)."""
    lf = text.with_jaccard(lf.with_columns(where.alias("__where")), masked("chosen", pl.col("__where")),
                           masked("rejected", pl.col("__where")), "__jac")
    return lf.with_columns(pl.when(pl.col("__where")).then(pl.col("__jac")).otherwise(pl.lit(None, pl.Float64))
                           .alias(name)).drop("__where", "__jac")


def with_measures(pairs: pl.LazyFrame) -> pl.LazyFrame:
    """The normalised canonical pairs -> MEASURES_SCHEMA's columns (but `first`) plus the two dedupe hashes."""
    lf = pairs.with_columns(
        n_prompt=prompt_chars(pl.col("prompt")).cast(pl.Int64),
        n_chosen=pl.col("chosen").str.len_chars().fill_null(0).cast(pl.Int64),
        n_rejected=pl.col("rejected").str.len_chars().fill_null(0).cast(pl.Int64),
    )
    lf = lf.with_columns(__ratio=length_ratio(pl.col("n_chosen"), pl.col("n_rejected")))
    # canonical texts (a Unicode-class regex over both texts) only where they can be equal: lengths within
    # IDENTICAL_LENGTH_RATIO and, a literal count away, as many e/E and t/T in each (canonical_text keeps every
    # letter and lower-cases; only E lower-cases to e, only T to t)
    near = pl.col("__ratio") >= IDENTICAL_LENGTH_RATIO
    a, b = masked("chosen", near), masked("rejected", near)
    counts = [(a.str.count_matches(x, literal=True) + a.str.count_matches(x.upper(), literal=True))
              == (b.str.count_matches(x, literal=True) + b.str.count_matches(x.upper(), literal=True)) for x in "et"]
    lf = lf.with_columns(__cand_same=near & counts[0] & counts[1])
    cand_same = pl.col("__cand_same")
    lf = lf.with_columns(
        same=(text.canonical_text(masked("chosen", cand_same)) == text.canonical_text(masked("rejected", cand_same)))
        & cand_same)
    lf = with_sim(lf, (pl.col("__ratio") >= SIM_FLOOR) & ~pl.col("same"), "sim")
    keys = pl.struct("prompt", "chosen", "rejected")
    lf = lf.with_columns(**{_K1: keys.hash(seed=11), _K2: keys.hash(seed=4242)})
    return lf.select("n_prompt", "n_chosen", "n_rejected", "margin", "same", "sim", _K1, _K2)


KEYS = [_K1, _K2]


def first_rows(keys: pl.DataFrame) -> pl.Series:
    """`first` from with_measures' two hash columns (rows in order): the row number of the first row with the same
    pair of hashes. A stable sort of the hashes (numpy, 16 bytes a pair plus an 8-byte permutation), so that
    memory is what the keys take rather than a hash table of every pair."""
    import numpy as np

    k1, k2 = keys[_K1].to_numpy(), keys[_K2].to_numpy()
    n = len(k1)
    if n == 0:
        return pl.Series("first", [], dtype=pl.UInt32)
    order = np.lexsort((k2, k1))  # stable: equal keys keep their row order, so each group starts at its min row
    s1, s2 = k1[order], k2[order]
    starts = np.ones(n, dtype=bool)
    starts[1:] = (s1[1:] != s1[:-1]) | (s2[1:] != s2[:-1])
    del s1, s2
    at = np.flatnonzero(starts)
    first = np.empty(n, dtype=np.uint32)
    first[order] = np.repeat(order[at], np.diff(np.append(at, n)))
    return pl.Series("first", first, dtype=pl.UInt32)
