"""Reward models: where the reward is read, padding independence, LoRA save/reload, QLoRA on CPU."""
from __future__ import annotations


import numpy as np
import polars as pl
import pytest
import torch

from worldpm.config import ModelConfig
from worldpm.modeling import models

TINY = {
    "bert": {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
             "intermediate_size": 64, "max_position_embeddings": 512},
    "qwen2": {"model_type": "qwen2", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
              "num_key_value_heads": 1, "intermediate_size": 64, "max_position_embeddings": 512},
}


@pytest.fixture(scope="module")
def tok():
    return models.load_tokenizer("minilm")


@pytest.fixture(scope="module")
def se_texts(se_paired) -> list[str]:
    df = pl.read_parquet(sorted(se_paired.rglob("*.parquet"))[1]).head(12)
    return [q + "\n\n" + a for q, a in zip(df["question"], df["response_j"])]


def tiny_model(kind: str, tok, seed: int = 0):
    torch.manual_seed(seed)
    m = models.build_reward_model({"from_config": TINY[kind], "name_or_path": "minilm"}, tok)
    # a non-zero head so scores differ between sequences
    return m.eval()


def test_minilm_resolves_to_the_packaged_folder():
    d = models.minilm_dir()
    assert (d / "config.json").is_file() and (d / "tokenizer.json").is_file()
    assert models.resolve_name("minilm") == str(d)


@pytest.mark.parametrize("kind", ["bert", "qwen2", "minilm"])
def test_scores_alone_equal_scores_in_padded_batches(kind, tok, se_texts):
    if kind == "minilm":
        model = models.build_reward_model({"name_or_path": "minilm"}, tok).eval()
    else:
        model = tiny_model(kind, tok)
    assert model.config.pad_token_id == tok.pad_token_id
    enc = models.is_encoder(model.config)
    assert enc == (kind != "qwen2")
    # sequences of very different lengths, ending with the tokenizer's [SEP] (the decoder's reward token)
    seqs = [tok(t, truncation=True, max_length=int(n))["input_ids"] for t, n in zip(se_texts, np.linspace(6, 120, 12))]
    assert len({len(s) for s in seqs}) > 6
    alone = np.array([models.score_token_ids(model, [s], tok.pad_token_id)[0] for s in seqs])
    assert np.std(alone) > 0  # the scores say something about the sequence
    for side in ("right", "left"):
        batched = models.score_token_ids(model, seqs, tok.pad_token_id, batch_size=12, padding_side=side)
        np.testing.assert_allclose(batched, alone, rtol=1e-4, atol=1e-5, err_msg=f"{kind} {side} padding")


def test_decoder_reads_the_last_real_token(tok):
    """Changing the token before the padding changes the score; changing a pad id's neighbourhood does not."""
    model = tiny_model("qwen2", tok)
    a = [101, 2000, 2001, 2002, 102]
    b = [101, 2000, 2001, 2002, 103]
    ids, mask, pos = models.pad_sequences([a, b, a[:3]], tok.pad_token_id, side="left", pad_to=8)
    with torch.no_grad():
        r = models.forward_scores(model, ids, mask, pos)
    alone = models.score_token_ids(model, [a, b, a[:3]], tok.pad_token_id, batch_size=1)
    np.testing.assert_allclose(r.numpy(), alone, rtol=1e-4, atol=1e-5)
    assert abs(float(r[0] - r[1])) > 0


def test_to_right_padding_rotates_left_padded_rows():
    ids = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 0]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0]])
    i2, m2 = models.to_right_padding(ids, mask)
    assert i2.tolist() == [[5, 6, 0, 0], [7, 8, 9, 0]]
    assert m2.tolist() == [[1, 1, 0, 0], [1, 1, 1, 0]]


def test_pad_token_is_never_eos():
    class T:
        pad_token = None
        unk_token = None
        eos_token = "<eos>"
        added = None

        def add_special_tokens(self, d):
            self.added = d
            self.pad_token = d["pad_token"]

    t = T()
    models.ensure_pad_token(t)
    assert t.pad_token == "<|pad|>" and t.pad_token != t.eos_token


