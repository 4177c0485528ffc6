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
``get_reward`` is checked too). The model is exported by the real train stage (two steps of the default MiniLM and of
a tiny Qwen2 with a ChatML tokenizer), and the scores are those of `worldpm score`. The same folders through
transformers' own ``pipeline("text-classification")`` give the same numbers (worldpm/modeling/export.py).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from flows import cli
from support import LOG, TINY_QWEN, tiny_cfg, tiny_qwen_tokenizer, train_inputs
from tasks import PIPELINE as pipeline
from worldpm.data.render import Renderer, renderer
from worldpm.data.textpath import RenderSettings
from worldpm.modeling import export
from worldpm.modeling.models import ModelError

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
def exports(tokenized, tmp_path_factory) -> dict[str, Path]:
    """{default: the default MiniLM (BERT) reward model, qwen: a tiny Qwen2 with a ChatML tokenizer (Qwen's
    layout: a chat template, no special tokens added)}, each exported by the train stage after two steps."""
    store, ref, shard = tokenized
    res = pipeline.execute("train", tiny_cfg("train.max_steps=2", "model.from_config=null"), train_inputs(store, ref),
                           store, log=LOG)
    out = {"default": Path(res.ref.path) / "model"}
    tok_dir = tiny_qwen_tokenizer(tmp_path_factory.mktemp("qwen-tokenizer"))
    cfg = tiny_cfg("train.max_steps=2", f"model.from_config={TINY_QWEN}", f"model.tokenizer={tok_dir}",
                   f"tokenize.max_length={QWEN_MAX_LENGTH}")
    tok = pipeline.execute("tokenize", cfg, {"shard": shard}, store, log=LOG)
    res = pipeline.execute("train", cfg, train_inputs(store, tok.ref), store, log=LOG)
    out["qwen"] = Path(res.ref.path) / "model"
    return out


@pytest.fixture(params=["default", "qwen"])
def exported(request, exports) -> tuple[str, Path]:
    return request.param, exports[request.param]


QWEN_MAX_LENGTH = 512  # a token a byte: room for ROWS whole
# TRL cuts nothing; worldpm cuts at the recorded max_length (64 for the default here). Scored here without a cut, so
# the two agree on every row.
MAX_LENGTH = 512


def worldpm_scores(model_dir: Path, tmp_path: Path, rows: list[dict] = ROWS,
                   max_length: int | None = MAX_LENGTH) -> list[float]:
    f = tmp_path / "rows.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "scored.jsonl"
    cut = ["--max-length", str(max_length)] if max_length else []
    assert cli.main(["score", "--model", str(model_dir), str(f), "--output", str(out), *cut]) == 0
    return [json.loads(line)["score"] for line in out.read_text().splitlines()]


def conversation(row: dict) -> list[dict]:
    return [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["response"]}]


def hf_pipeline(model_dir: Path, **kw):
    from transformers import pipeline as hf

    return hf("text-classification", model=str(model_dir), function_to_apply="none", device="cpu", **kw)


def test_hf_pipeline_gives_worldpm_scores(exported, tmp_path):
    """The documented call: the folder's chat template renders prompt and response as the model was trained on
    them, and `pipeline("text-classification", model=DIR, function_to_apply="none")` gives `worldpm score`'s
    number, labelled `reward`. The folder declares a regression head, the training max_length and a left cut; its
    files have one mode."""
    kind, d = exported
    rows = ROWS[:2]  # plain text: nothing for the recorded normalisation to change
    ours = worldpm_scores(d, tmp_path, rows, max_length=None)  # the recorded max_length: these fit
    config, card = (json.loads((d / f).read_text()) for f in ("config.json", "worldpm.json"))
    assert config["problem_type"] == "regression" and config["id2label"] == {"0": "reward"}
    pipe = hf_pipeline(d)
    tok = pipe.tokenizer
    assert tok.model_max_length == card["render"]["max_length"] and tok.truncation_side == "left"
    assert card["hf"]["add_special_tokens"] is True  # the pipeline's own tokenizer call
    texts = [tok.apply_chat_template(conversation(r), tokenize=False) for r in rows]
    got = pipe(texts)
    assert [g["label"] for g in got] == ["reward"] * len(rows)
    np.testing.assert_allclose([g["score"] for g in got], ours, rtol=1e-4, atol=1e-5)
    assert len({p.stat().st_mode & 0o777 for p in d.iterdir() if p.is_file()}) == 1


