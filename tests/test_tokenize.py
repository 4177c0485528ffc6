"""tokenize on real StackExchange pairs: the over-length policy is followed and counted, nothing vanishes, the reward
token and the response end survive truncation, chat templates render as the tokenizer's own apply_chat_template."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import polars as pl
import pytest

from support import se_pairs, se_shard
from tasks import PIPELINE as pipeline
from worldpm.data import render
from worldpm.data.splits import SPLITS, read_split
from worldpm.modeling import models
from worldpm.config import load_config
from worldpm.errors import StageError
from worldpm.store import ArtifactStore

LOG = logging.getLogger("test")
CHATML = ("{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
          "{%- endif %}")


@pytest.fixture(scope="module")
def shard_ref(tmp_path_factory, se_paired):
    store = ArtifactStore(tmp_path_factory.mktemp("tok") / "store")
    return store, se_shard(store, se_paired, load_config(None, []), head=400)


def run_tokenize(store, shard_ref, *sets):
    cfg = load_config(None, list(sets))
    return pipeline.execute("tokenize", cfg, {"shard": shard_ref}, store, log=LOG)


def all_splits(ref) -> pl.DataFrame:
    return pl.concat([read_split(ref, s).with_columns(split=pl.lit(s)) for s in SPLITS])


def test_truncate_keeps_every_pair_the_reward_token_and_the_response_end(shard_ref, se_paired):
    store, shard = shard_ref
    res = run_tokenize(store, shard, "tokenize.max_length=64", "tokenize.overlength=truncate")
    m = res.manifest
    df = all_splits(res.ref)
    assert m["rows_in"] == m["rows_out"] == df.height == 400 and m["rows_rejected"] == 0
    assert m["truncated"] == int(df["truncated"].sum()) > 0
    assert df["chosen_len"].max() <= 64 and df["rejected_len"].max() <= 64
    assert (df["chosen_ids"].list.len() == df["chosen_len"]).all()
    tok = models.load_tokenizer("minilm")
    cls, sep = tok.cls_token_id, tok.sep_token_id
    # the encoder's reward token ([CLS]) first, the end marker last, in every row
    for col in ("chosen_ids", "rejected_ids"):
        assert (df[col].list.first() == cls).all() and (df[col].list.last() == sep).all()
    # the end of the response survives: the tokens before [SEP] are the last tokens of the response alone
    pairs = se_pairs(se_paired).head(400).select("pair_id", "chosen")
    rows = df.filter(pl.col("truncated")).join(pairs, on="pair_id").head(40)
    for ids, start, text in zip(rows["chosen_ids"].to_list(), rows["prompt_len"].to_list(), rows["chosen"].to_list()):
        resp = tok(text, add_special_tokens=False)["input_ids"]
        kept = ids[start:-1]  # prompt_len marks where the response starts
        assert 0 < len(kept) <= len(resp) and kept == resp[-len(kept):]
    # chosen and rejected of a pair see the same prompt cut: same tokens after [CLS] up to the shorter side's body
    # (the same prompt): the first 8 tokens agree in every row
    assert (df["chosen_ids"].list.head(8) == df["rejected_ids"].list.head(8)).all()


def test_drop_moves_overlength_pairs_to_rejects_and_counts_them(shard_ref):
    store, shard = shard_ref
    trunc = run_tokenize(store, shard, "tokenize.max_length=384", "tokenize.overlength=truncate")
    drop = run_tokenize(store, shard, "tokenize.max_length=384", "tokenize.overlength=drop")
    m = drop.manifest
    kept = all_splits(drop.ref)
    rejects = pl.read_parquet(Path(drop.ref.path) / "rejects.parquet")
    assert m["rows_in"] == 400 == m["rows_out"] + m["rows_rejected"]
    assert m["rows_rejected"] == rejects.height == trunc.manifest["truncated"] > 0
    assert set(rejects["reason"].unique()) == {"overlength"}
    assert ((rejects["chosen_len"] > 384) | (rejects["rejected_len"] > 384)).all()
    assert not kept["truncated"].any() and kept["chosen_len"].max() <= 384
    assert all(split["rows_out"] for split in m["splits"].values())
    # none vanish: kept + rejected pair ids are exactly the input's
    all_ids = set(all_splits(trunc.ref)["pair_id"])
    assert set(kept["pair_id"]) | set(rejects["pair_id"]) == all_ids
    assert not set(kept["pair_id"]) & set(rejects["pair_id"])


def test_a_split_that_drop_empties_stops_tokenize_naming_the_rule(shard_ref):
    """issue 12 case 9: at 160 tokens every pair of the test split is longer; tokenize used to commit a test split of
    0 pairs (and an empty train split failed later, in the trainer, as a CalledProcessError)."""
    store, shard = shard_ref
    with pytest.raises(StageError, match=r"^tokenize: every pair of the test split \(27\) is longer than "
                                         r"tokenize.max_length=160 tokens and tokenize.overlength=drop removed it"):
        run_tokenize(store, shard, "tokenize.max_length=160", "tokenize.overlength=drop")
    assert not list((store.root / "tokenize").glob("*/manifest.json")) or all(
        json.loads(p.read_text())["config"]["tokenize"]["max_length"] != 160
        for p in (store.root / "tokenize").glob("*/manifest.json"))


@pytest.fixture(scope="module")
def chatml_tokenizer(tmp_path_factory) -> Path:
    """MiniLM's vocabulary with ChatML markers and a Qwen-style chat template (no hub access needed)."""
    tok = models.load_tokenizer("minilm")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    d = tmp_path_factory.mktemp("chatml")
    tok.save_pretrained(d)
    return d


