"""The sweep report: every point's eval curve, its power-law fits, the figure and the table of alpha by model and
set, and the points that failed, named with their error.

Input: one ``PointOutcome`` per point of the grid (worldpm/sweep.py), ok with the records of its train artifact's
eval_curve.jsonl, or failed with its one-line error. Output (``write_sweep_report``): ``sweep.png`` / ``.svg`` (one
log-log panel per category, as the paper lays out its figure, then one per set without a category, such as the eval
split; per set when no set has a category), ``report.md``
and ``fits.json``. A function of its inputs: no timestamps, no paths.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from worldpm.modeling.eval_curve import EvalPoint, category_curves, set_curves
from worldpm.report.scaling import CRITERION, PowerLawFit, f3, fit_or_reason

_CATEGORY_ORDER = ("adversarial", "objective", "subjective")


@dataclass(frozen=True)
class PointOutcome:
    label: str
    status: str                       # "ok" | "failed"
    points: tuple[EvalPoint, ...] = ()
    error: str | None = None          # one line, for a failed point
    keys: dict[str, str] = field(default_factory=dict)  # {stage: artifact key} of the point's train / evaluate


@dataclass
class SweepFits:
    sets: dict[tuple[str, str], tuple[PowerLawFit | None, str]]        # (point label, set) -> fit or reason
    panels: dict[tuple[str, str], tuple[PowerLawFit | None, str]]      # (point label, category or set)
    curves: dict[str, dict]                                            # point label -> {panel: Curve}
    set_category: dict[str, str | None]
    by_category: bool

    def to_json(self) -> dict:
        def one(d):
            return [{"point": p, "curve": c, "fit": f.to_json() if f else None, "reason": why or None}
                    for (p, c), (f, why) in d.items()]

        return {"criterion": CRITERION, "panels_are": "categories" if self.by_category else "sets",
                "sets": one(self.sets), "panels": one(self.panels)}


def _order(names, category_of=lambda n: n) -> list[str]:
    def key(n):
        c = category_of(n) or "~"
        return (_CATEGORY_ORDER.index(c) if c in _CATEGORY_ORDER else len(_CATEGORY_ORDER), c, n)

    return sorted(dict.fromkeys(names), key=key)


def sweep_fits(outcomes: list[PointOutcome], metric: str = "bt_loss") -> SweepFits:
    """Fit every ok point's curve of each set and of each category (the mean of its sets)."""
    ok = [o for o in outcomes if o.status == "ok"]
    set_category: dict[str, str | None] = {}
    sets, per_point_sets, per_point_cats = {}, {}, {}
    for o in ok:
        sc = set_curves(o.points, metric)
        per_point_sets[o.label] = sc
        per_point_cats[o.label] = category_curves(o.points, metric)
        for name, c in sc.items():
            set_category.setdefault(name, c.category)
            sets[(o.label, name)] = fit_or_reason(c.pairs_seen, c.values, name=f"{o.label} / {name}")
    by_category = any(per_point_cats.values())
    if by_category:  # a set without a category (the eval split) is a panel of its own, after the categories
        for label, per in per_point_sets.items():
            for name, c in per.items():
                if not c.category:
                    per_point_cats[label][name] = c
    curves = per_point_cats if by_category else per_point_sets
    if by_category:
        panels = {(label, name): fit_or_reason(c.pairs_seen, c.values, name=f"{label} / {name}")
                  for label, per in curves.items() for name, c in per.items()}
    else:  # no set has a category: a panel per set, with the set's own fit
        panels = dict(sets)
    return SweepFits(sets, panels, curves, set_category, by_category)


def _cell(fit: PowerLawFit | None, why: str) -> str:
    if fit is None:
        return "not fitted" if why else "-"
    lo, hi = fit.alpha_ci
    s = f"{f3(fit.alpha)} [{f3(lo)}, {f3(hi)}]"
    if fit.model == "power+const":
        s += " +E"
    return s + (" flat" if fit.flat else "")


