"""normalise: the texts of every pair normalised once (HTML/Markdown residue -> plain text, worldpm/data/text.py),
with the measures the clean filters read (worldpm/data/measures.py), so that a filter tweak reruns clean alone.

Its config is `clean.normalize_markup` (the only cleaning setting that changes a text); every threshold belongs to
the clean stage. Nothing is dropped here: rows_out == rows_in, in input order. Also here: a NaN or infinite margin
becomes null (a missing margin).

Output:
    pairs/<nnnnn>.parquet   the canonical table, normalised, PART_ROWS pairs a file (zstd, ROW_GROUP rows a row
                            group, so equal input gives byte-identical files), written one part at a time with a
                            progress line (pairs/s, ETA) after each
    measures.parquet        one row per pair in the same order: lengths, margin, `same`, `sim`, `first`
                            (worldpm/data/measures.py)
    report.json             rows, the normalisation setting, how many pairs are exact copies of an earlier one
                            (no timings: the artifact's content is a function of its input)

The work streams (polars lazy scans, the streaming engine); what is held in memory is the measures table
(about 50 bytes a pair) while the first copy of each (prompt, chosen, rejected) is found.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import polars as pl

from worldpm.config import PipelineConfig, StageConfig
from worldpm.data import measures, text
from worldpm.data.schema import CANONICAL_SCHEMA, COLUMNS
from worldpm.data.splits import pair_files
from worldpm.engine import StageSpec
from worldpm.errors import StageError
from worldpm.store import ArtifactRef

ROW_GROUP = 50_000        # fixed, so equal input gives byte-identical output (early cutoff downstream)
PART_ROWS = ROW_GROUP     # pairs a file of pairs/ (one row group), normalised in memory at once
# what this stage reads of the download artifact: the pairs, not sources.json (a hub source's resolved revision
# moves with every commit to the dataset repo, even when its data files do not) nor rejects.parquet
INPUT_FILES = {"download": ("pairs/*.parquet",)}


class NormaliseConfig(StageConfig):
    SECTION = "clean"  # its setting lives in pipeline.yaml's clean: section (status names it clean.<key>)
    normalize_markup: bool


def stage_config(cfg: PipelineConfig) -> NormaliseConfig:
    return NormaliseConfig(normalize_markup=cfg.clean.normalize_markup)


def normalised(src: pl.LazyFrame, scfg: NormaliseConfig) -> pl.LazyFrame:
    """The canonical frame with normalised prompt contents, chosen and rejected; NaN/inf margins -> null."""
    lf = src.select([pl.col(c).cast(t) for c, t in CANONICAL_SCHEMA.items()])
    margin = pl.col("margin")
    lf = lf.with_columns(margin=pl.when(margin.is_finite()).then(margin).otherwise(pl.lit(None, pl.Float64)))
    return text.normalize_pairs(lf, markup=scfg.normalize_markup).select(COLUMNS)


def _eta(done: int, total: int | None, seconds: float) -> str:
    if total is None:
        return ""
    left = seconds * (total - done) / done if done and done < total else 0.0
    return f" of {total} ({100.0 * done / max(total, 1):.0f}%), ETA " + (f"{left / 60:.1f}min" if left >= 90
                                                                         else f"{left:.0f}s")


def parts(src: pl.LazyFrame, n: int):
    """The rows of a lazy frame as in-memory frames of exactly n rows (the last one shorter), read by the streaming
    engine: part boundaries never depend on the reader's batch sizes (equal input, equal files)."""
    pending: list[pl.DataFrame] = []
    have = 0
    for batch in src.collect_batches():
        pending.append(batch)
        have += batch.height
        while have >= n:
            frame = pl.concat(pending, rechunk=True)
            yield frame.slice(0, n)
            rest = frame.slice(n)
            pending, have = ([rest] if rest.height else []), rest.height
    if pending:
        yield pl.concat(pending, rechunk=True)


