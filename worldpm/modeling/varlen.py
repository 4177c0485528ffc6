"""``attn_implementation: worldpm_varlen``: attention over sequences packed end to end in one row, each sequence
attending only to itself, through PyTorch's own variable-length flash attention (``torch.nn.attention.varlen``)
on CUDA: no mask, no padding, no T^2 anything.

Registered with transformers' AttentionInterface (``register()``; models.build_reward_model and load_reward_model
call it for a model configured so). The packed batch carries the sequence boundaries (``cu_seq_lens_q/k``,
``max_length_q/k``: transformers' own FlashAttentionKwargs, passed down to every attention layer), computed on the
host when the batch is collated, so no layer syncs with the host to find them. No mask function is registered,
so transformers' mask code returns None at once: it neither builds a mask nor scans ``position_ids`` for packed
boundaries (a host sync per forward pass on the sdpa path).

Without CUDA (or on a torch without ``varlen_attn``) the same contract runs as a loop of SDPA calls, one per
sequence: exact, slow, for tests. A batch without boundaries (padded rows) is read as one causal sequence a row,
which is right for right padding (a causal token never sees the pads after it); models.forward_scores turns
left-padded batches into right-padded ones for such a model.
"""
from __future__ import annotations

import inspect
from functools import lru_cache

import torch
import torch.nn.functional as F

NAME = "worldpm_varlen"


def register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, varlen_attention)


@lru_cache(maxsize=1)
def _kernel():
    """(torch's varlen_attn, the names of its parameters), or None where it is missing."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def _segments(q, k, v, cu: torch.Tensor, scale: float | None, causal: bool) -> torch.Tensor:
    """Reference: one SDPA call per sequence. q [T, H, D], k/v [T, Hkv, D] -> [T, H, D]."""
    out = torch.empty_like(q)
    bounds = cu.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        if e > s:
            o = F.scaled_dot_product_attention(q[s:e].transpose(0, 1), k[s:e].transpose(0, 1), v[s:e].transpose(0, 1),
                                               is_causal=causal, scale=scale, enable_gqa=True)
            out[s:e] = o.transpose(0, 1)
    return out


def _kernel_for(q: torch.Tensor):
    """The flash kernel for q's device, or None (the SDPA loop then)."""
    return _kernel() if q.is_cuda else None


HALF = (torch.float16, torch.bfloat16)


def _half(q, k, v):
    """Flash attention takes fp16/bf16 only. Under autocast (train.precision bf16 on fp32 weights) q and k leave
    the rotary embedding in fp32 (its cos/sin are fp32) while v leaves its linear layer in bf16: all three go to
    autocast's dtype, as transformers' own flash-attention path does. fp32 without autocast cannot use the kernel."""
    if q.dtype in HALF and k.dtype == q.dtype and v.dtype == q.dtype:
        return q, k, v
    dev = q.device.type
    if torch.is_autocast_enabled(dev):
        want = torch.get_autocast_dtype(dev)
    elif v.dtype in HALF:
        want = v.dtype
    else:
        raise ValueError(f"{NAME} runs torch's flash attention, which takes fp16/bf16, and this model runs in "
                         f"{q.dtype} without autocast: set train.precision=bf16 or model.attn_implementation=sdpa")
    return q.to(want), k.to(want), v.to(want)


def flat_attention(q, k, v, cu: torch.Tensor, max_len: int, scale: float | None, causal: bool) -> torch.Tensor:
    """Attention within each sequence [cu[i], cu[i+1]) of flat q [T, H, D], k/v [T, Hkv, D]."""
    kernel = _kernel_for(q)
    if kernel is None:
        return _segments(q, k, v, cu, scale, causal)
    fn, params = kernel
    q, k, v = _half(q, k, v)
    kw: dict = {"scale": scale}
    if "window_size" in params:
        kw["window_size"] = (-1, 0) if causal else (-1, -1)
    elif "is_causal" in params:
        kw["is_causal"] = causal
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in params:
            kw["enable_gqa"] = True
        else:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    cu = cu.to(device=q.device, dtype=torch.int32)
    return fn(q, k, v, cu, cu, max_len, max_len, **kw)


def varlen_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                     cu_seq_lens_q: torch.Tensor | None = None, max_length_q: int | None = None, **kwargs):
    """transformers' attention-function contract: query [B, H, T, D], key/value [B, Hkv, T, D] ->
    ([B, T, H, D], None)."""
    if dropout:
        raise ValueError(f"{NAME} has no attention dropout (config attention_dropout={dropout}); set it to 0")
    B, H, T, D = query.shape
    causal = bool(getattr(module, "is_causal", True))
    if cu_seq_lens_q is None:  # padded rows: each row one sequence (right padding)
        cu = torch.arange(0, (B + 1) * T, T, dtype=torch.int32, device=query.device)
        max_len = T
    else:  # packed: the boundaries over the flattened rows (packing.pack_sequences)
        cu, max_len = cu_seq_lens_q, int(max_length_q or T)
    q = query.transpose(1, 2).reshape(B * T, H, D)
    k = key.transpose(1, 2).reshape(B * T, key.shape[1], D)
    v = value.transpose(1, 2).reshape(B * T, value.shape[1], D)
    out = flat_attention(q, k, v, cu, max_len, scaling, causal)
    return out.reshape(B, T, H, D), None