def alpha_table(outcomes: list[PointOutcome], fits: SweepFits) -> list[list[str]]:
    """[header, one row per set]: alpha [95% interval] of each model's fit of the set, the sets grouped by category
    (the paper's order), a column per model (a sweep has a few models and may have many sets). ``+E``: the
    saturating fit was chosen; ``flat``: no trend; ``failed``: the point did not finish."""
    sets = _order(fits.set_category, lambda s: fits.set_category.get(s))
    rows = [["set", "category"] + [o.label for o in outcomes]]
    for s in sets:
        rows.append([s, fits.set_category.get(s) or "-"]
                    + [_cell(*fits.sets.get((o.label, s), (None, ""))) if o.status == "ok" else "failed"
                       for o in outcomes])
    return rows


def render_sweep_report(name: str, outcomes: list[PointOutcome], fits: SweepFits,
                        images: dict[str, str]) -> str:
    """The sweep's Markdown: points and their status, the figure, alpha by model and set, per category, and the
    failed points with their errors."""
    failed = [o for o in outcomes if o.status != "ok"]
    out = [f"# worldpm sweep report: {name}", "",
           f"{len(outcomes)} points, {len(outcomes) - len(failed)} finished"
           + (f", **{len(failed)} failed: {', '.join(o.label for o in failed)}**" if failed else "") + ".", "",
           "Test BT loss against pairs seen D, evaluated during one training run per point. Fit: "
           f"{CRITERION}.", ""]
    rows = [[o.label, o.status, ", ".join(f"{s} `{k[:12]}`" for s, k in o.keys.items()) or "-",
             str(len({p.step for p in o.points})) if o.points else "-"] for o in outcomes]
    out += ["| point | status | artifacts | evaluation points |", "| :--- | :--- | :--- | ---: |"]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows] + [""]
    if "sweep" in images:
        out += [f"![Sweep: BT loss against pairs seen, per category, with power-law fits]({images['sweep']})", ""]
    table = alpha_table(outcomes, fits)
    if len(table) > 1:
        out += ["### alpha by model and set", "",
                "alpha of L(D) = (D_c / D)^alpha with its 95% interval; `+E`: the fit with an irreducible loss E "
                "was chosen (AICc); `flat`: no trend (the log-log slope's interval contains 0).", "",
                "| " + " | ".join(table[0]) + " |", "| :--- | :--- |" + " :--- |" * (len(table[0]) - 2)]
        out += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in table[1:]] + [""]
    if fits.by_category:
        panels = _order({c for (_, c) in fits.panels})
        ok = [o for o in outcomes if o.status == "ok"]
        # a row per category, a column per model (as the alpha table: few models, possibly many categories)
        out += ["### per category (mean BT loss of its sets; a set without a category on its own)", "",
                "| category | " + " | ".join(o.label for o in ok) + " |", "| :--- |" + " :--- |" * len(ok)]
        for c in panels:
            out.append("| " + " | ".join([c] + [_cell(*fits.panels.get((o.label, c), (None, ""))) for o in ok])
                       + " |")
        out.append("")
    reasons = [(p, c, why) for (p, c), (f, why) in fits.sets.items() if f is None]
    if reasons:
        out += ["Not fitted: " + "; ".join(why for _, _, why in reasons) + ".", ""]
    if failed:
        out += ["## Failed points", ""]
        out += [f"- **{o.label}**: {o.error or 'failed (no message)'}" for o in failed] + [""]
    return "\n".join(out).rstrip() + "\n"


def write_sweep_report(name: str, outcomes: list[PointOutcome], out: Path,
                       formats: list[str] | None = None) -> dict:
    """sweep.png/.svg, report.md and fits.json into ``out``; returns {figures, files, failed}."""
    from worldpm.report.figures import plot_sweep

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    formats = list(formats or ["png", "svg"])
    fits = sweep_fits(outcomes)
    figure_fits = {k: f for k, (f, _) in fits.panels.items()}
    files = plot_sweep(fits.curves, figure_fits, alpha_table(outcomes, fits), out, formats,
                       title=f"{name}: BT loss against pairs seen", per="category" if fits.by_category else "set")
    images = {"sweep": next((f for f in files if f.endswith(".png")), files[0])} if files else {}
    (out / "report.md").write_text(render_sweep_report(name, outcomes, fits, images))
    (out / "fits.json").write_text(json.dumps(fits.to_json(), indent=2, default=str))
    return {"figures": files, "files": sorted(files + ["report.md", "fits.json"]),
            "failed": [o.label for o in outcomes if o.status != "ok"]}
