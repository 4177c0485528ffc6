"""Setting up a training run: the typed arguments, the accelerator, the data and sampler, the model (LoRA / QLoRA,
gradient checkpointing), the optimizer and its schedule."""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from worldpm.config import ModelConfig, TrainConfig
from worldpm.modeling.trainer.data import PairBatchSampler, PairData, load_pairs

CRASH_ENV = "WORLDPM_TRAIN_CRASH_AFTER_STEP"
NAN_ENV = "WORLDPM_TRAIN_NAN_AT_STEP"


@dataclass(frozen=True)
class TrainerArgs:
    """ARGS.json as the train stage (tasks/train.py) writes it; model and train re-validated as typed configs."""

    model: ModelConfig
    train: TrainConfig
    data_dir: Path        # the tokenize artifact
    tokenizer_dir: Path
    ref_dir: Path         # the ref_logps artifact (dpo: cached reference log-probs per split)
    out: Path             # the artifact folder being written
    work: Path            # the stage's per-key scratch folder (checkpoints, metrics so far; survives a crash)
    precision: str        # bf16 | fp32

    @classmethod
    def read(cls, path: str | Path) -> "TrainerArgs":
        a = json.loads(Path(path).read_text())
        return cls(model=ModelConfig.model_validate(a["model"]), train=TrainConfig.model_validate(a["train"]),
                   data_dir=Path(a["data_dir"]), tokenizer_dir=Path(a["tokenizer_dir"]), ref_dir=Path(a["ref_dir"]),
                   out=Path(a["out"]), work=Path(a["work"]), precision=a["precision"])


@dataclass(frozen=True)
class FaultInjection:
    """Test hooks, read once from the environment: crash_after K exits hard (code 17) right after step K, as a
    killed run would; nan_at K makes step K's loss nan (the run must stop, naming the step and the pairs)."""

    crash_after: int = 0
    nan_at: int = 0

    @classmethod
    def from_env(cls) -> "FaultInjection":
        return cls(int(os.environ.get(CRASH_ENV) or 0), int(os.environ.get(NAN_ENV) or 0))


def accelerator_for(args: TrainerArgs):
    from accelerate import Accelerator

    return Accelerator(
        mixed_precision="bf16" if args.precision == "bf16" else "no",
        gradient_accumulation_steps=args.train.grad_accum,
        step_scheduler_with_optimizer=False,  # stepped once per optimizer step, whatever the process count
    )


def split_loader(args: TrainerArgs, objective_name: str):
    """split name -> PairData, with its cached reference log-probs for dpo."""
    ref_dir = args.ref_dir if objective_name == "dpo" else None

    def load(split: str) -> PairData:
        return load_pairs(args.data_dir / f"{split}.parquet",
                          ref_path=ref_dir / f"{split}.parquet" if ref_dir else None)
    return load


@dataclass
class Schedule:
    sampler: PairBatchSampler
    micro_per_epoch: int
    steps_per_epoch: int
    total_steps: int


def schedule(train: PairData, t: TrainConfig, accelerator) -> Schedule:
    sampler = PairBatchSampler(train.pair_len, t.batch_size, seed=t.seed, group_by_length=t.group_by_length,
                               window=t.length_group_window, num_replicas=accelerator.num_processes,
                               rank=accelerator.process_index)
    micro = len(sampler)
    steps_per_epoch = max(1, micro // t.grad_accum)
    total = t.max_steps or max(1, math.ceil(t.epochs * steps_per_epoch))
    return Schedule(sampler, micro, steps_per_epoch, total)


def head_modules(model) -> list[str]:
    """The freshly initialised reward head, trained in full and saved with a LoRA adapter (modules_to_save)."""
    return [n for n in ("score", "classifier") if isinstance(getattr(model, n, None), torch.nn.Module)]


def setup_model(objective, mcfg: ModelConfig, tokenizer, accelerator, gradient_checkpointing: bool = False):
    """The objective's model, with LoRA (peft) or QLoRA (NF4 base, GPU only) when configured."""
    lc = mcfg.lora
    quant = device_map = None
    if lc.enabled and lc.quantize_4bit:
        if not torch.cuda.is_available():
            raise SystemExit("model.lora.quantize_4bit (QLoRA, 4-bit NF4 through bitsandbytes) needs a CUDA GPU; "
                             "this machine has none: set model.lora.quantize_4bit=false")
        from transformers import BitsAndBytesConfig

        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16)
        device_map = {"": accelerator.local_process_index}
    model = objective.build_model(mcfg, tokenizer, quantization_config=quant, device_map=device_map)
    if lc.enabled:
        from peft import LoraConfig, TaskType, get_peft_model, prepare_model_for_kbit_training

        if quant is not None:
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        # bt: a sequence classifier whose new score head is trained in full; dpo: a causal LM (no new head)
        task = TaskType[getattr(objective, "lora_task_type", "SEQ_CLS")]
        pcfg = LoraConfig(task_type=task, r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
                          target_modules=lc.target_modules, modules_to_save=head_modules(model) or None)
        model = get_peft_model(model, pcfg)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    return model


def optimizer_and_schedule(model, t: TrainConfig, total_steps: int):
    """AdamW over the trainable parameters (no weight decay on biases and norms) and the warmup + decay schedule."""
    from transformers import get_scheduler

    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if p.ndim >= 2], "weight_decay": t.weight_decay},
              {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=t.lr, betas=(0.9, 0.95), eps=1e-8)
    warmup = int(round(t.warmup_ratio * total_steps))
    scheduler = get_scheduler(t.scheduler if t.scheduler != "constant" else "constant_with_warmup",
                              optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
    return optimizer, scheduler


def parameter_counts(model) -> tuple[int, int]:
    """(all parameters, trainable ones)."""
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)
