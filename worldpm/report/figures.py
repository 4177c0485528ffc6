"""Figures of a run (PNG + SVG): the loss (raw, EMA-smoothed, per-epoch means), training accuracy and margin,
evaluation accuracy per set and subset/domain, reliability (one panel per evaluation set), length bias, and the trend
of runs (``plot_trend``, drawn after each new evaluation by worldpm/report/history.py).

Figures are drawn on matplotlib's Agg canvas through the object API (``Figure`` + ``FigureCanvasAgg``), never
pyplot's global state, so they work headless and in threads. SVGs are written without a date and with a fixed hash
salt, so the same inputs give the same bytes.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib import rcParams
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

rcParams["svg.hashsalt"] = "worldpm"  # stable element ids in SVG output
_RAW = "#9ecae1"
_SMOOTH = "#08519c"
_EPOCH = "#d94801"
_SET_COLORS = ["#08519c", "#d94801", "#238b45", "#6a51a3", "#cb181d", "#525252"]


# ---- helpers ----------------------------------------------------------------------------------------------------
def ema(values: list[float] | np.ndarray, smoothing: float) -> np.ndarray:
    """Debiased exponential moving average (as TensorBoard draws it): s_t = a s_(t-1) + (1-a) x_t, / (1 - a^t).

    NaN values (a step that logged no value) are skipped and keep the previous smoothed value."""
    x = np.asarray(values, dtype=np.float64)
    out = np.full_like(x, np.nan)
    s, w = 0.0, 0.0
    for i, v in enumerate(x):
        if not math.isnan(v):
            s = smoothing * s + (1 - smoothing) * v
            w = smoothing * w + (1 - smoothing)
        out[i] = s / w if w > 0 else np.nan
    return out


def epoch_index(epochs: np.ndarray) -> np.ndarray:
    """Which epoch each logged step belongs to: integer epochs as they are; fractional progress e in (k, k+1]
    belongs to epoch k (a log at exactly 1.0 closes the first epoch)."""
    e = np.asarray(epochs, dtype=np.float64)
    if np.all(np.isnan(e)):
        return np.zeros(e.shape, dtype=int)
    e = np.nan_to_num(e, nan=0.0)
    if np.allclose(e, np.round(e)):
        return np.round(e).astype(int)
    return np.maximum(np.ceil(e) - 1, 0).astype(int)


def epoch_means(steps: np.ndarray, epochs: np.ndarray, values: np.ndarray) -> list[dict]:
    """[{epoch, step_lo, step_hi, mean, n}] over the logged values of each epoch."""
    idx = epoch_index(epochs)
    e = np.nan_to_num(np.asarray(epochs, dtype=np.float64))
    fractional = not np.allclose(e, np.round(e))  # progress 0.5, 1.0, ... : epochs are numbered from 1
    out = []
    for k in np.unique(idx):
        m = (idx == k) & ~np.isnan(values)
        if m.any():
            out.append({"epoch": int(k), "label": f"epoch {int(k) + 1 if fractional else int(k)}", "step_lo": float(steps[m].min()), "step_hi": float(steps[m].max()),
                        "mean": float(values[m].mean()), "n": int(m.sum())})
    return out


def _new_figure(w: float, h: float) -> Figure:
    fig = Figure(figsize=(w, h), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, out: Path, stem: str, formats: list[str]) -> list[str]:
    names = []
    for fmt in formats:
        name = f"{stem}.{fmt}"
        meta = {"Date": None} if fmt == "svg" else {"Software": None}
        fig.savefig(out / name, format=fmt, metadata=meta)
        names.append(name)
    return names


def _column(rows: list[dict], key: str) -> np.ndarray:
    return np.asarray([np.nan if r.get(key) is None else float(r[key]) for r in rows], dtype=np.float64)


# ---- figures ----------------------------------------------------------------------------------------------------
def plot_loss(rows: list[dict], smoothing: float, out: Path, formats: list[str]) -> list[str]:
    steps, loss = _column(rows, "step"), _column(rows, "loss")
    fig = _new_figure(7.5, 4.2)
    ax = fig.add_subplot()
    ax.plot(steps, loss, color=_RAW, lw=1, label="loss (raw)")
    ax.plot(steps, ema(loss, smoothing), color=_SMOOTH, lw=2, label=f"EMA (smoothing {smoothing:g})")
    for i, e in enumerate(epoch_means(steps, _column(rows, "epoch"), loss)):
        ax.hlines(e["mean"], e["step_lo"], e["step_hi"], colors=_EPOCH, linestyles="--", lw=1.5,
                  label="epoch mean" if i == 0 else None)
        ax.annotate(f"{e['label']} mean: {e['mean']:.3f}", (e["step_hi"], e["mean"]), textcoords="offset points",
                    xytext=(-4, 5), ha="right", fontsize=8, color=_EPOCH,
                    bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8})
    ax.axhline(math.log(2), color="grey", lw=0.8, ls=":", label="log 2 (no preference)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss as optimised (BT or DPO; + length terms when on)")
    ax.set_title("Training loss")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    return _save(fig, out, "loss", formats)


def plot_train_accuracy_margin(rows: list[dict], smoothing: float, out: Path, formats: list[str]) -> list[str]:
    steps = _column(rows, "step")
    fig = _new_figure(11, 4.0)
    ax1, ax2 = fig.subplots(1, 2)
    acc, margin = _column(rows, "accuracy"), _column(rows, "margin")
    ax1.plot(steps, acc, color=_RAW, lw=1, label="batch accuracy (raw)")
    ax1.plot(steps, ema(acc, smoothing), color=_SMOOTH, lw=2, label="EMA")
    ax1.axhline(0.5, color="grey", lw=0.8, ls=":", label="chance")
    ax1.set_ylim(-0.02, 1.02)
    ax1.set_xlabel("optimizer step")
    ax1.set_ylabel("accuracy (r_chosen > r_rejected)")
    ax1.set_title("Training accuracy")
    ax1.grid(alpha=0.3)
    ax1.legend(loc="lower right", fontsize=8)
    ax2.plot(steps, margin, color=_RAW, lw=1, label="mean margin (raw)")
    ax2.plot(steps, ema(margin, smoothing), color=_SMOOTH, lw=2, label="EMA")
    ax2.axhline(0.0, color="grey", lw=0.8, ls=":")
    ax2.set_xlabel("optimizer step")
    ax2.set_ylabel("r_chosen - r_rejected")
    ax2.set_title("Training reward margin")
    ax2.grid(alpha=0.3)
    ax2.legend(loc="lower right", fontsize=8)
    return _save(fig, out, "train_accuracy_margin", formats)


def _accuracy_rows(metrics: dict, max_groups: int = 15, max_subsets: int = 30) -> list[tuple[str, float, int, int]]:
    """(label, accuracy, n, depth) bars: each set, then its subsets (all of RewardBench's 23 fit) or, if it has
    none, its largest domains."""
    rows = []
    for set_name, m in metrics.items():
        if m.get("accuracy") is None:
            continue
        rows.append((set_name, m["accuracy"], m["n"], 0))
        groups, limit = m.get("by_subset") or {}, max_subsets
        if not groups and len(m.get("by_domain") or {}) > 1:
            groups, limit = m["by_domain"], max_groups
        items = sorted(groups.items(), key=lambda kv: (-kv[1]["n"], kv[0]))[:limit]
        for k, v in sorted(items):
            if v["accuracy"] is not None:
                rows.append((k, v["accuracy"], v["n"], 1))
    return rows


def plot_eval_accuracy(metrics: dict, out: Path, formats: list[str]) -> list[str]:
    rows = _accuracy_rows(metrics)
    if not rows:
        return []
    fig = _new_figure(8, 1.2 + 0.32 * len(rows))
    ax = fig.add_subplot()
    y = np.arange(len(rows))[::-1]
    colors, ci = [], -1
    for label, _, _, depth in rows:
        if depth == 0:
            ci += 1
        colors.append(_SET_COLORS[ci % len(_SET_COLORS)] if depth == 0 else _SET_COLORS[ci % len(_SET_COLORS)] + "99")
    ax.barh(y, [r[1] for r in rows], color=colors, height=0.7)
    ax.set_yticks(y, [label for label, _, _, _ in rows], fontsize=8)
    for tick, (_, _, _, depth) in zip(ax.get_yticklabels(), rows):
        if depth:  # a subset/domain of the set above it
            tick.set_fontstyle("italic")
            tick.set_color("#404040")
        else:
            tick.set_fontweight("bold")
    for yi, (_, acc, n, _) in zip(y, rows):
        ax.text(min(acc, 1.0) + 0.01, yi, f"{100 * acc:.1f}% (n={n:,})", va="center", fontsize=7)
    ax.axvline(0.5, color="grey", lw=0.8, ls=":")
    ax.text(0.5, 0.995, " chance", transform=ax.get_xaxis_transform(), fontsize=7, color="grey", va="top")
    ax.set_xlim(0, 1.18)
    ax.set_xticks([0, 0.25, 0.5, 0.75, 1.0])
    ax.set_xlabel("accuracy (ties count half)")
    ax.set_title("Evaluation accuracy per set and subset")
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, out, "eval_accuracy", formats)


def plot_reliability(metrics: dict, out: Path, formats: list[str]) -> list[str]:
    """One panel per set: the reliability diagram with its ECE, and under it the histogram of the confidences (pairs
    per bin): an ECE near 0 over confidences that all sit in the first bin says little."""
    sets = [(k, m) for k, m in metrics.items() if m.get("reliability") and m.get("n")]
    if not sets:
        return []
    cols = min(len(sets), 3)
    nrows = math.ceil(len(sets) / cols)
    # wide enough for the figure title and the legend under the panels: constrained layout moves text, it never
    # shrinks it, so a one-panel figure as narrow as its panel cut both off at the sides
    fig = _new_figure(max(5.6, 4.2 * cols), 5.0 * nrows + 0.6)
    grid = fig.subplots(2 * nrows, cols, squeeze=False, height_ratios=[3, 1] * nrows)
    axes = [grid[2 * (i // cols), i % cols] for i in range(nrows * cols)]
    hist_axes = [grid[2 * (i // cols) + 1, i % cols] for i in range(nrows * cols)]
    for ax, hx, (name, m) in zip(axes, hist_axes, sets):
        table = m["reliability"]
        lo = np.array([r["bin_lo"] for r in table])
        hi = np.array([r["bin_hi"] for r in table])
        acc = np.array([np.nan if r["accuracy"] is None else r["accuracy"] for r in table])
        conf = np.array([np.nan if r["confidence"] is None else r["confidence"] for r in table])
        n = np.array([r["n"] for r in table])
        ax.bar(lo, np.nan_to_num(acc), width=hi - lo, align="edge", color=_SMOOTH, alpha=0.75,
               edgecolor="white", label="accuracy in bin")
        ax.plot([0.5, 1.0], [0.5, 1.0], color="black", lw=1, ls="--", label="perfect calibration")
        ax.plot(conf, acc, "o", color=_EPOCH, ms=4, label="(mean confidence, accuracy) of bin", clip_on=False, zorder=3)
        ax.set_xlim(0.5, 1.0)
        ax.set_ylim(0, 1.02)
        ax.set_ylabel("fraction ranked right")
        ece, cm = m.get("ece"), m.get("confidence_mean")
        title = f"{name} (n={m['n']})"
        if ece is not None:
            title += f"\nECE {ece:.3f}" + ("" if cm is None else f", mean confidence {cm:.2f}")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        hx.bar(lo, n, width=hi - lo, align="edge", color="#969696", edgecolor="white")
        for l, h, k in zip(lo, hi, n):
            if k:
                hx.text((l + h) / 2, k, f"{k}", ha="center", va="bottom", fontsize=6)
        hx.set_xlim(0.5, 1.0)
        hx.set_ylim(0, max(1, int(n.max())) * 1.3)
        hx.set_xlabel("confidence max(p, 1-p), p = sigmoid(r_c - r_r)")
        hx.set_ylabel("pairs", fontsize=8)
        hx.tick_params(labelsize=7)
    for ax in axes[len(sets):] + hist_axes[len(sets):]:
        ax.set_visible(False)
    fig.suptitle("Reliability (top) and the confidences it rests on\n(bottom: pairs per bin)", fontsize=11)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=3 if cols > 1 else 1, fontsize=8)
    return _save(fig, out, "reliability", formats)


def plot_length_bias(metrics: dict, out: Path, formats: list[str]) -> list[str]:
    """Per set: accuracy on chosen-longer and chosen-shorter pairs (with 95% intervals) and their mean, the
    length-controlled accuracy; the length rule's accuracy on the same pairs as a marker."""
    sets = [(k, m.get("length_bias") or {}, m) for k, m in metrics.items()]
    sets = [(k, lb, m) for k, lb, m in sets if any(lb.get(c, {}).get("n") for c in ("chosen_longer", "chosen_shorter"))]
    if not sets:
        return []
    fig = _new_figure(max(7.0, 2.2 * len(sets) + 2), 4.8)
    ax = fig.add_subplot()
    x = np.arange(len(sets))
    width = 0.26
    bars = (("chosen_longer", _SMOOTH, "chosen longer"), ("chosen_shorter", _EPOCH, "chosen shorter"),
            ("lc", "#238b45", "length-controlled (mean of the two)"))
    for j, (cat, color, label) in enumerate(bars):
        if cat == "lc":
            vals = [m.get("lc_accuracy") for _, _, m in sets]
            cis = [m.get("lc_accuracy_ci") for _, _, m in sets]
            ns = [sum(m.get("lc_n") or [0, 0]) for _, _, m in sets]
        else:
            vals = [lb.get(cat, {}).get("accuracy") for _, lb, _ in sets]
            cis = [lb.get(cat, {}).get("ci") for _, lb, _ in sets]
            ns = [lb.get(cat, {}).get("n", 0) for _, lb, _ in sets]
        xs = x + (j - 1) * width
        ys = np.array([np.nan if v is None else v for v in vals])
        err = np.array([[0.0, 0.0] if (c is None or v is None) else [v - c[0], c[1] - v] for v, c in zip(vals, cis)]).T
        ax.bar(xs, ys, width=width, color=color, label=label, yerr=err, capsize=2, error_kw={"lw": 0.8})
        for xi, v, k in zip(xs, vals, ns):
            if v is not None:
                # dark on a light box: readable on every bar colour (white text was not, on the light ones)
                ax.text(xi, 0.03, f"{100 * v:.0f}%\nn={k}", ha="center", va="bottom", fontsize=7, color="black",
                        bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "none", "alpha": 0.85})
    rule = [m.get("length_rule_accuracy") for _, _, m in sets]
    ax.plot(x, [np.nan if v is None else v for v in rule], "D", color="black", ms=5,
            label="length rule (longer wins): accuracy")
    ax.axhline(0.5, color="grey", lw=0.8, ls=":", label="chance")
    units = sorted({m.get("length_unit") or "characters" for _, _, m in sets})
    labels = []
    for k, _, m in sets:
        corr = m.get("margin_length_corr")
        labels.append(k + ("" if corr is None else f"\ncorr(margin, dlen) {corr:+.2f}"))
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_xlabel(f"evaluation set (length in {' / '.join(units)}); bars: accuracy with 95% intervals")
    ax.set_ylim(0, 1.15)
    ax.set_ylabel("accuracy")
    ax.set_title("Length: what the model learned beyond \"the longer answer wins\"", fontsize=11)
    ax.grid(axis="y", alpha=0.3)
    fig.legend(loc="outside lower center", fontsize=7, ncols=3)  # below the axes: never over a bar or its interval
    return _save(fig, out, "length_bias", formats)


