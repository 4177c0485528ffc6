"""Experiment trackers (``train.report_to``) on accelerate's own trackers, not a logger of ours.

``setup_tracking(report_to, folder, run_config, tags)`` returns what the trainer hands accelerate and an object
that logs through it:

    tracking = setup_tracking(["tensorboard"], folder, run_config=cfg_dict, tags={"train_key": key})
    accelerator = Accelerator(**tracking.accelerator_kwargs, ...)    # log_with=[...], project_dir=folder
    tracking.start(accelerator)                                      # init_trackers(project, config, init_kwargs)
    tracking.log_train(accelerator, row)                             # a metrics.jsonl row, at its step
    tracking.log_eval(accelerator, points)                           # eval_curve records, at their step
    tracking.log_final(accelerator, metrics, step)                   # evaluate's metrics.json values
    accelerator.end_training()                                       # closes the writers / ends the MLflow run

What each tracker writes (everything on the local disk, nothing over a network):

* ``tensorboard``: event files under ``<folder>/<project>/`` (accelerate's TensorBoardTracker: a SummaryWriter
  whose logdir is project_dir/run name), the run config as hparams. Read them with TensorBoard
  (``tensorboard --logdir <folder>``) or tensorboard's EventAccumulator.
* ``mlflow``: the run in the tracking store of ``MLFLOW_TRACKING_URI`` when it is set (a server of yours), else a
  SQLite store ``<folder>/mlflow/mlflow.db`` with artifacts in ``<folder>/mlflow/artifacts`` (MLflow 3 refuses its
  old file store by default); config as params, ``tags`` as run tags. ``mlflow ui --backend-store-uri
  sqlite:///<folder>/mlflow/mlflow.db`` shows it.

Scalar names: ``train/<key>`` (loss, accuracy, margin, lr, grad_norm, tokens_per_s, pairs_seen, ...),
``eval/<set>/<metric>`` and ``eval/<set>/<subset>/<metric>`` (bt_loss, accuracy, lc_accuracy) with
``eval/pairs_seen``, ``final/<set>/<metric>`` (the final evaluation, at the last step).

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

SUPPORTED = ("tensorboard", "mlflow")
_NETWORK = {
    "wandb": "wandb logs to its service at api.wandb.ai (an account and a network)",
    "comet_ml": "comet_ml logs to Comet's service (an account and a network)",
    "clearml": "clearml logs to a ClearML server (a network)",
    "swanlab": "swanlab logs to its cloud service (an account and a network)",
    "trackio": "trackio syncs to a Hugging Face Space (a network)",
}
_PACKAGE = {"tensorboard": "tensorboard", "mlflow": "mlflow-skinny (or mlflow)"}
_TRAIN_KEYS = ("loss", "accuracy", "margin", "lr", "grad_norm", "tokens_per_s", "pairs_per_s", "padding", "epoch",
               "pairs_seen", "tokens_seen")
_FINAL_KEYS = ("accuracy", "lc_accuracy", "bt_loss", "ece", "margin_length_corr", "length_rule_accuracy",
               "rewardbench_score", "n")


class TrackingError(ValueError):
    """A report_to entry that cannot be used here; the message is one line."""


def check_report_to(report_to: Iterable[str]) -> list[str]:
    """The trackers, checked: known, offline, installed. A one-line TrackingError otherwise."""
    names = []
    for name in report_to:
        n = str(name).strip().lower()
        if n in ("none", ""):
            continue
        if n in _NETWORK:
            raise TrackingError(f"train.report_to: {n} needs a network ({_NETWORK[n]}); this pipeline reports "
                                f"offline to {' or '.join(SUPPORTED)}")
        if n not in SUPPORTED:
            raise TrackingError(f"train.report_to: unknown tracker {name!r}; one of {', '.join(SUPPORTED)}")
        try:
            __import__("tensorboard" if n == "tensorboard" else "mlflow")
        except ImportError:
            raise TrackingError(f"train.report_to: {n} is not installed here (pip install {_PACKAGE[n]})") from None
        if n not in names:
            names.append(n)
    return names


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
    project: str
    config: dict[str, Any]
    tags: dict[str, str] = field(default_factory=dict)
    tracking_uri: str | None = None

    @property
    def accelerator_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for Accelerator(...): log_with and project_dir ({} without trackers)."""
        if not self.trackers:
            return {}
        return {"log_with": list(self.trackers), "project_dir": str(self.folder)}

    @property
    def init_kwargs(self) -> dict[str, dict]:
        kw: dict[str, dict] = {}
        if "mlflow" in self.trackers:
            kw["mlflow"] = {"tags": dict(self.tags), "run_name": self.tags.get("run_name") or self.project,
                            "logging_dir": str(self.folder / "mlflow" / "artifacts")}
        return kw

    def start(self, accelerator) -> None:
        """Point MLflow at its store, then accelerator.init_trackers(project, config, init_kwargs)."""
        if not self.trackers:
            return
        if "mlflow" in self.trackers and accelerator.is_main_process:
            import mlflow

            mlflow.set_tracking_uri(self.tracking_uri)
        config = dict(self.config)
        if "tensorboard" in self.trackers:  # TensorBoard has no run tags: they go with the hyperparameters
            config.update({f"tag.{k}": v for k, v in self.tags.items()})
        accelerator.init_trackers(self.project, config=config, init_kwargs=self.init_kwargs)

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
        by_step: dict[int, dict[str, float]] = {}
        for p in points:
            base = f"eval/{_tag(p.set)}" + (f"/{_tag(p.subset)}" if p.subset else "")
            vals = by_step.setdefault(int(p.step), {"eval/pairs_seen": p.pairs_seen,
                                                    "eval/tokens_seen": p.tokens_seen})
            for k in ("bt_loss", "accuracy", "lc_accuracy"):
                v = getattr(p, k)
                if _scalar(v):
                    vals[f"{base}/{k}"] = v
        for step in sorted(by_step):
            accelerator.log(by_step[step], step=step)

    def log_final(self, accelerator, metrics: dict, step: int) -> None:
        """The final evaluation ({set: metrics.summarize(...)}, as in metrics.json) at ``step``."""
        if not self.trackers:
            return
        values = {f"final/{_tag(s)}/{k}": m[k] for s, m in metrics.items() for k in _FINAL_KEYS
                  if _scalar(m.get(k))}
        if values:
            accelerator.log(values, step=int(step))


def setup_tracking(report_to: Iterable[str], folder: str | Path, run_config: dict | None = None,
                   tags: dict[str, Any] | None = None, project: str = "worldpm") -> Tracking:
    """The trackers of ``report_to`` writing under ``folder`` (module doc), the run's config flattened into
    hyperparameters and ``tags`` (e.g. the train and evaluate keys) on the run. A bad entry is a TrackingError."""
    names = check_report_to(report_to)
    folder = Path(folder).resolve()
    uri = None
    if "mlflow" in names:
        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{folder / 'mlflow' / 'mlflow.db'}"
        if uri.startswith("sqlite:///"):
            Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    if names:
        folder.mkdir(parents=True, exist_ok=True)
    return Tracking(names, folder, _tag(project), flat_config(run_config) if run_config else {},
                    {str(k): str(v) for k, v in (tags or {}).items()}, uri)
