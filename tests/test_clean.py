"""The normalise and clean stages on the real StackExchange pairs (../shared/data): every rule drops what it should
and counts it, normalisation keeps code, CJK and punctuation (and an image's alt text), the gated normalisation
equals the plain definition byte for byte, a threshold change reruns clean alone with the same bytes as a run from
scratch, rows are never lost, the output is deterministic (early cutoff), and a process killed in the middle of
normalise leaves nothing that a later run takes for finished."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

from tasks import PIPELINE as pipeline
from tasks import clean
from worldpm.data import text
from worldpm.config import CleanConfig, FieldLimits, PipelineConfig, load_config
from worldpm.data.schema import CANONICAL_SCHEMA, MESSAGE
from worldpm.store import ArtifactStore


# ---- helpers: a download artifact built here from the raw shared files ----------------------------------------

def se_canonical(se_paired: Path, copies: int = 1) -> pl.DataFrame:
    """lvwerra stack-exchange-paired -> the canonical table (response_j is the better answer). copies > 1 repeats
    the pairs with a counter appended to every text (so they are no duplicates)."""
    raw = pl.read_parquet(sorted(se_paired.glob("**/*.parquet")))
    i = pl.col("i")
    stamp = pl.when(i > 0).then(pl.lit("\n(copy ") + i.cast(pl.String) + ")").otherwise(pl.lit(""))
    return (
        pl.DataFrame({"i": range(copies)}).join(raw, how="cross", maintain_order="left_right")
        .select(
            pair_id=pl.format("se-{}-{}-{}", "qid", pl.int_range(pl.len()), "i"),
            source=pl.lit("se"),
            domain=pl.col("metadata").list.first().str.extract(r"https?://([^/]+)"),
            group_id=pl.format("se:{}:{}", "qid", "i"),
            prompt=pl.concat_list(pl.struct(role=pl.lit("user"), content=pl.col("question") + stamp).cast(MESSAGE)),
            chosen=pl.col("response_j") + stamp, rejected=pl.col("response_k") + stamp,
            chosen_score=pl.lit(None, pl.Float64), rejected_score=pl.lit(None, pl.Float64),
            margin=pl.lit(None, pl.Float64), date=pl.col("date"),
        )
        .cast(CANONICAL_SCHEMA)
    )


def commit_download(store: ArtifactStore, frame: pl.DataFrame, key: str = "test-download"):
    tmp = store.new_tmp("download", key)
    (tmp / "pairs").mkdir()
    frame.write_parquet(tmp / "pairs" / "00000-se.parquet", compression="zstd")
    return store.commit("download", key, tmp, {"rows_in": frame.height, "rows_out": frame.height,
                                               "rows_rejected": 0})


def run_clean(root: Path, dl, **clean_cfg):
    """normalise then clean (as a run does); the clean StageResult, with .normalised the normalise one."""
    cfg = PipelineConfig(artifacts_dir=str(root), clean=CleanConfig(**clean_cfg))
    store = ArtifactStore(root)
    norm = pipeline.execute("normalise", cfg, {"download": dl}, store)
    res = pipeline.execute("clean", cfg, {"normalise": norm.ref}, store)
    res.normalised = norm
    return res


def norm(values: list[str | None]) -> list[str | None]:
    return text.normalize_series(pl.Series("t", values, dtype=pl.String)).to_list()


# ---- normalisation ------------------------------------------------------------------------------------------

def test_normalisation_keeps_code_cjk_and_punctuation():
    html = ("<p>Use <code>x &lt;= y</code> in C++ &amp; Rust, a<b and c>d.</p>\n<pre><code>if (a &lt; b) {\n"
            "    return &quot;ok&quot;;\n}\n</code></pre>\n<ul><li>one</li><li>two</li></ul><p>¿Qué? 你好，世界。</p>")
    md = "Title\n-----\n\n**Bold** [docs](https://x.org/a)\n\n```\n<div>  keep   </div>\n```\n\n\n\nend  here"
    ents = "&amp;lt; &#39;q&#x27; &#233;t&eacute; &#x4F60;&#22909; &nbsp;x &#0; &bogus; AT&T &#128512;"
    plain = "C++  ¿Qué?   你好，世界。 x <= y, std::vector<int> v;\r\n\tindented\ta\t\tb  😀  "
    out_html, out_md, out_ents, out_plain, none, empty = norm([html, md, ents, plain, None, "  <p> </p> "])
    assert "Use `x <= y` in C++ & Rust, a<b and c>d." in out_html            # a<b and c>d is no tag
    assert "```\nif (a < b) {\n    return \"ok\";\n}\n" in out_html          # indentation and lines kept
    assert "- one\n- two" in out_html and out_html.endswith("¿Qué? 你好，世界。")
    assert "<p>" not in out_html and "&lt;" not in out_html and "&quot;" not in out_html
    assert out_md == "Title\n\nBold docs (https://x.org/a)\n\n```\n<div>  keep   </div>\n```\n\nend here"
    assert out_ents == "&lt; 'q' été 你好 x &#0; &bogus; AT&T 😀"                # decoded once, invalid kept
    assert out_plain == "C++ ¿Qué? 你好，世界。 x <= y, std::vector<int> v;\n\tindented a b 😀"
    assert none is None and empty == ""


def test_prompt_messages_are_normalised_per_message_roles_kept():
    lf = pl.LazyFrame({"prompt": [[{"role": "system", "content": "be  brief"},
                                   {"role": "user", "content": "<p>hi &amp; ```\ncode  here"},
                                   {"role": "assistant", "content": "ok  then"}], [], None]},
                      schema={"prompt": pl.List(MESSAGE)})
    out = text.normalize_columns(lf, [], prompt="prompt").collect()["prompt"].to_list()
    assert out[0] == [{"role": "system", "content": "be brief"},
                      {"role": "user", "content": "hi & ```\ncode  here```"},   # a fence ends with its message
                      {"role": "assistant", "content": "ok then"}]
    assert out[1] == [] and out[2] is None


def test_image_alt_text_is_kept():
    """Rule change (2026-11): an <img>'s alt text replaces the tag (it was dropped), as a Markdown image's alt does;
    an answer that is only an image is no longer empty."""
    only_img, inline, no_alt, md, quoted = norm([
        '<p><img src="https://i.stack.imgur.com/x.png" alt="A grinder &amp; its burrs"></p>',
        "Tamp like this: <IMG width=10 ALT='firm, level' src=x.png/> then pull.",
        'before <img src="x.png"> after',
        "![a diagram](https://x.org/d.png)",
        '<img alt="first" alt="second" src=x>',
    ])
    assert only_img == "A grinder & its burrs"
    assert inline == "Tamp like this: firm, level then pull."
    assert no_alt == "before after"
    assert md == "a diagram" and quoted == "first"


def _shared_texts(shared: Path) -> list[str | None]:
    """Real texts of every shared format (Markdown, raw HTML bodies, chat transcripts, CJK), plus splices of
    markup fragments into them (fences, entities, CR/control bytes, tags, Markdown) so every gate is exercised."""
    import gzip
    import random
    import xml.etree.ElementTree as ET

    texts: list[str | None] = []
    se = pl.read_parquet(sorted((shared / "stack-exchange-paired").glob("**/*.parquet")))
    texts += se["question"].to_list() + se["response_j"].to_list() + se["response_k"].to_list()
    for f in sorted((shared / "stack-exchange-preferences").glob("*.jsonl")):
        for line in f.read_text().splitlines():
            r = json.loads(line)
            texts += [r["question"], *(a["text"] for a in r["answers"])]
    for f in sorted((shared / "stackexchange-dumps").glob("*/Posts.xml")):
        texts += [el.get("Body") for _, el in ET.iterparse(f) if el.tag == "row" and el.get("Body")]
    with gzip.open(shared / "hh_rlhf" / "harmless-base_test.jsonl.gz", "rt") as fh:
        for line in list(fh)[:500]:
            r = json.loads(line)
            texts += [r["chosen"], r["rejected"]]
    for line in (shared / "medicalgpt_zh" / "medical_reward_test.jsonl").read_text().splitlines():
        texts += [v for v in json.loads(line).values() if isinstance(v, str)]
    frags = ["<p>", "</p>", "<br>", "\r\n", "\r", "\x00", "\x07", "\x7f", "```", "```py\n", "<pre><code>",
             "</code></pre>", "&amp;", "&lt;", "&#39;", "&#x4F60;", "&nbsp;", "\xa0", "  ", "\t", " \n", "\n\n\n",
             "**b**", "![alt](u.png)", "[t](http://x.y)", "---\n", "\n===\n", "<!-- c -->", "<code>x</code>",
             "<li>", '<a href="x">', '<img alt="pic" src=x>', "x<y", "&", "*", "[", "]", "(", ")", "-", "你好"]
    rnd = random.Random(0)
    for _ in range(2000):
        t = rnd.choice(texts)
        parts = [t[:rnd.randint(0, min(len(t), 200))]]
        for _ in range(rnd.randint(1, 10)):
            parts += [rnd.choice(frags), rnd.choice(["", "word", "a  b", t[:rnd.randint(0, 30)]])]
        texts.append("".join(parts))
    return texts + [None, "", " ", "```", "\r\n"]


def test_gated_normalisation_equals_the_plain_definition(shared_data):
    """Every rule runs only on the rows its gate selects: on real texts of every shared format, and on splices
    of markup into them, the output is byte for byte that of running every rule on every row."""
    texts = _shared_texts(shared_data)
    # prompts: a message list per row (every 8th text as the user turn, the next as a system turn)
    prompts = [[{"role": "user", "content": texts[i]}, {"role": "system", "content": texts[-i - 1]}]
               if i % 8 == 0 else None for i in range(len(texts))]
    frame = pl.LazyFrame({"t": texts, "p": prompts}, schema={"t": pl.String, "p": pl.List(MESSAGE)})
    fast = text.normalize_columns(frame, ["t"], prompt="p").collect()
    plain = text.normalize_columns(frame, ["t"], prompt="p", gated=False).collect()
    assert len(texts) > 12_000
    assert fast["t"].eq_missing(plain["t"]).all()
    assert fast["p"].eq_missing(plain["p"]).all()
    assert fast["t"].ne_missing(frame.collect()["t"]).sum() > 5_000  # the corpus does exercise the rules


# ---- the rules --------------------------------------------------------------------------------------------------

def planted(se_paired: Path) -> tuple[pl.DataFrame, dict[str, str]]:
    """The real pairs with rows planted for each rule: {pair_id: the reason it must be rejected for}."""
    df = se_canonical(se_paired).with_row_index("r")
    r, chosen, rejected, margin = pl.col("r"), pl.col("chosen"), pl.col("rejected"), pl.col("margin")
    df = df.with_columns(
        prompt=pl.when(r == 1).then(pl.concat_list(pl.struct(role=pl.lit("user"), content=pl.lit(" <br/> "))))
        .otherwise(pl.col("prompt")),
        chosen=pl.when(r.is_in([0, 7])).then(pl.lit("<p>  </p>\n\n"))
        .when(r == 2).then(pl.lit("word " * 5000))
        .when(r == 9).then(pl.lit("你好，世界。 ¿Qué? C++ and x <= y.\n\n") + chosen)
        .otherwise(chosen),
        rejected=pl.when(r == 5).then(chosen.str.to_uppercase() + " !!!")
        .when(r == 6).then(chosen.str.replace(r"(\w+)(\W*)$", "zzzz$2"))
        .otherwise(rejected),
        margin=pl.when(r.is_in([3, 7])).then(pl.lit(-1.0)).when(r == 4).then(pl.lit(float("nan")))
        .when(r == 8).then(pl.lit(5.0)).otherwise(margin),
    ).drop("r")
    assert df.row(6, named=True)["rejected"] != df.row(6, named=True)["chosen"]
    # duplicates: two plain copies, one that differs only in markup/whitespace (the same after normalisation),
    # and a copy of a too-long row (attributed to its length, the earlier rule, not to duplicate)
    dups = pl.concat([
        df.slice(10, 2),
        df.slice(13, 1).with_columns(chosen=pl.lit("<p>") + pl.col("chosen") + "</p>   \n\n\n"),
        df.slice(2, 1),
    ]).with_columns(pair_id=pl.col("pair_id") + "-dup")
    df = pl.concat([df, dups])
    ids = df["pair_id"].to_list()
    expect = {ids[0]: "empty_chosen", ids[1]: "empty_prompt", ids[2]: "chosen.max_chars", ids[3]: "min_margin",
              ids[5]: "identical", ids[6]: "near_identical", ids[7]: "empty_chosen",
              ids[-4]: "duplicate", ids[-3]: "duplicate", ids[-2]: "duplicate", ids[-1]: "chosen.max_chars"}
    return df, expect


def test_each_rule_drops_what_it_should_and_counts_it(tmp_path, se_paired):
    df, expect = planted(se_paired)
    store = ArtifactStore(tmp_path)
    dl = commit_download(store, df)
    res = run_clean(tmp_path, dl, chosen=FieldLimits(max_chars=20_000), min_margin=0.0)
    out = Path(res.path)
    report = json.loads((out / "report.json").read_text())
    pairs, rejects = pl.read_parquet(out / "pairs.parquet"), pl.read_parquet(out / "rejects.parquet")

    assert dict(zip(rejects["pair_id"], rejects["reason"])) == expect
    counts: dict[str, int] = {}
    for reason in expect.values():
        counts[reason] = counts.get(reason, 0) + 1
    assert report["rejected_by_rule"] == counts
    assert list(report["rejected_by_rule"]) == [r for r in clean.rule_order({}) if r in counts]  # fixed order
    assert report["rows_in"] == df.height == pairs.height + rejects.height == report["rows_out"] + rejects.height
    assert res.manifest["rows_in"] == df.height and res.manifest["rows_rejected"] == rejects.height
    assert report["rules"]["min_margin"] == 0.0 and report["rules"]["chosen.max_chars"] == 20_000
    # the schemas: canonical pairs, canonical + reason + detail rejects
    assert pairs.schema == pl.Schema(CANONICAL_SCHEMA)
    assert rejects.columns == [*CANONICAL_SCHEMA, "reason", "detail"] and rejects["detail"].null_count() == 0
    assert "chosen: 24999 chars > 20000" in rejects.filter(pl.col("reason") == "chosen.max_chars")["detail"][0]
    # the duplicate rule kept the first occurrence, and the kept table has no repeated pair
    ids = df["pair_id"].to_list()
    assert {ids[10], ids[11], ids[13]} <= set(pairs["pair_id"])
    key = pairs.select(pl.col("prompt").list.eval(pl.element().struct.field("content")).list.join("\n"),
                       "chosen", "rejected")
    assert key.is_duplicated().sum() == 0
    # a NaN margin is a missing margin: kept (missing_margin=keep), written as null; a margin >= min kept
    kept = {r["pair_id"]: r for r in pairs.iter_rows(named=True)}
    assert kept[ids[4]]["margin"] is None and kept[ids[8]]["margin"] == 5.0
    assert not pairs["margin"].is_nan().any()
    # normalised texts are written; CJK and punctuation survive
    assert kept[ids[9]]["chosen"].startswith("你好，世界。 ¿Qué? C++ and x <= y.\n\n")
    # every kept text is non-empty and within the limits
    assert pairs["chosen"].str.len_chars().max() <= 20_000 and pairs["chosen"].str.len_chars().min() > 0


def test_missing_margin_drop_token_limits_and_rules_off(tmp_path, se_paired):
    df, _ = planted(se_paired)
    store = ArtifactStore(tmp_path)
    dl = commit_download(store, df)
    res = run_clean(tmp_path, dl, missing_margin="drop", near_identical=None, dedupe=False,
                    rejected=FieldLimits(min_chars=1, max_tokens=1000), chars_per_token=4.0)
    report = json.loads((Path(res.path) / "report.json").read_text())
    rejects = pl.read_parquet(Path(res.path) / "rejects.parquet")
    by_rule = report["rejected_by_rule"]
    assert "near_identical" not in by_rule and "duplicate" not in by_rule   # rules off
    n_long = df.filter(pl.col("rejected").str.len_chars() > 4000)  # > 1000 approx tokens before normalisation
    assert by_rule["rejected.max_tokens"] >= 1 and by_rule["rejected.max_tokens"] <= n_long.height
    for d in rejects.filter(pl.col("reason") == "rejected.max_tokens")["detail"]:
        assert int(d.split(": ")[1].split()[0]) > 1000
    # every pair without a finite margin is dropped as missing_margin unless an earlier rule took it
    pairs = pl.read_parquet(Path(res.path) / "pairs.parquet")
    assert pairs["margin"].null_count() == 0 and set(pairs["margin"]) == {-1.0, 5.0}  # min_margin off
    assert by_rule["missing_margin"] == rejects.filter(pl.col("reason") == "missing_margin").height > 1000
    assert report["rows_in"] == pairs.height + rejects.height


def test_threshold_that_drops_nothing_gives_byte_identical_pairs(tmp_path, se_paired):
    df, _ = planted(se_paired)
    store = ArtifactStore(tmp_path)
    dl = commit_download(store, df)
    a = run_clean(tmp_path, dl, min_margin=0.0)
    b = run_clean(tmp_path, dl, min_margin=-0.5)   # the only negative margin is -1: drops the same rows
    c = run_clean(tmp_path, dl, min_margin=-2.0)   # drops nothing: differs
    assert a.key != b.key and a.status == b.status == "ran"
    pa, pb, pc = (Path(r.path) / "pairs.parquet" for r in (a, b, c))
    assert pa.read_bytes() == pb.read_bytes()
    assert pa.read_bytes() != pc.read_bytes()
    assert a.manifest["rows_out"] + 1 == c.manifest["rows_out"]


def test_a_threshold_change_reruns_clean_alone_with_the_bytes_of_a_fresh_run(tmp_path, se_paired):
    df, _ = planted(se_paired)
    first = tmp_path / "first"
    dl = commit_download(ArtifactStore(first), df)
    a = run_clean(first, dl)
    b = run_clean(first, dl, min_margin=0.0, chosen=FieldLimits(max_chars=3000))
    assert a.normalised.status == "ran" and b.normalised.status == "cached"     # the texts are not redone
    assert b.normalised.key == a.normalised.key and b.status == "ran" and b.key != a.key
    assert b.manifest["rows_rejected"] > a.manifest["rows_rejected"]
    fresh = tmp_path / "fresh"
    c = run_clean(fresh, commit_download(ArtifactStore(fresh), df), min_margin=0.0,
                  chosen=FieldLimits(max_chars=3000))
    assert c.normalised.status == c.status == "ran" and c.key == b.key
    for f in ("pairs.parquet", "rejects.parquet", "report.json"):
        assert (Path(b.path) / f).read_bytes() == (Path(c.path) / f).read_bytes(), f


@pytest.mark.parametrize("threshold", [0.5, 0.9])
def test_near_identical_at_any_threshold_matches_a_direct_computation(tmp_path, se_paired, threshold):
    """The normalise stage measures similarity only for length ratios >= SIM_FLOOR; a threshold below that makes
    clean compute the rest: either way the rejected pairs are those of the rule computed on every pair."""
    df, _ = planted(se_paired)
    # pairs whose rejected answer is the first 65% of the chosen one: length ratio ~0.65, below SIM_FLOOR
    r, chosen = pl.int_range(pl.len()), pl.col("chosen")
    df = df.with_columns(rejected=pl.when((r >= 20) & (r < 40))
                         .then(chosen.str.slice(0, (chosen.str.len_chars() * 0.65).cast(pl.Int64)))
                         .otherwise(pl.col("rejected")))
    dl = commit_download(ArtifactStore(tmp_path), df)
    res = run_clean(tmp_path, dl, near_identical=threshold, dedupe=False)
    pairs = pl.scan_parquet(sorted((Path(res.normalised.path) / "pairs").glob("*.parquet")))
    n_c, n_r = pl.col("chosen").str.len_chars(), pl.col("rejected").str.len_chars()
    ratio = pl.min_horizontal(n_c, n_r) / pl.max_horizontal(n_c, n_r).clip(1)
    same = text.canonical_text(pl.col("chosen")) == text.canonical_text(pl.col("rejected"))
    earlier = (n_c == 0) | (n_r == 0) | (pl.col("prompt").list.eval(pl.element().struct.field("content")).list
                                          .join("").str.len_chars() == 0) | ((ratio >= 0.8) & same)
    expect = pairs.filter(~earlier & (ratio >= threshold)
                          & (text.jaccard(pl.col("chosen"), pl.col("rejected")) >= threshold)).collect()["pair_id"]
    rejects = pl.read_parquet(Path(res.path) / "rejects.parquet")
    got = rejects.filter(pl.col("reason") == "near_identical")["pair_id"]
    assert sorted(got) == sorted(expect) and len(expect) >= (1 if threshold > 0.8 else 15)


def test_status_says_which_part_would_rerun_and_why(tmp_path, se_paired):
    from worldpm.status import pipeline_status

    def rows(*overrides: str) -> dict[str, dict]:
        cfg = load_config(None, [f"artifacts_dir={tmp_path}", *overrides], [str(se_paired)])
        return {r["stage"]: r for r in pipeline_status(pipeline, cfg)}

    cfg = load_config(None, [f"artifacts_dir={tmp_path}"], [str(se_paired)])
    store = ArtifactStore(tmp_path)
    dl = pipeline.execute("download", cfg, {}, store)
    norm = pipeline.execute("normalise", cfg, {"download": dl.ref}, store)
    pipeline.execute("clean", cfg, {"normalise": norm.ref}, store)
    st = rows("clean.min_margin=1")
    assert st["download"]["status"] == st["normalise"]["status"] == "cached"
    assert st["clean"]["status"] == "would run" and "clean.min_margin: None -> 1" in st["clean"]["why"]
    st = rows("clean.normalize_markup=false")
    assert st["normalise"]["status"] == "would run"
    assert "clean.normalize_markup: True -> False" in st["normalise"]["why"]
    assert st["clean"]["status"] == "would run" and "after normalise" in st["clean"]["why"]


def test_normalise_keys_on_the_downloaded_pairs_not_on_the_sources_note(tmp_path, se_paired):
    """A new hub revision with the same data files (sources.json differs, pairs do not) must not renormalise."""
    frame = se_canonical(se_paired).head(50)
    store = ArtifactStore(tmp_path)
    keys = []
    for i, revision in enumerate(("aaaa", "bbbb")):
        tmp = store.new_tmp("download", f"dl{i}")
        (tmp / "pairs").mkdir()
        frame.write_parquet(tmp / "pairs" / "00000-se.parquet", compression="zstd")
        (tmp / "sources.json").write_text(json.dumps([{"resolved_revision": revision}]))
        dl = store.commit("download", f"dl{i}", tmp, {"rows_in": 50, "rows_out": 50, "rows_rejected": 0})
        keys.append(pipeline.resolve("normalise", load_config(None), {"download": dl})[0])
    assert keys[0] == keys[1]


def test_normalize_markup_off_keeps_the_markup(tmp_path, se_paired):
    df = se_canonical(se_paired).head(50).with_columns(chosen=pl.lit("<p>a &amp; b</p>\r\n") + pl.col("chosen"))
    store = ArtifactStore(tmp_path)
    dl = commit_download(store, df)
    res = run_clean(tmp_path, dl, normalize_markup=False)
    pairs = pl.read_parquet(Path(res.path) / "pairs.parquet")
    assert pairs.height == 50 and pairs["chosen"].str.starts_with("<p>a &amp; b</p>\n").all()


def test_through_the_download_stage(tmp_path, se_paired):
    """The real upstream: the download stage reads the raw files; clean counts every pair it gets."""
    cfg = load_config(None, [f"artifacts_dir={tmp_path}", "clean.chosen.max_chars=1500"], [str(se_paired)])
    store = ArtifactStore(tmp_path)
    dl = pipeline.execute("download", cfg, {}, store)
    norm = pipeline.execute("normalise", cfg, {"download": dl.ref}, store)
    res = pipeline.execute("clean", cfg, {"normalise": norm.ref}, store)
    report = json.loads((Path(res.path) / "report.json").read_text())
    assert report["rows_in"] == dl.manifest["rows_out"] == norm.manifest["rows_out"] \
        == report["rows_out"] + report["rows_rejected"]
    assert report["rejected_by_rule"].get("chosen.max_chars", 0) > 0
    again = pipeline.execute("clean", cfg, {"normalise": norm.ref}, store)
    assert again.status == "cached"


# ---- a crash in the middle ----------------------------------------------------------------------------------------

KILL_SCRIPT = """
import sys
from tasks import PIPELINE as pipeline
from worldpm.config import PipelineConfig
from worldpm.store import ArtifactStore
store = ArtifactStore(sys.argv[1])
dl = store.get("download", "test-download")
pipeline.execute("normalise", PipelineConfig(artifacts_dir=sys.argv[1]), {"download": dl}, store)
print("normalise done", flush=True)
"""


@pytest.mark.slow
def test_killed_in_the_middle_of_normalise_leaves_no_artifact(tmp_path, se_paired):
    root = tmp_path / "store"
    store = ArtifactStore(root)
    dl = commit_download(store, se_canonical(se_paired, copies=30))  # ~90 MB of text: seconds of work
    cfg = PipelineConfig(artifacts_dir=str(root))
    key, _ = pipeline.resolve("normalise", cfg, {"download": dl})
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(root)], stdout=subprocess.PIPE, text=True,
                            start_new_session=True, cwd=Path(__file__).resolve().parents[1])
    try:
        deadline = time.monotonic() + 120
        while not list((root / "normalise").glob(f".tmp-{key}-*")):  # writing into its temporary folder
            assert proc.poll() is None and time.monotonic() < deadline, "normalise ended before it could be killed"
            time.sleep(0.01)
        time.sleep(0.5)  # well inside the normalisation
        assert proc.poll() is None, "normalise finished before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert store.get("normalise", key) is None and not (root / "normalise" / key).exists()
    assert list((root / "normalise").glob(f".tmp-{key}-*"))  # the unfinished output is there, and never trusted
    res = pipeline.execute("normalise", cfg, {"download": dl}, store)
    assert res.status == "ran" and store.get("normalise", key) is not None
    assert res.manifest["rows_in"] == 30 * 1396 == res.manifest["rows_out"]
    assert not list((root / "normalise").glob(".tmp-*"))  # the unfinished folder was removed


def test_a_progress_line_reaches_the_terminal_only_when_the_work_was_long():
    """Short work's progress line is detail (the log file and the Prefect UI keep it; the terminal shows it with
    --verbose): the stage's summary line follows at once. Work over LONG_WORK_S prints it. No clock is raced: t0 is
    set in the past."""
    import logging

    from tasks import clean as stage

    records: list[logging.LogRecord] = []
    log = logging.getLogger("test_clean.progress")
    handler = logging.Handler()
    handler.emit = records.append
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        stage._progress(log, "judged", time.perf_counter(), 1000)
        stage._progress(log, "judged", time.perf_counter() - stage.LONG_WORK_S - 1, 10**8)
    finally:
        log.removeHandler(handler)
    assert [getattr(r, "worldpm_detail", False) for r in records] == [True, False]
