"""Experiment trackers (``train.report_to``) on accelerate's own trackers, not a logger of ours.

``setup_tracking(report_to, folder, run_config, tags, run_name, experiment)`` returns what the trainer hands
accelerate and an object that logs through it:

    tracking = setup_tracking(["tensorboard"], folder, run_config=cfg, tags={"train_key": key}, run_name=...)
    accelerator = Accelerator(**tracking.accelerator_kwargs, ...)    # log_with=[...], project_dir=folder/tensorboard
    record = tracking.start(accelerator)                             # init_trackers(run name, config, init_kwargs)
    tracking.log_train(accelerator, row)                             # a metrics.jsonl row, at its step
    tracking.log_eval(accelerator, points)                           # eval_curve records, at their step
    accelerator.end_training()                                       # closes the writers / ends the MLflow run

The trainer writes ``record`` (where each tracker wrote, the MLflow run id) to ``<folder>/runs/<train key>.json``;
after the evaluate stage, ``log_final_metrics`` puts its metrics.json into the same runs (``final/<set>/<metric>``
at the last step), tagged with the evaluate key. In the pipeline ``folder`` is ``<artifacts_dir>/tracking/``
(outside the store: a log of runs, not a function of their inputs).

What each tracker writes (everything on the local disk, nothing over a network):

* ``tensorboard``: event files under ``<folder>/tensorboard/<run name>/`` (accelerate's TensorBoardTracker: a
  SummaryWriter whose logdir is project_dir/run name), the run config and tags as hparams. Read them with
  TensorBoard (``tensorboard --logdir <folder>/tensorboard``: every run side by side) or its EventAccumulator.
* ``mlflow``: run ``<run name>`` of experiment ``<experiment>`` (the pipeline's name) in the tracking store of
  ``MLFLOW_TRACKING_URI`` when it is set (a server of yours), else a SQLite store ``<folder>/mlflow/mlflow.db``
  with artifacts in ``<folder>/mlflow/artifacts`` (MLflow 3 refuses its old file store by default); config as
  params, ``tags`` as run tags. ``mlflow ui --backend-store-uri sqlite:///<folder>/mlflow/mlflow.db`` shows it.

Scalar names: ``train/<key>`` (loss, accuracy, margin, lr, grad_norm, tokens_per_s, pairs_seen, ...),
``eval/<set>/<metric>`` and ``eval/<set>/<subset>/<metric>`` (bt_loss, accuracy, lc_accuracy) with
``eval/pairs_seen``, ``final/<set>/<metric>`` (the evaluate stage's metrics, at the last step).

Trackers that report to a service (wandb, comet_ml, clearml, swanlab, trackio) are refused in one line: this
pipeline runs offline by design, and a run must not hang or fail on a network it may not have.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from worldpm.config import check_report_to  # train.report_to is checked where the config is loaded

_TRAIN_KEYS = ("loss", "accuracy", "margin", "lr", "grad_norm", "tokens_per_s", "pairs_per_s", "padding", "epoch",
               "pairs_seen", "tokens_seen")
_FINAL_KEYS = ("accuracy", "lc_accuracy", "bt_loss", "ece", "margin_length_corr", "length_rule_accuracy",
               "rewardbench_score", "n")


def _scalar(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def flat_config(value: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config as {dotted key: str | int | float | bool} (what trackers take as hyperparameters): None
    becomes "null", lists and empty dicts compact text."""
    out: dict[str, Any] = {}
    if isinstance(value, dict) and value:
        for k, v in value.items():
            out.update(flat_config(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if value is None:
        return {prefix: "null"}
    if isinstance(value, (str, int, float, bool)):
        return {prefix: value}
    import json

    return {prefix: json.dumps(value, default=str)}


def _tag(s: str) -> str:
    """A scalar name part: what TensorBoard and MLflow both accept (letters, digits, _ - . / and space)."""
    return re.sub(r"[^A-Za-z0-9_\-. ]", "_", str(s)) or "_"


@dataclass
class Tracking:
    """What setup_tracking returns (module doc). Every method is a no-op when no tracker was asked for; accelerate
    itself logs only on the main process."""

    trackers: list[str]
    folder: Path
    run_name: str
    experiment: str
    config: dict[str, Any]
    tags: dict[str, str] = field(default_factory=dict)
    tracking_uri: str | None = None
    run_id: str | None = None  # an MLflow run to resume (a training run resumed from its checkpoint)

    @property
    def tensorboard_dir(self) -> Path:
        return self.folder / "tensorboard" / self.run_name

    @property
    def accelerator_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for Accelerator(...): log_with and project_dir ({} without trackers)."""
        if not self.trackers:
            return {}
        return {"log_with": list(self.trackers), "project_dir": str(self.folder / "tensorboard")}

    @property
    def init_kwargs(self) -> dict[str, dict]:
        kw: dict[str, dict] = {}
        if "mlflow" in self.trackers:
            kw["mlflow"] = {"tags": dict(self.tags), "run_name": self.run_name,
                            "logging_dir": str(self.folder / "mlflow" / "artifacts"),
                            **({"run_id": self.run_id} if self.run_id else {})}
        return kw

    def start(self, accelerator) -> dict:
        """Point MLflow at its store, then accelerator.init_trackers(run name, config, init_kwargs). Returns the
        run's record (where each tracker wrote: the TensorBoard folder, the MLflow run id), {} without trackers."""
        if not self.trackers:
            return {}
        if "mlflow" in self.trackers and accelerator.is_main_process:
            import mlflow

            mlflow.set_tracking_uri(self.tracking_uri)
        config = dict(self.config)
        if "tensorboard" in self.trackers:  # TensorBoard has no run tags: they go with the hyperparameters
            config.update({f"tag.{k}": v for k, v in self.tags.items()})
        # accelerate names the MLflow experiment after the project (the run name here) unless
        # MLFLOW_EXPERIMENT_NAME says otherwise: the experiment is the pipeline's, each training run a run in it
        env_set = "MLFLOW_EXPERIMENT_NAME" not in os.environ
        if env_set:
            os.environ["MLFLOW_EXPERIMENT_NAME"] = self.experiment
        try:
            accelerator.init_trackers(self.run_name, config=config, init_kwargs=self.init_kwargs)
        finally:
            if env_set:
                os.environ.pop("MLFLOW_EXPERIMENT_NAME", None)
        record: dict[str, Any] = {"run_name": self.run_name, "tags": dict(self.tags)}
        if "tensorboard" in self.trackers:
            record["tensorboard"] = str(self.tensorboard_dir)
        if "mlflow" in self.trackers and accelerator.is_main_process:
            run = accelerator.get_tracker("mlflow", unwrap=True)
            record["mlflow"] = {"run_id": run.info.run_id, "tracking_uri": self.tracking_uri,
                                "experiment": os.environ.get("MLFLOW_EXPERIMENT_NAME", self.experiment)}
        return record

    def log_train(self, accelerator, row: dict) -> None:
        """One metrics.jsonl row (a log line of the trainer) at its step."""
        if not self.trackers:
            return
        values = {f"train/{k}": row[k] for k in _TRAIN_KEYS if _scalar(row.get(k))}
        if values:
            accelerator.log(values, step=int(row["step"]))

    def log_eval(self, accelerator, points: Iterable) -> None:
        """Eval-curve records (eval_curve.EvalPoint), each at its step; ``eval/pairs_seen`` beside them so the loss
        can be read against pairs seen."""
        if not self.trackers:
            return
        for step, vals in sorted(eval_values(points).items()):
            accelerator.log(vals, step=step)

    def log_final(self, accelerator, metrics: dict, step: int) -> None:
        """The final evaluation ({set: metrics.summarize(...)}, as in metrics.json) at ``step``."""
        if not self.trackers:
            return
        values = final_values(metrics)
        if values:
            accelerator.log(values, step=int(step))


def eval_values(points: Iterable) -> dict[int, dict[str, float]]:
    """{step: {scalar name: value}} of eval-curve records."""
    by_step: dict[int, dict[str, float]] = {}
    for p in points:
        base = f"eval/{_tag(p.set)}" + (f"/{_tag(p.subset)}" if p.subset else "")
        vals = by_step.setdefault(int(p.step), {"eval/pairs_seen": p.pairs_seen, "eval/tokens_seen": p.tokens_seen})
        for k in ("bt_loss", "accuracy", "lc_accuracy"):
            v = getattr(p, k)
            if _scalar(v):
                vals[f"{base}/{k}"] = v
    return by_step


def final_values(metrics: dict) -> dict[str, float]:
    return {f"final/{_tag(s)}/{k}": m[k] for s, m in metrics.items() if isinstance(m, dict) for k in _FINAL_KEYS
            if _scalar(m.get(k))}


def setup_tracking(report_to: Iterable[str], folder: str | Path, run_config: dict | None = None,
                   tags: dict[str, Any] | None = None, run_name: str = "worldpm", experiment: str | None = None,
                   run_id: str | None = None) -> Tracking:
    """The trackers of ``report_to`` writing under ``folder`` (module doc): TensorBoard into
    ``<folder>/tensorboard/<run_name>/``, MLflow as run ``run_name`` of experiment ``experiment`` (default: the run
    name); the run's config flattened into hyperparameters and ``tags`` (e.g. the train and evaluate keys) on the
    run. A bad entry is a TrackingError."""
    names = check_report_to(report_to)
    folder = Path(folder).resolve()
    uri = None
    if "mlflow" in names:
        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{folder / 'mlflow' / 'mlflow.db'}"
        if uri.startswith("sqlite:///"):
            Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    if names:
        folder.mkdir(parents=True, exist_ok=True)
    return Tracking(names, folder, _tag(run_name), experiment or _tag(run_name),
                    flat_config(run_config) if run_config else {},
                    {str(k): str(v) for k, v in (tags or {}).items()}, uri, run_id)


# ---- the record of a training run's trackers, for the stages after it ---------------------------------------------
def record_path(folder: str | Path, train_key: str) -> Path:
    """``<folder>/runs/<train key>.json``: where the trainer says which tracker runs hold a training run."""
    return Path(folder) / "runs" / f"{train_key}.json"


def read_record(folder: str | Path, train_key: str) -> dict:
    import json

    p = record_path(folder, train_key)
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return {}


def write_record(folder: str | Path, train_key: str, record: dict) -> None:
    import json

    p = record_path(folder, train_key)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, p)


def log_final_metrics(record: dict, metrics: dict, step: int, tags: dict[str, str] | None = None) -> list[str]:
    """The evaluate stage's metrics.json into the tracker runs of the training run ``record`` names (accelerate's
    TensorBoardTracker on the same folder, MLflowTracker resuming the recorded run), as ``final/<set>/<metric>`` at
    ``step``; ``tags`` (the evaluate key) are added to the MLflow run. Returns the trackers written to."""
    from accelerate.tracking import MLflowTracker, TensorBoardTracker

    values = final_values(metrics)
    done = []
    if record.get("tensorboard"):
        d = Path(record["tensorboard"])
        tb = TensorBoardTracker(d.name, d.parent)
        tb.start()
        tb.log(values, step=int(step))
        tb.finish()
        done.append("tensorboard")
    ml = record.get("mlflow") or {}
    if ml.get("run_id"):
        import mlflow

        mlflow.set_tracking_uri(ml.get("tracking_uri"))
        t = MLflowTracker(ml.get("experiment"), run_id=ml["run_id"])
        t.start()
        for k, v in (tags or {}).items():
            mlflow.set_tag(k, str(v))
        t.log(values, step=int(step))
        t.finish()
        done.append("mlflow")
    return done
