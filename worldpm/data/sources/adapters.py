"""One adapter a source format: raw records (a lazy frame) -> the staged frame that `common.finish` turns into
canonical pairs + rejects. Expressions only; the one exception is Posts.xml, which has to be parsed (streamed,
element by element) before polars can see it.

Which response is the better one, per format:
    stack_exchange_paired       response_j (lvwerra/stack-exchange-paired's convention)
    stack_exchange_preferences  the answer with the higher pm_score; margin = pm_score gap
    stackexchange_posts_xml     the answer with more net votes; margin = vote gap
    helpsteer2                  response_1 when preference_strength < 0, response_2 when > 0; margin = |strength|
    hh_rlhf / ultrafeedback / prompt_chosen_rejected / sharegpt / question_response: `chosen` / `response_chosen`
"""
from __future__ import annotations

import shutil
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import polars as pl
import xxhash

from worldpm.data.sources.common import (
    MESSAGE, AdapterError, Ctx, all_but_last, content_text, is_message_list, last_content, reject_rows,
    to_messages,
)
from worldpm.data.sources.readers import scratch_dir

NULL_F = pl.lit(None, pl.Float64)
NULL_S = pl.lit(None, pl.String)
_TURN = "\x1e"  # a separator that never occurs in text: marks turn starts before a split


def _user(text: pl.Expr) -> pl.Expr:
    return pl.when(text.is_not_null()).then(pl.concat_list(pl.struct(role=pl.lit("user"), content=text))) \
        .otherwise(pl.lit(None, pl.List(MESSAGE)))


def _domain_from_path(path: Path) -> str | None:
    """`beer.stackexchange.com-00000-of-00001.parquet` / `.../beer.stackexchange.com/Posts.xml` -> the site."""
    for part in [path.name, *[p.name for p in path.parents]][:3]:
        head = part.split("-0")[0].split(".jsonl")[0].split(".parquet")[0]
        if "stackexchange.com" in head or head.endswith((".com", ".net", ".org")):
            return head
    return None


def with_record_number(lf: pl.LazyFrame) -> pl.LazyFrame:
    """lf with `_rec` (Int64), the record's number in the file: `with_row_index`, which the streaming engine runs
    as it reads (`pl.int_range(pl.len())` is not elementwise: the engine holds the whole file to evaluate it, 2 GB
    for a file of 500k StackExchange pairs)."""
    return lf.with_row_index("_rec").with_columns(pl.col("_rec").cast(pl.Int64))


def _margin_checked(margin: pl.Expr) -> tuple[pl.Expr, pl.Expr]:
    """(margin, reason): a NaN or infinite margin is quarantined (reason `bad_margin`), never passed on."""
    bad = margin.is_nan() | margin.is_infinite()
    return margin, pl.when(bad.fill_null(False)).then(pl.lit("bad_margin")).otherwise(NULL_S)


# ---- lvwerra/stack-exchange-paired --------------------------------------------------------------------------
def stack_exchange_paired(lf: pl.LazyFrame, schema: pl.Schema, ctx: Ctx) -> pl.LazyFrame:
    domain = _domain_from_path(ctx.path)
    site = pl.lit(domain, pl.String)
    if "metadata" in schema and isinstance(schema["metadata"], pl.List):
        # metadata = [question url, site url, license]: the site url names the domain
        from_meta = pl.col("metadata").list.get(1, null_on_oob=True).str.extract(r"https?://([^/]+)", 1)
        site = pl.coalesce(from_meta, site)
    return with_record_number(lf).with_columns(
        _prompt=_user(pl.col("question").cast(pl.String)),
        _chosen=pl.col("response_j").cast(pl.String),
        _rejected=pl.col("response_k").cast(pl.String),
        _domain=site,
        _group=pl.concat_str([pl.lit("se:"), site.fill_null(""), pl.lit(":"), pl.col("qid").cast(pl.String)]),
        _date=pl.col("date").cast(pl.String) if "date" in schema else NULL_S,
    )


