"""Evaluation during training: the records of ``eval_curve.jsonl`` (beside the training log, metrics.jsonl).

One record per (evaluation point, set[, subset]): the trainer scores the eval split and every eval set at each
point of ``train.eval_at`` and writes

    step, pairs_seen, tokens_seen, set, subset, category, n, bt_loss, accuracy, lc_accuracy

``subset`` is null for the whole set and names a subset (RewardBench's) in the records that follow it. ``category``
is the set's (adversarial, objective, subjective, or a name of the user's); null for the splits of the training
data. ``pairs_seen`` / ``tokens_seen`` count every process's pairs (tokens: real tokens, not padding) up to the
step. The loss is the BT loss of metrics.py (mean of -log sigmoid(r_chosen - r_rejected)), accuracy counts a tie
as half, LC accuracy is the length-controlled accuracy.

The paper's curves are these records: BT loss against pairs seen, per set and per category (``set_curves``,
``category_curves``).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from worldpm.errors import StageError
from worldpm.store import json_lines

FILE = "eval_curve.jsonl"
FIELDS = ("step", "pairs_seen", "tokens_seen", "set", "subset", "category", "n", "bt_loss", "accuracy",
          "lc_accuracy")
_INTS = ("step", "pairs_seen", "tokens_seen", "n")
_FLOATS = ("bt_loss", "accuracy", "lc_accuracy")
_STRS = ("subset", "category")


@dataclass(frozen=True)
class EvalPoint:
    step: int
    pairs_seen: int
    tokens_seen: int
    set: str
    subset: str | None
    category: str | None
    n: int
    bt_loss: float | None
    accuracy: float | None
    lc_accuracy: float | None

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict, where: str = "record") -> "EvalPoint":
        """Validate one record; a wrong one is a StageError naming ``where`` and the field."""
        if not isinstance(d, dict):
            raise StageError(f"{where}: an eval-curve record is a JSON object, got {type(d).__name__}")
        missing = [k for k in FIELDS if k not in d]
        if missing:
            raise StageError(f"{where}: eval-curve record without {', '.join(missing)}")
        extra = sorted(set(d) - set(FIELDS))
        if extra:
            raise StageError(f"{where}: unknown eval-curve field(s) {', '.join(extra)}")
        for k in _INTS:
            if isinstance(d[k], bool) or not isinstance(d[k], int) or d[k] < 0:
                raise StageError(f"{where}: {k} must be a whole number >= 0, got {d[k]!r}")
        if not isinstance(d["set"], str) or not d["set"]:
            raise StageError(f"{where}: set must be a non-empty string, got {d['set']!r}")
        for k in _STRS:
            if d[k] is not None and not isinstance(d[k], str):
                raise StageError(f"{where}: {k} must be a string or null, got {d[k]!r}")
        for k in _FLOATS:
            v = d[k]
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
                raise StageError(f"{where}: {k} must be a finite number or null, got {v!r}")
        return cls(**{k: (float(d[k]) if k in _FLOATS and d[k] is not None else d[k]) for k in FIELDS})


# ---- building records from scores -------------------------------------------------------------------------------
def points_from_scores(*, step: int, pairs_seen: int, tokens_seen: int, set_name: str, category: str | None,
                       chosen: Sequence[float], rejected: Sequence[float],
                       chosen_len: Sequence[float | None] | None = None,
                       rejected_len: Sequence[float | None] | None = None,
                       subset: Sequence[str | None] | None = None) -> list[EvalPoint]:
    """The records of one set at one point: the whole set, then one per subset (when ``subset`` names any), from
    the rewards of its pairs (what the trainer gathers at an evaluation point) and the response lengths."""
    from worldpm.modeling import metrics as M

    c, r = np.asarray(chosen, dtype=np.float64), np.asarray(rejected, dtype=np.float64)
    if c.shape != r.shape:
        raise ValueError(f"{set_name}: {c.size} chosen and {r.size} rejected rewards")
    none = [None] * c.size
    cl = list(chosen_len) if chosen_len is not None else none
    rl = list(rejected_len) if rejected_len is not None else none

    def one(idx: np.ndarray, sub: str | None) -> EvalPoint:
        cc, rr = c[idx], r[idx]
        lc = M.length_control(cc, rr, [cl[i] for i in idx], [rl[i] for i in idx])
        return EvalPoint(step=int(step), pairs_seen=int(pairs_seen), tokens_seen=int(tokens_seen), set=set_name,
                         subset=sub, category=category, n=int(idx.size), bt_loss=M.bt_loss(cc, rr),
                         accuracy=M.accuracy(cc, rr), lc_accuracy=lc.get("lc_accuracy"))

    out = [one(np.arange(c.size), None)]
    if subset is not None:
        subs = np.asarray([s if s is not None else "" for s in subset], dtype=object)
        for s in sorted({s for s in subs if s}):
            out.append(one(np.flatnonzero(subs == s), s))
    return out


# ---- the file -----------------------------------------------------------------------------------------------------
def append_points(path: str | Path, points: Iterable[EvalPoint]) -> None:
    """Append records, one JSON line each, flushed to disk (a crash mid-training keeps the points so far)."""
    lines = "".join(json.dumps(p.to_json()) + "\n" for p in points)
    if not lines:
        return
    with open(path, "a") as f:
        f.write(lines)
        f.flush()
        os.fsync(f.fileno())


def write_points(path: str | Path, points: Iterable[EvalPoint]) -> None:
    """Write the file anew, atomically (temporary name, then rename)."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    tmp.write_text("".join(json.dumps(x.to_json()) + "\n" for x in points))
    os.replace(tmp, p)