def test_hf_pipeline_over_long_input(exported, tmp_path):
    """An input longer than the training max_length (and than BERT's 512 positions) through the documented call
    (`truncation=True`: cut from the left at the tokenizer's model_max_length) gives a finite reward; for a long
    prompt that is worldpm's own cut, so the number is `worldpm score`'s."""
    kind, d = exported
    row = {"prompt": " ".join(["Why does my lager taste of green apples after three weeks in the fermenter?"] * 60),
           "response": "Acetaldehyde: give the yeast a longer rest before you chill it."}
    pipe = hf_pipeline(d, truncation=True)
    text = pipe.tokenizer.apply_chat_template(conversation(row), tokenize=False)
    assert len(pipe.tokenizer(text, verbose=False)["input_ids"]) > max(512, pipe.tokenizer.model_max_length)
    (got,) = pipe([text])
    assert np.isfinite(got["score"])
    if kind == "default":  # BERT's [CLS] and [SEP] are added after the cut; a chat template's head is cut here
        assert got["score"] == pytest.approx(worldpm_scores(d, tmp_path, [row], max_length=None)[0], rel=1e-4,
                                             abs=1e-5)


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
    head = model.score if kind == "qwen" else model.classifier
    assert head.weight.shape[0] == 1
    card = json.loads((d / "worldpm.json").read_text())
    assert card["reward_token"] == ("last" if kind == "qwen" else "first")
    assert card["text"]["normalization"] == "markup"
    assert card["render"]["max_length"] == (QWEN_MAX_LENGTH if kind == "qwen" else 64)


def test_trl_grpo_path_gives_worldpm_scores(exported, tmp_path):
    """GRPO's reward call on the texts worldpm renders (full_text below, after the recorded normalisation, special
    tokens written out) gives `worldpm score`'s scores, for an encoder and a decoder; for the decoder (Qwen's layout)
    GRPO's conversational path too (the folder's chat template, tokenized without special tokens)."""
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
    if kind == "qwen":
        chats = [tok.apply_chat_template(p + [{"role": "assistant", "content": c}], tokenize=False)
                 for p, c in zip(norm["prompt"].to_list(), norm["chosen"].to_list())]
        np.testing.assert_allclose(grpo_rewards(model, tok, chats), ours, rtol=1e-4, atol=1e-5)


def test_trl_ppo_path_gives_worldpm_scores(exports, tmp_path):
    """PPO's get_reward (a decoder with a `score` head: the reward at the last token before padding) on worldpm's
    token ids gives `worldpm score`'s scores; with trl installed, trl's own get_reward agrees."""
    d = exports["qwen"]
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


def test_score_head_for_trl(exports):
    """TRL's PPO/RLOO reward call reads `model.score`: the decoder's folder has it; the default BERT reads its
    reward at [CLS] through its pooler and `classifier` (transformers' BERT has no `score`), and the loader that
    checks for it says in one line what the folder serves instead."""
    model = export.score_head_model(exports["qwen"])
    assert getattr(model, model.base_model_prefix) is not None and model.score.weight.shape[0] == 1
    with pytest.raises(ModelError) as e:
        export.score_head_model(exports["default"])
    msg = str(e.value)
    assert "\n" not in msg and "no `score` head" in msg and "GRPO" in msg and "worldpm score" in msg


PROBES = (
    [{"role": "user", "content": "How long should a lager ferment?"},
     {"role": "assistant", "content": "Two to three weeks at 10 C, then lager it cold."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Is dry hopping worth it?"},
     {"role": "assistant", "content": "Yes, for aroma."}, {"role": "user", "content": "Why?"},
     {"role": "assistant", "content": "The oils survive. "}],
)


@pytest.mark.parametrize("kind", ["plain", "chatml-adds-specials", "qwen"])
def test_the_reward_template_gives_the_training_tokens(kind, tmp_path):
    """The folder's chat template, tokenized as worldpm.json's `hf` says, gives the tokens worldpm trains on (the
    tokenize stage's rendering and cut) for a plain-template tokenizer (MiniLM), a chat template over a tokenizer
    that adds [CLS]/[SEP] of its own, and Qwen's layout; multi-turn prompts with their own system turn included.
    The saved tokenizer is rendered by worldpm as the training one was (the plain one stays plain)."""
    import polars as pl
    from transformers import AutoTokenizer

    from support import CHATML
    from worldpm.data.render import tokenize_pairs
    from worldpm.data.schema import MESSAGE
    from worldpm.modeling import models

    if kind == "qwen":
        tok = AutoTokenizer.from_pretrained(tiny_qwen_tokenizer(tmp_path / "tok"))
    else:
        tok = models.load_tokenizer("minilm")
        if kind == "chatml-adds-specials":
            tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
            tok.chat_template = CHATML
    rs = RenderSettings.of({"max_length": 4096, "plain_template": "{prompt}\n\n{response}", "system_prompt": ""})
    saved = export.reward_tokenizer(tok, rs)
    saved.save_pretrained(tmp_path / "saved")
    saved = AutoTokenizer.from_pretrained(tmp_path / "saved")
    hf = export.hf_record(saved)
    assert hf["add_special_tokens"] is (kind != "chatml-adds-specials") and hf["model_max_length"] == 4096
    frame = pl.DataFrame({"prompt": [p[:-1] for p in PROBES], "chosen": [p[-1]["content"] for p in PROBES],
                          "rejected": [""] * len(PROBES)},
                         schema={"prompt": pl.List(MESSAGE), "chosen": pl.String, "rejected": pl.String})
    want = tokenize_pairs(frame, tok, rs)["chosen_ids"].to_list()
    got = [saved(saved.apply_chat_template(p, tokenize=False), add_special_tokens=hf["add_special_tokens"])["input_ids"]
           for p in PROBES]
    assert got == want
    assert tokenize_pairs(frame, saved, rs)["chosen_ids"].to_list() == want  # worldpm score on the saved folder
