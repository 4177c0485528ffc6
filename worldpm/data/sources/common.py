"""Pieces every adapter shares: message expressions, stable hashes, the rejects table and the last step
(`finish`) that turns an adapter's staged frame into canonical pairs + rejects.

An adapter builds a *staged* frame from the raw records with expressions only. Its output columns carry a
leading underscore so they never collide with the raw ones:
    _prompt (List[MESSAGE]), _chosen, _rejected (String), _chosen_score, _rejected_score, _margin (Float64),
    _domain, _group, _date (String), _reason (String: why the record is rejected, null when it is fine),
    _detail (String), _rec (UInt32/Int64: the record number, for the rejects' detail)
`finish` adds the generic reasons (missing prompt / chosen / rejected), splits pairs from rejects, computes
pair_id and the default group_id, and casts to the canonical schema.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
import xxhash

from worldpm.data.schema import COLUMNS, MESSAGE

REJECTS_SCHEMA: dict[str, pl.DataType] = {
    "source": pl.String,
    "file": pl.String,
    "line": pl.Int64,      # the physical line where one is known (malformed JSONL lines), else null
    "reason": pl.String,
    "detail": pl.String,
    "raw": pl.String,      # the record as read, truncated to RAW_CHARS
}
RAW_CHARS = 2000

PARTS = pl.List(pl.Struct({"type": pl.String, "text": pl.String}))
ROLE_ALIASES = {
    "human": "user", "user": "user", "prompter": "user",
    "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant",
    "model": "assistant", "bot": "assistant",
    "system": "system", "tool": "tool", "function": "tool",
}


class AdapterError(ValueError):
    """Bad input that must stop the run; the message is one line naming the file."""


@dataclass
class Ctx:
    """What an adapter knows besides the records: where they come from and its settings."""

    path: Path
    tag: str
    max_pairs_per_question: int = 10
    work: Path | None = None
    stats: dict = field(default_factory=dict)
    lazy_stats: list[pl.LazyFrame] = field(default_factory=list)  # 1-row frames of counts, computed with the pairs
    log: Any = None  # a logger for progress on long reads (Posts.xml), or None


def empty_rejects() -> pl.DataFrame:
    return pl.DataFrame(schema=REJECTS_SCHEMA)


def reject_rows(tag: str, path: Path | str, rows: list[dict]) -> pl.DataFrame:
    """Rejects built in Python (reader-level: malformed lines, invalid UTF-8, bad XML rows)."""
    if not rows:
        return empty_rejects()
    out = [{"source": tag, "file": str(path), "line": r.get("line"), "reason": r["reason"],
            "detail": r.get("detail"), "raw": (r.get("raw") or "")[:RAW_CHARS]} for r in rows]
    return pl.DataFrame(out, schema=REJECTS_SCHEMA)


# ---- stable hashes ------------------------------------------------------------------------------------------
# polars' Expr.hash is not stable across versions, so ids are xxhash of a canonical string. The string is built
# with expressions; only the hash itself is a batch function over the column (no per-row UDF in the plan).

def _xxh128_batch(s: pl.Series) -> pl.Series:
    h = xxhash.xxh3_128_hexdigest
    return pl.Series(s.name, [None if v is None else h(v.encode()) for v in s.to_list()], dtype=pl.String)


def _xxh64_batch(s: pl.Series) -> pl.Series:
    h = xxhash.xxh3_64_hexdigest
    return pl.Series(s.name, [None if v is None else h(v.encode()) for v in s.to_list()], dtype=pl.String)


def hash128(expr: pl.Expr) -> pl.Expr:
    return expr.map_batches(_xxh128_batch, return_dtype=pl.String, is_elementwise=True)


def hash64(expr: pl.Expr) -> pl.Expr:
    return expr.map_batches(_xxh64_batch, return_dtype=pl.String, is_elementwise=True)


def prompt_key(prompt: pl.Expr) -> pl.Expr:
    """A canonical string of a message list (role and content of every message)."""
    return prompt.list.eval(
        pl.concat_str([pl.element().struct.field("role").fill_null(""),
                       pl.element().struct.field("content").fill_null("")], separator="\x1e")
    ).list.join("\x1d").fill_null("")


def normalised_prompt(prompt: pl.Expr) -> pl.Expr:
    """The prompt's text, lower-cased with whitespace collapsed: what two copies of a question share."""
    text = prompt.list.eval(pl.element().struct.field("content").fill_null("")).list.join("\n")
    return text.str.to_lowercase().str.replace_all(r"\s+", " ").str.strip_chars()


def pair_id_expr(tag: str, prompt: pl.Expr, chosen: pl.Expr, rejected: pl.Expr) -> pl.Expr:
    key = pl.concat_str([pl.lit(tag), prompt_key(prompt), chosen.fill_null(""), rejected.fill_null("")],
                        separator="\x1f")
    return hash128(key)


