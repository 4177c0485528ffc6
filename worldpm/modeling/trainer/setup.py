"""Setting up a training run: the typed arguments, the accelerator, the data and sampler, the model (LoRA / QLoRA,
gradient checkpointing), the optimizer and its schedule."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from worldpm.config import ModelConfig, TrainConfig
from worldpm.modeling import models, packing
from worldpm.modeling.trainer.data import Layout, PairBatchSampler, PairData, StepPlan, load_pairs

CRASH_ENV = "WORLDPM_TRAIN_CRASH_AFTER_STEP"
NAN_ENV = "WORLDPM_TRAIN_NAN_AT_STEP"
OOM_ENV = "WORLDPM_TRAIN_OOM_AT_STEP"
TRACE_ENV = "WORLDPM_TRAIN_TRACE_DIR"


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
    cpu: bool = False     # no GPU: processes on the CPU (gloo), DeepSpeed through its CPU accelerator
    launched_at: float | None = None  # time.time() when the stage started `accelerate launch` (startup timing)

    @classmethod
    def read(cls, path: str | Path) -> "TrainerArgs":
        a = json.loads(Path(path).read_text())
        return cls(model=ModelConfig.model_validate(a["model"]), train=TrainConfig.model_validate(a["train"]),
                   data_dir=Path(a["data_dir"]), tokenizer_dir=Path(a["tokenizer_dir"]), ref_dir=Path(a["ref_dir"]),
                   out=Path(a["out"]), work=Path(a["work"]), precision=a["precision"], cpu=bool(a.get("cpu")),
                   launched_at=a.get("launched_at"))


@dataclass(frozen=True)
class FaultInjection:
    """Test hooks, read once from the environment: crash_after K exits hard (code 17) right after step K, as a
    killed run would; nan_at K makes step K's loss nan (the run must stop, naming the step and the pairs); oom_at K
    raises torch's OutOfMemoryError in step K's first micro-batch (the run must stop naming the memory knob);
    trace_dir: each process appends the pair ids of every micro-batch it runs to <trace_dir>/rank<r>.jsonl."""

    crash_after: int = 0
    nan_at: int = 0
    oom_at: int = 0
    trace_dir: str | None = None

    @classmethod
    def from_env(cls) -> "FaultInjection":
        return cls(int(os.environ.get(CRASH_ENV) or 0), int(os.environ.get(NAN_ENV) or 0),
                   int(os.environ.get(OOM_ENV) or 0), os.environ.get(TRACE_ENV) or None)


def accelerator_for(args: TrainerArgs):
    """The Accelerator. On CPU: ``cpu=True`` (several processes: MULTI_CPU over gloo); under DeepSpeed on CPU
    (its CPU accelerator, DS_ACCELERATOR=cpu) the process group is named gloo explicitly, without which accelerate
    leaves the backend unset and every process believes it is process 0 of 1."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    kw: dict = {}
    if args.cpu and deepspeed:
        kw["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo")]
    elif args.cpu:
        kw["cpu"] = True
    return Accelerator(
        mixed_precision="bf16" if args.precision == "bf16" else "no",
        gradient_accumulation_steps=args.train.grad_accum,
        step_scheduler_with_optimizer=False,  # stepped once per optimizer step, whatever the process count
        **kw,
    )


def zero_stage(accelerator) -> int | None:
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return None if plugin is None else int(plugin.zero_stage)


def split_loader(args: TrainerArgs, objective_name: str):
    """split name -> PairData, with its cached reference log-probs for dpo."""
    ref_dir = args.ref_dir if objective_name == "dpo" else None

    def load(split: str) -> PairData:
        return load_pairs(args.data_dir / f"{split}.parquet",
                          ref_path=ref_dir / f"{split}.parquet" if ref_dir else None)
    return load


def plan(train: PairData, t: TrainConfig, accelerator, packed: bool) -> StepPlan:
    """The steps: PairBatchSampler's micro-batches (batch_size pairs, or a token budget) over processes and
    accumulation (data.StepPlan)."""
    sampler = PairBatchSampler(train.pair_len, t.batch_size, seed=t.seed, group_by_length=t.group_by_length,
                               window=t.length_group_window, max_tokens=t.max_tokens_per_batch,
                               packed_cost=train.packed_len if packed else None)
    return StepPlan(sampler, accelerator.num_processes, t.grad_accum, t.epochs, t.max_steps,
                    rank=accelerator.process_index)


