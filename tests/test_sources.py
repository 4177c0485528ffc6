"""Source adapters on the real shared files (checked against the raw records) and on fixtures written from the
published schemas; bad input is quarantined with a reason or stops with one line naming the file."""
from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import polars as pl
import pytest

from worldpm.data.sources import AdapterError, read_source_file
from worldpm.data.schema import CANONICAL_SCHEMA

FIXTURES = Path(__file__).parent / "fixtures" / "sources"


def load(path, fmt="auto", **kw):
    r = read_source_file(path, fmt, tag="t", **kw)
    pairs, rejects = r.pairs.collect(), r.rejects.collect()
    assert dict(pairs.schema) == CANONICAL_SCHEMA
    return r, pairs, rejects


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


# ---- the shared real data --------------------------------------------------------------------------------------
def test_stack_exchange_paired_response_j_is_chosen(se_paired):
    f = se_paired / "reward" / "coffee.stackexchange.com-00000-of-00001.parquet"
    raw = pl.read_parquet(f)
    r, pairs, rejects = load(f)
    assert r.format == "stack_exchange_paired" and pairs.height == raw.height and rejects.height == 0
    for i in (0, 5, 77):
        row, pair = raw.row(i, named=True), pairs.row(i, named=True)
        assert pair["chosen"] == row["response_j"] and pair["rejected"] == row["response_k"]
        assert pair["prompt"] == [{"role": "user", "content": row["question"]}]
        assert pair["group_id"] == f"se:coffee.stackexchange.com:{row['qid']}"
        assert pair["domain"] == "coffee.stackexchange.com"


def test_stack_exchange_preferences_higher_pm_score_is_chosen(shared_data):
    f = shared_data / "stack-exchange-preferences" / "coffee.stackexchange.com.jsonl"
    raw = [json.loads(line) for line in f.read_text().splitlines()]
    r, pairs, rejects = load(f, max_pairs_per_question=2)
    assert r.format == "stack_exchange_preferences"
    text_score = {a["text"]: a["pm_score"] for q in raw for a in q["answers"]}
    assert pairs.height > 50
    for p in pairs.head(40).iter_rows(named=True):
        assert text_score[p["chosen"]] > text_score[p["rejected"]]
        assert p["margin"] == text_score[p["chosen"]] - text_score[p["rejected"]]
    assert pairs.group_by("group_id").len()["len"].max() <= 2
    # every question accounted for: it gave pairs or is rejected as no_pair
    assert pairs["group_id"].n_unique() + rejects.height == len(raw) == r.records
    assert set(rejects["reason"]) == {"no_pair"}
    # the full question set matches the paired dataset built from the same dump (at most 10 per question)
    _, all_pairs, _ = load(f)
    assert all_pairs.height == 129


def test_posts_xml_more_votes_is_chosen(shared_data):
    import xml.etree.ElementTree as ET

    f = shared_data / "stackexchange-dumps" / "coffee.stackexchange.com" / "Posts.xml"
    votes = {}
    for _, el in ET.iterparse(f):
        if el.tag == "row" and el.get("PostTypeId") == "2":
            votes[el.get("Body")] = int(el.get("Score"))
    r, pairs, rejects = load(f)
    assert r.format == "stackexchange_posts_xml" and pairs.height > 100
    for p in pairs.iter_rows(named=True):
        assert votes[p["chosen"]] - votes[p["rejected"]] == p["margin"] > 0
    assert pairs["group_id"].n_unique() + rejects.height == r.records
    assert pairs["domain"].unique().to_list() == ["coffee.stackexchange.com"]