def normalise_frame(src: pl.LazyFrame, scfg: NormaliseConfig, out: Path, log, rows: int | None = None) -> dict:
    """The whole stage on a canonical lazy frame (the download artifact, or any scan: the benchmark).

    The input streams through in parts of PART_ROWS pairs: each is normalised and measured in memory (one
    evaluation of each rule over the part: a streaming pass would pay each rule's fixed costs again for every
    morsel, and NDJSON or small files give morsels of a few hundred rows), written as pairs/<nnnnn>.parquet, and
    logged (pairs/s; ETA when `rows`, the input's row count, is known). Then the first copy of each pair is found
    over all the measures. Writes out/pairs/, out/measures.parquet, out/report.json; returns the report."""
    t0 = last_log = time.perf_counter()
    (out / "pairs").mkdir(parents=True, exist_ok=True)
    canonical = src.select([pl.col(c).cast(t) for c, t in CANONICAL_SCHEMA.items()])
    measured: list[pl.DataFrame] = []
    done = 0
    for i, part in enumerate(parts(canonical, PART_ROWS)):
        norm = normalised(part.lazy(), scfg).collect()
        norm.write_parquet(out / "pairs" / f"{i:05d}.parquet", compression="zstd", row_group_size=ROW_GROUP,
                           statistics=True)
        measured.append(measures.with_measures(norm.lazy()).collect())
        done += norm.height
        del norm
        now = time.perf_counter()
        if now - last_log >= 10 or (rows is not None and done >= rows):
            # the last one (all pairs read) only in the log file and the UI when the work was short: the stage's
            # summary line follows at once
            log.info("normalise: %d pairs%s in %.0fs (%.0f pairs/s)", done, _eta(done, rows, now - t0), now - t0,
                     done / max(now - t0, 1e-9), extra={"worldpm_detail": now - t0 < 10})
            last_log = now
    if not measured:  # no rows: one empty file, so that the artifact has the table's schema
        normalised(canonical.limit(0), scfg).collect().write_parquet(out / "pairs" / "00000.parquet",
                                                                       compression="zstd")
        measured.append(measures.with_measures(pl.scan_parquet(out / "pairs" / "00000.parquet")).collect())

    # the first copy of each (prompt, chosen, rejected) needs every pair's hashes at once (16 bytes a pair)
    table = measures.first_occurrence(pl.concat(measured, rechunk=True))
    del measured
    table.write_parquet(out / "measures.parquet", compression="zstd", row_group_size=ROW_GROUP * 4,
                        statistics=False)
    files = sorted((out / "pairs").glob("*.parquet"))
    rows_out = pl.scan_parquet(files).select(pl.len()).collect().item()
    if rows is not None and rows_out != rows or rows_out != table.height:
        raise StageError(f"normalise: {rows if rows is not None else '?'} pairs in, {rows_out} written, "
                         f"{table.height} measured: rows were lost")
    report = {"rows_in": rows_out, "rows_out": rows_out, "rows_rejected": 0, "files": len(files),
              "normalize_markup": scfg.normalize_markup,
              "exact_copies": int(table.height - table["first"].n_unique()) if table.height else 0}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    log.info("normalise: %d pairs normalised and measured in %.1fs (%d exact copies among them)",
             rows_out, time.perf_counter() - t0, report["exact_copies"])
    return report


def run(scfg: NormaliseConfig, inputs: dict[str, ArtifactRef], out: Path, log, work: Path) -> dict:
    files = pair_files(inputs["download"])
    if not files:
        raise StageError(f"normalise: the download artifact {inputs['download'].path} has no pairs/*.parquet")
    schema = pl.read_parquet_schema(files[0])
    missing = [c for c in COLUMNS if c not in schema]
    if missing:
        raise StageError(f"normalise: {files[0]} lacks the canonical columns {', '.join(missing)}")
    src = pl.scan_parquet(files)
    rows = src.select(pl.len()).collect().item()  # from the Parquet footers: no data read
    log.info("normalise: %d pairs in %d file(s); markup normalisation %s", rows, len(files),
             "on" if scfg.normalize_markup else "off (line endings and control characters only)")
    report = normalise_frame(src, scfg, out, log, rows=rows)
    return {k: report[k] for k in ("rows_in", "rows_out", "rows_rejected")}


STAGE = StageSpec(config=stage_config, run=run, input_files=INPUT_FILES)
