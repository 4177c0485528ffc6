"""Source adapters: a file in any supported format -> the canonical pair table (schema.py) + rejects.

    read_source_file(path, fmt="auto", tag=..., max_pairs_per_question=10) -> AdapterResult

The format is detected from the columns (adapters.SIGNATURES) or named. Records that cannot become a pair are
returned as rejects with a reason (and the file and line where there is one), never dropped silently:
records == (records that gave at least one pair) + (records rejected).
"""
from __future__ import annotations

import contextlib
import glob
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import polars as pl

from worldpm.data.schema import CANONICAL_SCHEMA, COLUMNS
from worldpm.data.sources import adapters
from worldpm.data.sources.common import REJECTS_SCHEMA, AdapterError, Ctx, Finished, finish
from worldpm.data.sources.readers import container_of, read_raw

__all__ = ["AdapterError", "AdapterResult", "read_source_file", "CANONICAL_SCHEMA", "COLUMNS", "REJECTS_SCHEMA",
           "is_data_file", "FORMATS", "local_files", "read_root", "check_read_root"]

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


def local_files(path: str) -> list[Path]:
    """The data files of a local source, sorted: a file, a directory (recursive) or a glob; each one checked
    against the read root (`read_root`), resolved: a glob or a folder can reach through a symlink."""
    p = Path(path)
    if p.is_file():
        files = [p]
    elif p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and is_data_file(f))
        if not files:
            raise AdapterError(f"no data files (.jsonl[.gz], .json, .parquet, .csv, Posts.xml) under {p}")
    else:
        files = sorted(Path(m) for m in glob.glob(path, recursive=True) if Path(m).is_file())
        if not files:
            raise AdapterError(f"{path}: no such file, directory or glob match")
    for f in files:
        check_read_root(f, path)
    return files


# ---- where a run may read: a deployment run reads inside its project only (flows/policy.py sets it) ---------------
READ_ROOT_ENV = "WORLDPM_READ_ROOT"


@contextlib.contextmanager
def read_root(roots: list[str | Path] | None) -> Iterator[None]:
    """Within: every data file read (`read_source_file`, `local_files`) must resolve to a path inside one of
    `roots` (a folder, or a file allowed by name). An environment variable, so every thread of the process (Prefect's
    task runs) sees it; None: no limit."""
    old = os.environ.get(READ_ROOT_ENV)
    if roots is None:
        os.environ.pop(READ_ROOT_ENV, None)
    else:
        os.environ[READ_ROOT_ENV] = os.pathsep.join(str(Path(r).resolve()) for r in roots)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(READ_ROOT_ENV, None)
        else:
            os.environ[READ_ROOT_ENV] = old


def outside_read_root(path: str | Path, roots: list[Path]) -> Path | None:
    """`path` resolved (symlinks followed) when that is inside none of `roots`, else None."""
    real = Path(path).resolve()
    return None if any(real.is_relative_to(r) for r in roots) else real


def check_read_root(path: str | Path, given: str | Path | None = None) -> None:
    """AdapterError unless `path`, resolved, is inside the read root (when one is set)."""
    env = os.environ.get(READ_ROOT_ENV)
    if not env:
        return
    roots = [Path(r) for r in env.split(os.pathsep)]
    real = outside_read_root(path, roots)
    if real is not None:
        via = f" (from {given})" if given is not None and str(given) != str(path) else ""
        raise AdapterError(f"{path}{via} resolves to {real}, outside {roots[0]}: this run may read only files inside "
                           "it (a deployment run reads inside its project)")


def read_source_file(path: str | Path, fmt: str = "auto", tag: str | None = None, *, max_pairs_per_question: int = 10,
                     work: Path | None = None, log=None) -> AdapterResult:
    """One file -> AdapterResult. Raises AdapterError (one line naming the file) when the file cannot be used at
    all: missing, empty, an unknown shape (the columns found and the formats known), columns a named format needs.
    ``work``: a scratch folder for intermediate files (the stage's work dir); a temp dir when None."""
    path = Path(path)
    if not path.is_file():
        raise AdapterError(f"{path}: no such file")
    check_read_root(path)
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
