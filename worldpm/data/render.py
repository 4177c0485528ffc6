"""Rendering and tokenizing pairs the way a model sees them: one layout for the tokenize stage, evaluate,
`worldpm evaluate` and `worldpm score`, so a text is cut and templated identically at training and at scoring.

The text path has three steps, the same at training and at scoring:
1. normalisation: the normalise stage's, worldpm/data/text.py ``normalize_pairs`` on the prompt contents, chosen
   and rejected (clean.normalize_markup true: HTML/Markdown residue, or false: line endings and control characters
   only). Training text goes through it in the normalise stage; every text scored outside the training data (eval
   sets, `worldpm evaluate`, `worldpm score`) goes through ``text.normalize_frame``, the same function, with the
   setting the model was trained with. (Not imported here: a rule change must not change tokenize's key.)
2. the template (`Renderer`), 3. tokenizing and the cut (`tokenize_frame`), described below.

Layout of one sequence (chosen or rejected), built from four parts:

    head      constant: the template up to the first user message (Qwen: ``<|im_start|>system\\n<|im_end|>\\n
              <|im_start|>user\\n``, the empty system turn WorldPM keeps); for BERT the [CLS] token
    body      the prompt (and, for a chat template, the assistant header): ``...question...<|im_end|>\\n
              <|im_start|>assistant\\n``
    response  the chosen or rejected text
    tail      constant: the turn's end marker (Qwen ``<|im_end|>``, BERT ``[SEP]``)

The reward is read at the last non-pad token for decoders (the end marker) and at the first token for encoders
([CLS]); both are in the constant parts, so truncation never removes them. Over-length policy (tokenize.overlength):
``truncate`` cuts the body from the left (one cut for chosen and rejected, so both see the same prompt) until the
pair fits, but keeps at least half the budget for the prompt when a response alone is too long; the response is
then cut from the left, keeping its end. ``drop`` moves the pair to rejects.parquet. Both are counted.

Chat templates are rendered once with sentinel strings and split into head / middle / suffix; a prompt that is
a single user message is then assembled with polars string expressions (checked against a real rendering
first). Other prompts (multi-turn, own system message) are rendered row by row with apply_chat_template.
Tokenization runs ``num_proc`` threads, each with its own Rust tokenizer (encode_batch releases the GIL).
"""
from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import polars as pl
import pyarrow as pa

from worldpm.data.textpath import RenderSettings, is_plain_reward_template
from worldpm.errors import StageError

_U = "WORLDPMUSERSENTINEL"
_A = "WORLDPMASSISTANTSENTINEL"

IDS = pl.List(pl.Int32)


# ---- the template -----------------------------------------------------------------------------------------------

