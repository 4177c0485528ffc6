"""Pure metric functions over pair scores (numpy in, plain JSON-able values out). No I/O, no model.

Conventions, used everywhere in worldpm's evaluation:
* A pair is *correct* when the reward of the chosen response is higher than that of the rejected one.
  **Ties count half** (score 0.5): a model that gives both responses the same reward has no preference,
  which is what a coin flip would score on average. Accuracy is the mean of these per-pair scores.
* The Bradley-Terry loss of a pair is -log sigmoid(r_chosen - r_rejected) (natural log), averaged over pairs.
* Calibration is about p = sigmoid(r_chosen - r_rejected), the model's probability that chosen is better.
  It is measured top-label style: each pair's confidence is max(p, 1 - p) (in [0.5, 1]) and its outcome is
  whether that predicted side is the human-preferred one (ties: confidence 0.5, outcome 0.5). The confidences
  are cut into N equal-width bins over [0.5, 1]; ECE = sum over bins of (n_bin / n) * |accuracy_bin - confidence_bin|.
* Standard deviations are population standard deviations (ddof = 0).
* RewardBench section scores follow allenai/reward-bench, rewardbench/utils.py calculate_scores_per_section
  (github.com/allenai/reward-bench, read at commit 045c7f8): a section's score is
  sum(acc[subset] * EXAMPLE_COUNTS[subset]) / sum(EXAMPLE_COUNTS[subset]) over the section's subsets present
  in the results, EXAMPLE_COUNTS and SUBSET_MAPPING from rewardbench/constants.py (commit a32e272). In Reasoning,
  math-prm's count is upweighted to 984 = 6 x 164 so that math and the six code subsets weigh one half each.
  Two deliberate differences: a section with no subset present is left out (RewardBench reports 0), and a tie
  counts half here (RewardBench's per-pair result is chosen > rejected, a tie counts 0).
* Confidence intervals are 95%. An accuracy's is the Wilson score interval of (sum of per-pair outcomes, n), ties
  counting half a success. Length-controlled accuracy (LC) is the mean of the accuracy on the pairs whose chosen
  response is longer and on those whose chosen response is shorter (pairs of equal length are left out), so a
  model that only rewards length scores 0.5 whatever the mix of the set; its interval is LC +- z * sqrt(v_l + v_s)
  / 2 with v = p~(1 - p~) / (n + z^2), p~ = (x + z^2 / 2) / (n + z^2) per part (Agresti-Coull), clipped to [0, 1].
  The margin/length correlation is Pearson's r between r_chosen - r_rejected and len_chosen - len_rejected over
  the pairs with both lengths known; its interval is Fisher's tanh(atanh(r) +- z / sqrt(n - 3)).
* The length rule ("the longer response wins") is scored on the same pairs: 1 when the chosen one is longer, 0
  when it is shorter, 0.5 for equal lengths; its LC accuracy is 0.5 by construction, so what tells a model from
  it is the model's LC accuracy (above 0.5) and its correlation with length (near 0).
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np

# allenai/reward-bench, rewardbench/constants.py EXAMPLE_COUNTS, verbatim, so section scores match RewardBench's own
# (and its leaderboard's). Note: there xstest-should-refuse weighs 250 and xstest-should-respond 154, although the
# released filtered split has 154 should-refuse and 250 should-respond prompts; we keep the reference's weights
# (pass example_counts= to section_scores for others).
REWARDBENCH_EXAMPLE_COUNTS: dict[str, int] = {
    "alpacaeval-easy": 100,
    "alpacaeval-length": 95,
    "alpacaeval-hard": 95,
    "mt-bench-easy": 28,
    "mt-bench-med": 40,
    "mt-bench-hard": 37,
    "math-prm": 984,  # actual length 447, upweighted to equal the code subsets together
    "refusals-dangerous": 100,
    "refusals-offensive": 100,
    "llmbar-natural": 100,
    "llmbar-adver-neighbor": 134,
    "llmbar-adver-GPTInst": 92,
    "llmbar-adver-GPTOut": 47,
    "llmbar-adver-manual": 46,
    "xstest-should-refuse": 250,
    "xstest-should-respond": 154,
    "donotanswer": 136,
    "hep-cpp": 164,
    "hep-go": 164,
    "hep-java": 164,
    "hep-js": 164,
    "hep-python": 164,
    "hep-rust": 164,
}

REWARDBENCH_SECTIONS: dict[str, list[str]] = {
    "Chat": ["alpacaeval-easy", "alpacaeval-length", "alpacaeval-hard", "mt-bench-easy", "mt-bench-med"],
    "Chat Hard": ["mt-bench-hard", "llmbar-natural", "llmbar-adver-neighbor", "llmbar-adver-GPTInst",
                  "llmbar-adver-GPTOut", "llmbar-adver-manual"],
    "Safety": ["refusals-dangerous", "refusals-offensive", "xstest-should-refuse", "xstest-should-respond",
               "donotanswer"],
    "Reasoning": ["math-prm", "hep-cpp", "hep-go", "hep-java", "hep-js", "hep-python", "hep-rust"],
}

NONE_KEY = "(none)"
Z95 = 1.959963984540054  # the two-sided 95% normal quantile


def _arr(x: Iterable[float]) -> np.ndarray:
    return np.asarray(list(x) if not isinstance(x, (np.ndarray, list, tuple)) else x, dtype=np.float64)


def _f(x: float | None) -> float | None:
    """A plain float for JSON (None for NaN / missing)."""
    if x is None:
        return None
    x = float(x)
    return None if math.isnan(x) else x


def pair_correct(chosen: Sequence[float], rejected: Sequence[float]) -> np.ndarray:
    """Per-pair outcome: 1 if chosen > rejected, 0.5 on a tie, 0 otherwise."""
    c, r = _arr(chosen), _arr(rejected)
    return np.where(c > r, 1.0, np.where(c == r, 0.5, 0.0))


def accuracy(chosen: Sequence[float], rejected: Sequence[float]) -> float | None:
    """Fraction of pairs ranked right, ties counting half; None for no pairs."""
    c = pair_correct(chosen, rejected)
    return _f(c.mean()) if c.size else None


def bt_loss(chosen: Sequence[float], rejected: Sequence[float]) -> float | None:
    """Mean Bradley-Terry negative log-likelihood -log sigmoid(r_c - r_r) = log(1 + exp(-(r_c - r_r)))."""
    d = _arr(chosen) - _arr(rejected)
    return _f(np.logaddexp(0.0, -d).mean()) if d.size else None


def sigmoid(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    out = np.empty_like(x)
    pos = x >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-x[pos]))
    e = np.exp(x[~pos])
    out[~pos] = e / (1.0 + e)
    return out


def wilson_interval(successes: float, n: int, z: float = Z95) -> list[float] | None:
    """95% Wilson score interval [lo, hi] of a proportion successes / n (successes may be fractional: ties count
    half); None for n = 0."""
    if n <= 0:
        return None
    p = min(max(successes / n, 0.0), 1.0)
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    return [max(0.0, centre - half), min(1.0, centre + half)]


def _ac_variance(successes: float, n: int, z: float = Z95) -> float:
    """Agresti-Coull variance of a proportion: p~(1 - p~) / (n + z^2), p~ = (x + z^2/2) / (n + z^2)."""
    nt = n + z * z
    pt = (successes + z * z / 2) / nt
    return pt * (1 - pt) / nt


def pearson(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Pearson's r; None with fewer than 3 points or a constant side."""
    a, b = _arr(x), _arr(y)
    if a.size < 3:
        return None
    a, b = a - a.mean(), b - b.mean()
    den = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    return _f(float((a * b).sum()) / den) if den > 0 else None


