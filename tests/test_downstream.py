"""The exported model folder works as a reward model downstream, loaded the way TRL's online trainers load one.

TRL (read at github.com/huggingface/trl, trl/trainer/grpo_trainer.py and trl/experimental/utils.py, 2026-07):
* GRPO (and RLOO / online DPO alike): ``AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)``;
  the tokenizer ``AutoTokenizer.from_pretrained(config._name_or_path)``; if it has no pad token, the pad token
  becomes eos; ``model.config.pad_token_id = tokenizer.pad_token_id``; then texts (prompt + completion, or the chat
  template of the messages) -> ``tokenizer(text=texts, return_tensors="pt", padding=True, padding_side="right",
  add_special_tokens=False)`` -> ``model(**inputs).logits[:, 0]``.
* PPO: ``get_reward(model, query_responses, pad_token_id, context_length)``: the backbone
  (``getattr(model, model.base_model_prefix)``) on the right-padded ids with position ids from the mask,
  ``model.score`` on the last hidden states, read at the last token before the first pad after the context.
trl is not a dependency: both paths are written out here as TRL writes them (and, when trl is installed, its own
``get_reward`` is checked too). The model is exported by the real train stage (two steps of a tiny encoder and a
tiny decoder), and the scores are those of `worldpm score`.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from flows import cli
from support import LOG, TINY_QWEN, tiny_cfg, train_inputs
from tasks import PIPELINE as pipeline
from worldpm.data.render import Renderer, renderer
from worldpm.data.textpath import RenderSettings

ROWS = [
    {"prompt": "How long should a lager ferment?", "response": "Two to three weeks at 10 C, then lager it cold."},
    {"prompt": "Is dry hopping worth it?", "response": "Yes, for aroma."},
    {"prompt": "<p>What is a <b>Trappist</b> beer &amp; who brews it?</p>",
     "response": "<p>Beer brewed inside a Trappist monastery, under the monks' control.</p>"},
]


def grpo_reward_model(model_dir: Path):
    """TRL's GRPO reward-model setup, written out (grpo_trainer.py, "Reward functions" / "Reward processing class")."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model, info = AutoModelForSequenceClassification.from_pretrained(str(model_dir), num_labels=1,
                                                                     output_loading_info=True)
    tok = AutoTokenizer.from_pretrained(model.config._name_or_path)
    eos_fallback = tok.pad_token_id is None
    if eos_fallback:
        tok.pad_token = tok.eos_token
    model.config.pad_token_id = tok.pad_token_id
    return model.eval(), tok, info, eos_fallback


def full_text(r: Renderer, prompt: list[dict], response: str) -> str:
    """One side as a single string with its special tokens written out ("[CLS]...[SEP]" for BERT, the chat
    template's markers without the trailing newline after the end marker): what a GRPO user hands the reward model,
    which tokenizes it with add_special_tokens=False. Before any cut at max_length; normalised by the caller."""
    if r.chat:
        return r.render(prompt, response).rstrip()
    msgs = [{"role": m["role"], "content": m["content"] or ""} for m in prompt]
    if len(msgs) == 1 and msgs[0]["role"] == "user":
        body = msgs[0]["content"]
    else:
        body = "\n\n".join(f"{m['role'].title()}: {m['content']}" for m in msgs)
    specials = lambda ids: "".join(r.tok.convert_ids_to_tokens(ids))  # noqa: E731
    tail_special = r.tail_ids[len(r.encode(r.suffix_text)):] if r.suffix_text else r.tail_ids
    return specials(r.head_ids) + r.head_text + body + r.mid_text + response + r.suffix_text + specials(tail_special)


def grpo_rewards(model, tok, texts: list[str]) -> np.ndarray:
    inputs = tok(text=texts, return_tensors="pt", padding=True, padding_side="right", add_special_tokens=False)
    with torch.inference_mode():
        return model(**inputs).logits[:, 0].float().numpy()


def ppo_rewards(model, query_responses: torch.Tensor, pad_token_id: int, context_length: int) -> np.ndarray:
    """TRL's get_reward (trl/experimental/utils.py), written out."""
    attention_mask = query_responses != pad_token_id
    position_ids = attention_mask.cumsum(1) - attention_mask.long()
    lm_backbone = getattr(model, model.base_model_prefix)
    input_ids = torch.masked_fill(query_responses, ~attention_mask, 0)
    with torch.inference_mode():
        output = lm_backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             return_dict=True, output_hidden_states=True, use_cache=False)
        reward_logits = model.score(output.hidden_states[-1])
    bools = query_responses[:, context_length:] == pad_token_id
    row_len = bools.size(-1)
    first_pad = torch.min(row_len * (~bools).long() + torch.arange(row_len), dim=-1).values
    seq_len = first_pad - 1 + context_length
    return reward_logits[torch.arange(reward_logits.size(0)), seq_len].squeeze(-1).float().numpy()


@pytest.fixture(scope="module")
def exports(tokenized) -> dict[str, Path]:
    """{encoder: a tiny BERT reward model folder, decoder: a tiny Qwen2 one}, each exported by the train stage."""
    store, ref, _ = tokenized
    out = {}
    for kind, extra in (("encoder", []), ("decoder", [f"model.from_config={TINY_QWEN}"])):
        res = pipeline.execute("train", tiny_cfg("train.max_steps=2", *extra), train_inputs(store, ref), store,
                               log=LOG)
        out[kind] = Path(res.ref.path) / "model"
    return out