def plot_trend(history: list[dict], path: str | Path, title: str = "evaluation across runs") -> Path | None:
    """Per flow run: test accuracy and each eval set's (left), test BT loss and each eval set's final BT loss
    (right; runs from before eval-set losses were recorded have none); failed/warned runs marked. None if < 2
    points."""
    points = [h for h in history if h.get("test_accuracy") is not None]
    if len(points) < 2:
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = _new_figure(2 * max(5.0, 0.3 * len(points) + 2.5), 4.0)
    ax, lx = fig.subplots(1, 2)
    x = np.arange(1, len(points) + 1)
    names = sorted({k for p in points for k in (p.get("eval_sets") or {})})
    ax.plot(x, [p["test_accuracy"] for p in points], "o-", color=_SET_COLORS[0], label="test")
    lx.plot(x, [np.nan if p.get("test_bt_loss") is None else p["test_bt_loss"] for p in points], "o-",
            color=_SET_COLORS[0], label="test")
    for i, name in enumerate(names, 1):
        color = _SET_COLORS[i % len(_SET_COLORS)]
        ys = [np.nan if (p.get("eval_sets") or {}).get(name) is None else p["eval_sets"][name] for p in points]
        ax.plot(x, ys, "s--", color=color, ms=4, label=name)
        ls = [np.nan if (p.get("eval_set_bt_loss") or {}).get(name) is None else p["eval_set_bt_loss"][name]
              for p in points]
        lx.plot(x, ls, "s--", color=color, ms=4, label=name)
    bad = [(xi, p) for xi, p in zip(x, points) if p.get("status") in ("failed", "warned")]
    if bad:
        ax.scatter([b[0] for b in bad], [b[1]["test_accuracy"] for b in bad], s=120, facecolors="none",
                   edgecolors="red", linewidths=1.5, label="regression (warned/failed)", zorder=5)
    labels = [p.get("time", "")[:16].replace("T", "\n") for p in points]
    for a in (ax, lx):
        a.set_xticks(x, labels, fontsize=6)
        a.set_xlabel("flow run")
        a.grid(alpha=0.3)
        a.legend(loc="best", fontsize=7)
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set_title("accuracy")
    lx.set_ylabel("BT loss (final)")
    lx.axhline(math.log(2), color="grey", lw=0.8, ls=":")
    lx.set_title("BT loss")
    fig.suptitle(title, fontsize=11)
    fig.savefig(path, format=path.suffix.lstrip(".") or "png")
    return path


