"""The metric functions against hand computations on a small fixture of known scores."""
from __future__ import annotations

import math

import numpy as np
import pytest

from worldpm.modeling import metrics as M

# four pairs: chosen wins by 1, a tie, chosen loses by 1, chosen wins by 3
CHOSEN = [2.0, 1.0, 0.0, 3.0]
REJECTED = [1.0, 1.0, 1.0, 0.0]


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_accuracy_counts_ties_half():
    assert M.pair_correct(CHOSEN, REJECTED).tolist() == [1.0, 0.5, 0.0, 1.0]
    assert M.accuracy(CHOSEN, REJECTED) == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    assert M.accuracy([], []) is None


def test_bt_loss_by_hand():
    by_hand = (math.log(1 + math.exp(-1)) + math.log(2) + math.log(1 + math.exp(1)) + math.log(1 + math.exp(-3))) / 4
    assert M.bt_loss(CHOSEN, REJECTED) == pytest.approx(by_hand, rel=1e-12)
    assert M.bt_loss(CHOSEN, REJECTED) == pytest.approx(0.592064, abs=1e-6)
    # numerically stable far from zero
    assert M.bt_loss([1000.0], [0.0]) == pytest.approx(0.0, abs=1e-12)
    assert M.bt_loss([0.0], [1000.0]) == pytest.approx(1000.0)


def test_ece_and_reliability_by_hand():
    ece, table = M.calibration(CHOSEN, REJECTED, bins=2)
    # confidences max(p, 1-p): sig(1), 0.5, sig(1), sig(3); outcomes 1, 0.5, 0, 1
    # bin [0.5, 0.75): pairs 0, 1, 2; bin [0.75, 1]: pair 3
    conf0 = (sig(1) + 0.5 + sig(1)) / 3
    acc0 = (1 + 0.5 + 0) / 3
    conf1, acc1 = sig(3), 1.0
    assert [(r["bin_lo"], r["bin_hi"], r["n"]) for r in table] == [(0.5, 0.75, 3), (0.75, 1.0, 1)]
    assert table[0]["confidence"] == pytest.approx(conf0)
    assert table[0]["accuracy"] == pytest.approx(acc0)
    assert table[1]["confidence"] == pytest.approx(conf1)
    assert table[1]["accuracy"] == pytest.approx(acc1)
    assert ece == pytest.approx(3 / 4 * abs(acc0 - conf0) + 1 / 4 * abs(acc1 - conf1))
    assert ece == pytest.approx(0.127386, abs=1e-6)


def test_reliability_keeps_empty_bins_and_closes_last_bin():
    ece, table = M.calibration([100.0], [0.0], bins=5)  # confidence rounds to exactly 1.0
    assert len(table) == 5 and [r["n"] for r in table] == [0, 0, 0, 0, 1]
    assert table[0]["accuracy"] is None
    assert ece == pytest.approx(0.0, abs=1e-12)


def test_reward_stats_population_std():
    s = M.reward_stats(CHOSEN, REJECTED)
    assert s["chosen_mean"] == pytest.approx(1.5)
    assert s["chosen_std"] == pytest.approx(math.sqrt(((0.5) ** 2 + 0.5 ** 2 + 1.5 ** 2 + 1.5 ** 2) / 4))
    assert s["rejected_mean"] == pytest.approx(0.75)
    assert s["rejected_std"] == pytest.approx(math.sqrt((3 * 0.25 ** 2 + 0.75 ** 2) / 4))
    assert s["margin_mean"] == pytest.approx((1 + 0 - 1 + 3) / 4)


def test_section_weighting_by_rewardbench_counts():
    acc = {"alpacaeval-easy": 1.0, "mt-bench-easy": 0.5, "math-prm": 0.5, "hep-python": 1.0, "not-a-subset": 0.0}
    sec = M.section_scores(acc)
    assert set(sec) == {"Chat", "Reasoning"}  # only sections with a subset present
    assert sec["Chat"]["accuracy"] == pytest.approx((100 * 1.0 + 28 * 0.5) / (100 + 28))
    assert sec["Chat"]["weight"] == 128 and not sec["Chat"]["complete"]
    assert sec["Reasoning"]["accuracy"] == pytest.approx((984 * 0.5 + 164 * 1.0) / (984 + 164))
    # math vs code halves: all math wrong, all six code subsets right -> exactly one half
    full = {"math-prm": 0.0, **{f"hep-{l}": 1.0 for l in ("cpp", "go", "java", "js", "python", "rust")}}
    r = M.section_scores(full)["Reasoning"]
    assert r["accuracy"] == pytest.approx(0.5) and r["complete"]
    assert M.rewardbench_score(M.section_scores(full)) is None  # not all four sections
    all_subsets = {s: 1.0 for subs in M.REWARDBENCH_SECTIONS.values() for s in subs}
    assert M.rewardbench_score(M.section_scores(all_subsets)) == pytest.approx(1.0)


