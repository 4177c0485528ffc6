"""The plot stage on hand-made clean/train/evaluate artifacts; the trend plot; report.md contents."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest

from tasks import PIPELINE as pipeline
from worldpm.modeling import metrics as M
from worldpm.config import PipelineConfig
from worldpm.report.figures import ema, epoch_index, epoch_means, plot_trend
from worldpm.store import ArtifactStore

log = logging.getLogger("test_plot")


def _commit(store: ArtifactStore, stage: str, key: str, files: dict[str, str]):
    tmp = store.new_tmp(stage, key)
    for name, text in files.items():
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp / name).write_text(text)
    return store.commit(stage, key, tmp, {"pipeline": "t"})


def fake_upstream(store: ArtifactStore) -> dict:
    rng = np.random.default_rng(0)
    clean = {"rows_in": 1396, "rows_out": 1200, "rejected_by_rule": {"min_chars": 40, "near_identical": 100,
                                                                    "dedupe": 56},
             "rules": {"min_chars": 1, "near_identical": 0.95, "dedupe": True}}
    steps = np.arange(1, 121)
    rows = []
    for s in steps:  # a loss that falls from log 2 to ~0.45 with noise, two epochs of 60 steps
        loss = 0.45 + (math.log(2) - 0.45) * math.exp(-s / 30) + rng.normal(0, 0.05)
        rows.append({"step": int(s), "epoch": round(s / 60, 4), "loss": loss,
                     "accuracy": float(np.clip(0.5 + 0.3 * (1 - math.exp(-s / 30)) + rng.normal(0, 0.08), 0, 1)),
                     "margin": 1.2 * (1 - math.exp(-s / 30)) + rng.normal(0, 0.2), "lr": 1e-5, "grad_norm": 1.0,
                     "tokens_per_s": 1000.0, "pairs_per_s": 4.0, "elapsed_s": float(s), "pairs": 16,
                     "pairs_seen": 16 * int(s), "tokens_seen": 4000 * int(s)})
    # evaluation during training at 8 log-spaced steps: the eval split, and two sets with categories
    curve = [{"step": st, "pairs_seen": 16 * st, "tokens_seen": 4000 * st, "set": name, "subset": None,
              "category": cat, "n": 100, "bt_loss": 0.3 + 0.39 * (16 * st / 16) ** -a, "accuracy": 0.6,
              "lc_accuracy": 0.55}
             for st in (1, 2, 4, 8, 15, 30, 60, 120)
             for name, cat, a in (("eval", None, 0.2), ("rb", "adversarial", 0.1), ("hh", "objective", 0.01))]
    summary = {"steps": 120, "epochs": 2, "final_loss": rows[-1]["loss"], "train_accuracy": 0.78, "seconds": 30.5,
               "tokens_per_s": 1000.0, "device": "cpu", "num_processes": 1, "precision": "fp32",
               "padding_fraction": 0.2, "resumed_from_step": None}
    c = rng.normal(1.0, 1.0, 200)
    r = rng.normal(0.0, 1.0, 200)
    test = M.summarize(c, r, domain=["beer"] * 120 + ["coffee"] * 80, source=["se"] * 200,
                       chosen_chars=rng.integers(10, 500, 200), rejected_chars=rng.integers(10, 500, 200))
    subsets = ["alpacaeval-easy"] * 10 + ["mt-bench-hard"] * 10 + ["hep-python"] * 10
    rb = M.summarize(c[:30], r[:30][::-1], subset=subsets, chosen_chars=rng.integers(10, 500, 30),
                     rejected_chars=rng.integers(10, 500, 30))
    return {
        "clean": _commit(store, "clean", "c1", {"report.json": json.dumps(clean)}),
        "train": _commit(store, "train", "t1", {"metrics.jsonl": "\n".join(json.dumps(r) for r in rows) + "\n",
                                                 "eval_curve.jsonl": "".join(json.dumps(c) + "\n" for c in curve),
                                                 "train_summary.json": json.dumps(summary)}),
        "evaluate": _commit(store, "evaluate", "e1", {"metrics.json": json.dumps({"test": test, "rb": rb})}),
    }


def test_ema_and_epochs():
    assert ema([1.0, 1.0, 1.0], 0.9).tolist() == pytest.approx([1.0, 1.0, 1.0])  # debiased: no ramp from 0
    sm = ema([0.0, 10.0], 0.5)
    assert sm[1] == pytest.approx((0.5 * 0.5 * 0 + 0.5 * 10) / (1 - 0.25))
    assert epoch_index(np.array([0.5, 1.0, 1.5, 2.0])).tolist() == [0, 0, 1, 1]
    assert epoch_index(np.array([0, 0, 1, 1])).tolist() == [0, 0, 1, 1]
    em = epoch_means(np.array([1, 2, 3, 4.0]), np.array([0.5, 1.0, 1.5, 2.0]), np.array([4, 2, 1, 1.0]))
    assert [(e["epoch"], e["mean"], e["step_lo"], e["step_hi"]) for e in em] == [(0, 3.0, 1, 2), (1, 1.0, 3, 4)]


def test_plot_stage_writes_figures_and_report(tmp_path):
    store = ArtifactStore(tmp_path / "artifacts")
    inputs = fake_upstream(store)
    cfg = PipelineConfig(name="plot-test", artifacts_dir=str(tmp_path / "artifacts"))
    res = pipeline.execute("plot", cfg, inputs, store, log=log)
    assert res.status == "ran"
    out = Path(res.path)
    for stem in ("loss", "train_accuracy_margin", "eval_curves", "grad_norm", "eval_accuracy", "reliability",
                 "length_bias"):
        for ext in ("png", "svg"):
            f = out / f"{stem}.{ext}"
            assert f.stat().st_size > 5000, f
        assert (out / f"{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert b"<svg" in (out / f"{stem}.svg").read_bytes()[:2000]
    md = (out / "report.md").read_text()
    for needle in ("# worldpm run report: plot-test", "| pairs in (from download) | 1,396 |", "| - near_identical | -100 |",
                   "| pairs out (cleaned) | 1,200 |", "![Training loss](loss.png)", "![Reliability diagram](reliability.png)",
                   "RewardBench sections", "| Chat |", "| Reasoning |", "Accuracy by subset:", "| mt-bench-hard | 10 |",
                   "Accuracy by domain:", "| beer | 120 |", "## Length", "tie (equal rewards) as half", "ECE",
                   "the pairs column is the histogram of the confidences"):
        assert needle in md, needle
    test = json.loads((Path(inputs["evaluate"].path) / "metrics.json").read_text())["test"]
    lo, hi = test["accuracy_ci"]
    llo, lhi = test["lc_accuracy_ci"]
    # n, the interval, LC accuracy and the length rule side by side in the evaluation table
    assert (f"| test | 200 | {test['ties']} | - | {100 * test['accuracy']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] | "
            f"{100 * test['lc_accuracy']:.1f}% [{100 * llo:.1f}, {100 * lhi:.1f}] | "
            f"{100 * test['length_rule_accuracy']:.1f}% |") in md
    corr = test["margin_length_corr"]
    assert f"| {corr:+.3f} [" in md  # the margin/length correlation with its interval, in the Length table
    assert f"(n=200, ECE {test['ece']:.4f}, mean confidence {test['confidence_mean']:.3f}" in md
    # every image link resolves next to the report (readable offline)
    import re

    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(links) == 7 and all((out / l).exists() for l in links)
    # evaluation during training: the figure (per set and per category) and each curve's fit
    assert "## Evaluation during training" in md and "![BT loss against pairs seen](eval_curves.png)" in md
    assert "BT loss on each set at 8 points of training" in md
    assert "| rb | adversarial | 8 |" in md and "| adversarial (mean of 1) | category | 8 |" in md
    assert "## Gradient norm" in md and "No spikes." in md  # steady norms: none
    # the output is a function of the inputs: a forced rerun gives the same content digest
    again = pipeline.execute("plot", cfg, inputs, store, force=True, log=log)
    assert again.ref.digest == res.ref.digest
    # and a cache hit without force
    assert pipeline.execute("plot", cfg, inputs, store, log=log).status == "cached"


def test_plot_trend(tmp_path):
    hist = [{"time": f"2025-01-0{i}T02:00:00+00:00", "test_accuracy": a, "eval_sets": {"rb": b}, "status": s}
            for i, (a, b, s) in enumerate([(0.6, 0.55, "ok"), (0.65, 0.58, "ok"), (0.55, 0.5, "warned")], 1)]
    assert plot_trend(hist[:1], tmp_path / "t.png") is None  # one point: no trend
    p = plot_trend(hist, tmp_path / "h" / "t.png")
    assert p is not None and p.read_bytes()[:4] == b"\x89PNG"


# ---- history and the regression guard ---------------------------------------------------------------------------
def _evaluate_ref(store: ArtifactStore, key: str, test_acc: float, rb_acc: float = 0.6):
    m = {"test": {"n": 100, "accuracy": test_acc, "bt_loss": 0.6}, "rb": {"n": 30, "accuracy": rb_acc}}
    return _commit(store, "evaluate", key, {"metrics.json": json.dumps(m)})


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


def _logger(name: str) -> tuple[logging.Logger, _Records]:
    lg = logging.getLogger(f"test_plot.{name}")
    lg.setLevel(logging.INFO)
    h = _Records()
    lg.handlers = [h]
    lg.propagate = False
    return lg, h


def test_check_regression_fires_on_a_drop_only(tmp_path):
    from worldpm.report.history import append_history, check_regression

    h = tmp_path / "h.jsonl"
    ok, msg = check_regression(h, {"test": {"accuracy": 0.70}}, 0.02)
    assert ok and "first run" in msg
    append_history(h, {"time": "t1", "evaluate_key": "k1", "test_accuracy": 0.70, "status": "ok"})
    # a drop of 0.10 > 0.02: fires, with both numbers in the message (no n recorded: no interval, the delta decides)
    ok, msg = check_regression(h, {"test": {"accuracy": 0.60}}, 0.02, "fail")
    assert not ok and "0.6000 now" in msg and "vs 0.7000 in the previous" in msg and "failing the run" in msg
    assert "compared on the delta alone" in msg
    ok, msg = check_regression(h, {"test": {"accuracy": 0.60}}, 0.02, "warn")
    assert not ok and "warning only" in msg
    # within the allowed drop, equal, better: quiet
    for acc in (0.69, 0.70, 0.75):
        ok, msg = check_regression(h, {"test": {"accuracy": acc}}, 0.02)
        assert ok and "0.7000" in msg, acc
    # exactly at the delta is not "more than" it
    ok, _ = check_regression(h, {"test": {"accuracy": 0.68}}, 0.025)
    assert ok
    # guard off, or nothing to compare
    assert check_regression(h, {"test": {"accuracy": 0.1}}, None)[0]
    assert check_regression(h, {"test": {"accuracy": None}}, 0.02)[0]
    # a failed run is never the baseline: compare with the last run that was not failed
    append_history(h, {"time": "t2", "evaluate_key": "k2", "test_accuracy": 0.50, "status": "failed"})
    ok, msg = check_regression(h, {"test": {"accuracy": 0.55}}, 0.02)
    assert not ok and "0.5500 now" in msg and "vs 0.7000" in msg
    with pytest.raises(ValueError):
        check_regression(h, {"test": {"accuracy": 0.5}}, 0.02, "explode")


def test_guard_compares_only_outside_both_intervals(tmp_path):
    """The preset's guard once compared a test accuracy of 1.000 on 2 pairs with 0.000 on 2 pairs. Now a drop beyond
    regression_delta is a regression only when each accuracy is outside the other run's 95% interval."""
    from worldpm.modeling.metrics import wilson_interval
    from worldpm.report.history import append_history, check_regression, history_entry, read_jsonl

    h = tmp_path / "h.jsonl"
    append_history(h, history_entry({"test": {"n": 2, "accuracy": 1.0}}, "tiny"))
    assert read_jsonl(h)[0]["test_accuracy_ci"] == pytest.approx(wilson_interval(2, 2))
    # 1.0 then 0.0 on 2 pairs: outside both Wilson intervals ([0.34, 1] and [0, 0.66]), yet no evidence (Fisher's
    # exact p = 0.33): a split under shard.min_split_pairs is never compared
    ok, msg = check_regression(h, {"test": {"n": 2, "accuracy": 0.0}}, 0.02, "fail", min_pairs=100)
    assert ok and "not compared, a test split of 2 pairs is under shard.min_split_pairs 100" in msg

    # 0.70 then 0.60 on 20 pairs each: [0.481, 0.855] and [0.387, 0.781] overlap both ways: noise, not compared
    h2 = tmp_path / "h2.jsonl"
    append_history(h2, history_entry({"test": {"n": 20, "accuracy": 0.70}}, "a"))
    ok, msg = check_regression(h2, {"test": {"n": 20, "accuracy": 0.60}}, 0.02, "fail")
    assert ok and "not a regression" in msg
    # the same accuracies on 2000 pairs each: both outside the other's interval: a regression
    h3 = tmp_path / "h3.jsonl"
    append_history(h3, history_entry({"test": {"n": 2000, "accuracy": 0.70}}, "a"))
    ok, msg = check_regression(h3, {"test": {"n": 2000, "accuracy": 0.60}}, 0.02, "fail")
    assert not ok and "outside both runs' 95% intervals" in msg and "failing the run" in msg
    # outside one interval only (a precise previous run, a noisy new one): still not compared
    ok, msg = check_regression(h3, {"test": {"n": 30, "accuracy": 0.60}}, 0.02, "fail")
    assert wilson_interval(0.6 * 30, 30)[1] > 0.70 and ok and "within the runs' 95% intervals" in msg
    # the recorded interval of the metrics is the one used
    ok, _ = check_regression(h3, {"test": {"n": 2000, "accuracy": 0.60, "accuracy_ci": [0.1, 0.9]}}, 0.02)
    assert ok