def layout(model, t: TrainConfig, accelerator, objective_name: str):
    """Packed (padding-free) where the model can and train.packing allows, else padded (data.Layout)."""
    kind = packing.pack_kind(model) if objective_name == "bt" else None
    if t.packing is True and kind is None:
        what = "objective dpo" if objective_name != "bt" else type(models.unwrap(model)).__name__
        raise SystemExit(f"train.packing=true: {what} cannot be trained packed (packing.py: decoders with a score "
                         "head, BERT encoders with sdpa/eager attention); set train.packing=auto or false")
    if kind is not None and t.packing is not False:
        return Layout(packed=True, row_tokens=None if packing.one_row(model) else 0)
    return Layout(packed=False, pad_multiple=8 if accelerator.device.type == "cuda" else None)


def head_modules(model) -> list[str]:
    """The freshly initialised reward head, trained in full and saved with a LoRA adapter (modules_to_save)."""
    return [n for n in ("score", "classifier") if isinstance(getattr(model, n, None), torch.nn.Module)]


def build_placement(accelerator, precision: str, quantized: bool) -> tuple[torch.dtype | None, torch.device | None]:
    """(dtype, device) to build the model with, so that it is made where and as it will train, with no copy.

    Under DeepSpeed the engine holds bf16 weights (fp32 masters live in the optimizer): built in bf16. Plain bf16
    is autocast over fp32 weights (the optimizer updates fp32): built in fp32. On a GPU the weights are made on
    it (random init there, a checkpoint loaded straight to it); under ZeRO-3 zero.Init partitions them as they
    are made, so no device is given."""
    stage = zero_stage(accelerator)
    dtype = torch.bfloat16 if precision == "bf16" and stage is not None else None
    device = None
    if accelerator.device.type == "cuda" and stage != 3 and not quantized:
        device = accelerator.device
    return dtype, device


def setup_model(objective, mcfg: ModelConfig, tokenizer, accelerator, gradient_checkpointing: bool = False,
                precision: str = "fp32"):
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
    dtype, device = build_placement(accelerator, precision, quant is not None)
    model = objective.build_model(mcfg, tokenizer, dtype=dtype, quantization_config=quant, device_map=device_map,
                                  device=device)
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


def is_matrix(p: torch.Tensor) -> bool:
    """A weight matrix (weight decay applies) rather than a bias or a norm; ZeRO-3 flattens partitions to 1-D, so
    the real shape is ds_shape."""
    return len(getattr(p, "ds_shape", p.shape)) >= 2


def optimizer_and_schedule(model, t: TrainConfig, total_steps: int, accelerator=None):
    """AdamW over the trainable parameters (no weight decay on biases and norms) and the warmup + decay schedule.

    On CUDA the fused AdamW kernel (one launch for all parameters); with DeepSpeed's optimizer offload,
    DeepSpeedCPUAdam (DeepSpeed refuses a torch optimizer there)."""
    from transformers import get_scheduler

    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [g for g in ({"params": [p for p in trainable if is_matrix(p)], "weight_decay": t.weight_decay},
                          {"params": [p for p in trainable if not is_matrix(p)], "weight_decay": 0.0}) if g["params"]]
    kw = {"lr": t.lr, "betas": (0.9, 0.95), "eps": 1e-8}
    offload = t.deepspeed.enabled and t.deepspeed.offload_optimizer and accelerator is not None \
        and zero_stage(accelerator) is not None
    if offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizer = DeepSpeedCPUAdam(groups, adamw_mode=True, **kw)
    else:
        cuda = accelerator is not None and accelerator.device.type == "cuda"
        on_gpu = all(p.device.type == "cuda" for g in groups for p in g["params"])
        optimizer = torch.optim.AdamW(groups, fused=True if cuda and on_gpu else None, **kw)
    warmup = int(round(t.warmup_ratio * total_steps))
    scheduler = get_scheduler(t.scheduler if t.scheduler != "constant" else "constant_with_warmup",
                              optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
    return optimizer, scheduler


def parameter_counts(model) -> tuple[int, int]:
    """(all parameters, trainable ones), whole sizes under ZeRO-3 (ds_numel; numel() is the local partition)."""
    params = list(models.unwrap(model).parameters())
    return (sum(models.parameter_count(p) for p in params),
            sum(models.parameter_count(p) for p in params if p.requires_grad))