def test_chat_template_rows_match_apply_chat_template(shard_ref, chatml_tokenizer):
    store, shard = shard_ref
    res = run_tokenize(store, shard, f"model.tokenizer={chatml_tokenizer}", "tokenize.max_length=4096",
                       "tokenize.batch_size=150")
    assert res.manifest["template"]["template"] == "chat" and res.manifest["template"]["compositional"]
    tok = models.load_tokenizer(str(chatml_tokenizer))
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    df = read_split(res.ref, "test")
    assert df.height and not df["truncated"].any()
    assert (df["chosen_ids"].list.last() == im_end).all()  # the reward token of a decoder
    shard_rows = pl.read_parquet(Path(shard.path) / "test").select("pair_id", "prompt", "chosen")
    rows = df.join(shard_rows, on="pair_id").head(5)
    for ids, prompt, chosen in zip(rows["chosen_ids"].to_list(), rows["prompt"].to_list(), rows["chosen"].to_list()):
        msgs = [{"role": "system", "content": ""}] + prompt + [{"role": "assistant", "content": chosen}]
        text = tok.apply_chat_template(msgs, tokenize=False).rstrip()
        assert ids == tok(text, add_special_tokens=False)["input_ids"]


def test_multi_turn_prompts_take_the_rendered_path(tmp_path, chatml_tokenizer):
    tok = models.load_tokenizer(str(chatml_tokenizer))
    r = render.Renderer(tok, "{prompt}\n\n{response}", "")
    enc = render.ParallelEncoder(tok, 1)
    prompt = [{"role": "user", "content": "Is stout a lager?"}, {"role": "assistant", "content": "No."},
              {"role": "user", "content": "Why not?"}]
    df = pl.DataFrame({"pair_id": ["p"], "source": ["s"], "domain": [None], "group_id": ["g"], "prompt": [prompt],
                       "chosen": ["Top-fermenting yeast."], "rejected": ["It is."], "margin": [None]},
                      schema_overrides={"domain": pl.String, "margin": pl.Float64})
    out = render.tokenize_frame(df, r, enc, 512)
    msgs = [{"role": "system", "content": ""}] + prompt + [{"role": "assistant", "content": "Top-fermenting yeast."}]
    want = tok(tok.apply_chat_template(msgs, tokenize=False).rstrip(), add_special_tokens=False)["input_ids"]
    assert out["chosen_ids"].to_list()[0] == want
    enc.close()