# ---- evaluation during training, gradient norm, sweeps (the paper's figures) ------------------------------------
_CATEGORY_ORDER = ("adversarial", "objective", "subjective")


def _category_sort(names) -> list[str]:
    """The paper's three categories first, in its order, then the user's own names."""
    names = list(dict.fromkeys(names))
    return [c for c in _CATEGORY_ORDER if c in names] + sorted(c for c in names if c not in _CATEGORY_ORDER)


def _log_ticks(ax, lo: float, hi: float, n: int = 5) -> None:
    """Readable ticks on a log y-axis that spans less than a decade (loss curves do): n values, 2-3 digits."""
    from matplotlib.ticker import NullLocator

    if not (lo > 0 and hi > lo):
        return
    ticks = np.unique(np.round(np.geomspace(lo, hi, n), 3 if hi < 1 else 2))
    ax.set_yticks(ticks, [f"{t:g}" for t in ticks])
    ax.yaxis.set_minor_locator(NullLocator())


def plot_eval_curves(train_rows: list[dict], points: list, out: Path, formats: list[str],
                     smoothing: float = 0.9) -> list[str]:
    """Left: the training loss (EMA) and each eval set's BT loss against pairs seen (log x). Right (when any set
    has a category): the mean BT loss of each category's sets. ``points``: eval_curve.EvalPoint records."""
    from worldpm.modeling.eval_curve import category_curves, set_curves
    from worldpm.report.trainlog import pairs_seen

    sets = set_curves(points)
    cats = category_curves(points)
    if not sets:
        return []
    ncols = 2 if cats else 1
    fig = _new_figure(6.2 * ncols, 4.4)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    ax = axes[0]
    if train_rows:
        x, loss = pairs_seen(train_rows), _column(train_rows, "loss")
        ok = np.isfinite(x) & (x > 0)
        if ok.any():
            ax.plot(x[ok], loss[ok], color=_RAW, lw=0.8, alpha=0.7, label="training loss (raw)")
            ax.plot(x[ok], ema(loss, smoothing)[ok], color="#525252", lw=1.6, label=f"training loss (EMA {smoothing:g})")
    for i, (name, c) in enumerate(sets.items()):
        ok = c.pairs_seen > 0
        label = name + (f" ({c.category})" if c.category else "")
        ax.plot(c.pairs_seen[ok], c.values[ok], "o-", ms=3.5, lw=1.4, color=_SET_COLORS[i % len(_SET_COLORS)],
                label=label)
    ax.set_xscale("log")
    ax.axhline(math.log(2), color="grey", lw=0.8, ls=":", label="log 2 (no preference)")
    ax.set_xlabel("pairs seen")
    ax.set_ylabel("BT loss")
    ax.set_title("BT loss during training, per set")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="best")
    if cats:
        ax2 = axes[1]
        for i, cat in enumerate(_category_sort(cats)):
            c = cats[cat]
            ok = c.pairs_seen > 0
            ax2.plot(c.pairs_seen[ok], c.values[ok], "o-", ms=3.5, lw=1.6, color=_SET_COLORS[i % len(_SET_COLORS)],
                     label=f"{cat} (mean of {len(c.sets)} set{'s' if len(c.sets) > 1 else ''})")
        ax2.set_xscale("log")
        ax2.axhline(math.log(2), color="grey", lw=0.8, ls=":")
        ax2.set_xlabel("pairs seen")
        ax2.set_ylabel("mean BT loss of the category's sets")
        ax2.set_title("BT loss per category")
        ax2.grid(alpha=0.3, which="both")
        ax2.legend(fontsize=7, loc="best")
    return _save(fig, out, "eval_curves", formats)


