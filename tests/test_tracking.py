"""Experiment trackers through accelerate's own trackers (worldpm/modeling/tracking.py): a real Accelerator (one
CPU process) writes TensorBoard event files and a local MLflow store; the test reads them back with
TensorBoard's EventAccumulator and MLflow's client."""
from __future__ import annotations

import pytest

from worldpm.config import TrackingError, check_report_to
from worldpm.modeling.tracking import flat_config, setup_tracking
from worldpm.modeling.eval_curve import EvalPoint

ROWS = [{"step": s, "epoch": s / 30, "loss": 0.69 - 0.01 * s, "accuracy": 0.5 + 0.01 * s, "margin": 0.02 * s,
         "lr": 5e-5, "grad_norm": 1.0 + s, "pairs": 16, "tokens": 1000, "tokens_per_s": 500.0, "padding": 0.0,
         "elapsed_s": float(s)} for s in (10, 20, 30)]
POINTS = [EvalPoint(step=s, pairs_seen=16 * s, tokens_seen=1000 * s, set=name, subset=sub, category=cat, n=50,
                    bt_loss=0.7 - 0.001 * s - (0.01 if sub else 0), accuracy=0.5 + 0.005 * s, lc_accuracy=0.5)
          for s in (10, 30) for name, sub, cat in (("eval", None, None), ("rb", None, "adversarial"),
                                                   ("rb", "chat-hard", "adversarial"))]
FINAL = {"test": {"n": 100, "accuracy": 0.61, "bt_loss": 0.66, "lc_accuracy": 0.58, "ece": 0.03, "by_domain": {}},
         "rb": {"n": 50, "accuracy": 0.55, "bt_loss": 0.68, "lc_accuracy": None}}
CONFIG = {"train": {"lr": 5e-5, "epochs": 1, "max_steps": None}, "model": {"name_or_path": "minilm"}}
TAGS = {"train_key": "abc123", "evaluate_key": "def456", "pipeline": "worldpm"}


