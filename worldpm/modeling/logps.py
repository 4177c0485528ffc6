"""Log-probabilities of responses under a causal LM: what the DPO policy, the cached reference (the ``ref_logps``
stage) and evaluate's implicit reward all compute, in one place so that they agree token for token.

A sequence is ``[head] prompt [assistant header] response [end marker]`` as the tokenize stage laid it out;
``prompt_len`` (tokenize's column) is the number of tokens before the response, the same for the chosen and the
rejected side of a pair (they share one prompt cut). The log-probability of a response is

    sum over positions p in [prompt_len, len) of log pi(x_p | x_<p)

so the response tokens and the end marker count (the model learns where to stop, as in TRL), the prompt and the
template head never do, nor does padding. ``prompt_len`` 0 is read as 1: the first token has no prediction.

Kept apart from the stage (tasks/ref_logps.py) and the loss (dpo.py) so a change to the loss does not change the
reference cache's code version, and the reference and the policy cannot drift apart in how they count tokens.

The frozen reference (``load_reference``, ``response_logps``; its config is worldpm.config.dpo_reference) is here
too: the ref_logps stage fills its cache with it and evaluate scores eval sets with it, token for token the same way.
"""
from __future__ import annotations

import inspect
import time
from typing import Any

import numpy as np
import torch

from worldpm.config import ReferenceModel
from worldpm.errors import StageError
from worldpm.modeling import models

# ---- the model ----------------------------------------------------------------------------------------------------

def build_causal_lm(mcfg: Any, tokenizer, dtype: torch.dtype | None = None, quantization_config: Any = None,
                    device_map: Any = None, init_seed: int | None = None):
    """AutoModelForCausalLM for the policy or the frozen reference, pad token set.

    ``model.from_config`` builds a random-initialised model; its weights are drawn right after
    ``torch.manual_seed(init_seed)`` (in a forked RNG), so the trainer's policy and the ref_logps stage's reference
    start from the very same weights without sharing a file. Encoders (BERT, the default MiniLM) are refused: DPO
    needs a model that predicts the next token."""
    from transformers import AutoConfig, AutoModelForCausalLM

    get = models._get
    from_config = get(mcfg, "from_config")
    trust = bool(get(mcfg, "trust_remote_code", False))
    attn = get(mcfg, "attn_implementation")
    pad_id = tokenizer.pad_token_id
    if from_config:
        spec = dict(from_config)
        model_type = spec.pop("model_type", None)
        if not model_type:
            raise models.ModelError("model.from_config needs a `model_type` (e.g. qwen2, llama)")
        spec.setdefault("vocab_size", len(tokenizer))
        config = AutoConfig.for_model(model_type, pad_token_id=pad_id, **spec)
        _refuse_encoder(config, f"model.from_config model_type {model_type!r}")
        extra = {"attn_implementation": attn} if attn else {}
        with torch.random.fork_rng(devices=[]):
            if init_seed is not None:
                torch.manual_seed(int(init_seed))
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust, **extra)
    else:
        src = models.resolve_name(get(mcfg, "name_or_path"))
        try:
            config = AutoConfig.from_pretrained(src, revision=get(mcfg, "revision"), trust_remote_code=trust)
        except (OSError, ValueError) as e:
            raise models.ModelError(f"cannot load a model config from {src}: {str(e).splitlines()[0]}") from None
        _refuse_encoder(config, f"model {get(mcfg, 'name_or_path')!r}")
        kw = models.pretrained_kwargs(mcfg, trust, dtype, quantization_config, device_map, attn)
        try:
            model = AutoModelForCausalLM.from_pretrained(src, **kw)
        except (OSError, ValueError) as e:
            raise models.ModelError(f"cannot load a causal LM from {src}: {str(e).splitlines()[0]}") from None
    return models.fit_to_tokenizer(model, tokenizer, pad_id)


