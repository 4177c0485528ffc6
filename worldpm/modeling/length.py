"""Length control at training: so that a reward model learns preference, not "the longer answer wins".

Preference data rewards length: in StackExchange pairs the better-voted answer is the longer one about two times in
three, and a Bradley-Terry model learns that shortcut first (the margin of the MiniLM preset correlated 0.83 with
the length difference). Two kinds of remedy, each a train option (pipeline.yaml `train:`): a per-pair number
computed once when the split is loaded (independent of how pairs are batched), or, for ``decorrelate``, a function
of a micro-batch's rewards and lengths (so it needs micro-batches of train.batch_size pairs: it is refused with
train.max_tokens_per_batch, whose micro-batches of long pairs hold a few pairs each):

* ``length_balance`` acts on the data, so chosen-longer and chosen-shorter pairs weigh the same:
  - ``reweight``: every pair keeps its place, with weight n / (2 n_class) for the two classes chosen-longer and
    chosen-shorter (pairs of equal length weigh 1), rescaled to a mean of 1 over the split. The BT loss is the
    mean of weight x per-pair loss. Nothing is dropped; rare-class pairs count more (higher gradient variance).
  - ``subsample``: the larger class is cut at random (seeded by train.seed) to the size of the smaller one; pairs
    of equal length are kept. Fewer pairs, each weighing 1; the cut pairs are counted in train_summary.json.
* ``length_debias`` adds a term to the objective:
  - ``poe`` (product of experts with a fixed length expert; Clark et al. 2019 "Don't Take the Easy Way Out", He et
    al. 2019 for dataset bias; Shen et al. 2023 "Loose lips sink ships" for reward models; ODIN, Chen et al. 2024,
    trains a length head and drops it at scoring): a one-parameter length expert
    beta * (log(1 + L_chosen) - log(1 + L_rejected)) is fitted to the training pairs by maximum likelihood before
    training (the length rule as a calibrated logistic model) and added to the reward margin inside the loss:
    -logsigmoid(r_c - r_r + coef * beta * dlog L). Pairs the length expert already explains give little gradient;
    pairs it gets wrong give more, so the reward model learns what length does not explain. At scoring the expert
    is gone: the exported model is the plain reward head (nothing to strip downstream).
  - ``decorrelate``: a penalty coef * cov(m, d)^2 / var(d) over a micro-batch's pairs, m = r_c - r_r the reward
    margin and d = dlog L the log-length difference: the part of the margin's variance that a linear function of
    length explains (= var(m) * corr(m, d)^2; zero for batches of fewer than 3 pairs or of one length difference
    only). It pushes the margin to carry no linear trace of length. The squared correlation itself is no good
    penalty: its gradient grows as 1 / std(m), without bound at the start of training when every margin is near 0
    (measured: gradient norms of ~80 against ~0.4 for the BT loss, so clipping left the BT term nothing). How well
    it works depends on the batch size (a covariance over 8 pairs is a noisy estimate).

Lengths are response tokens before truncation (tokenize's chosen_response_tokens / rejected_response_tokens):
after the cut at max_length both sides of a long pair look equally long.
"""
from __future__ import annotations

import math

import numpy as np

BALANCE = ("none", "reweight", "subsample")
DEBIAS = ("none", "poe", "decorrelate")


def log_length_diff(chosen_tokens: np.ndarray, rejected_tokens: np.ndarray) -> np.ndarray:
    """log(1 + L_chosen) - log(1 + L_rejected) per pair (float32): the length feature of both debias terms."""
    return (np.log1p(np.asarray(chosen_tokens, np.float64)) - np.log1p(np.asarray(rejected_tokens, np.float64))) \
        .astype(np.float32)


def length_classes(chosen_tokens: np.ndarray, rejected_tokens: np.ndarray) -> dict[str, np.ndarray]:
    c, r = np.asarray(chosen_tokens), np.asarray(rejected_tokens)
    return {"chosen_longer": c > r, "chosen_shorter": c < r, "same_length": c == r}


def balance_weights(chosen_tokens: np.ndarray, rejected_tokens: np.ndarray) -> np.ndarray:
    """Per-pair weights (float32, mean 1) under which chosen-longer and chosen-shorter pairs weigh the same: n / (2
    n_class) for the two classes, 1 for equal lengths, then rescaled to a mean of 1. With one class empty there is
    nothing to balance against: all weights 1."""
    cls = length_classes(chosen_tokens, rejected_tokens)
    n_l, n_s = int(cls["chosen_longer"].sum()), int(cls["chosen_shorter"].sum())
    w = np.ones(len(cls["same_length"]), dtype=np.float64)
    if n_l and n_s:
        unequal = n_l + n_s
        w[cls["chosen_longer"]] = unequal / (2 * n_l)
        w[cls["chosen_shorter"]] = unequal / (2 * n_s)
        w /= w.mean()
    return w.astype(np.float32)


