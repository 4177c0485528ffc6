"""Padding-free (packed) batches: the same scores and gradients as padded batches, a sequence's score independent of
what it was packed with, the layout itself, and reading a model's config through wrappers."""
from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch

from worldpm.modeling import models, packing
from worldpm.modeling.objectives import bt_loss

TINY = {
    "bert": {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
             "intermediate_size": 64, "max_position_embeddings": 512},
    "qwen2": {"model_type": "qwen2", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "intermediate_size": 64, "max_position_embeddings": 512},
}
NO_DROPOUT = {"bert": {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0},
              "qwen2": {"attention_dropout": 0.0}}


@pytest.fixture(scope="module")
def tok():
    return models.load_tokenizer("minilm")


@pytest.fixture(scope="module")
def seqs(tok, se_paired) -> list[np.ndarray]:
    """16 real StackExchange question + answer texts, cut to lengths from 5 to 200 tokens."""
    df = pl.read_parquet(sorted(se_paired.rglob("*.parquet"))[0]).head(16)
    texts = [q + "\n\n" + a for q, a in zip(df["question"], df["response_j"])]
    cuts = np.linspace(5, 200, len(texts)).astype(int)
    return [np.asarray(tok(t, truncation=True, max_length=int(n))["input_ids"]) for t, n in zip(texts, cuts)]


def build(kind: str, tok, attn: str = "sdpa", seed: int = 0, dropout: bool = True):
    torch.manual_seed(seed)
    if kind == "minilm":
        return models.build_reward_model({"name_or_path": "minilm", "attn_implementation": attn}, tok)
    spec = {**TINY[kind], **({} if dropout else NO_DROPOUT[kind])}
    return models.build_reward_model({"from_config": spec, "attn_implementation": attn}, tok)


def padded_scores(model, seqs, pad_id, side):
    ids, mask, pos = models.pad_sequences(seqs, pad_id, side=side)
    return models.forward_scores(model, ids, mask, pos)


@pytest.mark.parametrize("kind,attn", [("minilm", "sdpa"), ("bert", "eager"), ("qwen2", "sdpa"),
                                       ("qwen2", "eager"), ("qwen2", "worldpm_varlen")])
def test_packed_scores_equal_padded_scores(kind, attn, tok, seqs):
    """fp32, eval mode (so a decoder's KV cache is on by default: packing must turn it off), left and right
    padding against one row and against rows as wide as the longest sequence. worldpm_varlen (torch's varlen
    flash attention on CUDA, its per-sequence reference here) against the same weights under sdpa."""
    model = build(kind, tok, attn).eval()
    reference = build(kind, tok, "sdpa").eval() if attn == "worldpm_varlen" else model
    kind_found = packing.pack_kind(model)
    assert kind_found == ("decoder" if kind == "qwen2" else "encoder")
    with torch.no_grad():
        for side in ("right", "left"):
            want = padded_scores(reference, seqs, tok.pad_token_id, side)
            if attn == "worldpm_varlen":  # its own padded path (right padding, a row one sequence) agrees too
                np.testing.assert_allclose(padded_scores(model, seqs, tok.pad_token_id, side).numpy(), want.numpy(),
                                           atol=1e-4, rtol=0)
            assert float(want.std()) > 0  # scores that say something about the sequence
            for row_tokens in ((0, 300) if kind == "minilm" else (None, 0, 300)):  # (one MiniLM row: slow on CPU)
                b = packing.pack_sequences(seqs, tok.pad_token_id, row_tokens)
                got = packing.forward_scores_packed(model, b)
                np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-4, rtol=0,
                                           err_msg=f"{kind} {attn} {side} rows={row_tokens}")


def test_varlen_feeds_the_flash_kernel_half_precision_under_autocast(tok, seqs, monkeypatch):
    """On the H200, plain bf16 training (fp32 weights, autocast) through worldpm_varlen stopped at step 1 with
    "FlashAttention only support fp16 and bf16 data type": q and k leave the rotary embedding in fp32. Here a
    stand-in for torch's varlen kernel holds the kernel's contract (one half dtype for q, k, v) and computes with
    the per-sequence reference: under CPU autocast the packed scores and gradients run and match sdpa's."""
    from worldpm.modeling import varlen

    seen = []

    def kernel(q, k, v, cu_q, cu_k, max_q, max_k, scale=None, is_causal=True, enable_gqa=False):
        if not (q.dtype == k.dtype == v.dtype and q.dtype in (torch.float16, torch.bfloat16)):
            raise RuntimeError("FlashAttention only support fp16 and bf16 data type")
        seen.append(q.dtype)
        return varlen._segments(q, k, v, cu_q, scale, is_causal)

    monkeypatch.setattr(varlen, "_kernel_for", lambda q: (kernel, frozenset({"scale", "is_causal", "enable_gqa"})))
    model, reference = build("qwen2", tok, "worldpm_varlen", dropout=False), build("qwen2", tok, dropout=False)
    b = packing.pack_sequences(seqs, tok.pad_token_id, None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = packing.forward_scores_packed(model, b)
        want = packing.forward_scores_packed(reference, b)
        got.float().sum().backward()
    assert seen and set(seen) == {torch.bfloat16}
    np.testing.assert_allclose(got.float().detach().numpy(), want.float().detach().numpy(), atol=0.05, rtol=0)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="takes fp16/bf16"):  # fp32 without autocast: one line, the knobs named
        packing.forward_scores_packed(model, b)