def test_hh_rlhf_transcripts_are_parsed(shared_data):
    f = shared_data / "hh_rlhf" / "harmless-base_test.jsonl.gz"
    with gzip.open(f, "rt") as fh:
        raw = [json.loads(next(fh)) for _ in range(3)]
    r, pairs, rejects = load(f)
    assert r.format == "hh_rlhf" and pairs.height + rejects.height == r.records == 2312
    for row in raw:
        p = pairs.filter(pl.col("chosen") == row["chosen"].rsplit("\n\nAssistant:", 1)[1].strip()).row(0, named=True)
        assert p["rejected"] == row["rejected"].rsplit("\n\nAssistant:", 1)[1].strip()
        assert p["prompt"][0]["role"] == "user" and p["prompt"][-1]["role"] == "user"
        assert row["chosen"].startswith("\n\nHuman: " + p["prompt"][0]["content"])
        assert [m["role"] for m in p["prompt"]] == ["user", "assistant"] * (len(p["prompt"]) // 2) + ["user"]


def test_ultrafeedback_scores_give_the_margin(shared_data):
    f = shared_data / "ultrafeedback_binarized_sample" / "eval_clean.jsonl"
    raw = [json.loads(line) for line in f.read_text().splitlines()[:3]]
    r, pairs, _ = load(f)
    assert r.format == "ultrafeedback" and pairs.height == 200
    for i, row in enumerate(raw):
        p = pairs.row(i, named=True)
        assert (p["chosen"], p["rejected"]) == (row["chosen"], row["rejected"])
        assert p["prompt"] == [{"role": "user", "content": row["prompt"]}]
        assert p["margin"] == row["metadata"]["score_chosen"] - row["metadata"]["score_rejected"]


def test_sharegpt_and_question_response_keep_cjk(shared_data):
    f = shared_data / "medicalgpt_zh" / "dpo_zh_500.jsonl"
    raw = json.loads(f.read_text().splitlines()[0])
    r, pairs, _ = load(f)
    assert r.format == "sharegpt"
    p = pairs.row(0, named=True)
    assert (p["chosen"], p["rejected"]) == (raw["chosen"], raw["rejected"])
    assert p["prompt"] == [{"role": "user", "content": raw["conversations"][0]["value"]}]
    f = shared_data / "medicalgpt_zh" / "medical_reward_test.jsonl"
    raw = json.loads(f.read_text().splitlines()[1])
    r, pairs, _ = load(f)
    assert r.format == "question_response"
    p = pairs.row(1, named=True)
    assert (p["chosen"], p["rejected"], p["prompt"][0]["content"]) == (
        raw["response_chosen"], raw["response_rejected"], raw["question"])


# ---- fixtures written from the published schemas --------------------------------------------------------------
def test_helpsteer2_sign_of_strength_picks_the_better(tmp_path):
    f = write_jsonl(tmp_path / "preference.jsonl", [
        {"split": "train", "prompt": "Q1", "response_1": "A", "response_2": "B", "preference_strength": -2},
        {"split": "train", "prompt": "Q2", "response_1": "C", "response_2": "D", "preference_strength": 3},
        {"split": "val", "prompt": "Q3", "response_1": "E", "response_2": "F", "preference_strength": 0},
    ])
    r, pairs, rejects = load(f)
    assert r.format == "helpsteer2"
    assert pairs.select("chosen", "rejected", "margin").rows() == [("A", "B", 2.0), ("D", "C", 3.0)]
    assert rejects["reason"].to_list() == ["no_preference"] and "record 3" in rejects["detail"][0]


def test_generic_strings_messages_and_text_parts(tmp_path):
    rows = [
        {"prompt": "plain?", "chosen": "good", "rejected": "bad"},
        {"prompt": [{"role": "system", "content": "be nice"}, {"role": "user", "content": "msgs?"}],
         "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "good"}, {"type": "text", "text": "2"}]}],
         "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "bad"}]}]},
    ]
    # one file per shape: JSON list and JSONL
    (tmp_path / "a.json").write_text(json.dumps(rows[:1]))
    r, pairs, _ = load(tmp_path / "a.json")
    assert r.format == "prompt_chosen_rejected"
    assert pairs.select("chosen", "rejected").row(0) == ("good", "bad")
    r, pairs, _ = load(write_jsonl(tmp_path / "b.jsonl", rows[1:]))
    p = pairs.row(0, named=True)
    assert p["prompt"] == [{"role": "system", "content": "be nice"}, {"role": "user", "content": "msgs?"}]
    assert (p["chosen"], p["rejected"]) == ("good\n2", "bad")
    # conversations in chosen/rejected without a prompt column: the shared turns are the prompt
    conv = [{"chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello!"}],
             "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "go away"}]}]
    r, pairs, _ = load(write_jsonl(tmp_path / "c.jsonl", conv))
    p = pairs.row(0, named=True)
    assert p["prompt"] == [{"role": "user", "content": "hi"}] and (p["chosen"], p["rejected"]) == ("hello!", "go away")
    # CSV and a RewardBench-style subset column (kept as the domain)
    pl.DataFrame({"prompt": ["p"], "chosen": ["c"], "rejected": ["r"], "subset": ["xstest-should-respond"]}) \
        .write_csv(tmp_path / "rb.csv")
    _, pairs, _ = load(tmp_path / "rb.csv")
    assert pairs["domain"].to_list() == ["xstest-should-respond"]


def test_posts_xml_with_bom_ties_orphans_and_a_bad_post():
    f = FIXTURES / "tea.stackexchange.com" / "Posts.xml"
    assert f.read_bytes().startswith(b"\xef\xbb\xbf")
    r, pairs, rejects = load(f)
    assert r.format == "stackexchange_posts_xml" and r.records == 4  # 3 questions + 1 unreadable post
    # question 1: answer 3 (9 votes) beats 2 and 4 (1 vote each, a tie: no pair between them)
    q1 = pairs.filter(pl.col("group_id") == "se:tea.stackexchange.com:1")
    assert q1["chosen"].unique().to_list() == ["<p>Two to three minutes at 80 \u00b0C; longer turns it bitter.</p>"]
    assert sorted(q1["rejected"]) == ["<p>Five minutes.</p>", "<p>Until it tastes right.</p>"]
    assert q1["margin"].to_list() == [8.0, 8.0] and q1["date"].to_list() == ["2016-02-01"] * 2
    assert q1["prompt"][0].to_list() == [{"role": "user", "content": "Steeping time for green tea\n\n"
                                                                      "<p>How long should green tea steep?</p>"}]
    # a negative net vote is a vote gap like any other
    q8 = pairs.filter(pl.col("group_id") == "se:tea.stackexchange.com:8").row(0, named=True)
    assert (q8["chosen_score"], q8["rejected_score"], q8["margin"]) == (4.0, -2.0, 6.0)
    # question 5 has only tied answers; post 12 has a score that is no number: both rejected with a reason
    assert sorted(rejects["reason"]) == ["bad_post", "no_pair"]
    assert "post 12" in rejects.filter(pl.col("reason") == "bad_post")["detail"][0]
    # what is left out is counted: the orphan answer, the tag-wiki post, the tied pairs
    counts, = pl.collect_all(r.frames()[1:])
    assert counts.row(0, named=True) == {"answers": 8, "answers_unusable": 0, "candidate_pairs": 5,
                                         "equal_score_pairs": 2, "answers_orphan": 1}
    assert r.stats["posts_other"] == 1
    used = pl.collect_all(r.frames()[:1])[0]["n"][0]
    assert r.records == used + rejects.height


def test_preferences_ties_are_counted(shared_data):
    f = shared_data / "stack-exchange-preferences" / "beer.stackexchange.com.jsonl"
    raw = [json.loads(line) for line in f.read_text().splitlines()]
    r, pairs, rejects = load(f, max_pairs_per_question=1000)
    used, counts = pl.collect_all(r.frames())
    c = counts.row(0, named=True)
    # without a cap every candidate pair is written unless its two answers tie
    assert c["candidate_pairs"] - c["equal_score_pairs"] == pairs.height
    assert c["answers"] == sum(len(q["answers"]) for q in raw)
    ties = sum(1 for q in raw for i, a in enumerate(q["answers"]) for b in q["answers"][i + 1:]
               if a["pm_score"] == b["pm_score"])
    assert c["equal_score_pairs"] == ties > 0
    assert used["n"][0] + rejects.height == r.records == len(raw)
    assert pairs["domain"].unique().to_list() == ["beer.stackexchange.com"]


def test_domain_from_metadata_when_the_file_name_has_no_site(tmp_path, shared_data):
    f = tmp_path / "train-00000-of-00001.jsonl"
    f.write_bytes((shared_data / "stack-exchange-preferences" / "coffee.stackexchange.com.jsonl").read_bytes())
    _, pairs, _ = load(f)
    assert pairs["domain"].unique().to_list() == ["coffee.stackexchange.com"]
    assert pairs["group_id"].str.starts_with("se:coffee.stackexchange.com:").all()


def test_helpsteer2_fixture_multi_turn_prompt():
    r, pairs, rejects = load(FIXTURES / "helpsteer2" / "preference.jsonl")
    assert r.format == "helpsteer2" and r.records == 4
    assert pairs.select("chosen", "rejected", "margin").rows() == [
        ("A pothos: it tolerates low light and irregular watering.", "Plants are nice.", 3.0),
        ("You are right, sorry: 7 is prime.", "6", 2.0),
        ("4", "5", 1.0)]
    assert pairs["prompt"][1].to_list() == [{"role": "user", "content": "Name a prime number."},
                                            {"role": "assistant", "content": "4"},
                                            {"role": "user", "content": "That is not prime. Try again."}]
    assert pairs["domain"].null_count() == 3  # `split` is not a domain
    assert rejects["reason"].to_list() == ["no_preference"]


def test_sharegpt_with_message_responses(tmp_path):
    rows = [{"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "2+2?"}],
             "chosen": {"from": "gpt", "value": "4"}, "rejected": {"from": "gpt", "value": "5"}}]
    r, pairs, _ = load(write_jsonl(tmp_path / "s.jsonl", rows))
    assert r.format == "sharegpt"
    p = pairs.row(0, named=True)
    assert p["prompt"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    assert (p["chosen"], p["rejected"]) == ("4", "5")


def test_unknown_shape_names_the_columns_and_the_formats(tmp_path):
    f = write_jsonl(tmp_path / "odd.jsonl", [{"text": "x", "label": 1}])
    with pytest.raises(AdapterError) as e:
        read_source_file(f)
    msg = str(e.value)
    assert msg.startswith(str(f)) and "columns found: label, text" in msg and "\n" not in msg
    for fmt in ("stack_exchange_paired", "helpsteer2", "hh_rlhf", "sharegpt", "stackexchange_posts_xml"):
        assert fmt in msg


# ---- bad input ----------------------------------------------------------------------------------------------
def test_malformed_line_and_invalid_utf8_are_quarantined_with_line(tmp_path):
    f = tmp_path / "mixed.jsonl"
    good = json.dumps({"prompt": "p", "chosen": "c", "rejected": "r"}).encode()
    f.write_bytes(good + b"\n" + b'{"prompt": "p", "chosen": \n' + good.replace(b'"c"', b'"caf\xe9"') + b"\n"
                  + good.replace(b'"c"', b'"c2"') + b"\n")
    r, pairs, rejects = load(f)
    assert pairs.height == 2 and r.records == 4
    got = {(x["reason"], x["line"]) for x in rejects.iter_rows(named=True)}
    assert got == {("malformed_json", 2), ("invalid_utf8", 3)}
    assert all(str(f) in d for d in rejects["detail"])


def test_nan_margin_is_quarantined(tmp_path):
    f = write_jsonl(tmp_path / "m.jsonl", [{"prompt": "p", "chosen": "c", "rejected": "r", "margin": 1.5},
                                          {"prompt": "p2", "chosen": "c", "rejected": "r", "margin": math.nan}])
    # json.dumps writes the non-JSON token NaN, as Python tools do: the line is quarantined
    _, pairs, rejects = load(f)
    assert pairs["margin"].to_list() == [1.5]
    assert rejects.select("reason", "line").rows() == [("non_finite_number", 2)]
    # a real NaN in a typed column (Parquet) is rejected by the adapter
    pl.DataFrame({"prompt": ["p", "q"], "chosen": ["c", "c"], "rejected": ["r", "r"], "margin": [1.0, math.nan]}) \
        .write_parquet(tmp_path / "m.parquet")
    _, pairs, rejects = load(tmp_path / "m.parquet")
    assert pairs["margin"].to_list() == [1.0] and rejects["reason"].to_list() == ["bad_margin"]


def test_huge_answer_passes_through_to_clean(tmp_path):
    big = "x" * (5 * 1024 * 1024)
    f = write_jsonl(tmp_path / "big.jsonl", [{"prompt": "p", "chosen": big, "rejected": "r"}])
    _, pairs, _ = load(f)
    assert pairs["chosen"].str.len_bytes().to_list() == [len(big)]


@pytest.mark.parametrize("content, needle", [
    (b"", "empty file"),
    (b"\n\n", "empty file"),
    (b'{"foo": 1, "bar": "x"}\n', "columns found: bar, foo"),
])
def test_unreadable_files_stop_with_one_line(tmp_path, content, needle):
    f = tmp_path / "bad.jsonl"
    f.write_bytes(content)
    with pytest.raises(AdapterError) as e:
        read_source_file(f)
    msg = str(e.value)
    assert str(f) in msg and needle in msg and "\n" not in msg


def test_named_format_with_missing_columns(tmp_path):
    f = write_jsonl(tmp_path / "x.jsonl", [{"prompt": "p", "chosen": "c"}])
    with pytest.raises(AdapterError, match="needs column.*rejected"):
        read_source_file(f, "prompt_chosen_rejected")


def test_latin1_and_ragged_csv_records_are_quarantined_like_bad_jsonl_lines(tmp_path):
    """issue 12 case 12: a CSV with one Latin-1 record used to be refused whole (`not a readable CSV file`)."""
    f = tmp_path / "pairs.csv"
    f.write_bytes(b"prompt,chosen,rejected\n"
                  b"Best grind for espresso?,Fine,Coarse\n"
                  b"\"A question\nover two lines\",\"Yes, since caf\xe9 means coffee\",No\n"  # Latin-1, starts on line 3
                  b"Too,many,fields,here\n"
                  b"Water temperature?,Just off the boil,Boiling\n")
    r, pairs, rejects = load(f)
    assert r.records == 4 and pairs["chosen"].to_list() == ["Fine", "Just off the boil"]
    got = {(x["reason"], x["line"]) for x in rejects.iter_rows(named=True)}
    assert got == {("invalid_utf8", 3), ("malformed_csv", 5)}
    assert all(d.startswith(f"{f}:") for d in rejects["detail"])
    assert "caf\ufffd means coffee" in rejects.filter(pl.col("reason") == "invalid_utf8")["raw"].item()


def _posts_output(path: Path):
    r, pairs, rejects = load(path)
    return pairs, rejects, [f.to_dicts() for f in pl.collect_all(r.frames())], r.records, r.stats


@pytest.mark.parametrize("site", ["beer.stackexchange.com", "coffee.stackexchange.com", "tea"])
def test_posts_xml_built_in_buckets_equals_built_at_once(shared_data, monkeypatch, site, tmp_path):
    """Posts.xml pairs are built BUCKET_QUESTIONS questions at a time (bounded memory on the 20 GB dumps): buckets
    of 7 questions give the pairs, rejects, counts and order of one bucket holding the whole file. The tea fixture
    has an orphan answer, a bad post and ties; a copy of the beer dump with its question ids repeated takes the
    one-bucket way."""
    from worldpm.data.sources import adapters

    f = FIXTURES / "tea.stackexchange.com" / "Posts.xml" if site == "tea" else \
        shared_data / "stackexchange-dumps" / site / "Posts.xml"
    monkeypatch.setattr(adapters, "BUCKET_QUESTIONS", 10**9)
    whole = _posts_output(f)
    monkeypatch.setattr(adapters, "BUCKET_QUESTIONS", 7)
    small = _posts_output(f)
    assert small[0].equals(whole[0]) and small[1].equals(whole[1]) and small[2:] == whole[2:]
    if site == "beer.stackexchange.com":
        assert small[0].height == 1324
        text = f.read_text(encoding="utf-8-sig")
        rows = text.split("<posts>", 1)[1]
        (tmp_path / site).mkdir()
        twice = tmp_path / site / "Posts.xml"  # every question twice (same Id): the one-bucket fallback
        twice.write_text(text.split("<posts>", 1)[0] + "<posts>" + rows.replace("</posts>", "") + rows,
                         encoding="utf-8")
        doubled = _posts_output(twice)
        assert doubled[3] == 2 * whole[3]