def subsample_keep(chosen_tokens: np.ndarray, rejected_tokens: np.ndarray, seed: int) -> np.ndarray:
    """Indices (sorted) of the pairs kept when the larger of chosen-longer / chosen-shorter is cut at random to the
    size of the smaller; equal-length pairs are all kept. Deterministic in seed."""
    cls = length_classes(chosen_tokens, rejected_tokens)
    li, si = np.flatnonzero(cls["chosen_longer"]), np.flatnonzero(cls["chosen_shorter"])
    if len(li) and len(si):
        big, small = (li, si) if len(li) > len(si) else (si, li)
        rng = np.random.default_rng([seed, 0x1E57])
        big = rng.choice(big, size=len(small), replace=False)
        li, si = (big, small) if len(li) > len(si) else (small, big)
    return np.sort(np.concatenate([li, si, np.flatnonzero(cls["same_length"])]))


def fit_length_expert(x: np.ndarray, weights: np.ndarray | None = None, cap: float = 20.0) -> float:
    """The maximum-likelihood beta of P(chosen wins) = sigmoid(beta * x), x = log-length difference, by Newton's
    method on the concave log-likelihood (weighted when weights are given). Capped at +-cap: when every pair with a
    length difference has the chosen side longer the likelihood grows without bound."""
    x = np.asarray(x, np.float64)
    w = np.ones_like(x) if weights is None else np.asarray(weights, np.float64)
    m = x != 0
    x, w = x[m], w[m]
    if x.size == 0:
        return 0.0
    beta = 0.0
    for _ in range(100):
        p = 1.0 / (1.0 + np.exp(-beta * x))          # P(chosen) under the expert
        grad = float((w * x * (1.0 - p)).sum())
        hess = float((w * x * x * p * (1.0 - p)).sum())
        if hess <= 1e-12:
            break
        step = grad / hess
        beta = float(np.clip(beta + step, -cap, cap))
        if abs(step) < 1e-10 or abs(beta) == cap:
            break
    return beta


def decorrelation_penalty(margin, length_diff):
    """cov(margin, length_diff)^2 / var(length_diff) over the pairs of a batch (torch tensors, fp32; population
    moments): the margin variance a linear function of the length difference explains. 0 when undefined (fewer
    than 3 pairs, or one length difference only). The gradient flows into the margin only, and stays bounded
    when the margins are all near 0."""
    import torch

    m = margin.float()
    d = length_diff.to(m.device).float()
    if m.numel() < 3:
        return m.sum() * 0.0
    mc, dc = m - m.mean(), d - d.mean()
    n = m.numel()
    cov, dv = (mc * dc).sum() / n, (dc * dc).sum() / n
    # no host sync (no branch on a value): an undefined penalty is 0 through torch.where
    return torch.where(dv > 1e-12, cov * cov / torch.clamp(dv, min=1e-12), torch.zeros_like(cov))


def summary(chosen_tokens: np.ndarray, rejected_tokens: np.ndarray) -> dict:
    """Counts of the three length classes, and the share of unequal pairs whose chosen response is longer."""
    cls = length_classes(chosen_tokens, rejected_tokens)
    n = {k: int(v.sum()) for k, v in cls.items()}
    unequal = n["chosen_longer"] + n["chosen_shorter"]
    return {**n, "chosen_longer_share": round(n["chosen_longer"] / unequal, 4) if unequal else None}


def describe_expert(beta: float) -> str:
    """The fitted expert in words: how much more likely the chosen side is when it is twice as long."""
    return f"beta {beta:.3f}: a response twice as long wins {1 / (1 + math.exp(-beta * math.log(2))):.1%} of pairs"


def apply(data, balance: str, debias: str, coef: float, seed: int):
    """Length control on a loaded training split (a trainer PairData): (the data to train on, what was done, for
    train_summary.json). Subsampling returns a subset; reweighting sets data.weight; the debias terms set
    data.length_diff (and data.length_offset for poe, with the expert fitted on the pairs as trained)."""
    if balance not in BALANCE or debias not in DEBIAS:
        raise ValueError(f"length control: unknown balance {balance!r} or debias {debias!r}")
    ct, rt = data.response_tokens()
    info: dict = {"length_balance": balance, "length_debias": debias, "pairs_in": len(data), **summary(ct, rt)}
    if balance == "subsample":
        data = data.subset(subsample_keep(ct, rt, seed))
        ct, rt = data.response_tokens()
        info["pairs_kept"] = len(data)
        info["after"] = summary(ct, rt)
    elif balance == "reweight":
        data.weight = balance_weights(ct, rt)
        cls = length_classes(ct, rt)
        info["weights"] = {k: (round(float(data.weight[m][0]), 4) if m.any() else None) for k, m in cls.items()}
    if debias != "none":
        data.length_diff = log_length_diff(ct, rt)
    if debias == "poe":
        beta = fit_length_expert(data.length_diff, data.weight)
        data.length_offset = (coef * beta * data.length_diff).astype(np.float32)
        info["poe"] = {"beta": round(beta, 6), "coef": coef, "expert": describe_expert(beta)}
    elif debias == "decorrelate":
        info["decorrelate"] = {"coef": coef}
    return data, info
