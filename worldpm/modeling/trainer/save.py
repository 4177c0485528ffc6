"""Checkpoints (accelerator.save_state, renamed into place when complete) and the final HF model folder."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from worldpm.config import ModelConfig
from worldpm.data.textpath import RenderSettings
from worldpm.modeling import export, models

CKPT_PREFIX = "step-"
STATE_FILE = "trainer_state.json"


def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Finished checkpoints (renamed into place, with trainer_state.json), oldest first."""
    if not ckpt_dir.is_dir():
        return []
    done = [p for p in ckpt_dir.iterdir() if p.name.startswith(CKPT_PREFIX) and (p / STATE_FILE).is_file()]
    return sorted(done, key=lambda p: int(p.name[len(CKPT_PREFIX):]))


def save_checkpoint(accelerator, ckpt_dir: Path, step: int, state: dict, keep: int) -> Path:
    final = ckpt_dir / f"{CKPT_PREFIX}{step:08d}"
    tmp = ckpt_dir / f".tmp-{CKPT_PREFIX}{step:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))  # every process writes its part (ZeRO-3 shards)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)  # a checkpoint dir with trainer_state.json is complete
        for old in complete_checkpoints(ckpt_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def resume(accelerator, ckpt_dir: Path, micro_per_step: int | None = None) -> tuple[int, Path | None]:
    """Load the newest complete checkpoint (model, optimizer, scheduler, RNG): (the step it was taken at, its
    folder), or (0, None) when there is none. A checkpoint of a run with another processes x grad_accum is refused
    (its steps covered other pairs, and ZeRO shards are per process)."""
    done = complete_checkpoints(ckpt_dir)
    if not done:
        return 0, None
    state = json.loads((done[-1] / STATE_FILE).read_text())
    was = state.get("micro_per_step")
    if micro_per_step is not None and was is not None and was != micro_per_step:
        raise SystemExit(f"{done[-1]}: written by a run of {was} micro-batches a step (processes x grad_accum), "
                         f"this run has {micro_per_step}: rerun with the same train.num_processes and "
                         f"train.grad_accum, or delete {ckpt_dir} to start over")
    accelerator.load_state(str(done[-1]))
    return int(state["step"]), done[-1]


def save_final(accelerator, model, tokenizer, dest: Path, mcfg: ModelConfig, objective: str,
               card: dict | None = None) -> None:
    """<out>/model in HF format. LoRA: merged into the base (plain HF folder) and the adapter with its trained
    head kept beside it (<out>/adapter); QLoRA or LoRA under ZeRO-3: the adapter folder is the model.
    worldpm.json records the objective, the reward token, the padding, and `card` (the text path the model was
    trained on: TextPath.card). A reward model's folder is made ready for a HF pipeline (export.py: a regression
    head labelled `reward`, the tokenizer's max length, left truncation and worldpm's reward chat template, recorded
    under `hf`); every file gets the same mode."""
    lora = mcfg.lora.enabled
    hf = None
    if objective == "bt" and (card or {}).get("render") and accelerator.is_main_process:
        # a reward model: the folder ready for a HF pipeline and TRL (worldpm/modeling/export.py)
        tokenizer = export.reward_tokenizer(tokenizer, RenderSettings.of(card["render"]))
        hf = export.hf_record(tokenizer)
    state_dict = accelerator.get_state_dict(model)  # gathers ZeRO-3 shards (stage3_gather_16bit_weights_on_model_save)
    unwrapped = accelerator.unwrap_model(model)
    zero3 = getattr(accelerator.state, "deepspeed_plugin", None) is not None and \
        accelerator.state.deepspeed_plugin.zero_stage == 3
    if accelerator.is_main_process:
        dest.mkdir(parents=True, exist_ok=True)
        if lora:
            unwrapped.save_pretrained(str(dest.parent / "adapter"), state_dict=state_dict)
            tokenizer.save_pretrained(str(dest.parent / "adapter"))
            if mcfg.lora.quantize_4bit or zero3:
                shutil.rmtree(dest)
                shutil.copytree(dest.parent / "adapter", dest)
            else:
                merged = unwrapped.merge_and_unload()
                merged.save_pretrained(str(dest))
        else:
            unwrapped.save_pretrained(str(dest), state_dict=state_dict, save_function=accelerator.save)
        tokenizer.save_pretrained(str(dest))
        reward_token = "first" if models.is_encoder(models.config_of(unwrapped)) else "last"
        if objective == "bt":
            export.finish_config(dest)
        (dest / "worldpm.json").write_text(json.dumps({
            "objective": objective, "reward_token": reward_token,
            "pad_token_id": tokenizer.pad_token_id, "padding_side": "right", "lora": bool(lora), **(card or {}),
            **({"hf": hf} if hf is not None else {})}, indent=2))
        export.uniform_modes(dest, dest.parent / "adapter")
    accelerator.wait_for_everyone()


def peak_memory_gb(accelerator) -> float:
    """Peak GPU memory allocated by torch on a process's device, or a process's peak RSS on CPU: the largest over
    the processes."""
    if accelerator.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(accelerator.device) / 2**30
    else:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    if accelerator.num_processes > 1:
        peak = float(accelerator.gather(torch.tensor([peak], dtype=torch.float64, device=accelerator.device)).max())
    return peak