def truncate_after(path: str | Path, step: int) -> int:
    """Drop the records of steps after ``step`` (a resumed run redoes them); returns how many were dropped."""
    p = Path(path)
    if not p.exists():
        return 0
    pts = read_eval_curve(p)
    keep = [x for x in pts if x.step <= step]
    if len(keep) != len(pts):
        write_points(p, keep)
    return len(pts) - len(keep)


def read_eval_curve(path: str | Path) -> list[EvalPoint]:
    """The records of an eval_curve.jsonl, in file order; [] when it does not exist. A bad line is a StageError
    naming the file and line."""
    return [EvalPoint.from_json(d, where) for where, d in json_lines(path)]


# ---- curves -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Curve:
    """One curve: x = pairs seen (ascending), y = the metric; ``sets``: the sets it averages (a category)."""

    name: str
    pairs_seen: np.ndarray
    values: np.ndarray
    category: str | None = None
    sets: tuple[str, ...] = ()


def set_curves(points: Iterable[EvalPoint], metric: str = "bt_loss") -> dict[str, Curve]:
    """{set: its whole-set curve of ``metric`` against pairs seen}, in the order the sets first appear."""
    by: dict[str, dict[int, tuple[int, float, str | None]]] = {}
    for p in points:
        v = getattr(p, metric)
        if p.subset is None and v is not None:
            by.setdefault(p.set, {})[p.step] = (p.pairs_seen, v, p.category)
    out = {}
    for s, steps in by.items():
        rows = sorted(steps.values())
        out[s] = Curve(s, np.array([r[0] for r in rows], dtype=np.float64), np.array([r[1] for r in rows]),
                       rows[-1][2], (s,))
    return out


def category_curves(points: Iterable[EvalPoint], metric: str = "bt_loss") -> dict[str, Curve]:
    """{category: the mean of its sets' ``metric``} against pairs seen. The mean is unweighted (each set counts
    once, as the paper averages benchmarks) and is taken at the steps where every set of the category has a value,
    so it always averages the same sets. Sets without a category are not in any."""
    curves = set_curves(points, metric)
    cats: dict[str, list[Curve]] = {}
    for c in curves.values():
        if c.category:
            cats.setdefault(c.category, []).append(c)
    out = {}
    for cat, cs in cats.items():
        common = set(cs[0].pairs_seen.tolist())
        for c in cs[1:]:
            common &= set(c.pairs_seen.tolist())
        xs = np.array(sorted(common), dtype=np.float64)
        if not xs.size:
            continue
        ys = np.mean([[dict(zip(c.pairs_seen.tolist(), c.values.tolist()))[x] for x in xs] for c in cs], axis=0)
        out[cat] = Curve(cat, xs, np.asarray(ys), cat, tuple(c.name for c in cs))
    return out
