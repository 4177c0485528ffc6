"""DPO: the loss variants against a hand computation, the response mask (prompt tokens never count), the cached
reference log-probs against the frozen reference on the fly, the ref_logps cache surviving a beta change, and a tiny
random-initialised causal LM trained with dpo raising its implicit-reward accuracy on train pairs."""
from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch

from worldpm.config import TrainConfig
from worldpm.modeling.dpo import DPO, dpo_loss
from worldpm.modeling.logps import response_mask, sequence_logps

LOG = logging.getLogger("test")
TINY_QWEN_SPEC = {"model_type": "qwen2", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                  "num_key_value_heads": 2, "intermediate_size": 128}


def _logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


# ---- the loss on known log-probs ----------------------------------------------------------------------------------

PI_C, PI_R = [-10.0, -20.0, -5.0], [-12.0, -18.0, -5.0]
REF_C, REF_R = [-11.0, -19.0, -6.0], [-11.5, -19.5, -4.0]


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_dpo_loss_and_rewards_match_a_hand_computation(loss_type):
    beta = 0.5
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    losses, rc, rr = dpo_loss(t(PI_C), t(PI_R), t(REF_C), t(REF_R), beta, loss_type)
    for i in range(3):
        cr, rj = PI_C[i] - REF_C[i], PI_R[i] - REF_R[i]  # log-ratios: (1, -0.5), (-1, 1.5), (1, -1)
        h = cr - rj
        want = {"sigmoid": -_logsig(beta * h), "ipo": (h - 1 / (2 * beta)) ** 2,
                "hinge": max(0.0, 1 - beta * h)}[loss_type]
        assert float(losses[i]) == pytest.approx(want, rel=1e-6)
        assert float(rc[i]) == pytest.approx(beta * cr) and float(rr[i]) == pytest.approx(beta * rj)
    assert losses.dtype == torch.float32 and not rc.requires_grad


def test_dpo_objective_statistics_rpo_and_length_average():
    """compute() on a batch whose policy log-probs are known: a 'model' that returns fixed logits."""
    vocab = 5
    # 2 pairs -> 4 rows of length 4; prompt_len 2: labels at positions 2, 3 count
    ids = torch.tensor([[0, 1, 2, 3], [0, 1, 4, 0], [0, 1, 3, 3], [0, 1, 2, 2]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1]])
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 4, vocab, generator=gen)

    class Fixed(torch.nn.Module):
        def forward(self, input_ids, attention_mask, position_ids=None):
            return type("Out", (), {"logits": logits})()

    lp = torch.log_softmax(logits, -1)
    # by hand: row r's response log-prob = sum over label positions p >= 2 (real tokens) of lp[r, p-1, ids[r, p]]
    hand = []
    for r in range(4):
        ps = [p for p in (2, 3) if mask[r, p]]
        hand.append((sum(float(lp[r, p - 1, ids[r, p]]) for p in ps), len(ps)))
    batch = {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0),
             "prompt_len": torch.tensor([2, 2]), "n_pairs": 2,
             "ref_chosen_logps": torch.tensor([-3.0, -2.0], dtype=torch.float64),
             "ref_rejected_logps": torch.tensor([-4.0, -1.0], dtype=torch.float64)}
    beta = 0.1
    obj = DPO(TrainConfig(objective="dpo", beta=beta, dpo_loss="sigmoid"))
    loss, st = obj.compute(Fixed(), batch)
    pc, pr = [hand[0][0], hand[1][0]], [hand[2][0], hand[3][0]]
    cr = [pc[i] - [-3.0, -2.0][i] for i in range(2)]
    rj = [pr[i] - [-4.0, -1.0][i] for i in range(2)]
    want = np.mean([-_logsig(beta * (cr[i] - rj[i])) for i in range(2)])
    assert float(loss) == pytest.approx(want, rel=1e-5)
    assert float(st["reward_chosen"]) == pytest.approx(beta * np.mean(cr), rel=1e-5)
    assert float(st["reward_rejected"]) == pytest.approx(beta * np.mean(rj), rel=1e-5)
    assert float(st["margin"]) == pytest.approx(beta * np.mean(np.subtract(cr, rj)), rel=1e-5)
    assert float(st["accuracy"]) == np.mean([cr[i] > rj[i] for i in range(2)])
    assert float(st["logps_chosen"]) == pytest.approx(np.mean(pc), rel=1e-5)
    assert float(st["kl"]) == pytest.approx(np.mean(cr + rj), rel=1e-5)

    # RPO: + alpha * NLL per chosen response token
    loss_rpo, _ = DPO(TrainConfig(objective="dpo", beta=beta, rpo_alpha=0.5)).compute(Fixed(), batch)
    nll = -(pc[0] + pc[1]) / (hand[0][1] + hand[1][1])
    assert float(loss_rpo) == pytest.approx(want + 0.5 * nll, rel=1e-5)

    # length-averaged: policy and reference both divided by the response token count (row 1 has one token)
    loss_avg, _ = DPO(TrainConfig(objective="dpo", beta=beta, logp_average=True)).compute(Fixed(), batch)
    n = [h[1] for h in hand]
    cra = [pc[i] / n[i] - [-3.0, -2.0][i] / n[i] for i in range(2)]
    rja = [pr[i] / n[2 + i] - [-4.0, -1.0][i] / n[2 + i] for i in range(2)]
    want_avg = np.mean([-_logsig(beta * (cra[i] - rja[i])) for i in range(2)])
    assert float(loss_avg) == pytest.approx(want_avg, rel=1e-5)


