"""clean: normalise the texts and apply the named filter rules, streaming, with every dropped row kept.

Rules, in the fixed order that attributes a row to a reason (the first rule that matches names it):
    empty_prompt / empty_chosen / empty_rejected   null or empty after normalisation (a prompt is empty when
                                                    all its message contents are)
    <field>.min_chars, <field>.max_chars           length in characters, field = prompt | chosen | rejected
    <field>.min_tokens, <field>.max_tokens         approximate tokens = ceil(chars / clean.chars_per_token);
                                                    a prompt's text is its message contents joined by "\\n"
    missing_margin                                  no margin (null, NaN or infinite), when missing_margin=drop
    min_margin                                      a finite margin < clean.min_margin
    identical                                       chosen and rejected are equal once lower-cased with
                                                    whitespace, punctuation and symbols removed (compared only
                                                    when their lengths are within IDENTICAL_LENGTH_RATIO = 0.8)
    near_identical                                  not identical, lengths (chars) within a factor t and the
                                                    word-set Jaccard >= t, t = clean.near_identical (None: off);
                                                    words = runs of letters/digits, a CJK character is a word
    duplicate                                       the same normalised (prompt, chosen, rejected) as an earlier
                                                    surviving row: the first occurrence in input order is kept
A NaN or infinite margin is a missing margin: it is written as null, never as NaN.

The work is two streaming passes over polars lazy frames, never the whole table in memory:
  1. scan -> normalise (text.normalize_columns) -> reason/detail of every rule but `duplicate` -> two 64-bit
     hashes of the normalised (prompt, chosen, rejected) -> a scratch Parquet file in the stage's work dir
     (lz4: cheap to write and read back).
  2. only (hashes, reason) of the scratch file are collected (17 bytes a row): `is_first_distinct` over the
     hashes of the surviving rows gives the duplicates; the scratch file is streamed again, the duplicate
     flags joined on the row number, into pairs.parquet and rejects.parquet (zstd, fixed row groups, so equal
     input gives byte-identical files: early cutoff downstream).
The dedupe hashes are `pl.Expr.hash` with two seeds: used within one run only, never stored.
rows_in == rows_out + rows_rejected is checked against the files written.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import polars as pl

from worldpm.config import PipelineConfig
from worldpm.data import text
from worldpm.data.schema import CANONICAL_SCHEMA, COLUMNS
from worldpm.data.splits import pair_files
from worldpm.errors import StageError
from worldpm.store import ArtifactRef

FIELDS = ("prompt", "chosen", "rejected")
ROW_GROUP = 50_000  # fixed, so equal input gives byte-identical output (early cutoff downstream)
REJECT_COLUMNS = [*COLUMNS, "reason", "detail"]
_IDX, _K1, _K2 = "__row", "__k1", "__k2"
# `identical` looks only at pairs whose lengths (chars) are within this factor: canonical equality of texts whose
# lengths differ by more is a pair that differs in whitespace/punctuation alone by over 20%, which is no copy
IDENTICAL_LENGTH_RATIO = 0.8


def stage_config(cfg: PipelineConfig) -> dict:
    return cfg.clean.model_dump(mode="json")


def rule_order(scfg: dict) -> list[str]:
    """Every rule name, in attribution order (the report's rules and rejected_by_rule follow it)."""
    rules = [f"empty_{f}" for f in FIELDS]
    rules += [f"{f}.{k}" for f in FIELDS for k in ("min_chars", "max_chars", "min_tokens", "max_tokens")]
    return rules + ["missing_margin", "min_margin", "identical", "near_identical", "duplicate"]


def rule_settings(scfg: dict) -> dict:
    """{rule: its setting} for report.json (None: the rule is off)."""
    out: dict = {f"empty_{f}": True for f in FIELDS}
    for f in FIELDS:
        for k in ("min_chars", "max_chars", "min_tokens", "max_tokens"):
            out[f"{f}.{k}"] = scfg[f][k]
    out.update(missing_margin=scfg["missing_margin"], min_margin=scfg["min_margin"], identical=True,
               near_identical=scfg["near_identical"], duplicate=scfg["dedupe"],
               normalize_markup=scfg["normalize_markup"], chars_per_token=scfg["chars_per_token"])
    return out


def normalised(lf: pl.LazyFrame, scfg: dict) -> pl.LazyFrame:
    """The canonical frame with normalised prompt contents, chosen and rejected; NaN/inf margins -> null."""
    margin = pl.col("margin")
    lf = lf.with_columns(margin=pl.when(margin.is_finite()).then(margin).otherwise(pl.lit(None, pl.Float64)))
    if scfg["normalize_markup"]:
        return text.normalize_columns(lf, ["chosen", "rejected"], prompt="prompt")
    content = pl.element().struct.field("content")
    return lf.with_columns(
        prompt=pl.col("prompt").list.eval(pl.struct(role=pl.element().struct.field("role"),
                                                    content=text.light_text(content))),
        chosen=text.light_text(pl.col("chosen")),
        rejected=text.light_text(pl.col("rejected")),
    )


def _prompt_chars(prompt: pl.Expr) -> pl.Expr:
    """Characters of the message contents joined by "\\n" (0 for a null or empty prompt)."""
    n = prompt.list.eval(pl.element().struct.field("content").fill_null("").str.len_chars()).list.sum()
    return (n + (prompt.list.len() - 1).clip(0)).fill_null(0)


def judged(lf: pl.LazyFrame, scfg: dict) -> pl.LazyFrame:
    """Adds `reason` and `detail` (null when the row survives) for every rule but `duplicate`.

    Built as successive with_columns steps over helper columns, so that each measure (lengths, canonical texts,
    similarities) is computed once: a single nested when/then expression would recompute them per reference."""
    cpt = float(scfg["chars_per_token"])
    t = scfg["near_identical"]
    lf = lf.with_columns(
        __n_prompt=_prompt_chars(pl.col("prompt")),
        __n_chosen=pl.col("chosen").str.len_chars().fill_null(0),
        __n_rejected=pl.col("rejected").str.len_chars().fill_null(0),
    )
    na, nb = pl.col("__n_chosen"), pl.col("__n_rejected")
    ratio = pl.min_horizontal(na, nb).cast(pl.Float64) / pl.max_horizontal(na, nb).clip(1).cast(pl.Float64)
    lf = lf.with_columns(__ratio=ratio)
    # the text comparisons run on candidates only (the others get empty strings: cheap), see the module doc
    cand_same = pl.col("__ratio") >= IDENTICAL_LENGTH_RATIO
    cand_near = pl.col("__ratio") >= (t if t is not None else 2.0)
    masked = lambda c, m: pl.when(m).then(pl.col(c)).otherwise(pl.lit(""))  # noqa: E731
    lf = lf.with_columns(
        __same=(text.canonical_text(masked("chosen", cand_same)) == text.canonical_text(masked("rejected", cand_same)))
        & cand_same,
    )
    if t is not None:
        lf = lf.with_columns(__sim=pl.when(cand_near & ~pl.col("__same")).then(
            text.jaccard(masked("chosen", cand_near & ~pl.col("__same")),
                         masked("rejected", cand_near & ~pl.col("__same")))).otherwise(pl.lit(None, pl.Float64)))

    checks: list[tuple[str, pl.Expr, pl.Expr]] = []
    for f in FIELDS:
        checks.append((f"empty_{f}", pl.col(f"__n_{f}") == 0, pl.lit(f"{f} is null or empty after normalisation")))
    for f in FIELDS:
        lim = scfg[f]
        n = pl.col(f"__n_{f}")
        toks = (n.cast(pl.Float64) / cpt).ceil().cast(pl.Int64)
        for k, measure, unit in (("min_chars", n, "chars"), ("max_chars", n, "chars"),
                                 ("min_tokens", toks, "approx. tokens"), ("max_tokens", toks, "approx. tokens")):
            val = lim[k]
            if val is None or (k.startswith("min") and val == 0):
                continue
            lower = k.startswith("min")
            hit = measure < val if lower else measure > val
            checks.append((f"{f}.{k}", hit,
                           pl.format(f"{f}: {{}} {unit} {'<' if lower else '>'} {val}", measure)))
    margin = pl.col("margin")  # NaN/inf already null (normalised)
    if scfg["missing_margin"] == "drop":
        checks.append(("missing_margin", margin.is_null(), pl.lit("no margin (null, NaN or infinite)")))
    if scfg["min_margin"] is not None:
        checks.append(("min_margin", margin < scfg["min_margin"],
                       pl.format(f"margin {{}} < {scfg['min_margin']}", margin)))
    checks.append(("identical", pl.col("__same"),
                   pl.lit("chosen and rejected are the same text (ignoring case, whitespace and punctuation)")))
    if t is not None:
        checks.append(("near_identical", pl.col("__sim") >= t,
                       pl.format(f"word-set Jaccard {{}} >= {t}", pl.col("__sim").round(3))))
    lf = lf.with_columns([hit.fill_null(False).alias(f"__hit{i}") for i, (_, hit, _) in enumerate(checks)])
    # the first rule in the fixed order that hits names the reason
    reason = pl.coalesce([pl.when(pl.col(f"__hit{i}")).then(pl.lit(name)) for i, (name, _, _) in enumerate(checks)])
    detail = pl.coalesce([pl.when(pl.col(f"__hit{i}")).then(why) for i, (_, _, why) in enumerate(checks)])
    helpers = [f"__hit{i}" for i in range(len(checks))] + ["__n_prompt", "__n_chosen", "__n_rejected", "__ratio",
                                                          "__same"] + (["__sim"] if t is not None else [])
    return lf.with_columns(reason.cast(pl.String).alias("reason"), detail.cast(pl.String).alias("detail")) \
        .drop(helpers)


def _progress(log, what: str, t0: float, rows: int) -> None:
    dt = time.perf_counter() - t0
    log.info("clean: %s: %d rows in %.1fs (%.0f rows/s)", what, rows, dt, rows / max(dt, 1e-9))


def clean_frame(src: pl.LazyFrame, scfg: dict, out: Path, work: Path, log) -> dict:
    """The whole stage on a canonical lazy frame (the download artifact, or any scan: the benchmark).

    Writes out/pairs.parquet, out/rejects.parquet, out/report.json; returns the report."""
    t0 = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    scratch = work / "normalised.parquet"
    src = src.select([pl.col(c).cast(t) for c, t in CANONICAL_SCHEMA.items()])
    keys = pl.struct("prompt", "chosen", "rejected")
    staged = judged(normalised(src, scfg), scfg).with_columns(
        pl.when(pl.col("reason").is_null()).then(keys.hash(seed=11)).alias(_K1),
        pl.when(pl.col("reason").is_null()).then(keys.hash(seed=4242)).alias(_K2),
    )
    # pass 1: normalise and judge, streamed to a scratch file (lz4, large row groups: fast both ways)
    staged.sink_parquet(scratch, compression="lz4", row_group_size=ROW_GROUP, statistics=False, engine="streaming")
    verdict = pl.scan_parquet(scratch).select("reason", _K1, _K2).collect(engine="streaming")
    rows_in = verdict.height
    _progress(log, "normalised and judged", t0, rows_in)

    # duplicates: the first surviving occurrence of each (prompt, chosen, rejected) is kept
    counts = dict(verdict.filter(pl.col("reason").is_not_null()).group_by("reason").len().rows())
    dup_rows = pl.Series(_IDX, [], dtype=pl.UInt32)
    if scfg["dedupe"]:
        alive = verdict.with_row_index(_IDX).filter(pl.col("reason").is_null())
        dup_rows = alive.filter(~pl.struct(_K1, _K2).is_first_distinct())[_IDX]
        if dup_rows.len():
            counts["duplicate"] = dup_rows.len()
    del verdict
    dups = pl.DataFrame({_IDX: dup_rows, "__dup": pl.Series([True] * dup_rows.len(), dtype=pl.Boolean)}).lazy()

    # pass 2: the scratch file again, the duplicate flags joined on the row number, into the two outputs
    final = (pl.scan_parquet(scratch).with_row_index(_IDX)
             .join(dups, on=_IDX, how="left", maintain_order="left")
             .with_columns(
                 reason=pl.when(pl.col("__dup")).then(pl.lit("duplicate")).otherwise(pl.col("reason")),
                 detail=pl.when(pl.col("__dup")).then(pl.lit("the same prompt, chosen and rejected as an earlier "
                                                              "pair")).otherwise(pl.col("detail"))))
    kept = final.filter(pl.col("reason").is_null()).select(COLUMNS)
    rejected = final.filter(pl.col("reason").is_not_null()).select(REJECT_COLUMNS)
    opts = dict(compression="zstd", row_group_size=ROW_GROUP, statistics=True, lazy=True)
    pl.collect_all([kept.sink_parquet(out / "pairs.parquet", **opts),
                    rejected.sink_parquet(out / "rejects.parquet", **opts)], engine="streaming")
    scratch.unlink()

    rows_out = pl.scan_parquet(out / "pairs.parquet").select(pl.len()).collect().item()
    rows_rejected = pl.scan_parquet(out / "rejects.parquet").select(pl.len()).collect().item()
    rejected_by_rule = {r: counts[r] for r in rule_order(scfg) if counts.get(r)}
    if rows_in != rows_out + rows_rejected or rows_rejected != sum(rejected_by_rule.values()):
        raise StageError(f"clean: {rows_in} pairs in, {rows_out} kept + {rows_rejected} rejected written "
                         f"({rejected_by_rule}): rows were lost")
    report = {"rows_in": rows_in, "rows_out": rows_out, "rows_rejected": rows_rejected,
              "rejected_by_rule": rejected_by_rule, "rules": rule_settings(scfg), "rule_order": rule_order(scfg)}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    for r, n in rejected_by_rule.items():
        log.info("clean: %-20s %9d rejected", r, n)
    log.info("clean: kept %d of %d pairs (%.1f%%) in %.1fs", rows_out, rows_in,
             100.0 * rows_out / max(rows_in, 1), time.perf_counter() - t0)
    return report


def run(scfg: dict, inputs: dict[str, ArtifactRef], out: Path, log, work: Path) -> dict:
    files = pair_files(inputs["download"])
    if not files:
        raise StageError(f"clean: the download artifact {inputs['download'].path} has no pairs/*.parquet")
    schema = pl.read_parquet_schema(files[0])
    missing = [c for c in COLUMNS if c not in schema]
    if missing:
        raise StageError(f"clean: {files[0]} lacks the canonical columns {', '.join(missing)}")
    log.info("clean: %d file(s); rules in order: %s", len(files), ", ".join(rule_order(scfg)))
    report = clean_frame(pl.scan_parquet(files), scfg, out, work, log)
    if report["rows_in"] and report["rows_out"] == 0:
        raise StageError(f"clean: every pair was rejected ({report['rejected_by_rule']}); loosen the clean rules")
    return {k: report[k] for k in ("rows_in", "rows_out", "rows_rejected", "rejected_by_rule")}

