"""The history of evaluation metrics across runs and the regression guard.

* ``<artifacts_dir>/history/<pipeline name>.jsonl``: one JSON line per new evaluation (time, evaluate key, test
  accuracy and BT loss, each eval set's accuracy and final BT loss, per set n/interval/category, status), and a
  trend plot beside it. It lives outside the content-addressed store on purpose: it is a log of runs, not a
  function of one run's inputs.
* ``check_regression`` / ``after_evaluate``: a run whose watched accuracy (``evaluate.regression_watch``: the test
  split, an eval set, or category:<name>, the mean of the category's sets) falls more than
  ``evaluate.regression_delta`` below the previous successful run fails (``evaluate.on_regression: fail``) or warns
  (``warn``), but only when the difference is outside both runs' 95% confidence intervals (this run's accuracy
  below the previous run's interval and the previous accuracy above this run's): a drop that either run's sampling
  noise explains is reported as such, not as a regression. Intervals are the metrics' Wilson intervals (or computed from n and the accuracy); a
  run that recorded no n has no interval, and then the delta alone decides (said in the message).
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import re
from pathlib import Path

from worldpm.errors import StageError
from worldpm.store import json_lines

HISTORY_DIR = "history"


def history_path(cfg) -> Path:
    return Path(cfg.artifacts_dir) / HISTORY_DIR / f"{_safe_name(cfg.name)}.jsonl"


def trend_path(cfg) -> Path:
    return Path(cfg.artifacts_dir) / HISTORY_DIR / f"{_safe_name(cfg.name)}-trend.png"


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "worldpm"


def read_history(path: str | Path) -> list[dict]:
    """The history's entries, oldest first."""
    return read_jsonl(path)


def read_jsonl(path: str | Path) -> list[dict]:
    """A JSON-lines file (history, training metrics); [] when it does not exist. A line that is not JSON is an
    error naming the file and line (store.json_lines)."""
    return [value for _, value in json_lines(path)]


def history_entry(metrics: dict, evaluate_key: str | None, status: str = "ok") -> dict:
    """One run's line: the test split's numbers (test_*), each eval set's accuracy (eval_sets) and BT loss
    (eval_set_bt_loss), and per set, the test split included, what the guard compares (sets: accuracy, its
    interval, n, BT loss, category)."""
    test = metrics.get("test") or {}
    named = {k: v for k, v in metrics.items() if isinstance(v, dict)}
    entry = {
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "evaluate_key": evaluate_key,
        "test_accuracy": test.get("accuracy"),
        "test_accuracy_ci": _interval(test.get("accuracy"), test.get("n"), test.get("accuracy_ci")),
        "test_bt_loss": test.get("bt_loss"),
        "test_n": test.get("n"),
        "test_lc_accuracy": test.get("lc_accuracy"),
        "test_margin_length_corr": test.get("margin_length_corr"),
        "eval_sets": {k: v.get("accuracy") for k, v in named.items() if k != "test"},
        "eval_set_bt_loss": {k: v.get("bt_loss") for k, v in named.items() if k != "test"},
        "sets": {k: {"accuracy": v.get("accuracy"), "n": v.get("n"), "bt_loss": v.get("bt_loss"),
                     "accuracy_ci": _interval(v.get("accuracy"), v.get("n"), v.get("accuracy_ci")),
                     "category": v.get("category")} for k, v in named.items()},
        "status": status,
    }
    run_id = _flow_run_id()
    if run_id:
        entry["flow_run_id"] = run_id
    return entry