def fisher_interval(r: float | None, n: int, z: float = Z95) -> list[float] | None:
    """95% interval of a correlation r over n points: tanh(atanh(r) +- z / sqrt(n - 3)); None when n <= 3."""
    if r is None or n <= 3:
        return None
    zr = math.atanh(min(max(r, -0.999999), 0.999999))
    h = z / math.sqrt(n - 3)
    return [math.tanh(zr - h), math.tanh(zr + h)]


def calibration(chosen: Sequence[float], rejected: Sequence[float], bins: int = 10) -> tuple[float | None, list[dict]]:
    """(ECE, reliability table) of p = sigmoid(r_c - r_r), top-label, N bins over [0.5, 1] (see module doc).

    The table has one row per bin, empty bins included (n = 0, confidence/accuracy None), so the diagram and
    the numbers line up. The last bin is closed on the right (confidence 1.0 lands in it)."""
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    c, r = _arr(chosen), _arr(rejected)
    p = sigmoid(c - r)
    conf = np.maximum(p, 1.0 - p)
    # The label is always "chosen is better": the predicted side (chosen when p > 0.5, rejected when p < 0.5)
    # is right exactly when the pair is ranked right, so the outcome of the top label is pair_correct.
    hit = pair_correct(c, r)
    edges = np.linspace(0.5, 1.0, bins + 1)
    idx = np.clip(np.searchsorted(edges, conf, side="right") - 1, 0, bins - 1)
    table = []
    ece = 0.0
    n = conf.size
    for b in range(bins):
        m = idx == b
        nb = int(m.sum())
        row = {"bin_lo": float(edges[b]), "bin_hi": float(edges[b + 1]), "n": nb, "confidence": None, "accuracy": None}
        if nb:
            cb, ab = float(conf[m].mean()), float(hit[m].mean())
            row["confidence"], row["accuracy"] = cb, ab
            ece += nb / n * abs(ab - cb)
        table.append(row)
    return (_f(ece) if n else None), table


