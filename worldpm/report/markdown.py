"""The run report (report.md): the Markdown of one run, readable offline. Images are relative links to the PNGs
next to it in the plot artifact. It depends only on the plot stage's inputs (no timestamps, no paths).

``embed_images`` turns those links into data URIs for Prefect's UI, which cannot read local files (both of its UIs
render a ``data:image/png;base64`` image in a markdown artifact; checked in headless Chromium on Prefect 3.8.8).
Values are formatted for people (``human``): counts without decimals, durations in s / min, fractions in %, and a
nested value (the trainer's ``final``, ``startup`` and ``eval`` dicts) becomes rows of its own.
"""
from __future__ import annotations

import base64
import json
import math
import re
from pathlib import Path
from typing import Any, Iterable

ACCURACY_NOTE = "Accuracy counts a tie (equal rewards) as half a correct pair."


# ---- small formatting helpers ---------------------------------------------------------------------------------
def _pct(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{100 * x:.{digits}f}%"


def _num(x: Any, digits: int = 4) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        if x != 0 and (abs(x) >= 1e5 or abs(x) < 1e-3):
            return f"{x:.3g}"
        return f"{x:.{digits}f}"
    return str(x).replace("|", "\\|")


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h} h {m:02d} min" if h else f"{m} min {s:02d} s"


_PCT_KEYS = ("accuracy", "fraction", "padding")


def human(value: Any, key: str = "") -> str:
    """One value as a person reads it, by what its key says it is: whole numbers with thousands separators (an
    integral float too: ``epochs 1``), seconds as ``4.2 s`` or ``251 s (4 min 11 s)``, fractions (accuracy,
    padding) in %, memory in GB, a learning rate in scientific notation, other floats to 3 significant digits.
    None is ``-``; a dict or list is for ``flatten`` (here it becomes compact JSON)."""
    k = key.rsplit(".", 1)[-1].lower()
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, default=str) if value else "(none)"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value == 0:
            return "0"
        if (k == "seconds" or k.endswith("_seconds") or k.endswith("_s")) and not k.endswith("per_s"):
            return f"{value:.1f} s" if value < 60 else f"{value:,.0f} s ({_hms(value)})"
        if k.endswith(_PCT_KEYS) and 0 <= value <= 1:
            return f"{100 * value:.1f}%"
        if k.endswith("_gb"):
            return f"{value:.2f} GB"
        if k in ("lr", "learning_rate") or k.endswith("_lr"):
            return f"{value:.2e}"
        if value.is_integer() and abs(value) < 1e15:
            return f"{int(value):,}"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 100:
            return f"{value:.1f}"
        return f"{value:.3g}"
    text = str(value).replace("|", "\\|").replace("\n", " ")
    return text if text.strip() else "-"