def prompt_group_expr(prompt: pl.Expr) -> pl.Expr:
    """group_id when the source has no question id: a hash of the normalised prompt (source-independent, so
    the same question from two sources lands in one split)."""
    return pl.lit("p:") + hash64(normalised_prompt(prompt))


def pair_id(tag: str, prompt: list[dict], chosen: str, rejected: str) -> str:
    """Python twin of pair_id_expr (tests, the demo generator)."""
    pk = "\x1d".join(f"{m.get('role') or ''}\x1e{m.get('content') or ''}" for m in prompt)
    return xxhash.xxh3_128_hexdigest("\x1f".join([tag, pk, chosen or "", rejected or ""]).encode())


# ---- messages -----------------------------------------------------------------------------------------------

def _struct_fields(dtype: pl.DataType) -> list[str]:
    return [f.name for f in dtype.fields] if isinstance(dtype, pl.Struct) else []


def _parts_text(expr: pl.Expr, inner: pl.Struct) -> pl.Expr:
    """[{type: text, text}] parts -> their text joined (non-text parts such as images are skipped)."""
    names = _struct_fields(inner)
    el = pl.element()
    if "text" not in names:
        return pl.lit(None, pl.String)
    picked = el.struct.field("text")
    if "type" in names:
        picked = picked.filter(el.struct.field("type").is_null() | (el.struct.field("type") == "text"))
    return expr.list.eval(picked).list.join("\n")


def _string_maybe_parts(expr: pl.Expr) -> pl.Expr:
    """A content string, or parts that polars JSON-encoded into a string because other rows had plain strings
    (NDJSON with mixed content types): decode those and join their text."""
    looks = expr.str.contains(r'^\s*\[\s*\{\s*"(?:type|text)"\s*:[\s\S]*\}\s*\]\s*$')
    decoded = pl.when(looks).then(expr).otherwise(pl.lit("[]")).str.json_decode(PARTS)
    joined = decoded.list.eval(
        pl.element().struct.field("text").filter(
            pl.element().struct.field("type").is_null() | (pl.element().struct.field("type") == "text"))
    ).list.join("\n")
    return pl.when(looks.fill_null(False)).then(joined).otherwise(expr)


def content_text(expr: pl.Expr, dtype: pl.DataType, *, parts_in_strings: bool = True) -> pl.Expr | None:
    """A message content of any usual shape -> String. None when the dtype is not a content shape."""
    if dtype == pl.String:
        return _string_maybe_parts(expr) if parts_in_strings else expr
    if dtype == pl.Null:
        return pl.lit(None, pl.String)
    if isinstance(dtype, pl.List):
        inner = dtype.inner
        if isinstance(inner, pl.Struct):
            return _parts_text(expr, inner)
        if inner == pl.String:
            return expr.list.join("\n")
    if isinstance(dtype, pl.Struct):  # a single part, or a ShareGPT {from, value} / {role, content} message
        names = _struct_fields(dtype)
        for f in ("content", "value", "text"):
            if f in names:
                sub = next(x.dtype for x in dtype.fields if x.name == f)
                return content_text(expr.struct.field(f), sub, parts_in_strings=parts_in_strings)
    return None


def _role_expr(role: pl.Expr) -> pl.Expr:
    r = role.str.to_lowercase().str.strip_chars()
    return r.replace(ROLE_ALIASES)


def is_message_list(dtype: pl.DataType) -> bool:
    if not (isinstance(dtype, pl.List) and isinstance(dtype.inner, pl.Struct)):
        return False
    names = set(_struct_fields(dtype.inner))
    return bool({"role", "content"} <= names or {"from", "value"} <= names)


def to_messages(expr: pl.Expr, dtype: pl.DataType, default_role: str = "user") -> pl.Expr | None:
    """String / message / message list of any usual shape -> List[MESSAGE]. None if the dtype is none of them."""
    if dtype == pl.String:
        text = _string_maybe_parts(expr)
        return pl.when(expr.is_not_null()).then(
            pl.concat_list(pl.struct(role=pl.lit(default_role), content=text))
        ).otherwise(pl.lit(None, pl.List(MESSAGE)))
    if dtype == pl.Null:
        return pl.lit(None, pl.List(MESSAGE))
    if isinstance(dtype, pl.Struct):
        names = set(_struct_fields(dtype))
        if {"role", "content"} <= names or {"from", "value"} <= names:
            return to_messages(pl.concat_list(expr), pl.List(dtype), default_role)
        return None
    if is_message_list(dtype):
        inner = dtype.inner
        names = set(_struct_fields(inner))
        el = pl.element()
        if {"role", "content"} <= names:
            role, cname = el.struct.field("role"), "content"
        else:
            role, cname = el.struct.field("from"), "value"
        cdtype = next(f.dtype for f in inner.fields if f.name == cname)
        content = content_text(el.struct.field(cname), cdtype)
        if content is None:
            return None
        return expr.list.eval(pl.struct(role=_role_expr(role), content=content))
    return None