# ---- answers with scores -> pairs (stack-exchange-preferences, Posts.xml) ------------------------------------
def _answer_pairs(answers: pl.LazyFrame, max_pairs: int) -> pl.LazyFrame:
    """answers (qid, aid, text, score) -> pairs (qid, chosen, rejected, chosen_score, rejected_score, margin) with
    chosen_score > rejected_score, at most `max_pairs` per question: the widest margins first, ties broken by
    answer ids so the choice is deterministic. (qid, aid) must identify an answer.

    The pairs are formed and ranked on ids and scores only; the texts are joined to the few pairs kept, so the
    sort never holds answer texts (a question with n answers has n(n-1)/2 candidate pairs)."""
    keys = answers.select("qid", "aid", pl.col("score").cast(pl.Float64))
    a = keys.rename({"aid": "aid_c", "score": "chosen_score"})
    b = keys.rename({"aid": "aid_r", "score": "rejected_score"})
    pairs = a.join(b, on="qid", how="inner").filter(pl.col("chosen_score") > pl.col("rejected_score"))
    pairs = pairs.with_columns(margin=pl.col("chosen_score") - pl.col("rejected_score"))
    pairs = pairs.sort(["qid", "margin", "aid_c", "aid_r"], descending=[False, True, False, False])
    pairs = pairs.filter(pl.int_range(pl.len()).over("qid") < max_pairs)
    texts = answers.select("qid", "aid", "text")
    return (
        pairs.join(texts.rename({"aid": "aid_c", "text": "chosen"}), on=["qid", "aid_c"], how="left",
                   maintain_order="left")
        .join(texts.rename({"aid": "aid_r", "text": "rejected"}), on=["qid", "aid_r"], how="left",
              maintain_order="left")
    )