def test_after_evaluate_warn_and_fail_modes(tmp_path):
    from worldpm.errors import StageError
    from worldpm.report.history import after_evaluate, history_path, read_history, trend_path

    store = ArtifactStore(tmp_path / "artifacts")
    cfg = PipelineConfig(name="guard test", artifacts_dir=str(tmp_path / "artifacts"))
    log, rec = _logger("guard")
    after_evaluate(cfg, _evaluate_ref(store, "e1", 0.70), log)
    after_evaluate(cfg, _evaluate_ref(store, "e2", 0.71), log)  # better: quiet
    assert [r.levelno for r in rec.records if r.levelno >= logging.WARNING] == []
    assert trend_path(cfg).exists() and trend_path(cfg).read_bytes()[:4] == b"\x89PNG"  # 2 runs: a trend plot

    # warn mode (the default): a constructed drop logs a warning with both numbers, the run goes on
    after_evaluate(cfg, _evaluate_ref(store, "e3", 0.60), log)
    warnings = [r.getMessage() for r in rec.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "0.6000 now" in warnings[0] and "vs 0.7100" in warnings[0]

    # fail mode: raises StageError, and the run is recorded as failed
    cfg.evaluate.on_regression = "fail"
    with pytest.raises(StageError, match=r"0\.5000 now .* vs 0\.6000"):
        after_evaluate(cfg, _evaluate_ref(store, "e4", 0.50), log)
    hist = read_history(history_path(cfg))
    assert [(e["evaluate_key"], e["status"], e["test_accuracy"]) for e in hist] == [
        ("e1", "ok", 0.70), ("e2", "ok", 0.71), ("e3", "warned", 0.60), ("e4", "failed", 0.50)]
    assert hist[0]["eval_sets"] == {"rb": 0.6}
    assert history_path(cfg).name == "guard_test.jsonl"
    # a run back at the level of the last non-failed one passes in fail mode too
    after_evaluate(cfg, _evaluate_ref(store, "e5", 0.60), log)
    assert read_history(history_path(cfg))[-1]["status"] == "ok"


def test_publish_prefect_artifacts_is_a_no_op_outside_a_flow_run(tmp_path):
    from flows.artifacts import publish_prefect_artifacts, run_table

    store = ArtifactStore(tmp_path / "artifacts")
    inputs = fake_upstream(store)
    cfg = PipelineConfig(name="t", artifacts_dir=str(tmp_path / "artifacts"))
    results = [{"stage": s, "key": inputs[s].key, "status": "ran", "path": inputs[s].path, "seconds": 1.5}
               for s in ("clean", "train", "evaluate")]
    assert publish_prefect_artifacts(cfg, results) is False
    rows = run_table(results)
    assert [r["name"] for r in rows if r["kind"] == "stage"] == ["clean", "train", "evaluate"]
    metric = {r["name"]: r["value"] for r in rows if r["kind"] == "metric"}
    assert metric["test.n"] == 200 and 0 < metric["test.accuracy"] < 1
    funnel = {r["name"]: r["value"] for r in rows if r["kind"] == "funnel"}
    assert funnel == {"rows_in": 1396, "rejected:min_chars": 40, "rejected:near_identical": 100,
                      "rejected:dedupe": 56, "rows_out": 1200}


def _cells(md: str) -> list[tuple[int, str]]:
    """(line number, cell text) of every Markdown table cell of ``md`` (separator rows left out)."""
    out = []
    for i, line in enumerate(md.splitlines(), 1):
        if line.startswith("|") and not set(line) <= set("|:- "):
            out += [(i, c.strip()) for c in line.strip().strip("|").split(" | ")]
    return out


def test_report_artifact_markdown_embeds_figures_and_has_no_dicts_or_empty_cells(tmp_path):
    """The worldpm-report artifact as Prefect's UI shows it: every figure embedded (the UI cannot read local PNG
    files), the trainer's nested summary as rows of their own, counts and durations for people."""
    from flows.artifacts import report_markdown
    from worldpm.report.markdown import image_links

    store = ArtifactStore(tmp_path / "artifacts")
    inputs = fake_upstream(store)
    train_dir = Path(inputs["train"].path)
    summary = json.loads((train_dir / "train_summary.json").read_text())
    summary.update(epochs=1.0, seconds=251.43, peak_memory_gb=1.234567, packed=True, max_tokens_per_batch=None,
                   startup={"imports_s": 3.21, "launch_to_first_step_s": 9.87},
                   final={"step": 120, "loss": 0.4512, "grad_norm": 1.5, "pairs": 160, "padding": 0.061},
                   eval={"pairs": 100, "loss": 0.61, "accuracy": 0.7}, length_control={})
    inputs["train"] = _commit(store, "train", "t2", {"metrics.jsonl": (train_dir / "metrics.jsonl").read_text(),
                                                      "train_summary.json": json.dumps(summary)})
    cfg = PipelineConfig(name="ui-test", artifacts_dir=str(tmp_path / "artifacts"))
    res = pipeline.execute("plot", cfg, inputs, store, log=log)

    md = report_markdown(res.path)
    links = image_links(md)
    assert len(links) == 6 and all(l.startswith("data:image/png;base64,") for l in links)
    import base64

    assert all(base64.b64decode(l.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n" for l in links)
    assert ".png)" not in md and "](" + res.path not in md  # no local image path left
    cells = _cells(md)
    assert cells and all(c for _, c in cells), [x for x in cells if not x[1]]  # no empty value
    assert not [x for x in cells if x[1].startswith(("{", "[{")) or "': " in x[1] or '": ' in x[1]]  # no dicts
    for row in ("| epochs | 1 |", "| seconds | 251 s (4 min 11 s) |", "| final.loss | 0.451 |",
                "| final.padding | 6.1% |", "| startup.launch_to_first_step_s | 9.9 s |", "| eval.accuracy | 70.0% |",
                "| peak_memory_gb | 1.23 GB |", "| packed | yes |", "| max_tokens_per_batch | - |",
                "| length_control | (none) |", "| steps | 120 |"):
        assert row in md, row
    # report.md in the artifact folder keeps its relative links (readable offline, next to the PNGs)
    assert image_links((Path(res.path) / "report.md").read_text())[0] == "loss.png"


def _outside(fig) -> list[tuple[str, str]]:
    """Titles, axis labels, texts and legends of ``fig`` that reach beyond the image (tick labels are left to
    constrained layout: matplotlib does not draw those outside the axis limits)."""
    from matplotlib.legend import Legend
    from matplotlib.text import Text

    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    ticks = {id(t) for ax in fig.axes for axis in (ax.xaxis, ax.yaxis) for t in axis.get_ticklabels(which="both")}
    bad = []
    for a in fig.findobj(lambda a: isinstance(a, (Text, Legend))):
        if id(a) in ticks or not a.get_visible() or (isinstance(a, Text) and not a.get_text().strip()):
            continue
        bb = a.get_window_extent(r)
        if bb.x0 < -1 or bb.y0 < -1 or bb.x1 > fig.bbox.width + 1 or bb.y1 > fig.bbox.height + 1:
            bad.append((type(a).__name__, a.get_text() if isinstance(a, Text) else "legend"))
    return bad


def test_titles_and_legends_stay_inside_every_figure(tmp_path, monkeypatch):
    import worldpm.report.figures as F
    from worldpm.modeling.eval_curve import EvalPoint
    from worldpm.report.trainlog import grad_norm_spikes

    drawn = []
    save = F._save
    monkeypatch.setattr(F, "_save", lambda fig, out, stem, formats: drawn.append((stem, fig)) or save(fig, out, stem,
                                                                                                        formats))
    store = ArtifactStore(tmp_path / "artifacts")
    inputs = fake_upstream(store)
    metrics = json.loads((Path(inputs["evaluate"].path) / "metrics.json").read_text())
    rows = [json.loads(l) for l in (Path(inputs["train"].path) / "metrics.jsonl").read_text().splitlines()]
    for m in (metrics, {"test": metrics["test"]}):  # two panels, and one (the narrowest figures)
        F.plot_eval_accuracy(m, tmp_path, ["png"])
        F.plot_reliability(m, tmp_path, ["png"])
        F.plot_length_bias(m, tmp_path, ["png"])
    F.plot_loss(rows, 0.9, tmp_path, ["png"])
    F.plot_train_accuracy_margin(rows, 0.9, tmp_path, ["png"])
    rows[90]["grad_norm"] = 9.0
    F.plot_grad_norm(rows, grad_norm_spikes([r["step"] for r in rows], [r["grad_norm"] for r in rows]), tmp_path,
                     ["png"])
    pts = [EvalPoint(step=s, pairs_seen=16 * s, tokens_seen=100 * s, set=n, subset=None, category=c, n=50,
                     bt_loss=0.7 * (16 / (16 * s)) ** a, accuracy=0.6, lc_accuracy=0.5)
           for s in (1, 2, 4, 8, 16, 32, 64) for n, c, a in (("rewardbench-chat-hard", "adversarial", 0.05),
                                                             ("mt-bench-human-judgements", "subjective", 0.0))]
    F.plot_eval_curves(rows, pts, tmp_path, ["png"])
    from worldpm.report.sweep import PointOutcome, write_sweep_report

    write_sweep_report("a-sweep-with-a-long-name", [PointOutcome("Qwen2-tiny-random-a", "ok", tuple(pts)),
                                                    PointOutcome("Qwen2-tiny-random-b", "failed", error="x")],
                       tmp_path, ["png"])
    stems = [s for s, _ in drawn]
    assert set(stems) == {"eval_accuracy", "reliability", "length_bias", "loss", "train_accuracy_margin", "grad_norm",
                          "eval_curves", "sweep"}
    assert {s: _outside(f) for s, f in drawn if _outside(f)} == {}


def test_the_guard_watches_an_eval_set_or_a_category(tmp_path):
    """evaluate.regression_watch: an eval set's accuracy, or the unweighted mean of a category's sets (n their
    total); the history line keeps each set's accuracy, BT loss, n and category."""
    from worldpm.report.history import append_history, check_regression, history_entry, read_jsonl

    def metrics(test, rb, hh, uf):
        return {"test": {"accuracy": test, "n": 2000, "bt_loss": 0.6},
                "rb": {"accuracy": rb, "n": 1000, "bt_loss": 0.65, "category": "adversarial"},
                "hh": {"accuracy": hh, "n": 1000, "bt_loss": 0.66, "category": "adversarial"},
                "uf": {"accuracy": uf, "n": 1000, "bt_loss": 0.69, "category": "subjective"}}

    h = tmp_path / "h.jsonl"
    append_history(h, history_entry(metrics(0.70, 0.80, 0.70, 0.55), "a"))
    line = read_jsonl(h)[0]
    assert line["eval_set_bt_loss"] == {"rb": 0.65, "hh": 0.66, "uf": 0.69}
    assert line["sets"]["hh"]["category"] == "adversarial" and line["sets"]["rb"]["n"] == 1000
    now = metrics(0.70, 0.60, 0.70, 0.55)  # rb drops by 0.2; the test split and the subjective set do not
    assert check_regression(h, now, 0.02, "fail")[0]
    assert check_regression(h, now, 0.02, "fail", watch="category:subjective")[0]
    ok, msg = check_regression(h, now, 0.02, "fail", watch="rb")
    assert not ok and msg.startswith("eval set rb accuracy regressed: 0.6000 now") and "vs 0.8000" in msg
    ok, msg = check_regression(h, now, 0.02, "fail", watch="category:adversarial")
    # the mean of rb and hh: 0.75 -> 0.65, over their 2000 pairs
    assert not ok and msg.startswith("category adversarial (2 sets) accuracy regressed: 0.6500 now") and "n=2000" in msg
    ok, msg = check_regression(h, now, 0.02, watch="nope")
    assert ok and "no eval set nope accuracy in this run" in msg


@pytest.mark.parametrize("n_sets", [1, 2, 4])
def test_figures_keep_their_text_inside_and_readable(n_sets, tmp_path, monkeypatch):
    """Every title, legend, label and bar label of the evaluation figures lies inside the image (constrained layout
    moves text but never shrinks it: a one-panel reliability figure used to cut off its title and legend at the
    sides, length_bias its title), and no text is white (white labels were unreadable on the light bars)."""
    from matplotlib.colors import to_rgb
    from matplotlib.text import Text

    from worldpm.report import figures as F

    store = ArtifactStore(tmp_path / "artifacts")
    sets = json.loads((Path(fake_upstream(store)["evaluate"].path) / "metrics.json").read_text())
    names = ["test", "rewardbench-sample-with-a-long-name", "rb", "se-coffee"][:n_sets]
    metrics = {k: sets["test" if i % 2 == 0 else "rb"] for i, k in enumerate(names)}
    drawn = {}
    monkeypatch.setattr(F, "_save", lambda fig, out, stem, formats: drawn.setdefault(stem, fig) and [stem])
    F.plot_reliability(metrics, tmp_path, ["png"])
    F.plot_length_bias(metrics, tmp_path, ["png"])
    F.plot_eval_accuracy(metrics, tmp_path, ["png"])
    assert set(drawn) == {"reliability", "length_bias", "eval_accuracy"}
    for stem, fig in drawn.items():
        renderer = fig.canvas.get_renderer()
        fig.draw(renderer)
        box, drawn_box = fig.bbox, fig.get_tightbbox(renderer).transformed(fig.dpi_scale_trans)  # inches -> px
        # everything drawn (titles, legends, tick and bar labels: the figure's tight box) lies inside the image
        assert (drawn_box.x0 >= box.x0 - 1 and drawn_box.x1 <= box.x1 + 1 and drawn_box.y0 >= box.y0 - 1
                and drawn_box.y1 <= box.y1 + 1), (stem, drawn_box, box)
        texts = [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]
        assert any("Reliability" in t.get_text() or "Length" in t.get_text() or "Evaluation" in t.get_text()
                   for t in texts)
        for t in texts:
            assert to_rgb(t.get_color()) != (1.0, 1.0, 1.0), (stem, t.get_text())
