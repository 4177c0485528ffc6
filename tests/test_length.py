"""Length control at training (worldpm/modeling/length.py): the balance weights and the subsample by hand, the
fitted length expert against its closed form, the decorrelation penalty and the weighted/offset BT loss by hand, and
a short real training run with each option that records what it did."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from support import LOG, curve, tiny_cfg, train_inputs
from tasks import PIPELINE as pipeline
from worldpm.config import load_config
from worldpm.errors import ConfigError
from worldpm.modeling import length as L
from worldpm.modeling.objectives import BradleyTerry, bt_loss
from worldpm.modeling.trainer.data import load_pairs

# 7 pairs: chosen longer in 4 (0, 1, 2, 5), shorter in 2 (3, 4), equal in 1 (6)
CT = np.array([10, 20, 30, 5, 1, 9, 4])
RT = np.array([5, 10, 3, 50, 2, 8, 4])


def test_balance_weights_make_both_classes_weigh_the_same():
    w = L.balance_weights(CT, RT)
    # before the rescale: 6 unequal pairs, longer 6 / (2 * 4) = 0.75, shorter 6 / (2 * 2) = 1.5, equal 1;
    # mean (4 * 0.75 + 2 * 1.5 + 1) / 7 = 1, so the rescale leaves them
    assert w.tolist() == pytest.approx([0.75, 0.75, 0.75, 1.5, 1.5, 0.75, 1.0])
    assert w[[0, 1, 2, 5]].sum() == pytest.approx(w[[3, 4]].sum())
    assert w.mean() == pytest.approx(1.0)
    assert L.balance_weights([3, 4], [1, 1]).tolist() == [1.0, 1.0]  # one class only: nothing to balance


def test_subsample_cuts_the_larger_class_to_the_smaller():
    keep = L.subsample_keep(CT, RT, seed=3)
    cls = L.length_classes(CT[keep], RT[keep])
    assert cls["chosen_longer"].sum() == cls["chosen_shorter"].sum() == 2 and cls["same_length"].sum() == 1
    assert {3, 4, 6} <= set(keep.tolist()) and keep.tolist() == sorted(keep.tolist())
    assert L.subsample_keep(CT, RT, seed=3).tolist() == keep.tolist()  # deterministic in the seed


def test_length_expert_is_the_maximum_likelihood_fit():
    # all |x| equal to a: P(longer wins) = k / n has the closed form beta = logit(k / n) / a
    x = np.array([0.5] * 6 + [-0.5] * 2 + [0.0])  # chosen longer in 6 of 8, one pair of equal length (ignored)
    assert L.fit_length_expert(x) == pytest.approx(math.log(6 / 2) / 0.5, rel=1e-8)
    # weighted: balance weights make the classes equal, and the fitted expert vanishes
    w = np.array([1 / 6] * 6 + [1 / 2] * 2 + [1.0])
    assert L.fit_length_expert(x, w) == pytest.approx(0.0, abs=1e-9)
    assert L.fit_length_expert(np.array([1.0, 2.0])) == 20.0  # separable: capped, not infinite
    assert L.fit_length_expert(np.zeros(3)) == 0.0


def test_decorrelation_penalty_and_weighted_offset_bt_loss_by_hand():
    m = torch.tensor([1.0, 0.0, -1.0, 3.0], requires_grad=True)
    d = torch.tensor([5.0, 0.0, -6.0, 5.0])
    mm, dm = [1, 0, -1, 3], [5, 0, -6, 5]
    a, b = sum(mm) / 4, sum(dm) / 4
    cov = sum((x - a) * (y - b) for x, y in zip(mm, dm)) / 4
    var_d, var_m = sum((y - b) ** 2 for y in dm) / 4, sum((x - a) ** 2 for x in mm) / 4
    pen = L.decorrelation_penalty(m, d)
    assert float(pen.detach()) == pytest.approx(cov * cov / var_d)
    r = cov / math.sqrt(var_m * var_d)
    assert float(pen.detach()) == pytest.approx(var_m * r * r)  # the margin variance length explains
    pen.backward()
    assert m.grad is not None and float(m.grad.abs().sum()) > 0
    # margins all near 0 (the start of training): the penalty and its gradient stay small (corr^2's would not)
    tiny = torch.tensor([1e-4, -2e-4, 3e-4, 0.0], requires_grad=True)
    L.decorrelation_penalty(tiny, d).backward()
    assert float(tiny.grad.abs().max()) < 1e-3
    assert float(L.decorrelation_penalty(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 3.0]))) == 0.0
    assert float(L.decorrelation_penalty(torch.tensor([1.0, 2.0, 3.0]), torch.zeros(3))) == 0.0

    rc, rr = torch.tensor([2.0, 0.0, 1.0]), torch.tensor([1.0, 1.0, 1.0])
    w, off = torch.tensor([0.5, 2.0, 0.5]), torch.tensor([0.3, -0.2, 0.0])
    sp = lambda z: math.log(1 + math.exp(-z))  # noqa: E731  (-logsigmoid)
    by_hand = (0.5 * sp(1 + 0.3) + 2.0 * sp(-1 - 0.2) + 0.5 * sp(0.0)) / 3
    assert float(bt_loss(rc, rr, weight=w, offset=off)) == pytest.approx(by_hand, rel=1e-6)
    assert float(bt_loss(rc, rr)) == pytest.approx((sp(1) + sp(-1) + sp(0)) / 3, rel=1e-6)


def test_length_control_needs_the_lengths_before_truncation(tokenized):
    from worldpm.modeling.trainer.data import PairDataError

    store, ref, _ = tokenized
    data = load_pairs(Path(ref.path) / "train.parquet")
    ct, rt = data.response_tokens()
    # full lengths: some responses alone are longer than their whole sequence after the cut at 64 tokens
    assert (ct > data.chosen_len).any() and (rt > data.rejected_len).any()
    data.chosen_tokens = None
    with pytest.raises(PairDataError, match="rerun tokenize"):
        L.apply(data, "reweight", "none", 1.0, 0)


def test_length_options_are_validated():
    cfg = load_config(None, ["train.length_balance=reweight", "train.length_debias=poe"])
    assert cfg.train.length_balance == "reweight" and cfg.train.length_debias == "poe"
    with pytest.raises(ConfigError, match="length_balance"):
        load_config(None, ["train.length_balance=sometimes"])
    with pytest.raises(ConfigError, match="apply to objective bt"):
        load_config(None, ["train.objective=dpo", "train.length_debias=poe"])
    t = load_config(None, ["train.length_debias=decorrelate", "train.length_debias_coef=2"]).train
    assert BradleyTerry(t).extra_metrics == ("length_penalty",)
    # a moment of each micro-batch: not with token-budget micro-batches (long pairs come a few at a time)
    with pytest.raises(ConfigError, match="decorrelate needs micro-batches of a fixed number of pairs"):
        load_config(None, ["train.length_debias=decorrelate", "train.max_tokens_per_batch=4096"])
    load_config(None, ["train.length_debias=poe", "train.max_tokens_per_batch=4096"])


@pytest.mark.parametrize("opts", [("train.length_balance=reweight", "train.length_debias=poe"),
                                  ("train.length_balance=subsample", "train.length_debias=decorrelate")])
def test_training_with_length_control_records_what_it_did(tokenized, opts):
    store, ref, _ = tokenized
    data = load_pairs(Path(ref.path) / "train.parquet")
    ct, rt = data.response_tokens()
    counts = L.summary(ct, rt)
    res = pipeline.execute("train", tiny_cfg("train.max_steps=3", *opts), train_inputs(store, ref), store, log=LOG)
    out = Path(res.ref.path)
    lc = json.loads((out / "train_summary.json").read_text())["length_control"]
    assert res.manifest["length_control"] == lc
    assert lc["pairs_in"] == len(data) and lc["chosen_longer"] == counts["chosen_longer"]
    if "train.length_balance=subsample" in opts:
        small = min(counts["chosen_longer"], counts["chosen_shorter"])
        assert lc["pairs_kept"] == 2 * small + counts["same_length"]
        assert lc["after"]["chosen_longer"] == lc["after"]["chosen_shorter"] == small
        steps = curve(out)
        assert all("length_penalty" in s for s in steps)  # the penalty is logged
    else:
        w = L.balance_weights(ct, rt)
        assert lc["weights"]["chosen_longer"] == pytest.approx(float(w[ct > rt][0]), abs=1e-4)
        assert lc["poe"]["beta"] == pytest.approx(L.fit_length_expert(L.log_length_diff(ct, rt), w), abs=1e-5)
    # the model folder records the text path it was trained on (what `worldpm score` / `evaluate` then follow)
    card = json.loads((out / "model" / "worldpm.json").read_text())
    assert card["text"]["normalize_markup"] is True and card["text"]["normalization"] == "markup"
    assert card["render"]["max_length"] == 64 and card["render"]["plain_template"] == "{prompt}\n\n{response}"
    # the exported model is the plain reward head: one output, nothing to strip at scoring
    cfgj = json.loads((out / "model" / "config.json").read_text())
    assert cfgj.get("num_labels", len(cfgj.get("id2label", {0: 0}))) == 1