def test_length_bias_and_groups():
    correct = M.pair_correct(CHOSEN, REJECTED)
    lb = M.length_bias([10, 5, 3, 7], [5, 5, 9, 2], correct)
    assert {k: (v["n"], v["accuracy"]) for k, v in lb.items()} == {
        "chosen_longer": (2, 1.0), "chosen_shorter": (1, 0.0), "same_length": (1, 0.5)}
    assert lb["chosen_longer"]["ci"] == pytest.approx(M.wilson_interval(2, 2))
    g = M.group_accuracy(["a", "a", "b", None], correct)
    assert g == {"(none)": {"n": 1, "accuracy": 1.0}, "a": {"n": 2, "accuracy": 0.75}, "b": {"n": 1, "accuracy": 0.0}}
    assert M.group_accuracy([None, None], correct[:2]) == {}


def test_summarize_is_consistent():
    s = M.summarize(CHOSEN, REJECTED, subset=["alpacaeval-easy", "alpacaeval-easy", "hep-go", "hep-go"],
                    chosen_chars=[10, 5, 3, 7], rejected_chars=[5, 5, 9, 2], bins=2)
    assert s["n"] == 4 and s["ties"] == 1
    assert s["accuracy"] == pytest.approx(0.625)
    assert s["by_subset"]["alpacaeval-easy"] == {"n": 2, "accuracy": 0.75}
    assert s["sections"]["Chat"]["accuracy"] == pytest.approx(0.75)
    assert s["sections"]["Reasoning"]["accuracy"] == pytest.approx(0.5)
    assert sum(r["n"] for r in s["reliability"]) == 4
    assert s["by_source"] == {} and s["by_domain"] == {}
    with pytest.raises(ValueError):
        M.summarize([1.0], [1.0, 2.0])
    assert np.isfinite(s["ece"])


def test_safety_section_uses_rewardbench_weights():
    # RewardBench (allenai/reward-bench rewardbench/utils.py calculate_scores_per_section over
    # rewardbench/constants.py EXAMPLE_COUNTS): sum(acc * count) / sum(count) over the subsets present, with
    # xstest-should-refuse weighing 250 and xstest-should-respond 154 there.
    acc = {"refusals-dangerous": 1.0, "refusals-offensive": 0.5, "xstest-should-refuse": 0.0,
           "xstest-should-respond": 1.0, "donotanswer": 0.25}
    by_hand = (100 * 1.0 + 100 * 0.5 + 250 * 0.0 + 154 * 1.0 + 136 * 0.25) / (100 + 100 + 250 + 154 + 136)
    s = M.section_scores(acc)["Safety"]
    assert s["accuracy"] == pytest.approx(by_hand) and s["weight"] == 740 and s["complete"]
    assert sum(M.REWARDBENCH_EXAMPLE_COUNTS.values()) == 100 + 95 + 95 + 28 + 40 + 37 + 984 + 100 + 100 + 100 + 134 \
        + 92 + 47 + 46 + 250 + 154 + 136 + 6 * 164
    assert sorted(M.REWARDBENCH_EXAMPLE_COUNTS) == sorted(s for v in M.REWARDBENCH_SECTIONS.values() for s in v)
    # other weights can be passed (e.g. the released split's own counts)
    assert M.section_scores({"xstest-should-refuse": 0.0, "xstest-should-respond": 1.0},
                            example_counts={**M.REWARDBENCH_EXAMPLE_COUNTS, "xstest-should-refuse": 154,
                                            "xstest-should-respond": 250})["Safety"]["accuracy"] == pytest.approx(
        250 / 404)


# ---- length control, intervals and confidence ---------------------------------------------------------------------
# six pairs: outcomes 1, 0.5 (tie), 0, 1, 0, 0
LC_CHOSEN = [2.0, 1.0, 0.0, 3.0, 1.0, 0.0]
LC_REJECTED = [1.0, 1.0, 1.0, 0.0, 2.0, 0.5]
LEN_CHOSEN = [10, 5, 3, 7, 4, 8]
LEN_REJECTED = [5, 5, 9, 2, 6, 1]


def test_wilson_and_fisher_intervals_by_hand():
    z = 1.959963984540054
    lo, hi = M.wilson_interval(8, 10)
    centre, half = (0.8 + z * z / 20) / (1 + z * z / 10), z * math.sqrt(0.8 * 0.2 / 10 + z * z / 400) / (1 + z * z / 10)
    assert (lo, hi) == pytest.approx((centre - half, centre + half))
    assert (lo, hi) == pytest.approx((0.4902, 0.9433), abs=1e-4)  # the textbook value for 8 of 10
    assert M.wilson_interval(0, 0) is None
    assert M.wilson_interval(5, 5)[1] == 1.0 and M.wilson_interval(0, 5)[0] == 0.0
    lo, hi = M.fisher_interval(0.5, 28)
    assert (lo, hi) == pytest.approx((math.tanh(math.atanh(0.5) - z / 5), math.tanh(math.atanh(0.5) + z / 5)))
    assert M.fisher_interval(0.5, 3) is None and M.fisher_interval(None, 100) is None


