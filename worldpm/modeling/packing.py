"""Padding-free batches: token sequences packed end to end into rows, attention kept inside each sequence, the
reward read at each sequence's own reward token.

A packed batch lays N sequences into R rows of width W (first-fit decreasing, longest first). Inside a row every
sequence has its own ``position_ids`` (0..L-1), and a row's unused tail (if any) is one more block of pad tokens
with positions 0..k-1 of its own, so that no query ever has every key masked (that would make NaNs in the
attention of the pad block and, through the backward pass, in every weight gradient).

How attention is kept inside a sequence (what transformers offers, per kind of model):

* decoders (Qwen2, Llama, Mistral ... any ``*ForSequenceClassification`` built on transformers'
  ``GenericForSequenceClassification``): ``attention_mask=None`` and the packed ``position_ids``. transformers'
  mask code (``masking_utils.find_packed_sequence_indices``) finds the sequence boundaries where the positions
  restart and builds a block-causal mask: a boolean ``[R, 1, W, W]`` mask for ``sdpa`` / ``eager``, a
  ``BlockMask`` that skips the masked blocks for ``flex_attention``, and varlen (cu_seqlens) for
  ``flash_attention_2/3``. The score head runs over every token; its output is read at each sequence's last token.
* BERT encoders (MiniLM): transformers builds no packed mask for bidirectional attention, so the block-diagonal
  ``[R, 1, W, W]`` mask is made here (boolean for ``sdpa``, additive for ``eager``; both pass through transformers
  unchanged) and the pooler is handed each sequence's first token ([CLS]) instead of each row's.

Other models (RoBERTa-style position offsets, DistilBERT/ModernBERT pooling inside ``forward``, DPO's causal LM)
take the padded path (models.forward_scores). ``row_tokens`` sets the row width: one row holding everything suits
kernels that skip masked blocks (flash varlen, flex); a materialised mask costs W^2 per row, so with ``sdpa`` /
``eager`` the rows are as wide as the longest sequence (attention cost then about that of the padded batch, the
matmuls on real tokens only).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from worldpm.modeling import models, varlen

# encoders whose head reads hidden_states[:, 0] in a submodule we can hand the per-sequence first tokens
_ENCODER_POOLERS = {"bert": "pooler"}
# attention implementations that skip masked blocks or take sequence boundaries: one row for the whole batch
VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3", "flex_attention", varlen.NAME)


def pack_kind(model) -> str | None:
    """'decoder' or 'encoder' when the model's scores can be computed packed, else None (padded path)."""
    inner = models.unwrap(model)
    cfg = getattr(inner, "config", None)
    if cfg is None:
        return None
    attn = getattr(cfg, "_attn_implementation", None) or "eager"
    if models.is_encoder(cfg):
        base = getattr(inner, getattr(inner, "base_model_prefix", ""), None)
        pooler = _ENCODER_POOLERS.get(cfg.model_type)
        if pooler and base is not None and isinstance(getattr(base, pooler, None), torch.nn.Module) \
                and attn in ("sdpa", "eager"):
            return "encoder"
        return None
    from transformers.modeling_layers import GenericForSequenceClassification

    if isinstance(inner, GenericForSequenceClassification) and isinstance(getattr(inner, "score", None),
                                                                         torch.nn.Module):
        return "decoder"
    return None


def one_row(model) -> bool:
    """Whether the model's attention kernel skips masked blocks (then a single row holds the whole batch)."""
    cfg = getattr(models.unwrap(model), "config", None)
    return getattr(cfg, "_attn_implementation", None) in VARLEN_ATTENTION