def watched(sets: dict[str, dict], watch: str = "test") -> tuple[str, float | None, int | None, list | None]:
    """(label, accuracy, n, 95% interval) of what the guard watches in {set: {accuracy, n, accuracy_ci, category}}:
    ``test``, an eval set's name, or ``category:<name>``: the unweighted mean accuracy of the category's sets (as
    the paper averages benchmarks), n their total, the interval Wilson's at that mean and n (an approximation: a
    mean of proportions is not one proportion). Missing: (label, None, None, None)."""
    if watch.startswith("category:"):
        cat = watch.split(":", 1)[1]
        members = [m for m in sets.values() if m.get("category") == cat and m.get("accuracy") is not None]
        label = f"category {cat} ({len(members)} set{'s' if len(members) != 1 else ''})"
        if not members:
            return label, None, None, None
        acc = sum(float(m["accuracy"]) for m in members) / len(members)
        ns = [m.get("n") for m in members]
        n = int(sum(ns)) if all(x is not None for x in ns) else None
        return label, acc, n, _interval(acc, n)
    m = sets.get(watch) or {}
    label = "test" if watch == "test" else f"eval set {watch}"
    acc = m.get("accuracy")
    return label, acc, m.get("n"), _interval(acc, m.get("n"), m.get("accuracy_ci")) if acc is not None else None


def _entry_sets(entry: dict) -> dict[str, dict]:
    """A history line's per-set numbers (older lines: the test split's, and eval sets' accuracies without n)."""
    if entry.get("sets"):
        return entry["sets"]
    out = {k: {"accuracy": v} for k, v in (entry.get("eval_sets") or {}).items()}
    out["test"] = {"accuracy": entry.get("test_accuracy"), "n": entry.get("test_n"),
                   "accuracy_ci": entry.get("test_accuracy_ci")}
    return out


def append_history(path: str | Path, entry: dict) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "a") as f:
        f.write(json.dumps(entry, sort_keys=True, default=str) + "\n")


def _interval(acc: float | None, n: int | None, ci: list | None = None) -> list[float] | None:
    """A run's 95% interval of its test accuracy: the recorded one, else Wilson's from (accuracy, n), else None."""
    if ci:
        return [float(ci[0]), float(ci[1])]
    if acc is None or not n:
        return None
    from worldpm.modeling.metrics import wilson_interval

    return wilson_interval(float(acc) * int(n), int(n))


def _fmt_ci(ci: list[float] | None, n: int | None) -> str:
    return f"[{ci[0]:.4f}, {ci[1]:.4f}], n={n}" if ci else f"no interval, n={n if n else 'unknown'}"


def check_regression(history_path: str | Path, metrics: dict, delta: float | None,
                     mode: str = "warn", min_pairs: int = 0, watch: str = "test") -> tuple[bool, str]:
    """(ok, message): not ok when the watched accuracy (``watch``: test, an eval set, category:<name>; see
    ``watched``) is more than ``delta`` below the previous successful run's AND the two accuracies are each outside
    the other run's 95% interval (see the module doc). Runs with fewer than ``min_pairs`` pairs there
    (shard.min_split_pairs) are not compared at all: even 1.0 against 0.0 on 2 pairs each is outside both (Wilson
    or exact) intervals, yet a two-sample test of it is nowhere near significant.

    The previous successful run is the newest history entry whose status is not "failed" and that has a value for
    what is watched. ``delta`` None turns the guard off. ``mode`` (fail | warn) only words the message: the caller
    decides what to do with a regression."""
    if mode not in ("fail", "warn"):
        raise ValueError(f"on_regression must be fail or warn, got {mode!r}")
    now_sets = {k: v for k, v in metrics.items() if isinstance(v, dict)}
    what, acc, n_now, now_ci = watched(now_sets, watch)
    if delta is None:
        return True, "regression guard off (evaluate.regression_delta is null)"
    if acc is None:
        return True, f"regression guard: no {what} accuracy in this run (empty or missing); nothing to compare"
    prev = None
    for e in reversed(read_history(history_path)):
        if e.get("status") != "failed" and watched(_entry_sets(e), watch)[1] is not None:
            prev = e
            break
    if prev is None:
        return True, f"regression guard: first run in {history_path} with a {what} accuracy; {acc:.4f}"
    _, before, n_prev, prev_ci = watched(_entry_sets(prev), watch)
    before = float(before)
    drop = before - acc
    where = (f"{acc:.4f} now ({_fmt_ci(now_ci, n_now)}) vs {before:.4f} in the previous successful run "
             f"({_fmt_ci(prev_ci, n_prev)}; {prev.get('time', '?')}, evaluate "
             f"{prev.get('evaluate_key') or '?'})")
    if drop <= delta:
        return True, f"regression guard: {what} accuracy {where}; allowed drop {delta}"
    few = [n for n in (n_now, n_prev) if n is not None and n < min_pairs]
    if few:
        return True, (f"regression guard: {what} accuracy {where}: not compared, {min(few)} pairs is under "
                      f"shard.min_split_pairs {min_pairs}" if watch != "test" else
                      f"regression guard: test accuracy {where}: not compared, a test split of {min(few)} pairs is "
                      f"under shard.min_split_pairs {min_pairs}")
    if now_ci and prev_ci and not (acc < prev_ci[0] and before > now_ci[1]):
        return True, (f"regression guard: {what} accuracy {where}: a drop of {drop:.4f} > "
                      f"evaluate.regression_delta {delta}, but within the runs' 95% intervals (sampling noise "
                      "explains it); not a regression")
    action = "failing the run" if mode == "fail" else "warning only (evaluate.on_regression: warn)"
    basis = "outside both runs' 95% intervals" if now_ci and prev_ci else \
        "compared on the delta alone: a run without n has no interval"
    return False, (f"{what} accuracy regressed: {where}, a drop of {drop:.4f} > evaluate.regression_delta {delta}, "
                   f"{basis}; {action}")