class Renderer:
    """Splits a chat or plain template into constant head/tail ids and per-row body/response texts."""

    def __init__(self, tok, plain_template: str, system_prompt: str | None):
        self.tok = tok
        self.system_prompt = system_prompt
        template = getattr(tok, "chat_template", None)
        self.chat = bool(template) and not is_plain_reward_template(template)
        if self.chat:
            self._init_chat()
        else:
            self._init_plain(plain_template)

    # chat ---------------------------------------------------------------------------------------------------
    def _messages(self, prompt: list[dict], response: str) -> list[dict]:
        msgs = [{"role": m["role"], "content": m["content"] or ""} for m in prompt]
        if self.system_prompt is not None and not (msgs and msgs[0]["role"] == "system"):
            msgs = [{"role": "system", "content": self.system_prompt}] + msgs
        return msgs + [{"role": "assistant", "content": response}]

    def render(self, prompt: list[dict], response: str) -> str:
        try:
            return self.tok.apply_chat_template(self._messages(prompt, response), tokenize=False)
        except Exception as e:  # jinja raises its own exceptions for templates that reject a conversation
            raise StageError(f"tokenize: the chat template cannot render a conversation: {e}") from None

    def _init_chat(self) -> None:
        full = self.render([{"role": "user", "content": _U}], _A)
        if full.count(_U) != 1 or full.count(_A) != 1 or full.index(_U) > full.index(_A):
            raise StageError("tokenize: the chat template does not render the user and assistant messages verbatim")
        head = full[: full.index(_U)]
        mid = full[full.index(_U) + len(_U): full.index(_A)]
        suffix = full[full.index(_A) + len(_A):]
        # The reward is read at the turn's end marker (Qwen: <|im_end|>), not at a trailing newline.
        suffix = suffix.rstrip()
        self.head_text, self.mid_text, self.suffix_text = head, mid, suffix
        self.head_ids = self.encode(head)
        self.tail_ids = self.encode(suffix)
        # The fast path (polars string concat) is exact only if the template inserts contents unchanged.
        probe_u, probe_a = "  Why?\n\n  It is  ", "\n Because. \n"
        self.compositional = self.render([{"role": "user", "content": probe_u}], probe_a).rstrip() == (
            head + probe_u + mid + probe_a + suffix)

    def split_rendered(self, prompt: list[dict]) -> tuple[bool, str]:
        """(has the constant head, body text) of one prompt rendered by the template."""
        full = self.render(prompt, _A)
        body = full[: full.rindex(_A)]
        if body.startswith(self.head_text):
            return True, body[len(self.head_text):]
        return False, body

    # plain --------------------------------------------------------------------------------------------------
    def _init_plain(self, template: str) -> None:
        if template.count("{prompt}") != 1 or template.count("{response}") != 1 or (
                template.index("{prompt}") > template.index("{response}")):
            raise StageError(f"tokenize.plain_template {template!r}: needs one {{prompt}} before one {{response}}")
        pre, rest = template.split("{prompt}")
        between, post = rest.split("{response}")
        self.head_text, self.mid_text, self.suffix_text = pre, between, post
        # The tokenizer's own special tokens ([CLS] ... [SEP]) are the constant head and tail.
        with_sp = self.tok("x", add_special_tokens=True)["input_ids"]
        bare = self.tok("x", add_special_tokens=False)["input_ids"]
        n = len(bare)
        for i in range(len(with_sp) - n + 1):
            if with_sp[i:i + n] == bare:
                self.head_ids, self.tail_ids = list(with_sp[:i]), list(with_sp[i + n:])
                break
        else:
            self.head_ids, self.tail_ids = [], []
        if post:
            self.tail_ids = self.encode(post) + self.tail_ids
        self.compositional = True

    def encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"]) if text else []

    def describe(self) -> dict:
        return {"template": "chat" if self.chat else "plain", "head": self.head_text,
                "middle": self.mid_text, "suffix": self.suffix_text, "head_ids": self.head_ids,
                "tail_ids": self.tail_ids, "compositional": self.compositional}


def _prompt_text_expr(r: Renderer) -> pl.Expr:
    """Body text of a prompt without per-row Python: single user message for chat templates; any prompt for
    the plain template (several messages become 'Role: content' paragraphs)."""
    if r.chat:
        return pl.col("prompt").list.first().struct.field("content").fill_null("") + pl.lit(r.mid_text)
    msg = pl.element().struct.field("role").str.to_titlecase() + pl.lit(": ") + \
        pl.element().struct.field("content").fill_null("")
    single = (pl.col("prompt").list.len() == 1) & (
        pl.col("prompt").list.first().struct.field("role") == "user")
    text = pl.when(single).then(pl.col("prompt").list.first().struct.field("content").fill_null("")) \
        .otherwise(pl.col("prompt").list.eval(msg).list.join("\n\n"))
    return pl.lit(r.head_text) + text + pl.lit(r.mid_text)


# ---- tokenizing ---------------------------------------------------------------------------------------------------

def _list_series(name: str, seqs: list[list[int]]) -> pl.Series:
    lens = np.fromiter((len(s) for s in seqs), dtype=np.int32, count=len(seqs))
    offsets = np.zeros(len(seqs) + 1, dtype=np.int32)
    np.cumsum(lens, out=offsets[1:])
    flat = np.fromiter((t for s in seqs for t in s), dtype=np.int32, count=int(offsets[-1]))
    arr = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat))
    return pl.Series(name, pl.from_arrow(arr)).cast(IDS)