# ---- only the end of a long text is tokenized, with the same ids (issue 12 case 10) ---------------------------------
QWEN_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"""
                r"""|\s+(?!\S)|\s+""")


def byte_level_bpe(texts: list[str]):
    """A byte-level BPE tokenizer with Qwen2's pre-tokenizer, trained here on the real answers (no hub access)."""
    from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers, trainers
    from tokenizers import models as tmodels
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(tmodels.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=4000, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<|endoftext|>")


class SpyEncoder(render.ParallelEncoder):
    """Records the longest text it was asked to tokenize."""
    longest = 0

    def __call__(self, texts):
        self.longest = max([self.longest, *map(len, texts)])
        return super().__call__(texts)


def _frame(rows: list[dict]) -> pl.DataFrame:
    return pl.DataFrame({"pair_id": [str(i) for i in range(len(rows))], "source": "s", "domain": None,
                         "group_id": "g", "margin": None,
                         "prompt": [[{"role": "user", "content": r["prompt"]}] for r in rows],
                         "chosen": [r["chosen"] for r in rows], "rejected": [r["rejected"] for r in rows]},
                        schema_overrides={"domain": pl.String, "margin": pl.Float64})


@pytest.mark.parametrize("kind", ["wordpiece", "byte-level BPE"])
def test_only_the_end_of_a_long_text_is_tokenized_and_the_ids_are_the_same(se_paired, monkeypatch, kind):
    pairs = se_pairs(se_paired).head(60)
    answers = pairs["chosen"].to_list() + pairs["rejected"].to_list()
    tok = models.load_tokenizer("minilm") if kind == "wordpiece" else byte_level_bpe(answers)
    long_answer = "\n\n".join(answers)  # real text: code, lists, whitespace runs, ~100k characters
    real = _frame([{"chosen": long_answer[:len(long_answer) - 1999 * i], "rejected": answers[i],
                    "prompt": long_answer[:(len(long_answer) - 1999 * i) // 7]} for i in range(24)])
    odd = _frame([  # words WordPiece makes one [UNK] each (the cut gives too few tokens: cut longer), one giant word
        {"chosen": " ".join(["x" * 150] * 2000), "rejected": "z" * 50_000, "prompt": "q"},
        {"chosen": ("\n" + " " * 40 + "y = 1") * 3000, "rejected": "short", "prompt": "q " * 20_000}])
    r = render.Renderer(tok, "{prompt}\n\n{response}", "")
    cols = ["chosen_ids", "rejected_ids", "prompt_len", "truncated"]
    for max_length in (64, 256):
        for df in (real, odd):
            enc = SpyEncoder(tok, 1)
            cut = render.tokenize_frame(df, r, enc, max_length).select(cols)
            if df is real:
                assert enc.longest < len(long_answer) // 4  # only the ends were tokenized
            with monkeypatch.context() as m:
                m.setattr(render, "CHARS_PER_TOKEN_BOUND", 10**9)  # no cut: every text tokenized whole
                whole = render.tokenize_frame(df, r, render.ParallelEncoder(tok, 1), max_length).select(cols)
            assert cut["truncated"].all()
            for c in cols:
                assert cut[c].to_list() == whole[c].to_list(), (c, max_length)


def test_one_huge_answer_is_cut_before_tokenizing(se_paired):
    """A 20 MB answer: the encoder sees at most the bound (tokenizing it whole took 3.5 GB and 26 s)."""
    pairs = se_pairs(se_paired).head(50)
    answer = "\n\n".join(pairs["chosen"].to_list())
    huge = (answer * (20_000_000 // len(answer) + 1))[-20_000_000:]
    tok = models.load_tokenizer("minilm")
    r = render.Renderer(tok, "{prompt}\n\n{response}", "")
    df = pl.DataFrame({"pair_id": ["p"], "source": "s", "domain": None, "group_id": "g", "margin": None,
                       "prompt": [[{"role": "user", "content": "Why?"}]], "chosen": [huge], "rejected": ["No."]},
                      schema_overrides={"domain": pl.String, "margin": pl.Float64})
    enc = SpyEncoder(tok, 1)
    out = render.tokenize_frame(df, r, enc, 256)
    assert enc.longest <= 2 * render.char_bound(256)
    # the same ids as the end alone, tokenized whole (200k characters are cheap)
    tail = df.with_columns(chosen=pl.lit(huge[-200_000:]))
    ref = render.tokenize_frame(tail, r, render.ParallelEncoder(tok, 1), 256)
    assert out["chosen_ids"].to_list() == ref["chosen_ids"].to_list() and out["truncated"].item()


def test_evaluate_refuses_a_test_split_of_zero_pairs(tmp_path):
    """issue 12 case 9: shard.test: 0 used to give an exit 0 and an evaluation of 0 test pairs."""
    from tasks import evaluate
    from tasks.tokenize import OUT_SCHEMA

    store = ArtifactStore(tmp_path)
    tmp = store.new_tmp("tokenize", "t" * 20)
    pl.DataFrame(schema=OUT_SCHEMA).write_parquet(tmp / "test.parquet")
    tok = store.commit("tokenize", "t" * 20, tmp, {})
    with pytest.raises(StageError, match=r"evaluate: the test split has no pairs .*give shard.test a fraction above 0"):
        evaluate.run(evaluate.stage_config(load_config(None)), {"tokenize": tok, "train": tok, "ref_logps": tok},
                     tmp_path / "out", LOG, tmp_path / "work")