@pytest.fixture(params=["encoder", "decoder"])
def exported(request, exports) -> tuple[str, Path]:
    return request.param, exports[request.param]


# TRL cuts nothing; worldpm cuts at the recorded max_length (64 in these tiny runs). Scored here without a cut, so the
# two agree on every row. (The tiny decoder keeps MiniLM's vocabulary: on reload transformers picks the tokenizer
# class from config.json's model_type, qwen2, and splits words into characters; worldpm and TRL load it alike.)
MAX_LENGTH = 512


def worldpm_scores(model_dir: Path, tmp_path: Path) -> list[float]:
    f = tmp_path / "rows.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    out = tmp_path / "scored.jsonl"
    assert cli.main(["score", "--model", str(model_dir), str(f), "--output", str(out),
                     "--max-length", str(MAX_LENGTH)]) == 0
    return [json.loads(line)["score"] for line in out.read_text().splitlines()]


def test_the_loading_contract(exported):
    """What TRL relies on: the trained score head loads (nothing newly initialised), one label, a pad token in the
    saved tokenizer (so TRL never falls back to eos: a decoder's sequence ends with its end marker, and a pad equal
    to it would move the reward token), and the config's pad id equal to the tokenizer's."""
    kind, d = exported
    model, tok, info, eos_fallback = grpo_reward_model(d)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.config.num_labels == 1 and not eos_fallback
    assert tok.pad_token_id == json.loads((d / "config.json").read_text())["pad_token_id"]
    assert tok.pad_token_id != tok.eos_token_id or tok.eos_token_id is None
    head = model.score if kind == "decoder" else model.classifier
    assert head.weight.shape[0] == 1
    card = json.loads((d / "worldpm.json").read_text())
    assert card["reward_token"] == ("last" if kind == "decoder" else "first")
    assert card["text"]["normalization"] == "markup" and card["render"]["max_length"] == 64


def test_trl_grpo_path_gives_worldpm_scores(exported, tmp_path):
    """GRPO's reward call on the texts worldpm renders (full_text below, after the recorded normalisation, special
    tokens written out) gives `worldpm score`'s scores, for an encoder and a decoder."""
    from worldpm.data.text import normalize_frame
    from worldpm.data.schema import MESSAGE
    import polars as pl

    kind, d = exported
    ours = worldpm_scores(d, tmp_path)
    model, tok, _, _ = grpo_reward_model(d)
    card = json.loads((d / "worldpm.json").read_text())
    r = renderer(tok, RenderSettings.of({**card["render"], "max_length": MAX_LENGTH}))
    frame = pl.DataFrame({"prompt": [[{"role": "user", "content": x["prompt"]}] for x in ROWS],
                          "chosen": [x["response"] for x in ROWS], "rejected": [""] * len(ROWS)},
                         schema={"prompt": pl.List(MESSAGE), "chosen": pl.String, "rejected": pl.String})
    norm = normalize_frame(frame, card["text"]["normalize_markup"])
    assert "<b>" not in norm["prompt"][2][0]["content"]  # the HTML row was normalised as training text is
    texts = [full_text(r, p, c) for p, c in zip(norm["prompt"].to_list(), norm["chosen"].to_list())]
    np.testing.assert_allclose(grpo_rewards(model, tok, texts), ours, rtol=1e-4, atol=1e-5)


def test_trl_ppo_path_gives_worldpm_scores(exports, tmp_path):
    """PPO's get_reward (a decoder with a `score` head: the reward at the last token before padding; an encoder has
    no `score` and is no PPO reward model) on worldpm's token ids gives `worldpm score`'s scores; with trl
    installed, trl's own get_reward agrees."""
    d = exports["decoder"]
    from worldpm.data.render import tokenize_pairs
    from worldpm.data.text import normalize_frame
    from worldpm.data.schema import MESSAGE
    import polars as pl

    ours = worldpm_scores(d, tmp_path)
    model, tok, _, _ = grpo_reward_model(d)
    card = json.loads((d / "worldpm.json").read_text())
    frame = pl.DataFrame({"prompt": [[{"role": "user", "content": x["prompt"]}] for x in ROWS],
                          "chosen": [x["response"] for x in ROWS], "rejected": [""] * len(ROWS)},
                         schema={"prompt": pl.List(MESSAGE), "chosen": pl.String, "rejected": pl.String})
    t = tokenize_pairs(normalize_frame(frame, True), tok, RenderSettings.of({**card["render"], "max_length": MAX_LENGTH}))
    assert not t["truncated"].any()
    # PPO batches queries of one context length: score one row at a time, its prompt as the context
    for i, (ids, plen) in enumerate(zip(t["chosen_ids"].to_list(), t["prompt_len"].to_list())):
        qr = torch.tensor([ids + [tok.pad_token_id] * 3])
        got = ppo_rewards(model, qr, tok.pad_token_id, plen)
        assert got[0] == pytest.approx(ours[i], rel=1e-4, abs=1e-5)
        try:
            from trl.experimental.utils import get_reward
        except ImportError:
            continue  # trl absent: the written-out copy above is the check
        with torch.inference_mode():
            _, trl_score, _ = get_reward(model, qr, tok.pad_token_id, plen)
        assert float(trl_score[0]) == pytest.approx(ours[i], rel=1e-4, abs=1e-5)