@pytest.fixture
def accelerator_factory():
    """A real Accelerator on the CPU; accelerate's shared state and MLflow's tracking URI are reset afterwards."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    made = []

    def make(**kw):
        acc = Accelerator(cpu=True, **kw)
        made.append(acc)
        return acc

    yield make
    AcceleratorState._reset_state(True)
    try:
        import mlflow

        mlflow.set_tracking_uri(None)
    except ImportError:
        pass


def _write(tracking, accelerator):
    tracking.start(accelerator)
    for row in ROWS:
        tracking.log_train(accelerator, row)
    tracking.log_eval(accelerator, POINTS)
    tracking.log_final(accelerator, FINAL, step=30)
    accelerator.end_training()


def test_tensorboard_event_files_hold_training_and_eval_curve_scalars(tmp_path, accelerator_factory):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tracking = setup_tracking(["tensorboard"], tmp_path / "tb", run_config=CONFIG, tags=TAGS, run_name="run1")
    assert tracking.accelerator_kwargs == {"log_with": ["tensorboard"],
                                           "project_dir": str(tmp_path / "tb" / "tensorboard")}
    _write(tracking, accelerator_factory(**tracking.accelerator_kwargs))

    ea = EventAccumulator(str(tmp_path / "tb" / "tensorboard" / "run1"))
    ea.Reload()
    scalars = set(ea.Tags()["scalars"])
    assert {"train/loss", "train/grad_norm", "eval/rb/bt_loss", "eval/rb/chat-hard/bt_loss", "eval/eval/accuracy",
            "eval/pairs_seen", "final/test/accuracy", "final/rb/bt_loss"} <= scalars
    assert "final/rb/lc_accuracy" not in scalars  # None is not logged as a number
    assert [(e.step, round(e.value, 4)) for e in ea.Scalars("train/loss")] == [(10, 0.59), (20, 0.49), (30, 0.39)]
    assert [(e.step, round(e.value, 4)) for e in ea.Scalars("eval/rb/bt_loss")] == [(10, 0.69), (30, 0.67)]
    assert [(e.step, e.value) for e in ea.Scalars("eval/pairs_seen")] == [(10, 160.0), (30, 480.0)]
    assert [(e.step, round(e.value, 4)) for e in ea.Scalars("final/test/accuracy")] == [(30, 0.61)]


def test_mlflow_local_store_holds_the_same_checked_through_its_client(tmp_path, accelerator_factory, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracking = setup_tracking(["mlflow"], tmp_path / "ml", run_config=CONFIG, tags=TAGS, run_name="run1",
                              experiment="pipe")
    assert tracking.tracking_uri == f"sqlite:///{tmp_path / 'ml' / 'mlflow' / 'mlflow.db'}"
    _write(tracking, accelerator_factory(**tracking.accelerator_kwargs))

    client = MlflowClient(tracking_uri=tracking.tracking_uri)
    exp = client.get_experiment_by_name("pipe")  # the experiment is the pipeline's, the run is the training run
    assert exp is not None
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.run_name == "run1"
    assert run.info.status == "FINISHED"
    assert {k: run.data.tags[k] for k in TAGS} == TAGS
    assert run.data.params["train.lr"] == "5e-05" and run.data.params["train.max_steps"] == "null"
    hist = lambda key: [(m.step, round(m.value, 4)) for m in client.get_metric_history(run.info.run_id, key)]  # noqa: E731
    assert hist("train/loss") == [(10, 0.59), (20, 0.49), (30, 0.39)]
    assert hist("eval/rb/chat-hard/bt_loss") == [(10, 0.68), (30, 0.66)]
    assert hist("eval/pairs_seen") == [(10, 160.0), (30, 480.0)]
    assert hist("final/rb/bt_loss") == [(30, 0.68)]


def test_report_to_refuses_network_and_unknown_trackers_in_one_line():
    with pytest.raises(TrackingError, match=r"wandb needs a network") as e:
        check_report_to(["wandb"])
    assert "\n" not in str(e.value)
    with pytest.raises(TrackingError, match="unknown tracker 'tensorbord'; one of tensorboard, mlflow"):
        check_report_to(["tensorbord"])
    assert check_report_to([]) == [] and check_report_to(["none"]) == []
    off = setup_tracking([], "unused")
    assert off.accelerator_kwargs == {} and not (off.folder.exists())


def test_flat_config_gives_tracker_hyperparameters():
    assert flat_config({"a": {"b": 1, "c": None, "d": [1, 2]}, "e": True}) == {"a.b": 1, "a.c": "null",
                                                                               "a.d": "[1, 2]", "e": True}


def test_report_to_through_the_train_and_evaluate_stages(tokenized, tmp_path, monkeypatch):
    """train.report_to [tensorboard, mlflow] on a real (in-process) training run with evaluation during training:
    the TensorBoard event files and the local MLflow store under <store>/tracking/ hold the training scalars, the
    eval-curve points at their steps and, after the evaluate stage, its final metrics; the MLflow run is tagged with
    the train and evaluate keys. The eval set's last point equals the evaluate stage's numbers (one text path).
    report_to is in no key: the same config without it is a cache hit."""
    import json
    from pathlib import Path

    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from support import LOG, RB_SET, eval_records, tiny_cfg, train_inputs
    from tasks import PIPELINE

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    store, tok, _ = tokenized
    cfg = tiny_cfg(RB_SET, "train.eval_at={every: 3}", "train.report_to=[tensorboard, mlflow]", "name=tracked")
    inputs = train_inputs(store, tok)
    train = PIPELINE.execute("train", cfg, inputs, store, log=LOG)
    ev = PIPELINE.execute("evaluate", cfg, {**inputs, "train": train.ref}, store, log=LOG)
    root = Path(store.root) / "tracking"
    record = json.loads((root / "runs" / f"{train.key}.json").read_text())
    assert record["run_name"] == f"tracked-train-{train.key[:12]}" and record["steps"] == 6

    ea = EventAccumulator(record["tensorboard"])
    ea.Reload()
    scalars = set(ea.Tags()["scalars"])
    assert {"train/loss", "train/pairs_seen", "eval/eval/bt_loss", "eval/rb/bt_loss", "final/test/accuracy",
            "final/rb/bt_loss"} <= scalars
    assert [e.step for e in ea.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]
    assert [e.step for e in ea.Scalars("eval/rb/bt_loss")] == [3, 6]
    points = eval_records(Path(train.ref.path))
    rb_loss = [p["bt_loss"] for p in points if p["set"] == "rb" and p["subset"] is None]
    assert [e.value for e in ea.Scalars("eval/rb/bt_loss")] == pytest.approx(rb_loss, abs=1e-6)
    metrics = json.loads((Path(ev.ref.path) / "metrics.json").read_text())
    # one text path: the last point's rb record (tokenized by the trainer, scored packed by the training model) is
    # what the evaluate stage measures on the saved model (its own tokenization, padded scoring)
    last_rb = next(p for p in reversed(points) if p["set"] == "rb" and p["subset"] is None)
    assert last_rb["n"] == metrics["rb"]["n"] and last_rb["accuracy"] == pytest.approx(metrics["rb"]["accuracy"])
    assert last_rb["bt_loss"] == pytest.approx(metrics["rb"]["bt_loss"], abs=1e-4)
    assert [(e.step, e.value) for e in ea.Scalars("final/test/accuracy")] == [
        (6, pytest.approx(metrics["test"]["accuracy"]))]

    client = MlflowClient(tracking_uri=record["mlflow"]["tracking_uri"])
    run = client.get_run(record["mlflow"]["run_id"])
    assert run.info.run_name == record["run_name"] and run.data.tags["train_key"] == train.key
    assert run.data.tags["evaluate_key"] == ev.key and run.data.tags["tokenize_key"] == tok.key
    assert client.get_experiment(run.info.experiment_id).name == "tracked"
    hist = lambda k: [(m.step, round(m.value, 6)) for m in client.get_metric_history(run.info.run_id, k)]  # noqa: E731
    assert [s for s, _ in hist("train/loss")] == [1, 2, 3, 4, 5, 6]
    assert hist("eval/rb/bt_loss") == [(3, round(rb_loss[0], 6)), (6, round(rb_loss[1], 6))]
    assert hist("final/rb/bt_loss") == [(6, round(metrics["rb"]["bt_loss"], 6))]

    again = PIPELINE.execute("train", tiny_cfg(RB_SET, "train.eval_at={every: 3}", "name=tracked"), inputs, store,
                             log=LOG)
    assert again.status == "cached" and again.key == train.key