def test_lora_saved_model_reloads_with_its_head(tmp_path, tok, se_texts):
    """A LoRA model with a trained head, saved as the trainer saves it (merged + adapter), scores the same."""
    from accelerate import Accelerator

    from worldpm.modeling.objectives import build_objective
    from worldpm.modeling.trainer.recipe import build_model
    from worldpm.modeling.trainer.save import save_final

    # the real MiniLM base: an adapter is reloaded on top of its base model (a from_config base has no weights to
    # reload)
    mcfg = ModelConfig(name_or_path="minilm",
                       lora={"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"})
    acc = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = build_model(build_objective({"objective": "bt"}), mcfg, tok, acc)
    assert any("classifier" in n and p.requires_grad for n, p in model.named_parameters())
    # "train": move the LoRA weights and the head away from their initial values
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    model.eval()
    seqs = [tok(t, truncation=True, max_length=40)["input_ids"] for t in se_texts[:6]]
    before = models.score_token_ids(model, seqs, tok.pad_token_id)
    out = tmp_path / "out"
    save_final(acc, model, tok, out / "model", mcfg, "bt")
    assert (out / "model" / "model.safetensors").is_file()
    assert (out / "adapter" / "adapter_config.json").is_file()

    from transformers import AutoModelForSequenceClassification

    merged = AutoModelForSequenceClassification.from_pretrained(out / "model").eval()
    np.testing.assert_allclose(models.score_token_ids(merged, seqs, tok.pad_token_id), before, rtol=1e-4, atol=1e-5)
    again = models.load_reward_model(out)
    np.testing.assert_allclose(models.score_token_ids(again, seqs, tok.pad_token_id), before, rtol=1e-4, atol=1e-5)
    # the adapter folder alone (base + adapter + saved head) gives the same scores
    fresh_head = models.load_reward_model(out / "adapter")
    np.testing.assert_allclose(models.score_token_ids(fresh_head, seqs, tok.pad_token_id), before, rtol=1e-4,
                               atol=1e-5)


def test_qlora_on_cpu_is_a_clear_error(tok):
    from accelerate import Accelerator

    from worldpm.modeling.objectives import build_objective
    from worldpm.modeling.trainer.recipe import build_model
    from worldpm.modeling.trainer.step import TrainingStop

    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    mcfg = ModelConfig(name_or_path="minilm", lora={"enabled": True, "quantize_4bit": True})
    with pytest.raises(TrainingStop, match="needs a CUDA GPU"):
        build_model(build_objective({"objective": "bt"}), mcfg, tok, Accelerator(cpu=True))


def test_a_qwen2_checkpoint_loads_without_hub_kernels(tmp_path):
    """On the H200, transformers 5 with `kernels` installed fetched kernels-community/rotary from the Hub to load a
    Qwen2 checkpoint, and failed offline. worldpm turns hub kernels off unless the user turned them on: a fresh
    process (no USE_HUB_KERNELS) loads a saved tiny Qwen2 with use_kernels off; USE_HUB_KERNELS=YES is honoured."""
    import os
    import subprocess
    import sys

    tok = models.load_tokenizer("minilm")
    spec = {"model_type": "qwen2", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
            "num_key_value_heads": 1, "intermediate_size": 64}
    models.build_reward_model({"from_config": spec}, tok).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    probe = ("import os, sys; from worldpm.modeling import models; "
             "m = models.load_reward_model(sys.argv[1]); print(os.environ['USE_HUB_KERNELS'], m.use_kernels)")
    for env, want in (({}, "NO False"), ({"USE_HUB_KERNELS": "YES"}, "YES True")):
        clean = {k: v for k, v in os.environ.items() if k != "USE_HUB_KERNELS"}
        out = subprocess.run([sys.executable, "-c", probe, str(tmp_path)], env={**clean, **env}, text=True,
                             capture_output=True, check=True).stdout.split("\n")
        assert want in out, out
