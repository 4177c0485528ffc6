"""What the report reads off the training log (metrics.jsonl): pairs seen per logged step, and gradient-norm spikes.

**A spike** is a logged gradient norm g_t with

    g_t > median(W) + k * max(1.4826 * MAD(W), floor * median(W))

where W is the ``window`` logged values before it (default 20; at least ``min_history`` = 5 of them, so the first
points are never spikes), MAD the median absolute deviation (x 1.4826: the standard deviation of normal noise),
k = 6 by default, and ``floor`` = 0.1 keeps a run of near-identical norms (MAD ~ 0) from calling a 10% wobble a
spike (then a spike needs g_t > 1.6 x the median). The window trails: a spike is judged against what came before
it, as someone watching the run would. Norms are before clipping (what ``clip_grad_norm_`` returns), NaN is skipped.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SPIKE_WINDOW = 20
SPIKE_K = 6.0
SPIKE_MIN_HISTORY = 5
SPIKE_FLOOR = 0.1
MAD_TO_SIGMA = 1.4826


def pairs_seen(rows: list[dict]) -> np.ndarray:
    """Pairs seen up to each logged step: the row's ``pairs_seen`` where the trainer wrote it, else the running
    sum of ``pairs`` (the pairs of the window since the previous log line, all processes). NaN where neither."""
    if rows and all(r.get("pairs_seen") is not None for r in rows):
        return np.asarray([float(r["pairs_seen"]) for r in rows])
    if rows and all(r.get("pairs") is not None for r in rows):
        return np.cumsum([float(r["pairs"]) for r in rows])
    return np.full(len(rows), np.nan)


@dataclass(frozen=True)
class Spike:
    step: int
    grad_norm: float
    median: float      # of the trailing window
    threshold: float
    ratio: float       # grad_norm / median

    def to_json(self) -> dict:
        return {"step": self.step, "grad_norm": self.grad_norm, "median": self.median, "threshold": self.threshold,
                "ratio": self.ratio}


def grad_norm_spikes(steps, grad_norms, *, window: int = SPIKE_WINDOW, k: float = SPIKE_K,
                     min_history: int = SPIKE_MIN_HISTORY, floor: float = SPIKE_FLOOR) -> list[Spike]:
    """The spikes of a gradient-norm series (module doc), oldest first."""
    s = np.asarray(steps, dtype=np.float64)
    g = np.asarray([np.nan if v is None else v for v in grad_norms], dtype=np.float64)
    keep = np.isfinite(g) & np.isfinite(s)
    s, g = s[keep], g[keep]
    out = []
    for i in range(len(g)):
        hist = g[max(0, i - window):i]
        if hist.size < min_history:
            continue
        med = float(np.median(hist))
        scale = max(MAD_TO_SIGMA * float(np.median(np.abs(hist - med))), floor * abs(med))
        thr = med + k * scale
        if g[i] > thr:
            out.append(Spike(int(s[i]), float(g[i]), med, thr, float(g[i] / med) if med > 0 else float("inf")))
    return out


def spike_definition(*, window: int = SPIKE_WINDOW, k: float = SPIKE_K, min_history: int = SPIKE_MIN_HISTORY,
                     floor: float = SPIKE_FLOOR) -> str:
    """The definition in words, for a figure's caption and the report."""
    return (f"a spike is a logged gradient norm above median + {k:g} x max(1.4826 x MAD, {floor:g} x median) of the "
            f"{window} logged norms before it (judged once {min_history} are there)")
