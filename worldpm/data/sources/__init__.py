"""Source adapters: a file in any supported format -> the canonical pair table (schema.py) + rejects.

    read_source_file(path, fmt="auto", tag=..., max_pairs_per_question=10) -> AdapterResult

The format is detected from the columns (adapters.SIGNATURES) or named. Records that cannot become a pair are
returned as rejects with a reason (and the file and line where there is one), never dropped silently:
records == (records that gave at least one pair) + (records rejected).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import polars as pl

from worldpm.data.schema import CANONICAL_SCHEMA, COLUMNS
from worldpm.data.sources import adapters
from worldpm.data.sources.common import REJECTS_SCHEMA, AdapterError, Ctx, Finished, finish
from worldpm.data.sources.readers import container_of, read_raw

__all__ = ["AdapterError", "AdapterResult", "read_source_file", "CANONICAL_SCHEMA", "COLUMNS", "REJECTS_SCHEMA",
           "is_data_file", "FORMATS"]

FORMATS = (*adapters.ADAPTERS, "stackexchange_posts_xml")


@dataclass
class AdapterResult:
    pairs: pl.LazyFrame         # canonical schema
    rejects: pl.LazyFrame       # common.REJECTS_SCHEMA: one row per rejected record
    format: str
    records: int                # records read from the file (questions for the StackExchange answer formats)
    stats: dict                 # what the reader and adapter know without computing the pairs
    pair_records: pl.LazyFrame | None = None  # 1 x 1 (`n`): records that gave a pair, where a record
    #                                           gives several (else: one pair each, count the pairs)
    lazy_stats: pl.LazyFrame | None = None    # 1 row of counts computed with the pairs (answers left out, ...)

    def frames(self) -> list[pl.LazyFrame]:
        """The lazy outputs besides pairs and rejects, to be collected together with them (pl.collect_all)."""
        return [f for f in (self.pair_records, self.lazy_stats) if f is not None]


def is_data_file(path: Path) -> bool:
    return container_of(path) is not None


def read_source_file(path: str | Path, fmt: str = "auto", tag: str | None = None, *, max_pairs_per_question: int = 10,
                     work: Path | None = None, log=None) -> AdapterResult:
    """One file -> AdapterResult. Raises AdapterError (one line naming the file) when the file cannot be used at
    all: missing, empty, an unknown shape (the columns found and the formats known), columns a named format needs.
    ``work``: a scratch folder for intermediate files (the stage's work dir); a temp dir when None."""
    path = Path(path)
    if not path.is_file():
        raise AdapterError(f"{path}: no such file")
    ctx = Ctx(path=path, tag=tag or path.stem, max_pairs_per_question=max_pairs_per_question, work=work, log=log)
    if container_of(path) == "xml" or fmt == "stackexchange_posts_xml":
        if container_of(path) != "xml":
            raise AdapterError(f"{path}: format stackexchange_posts_xml needs a Posts.xml file")
        staged, reader_rejects, records = adapters.read_posts_xml(path, ctx)
        done = finish(staged, ["qid", "title"], ctx, per_record=True)
        return _result(done, reader_rejects, "stackexchange_posts_xml", records, ctx)
    raw = read_raw(path, ctx.tag, work)
    schema = raw.lf.collect_schema()
    if fmt == "auto":
        fmt = adapters.detect_format(schema, path)
    elif fmt not in adapters.ADAPTERS:
        raise AdapterError(f"{path}: unknown format {fmt!r}; known: {', '.join(adapters.ADAPTERS)}")
    adapters.check_columns(fmt, schema, path)
    staged = adapters.ADAPTERS[fmt](raw.lf, schema, ctx)
    done = finish(staged, list(schema.names()), ctx, per_record=fmt in adapters.PER_ANSWER)
    ctx.stats["container"] = raw.container
    return _result(done, raw.rejects, fmt, raw.records, ctx)


def _result(done: Finished, reader_rejects: pl.DataFrame, fmt: str, records: int, ctx: Ctx) -> AdapterResult:
    lazy_stats = pl.concat(ctx.lazy_stats, how="horizontal") if ctx.lazy_stats else None
    return AdapterResult(done.pairs, pl.concat([reader_rejects.lazy(), done.rejects]), fmt, records, ctx.stats,
                         done.pair_records, lazy_stats)