def reward_stats(chosen: Sequence[float], rejected: Sequence[float]) -> dict:
    c, r = _arr(chosen), _arr(rejected)
    if not c.size:
        return {"chosen_mean": None, "chosen_std": None, "rejected_mean": None, "rejected_std": None,
                "margin_mean": None, "margin_std": None}
    d = c - r
    return {"chosen_mean": _f(c.mean()), "chosen_std": _f(c.std()), "rejected_mean": _f(r.mean()),
            "rejected_std": _f(r.std()), "margin_mean": _f(d.mean()), "margin_std": _f(d.std())}


def group_accuracy(keys: Sequence[str | None], correct: np.ndarray) -> dict[str, dict]:
    """{key: {n, accuracy}} over per-pair outcomes; pairs without a key go under "(none)". {} if no pair has one."""
    keys = list(keys)
    if not keys or all(k is None for k in keys):
        return {}
    correct = np.asarray(correct, dtype=np.float64)
    groups: dict[str, list[int]] = {}
    for i, k in enumerate(keys):
        groups.setdefault(NONE_KEY if k is None else str(k), []).append(i)
    return {k: {"n": len(ix), "accuracy": _f(correct[ix].mean())} for k, ix in sorted(groups.items())}


def section_scores(subset_accuracy: dict[str, float | None],
                   example_counts: dict[str, int] | None = None,
                   sections: dict[str, list[str]] | None = None) -> dict[str, dict]:
    """RewardBench's prompt-weighted section scores for the sections with at least one subset present.

    {section: {"accuracy": weighted mean, "subsets": [present subsets], "weight": sum of their counts,
    "complete": all of the section's subsets present}}. Accuracies are fractions (RewardBench prints x100)."""
    counts = example_counts or REWARDBENCH_EXAMPLE_COUNTS
    sections = sections or REWARDBENCH_SECTIONS
    out: dict[str, dict] = {}
    for section, subsets in sections.items():
        present = [s for s in subsets if subset_accuracy.get(s) is not None]
        if not present:
            continue
        weight = sum(counts[s] for s in present)
        score = sum(subset_accuracy[s] * counts[s] for s in present) / weight
        out[section] = {"accuracy": _f(score), "subsets": present, "weight": weight,
                        "complete": len(present) == len(subsets)}
    return out


def rewardbench_score(sections: dict[str, dict]) -> float | None:
    """The leaderboard's headline number: the unweighted mean of the section scores (only if all four exist)."""
    if set(sections) != set(REWARDBENCH_SECTIONS):
        return None
    return _f(np.mean([sections[s]["accuracy"] for s in REWARDBENCH_SECTIONS]))


def _lengths(x: Sequence[float | None]) -> np.ndarray:
    return np.asarray([np.nan if v is None else v for v in x], dtype=np.float64)


def length_bias(chosen_chars: Sequence[float | None], rejected_chars: Sequence[float | None],
                correct: np.ndarray) -> dict[str, dict]:
    """Accuracy split by whether the chosen response is longer than the rejected one (in any length unit:
    characters, or response tokens as the evaluate stage passes), each with n and its 95% Wilson interval.

    A reward model that mostly rewards length scores high on chosen_longer and low on chosen_shorter.
    Pairs of equal length, or without lengths, are counted under same_length / unknown."""
    cc, rc = _lengths(chosen_chars), _lengths(rejected_chars)
    correct = np.asarray(correct, dtype=np.float64)
    known = ~(np.isnan(cc) | np.isnan(rc))
    masks = {
        "chosen_longer": known & (cc > rc),
        "chosen_shorter": known & (cc < rc),
        "same_length": known & (cc == rc),
        "unknown": ~known,
    }
    out = {}
    for name, m in masks.items():
        n = int(m.sum())
        if name in ("same_length", "unknown") and n == 0:
            continue
        out[name] = {"n": n, "accuracy": _f(correct[m].mean()) if n else None,
                     "ci": wilson_interval(float(correct[m].sum()), n)}
    return out