def after_evaluate(cfg, evaluate_ref, log: logging.Logger | logging.LoggerAdapter | None = None) -> None:
    """After a new evaluate artifact (the evaluate stage's after_commit): regression guard, history line, trend plot.

    ``evaluate_ref``: an ArtifactRef, its dict form, or the artifact's path. In fail mode a regression raises
    StageError (after recording the run in the history as failed); in warn mode it logs a warning."""
    log = log or logging.getLogger("worldpm.evaluate")
    path, key = _ref_path_key(evaluate_ref)
    mfile = path / "metrics.json"
    if not mfile.exists():
        raise StageError(f"after_evaluate: no metrics.json in the evaluate artifact {path}")
    metrics = json.loads(mfile.read_text())
    hpath = history_path(cfg)
    ok, message = check_regression(hpath, metrics, cfg.evaluate.regression_delta, cfg.evaluate.on_regression,
                                   min_pairs=cfg.shard.min_split_pairs, watch=cfg.evaluate.regression_watch)
    fail = not ok and cfg.evaluate.on_regression == "fail"
    status = "ok" if ok else ("failed" if fail else "warned")
    append_history(hpath, history_entry(metrics, key, status))
    if ok:
        log.info("%s", message)
    else:
        log.warning("%s", message)
    try:
        from worldpm.report.figures import plot_trend

        written = plot_trend(read_history(hpath), trend_path(cfg), title=f"{cfg.name}: evaluation across runs")
        if written:
            log.info("trend plot: %s", written)
    except Exception as e:  # the trend plot is a convenience; it never fails a run
        log.warning("trend plot not written: %s", e)
    if fail:
        raise StageError(message)


def _ref_path_key(ref) -> tuple[Path, str | None]:
    if isinstance(ref, (str, Path)):
        p = Path(ref)
        return p, p.name
    if isinstance(ref, dict):
        return Path(ref["path"]), ref.get("key")
    return Path(ref.path), getattr(ref, "key", None)


def _flow_run_id() -> str | None:
    """The Prefect flow run this process is in, for the history line (None outside a flow run)."""
    try:
        from prefect.context import FlowRunContext

        ctx = FlowRunContext.get()
    except Exception:
        return None
    if ctx is None or getattr(ctx, "flow_run", None) is None:
        return None
    return str(ctx.flow_run.id)
