"""Evaluation during training (train.eval_at, worldpm/modeling/trainer/evalcurve.py): where the points land, what a
record holds (checked against the saved model scored outside the trainer) and resume. 1 process against 2 (with a
resume in 2 processes) is tests/test_train.py's launched 2-process test, which evaluates during training too."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from support import LOG, RB, RB_SET, CrashAfter, SimulatedCrash, curve, eval_records, tiny_cfg, train_inputs
from tasks import PIPELINE as pipeline
from worldpm.config import EvalAtConfig
from worldpm.modeling import models
from worldpm.modeling.trainer.data import load_pairs
from worldpm.modeling.trainer.evalcurve import eval_steps


def test_eval_steps_every_n_and_log_spaced():
    seen = np.arange(0, 101) * 8  # 100 steps of 8 pairs
    assert eval_steps(seen, EvalAtConfig(every=30)) == [30, 60, 90, 100]
    assert eval_steps(seen, EvalAtConfig(every=50)) == [50, 100]
    assert eval_steps(seen, EvalAtConfig()) == []
    steps = eval_steps(seen, EvalAtConfig(log_points=5))
    # 8 .. 800 pairs, log-spaced: 8, 25.3, 80, 253, 800 pairs -> steps 1, 4 (25.3 / 8 rounded up), 10, 32, 100
    assert steps == [1, 4, 10, 32, 100]
    # more points than the start can hold apart: moved apart, min(K, steps) distinct, the last step always
    ten = eval_steps(seen, EvalAtConfig(log_points=10))
    assert len(ten) == len(set(ten)) == 10 and ten[0] == 1 and ten[-1] == 100 and ten == sorted(ten)
    assert eval_steps(np.arange(0, 4) * 8, EvalAtConfig(log_points=10)) == [1, 2, 3]
    # uneven steps (token-budget micro-batches): the targets are pairs seen, not steps
    uneven = np.concatenate([[0], np.cumsum([1] * 10 + [100] * 10)])
    assert eval_steps(uneven, EvalAtConfig(log_points=3)) == [1, 11, 20]
    with pytest.raises(Exception, match="not both"):
        EvalAtConfig(every=3, log_points=4)


def test_eval_at_records_where_asked_and_as_the_saved_model_scores(tokenized):
    """log_points 4 over 6 steps: records at eval_steps(pairs seen) for the eval split and a RewardBench-format set
    (whole set, then each subset, with its category); metrics.jsonl rows carry pairs_seen / tokens_seen; the last
    point's numbers are those of the saved model scored outside the trainer (plain transformers, padded)."""
    store, tok, _ = tokenized
    res = pipeline.execute("train", tiny_cfg(RB_SET, "train.eval_at={log_points: 4}"), train_inputs(store, tok), store,
                           log=LOG)
    out = Path(res.ref.path)
    logged = curve(out)
    pairs_seen = np.concatenate([[0], [r["pairs_seen"] for r in logged]])
    assert [r["step"] for r in logged] == [1, 2, 3, 4, 5, 6]
    assert list(pairs_seen[1:]) == list(np.cumsum([r["pairs"] for r in logged]))
    assert all(r["tokens_seen"] >= r["pairs_seen"] * 2 for r in logged)
    want = eval_steps(pairs_seen, EvalAtConfig(log_points=4))
    assert want == [1, 2, 4, 6]
    recs = eval_records(out)
    assert sorted({r["step"] for r in recs}) == want
    for r in recs:  # the x-axis of a record is the training log's at that step
        assert (r["pairs_seen"], r["tokens_seen"]) == next((m["pairs_seen"], m["tokens_seen"]) for m in logged
                                                           if m["step"] == r["step"])
    whole = [r for r in recs if r["subset"] is None]
    assert [(r["step"], r["set"], r["category"]) for r in whole] == [
        (s, name, cat) for s in want for name, cat in (("eval", None), ("rb", "adversarial"))]
    rb_subsets = {r["subset"] for r in recs if r["set"] == "rb" and r["subset"]}
    assert rb_subsets == {json.loads(x)["subset"] for x in RB.read_text().splitlines()}
    assert all(r["n"] == 32 for r in whole if r["set"] == "rb")
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["eval_curve"]["points"] == want and summary["eval_curve"]["sets"]["rb"]["category"] == "adversarial"
    assert res.manifest["eval_curve_points"] == 4

    # the last point is the saved model: score the eval split with plain transformers
    model = models.load_reward_model(out / "model")
    data = load_pairs(Path(tok.path) / "eval.parquet")
    pad = model.config.pad_token_id
    rc = models.score_token_ids(model, [data.seq("chosen", i) for i in range(len(data))], pad).astype(np.float64)
    rr = models.score_token_ids(model, [data.seq("rejected", i) for i in range(len(data))], pad).astype(np.float64)
    last = next(r for r in whole if r["step"] == 6 and r["set"] == "eval")
    assert last["n"] == len(data)
    assert last["bt_loss"] == pytest.approx(float(np.mean(np.logaddexp(0.0, -(rc - rr)))), abs=1e-4)
    assert last["accuracy"] == pytest.approx(float(np.mean((rc > rr) + 0.5 * (rc == rr))), abs=1e-9)


def test_eval_at_resumes_without_duplicates_or_gaps(tokenized, tmp_path, in_process_trainer):
    """A run killed after step 3 (points every step, checkpoints every 2) resumes from step 2: the records of step 3
    are dropped and redone; a point at the resumed step whose records were lost is evaluated first. The file then
    equals an uninterrupted run's."""
    from worldpm.store import ArtifactStore

    store, tok, _ = tokenized
    inputs = train_inputs(store, tok)
    cfg = tiny_cfg(RB_SET, "train.eval_at={every: 1}", "train.seed=7")
    ref = pipeline.execute("train", cfg, inputs, ArtifactStore(tmp_path / "plain"), log=LOG)
    in_process_trainer.callbacks = [CrashAfter()]
    with pytest.raises(SimulatedCrash):
        pipeline.execute("train", cfg, inputs, store, log=LOG)
    key = ref.key
    work_file = Path(store.root) / "train" / f".work-{key}" / "eval_curve.jsonl"
    assert sorted({r["step"] for r in (json.loads(x) for x in work_file.read_text().splitlines())}) == [1, 2, 3]
    # a crash between step 2's checkpoint and its point: its records never made it to the file
    kept = [x for x in work_file.read_text().splitlines() if json.loads(x)["step"] != 2]
    work_file.write_text("".join(x + "\n" for x in kept))
    in_process_trainer.callbacks = []
    res = pipeline.execute("train", cfg, inputs, store, log=LOG)
    assert res.manifest["resumed_from_step"] == 2
    a, b = eval_records(Path(ref.ref.path)), eval_records(Path(res.ref.path))
    assert sorted(r["step"] for r in b) == sorted(r["step"] for r in a)  # each point once
    key_of = lambda r: (r["step"], r["set"], r["subset"])  # noqa: E731
    b_by = {key_of(r): r for r in b}
    for r in a:
        assert b_by[key_of(r)]["bt_loss"] == pytest.approx(r["bt_loss"], abs=1e-5), key_of(r)