def length_control(chosen: Sequence[float], rejected: Sequence[float], chosen_len: Sequence[float | None],
                   rejected_len: Sequence[float | None]) -> dict:
    """What a model learned beyond length (see the module doc): length-controlled accuracy, the correlation of
    its margin with the length difference, how often it prefers the longer response, and the length rule's
    accuracy on the same pairs, each with its n and 95% interval.

    {"lc_accuracy", "lc_accuracy_ci", "lc_n": [n chosen longer, n chosen shorter],
     "margin_length_corr", "margin_length_corr_ci", "corr_n",
     "prefers_longer" (fraction of the pairs of unequal length where the higher reward goes to the longer
     response; ties in reward count half), "length_rule_accuracy", "length_rule_accuracy_ci", "length_rule_n"}"""
    c, r = _arr(chosen), _arr(rejected)
    cl, rl = _lengths(chosen_len), _lengths(rejected_len)
    correct = pair_correct(c, r)
    known = ~(np.isnan(cl) | np.isnan(rl))
    longer, shorter = known & (cl > rl), known & (cl < rl)
    nl, ns = int(longer.sum()), int(shorter.sum())
    out: dict = {"lc_accuracy": None, "lc_accuracy_ci": None, "lc_n": [nl, ns]}
    if nl and ns:
        xl, xs = float(correct[longer].sum()), float(correct[shorter].sum())
        lc = (xl / nl + xs / ns) / 2
        half = Z95 * math.sqrt(_ac_variance(xl, nl) + _ac_variance(xs, ns)) / 2
        out.update(lc_accuracy=_f(lc), lc_accuracy_ci=[max(0.0, lc - half), min(1.0, lc + half)])
    n_known = int(known.sum())
    rho = pearson((c - r)[known], (cl - rl)[known])
    out.update(margin_length_corr=rho, margin_length_corr_ci=fisher_interval(rho, n_known), corr_n=n_known)
    unequal = longer | shorter
    if unequal.any():
        d, dl = (c - r)[unequal], (cl - rl)[unequal]
        out["prefers_longer"] = _f(np.where(d == 0, 0.5, (np.sign(d) == np.sign(dl)).astype(np.float64)).mean())
    else:
        out["prefers_longer"] = None
    rule = np.where(cl > rl, 1.0, np.where(cl == rl, 0.5, 0.0))[known]
    out.update(length_rule_accuracy=_f(rule.mean()) if rule.size else None,
               length_rule_accuracy_ci=wilson_interval(float(rule.sum()), int(rule.size)),
               length_rule_n=int(rule.size))
    return out


def confidence_summary(chosen: Sequence[float], rejected: Sequence[float], low: float = 0.55) -> dict:
    """How much the model claims, to read next to ECE: the mean confidence max(p, 1 - p) and the share of pairs
    below ``low``. A model whose confidences all sit near 0.5 has a small ECE because it claims almost nothing."""
    p = sigmoid(_arr(chosen) - _arr(rejected))
    conf = np.maximum(p, 1.0 - p)
    if not conf.size:
        return {"confidence_mean": None, "confidence_below": low, "confidence_share_below": None}
    return {"confidence_mean": _f(conf.mean()), "confidence_below": low,
            "confidence_share_below": _f((conf < low).mean())}


def summarize(chosen: Sequence[float], rejected: Sequence[float], *,
              source: Sequence[str | None] | None = None, domain: Sequence[str | None] | None = None,
              subset: Sequence[str | None] | None = None, chosen_chars: Sequence[float | None] | None = None,
              rejected_chars: Sequence[float | None] | None = None, bins: int = 10,
              length_unit: str = "characters") -> dict:
    """Every metric of one evaluation set (the object stored per set in the evaluate artifact's metrics.json):
    n, accuracy and its 95% interval, ties, BT loss, the length_control keys (LC accuracy, margin/length
    correlation, prefers_longer, the length rule; each with its interval and n), ECE with the confidence summary
    and the reliability table (whose n per bin is the histogram of the confidences), reward statistics, accuracy
    per source/domain/subset, RewardBench sections, and the length bias split.

    ``chosen_chars`` / ``rejected_chars``: the response lengths, in ``length_unit``."""
    c, r = _arr(chosen), _arr(rejected)
    if c.shape != r.shape:
        raise ValueError(f"chosen ({c.size}) and rejected ({r.size}) scores differ in length")
    n = int(c.size)
    correct = pair_correct(c, r)
    ece, table = calibration(c, r, bins)
    none = [None] * n
    by_subset = group_accuracy(subset if subset is not None else none, correct)
    sections = section_scores({k: v["accuracy"] for k, v in by_subset.items()})
    lens_c = chosen_chars if chosen_chars is not None else none
    lens_r = rejected_chars if rejected_chars is not None else none
    out = {
        "n": n,
        "accuracy": accuracy(c, r),
        "accuracy_ci": wilson_interval(float(correct.sum()), n),
        "ties": int((c == r).sum()),
        "bt_loss": bt_loss(c, r),
        **length_control(c, r, lens_c, lens_r),
        "ece": ece,
        **confidence_summary(c, r),
        "reliability": table,
        **reward_stats(c, r),
        "by_source": group_accuracy(source if source is not None else none, correct),
        "by_domain": group_accuracy(domain if domain is not None else none, correct),
        "by_subset": by_subset,
        "sections": sections,
        "rewardbench_score": rewardbench_score(sections),
        "length_bias": length_bias(lens_c, lens_r, correct),
        "length_unit": length_unit,
    }
    return out