@pytest.mark.parametrize("kind", ["bert", "qwen2"])
def test_a_sequence_score_does_not_depend_on_what_it_is_packed_with(kind, tok, seqs):
    model = build(kind, tok).eval()
    pad = tok.pad_token_id
    target = seqs[7]
    rng = np.random.default_rng(0)
    with torch.no_grad():
        alone = float(packing.forward_scores_packed(model, packing.pack_sequences([target], pad))[0])
        got = []
        for trial in range(5):
            others = [seqs[i] for i in rng.choice([i for i in range(len(seqs)) if i != 7], size=6, replace=False)]
            pos = int(rng.integers(0, 7))
            batch = others[:pos] + [target] + others[pos:]
            b = packing.pack_sequences(batch, pad, None if trial % 2 else 0)
            got.append(float(packing.forward_scores_packed(model, b)[pos]))
    np.testing.assert_allclose(got, alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["bert", "qwen2"])
def test_packed_bt_gradients_equal_padded_gradients(kind, tok, seqs):
    """Training mode (dropout off): the BT loss of 4 pairs and every weight's gradient agree packed and padded."""
    model = build(kind, tok, dropout=False).train()
    pad = tok.pad_token_id
    pairs = seqs[:4] + seqs[8:12]  # 4 chosen then 4 rejected

    def grads(packed: bool):
        model.zero_grad()
        if packed:
            r = packing.forward_scores_packed(model, packing.pack_sequences(pairs, pad, 0))
        else:
            r = padded_scores(model, pairs, pad, "right")
        loss = bt_loss(r[:4], r[4:])
        loss.backward()
        return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    lp, gp = grads(True)
    lu, gu = grads(False)
    assert lp == pytest.approx(lu, abs=1e-5)
    assert gp.keys() == gu.keys() and len(gp) > 10
    for n in gp:
        torch.testing.assert_close(gp[n], gu[n], atol=1e-5, rtol=1e-4, msg=n)


def test_pack_layout_rows_positions_and_pad_blocks():
    seqs = [np.arange(1, n + 1) for n in (7, 3, 5, 2, 6)]
    b = packing.pack_sequences(seqs, pad_id=0, row_tokens=8)
    assert b["input_ids"].shape == (3, 8) and b["tokens"] == 23 and b["padded_tokens"] == 24
    for i, s in enumerate(seqs):
        r, f, last = int(b["seq_row"][i]), int(b["seq_first"][i]), int(b["seq_last"][i])
        assert b["input_ids"][r, f:last + 1].tolist() == s.tolist()
        assert b["position_ids"][r, f:last + 1].tolist() == list(range(len(s)))
        assert set(b["seq_ids"][r, f:last + 1].tolist()) == {i}
    # first-fit decreasing: [7 + 1 pad], [6, 2], [5, 3]; the boundaries over the flattened rows, pad tail included
    assert b["cu_seq_lens"].tolist() == [0, 7, 8, 14, 16, 21, 24] and b["max_seqlen"] == 7
    # a row's unused tail is a block of its own (positions from 0), so no query has every key masked
    mask = packing.block_mask(b["seq_ids"], "sdpa", torch.float32)
    assert bool(mask.any(-1).all())
    one = packing.pack_sequences(seqs, pad_id=0)
    assert one["input_ids"].shape == (1, 23) and one["padded_tokens"] == 23
    with pytest.raises(ValueError, match="empty sequence"):
        packing.pack_sequences([np.arange(3), np.arange(0)], 0)


def test_models_that_cannot_pack_are_named(tok):
    roberta = models.build_reward_model({"from_config": {**TINY["bert"], "model_type": "roberta"}}, tok)
    assert packing.pack_kind(roberta) is None  # its positions are offset by the pad id: the padded path
    flex_bert = build("bert", tok, attn="eager")
    flex_bert.config._attn_implementation = "flex_attention"
    assert packing.pack_kind(flex_bert) is None
    qwen = build("qwen2", tok)
    assert packing.pack_kind(qwen) == "decoder" and not packing.one_row(qwen)
    assert packing.one_row(build("qwen2", tok, attn="worldpm_varlen"))


class DeepSpeedEngine(torch.nn.Module):
    """What matters of deepspeed's engine here: the model is `.module`, and `.config` is DeepSpeed's dict."""

    def __init__(self, module):
        super().__init__()
        self.module = module
        self.config = {"train_micro_batch_size_per_gpu": 4}

    def forward(self, *a, **k):
        return self.module(*a, **k)


def test_config_and_scores_read_through_wrappers(tok, seqs):
    from peft import LoraConfig, TaskType, get_peft_model

    model = build("qwen2", tok).eval()
    lora = get_peft_model(build("qwen2", tok), LoraConfig(task_type=TaskType.SEQ_CLS, r=4, target_modules="all-linear",
                                                           modules_to_save=["score"])).eval()
    for wrapped, inner in ((DeepSpeedEngine(model), model), (DeepSpeedEngine(lora), lora.get_base_model())):
        assert models.unwrap(wrapped) is inner and models.config_of(wrapped) is inner.config
        assert packing.pack_kind(wrapped) == "decoder"
        with torch.no_grad():
            want = padded_scores(wrapped, seqs[:6], tok.pad_token_id, "left")
            got = packing.forward_scores_packed(wrapped, packing.pack_sequences(seqs[:6], tok.pad_token_id))
        np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-4, rtol=0)
    p = torch.nn.Parameter(torch.empty(0))
    p.ds_numel = 1234  # a ZeRO-3 partition: numel() is the local (empty) part
    assert models.parameter_count(p) == 1234 and models.parameter_count(torch.nn.Parameter(torch.ones(3, 2))) == 6