def _answer_stats(answers: pl.LazyFrame, usable: pl.LazyFrame) -> pl.LazyFrame:
    """One row counting what the answer formats leave out, so nothing is dropped uncounted: answers without
    text or score, candidate pairs (two usable answers to one question), those skipped because both answers
    have the same score. The download stage adds the pairs beyond max_pairs_per_question (candidates - equal -
    written)."""
    def choose2(n: pl.Expr) -> pl.Expr:
        return (n * (n - 1) // 2).sum()

    per_q = usable.group_by("qid").agg(n=pl.len()).select(candidate_pairs=choose2(pl.col("n")))
    per_score = usable.group_by("qid", "score").agg(n=pl.len()).select(equal_score_pairs=choose2(pl.col("n")))
    totals = answers.select(answers=pl.len(), answers_unusable=(pl.col("text").is_null()
                                                                 | pl.col("score").is_null()).sum())
    return pl.concat([totals, per_q, per_score], how="horizontal").select(pl.all().cast(pl.Int64))


def stack_exchange_preferences(lf: pl.LazyFrame, schema: pl.Schema, ctx: Ctx) -> pl.LazyFrame:
    domain = _domain_from_path(ctx.path)
    q = lf.with_columns(_rec=pl.int_range(pl.len(), dtype=pl.Int64))
    all_answers = (
        q.select("_rec", "answers").explode("answers").drop_nulls("answers").with_row_index("_aid")
        .select(qid=pl.col("_rec"), aid=pl.col("_aid").cast(pl.Int64),  # answer_id may be missing or repeated
                text=pl.col("answers").struct.field("text").cast(pl.String),
                score=pl.col("answers").struct.field("pm_score").cast(pl.Float64))
    )
    answers = all_answers.filter(pl.col("text").is_not_null() & pl.col("score").is_not_null()
                                 & pl.col("score").is_finite())
    ctx.lazy_stats.append(_answer_stats(all_answers, answers))
    pairs = _answer_pairs(answers, ctx.max_pairs_per_question)
    site = pl.lit(domain, pl.String)
    if "metadata" in schema and isinstance(schema["metadata"], pl.List):  # [question url, site url, license]
        site = pl.coalesce(pl.col("metadata").list.get(1, null_on_oob=True).cast(pl.String)
                           .str.extract(r"https?://([^/]+)", 1), site)
    base = q.select(
        "_rec", "qid", "question",
        _domain=site, _date=pl.col("date").cast(pl.String) if "date" in schema else NULL_S,
    )
    joined = base.join(pairs.rename({"qid": "_rec"}), on="_rec", how="left", maintain_order="left_right")
    no_pair = pl.col("chosen").is_null()
    return joined.select(
        "_rec", "qid", "question",
        _prompt=_user(pl.col("question").cast(pl.String)),
        _chosen=pl.col("chosen"), _rejected=pl.col("rejected"),
        _chosen_score=pl.col("chosen_score"), _rejected_score=pl.col("rejected_score"),
        _margin=pl.col("margin"),
        _domain=pl.col("_domain"),
        _group=pl.concat_str([pl.lit("se:"), pl.col("_domain").fill_null(""), pl.lit(":"),
                              pl.col("qid").cast(pl.String)]),
        _date=pl.col("_date"),
        _reason=pl.when(no_pair).then(pl.lit("no_pair")).otherwise(NULL_S),
        _detail=pl.when(no_pair).then(pl.lit("no two answers with different pm_score")).otherwise(NULL_S),
    )


POSTS_BATCH = 50_000       # posts held in memory before they are flushed to a Parquet part in the scratch folder
BUCKET_QUESTIONS = 20_000  # questions (in file order) whose pairs are built together, with their answers, in memory
STAGED_ROW_GROUP = 10_000  # staged rows a row group: what the download stage's streaming sinks read at a time
_Q_SCHEMA = {"qid": pl.Int64, "title": pl.String, "body": pl.String, "date": pl.String}
_A_SCHEMA = {"qid": pl.Int64, "aid": pl.Int64, "text": pl.String, "score": pl.Float64}
_STATS = ("answers", "answers_unusable", "candidate_pairs", "equal_score_pairs")


def _parse_posts(path: Path, scratch: Path, ctx: Ctx) -> tuple[int, int, int, list[dict]]:
    """Pass 1: stream-parse Posts.xml into q-<part>.parquet (questions, file order) and a-<part>.parquet (answers)
    in `scratch`, POSTS_BATCH posts at a time; elements are cleared as they are read (and dropped from the root).
    Returns (questions, answers, other posts, unreadable posts as reject rows)."""
    q_cols: dict[str, list] = {k: [] for k in _Q_SCHEMA}
    a_cols: dict[str, list] = {k: [] for k in _A_SCHEMA}
    bad: list[dict] = []
    n_q = n_a = other = parts = seen = 0
    t0 = time.perf_counter()

    def flush() -> None:
        nonlocal parts
        for cols, schema, prefix in ((q_cols, _Q_SCHEMA, "q"), (a_cols, _A_SCHEMA, "a")):
            if cols["qid"]:
                pl.DataFrame(cols, schema=schema).write_parquet(scratch / f"{prefix}-{parts:05d}.parquet")
                for v in cols.values():
                    v.clear()
        parts += 1

    try:
        with open(path, "rb") as f:
            if f.read(3) != b"\xef\xbb\xbf":  # the dumps often start with a BOM: skip it
                f.seek(0)
            events = ET.iterparse(f, events=("start", "end"))
            _, root = next(events)
            for ev, el in events:
                if ev != "end" or el.tag != "row":
                    continue
                a = el.attrib
                t = a.get("PostTypeId")
                try:
                    if t == "1":
                        qid = int(a["Id"])
                        q_cols["qid"].append(qid)
                        q_cols["title"].append(a.get("Title") or "")
                        q_cols["body"].append(a.get("Body"))
                        q_cols["date"].append((a.get("CreationDate") or "")[:10] or None)
                        n_q += 1
                    elif t == "2":
                        row = (int(a["ParentId"]), int(a["Id"]), a.get("Body"), float(a["Score"]))
                        for k, v in zip(_A_SCHEMA, row):
                            a_cols[k].append(v)
                        n_a += 1
                    else:
                        other += 1
                except (KeyError, ValueError) as e:
                    bad.append({"line": None, "reason": "bad_post", "detail": f"{path}: post {a.get('Id')}: "
                                f"missing or bad attribute {e}", "raw": str(dict(a))})
                root.clear()  # drops this row (and its attributes) from the tree
                seen += 1
                if len(q_cols["qid"]) + len(a_cols["qid"]) >= POSTS_BATCH:
                    flush()
                if ctx.log is not None and seen % 1_000_000 == 0:
                    ctx.log.info("download: %s: %d posts read (%.0f posts/s)", path, seen,
                                 seen / max(time.perf_counter() - t0, 1e-9))
    except ET.ParseError as e:
        raise AdapterError(f"{path}:{e.position[0]}: not valid XML: {e}") from None
    flush()
    return n_q, n_a, other, bad


def _bucket_answers(scratch: Path, n_q: int) -> tuple[int, int, int]:
    """Pass 2: each answer to the bucket of its question, b-<bucket>-<part>.parquet (BUCKET_QUESTIONS questions a
    bucket, in file order), or to orphan-<part>.parquet when its question is not in the file. A question's index
    comes from a binary search in the sorted question ids (8 bytes a question); answers are read a part at a time.
    When question ids repeat (no data dump does), every answer goes to bucket 0: one bucket, the whole file at
    once. Returns (questions a bucket, buckets, orphan answers)."""
    import numpy as np

    q_parts = sorted(scratch.glob("q-*.parquet"))
    qids = pl.scan_parquet(q_parts).select("qid").collect().to_series().to_numpy() if q_parts \
        else np.zeros(0, dtype=np.int64)
    order = np.argsort(qids, kind="stable")
    sorted_ids = qids[order]
    unique = len(sorted_ids) < 2 or bool((np.diff(sorted_ids) > 0).all())
    size = BUCKET_QUESTIONS if unique else max(n_q, 1)
    orphans = 0
    for k, part in enumerate(sorted(scratch.glob("a-*.parquet"))):
        answers = pl.read_parquet(part)
        ids = answers["qid"].to_numpy()
        at = np.minimum(np.searchsorted(sorted_ids, ids), max(len(sorted_ids) - 1, 0))
        found = (sorted_ids[at] == ids) if len(sorted_ids) else np.zeros(len(ids), dtype=bool)
        bucket = np.where(found, order[at] // size if len(order) else 0, -1)
        orphans += int((~found).sum())
        # one file per (bucket, part): in a dump (Id order) a part's answers fall in one or two buckets
        for b, rows in answers.with_columns(_b=pl.Series(bucket)).partition_by("_b", as_dict=True).items():
            name = "orphan" if b[0] < 0 else f"b-{b[0]:06d}"
            rows.drop("_b").write_parquet(scratch / f"{name}-{k:05d}.parquet")
        part.unlink()
    return size, -(-n_q // size) if n_q else 0, orphans


def _staged_bucket(questions: pl.LazyFrame, answers_all: pl.LazyFrame, domain: str | None,
                   max_pairs: int) -> tuple[pl.LazyFrame, pl.LazyFrame]:
    """The staged rows (one per question without a pair, one per pair otherwise, in question order) and the
    answer counts, for some questions and all their answers."""
    answers = answers_all.filter(pl.col("text").is_not_null())
    pairs = _answer_pairs(answers, max_pairs)
    joined = questions.join(pairs, on="qid", how="left", maintain_order="left_right")
    no_pair = pl.col("chosen").is_null()
    prompt_text = pl.concat_str([pl.col("title"), pl.col("body").fill_null("")], separator="\n\n")
    staged = joined.select(
        "_rec", "qid", "title",
        _prompt=_user(prompt_text),
        _chosen=pl.col("chosen"), _rejected=pl.col("rejected"),
        _chosen_score=pl.col("chosen_score"), _rejected_score=pl.col("rejected_score"), _margin=pl.col("margin"),
        _domain=pl.lit(domain, pl.String),
        _group=pl.concat_str([pl.lit("se:"), pl.lit(domain or ""), pl.lit(":"), pl.col("qid").cast(pl.String)]),
        _date=pl.col("date"),
        _reason=pl.when(no_pair).then(pl.lit("no_pair")).otherwise(NULL_S),
        _detail=pl.when(no_pair).then(pl.lit("no two answers with different net votes")).otherwise(NULL_S),
    )
    return staged, _answer_stats(answers_all, answers)


def read_posts_xml(path: Path, ctx: Ctx) -> tuple[pl.LazyFrame, pl.DataFrame, int]:
    """A data-dump Posts.xml -> (staged pairs, reader rejects, records), in memory bounded by POSTS_BATCH posts and
    BUCKET_QUESTIONS questions whatever the file's size (the 20 GB dumps; bench/README.md measures it).

    Pass 1 parses the XML into question and answer Parquet parts (_parse_posts), pass 2 puts each answer in the
    bucket of its question (_bucket_answers), pass 3 builds each bucket's pairs in memory and writes them, in
    question order, to s-<bucket>.parquet: the staged frame is a scan of those files, the same rows in the same
    order as building all pairs at once. Records are questions (plus posts that cannot be read, rejected as
    `bad_post`); a question without two answers of different net votes is rejected (`no_pair`). Posts that are
    neither questions nor answers are skipped and answers whose question is not in the file are left out: both
    counted in the stats."""
    scratch = scratch_dir(ctx.work) / f"posts-{xxhash.xxh3_64_hexdigest(str(path.resolve()).encode())[:12]}"
    if scratch.exists():
        shutil.rmtree(scratch)
    scratch.mkdir(parents=True)
    n_q, n_a, other, bad = _parse_posts(path, scratch, ctx)
    if n_q == 0 and n_a == 0:
        raise AdapterError(f"{path}: no posts (no <row PostTypeId=1|2>) in this XML file")
    ctx.stats["posts_other"] = other
    size, n_buckets, orphans = _bucket_answers(scratch, n_q)
    domain = _domain_from_path(path)
    questions = pl.scan_parquet(sorted(scratch.glob("q-*.parquet"))) if n_q else pl.LazyFrame(schema=_Q_SCHEMA)
    empty_answers = pl.LazyFrame(schema=_A_SCHEMA)
    totals = dict.fromkeys(_STATS, 0)
    for b in range(n_buckets):
        qb = questions.slice(b * size, size).with_row_index("_rec", offset=b * size) \
            .with_columns(pl.col("_rec").cast(pl.Int64))
        ab = sorted(scratch.glob(f"b-{b:06d}-*.parquet"))
        staged_b, stats_b = _staged_bucket(qb, pl.scan_parquet(ab) if ab else empty_answers, domain,
                                           ctx.max_pairs_per_question)
        staged_b.collect().write_parquet(scratch / f"s-{b:06d}.parquet", row_group_size=STAGED_ROW_GROUP)
        for k, v in stats_b.collect().row(0, named=True).items():
            totals[k] += v
    orphan = sorted(scratch.glob("orphan-*.parquet"))
    if orphan:  # counted as before: their answers and candidate pairs, no pairs
        for k, v in _answer_stats(pl.scan_parquet(orphan), pl.scan_parquet(orphan)
                                  .filter(pl.col("text").is_not_null())).collect().row(0, named=True).items():
            totals[k] += v
    totals["answers_orphan"] = orphans
    ctx.lazy_stats.append(pl.LazyFrame({k: [v] for k, v in totals.items()}, schema={k: pl.Int64 for k in totals}))
    if n_buckets:
        staged = pl.scan_parquet([scratch / f"s-{b:06d}.parquet" for b in range(n_buckets)])
    else:
        staged = _staged_bucket(questions.with_row_index("_rec").with_columns(pl.col("_rec").cast(pl.Int64)),
                                empty_answers, domain, ctx.max_pairs_per_question)[0]
    return staged, reject_rows(ctx.tag, path, bad), n_q + len(bad)


# ---- HelpSteer2 preference.jsonl ----------------------------------------------------------------------------
def _helpsteer_messages(text: pl.Expr) -> pl.Expr:
    """HelpSteer2 writes a multi-turn prompt as one string, the turns after the first marked
    "<extra_id_1>Assistant\\n..." / "<extra_id_1>User\\n...": split it into messages (the first turn is the user's)."""
    marked = pl.lit("U") + text.str.replace_all(r"<extra_id_1>User\n?", _TURN + "U") \
        .str.replace_all(r"<extra_id_1>Assistant\n?", _TURN + "A")
    return marked.str.split(_TURN).list.eval(pl.struct(
        role=pl.when(pl.element().str.starts_with("A")).then(pl.lit("assistant")).otherwise(pl.lit("user")),
        content=pl.element().str.slice(1).str.strip_chars(),
    ))


def helpsteer2(lf: pl.LazyFrame, schema: pl.Schema, ctx: Ctx) -> pl.LazyFrame:
    s = pl.col("preference_strength").cast(pl.Float64)
    margin, bad = _margin_checked(s.abs())
    first_better = s < 0
    reason = pl.coalesce(bad, pl.when(s == 0).then(pl.lit("no_preference")).otherwise(NULL_S))
    if schema["prompt"] == pl.String:
        prompt = pl.when(pl.col("prompt").is_not_null()).then(_helpsteer_messages(pl.col("prompt")))
    else:
        prompt = to_messages(pl.col("prompt"), schema["prompt"])
    return lf.with_columns(
        _prompt=prompt,
        _chosen=pl.when(first_better).then(pl.col("response_1")).otherwise(pl.col("response_2")).cast(pl.String),
        _rejected=pl.when(first_better).then(pl.col("response_2")).otherwise(pl.col("response_1")).cast(pl.String),
        _margin=margin,  # `split` (train / validation) is not a domain: HelpSteer2 has none
        _reason=reason,
        _detail=pl.when(s == 0).then(pl.lit("preference_strength 0: neither response is better"))
        .when(reason == "bad_margin").then(pl.lit("preference_strength is NaN or infinite")).otherwise(NULL_S),
        _rec=pl.int_range(pl.len(), dtype=pl.Int64),
    )


# ---- Anthropic hh-rlhf transcripts --------------------------------------------------------------------------


def _transcript_messages(text: pl.Expr) -> pl.Expr:
    """"\\n\\nHuman: a\\n\\nAssistant: b" -> [{user, a}, {assistant, b}] with string expressions only."""
    marked = (text.str.replace_all("\n\nHuman:", _TURN + "U", literal=True)
              .str.replace_all("\n\nAssistant:", _TURN + "A", literal=True))
    turns = marked.str.split(_TURN).list.eval(pl.element().filter(pl.element().str.len_chars() > 0))
    return turns.list.eval(pl.struct(
        role=pl.when(pl.element().str.starts_with("U")).then(pl.lit("user"))
        .when(pl.element().str.starts_with("A")).then(pl.lit("assistant")).otherwise(pl.lit("unknown")),
        content=pl.element().str.slice(1).str.strip_chars(),
    ))


def hh_rlhf(lf: pl.LazyFrame, schema: pl.Schema, ctx: Ctx) -> pl.LazyFrame:
    c, r = _transcript_messages(pl.col("chosen")), _transcript_messages(pl.col("rejected"))
    staged = lf.with_columns(_c=c, _r=r, _rec=pl.int_range(pl.len(), dtype=pl.Int64))
    pc, pr = all_but_last(pl.col("_c")), all_but_last(pl.col("_r"))
    last_ok = (pl.col("_c").list.last().struct.field("role") == "assistant") & \
              (pl.col("_r").list.last().struct.field("role") == "assistant")
    has_unknown = pl.col("_c").list.eval(pl.element().struct.field("role") == "unknown").list.any() | \
        pl.col("_r").list.eval(pl.element().struct.field("role") == "unknown").list.any()
    reason = (
        pl.when(has_unknown.fill_null(False)).then(pl.lit("unparsed_transcript"))
        .when(~last_ok.fill_null(False)).then(pl.lit("no_final_assistant_turn"))
        .when(pc != pr).then(pl.lit("prompt_mismatch"))
        .otherwise(NULL_S)
    )
    return staged.with_columns(
        _prompt=pc, _chosen=last_content(pl.col("_c")), _rejected=last_content(pl.col("_r")), _reason=reason,
        _detail=pl.when(reason == "prompt_mismatch")
        .then(pl.lit("chosen and rejected transcripts differ before their last assistant turn")).otherwise(NULL_S),
    ).drop("_c", "_r")


# ---- generic: prompt / chosen / rejected (UltraFeedback, RewardBench, TRL preference datasets) ----------------
def _response(col: str, schema: pl.Schema) -> tuple[pl.Expr, pl.Expr | None]:
    """(response text, the conversation before it or None) from a string or a message list column."""
    dt = schema[col]
    if is_message_list(dt):
        msgs = to_messages(pl.col(col), dt, default_role="assistant")
        return last_content(msgs), all_but_last(msgs)
    text = content_text(pl.col(col), dt)
    if text is None:
        raise TypeError(col)
    return text, None


def _generic(lf: pl.LazyFrame, schema: pl.Schema, ctx: Ctx, prompt_col: str | None, chosen_col: str,
             rejected_col: str, score_cols: tuple[str, str] | None = None) -> pl.LazyFrame:
    try:
        chosen, c_prefix = _response(chosen_col, schema)
        rejected, _ = _response(rejected_col, schema)
    except TypeError as e:
        raise AdapterError(f"{ctx.path}: column {e.args[0]!r} has type {schema[e.args[0]]}, not a string or a "
                           "message list") from None
    if prompt_col is not None:
        prompt = to_messages(pl.col(prompt_col), schema[prompt_col])
        if prompt is None:
            raise AdapterError(f"{ctx.path}: column {prompt_col!r} has type {schema[prompt_col]}, not a string or "
                               "a message list")
        if c_prefix is not None:  # a prompt column and full conversations: the conversation wins if it has a prompt
            prompt = pl.when(c_prefix.list.len() > 0).then(c_prefix).otherwise(prompt)
    elif c_prefix is not None:
        prompt = c_prefix
    else:
        raise AdapterError(f"{ctx.path}: no prompt column and `{chosen_col}` is not a conversation")
    cols: dict[str, pl.Expr] = {"_prompt": prompt, "_chosen": chosen, "_rejected": rejected,
                                "_rec": pl.int_range(pl.len(), dtype=pl.Int64)}
    if score_cols is not None:
        sc, sr = score_cols
        cs, rs = _score_expr(sc, schema), _score_expr(sr, schema)
        margin, bad = _margin_checked(cs - rs)
        cols.update(_chosen_score=cs, _rejected_score=rs, _margin=margin, _reason=bad)
    elif "margin" in schema:
        margin, bad = _margin_checked(pl.col("margin").cast(pl.Float64))
        cols.update(_margin=margin, _reason=bad)
    for dom in ("subset", "domain", "source"):  # RewardBench's subset is what per-subset accuracy groups by
        if dom in schema and schema[dom] == pl.String:
            cols["_domain"] = pl.col(dom)
            break
    if "id" in schema:
        cols["_group"] = pl.concat_str([pl.lit("id:"), pl.col("id").cast(pl.String)])
    return lf.with_columns(**cols)


def _score_expr(name: str, schema: pl.Schema) -> pl.Expr:
    if name in schema:
        return pl.col(name).cast(pl.Float64)
    if "metadata" in schema and isinstance(schema["metadata"], pl.Struct):
        return pl.col("metadata").struct.field(name).cast(pl.Float64)
    return NULL_F


def ultrafeedback(lf: pl.LazyFrame, schema: pl.Schema, ctx: Ctx) -> pl.LazyFrame:
    return _generic(lf, schema, ctx, "prompt" if "prompt" in schema else None, "chosen", "rejected",
                    ("score_chosen", "score_rejected"))


def prompt_chosen_rejected(lf: pl.LazyFrame, schema: pl.Schema, ctx: Ctx) -> pl.LazyFrame:
    return _generic(lf, schema, ctx, "prompt" if "prompt" in schema else None, "chosen", "rejected")


def question_response(lf: pl.LazyFrame, schema: pl.Schema, ctx: Ctx) -> pl.LazyFrame:
    return _generic(lf, schema, ctx, "question", "response_chosen", "response_rejected")


def sharegpt(lf: pl.LazyFrame, schema: pl.Schema, ctx: Ctx) -> pl.LazyFrame:
    conv = to_messages(pl.col("conversations"), schema["conversations"])
    if conv is None:
        raise AdapterError(f"{ctx.path}: `conversations` has type {schema['conversations']}, not a message list")
    staged = _generic(lf.with_columns(__prompt=conv), pl.Schema({**schema, "__prompt": pl.List(MESSAGE)}), ctx,
                      "__prompt", "chosen", "rejected")
    return staged.drop("__prompt")


# ---- detection ----------------------------------------------------------------------------------------------
# (format, columns that must all be present): the first match wins, so the specific shapes come first
SIGNATURES: list[tuple[str, set[str]]] = [
    ("stack_exchange_paired", {"qid", "question", "response_j", "response_k"}),
    ("stack_exchange_preferences", {"qid", "question", "answers"}),
    ("helpsteer2", {"prompt", "response_1", "response_2", "preference_strength"}),
    ("question_response", {"question", "response_chosen", "response_rejected"}),
    ("sharegpt", {"conversations", "chosen", "rejected"}),
    ("ultrafeedback", {"chosen", "rejected", "score_chosen", "score_rejected"}),
    ("hh_rlhf", {"chosen", "rejected"}),  # refined below: transcripts without a prompt column
    ("prompt_chosen_rejected", {"prompt", "chosen", "rejected"}),
]
ADAPTERS = {
    "stack_exchange_paired": stack_exchange_paired,
    "stack_exchange_preferences": stack_exchange_preferences,
    "helpsteer2": helpsteer2,
    "hh_rlhf": hh_rlhf,
    "ultrafeedback": ultrafeedback,
    "prompt_chosen_rejected": prompt_chosen_rejected,
    "sharegpt": sharegpt,
    "question_response": question_response,
}
PER_ANSWER = {"stack_exchange_preferences"}  # one staged row per candidate pair, not per record
REQUIRED = {fmt: cols for fmt, cols in SIGNATURES}
REQUIRED["ultrafeedback"] = REQUIRED["prompt_chosen_rejected"] = {"chosen", "rejected"}


def detect_format(schema: pl.Schema, path: Path) -> str:
    cols = set(schema.names())
    meta = schema.get("metadata")
    if isinstance(meta, pl.Struct) and {"score_chosen", "score_rejected"} <= {f.name for f in meta.fields}:
        cols |= {"score_chosen", "score_rejected"}
    for fmt, need in SIGNATURES:
        if need <= cols:
            if fmt == "hh_rlhf" and ("prompt" in cols or schema["chosen"] != pl.String):
                if is_message_list(schema["chosen"]):  # whole conversations: the shared turns are the prompt
                    return "prompt_chosen_rejected"
                continue
            return fmt
    known = "; ".join(f"{fmt} ({', '.join(sorted(need))})" for fmt, need in SIGNATURES)
    raise AdapterError(f"{path}: unknown format: columns found: {', '.join(sorted(schema.names())) or 'none'}; "
                       f"formats known: {known}, stackexchange_posts_xml (Posts.xml)")


def check_columns(fmt: str, schema: pl.Schema, path: Path) -> None:
    need = REQUIRED.get(fmt, set())
    missing = sorted(need - set(schema.names()))
    if missing:
        raise AdapterError(f"{path}: format {fmt} needs column(s) {', '.join(missing)}; columns found: "
                           f"{', '.join(sorted(schema.names()))}")