def plot_grad_norm(rows: list[dict], spikes: list, out: Path, formats: list[str]) -> list[str]:
    """The gradient norm (before clipping) per logged step, log y, with the spikes (trainlog.grad_norm_spikes)
    marked and labelled by step."""
    steps, g = _column(rows, "step"), _column(rows, "grad_norm")
    ok = np.isfinite(g) & np.isfinite(steps)
    if not ok.any():
        return []
    fig = _new_figure(7.5, 3.8)
    ax = fig.add_subplot()
    ax.plot(steps[ok], g[ok], color=_SMOOTH, lw=1.0, label="gradient norm (before clipping)")
    if spikes:
        ax.plot([s.step for s in spikes], [s.grad_norm for s in spikes], "o", mfc="none", mec="#cb181d", mew=1.5,
                ms=9, label=f"spike ({len(spikes)}): > median + 6 robust sd of the 20 norms before")
        for s in spikes[:12]:
            ax.annotate(f"step {s.step}", (s.step, s.grad_norm), textcoords="offset points", xytext=(0, 8),
                        ha="center", fontsize=7, color="#cb181d")
    top, low = float(np.nanmax(g[ok])), float(np.nanmin(g[ok]))
    if low > 0 and top / low > 50:  # a spike of orders of magnitude: log scale keeps the rest readable
        from matplotlib.ticker import ScalarFormatter

        ax.set_yscale("log")
        ax.set_ylim(top=top * 3)
        ax.yaxis.set_major_formatter(ScalarFormatter())
    else:
        ax.set_ylim(0, top * 1.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("gradient norm")
    ax.set_title("Gradient norm" + (f": {len(spikes)} spike{'s' if len(spikes) > 1 else ''}" if spikes
                                    else ": no spikes"))
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="lower right")
    return _save(fig, out, "grad_norm", formats)