# ---- prompt tokens never count ------------------------------------------------------------------------------------

def test_response_mask_skips_prompt_and_padding_either_side():
    # row 0: right-padded, 5 real tokens, prompt 3; row 1: left-padded, 4 real tokens, prompt 2
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    m = response_mask(mask, pos, torch.tensor([3, 2]))
    # label columns 1..5: row 0 counts tokens at positions 3, 4 (columns 3, 4); row 1 positions 2, 3 (cols 4, 5)
    assert m.tolist() == [[False, False, True, True, False], [False, False, False, True, True]]
    assert response_mask(mask, None, torch.tensor([3, 2])).tolist() == m.tolist()
    # prompt_len 0 counts from the second token: the first has nothing to predict it
    assert response_mask(mask[:1], None, torch.tensor([0])).tolist() == [[True, True, True, True, False]]


def tiny_lm(vocab: int = 50, seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(TINY_QWEN_SPEC)
    cfg = AutoConfig.for_model(spec.pop("model_type"), vocab_size=vocab, pad_token_id=0, **spec)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).eval()


def test_prompt_tokens_never_count_and_padding_side_does_not_matter():
    model = tiny_lm()
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(1, 50, (6,), generator=g)
    resp = torch.randint(1, 50, (5,), generator=g)
    seq = torch.cat([prompt, resp])[None]
    mask = torch.ones_like(seq)
    pl = torch.tensor([6])
    with torch.no_grad():
        s, c = sequence_logps(model, seq, mask, None, pl)
        full = torch.log_softmax(model(input_ids=seq).logits[0, :-1].float(), -1)
        hand = sum(float(full[p - 1, seq[0, p]]) for p in range(6, 11))
    assert int(c) == 5 and float(s) == pytest.approx(hand, rel=1e-5)
    # the logits at prompt positions (except the last one, which predicts the first response token) do not
    # matter: the same response log-prob whatever those logits are
    class Scrambled(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, **kw):
            kw.pop("logits_to_keep", None)
            out = self.inner(**kw)
            logits = out.logits.clone()
            logits[:, :5] = torch.randn_like(logits[:, :5]) * 100
            return type("Out", (), {"logits": logits})()

    with torch.no_grad():
        s2, _ = sequence_logps(Scrambled(model), seq, mask, None, pl)
    assert float(s2) == pytest.approx(float(s), rel=1e-6)
    # padded in a batch with a longer row, right and left: the same value
    other = torch.randint(1, 50, (1, 15), generator=g)
    for side in ("right", "left"):
        ids = torch.zeros(2, 15, dtype=torch.long)
        am = torch.zeros(2, 15, dtype=torch.long)
        ids[1], am[1] = other[0], 1
        if side == "right":
            ids[0, :11], am[0, :11] = seq[0], 1
        else:
            ids[0, 4:], am[0, 4:] = seq[0], 1
        pos = (am.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            sb, cb = sequence_logps(model, ids, am, pos, torch.tensor([6, 3]))
        assert int(cb[0]) == 5 and float(sb[0]) == pytest.approx(float(s), abs=1e-4)


# ---- the stage, the trainer and evaluate on real pairs (tiny random-initialised Qwen2, MiniLM's tokenizer) -------

TINY_QWEN = ("{model_type: qwen2, hidden_size: 64, num_hidden_layers: 2, num_attention_heads: 4, "
             "num_key_value_heads: 2, intermediate_size: 128}")
DPO_SETTINGS = [f"model.from_config={TINY_QWEN}", "tokenize.max_length=48", "train.objective=dpo",
                "train.beta=0.1", "train.batch_size=8", "train.max_steps=20", "train.lr=3e-3",
                "train.warmup_ratio=0.0", "train.log_every=5", "train.checkpoint_every=1000",
                "train.eval_max_pairs=16", "evaluate.batch_size=32"]


def dpo_cfg(*extra: str):
    from worldpm.config import load_config

    return load_config(None, [*DPO_SETTINGS, *extra])


@pytest.fixture(scope="module")
def dpo_setup(tmp_path_factory, se_paired):
    """240 real StackExchange pairs sharded, tokenized (max_length 64) and their reference log-probs cached."""
    from tasks import PIPELINE as pipeline
    from worldpm.store import ArtifactStore

    from support import se_shard

    store = ArtifactStore(tmp_path_factory.mktemp("dpo") / "store")
    cfg = dpo_cfg()
    shard = se_shard(store, se_paired, cfg, head=240)
    tok = pipeline.execute("tokenize", cfg, {"shard": shard}, store, log=LOG)
    ref = pipeline.execute("ref_logps", cfg, {"tokenize": tok.ref}, store, log=LOG)
    assert ref.status == "ran"
    return store, cfg, shard, tok.ref, ref


def test_prompt_len_marks_where_the_response_starts(dpo_setup):
    """tokenize's prompt_len: the tokens after it are the response (then the end marker), for both sides."""
    import polars as pl

    from worldpm.modeling import models
    from worldpm.data.splits import data_files, read_split

    _, _, shard, tok_ref, _ = dpo_setup
    tokzr = models.load_tokenizer(f"{tok_ref.path}/tokenizer")
    t = read_split(tok_ref, "train")
    src = pl.read_parquet(data_files(shard)["train"]).select("pair_id", "chosen", "rejected")
    t = t.join(src, on="pair_id", how="left", maintain_order="left").head(60)
    tail = 1  # MiniLM's plain template ends with [SEP]
    for row in t.iter_rows(named=True):
        p = row["prompt_len"]
        assert row["chosen_ids"][:p] == row["rejected_ids"][:p]  # one prompt cut for both sides
        for side in ("chosen", "rejected"):
            ids = row[f"{side}_ids"]
            kept = ids[p:len(ids) - tail]
            resp = tokzr(row[side], add_special_tokens=False)["input_ids"]
            assert 0 < len(kept) <= len(resp) and kept == resp[-len(kept):]  # the response's end, nothing else


def test_cached_reference_logps_equal_the_frozen_reference_on_the_fly(dpo_setup):
    """The stage's numbers = the policy as the trainer builds it (before any step) scoring a trainer batch; so at
    step 0 every implicit reward is 0 and the sigmoid loss is log 2."""
    from pathlib import Path

    import polars as pl

    from worldpm.data.splits import read_split
    from worldpm.modeling import models
    from worldpm.modeling.trainer.data import collate_pairs, load_pairs

    store, cfg, _, tok_ref, ref = dpo_setup
    cached = read_split(ref.ref, "train")
    tokd = pl.read_parquet(Path(tok_ref.path) / "train.parquet")
    assert cached["pair_id"].to_list() == tokd["pair_id"].to_list()
    assert cached.schema["ref_chosen_logp"] == pl.Float64
    assert (cached["chosen_tokens"] == tokd["chosen_len"] - tokd["prompt_len"].clip(lower_bound=1)).all()
    assert (cached["ref_chosen_logp"] < 0).all() and (cached["ref_rejected_logp"] < 0).all()
    tokzr = models.load_tokenizer(f"{tok_ref.path}/tokenizer")
    obj = DPO(cfg.train)
    model = obj.build_model(cfg.model.model_dump(mode="json"), tokzr).eval()
    data = load_pairs(Path(tok_ref.path) / "train.parquet", ref_path=Path(ref.ref.path) / "train.parquet")
    idx = list(range(5, 29))  # a trainer batch: other pairs, other padding than the stage's batches
    batch = collate_pairs(data, idx, tokzr.pad_token_id)
    with torch.no_grad():
        sums, counts = obj.policy_logps(model, batch)
        loss, st = obj.compute(model, batch)
    np.testing.assert_allclose(sums[:24].numpy(), cached["ref_chosen_logp"].to_numpy()[idx], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(sums[24:].numpy(), cached["ref_rejected_logp"].to_numpy()[idx], rtol=1e-5, atol=1e-4)
    assert counts[:24].tolist() == cached["chosen_tokens"].to_numpy()[idx].tolist()
    assert float(loss) == pytest.approx(math.log(2), abs=1e-4)
    assert abs(float(st["reward_chosen"])) < 1e-4 and abs(float(st["kl"])) < 1e-3


def implicit_accuracy(model, obj: DPO, data, pad_id: int) -> tuple[float, float]:
    """(accuracy of beta * log pi/ref over all pairs, ties counted half; the largest |reward|), on the model's
    device."""
    from worldpm.modeling.trainer.data import collate_pairs

    dev = next(model.parameters()).device
    rc, rr = [], []
    for lo in range(0, len(data), 32):
        b = collate_pairs(data, list(range(lo, min(lo + 32, len(data)))), pad_id)
        b = {k: v.to(dev) if torch.is_tensor(v) else v for k, v in b.items()}
        with torch.no_grad():  # beta * (log pi - log ref) of the chosen and the rejected responses
            sums, counts = obj.policy_logps(model, b)
            ref = torch.cat([b["ref_chosen_logps"], b["ref_rejected_logps"]]).float()
            r = obj.beta * (obj.scores(sums.float(), counts) - obj.scores(ref, counts))
        rc.append(r[:b["n_pairs"]])
        rr.append(r[b["n_pairs"]:])
    c, r = torch.cat(rc), torch.cat(rr)
    acc = float(((c > r).float() + 0.5 * (c == r).float()).mean())
    return acc, float(torch.cat([c, r]).abs().max())


def data_ref_sums(data) -> torch.Tensor:
    """Every cached reference log-prob sum of the loaded pairs."""
    from worldpm.modeling.trainer.data import collate_pairs

    b = collate_pairs(data, list(range(len(data))), 0)
    return torch.cat([b["ref_chosen_logps"], b["ref_rejected_logps"]]).float()


@pytest.mark.slow
def test_tiny_lm_trained_with_dpo_raises_implicit_reward_accuracy(dpo_setup):
    """Train 20 steps with dpo: the implicit-reward accuracy on train pairs rises from chance (policy = reference:
    every reward 0); evaluate reports it on the test split; another beta reuses the cached ref_logps."""
    import json
    from pathlib import Path

    from tasks import PIPELINE as pipeline
    from worldpm.modeling import models
    from support import curve
    from worldpm.modeling.logps import load_causal_lm
    from worldpm.modeling.trainer.data import load_pairs

    store, cfg, _, tok_ref, ref = dpo_setup
    tokzr = models.load_tokenizer(f"{tok_ref.path}/tokenizer")
    data = load_pairs(Path(tok_ref.path) / "train.parquet", ref_path=Path(ref.ref.path) / "train.parquet")
    obj = DPO(cfg.train)
    made = json.loads((Path(ref.ref.path) / "manifest.json").read_text())  # the reference's device and dtype
    policy = obj.build_model(cfg.model.model_dump(mode="json"), tokzr).to(made["device"], getattr(torch, made["dtype"]))
    before = implicit_accuracy(policy.eval(), obj, data, tokzr.pad_token_id)
    # policy = reference before training: every implicit reward is 0 up to rounding. fp32 (the CPU): 1e-4. bf16 (a GPU
    # runs the reference in bf16): a bf16 forward pass over other batches rounds each log-prob sum differently, by
    # about 1% of it (measured on the H200: 4.1 nats on sums up to 251, beta 0.1 -> 0.41): bound at 2^-5 of it.
    biggest = float(data_ref_sums(data).abs().max())
    tol = 1e-4 if made["dtype"] == "float32" else obj.beta * biggest * 2**-5
    res = pipeline.execute("train", cfg, {"tokenize": tok_ref, "ref_logps": ref.ref}, store, log=LOG)
    out = Path(res.ref.path)
    steps = curve(out)
    assert {"loss", "accuracy", "margin", "reward_chosen", "logps_chosen", "kl"} <= steps[-1].keys()
    after = implicit_accuracy(load_causal_lm(out), obj, data, tokzr.pad_token_id)
    print(f"dpo: {len(data)} train pairs, implicit-reward accuracy {before[0]:.3f} (max |reward| {before[1]:.1e}) "
          f"-> {after[0]:.3f} (max |reward| {after[1]:.2f}); loss {steps[0]['loss']:.4f} -> {steps[-1]['loss']:.4f}")
    assert before[1] < tol, (before, tol, made)
    assert after[0] > 0.7
    assert json.loads((out / "train_summary.json").read_text())["objective"] == "dpo"

    # evaluate: implicit reward accuracy on the test split, with the cached reference
    ev = pipeline.execute("evaluate", cfg, {"tokenize": tok_ref, "train": res.ref, "ref_logps": ref.ref}, store,
                          log=LOG)
    m = json.loads((Path(ev.ref.path) / "metrics.json").read_text())
    assert m["test"]["score"] == "dpo_implicit_reward" and m["test"]["beta"] == 0.1 and m["test"]["n"] > 0
    assert 0.0 <= m["test"]["accuracy"] <= 1.0

    # another beta: the reference log-probs are reused (same key, cached); only train's key moves
    cfg2 = dpo_cfg("train.beta=0.5", "train.lr=1e-3")
    again = pipeline.execute("ref_logps", cfg2, {"tokenize": tok_ref}, store, log=LOG)
    assert again.status == "cached" and again.key == ref.key
    key2, _ = pipeline.resolve("train", cfg2, {"tokenize": tok_ref, "ref_logps": again.ref})
    assert key2 != res.key


def test_bt_ref_logps_is_a_constant_marker(dpo_setup):
    """With objective bt the stage computes nothing and its artifact digest does not depend on DPO settings, so the
    BT train key stays put when beta or the reference change."""
    from tasks import PIPELINE as pipeline

    store, _, _, tok_ref, _ = dpo_setup
    from worldpm.config import load_config

    a = pipeline.execute("ref_logps", load_config(None, []), {"tokenize": tok_ref}, store, log=LOG)
    b = pipeline.execute("ref_logps", load_config(None, ["train.beta=0.7"]), {"tokenize": tok_ref}, store, log=LOG)
    assert a.key == b.key and b.status == "cached" and a.manifest["objective"] == "bt"
    k1, _ = pipeline.resolve("train", load_config(None, []), {"tokenize": tok_ref, "ref_logps": a.ref})
    k2, _ = pipeline.resolve("train", load_config(None, ["train.beta=0.7", "train.dpo_loss=ipo"]),
                             {"tokenize": tok_ref, "ref_logps": b.ref})
    assert k1 == k2


def test_dpo_with_an_encoder_model_is_refused():
    from tasks import ref_logps
    from worldpm.config import load_config
    from worldpm.errors import ConfigError

    with pytest.raises(ConfigError, match="needs a causal LM"):
        ref_logps.stage_config(load_config(None, ["train.objective=dpo"]))


def test_dpo_preset_validates_and_keys_the_reference_apart_from_beta():
    from pathlib import Path

    from tasks import ref_logps
    from worldpm.config import load_config

    path = Path(__file__).resolve().parents[1] / "configs" / "qwen2.5-0.5b-dpo.yaml"
    cfg = load_config(path)
    assert cfg.train.objective == "dpo" and cfg.train.beta == 0.1
    sc = ref_logps.stage_config(cfg)
    assert sc.reference.name_or_path == cfg.model.name_or_path  # the same checkpoint, frozen
    assert ref_logps.stage_config(load_config(path, ["train.beta=0.5", "train.lr=1e-6", "train.dpo_loss=ipo"])) == sc
    other = ref_logps.stage_config(load_config(path, ["train.reference=Qwen/Qwen2.5-1.5B-Instruct"]))
    assert other.reference.name_or_path == "Qwen/Qwen2.5-1.5B-Instruct"
