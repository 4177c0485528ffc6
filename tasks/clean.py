"""clean: the named filter rules over the normalised pairs (the normalise stage), with every dropped row kept.

The texts were normalised, and everything the rules measure on them was computed, by the normalise stage
(worldpm/data/measures.py): a threshold change reruns this stage alone, which reads the small measures table to
judge every row and then streams the normalised pairs once into the two outputs.

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

Two passes, neither holding the pairs in memory:
  1. the measures table (lengths, margin, `same`, `sim`, `first`) -> reason/detail of every rule; `duplicate`:
     `is_first_distinct` over `first` among the surviving rows. Only (reason, detail, first) are collected.
     (A near_identical threshold below measures.SIM_FLOOR also reads the texts of the few pairs it needs.)
  2. the normalised pairs streamed once, the reasons of the rejected rows joined on the row number, into
     pairs.parquet and rejects.parquet (zstd, fixed row groups, so equal input gives byte-identical files: early
     cutoff downstream).
rows_in == rows_out + rows_rejected is checked against the files written.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import polars as pl

from worldpm.config import CleanRules, PipelineConfig, StageConfig
from worldpm.data import measures
from worldpm.data.measures import IDENTICAL_LENGTH_RATIO, SIM_FLOOR  # noqa: F401 (named in the rules above)
from worldpm.data.schema import COLUMNS
from worldpm.data.splits import pair_files
from worldpm.engine import StageSpec
from worldpm.errors import StageError
from worldpm.store import ArtifactRef

# what this stage reads of the normalise artifact: not its report.json
INPUT_FILES = {"normalise": ("pairs/*.parquet", "measures.parquet")}
FIELDS = ("prompt", "chosen", "rejected")
ROW_GROUP = 50_000  # fixed, so equal input gives byte-identical output (early cutoff downstream)
REJECT_COLUMNS = [*COLUMNS, "reason", "detail"]
DUPLICATE_DETAIL = "the same prompt, chosen and rejected as an earlier pair"
_IDX = "__row"


class CleanStageConfig(StageConfig):
    clean: CleanRules  # every clean: setting but normalize_markup, which belongs to the normalise stage


def stage_config(cfg: PipelineConfig) -> CleanStageConfig:
    return CleanStageConfig(clean=cfg.clean.rules())


def rule_order(rules: CleanRules) -> list[str]:
    """Every rule name, in attribution order (the report's rules and rejected_by_rule follow it)."""
    names = [f"empty_{f}" for f in FIELDS]
    names += [f"{f}.{k}" for f in FIELDS for k in ("min_chars", "max_chars", "min_tokens", "max_tokens")]
    return names + ["missing_margin", "min_margin", "identical", "near_identical", "duplicate"]


def rule_settings(rules: CleanRules, normalize_markup: bool | None = None) -> dict:
    """{rule: its setting} for report.json (None: the rule is off); normalize_markup: the normalise stage's."""
    out: dict = {f"empty_{f}": True for f in FIELDS}
    for f in FIELDS:
        for k in ("min_chars", "max_chars", "min_tokens", "max_tokens"):
            out[f"{f}.{k}"] = getattr(getattr(rules, f), k)
    out.update(missing_margin=rules.missing_margin, min_margin=rules.min_margin, identical=True,
               near_identical=rules.near_identical, duplicate=rules.dedupe,
               normalize_markup=normalize_markup, chars_per_token=rules.chars_per_token)
    return out


def judged(lf: pl.LazyFrame, rules: CleanRules) -> pl.LazyFrame:
    """The measures table (worldpm/data/measures.py; with chosen/rejected when near_identical < SIM_FLOOR) ->
    `reason` and `detail` (null when the row survives) of every rule but `duplicate`, and `first`.

    Built as successive with_columns steps over helper columns, so that each measure is computed once: a single
    nested when/then expression would recompute them per reference."""
    cpt = float(rules.chars_per_token)
    t = rules.near_identical
    lf = lf.with_columns(__ratio=measures.length_ratio(pl.col("n_chosen"), pl.col("n_rejected")))
    if t is not None:
        cand = (pl.col("__ratio") >= t) & ~pl.col("same")
        sim = pl.col("sim")
        if t < SIM_FLOOR:  # the pairs with t <= length ratio < SIM_FLOOR were not measured: read their texts
            lf = measures.with_sim(lf, cand & (pl.col("__ratio") < SIM_FLOOR), "__low")
            sim = pl.coalesce(sim, pl.col("__low"))
        lf = lf.with_columns(__sim=pl.when(cand).then(sim).otherwise(pl.lit(None, pl.Float64)))

    checks: list[tuple[str, pl.Expr, pl.Expr]] = []
    for f in FIELDS:
        checks.append((f"empty_{f}", pl.col(f"n_{f}") == 0, pl.lit(f"{f} is null or empty after normalisation")))
    for f in FIELDS:
        lim = getattr(rules, f)
        n = pl.col(f"n_{f}")
        toks = (n.cast(pl.Float64) / cpt).ceil().cast(pl.Int64)
        for k, measure, unit in (("min_chars", n, "chars"), ("max_chars", n, "chars"),
                                 ("min_tokens", toks, "approx. tokens"), ("max_tokens", toks, "approx. tokens")):
            val = getattr(lim, k)
            if val is None or (k.startswith("min") and val == 0):
                continue
            lower = k.startswith("min")
            hit = measure < val if lower else measure > val
            checks.append((f"{f}.{k}", hit,
                           pl.format(f"{f}: {{}} {unit} {'<' if lower else '>'} {val}", measure)))
    margin = pl.col("margin")  # NaN/inf already null (normalise)
    if rules.missing_margin == "drop":
        checks.append(("missing_margin", margin.is_null(), pl.lit("no margin (null, NaN or infinite)")))
    if rules.min_margin is not None:
        checks.append(("min_margin", margin < rules.min_margin,
                       pl.format(f"margin {{}} < {rules.min_margin}", margin)))
    checks.append(("identical", pl.col("same"),
                   pl.lit("chosen and rejected are the same text (ignoring case, whitespace and punctuation)")))
    if t is not None:
        checks.append(("near_identical", pl.col("__sim") >= t,
                       pl.format(f"word-set Jaccard {{}} >= {t}", pl.col("__sim").round(3))))
    lf = lf.with_columns([hit.fill_null(False).alias(f"__hit{i}") for i, (_, hit, _) in enumerate(checks)])
    # the first rule in the fixed order that hits names the reason
    reason = pl.coalesce([pl.when(pl.col(f"__hit{i}")).then(pl.lit(name)) for i, (name, _, _) in enumerate(checks)])
    detail = pl.coalesce([pl.when(pl.col(f"__hit{i}")).then(why) for i, (_, _, why) in enumerate(checks)])
    return lf.select(reason.cast(pl.String).alias("reason"), detail.cast(pl.String).alias("detail"), "first")


LONG_WORK_S = 10.0  # work that took less prints no progress line on the terminal


def _progress(log, what: str, t0: float, rows: int) -> None:
    dt = time.perf_counter() - t0
    # a progress line on the terminal only where the work is long; the log file and the Prefect UI keep it anyway
    log.info("clean: %s: %d rows in %.1fs (%.0f rows/s)", what, rows, dt, rows / max(dt, 1e-9),
             extra={"worldpm_detail": dt < LONG_WORK_S})


def filter_pairs(norm: Path, rules: CleanRules, out: Path, log, normalize_markup: bool | None = None) -> dict:
    """The whole stage on a normalise artifact's folder (pairs/*.parquet + measures.parquet).

    Writes out/pairs.parquet, out/rejects.parquet, out/report.json; returns the report."""
    t0 = time.perf_counter()
    files = sorted((norm / "pairs").glob("*.parquet"))
    if not files or not (norm / "measures.parquet").is_file():
        raise StageError(f"clean: {norm} is no normalise artifact (pairs/*.parquet and measures.parquet)")
    judge = pl.scan_parquet(norm / "measures.parquet")
    t = rules.near_identical
    if t is not None and t < SIM_FLOOR:
        judge = pl.concat([judge, pl.scan_parquet(files).select("chosen", "rejected")], how="horizontal")
    # pass 1: every rule on the measures; only (reason, detail, first) are collected
    verdict = judged(judge, rules).collect(engine="streaming").with_row_index(_IDX)
    rows_in = verdict.height
    _progress(log, "judged", t0, rows_in)

    rejected = verdict.filter(pl.col("reason").is_not_null())
    if rules.dedupe:  # the first surviving occurrence of each (prompt, chosen, rejected) is kept
        alive = verdict.filter(pl.col("reason").is_null())
        dups = alive.filter(~pl.col("first").is_first_distinct()).with_columns(
            reason=pl.lit("duplicate"), detail=pl.lit(DUPLICATE_DETAIL))
        rejected = pl.concat([rejected, dups])
    del verdict
    counts = dict(rejected.group_by("reason").len().rows())
    marks = rejected.select(_IDX, "reason", "detail").lazy()

    # pass 2: the normalised pairs once, the rejected rows' reasons joined on the row number, into the two outputs
    final = pl.scan_parquet(files).with_row_index(_IDX).join(marks, on=_IDX, how="left", maintain_order="left")
    kept = final.filter(pl.col("reason").is_null()).select(COLUMNS)
    dropped = final.filter(pl.col("reason").is_not_null()).select(REJECT_COLUMNS)
    opts = dict(compression="zstd", row_group_size=ROW_GROUP, statistics=True, lazy=True)
    pl.collect_all([kept.sink_parquet(out / "pairs.parquet", **opts),
                    dropped.sink_parquet(out / "rejects.parquet", **opts)], engine="streaming")

    rows_out = pl.scan_parquet(out / "pairs.parquet").select(pl.len()).collect().item()
    rows_rejected = pl.scan_parquet(out / "rejects.parquet").select(pl.len()).collect().item()
    rejected_by_rule = {r: counts[r] for r in rule_order(rules) if counts.get(r)}
    if rows_in != rows_out + rows_rejected or rows_rejected != sum(rejected_by_rule.values()):
        raise StageError(f"clean: {rows_in} pairs in, {rows_out} kept + {rows_rejected} rejected written "
                         f"({rejected_by_rule}): rows were lost")
    report = {"rows_in": rows_in, "rows_out": rows_out, "rows_rejected": rows_rejected,
              "rejected_by_rule": rejected_by_rule, "rules": rule_settings(rules, normalize_markup),
              "rule_order": rule_order(rules)}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    for r, n in rejected_by_rule.items():
        log.info("clean: %-20s %9d rejected", r, n)
    log.info("clean: kept %d of %d pairs (%.1f%%) in %.1fs", rows_out, rows_in,
             100.0 * rows_out / max(rows_in, 1), time.perf_counter() - t0)
    return report


def run(scfg: CleanStageConfig, inputs: dict[str, ArtifactRef], out: Path, log, work: Path) -> dict:
    norm = inputs["normalise"]
    if not pair_files(norm):
        raise StageError(f"clean: the normalise artifact {norm.path} has no pairs/*.parquet")
    normalize_markup = norm.manifest().get("config", {}).get("normalize_markup")
    # the same 20 names every run: the log file and the Prefect UI keep them, the terminal shows what each dropped
    log.info("clean: rules in order: %s", ", ".join(rule_order(scfg.clean)), extra={"worldpm_detail": True})
    report = filter_pairs(Path(norm.path), scfg.clean, out, log, normalize_markup=normalize_markup)
    if report["rows_in"] and report["rows_out"] == 0:
        raise StageError(f"clean: every pair was rejected ({report['rejected_by_rule']}); loosen the clean rules")
    return {k: report[k] for k in ("rows_in", "rows_out", "rows_rejected", "rejected_by_rule")}


STAGE = StageSpec(config=stage_config, run=run, input_files=INPUT_FILES)