def pack_sequences(seqs: Sequence[np.ndarray], pad_id: int, row_tokens: int | None = None) -> dict:
    """Sequences -> a packed batch (CPU tensors).

    Rows of capacity ``max(row_tokens, longest)`` (``None``: one row for everything), filled first-fit decreasing.
    Returns input_ids, position_ids, seq_ids (int32 [R, W]: the sequence of each token; a row's pad tail has id
    N + row), seq_row, seq_first, seq_last (int64 [N]: where each sequence starts and ends), tokens (real),
    padded_tokens (R x W)."""
    n = len(seqs)
    if n == 0:
        raise ValueError("pack_sequences: no sequences")
    lens = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=n)
    if (lens == 0).any():
        raise ValueError("pack_sequences: an empty sequence has no reward token")
    total = int(lens.sum())
    cap = total if row_tokens is None else max(int(row_tokens), int(lens.max()))
    rows: list[list[int]] = []
    free: list[int] = []
    for i in np.argsort(-lens, kind="stable"):
        L = int(lens[i])
        for r, f in enumerate(free):
            if f >= L:
                rows[r].append(int(i))
                free[r] -= L
                break
        else:
            rows.append([int(i)])
            free.append(cap - L)
    width = max(cap - f for f in free)
    R = len(rows)
    ids = np.full((R, width), pad_id, dtype=np.int64)
    pos = np.zeros((R, width), dtype=np.int64)
    sid = np.empty((R, width), dtype=np.int32)
    seq_row = np.empty(n, dtype=np.int64)
    seq_first = np.empty(n, dtype=np.int64)
    for r, members in enumerate(rows):
        c = 0
        for i in members:
            L = int(lens[i])
            ids[r, c:c + L] = seqs[i]
            pos[r, c:c + L] = np.arange(L)
            sid[r, c:c + L] = i
            seq_row[i], seq_first[i] = r, c
            c += L
        if c < width:  # the tail: a block of pad tokens of its own (never a fully masked query)
            pos[r, c:] = np.arange(width - c)
            sid[r, c:] = n + r
    # the sequence boundaries in the flattened rows (a row's pad tail a segment of its own), for varlen kernels:
    # transformers' FlashAttentionKwargs, handed to every attention layer, computed here on the host
    bounds = [0]
    for r, members in enumerate(rows):
        for i in members:
            bounds.append(bounds[-1] + int(lens[i]))
        if (r + 1) * width > bounds[-1]:
            bounds.append((r + 1) * width)
    seg = np.diff(bounds)
    out = {"cu_seq_lens": torch.from_numpy(np.asarray(bounds, dtype=np.int32)), "max_seqlen": int(seg.max())}
    return {
        **out,
        "input_ids": torch.from_numpy(ids), "position_ids": torch.from_numpy(pos), "seq_ids": torch.from_numpy(sid),
        "seq_row": torch.from_numpy(seq_row), "seq_first": torch.from_numpy(seq_first),
        "seq_last": torch.from_numpy(seq_first + lens - 1), "tokens": total, "padded_tokens": R * width,
    }


def block_mask(seq_ids: torch.Tensor, attn_implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """[R, 1, W, W] block-diagonal attention mask (a token sees the tokens of its own sequence only): boolean
    (True = attend) for sdpa, additive (0 / dtype min) for eager."""
    same = (seq_ids[:, None, :, None] == seq_ids[:, None, None, :])
    if attn_implementation == "sdpa":
        return same
    return torch.zeros(same.shape, dtype=dtype, device=same.device).masked_fill_(~same, torch.finfo(dtype).min)


def forward_scores_packed(model, batch: dict, kind: str | None = None) -> torch.Tensor:
    """The reward of each packed sequence, shape (N,), in sequence order, in the model's dtype.

    ``model`` may be wrapped (DDP, DeepSpeed, peft): the forward pass goes through the wrapper (gradient
    synchronisation, ZeRO-3 parameter gathering), the hooks sit on the unwrapped model's head."""
    kind = kind or pack_kind(model)
    inner = models.unwrap(model)
    rows, first, last = batch["seq_row"], batch["seq_first"], batch["seq_last"]
    if kind == "decoder":
        got: list[torch.Tensor] = []
        handle = inner.score.register_forward_hook(lambda _m, _i, out: got.append(out))
        kw = {}
        if "cu_seq_lens" in batch:  # one row: every attention layer gets the boundaries, nothing recomputes them
            kw = {"cu_seq_lens_q": batch["cu_seq_lens"], "cu_seq_lens_k": batch["cu_seq_lens"],
                  "max_length_q": batch["max_seqlen"], "max_length_k": batch["max_seqlen"]}
        try:
            model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False, **kw)
        finally:
            handle.remove()
        return got[-1][rows, last, 0]
    if kind == "encoder":
        cfg = inner.config
        base = getattr(inner, inner.base_model_prefix)
        head = getattr(base, _ENCODER_POOLERS[cfg.model_type])

        def first_tokens(_m, args):  # the pooler reads hidden[:, 0]: give it each sequence's first token
            return (args[0][rows, first].unsqueeze(1), *args[1:])

        emb = inner.get_input_embeddings().weight
        dtype = emb.dtype if emb.is_floating_point() else torch.float32
        mask = block_mask(batch["seq_ids"], cfg._attn_implementation, dtype)
        handle = head.register_forward_pre_hook(first_tokens)
        try:
            out = model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=batch["position_ids"])
        finally:
            handle.remove()
        return out.logits[:, 0]
    raise ValueError(f"{type(inner).__name__} cannot be scored packed; use models.forward_scores")
