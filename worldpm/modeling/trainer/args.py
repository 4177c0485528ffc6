"""The training recipe's one argument: what the train stage writes once (launch.py, ``<work>/launch/args.json``) and
every training process reads once (recipe.main): the typed model and train sections as pipeline.yaml has them, the
text path the model is trained on (recorded in its worldpm.json), and where things are."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from worldpm.config import ModelConfig, TrainConfig
from worldpm.data.evalsets import EvalSetFile
from worldpm.data.textpath import TextPath

FAILURE = "failure.json"  # the recipe's root cause, for the stage's one-line error


class TrackingArgs(BaseModel):
    """train.report_to for this run (modeling/tracking.py): where, under which names, tagged how."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    report_to: list[str]
    folder: Path          # <artifacts_dir>/tracking
    run_name: str         # <pipeline name>-train-<key prefix>: the TensorBoard folder, the MLflow run
    experiment: str       # the pipeline's name: the MLflow experiment
    train_key: str        # the run's record is <folder>/runs/<train_key>.json
    tags: dict[str, str]  # pipeline, train key, the keys of its inputs
    config: dict[str, Any]  # the train stage's config as its key sees it (hyperparameters)


class TrainerArgs(BaseModel):
    """What a training process is given."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: ModelConfig
    train: TrainConfig
    text: TextPath
    data_dir: Path        # the tokenize artifact (its tokenizer/ is the model's tokenizer)
    ref_dir: Path         # the ref_logps artifact (dpo: cached reference log-probs per split)
    out: Path             # the artifact folder being written
    work: Path            # the stage's per-key scratch folder (checkpoints, metrics so far; survives a crash)
    precision: Literal["bf16", "fp32"]
    cpu: bool = False     # no GPU: processes on the CPU (gloo), DeepSpeed through its CPU accelerator
    launched_at: float | None = None  # time.time() when the stage started `accelerate launch` (startup timing)
    eval_sets: list[EvalSetFile] = []  # scored at each train.eval_at point, beside the eval split
    tracking: TrackingArgs | None = None  # train.report_to

    @property
    def tokenizer_dir(self) -> Path:
        return self.data_dir / "tokenizer"

    @classmethod
    def read(cls, path: str | Path) -> "TrainerArgs":
        return cls.model_validate_json(Path(path).read_text())