def test_length_controlled_accuracy_and_correlation_by_hand():
    z = 1.959963984540054
    lc = M.length_control(LC_CHOSEN, LC_REJECTED, LEN_CHOSEN, LEN_REJECTED)
    # chosen longer: pairs 0, 3, 5 (outcomes 1, 1, 0); chosen shorter: pairs 2, 4 (0, 0); pair 1: equal lengths
    assert lc["lc_n"] == [3, 2]
    assert lc["lc_accuracy"] == pytest.approx((2 / 3 + 0 / 2) / 2)

    def ac_var(x, n):
        pt = (x + z * z / 2) / (n + z * z)
        return pt * (1 - pt) / (n + z * z)
    half = z * math.sqrt(ac_var(2, 3) + ac_var(0, 2)) / 2
    assert lc["lc_accuracy_ci"] == pytest.approx([max(0, 1 / 3 - half), 1 / 3 + half])

    # Pearson r of the margins [1, 0, -1, 3, -1, -0.5] with the length differences [5, 0, -6, 5, -2, 7]
    d, dl = [1, 0, -1, 3, -1, -0.5], [5, 0, -6, 5, -2, 7]
    md, ml = sum(d) / 6, sum(dl) / 6
    cov = sum((a - md) * (b - ml) for a, b in zip(d, dl))
    r = cov / math.sqrt(sum((a - md) ** 2 for a in d) * sum((b - ml) ** 2 for b in dl))
    assert lc["margin_length_corr"] == pytest.approx(r) and lc["corr_n"] == 6
    assert lc["margin_length_corr_ci"] == pytest.approx(M.fisher_interval(r, 6))
    # the higher reward goes to the longer response in 4 of the 5 pairs of unequal length (not in pair 5)
    assert lc["prefers_longer"] == pytest.approx(4 / 5)
    # the length rule on the same pairs: 1, 0.5, 0, 1, 0, 1
    assert lc["length_rule_accuracy"] == pytest.approx(3.5 / 6) and lc["length_rule_n"] == 6
    assert lc["length_rule_accuracy_ci"] == pytest.approx(M.wilson_interval(3.5, 6))


def test_length_rule_itself_scores_half_length_controlled():
    # a "model" whose reward is the length: right on every chosen-longer pair, wrong on every chosen-shorter one
    lc = M.length_control(LEN_CHOSEN, LEN_REJECTED, LEN_CHOSEN, LEN_REJECTED)
    assert lc["lc_accuracy"] == pytest.approx(0.5)
    assert lc["margin_length_corr"] == pytest.approx(1.0) and lc["prefers_longer"] == 1.0
    # without lengths, or with one side of the split empty, there is no LC accuracy (never a made-up number)
    none = M.length_control([1.0, 2.0], [0.0, 0.0], [None, None], [None, None])
    assert none["lc_accuracy"] is None and none["margin_length_corr"] is None and none["length_rule_n"] == 0
    one_sided = M.length_control([1.0, 2.0, 0.0], [0.0, 0.0, 1.0], [5, 6, 7], [1, 1, 1])
    assert one_sided["lc_accuracy"] is None and one_sided["lc_n"] == [3, 0]


def test_confidence_summary_flags_an_uninformative_model():
    # every margin tiny: ECE near 0, but the confidences all sit below 0.55 (the model claims almost nothing)
    c, r = [0.01, -0.02, 0.03, 0.0], [0.0, 0.0, 0.0, 0.0]
    s = M.summarize(c, r, bins=10)
    assert s["confidence_share_below"] == 1.0 and s["confidence_below"] == 0.55
    conf = [max(sig(x), 1 - sig(x)) for x in (0.01, -0.02, 0.03, 0.0)]
    assert s["confidence_mean"] == pytest.approx(sum(conf) / 4)
    assert s["reliability"][0]["n"] == 4  # the histogram of confidences is the reliability table's n per bin


def test_summarize_carries_intervals_and_length_control():
    s = M.summarize(LC_CHOSEN, LC_REJECTED, chosen_chars=LEN_CHOSEN, rejected_chars=LEN_REJECTED, bins=2)
    assert s["accuracy"] == pytest.approx(2.5 / 6)
    assert s["accuracy_ci"] == pytest.approx(M.wilson_interval(2.5, 6))
    lc = M.length_control(LC_CHOSEN, LC_REJECTED, LEN_CHOSEN, LEN_REJECTED)
    for k, v in lc.items():
        assert s[k] == (pytest.approx(v) if isinstance(v, (float, list)) and v else v), k