def flatten(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, scalar) rows of a nested value: {"final": {"loss": 0.5}} -> [("final.loss", 0.5)]. A list of
    scalars stays one row (comma-joined); a list of dicts gives rows ``key[i].field``; an empty dict or list is a
    row of its own, so nothing disappears."""
    if isinstance(value, dict):
        if not value:
            return [(prefix, "(none)")]
        rows: list[tuple[str, Any]] = []
        for k, v in value.items():
            rows += flatten(v, f"{prefix}.{k}" if prefix else str(k))
        return rows
    if isinstance(value, (list, tuple)):
        if not value:
            return [(prefix, "(none)")]
        if all(not isinstance(v, (dict, list, tuple)) for v in value):
            return [(prefix, ", ".join(human(v, prefix) for v in value))]
        rows = []
        for i, v in enumerate(value):
            rows += flatten(v, f"{prefix}[{i}]")
        return rows
    return [(prefix, value)]


def _cell(c: Any) -> str:
    """A table cell: numbers through _num, text escaped; never empty (an empty cell reads as a missing value)."""
    text = _num(c) if not isinstance(c, str) else c.replace("|", "\\|").replace("\n", " ")
    return text if text.strip() else "-"


def _table(header: list[str], rows: Iterable[list[Any]], align: str | None = None) -> str:
    rows = list(rows)
    align = align or ("l" + "r" * (len(header) - 1))
    sep = ["---:" if a == "r" else ":---" for a in align]
    lines = ["| " + " | ".join(h if h.strip() else "-" for h in header) + " |", "| " + " | ".join(sep) + " |"]
    for r in rows:
        lines.append("| " + " | ".join(_cell(c) for c in r) + " |")
    return "\n".join(lines)


# ---- images: relative links (report.md) or data URIs (Prefect's UI) ----------------------------------------------
_IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)\)")
_MIME = {".png": "image/png", ".svg": "image/svg+xml", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}


def image_links(md: str) -> list[str]:
    """The targets of the Markdown images of ``md``, in order."""
    return [m.group(2) for m in _IMAGE.finditer(md)]


def embed_images(md: str, folder: str | Path) -> str:
    """``md`` with each image link that names a file in ``folder`` replaced by a data URI of the file, so that a
    viewer without access to the folder (Prefect's UI) shows it. A link to a missing file becomes a line that says
    which file is missing, never a broken image."""
    folder = Path(folder)

    def swap(m: re.Match) -> str:
        alt, target = m.group(1), m.group(2)
        if target.startswith(("data:", "http://", "https://")):
            return m.group(0)
        f = folder / target
        mime = _MIME.get(f.suffix.lower())
        if mime is None or not f.is_file():
            return f"*({alt or 'figure'}: {target} is not in {folder})*"
        return f"![{alt}](data:{mime};base64,{base64.b64encode(f.read_bytes()).decode()})"

    return _IMAGE.sub(swap, md)


# ---- report.md ------------------------------------------------------------------------------------------------
def render_report(*, name: str, clean_report: dict | None, train_summary: dict | None,
                  metrics: dict | None, images: dict[str, str], digests: dict[str, str] | None = None,
                  max_group_rows: int = 40, eval_points: list | None = None, spikes: list | None = None) -> str:
    """The Markdown report of one run.

    ``images``: {figure id: relative file name} of the PNGs written next to report.md (loss,
    train_accuracy_margin, eval_curves, grad_norm, eval_accuracy, reliability (with the confidence histogram),
    length_bias). ``digests``: {stage: content digest} of the inputs, so a reader can tell which artifacts the
    report describes. ``eval_points``: the eval_curve.jsonl records of evaluation during training (a section with
    each set's power-law fit); ``spikes``: trainlog.grad_norm_spikes of the training log (None: not computed)."""
    out: list[str] = [f"# worldpm run report: {name}", ""]
    if digests:
        out += ["Inputs (content digests): " + ", ".join(f"{s} `{d[:12]}`" for s, d in digests.items()), ""]
    out += _funnel(clean_report) + _training(train_summary, images)
    if eval_points:
        out += _eval_during_training(eval_points, images)
    if spikes is not None or "grad_norm" in images:
        out += _grad_norm(spikes or [], images)
    out += ["## Evaluation", ""]
    if not metrics:
        out += ["(no evaluation metrics)", ""]
    else:
        out += _evaluation(metrics, images, max_group_rows) + _length_bias(metrics, images) + \
            _calibration(metrics, images)
    return "\n".join(out).rstrip() + "\n"


def _funnel(clean_report: dict | None) -> list[str]:
    out = ["## Data funnel", ""]
    if not clean_report:
        return out + ["(no clean report)", ""]
    rin, rout = clean_report.get("rows_in"), clean_report.get("rows_out")
    rows: list[list[Any]] = [["pairs in (from download)", rin, "-"]]
    remaining = rin
    rules = clean_report.get("rules", {})
    for rule, n in clean_report.get("rejected_by_rule", {}).items():
        if remaining is not None and isinstance(n, int):
            remaining -= n
        setting = rules.get(rule)
        rows.append([f"- {rule}", -n if isinstance(n, int) else n,
                     json.dumps(setting, default=str) if setting is not None else "-"])
    rows.append(["pairs out (cleaned)", rout, "-"])
    out.append(_table(["step", "pairs", "rule setting"], rows, "lrl"))
    if rin is not None and rout is not None and rin:
        out += ["", f"{_pct(rout / rin)} of the pairs read survive cleaning."]
    if remaining is not None and rout is not None and remaining != rout:
        out += ["", f"Note: pairs in minus rejections is {remaining:,}, not {rout:,}: a pair rejected by "
                    f"several rules is counted under each."]
    return out + [""]


def _training(train_summary: dict | None, images: dict[str, str]) -> list[str]:
    out = ["## Training", ""]
    if train_summary:
        keys = ["steps", "epochs", "final_loss", "train_accuracy", "seconds", "tokens_per_s", "device",
                "num_processes", "precision", "padding_fraction", "resumed_from_step"]
        known = [k for k in keys if k in train_summary] + [k for k in train_summary if k not in keys]
        rows = [[k, human(v, k)] for top in known for k, v in flatten(train_summary[top], top)]
        out += [_table(["training", "value"], rows, "lr"), ""]
    else:
        out += ["(no training summary)", ""]
    for fig, title in (("loss", "Training loss"), ("train_accuracy_margin", "Training accuracy and margin")):
        if fig in images:
            out += [f"![{title}]({images[fig]})", ""]
    return out


def _eval_during_training(points: list, images: dict[str, str]) -> list[str]:
    """Each set's BT loss during training and its power-law fit in pairs seen (worldpm/report/scaling.py)."""
    from worldpm.modeling.eval_curve import category_curves, set_curves
    from worldpm.report.scaling import CRITERION, fit_curves

    sets, cats = set_curves(points), category_curves(points)
    steps = sorted({p.step for p in points})
    out = ["## Evaluation during training", "",
           f"BT loss on each set at {len(steps)} points of training, against pairs seen. Fit: {CRITERION}.", ""]
    if "eval_curves" in images:
        out += [f"![BT loss against pairs seen]({images['eval_curves']})", ""]
    rows = []
    for label, kind, curves in (("set", "set", sets), ("category mean", "category", cats)):
        for nm, (fit, why) in fit_curves(curves).items():
            c = curves[nm]
            # kept narrow (Prefect's UI shows the table in a page's width): E in the alpha cell marks the
            # saturating model, the trend column says flat
            rows.append([nm if kind == "set" else f"{nm} (mean of {len(c.sets)})",
                         (c.category or "-") if kind == "set" else "category", len(c.values),
                         f"{c.values[0]:.3f} -> {c.values[-1]:.3f}",
                         fit.label().removesuffix(" flat") if fit else "-",
                         fit.trend if fit else f"not fitted: {why.split(': ', 1)[-1]}"])
    out += [_table(["curve", "category", "points", "BT loss first -> last", "alpha [95%]", "trend"], rows,
                   "llrrll"), ""]
    return out


def _grad_norm(spikes: list, images: dict[str, str]) -> list[str]:
    from worldpm.report.trainlog import spike_definition

    out = ["## Gradient norm", "", f"Before clipping, at each logged step; {spike_definition()}.", ""]
    if "grad_norm" in images:
        out += [f"![Gradient norm]({images['grad_norm']})", ""]
    if not spikes:
        return out + ["No spikes.", ""]
    out += [_table(["step", "gradient norm", "median before", "x median"],
                   [[s.step, f"{s.grad_norm:.3g}", f"{s.median:.3g}", f"{s.ratio:.1f}"] for s in spikes], "rrrr"), ""]
    return out


def _ci(ci: list | None) -> str:
    return "" if not ci else f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def _pct_ci(x: float | None, ci: list | None) -> str:
    return "-" if x is None else _pct(x) + _ci(ci)


def _evaluation(metrics: dict, images: dict[str, str], max_group_rows: int) -> list[str]:
    out = [ACCURACY_NOTE + " BT loss is the mean of -log sigmoid(r_chosen - r_rejected). Brackets: 95% intervals "
           "(Wilson for accuracies). LC accuracy is length-controlled (see Length); the length rule is \"the longer "
           "response wins\" on the same pairs.", ""]
    rows = []
    for set_name, m in metrics.items():
        rows.append([set_name, m.get("n"), m.get("ties"), m.get("truncated"),
                     _pct_ci(m.get("accuracy"), m.get("accuracy_ci")),
                     _pct_ci(m.get("lc_accuracy"), m.get("lc_accuracy_ci")),
                     _pct(m.get("length_rule_accuracy")), m.get("bt_loss"), m.get("ece"),
                     _mean_std(m.get("chosen_mean"), m.get("chosen_std")),
                     _mean_std(m.get("rejected_mean"), m.get("rejected_std")), m.get("margin_mean")])
    out += [_table(["set", "pairs", "ties", "truncated", "accuracy", "LC accuracy", "length rule", "BT loss", "ECE",
                    "chosen reward", "rejected reward", "mean margin"], rows), ""]
    texts = {k: m["text"] for k, m in metrics.items() if m.get("text")}
    if texts:
        out += ["Text path: " + "; ".join(
            f"{k}: {t.get('normalization', '?')} normalisation"
            + (f" by {t['by']}" if t.get("by") else f", {t.get('texts_changed', 0):,} texts changed")
            for k, t in texts.items()) + " (eval text is normalised as the training text was).", ""]
    if "eval_accuracy" in images:
        out += [f"![Accuracy per set and subset]({images['eval_accuracy']})", ""]
    for set_name, m in metrics.items():
        out += _set_details(set_name, m, max_group_rows)
    return out


def _set_details(set_name: str, m: dict, max_group_rows: int) -> list[str]:
    """RewardBench sections and accuracy by subset / source / domain of one set (nothing when it has none)."""
    sections = m.get("sections") or {}
    groups = [("subset", m.get("by_subset") or {}), ("source", m.get("by_source") or {}),
              ("domain", m.get("by_domain") or {})]
    if not sections and not any(len(g) > 1 or (g and "subset" == k) for k, g in groups):
        return []
    out = [f"### {set_name}", ""]
    if sections:
        srows = [[s, _pct(v["accuracy"], 2), v["weight"], ", ".join(v["subsets"]),
                  "yes" if v.get("complete") else "no"] for s, v in sections.items()]
        out += ["RewardBench sections (prompt-weighted by RewardBench's example counts; Reasoning: math "
                "and code weigh one half each):", "",
                _table(["section", "score", "weight", "subsets present", "complete"], srows, "lrrll")]
        if m.get("rewardbench_score") is not None:
            out += ["", f"RewardBench score (mean of the four sections): **{_pct(m['rewardbench_score'], 2)}**"]
        out.append("")
    for kind, g in groups:
        if not g or (kind != "subset" and len(g) < 2):
            continue
        items = sorted(g.items(), key=lambda kv: (-kv[1]["n"], kv[0]))
        shown = items[:max_group_rows]
        out += [f"Accuracy by {kind}:", "",
                _table([kind, "pairs", "accuracy"], [[k, v["n"], _pct(v["accuracy"])] for k, v in shown])]
        if len(items) > len(shown):
            rest = sum(v["n"] for _, v in items[len(shown):])
            out += ["", f"... and {len(items) - len(shown)} more {kind}s ({rest:,} pairs)."]
        out.append("")
    return out


def _length_bias(metrics: dict, images: dict[str, str]) -> list[str]:
    units = sorted({m.get("length_unit") or "characters" for m in metrics.values()})
    out = ["## Length", "",
           f"Lengths in {' / '.join(units)} before truncation. A reward model that mostly rewards length is right on "
           "the pairs whose chosen response is longer and wrong on the others. Length-controlled (LC) accuracy is the "
           "mean of the two, so the length rule (\"the longer response wins\") scores 50% on it whatever the set; "
           "corr is the Pearson correlation of the reward margin with the length difference (0: no linear trace of "
           "length). Brackets: 95% intervals.", ""]
    # two tables of a row per set: eight columns with intervals in one table are wider than Prefect's artifact page
    by_length, against = [], []
    for set_name, m in metrics.items():
        lb = m.get("length_bias") or {}
        corr, cci = m.get("margin_length_corr"), m.get("margin_length_corr_ci")
        by_length.append([set_name] + [f"{_pct_ci(lb[k]['accuracy'], lb[k].get('ci'))} (n={lb[k]['n']:,})"
                                       if k in lb else "-" for k in ("chosen_longer", "chosen_shorter")]
                         + [_pct_ci(m.get("lc_accuracy"), m.get("lc_accuracy_ci"))])
        against.append([set_name, "-" if corr is None else f"{corr:+.3f}" + (f" [{cci[0]:+.2f}, {cci[1]:+.2f}]"
                                                                             if cci else ""),
                        _pct(m.get("prefers_longer")),
                        _pct_ci(m.get("length_rule_accuracy"), m.get("length_rule_accuracy_ci")),
                        _pct_ci(m.get("accuracy"), m.get("accuracy_ci"))])
    out += [_table(["set", "chosen longer", "chosen shorter", "LC accuracy"], by_length), "",
            _table(["set", "corr(margin, length diff)", "prefers longer", "length rule accuracy", "model accuracy"],
                   against), ""]
    if "length_bias" in images:
        out += [f"![Length bias]({images['length_bias']})", ""]
    return out


def _calibration(metrics: dict, images: dict[str, str]) -> list[str]:
    out = ["## Calibration", "",
           "p = sigmoid(r_chosen - r_rejected). Each pair's confidence is max(p, 1 - p); the reliability table "
           "bins it and compares the mean confidence with the fraction of pairs the model ranks right. "
           "ECE = sum over bins of (pairs in bin / pairs) x |accuracy - confidence|.", ""]
    if "reliability" in images:
        out += [f"![Reliability diagram]({images['reliability']})", ""]
    for set_name, m in metrics.items():
        table = m.get("reliability") or []
        if not table:
            continue
        share, low = m.get("confidence_share_below"), m.get("confidence_below", 0.55)
        note = ""
        if m.get("confidence_mean") is not None:
            note = (f", mean confidence {m['confidence_mean']:.3f}, {_pct(share)} of pairs below {low}"
                    + ("; near-uninformative: the small ECE says the model claims almost nothing"
                       if (share or 0) >= 0.9 else ""))
        out += [f"{set_name} (n={m.get('n')}, ECE {_num(m.get('ece'))}{note}); the pairs column is the histogram of "
                "the confidences:", "",
                _table(["confidence bin", "pairs", "mean confidence", "accuracy"],
                       [[f"{r['bin_lo']:.2f}-{r['bin_hi']:.2f}", r["n"], r["confidence"], r["accuracy"]]
                        for r in table]), ""]
    return out


def _mean_std(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "-"
    return f"{mean:.3f} ± {std:.3f}" if std is not None else f"{mean:.3f}"