def _refuse_encoder(config, what: str) -> None:
    if models.is_encoder(config):
        raise models.ModelError(f"{what} is an encoder ({config.model_type}); train.objective dpo needs a causal "
                                "LM (a decoder such as qwen2 or llama): set model.name_or_path or model.from_config")


def load_causal_lm(model_dir, dtype: torch.dtype | None = None, device=None):
    """A DPO-trained policy from a train artifact's model/ folder (or a LoRA adapter folder, merged), eval mode."""
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    d = Path(model_dir)
    if (d / "model").is_dir() and not (d / "config.json").exists() and not (d / models.ADAPTER_CONFIG).exists():
        d = d / "model"
    kw: dict[str, Any] = {"dtype": dtype} if dtype is not None else {}
    try:
        if (d / models.ADAPTER_CONFIG).exists() and not (d / "config.json").exists():
            from peft import AutoPeftModelForCausalLM

            model = AutoPeftModelForCausalLM.from_pretrained(str(d), **kw).merge_and_unload()
        else:
            model = AutoModelForCausalLM.from_pretrained(str(d), **kw)
    except (OSError, ValueError) as e:
        raise models.ModelError(f"cannot load the DPO policy in {d}: {str(e).splitlines()[0]}") from None
    model.eval()
    if device is not None:
        model.to(device)
    return model


# ---- log-probabilities --------------------------------------------------------------------------------------------

def response_mask(attention_mask: torch.Tensor, position_ids: torch.Tensor | None,
                  prompt_len: torch.Tensor) -> torch.Tensor:
    """Which next-token labels (columns 1..W-1 of the batch) count: real tokens at positions >= prompt_len.

    Positions come from position_ids (real tokens only), so left and right padding give the same mask."""
    if position_ids is None:
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    start = prompt_len.to(position_ids.device).long().clamp(min=1)
    return attention_mask[:, 1:].bool() & (position_ids[:, 1:] >= start[:, None])


def token_logps(logits: torch.Tensor, labels: torch.Tensor, chunk_elements: int = 1 << 27) -> torch.Tensor:
    """log_softmax(logits)[label] in fp32, in chunks of rows (at most ~chunk_elements logits each), so a bf16
    batch is never upcast to fp32 all at once. log_softmax + gather: measured ~2-4x faster on CPU than a per-row
    logsumexp, and the same memory under autograd (log_softmax keeps only its output)."""
    n, t, v = logits.shape
    step = max(1, chunk_elements // max(t * v, 1))
    parts = [logits[i:i + step].float().log_softmax(-1).gather(-1, labels[i:i + step].unsqueeze(-1)).squeeze(-1)
             for i in range(0, n, step)]
    return torch.cat(parts) if parts else logits.new_zeros(labels.shape, dtype=torch.float32)


def takes_logits_to_keep(model) -> bool:
    """Whether the underlying HF model's forward takes ``logits_to_keep`` (Qwen2, Llama, ... in transformers 5),
    looking through DDP / DeepSpeed engines (.module) and peft wrappers (.base_model.model)."""
    m = model
    for _ in range(4):
        if "logits_to_keep" in inspect.signature(m.forward).parameters:
            return True
        nxt = getattr(m, "module", None) or getattr(getattr(m, "base_model", None), "model", None)
        if nxt is None or nxt is m:
            return False
        m = nxt
    return False


def sequence_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   position_ids: torch.Tensor | None, prompt_len: torch.Tensor,
                   return_tokens: bool = False):
    """(sum of response-token log-probs [N] fp32, response token counts [N] int64[, per-token logps, mask]).

    One forward pass over the rows; logits are computed only from the first column any row needs
    (``logits_to_keep`` where the model takes it), which skips the shared prompt region of long prompts."""
    mask = response_mask(attention_mask, position_ids, prompt_len)          # [N, W-1]
    width = input_ids.shape[1]
    cols = mask.any(0)
    first = int(cols.float().argmax()) if bool(cols.any()) else width - 1    # first label column that counts
    kw: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
    if position_ids is not None:
        kw["position_ids"] = position_ids
    keep = width - first  # logits columns first..W-1 (the last one predicts nothing and is dropped)
    if first > 0 and takes_logits_to_keep(model):
        kw["logits_to_keep"] = keep
        logits = model(**kw).logits
        logits = logits[:, -keep:][:, :-1]
    else:
        logits = model(**kw).logits[:, first:-1]
    labels = input_ids[:, first + 1:]
    m = mask[:, first:]
    lp = torch.where(m, token_logps(logits, labels), 0.0)
    sums = lp.sum(-1)
    counts = m.sum(-1)
    if return_tokens:
        return sums, counts, lp, m
    return sums, counts