class ParallelEncoder:
    """encode_batch on num_proc threads, each holding its own tokenizers.Tokenizer (no shared mutable state)."""

    def __init__(self, tok, num_proc: int):
        from tokenizers import Tokenizer

        spec = tok.backend_tokenizer.to_str()
        self.toks = [Tokenizer.from_str(spec) for _ in range(num_proc)]
        for t in self.toks:
            t.no_truncation()
            t.no_padding()
        self.pool = ThreadPoolExecutor(num_proc) if num_proc > 1 else None

    def __call__(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        n = len(self.toks)
        if self.pool is None or len(texts) < 2 * n:
            return [e.ids for e in self.toks[0].encode_batch(texts, add_special_tokens=False)]
        step = (len(texts) + n - 1) // n
        chunks = [texts[i:i + step] for i in range(0, len(texts), step)]
        parts = self.pool.map(lambda a: [e.ids for e in self.toks[a[0]].encode_batch(a[1], add_special_tokens=False)],
                              enumerate(chunks))
        return [ids for part in parts for ids in part]

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


# Truncation keeps the end of the body and of the response, so only their ends are tokenized: a longer text is cut
# to its last CHARS_PER_TOKEN_BOUND * max_length + CHARS_SLACK characters first, at a whitespace (the last one
# before the cut, else the first after it), so the words kept are tokenized exactly as in the whole text. One 20 MB
# answer used to be tokenized whole (3.5 GB, 26 s) to keep its last few hundred tokens. A cut text that gives fewer
# than max_length + RESYNC_TOKENS tokens (very long tokens, or [UNK] words) is cut 8x longer and tokenized again.
# So the ids are the same as without the cut (a test checks it on real text, WordPiece and byte-level BPE); texts
# under the bound are not touched. The one exception: when the kept end lies inside a single "word" of more than
# 2 x bound characters without whitespace, that word is tokenized from the cut. The full lengths of a cut text
# (tokenize's rejects, evaluate's response-length bias) are lower bounds: at least max_length tokens.
CHARS_PER_TOKEN_BOUND = 32
CHARS_SLACK = 1024
RESYNC_TOKENS = 16  # tokens at the start of a cut text that may differ from the whole text's: never kept
_WS = re.compile(r"\s")


def char_bound(max_length: int) -> int:
    return CHARS_PER_TOKEN_BOUND * max_length + CHARS_SLACK


def cut_to_end(text: str, bound: int) -> str:
    """The end of `text`: about its last `bound` characters, starting at a whitespace."""
    if len(text) <= bound:
        return text
    start = len(text) - bound
    last = None
    for m in _WS.finditer(text, max(0, start - bound), start + 1):
        last = m.start()
    if last is None:
        m = _WS.search(text, start)
        last = m.start() if m else start
    return text[last:]


def encode_ends(df: pl.DataFrame, cols: tuple[str, ...], enc: "ParallelEncoder", max_length: int) -> list[list[int]]:
    """Token ids of each column's texts (column after column), each cut to its end first (see CHARS_PER_TOKEN_BOUND)."""
    bound = char_bound(max_length)
    full: list[str] = []
    for c in cols:
        full += df[c].fill_null("").to_list()
    long = [i for i, t in enumerate(full) if len(t) > bound]
    texts = list(full)
    for i in long:
        texts[i] = cut_to_end(full[i], bound)
    ids = enc(texts)
    todo = [i for i in long if len(ids[i]) < max_length + RESYNC_TOKENS]
    while todo:  # cut texts that gave too few tokens: cut them 8x longer (at worst, not at all)
        bound *= 8
        for i, new in zip(todo, enc([cut_to_end(full[i], bound) for i in todo])):
            ids[i] = new
        todo = [i for i in todo if len(full[i]) > bound and len(ids[i]) < max_length + RESYNC_TOKENS]
    return ids


def tokenize_frame(df: pl.DataFrame, r: Renderer, enc: ParallelEncoder, max_length: int) -> pl.DataFrame:
    """Canonical rows -> ids per side (before the length policy) plus full lengths and the truncation plan.

    Only the end of a long body or response is tokenized (encode_ends): the part truncation can keep."""
    n = df.height
    if r.chat and r.compositional:
        fast = ((pl.col("prompt").list.len() == 1)
                & (pl.col("prompt").list.first().struct.field("role") == "user"))
        if r.system_prompt is None:
            fast = fast & pl.lit(False)  # the template adds its own default system turn: render those rows
        df = df.with_columns(_fast=fast)
        df = df.with_columns(_body=pl.when(pl.col("_fast")).then(_prompt_text_expr(r)).otherwise(pl.lit(None)),
                             _has_head=pl.col("_fast"))
        slow = df.select(pl.arg_where(~pl.col("_fast"))).to_series().to_list()
        if slow:
            prompts = df["prompt"].gather(slow).to_list()
            rendered = [r.split_rendered(p or []) for p in prompts]
            df = df.with_columns(
                df["_body"].scatter(slow, [b for _, b in rendered]),
                df["_has_head"].scatter(slow, [h for h, _ in rendered]),
            )
    elif r.chat:
        rendered = [r.split_rendered(p or []) for p in df["prompt"].to_list()]
        df = df.with_columns(_body=pl.Series([b for _, b in rendered], dtype=pl.String),
                             _has_head=pl.Series([h for h, _ in rendered], dtype=pl.Boolean))
    else:
        df = df.with_columns(_body=_prompt_text_expr(r), _has_head=pl.lit(True))
    ids = encode_ends(df, ("_body", "chosen", "rejected"), enc, max_length)
    df = df.with_columns(
        _list_series("_b", ids[:n]), _list_series("_c", ids[n:2 * n]), _list_series("_r", ids[2 * n:]),
    )
    head = pl.lit(pl.Series([r.head_ids], dtype=IDS))
    tail = pl.lit(pl.Series([r.tail_ids], dtype=IDS))
    H, T = len(r.head_ids), len(r.tail_ids)
    lb, lc, lr = (pl.col(c).list.len().cast(pl.Int32) for c in ("_b", "_c", "_r"))
    avail = pl.lit(max_length - T, dtype=pl.Int32) - pl.when(pl.col("_has_head")).then(H).otherwise(0)
    half = avail // 2

    def keep_body(ls: pl.Expr) -> pl.Expr:  # prompt tokens that side would keep
        return pl.when(lb + ls <= avail).then(lb).otherwise(pl.max_horizontal(avail - ls, pl.min_horizontal(lb, half)))

    df = df.with_columns(
        _full_c=lb + lc + T + pl.when(pl.col("_has_head")).then(H).otherwise(0),
        _full_r=lb + lr + T + pl.when(pl.col("_has_head")).then(H).otherwise(0),
        _kb=pl.min_horizontal(keep_body(lc), keep_body(lr)),
        _avail=avail,
    )
    df = df.with_columns(_kc=pl.min_horizontal(lc, pl.col("_avail") - pl.col("_kb")),
                         _kr=pl.min_horizontal(lr, pl.col("_avail") - pl.col("_kb")))

    def side(col: str, k: str) -> pl.Expr:
        parts = [pl.col("_b").list.tail(pl.col("_kb")), pl.col(col).list.tail(pl.col(k)), tail]
        return pl.when(pl.col("_has_head")).then(pl.concat_list([head, *parts])).otherwise(pl.concat_list(parts))

    return df.with_columns(
        chosen_ids=side("_c", "_kc").cast(IDS),
        rejected_ids=side("_r", "_kr").cast(IDS),
        truncated=(pl.col("_full_c") > max_length) | (pl.col("_full_r") > max_length),
    ).with_columns(
        chosen_len=pl.col("chosen_ids").list.len().cast(pl.Int32),
        rejected_len=pl.col("rejected_ids").list.len().cast(pl.Int32),
        prompt_len=(pl.col("_kb") + pl.when(pl.col("_has_head")).then(H).otherwise(0)).cast(pl.Int32),
        # the responses' own length before any cut: what length bias and length control are measured in
        chosen_response_tokens=lc, rejected_response_tokens=lr,
    )



# ---- one renderer for training and scoring -------------------------------------------------------------------------
def renderer(tok, rs: RenderSettings, what: str = "max_length") -> Renderer:
    """The Renderer of a tokenizer, checked: the template leaves room for text within max_length, and a chat
    template's end marker (where a decoder reads its reward) is not the pad token."""
    r = Renderer(tok, rs.plain_template, rs.system_prompt)
    budget = rs.max_length - len(r.head_ids) - len(r.tail_ids)
    if budget < 4:
        raise StageError(f"{what} {rs.max_length} leaves {budget} tokens after the template's "
                         f"{len(r.head_ids) + len(r.tail_ids)}; raise it")
    if r.chat and r.tail_ids and r.tail_ids[-1] == tok.pad_token_id:
        raise StageError(f"the template's end marker {r.suffix_text!r} is the pad token; the reward token would be "
                         "mistaken for padding")
    return r


def tokenize_pairs(pairs: pl.DataFrame, tok, rs: RenderSettings, r=None, num_proc: int = 1) -> pl.DataFrame:
    """Canonical pairs (prompt, chosen, rejected, ...) -> the same frame plus chosen_ids / rejected_ids (truncated to
    max_length the tokenize stage's way), their lengths, truncated, prompt_len, and chosen_response_tokens /
    rejected_response_tokens (the responses' token counts before truncation)."""
    r = r or renderer(tok, rs)
    enc = ParallelEncoder(tok, num_proc)
    try:
        parts = []
        for lo in range(0, max(pairs.height, 1), 1000):
            chunk = pairs.slice(lo, 1000)
            if chunk.height == 0:
                continue
            t = tokenize_frame(chunk, r, enc, rs.max_length)
            parts.append(t.drop([c for c in t.columns if c.startswith("_")]))
    finally:
        enc.close()
    if not parts:
        return pairs.with_columns(chosen_ids=pl.lit(None, IDS), rejected_ids=pl.lit(None, IDS),
                                  truncated=pl.lit(None, pl.Boolean), chosen_len=pl.lit(None, pl.Int32),
                                  rejected_len=pl.lit(None, pl.Int32), prompt_len=pl.lit(None, pl.Int32),
                                  chosen_response_tokens=pl.lit(None, pl.Int32),
                                  rejected_response_tokens=pl.lit(None, pl.Int32))
    return pl.concat(parts)