def plot_sweep(curves: dict[str, dict[str, object]], fits: dict[tuple[str, str], object],
               table: list[list[str]], out: Path, formats: list[str], title: str = "Scaling sweep",
               per: str = "category") -> list[str]:
    """The sweep figure, laid out like the paper's: one log-log panel per category (adversarial, objective,
    subjective, then the user's), each model's mean BT loss of the category's sets against pairs seen (markers)
    and its power-law fit (dashed), alpha with its 95% interval in the legend; under them the table of alpha by
    model and set (``table``: a header row, then one row per set, a column per model).

    ``curves``: {model: {category: eval_curve.Curve}}; ``fits``: {(model, category): scaling.PowerLawFit or None}.
    ``per="set"``: the panels are sets (a sweep whose eval sets have no category)."""
    cats = _category_sort(c for per in curves.values() for c in per)
    if not cats:
        return []
    models = list(curves)
    ncols = len(cats)
    table_rows = max(len(table), 1)
    fig = _new_figure(max(4.6 * ncols, 8.0), 4.3 + 0.3 * table_rows + 0.4)
    grid = fig.add_gridspec(2, ncols, height_ratios=[4.3, 0.3 * table_rows + 0.4])
    colors = {m: _SET_COLORS[i % len(_SET_COLORS)] for i, m in enumerate(models)}
    for j, cat in enumerate(cats):
        ax = fig.add_subplot(grid[0, j])
        lo, hi = math.inf, -math.inf
        for m in models:
            c = curves[m].get(cat)
            if c is None:
                continue
            ok = (c.pairs_seen > 0) & (c.values > 0)
            if not ok.any():
                continue
            x, y = c.pairs_seen[ok], c.values[ok]
            lo, hi = min(lo, float(y.min())), max(hi, float(y.max()))
            f = fits.get((m, cat))
            label = m if f is None else f"{m}: α {f.label()}"
            ax.plot(x, y, "o", ms=4, color=colors[m], label=label)
            if f is not None:
                xs = np.geomspace(x.min(), x.max(), 100)
                ax.plot(xs, f.predict(xs), "--", lw=1.3, color=colors[m])
        ax.set_xscale("log")
        ax.set_yscale("log")
        _log_ticks(ax, lo, hi)
        ax.set_xlabel("pairs seen")
        if j == 0:
            ax.set_ylabel("BT loss (mean of the category's sets)" if per == "category" else "BT loss")
        own = per == "category" and any(getattr(curves[m].get(cat), "category", cat) is None for m in models)
        ax.set_title(cat.capitalize() if cat in _CATEGORY_ORDER else f"{cat} (a set, no category)" if own else cat)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, loc="best")
    tax = fig.add_subplot(grid[1, :])
    tax.axis("off")
    if table:
        t = tax.table(cellText=table[1:], colLabels=table[0], loc="center", cellLoc="center")
        t.auto_set_font_size(False)
        t.set_fontsize(7)
        t.scale(1.0, 1.25)
        for (r, _), cell in t.get_celld().items():
            if r == 0:
                cell.set_text_props(fontweight="bold")
    tax.set_title("alpha of L = (D_c / D)^alpha [95% interval] by model and set", fontsize=9)
    fig.suptitle(title, fontsize=11)
    return _save(fig, out, "sweep", formats)