# ---- the frozen reference -------------------------------------------------------------------------------------------

def tokens_per_batch(device: str, configured: int | None = None) -> int:
    """Padded tokens per reference batch: train.ref_tokens_per_batch, default 16k on CPU, 64k on a GPU (not part
    of any key: it changes the values only at float rounding level)."""
    return int(configured or (65536 if device.startswith("cuda") else 16384))


def pick_dtype(precision: str, device: str):
    if device.startswith("cuda") and precision in ("auto", "bf16") and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_reference(ref_cfg: ReferenceModel, tokenizer, device: str, dtype=None):
    """The frozen reference model (eval mode, no gradients) on `device`."""
    try:
        model = build_causal_lm(ref_cfg, tokenizer, dtype=dtype, init_seed=ref_cfg.init_seed)
    except models.ModelError as e:
        raise StageError(f"reference model: {e}") from None
    model.to(device).eval()
    model.requires_grad_(False)
    return model


def token_batches(lengths: np.ndarray, tokens_per_batch: int) -> list[np.ndarray]:
    """Indices of sequences, longest first, cut into batches of at most tokens_per_batch padded tokens."""
    order = np.argsort(-lengths, kind="stable")
    batches, start = [], 0
    while start < len(order):
        width = max(int(lengths[order[start]]), 1)
        n = max(1, tokens_per_batch // width)
        batches.append(order[start:start + n])
        start += n
    return batches


def response_logps(model, seqs: list[np.ndarray], prompt_len: np.ndarray, pad_id: int, device: str,
                   tokens_per_batch: int, log=None, label: str = "") -> tuple[np.ndarray, np.ndarray]:
    """(summed response log-probs float64, response token counts int32) of token id sequences, input order."""
    n = len(seqs)
    sums = np.zeros(n, dtype=np.float64)
    counts = np.zeros(n, dtype=np.int32)
    if n == 0:
        return sums, counts
    lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=n)
    batches = token_batches(lengths, tokens_per_batch)
    total_tokens = int(lengths.sum())
    t0 = last = time.perf_counter()
    done = done_tokens = 0
    with torch.inference_mode():
        for bi, idx in enumerate(batches):
            ids, mask, pos = models.pad_sequences([seqs[i] for i in idx], pad_id, side="right")
            pl_t = torch.from_numpy(prompt_len[idx].astype(np.int64))
            s, c = sequence_logps(model, ids.to(device), mask.to(device), pos.to(device), pl_t.to(device))
            sums[idx] = s.double().cpu().numpy()
            counts[idx] = c.cpu().numpy().astype(np.int32)
            done += len(idx)
            done_tokens += int(lengths[idx].sum())
            now = time.perf_counter()
            if log is not None and (now - last >= 30 or bi + 1 == len(batches)) and len(batches) > 1:
                el = now - t0
                rate = done_tokens / max(el, 1e-9)
                log.info("ref_logps: %s: %d/%d sequences, %.0f tokens/s, ETA %.0fs", label, done, n, rate,
                         (total_tokens - done_tokens) / max(rate, 1e-9))
                last = now
    return sums, counts