def last_content(messages: pl.Expr) -> pl.Expr:
    return messages.list.last().struct.field("content")


def all_but_last(messages: pl.Expr) -> pl.Expr:
    return messages.list.slice(0, (messages.list.len() - 1).clip(lower_bound=0))


# ---- the last step of every adapter -------------------------------------------------------------------------
STAGED = ("_prompt", "_chosen", "_rejected", "_chosen_score", "_rejected_score", "_margin", "_domain", "_group",
          "_date", "_reason", "_detail")


@dataclass
class Finished:
    pairs: pl.LazyFrame           # canonical schema
    rejects: pl.LazyFrame         # REJECTS_SCHEMA, one row per rejected record
    pair_records: pl.LazyFrame | None  # per_record only: 1 x 1 (`n`), the records that gave a pair


def finish(staged: pl.LazyFrame, raw_columns: list[str], ctx: Ctx, *, per_record: bool = False) -> Finished:
    """Staged frame -> canonical pairs + rejects. Generic reasons are added here so no adapter forgets them.

    ``per_record``: the staged frame has one row per *candidate pair* (several per record: the StackExchange
    answer formats), so a record whose rows are all rejected becomes one reject, and the records that gave
    pairs are counted by distinct ``_rec``. Otherwise it has one row per record."""
    have = set(staged.collect_schema().names())
    fill = {c: pl.lit(None, pl.String) for c in STAGED if c not in have}
    for c in ("_chosen_score", "_rejected_score", "_margin"):
        if c in fill:
            fill[c] = pl.lit(None, pl.Float64)
    if "_rec" not in have:
        fill["_rec"] = pl.lit(None, pl.Int64)
    if fill:
        staged = staged.with_columns(**fill)
    prompt = pl.col("_prompt")
    reason = (
        pl.when(pl.col("_reason").is_not_null()).then(pl.col("_reason"))
        .when(prompt.is_null() | (prompt.list.len() == 0)).then(pl.lit("missing_prompt"))
        .when(pl.col("_chosen").is_null()).then(pl.lit("missing_chosen"))
        .when(pl.col("_rejected").is_null()).then(pl.lit("missing_rejected"))
        .otherwise(pl.lit(None, pl.String))
    )
    staged = staged.with_columns(_reason=reason)

    pairs = staged.filter(pl.col("_reason").is_null()).select(
        pair_id=pair_id_expr(ctx.tag, prompt, pl.col("_chosen"), pl.col("_rejected")),
        source=pl.lit(ctx.tag, pl.String),
        domain=pl.col("_domain").cast(pl.String),
        group_id=pl.coalesce(pl.col("_group").cast(pl.String), prompt_group_expr(prompt)),
        prompt=prompt.cast(pl.List(MESSAGE)),
        chosen=pl.col("_chosen").cast(pl.String),
        rejected=pl.col("_rejected").cast(pl.String),
        chosen_score=pl.col("_chosen_score").cast(pl.Float64),
        rejected_score=pl.col("_rejected_score").cast(pl.Float64),
        margin=pl.col("_margin").cast(pl.Float64),
        date=pl.col("_date").cast(pl.String),
    ).select(COLUMNS)

    raw_cols = [c for c in raw_columns if c in have]
    raw = pl.struct(raw_cols).struct.json_encode() if raw_cols else pl.lit(None, pl.String)
    rec = pl.col("_rec").cast(pl.Int64)
    detail = pl.concat_str([pl.lit("record "), (rec + 1).cast(pl.String), pl.lit(": "),
                            pl.col("_detail").fill_null(pl.col("_reason"))])
    rejected = staged.filter(pl.col("_reason").is_not_null())
    if per_record:
        # a question is rejected as a whole (no pair, or no prompt for any of its pairs): one row for it
        rejected = rejected.unique(subset=["_rec"], keep="first", maintain_order=True)
    rejects = rejected.select(
        source=pl.lit(ctx.tag, pl.String),
        file=pl.lit(str(ctx.path), pl.String),
        line=pl.lit(None, pl.Int64),
        reason=pl.col("_reason"),
        detail=pl.coalesce(detail, pl.col("_detail"), pl.col("_reason")),
        raw=raw.str.slice(0, RAW_CHARS),
    )
    pair_records = None
    if per_record:  # otherwise each pair is one record: the pairs written are the records that gave pairs
        pair_records = staged.filter(pl.col("_reason").is_null()).select(
            pl.col("_rec").n_unique().cast(pl.Int64).alias("n"))
    return Finished(pairs, rejects, pair_records)

