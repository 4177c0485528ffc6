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

import itertools
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

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

@dataclass
class Encoded:
    """Token ids of k texts in Arrow's list layout: text i is values[offsets[i]:offsets[i+1]]."""

    offsets: np.ndarray  # int64 [k+1]
    values: np.ndarray   # int32

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.values[self.offsets[i]:self.offsets[i + 1]]

    @classmethod
    def from_lists(cls, seqs: list[list[int]]) -> "Encoded":
        lens = np.fromiter(map(len, seqs), dtype=np.int64, count=len(seqs))
        offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
        np.cumsum(lens, out=offsets[1:])
        values = np.fromiter(itertools.chain.from_iterable(seqs), dtype=np.int32, count=int(offsets[-1]))
        return cls(offsets, values)

    @classmethod
    def concat(cls, parts: list["Encoded"]) -> "Encoded":
        if len(parts) == 1:
            return parts[0]
        lens = np.concatenate([p.lengths for p in parts]) if parts else np.zeros(0, dtype=np.int64)
        offsets = np.zeros(len(lens) + 1, dtype=np.int64)
        np.cumsum(lens, out=offsets[1:])
        values = np.concatenate([p.values for p in parts]) if parts else np.zeros(0, dtype=np.int32)
        return cls(offsets, values)

    def replaced(self, new: dict[int, np.ndarray]) -> "Encoded":
        """A copy with text i's ids replaced by new[i]."""
        pieces = [self[i] if i not in new else np.asarray(new[i], dtype=np.int32) for i in range(len(self))]
        return Encoded.from_lists([p.tolist() for p in pieces]) if pieces else self

    def to_list(self) -> list[list[int]]:
        return [self[i].tolist() for i in range(len(self))]


def gather_runs(pool: np.ndarray, starts: np.ndarray, lengths: np.ndarray, per_row: int) -> Encoded:
    """Rows made of `per_row` runs of `pool` each (run j of row i: pool[starts[i, j]:starts[i, j] + lengths[i, j]]),
    concatenated into one flat array without a loop over rows: the index of output token t is its run's start
    plus its place in the run."""
    starts, lengths = starts.reshape(-1), lengths.reshape(-1).astype(np.int64)
    run_end = np.cumsum(lengths)
    flat = pool[np.repeat(starts - (run_end - lengths), lengths) + np.arange(int(run_end[-1]) if len(run_end) else 0)]
    row_off = np.zeros(len(lengths) // per_row + 1, dtype=np.int64)
    row_off[1:] = run_end[per_row - 1::per_row]
    return Encoded(row_off, flat.astype(np.int32, copy=False))


def _list_series(name: str, e: Encoded) -> pl.Series:
    """Encoded -> a List[Int32] column, the buffers handed over (no Python list per row)."""
    arr = pa.LargeListArray.from_arrays(pa.array(e.offsets), pa.array(e.values))
    return pl.Series(name, pl.from_arrow(arr)).cast(IDS)


class ParallelEncoder:
    """encode_batch on num_proc threads, each holding its own tokenizers.Tokenizer (no shared mutable state); the
    ids come back flat (`Encoded`), converted in the worker threads. encode_batch_fast where the tokenizers
    library has it (0.20+: the same ids, no character offsets, which nothing here reads)."""

    def __init__(self, tok, num_proc: int):
        from tokenizers import Tokenizer

        spec = tok.backend_tokenizer.to_str()
        self.toks = [Tokenizer.from_str(spec) for _ in range(num_proc)]
        for t in self.toks:
            t.no_truncation()
            t.no_padding()
        self.pool = ThreadPoolExecutor(num_proc) if num_proc > 1 else None

    def _encode(self, k: int, texts: list[str]) -> Encoded:
        t = self.toks[k]
        batch = getattr(t, "encode_batch_fast", t.encode_batch)
        return Encoded.from_lists([e.ids for e in batch(texts, add_special_tokens=False)])

    def __call__(self, texts: list[str]) -> Encoded:
        if not texts:
            return Encoded(np.zeros(1, dtype=np.int64), np.zeros(0, dtype=np.int32))
        n = len(self.toks)
        if self.pool is None or len(texts) < 2 * n:
            return self._encode(0, texts)
        step = (len(texts) + n - 1) // n
        chunks = [texts[i:i + step] for i in range(0, len(texts), step)]
        return Encoded.concat(list(self.pool.map(lambda a: self._encode(a[0], a[1]), enumerate(chunks))))

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


def encode_ends(df: pl.DataFrame, cols: tuple[str, ...], enc: "ParallelEncoder", max_length: int) -> Encoded:
    """Token ids of each column's texts (column after column), each cut to its end first (see CHARS_PER_TOKEN_BOUND)."""
    bound = char_bound(max_length)
    full: list[str] = []
    for c in cols:
        full += df[c].fill_null("").to_list()
    chars = np.concatenate([df[c].fill_null("").str.len_chars().to_numpy() for c in cols]) if full else []
    long = np.flatnonzero(np.asarray(chars) > bound).tolist()
    texts = full
    if long:
        texts = list(full)
        for i in long:
            texts[i] = cut_to_end(full[i], bound)
    ids = enc(texts)
    lens = ids.lengths
    todo = [i for i in long if lens[i] < max_length + RESYNC_TOKENS]
    fixed: dict[int, np.ndarray] = {}
    while todo:  # cut texts that gave too few tokens: cut them 8x longer (at worst, not at all)
        bound *= 8
        new = enc([cut_to_end(full[i], bound) for i in todo])
        for j, i in enumerate(todo):
            fixed[i] = new[j]
        todo = [i for i in todo if len(full[i]) > bound and len(fixed[i]) < max_length + RESYNC_TOKENS]
    return ids.replaced(fixed) if fixed else ids


@dataclass
class PairIds:
    """What tokenize_frame computes for n pairs, as arrays (the token store and the Parquet columns are made from
    it): each side's ids after the length policy, and per pair the lengths before it."""

    chosen: Encoded
    rejected: Encoded
    prompt_len: np.ndarray              # int32: tokens before the response (head + kept prompt)
    full_chosen: np.ndarray             # int64: each side's length before any cut
    full_rejected: np.ndarray
    chosen_response_tokens: np.ndarray  # int32: the responses' own tokens before any cut
    rejected_response_tokens: np.ndarray
    truncated: np.ndarray               # bool


def _bodies(df: pl.DataFrame, r: Renderer) -> pl.DataFrame:
    """df with `_body` (the prompt's text between head and response) and `_has_head` (the constant head applies)."""
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
        return df.drop("_fast")
    if r.chat:
        rendered = [r.split_rendered(p or []) for p in df["prompt"].to_list()]
        return df.with_columns(_body=pl.Series([b for _, b in rendered], dtype=pl.String),
                               _has_head=pl.Series([h for h, _ in rendered], dtype=pl.Boolean))
    return df.with_columns(_body=_prompt_text_expr(r), _has_head=pl.lit(True))


def encode_pairs(df: pl.DataFrame, r: Renderer, enc: ParallelEncoder, max_length: int) -> PairIds:
    """Canonical rows -> each side's ids after the truncation plan, and the lengths before it (numpy throughout).

    Only the end of a long body or response is tokenized (encode_ends): the part truncation can keep. The plan,
    per pair, with H/T the constant head/tail tokens and lb/lc/lr the body/chosen/rejected tokens:
    avail = max_length - T - H; the body keeps all of itself when it fits beside a response, else what the longer
    response leaves but at least min(lb, avail // 2); one cut for both sides (the smaller keep); each response keeps
    its last tokens up to what the body leaves."""
    n = df.height
    df = _bodies(df, r)
    ids = encode_ends(df, ("_body", "chosen", "rejected"), enc, max_length)
    lens = ids.lengths
    lb, lc, lr = lens[:n], lens[n:2 * n], lens[2 * n:]
    has_head = df["_has_head"].to_numpy().astype(bool)
    H, T = len(r.head_ids), len(r.tail_ids)
    head_n = np.where(has_head, H, 0)
    avail = max_length - T - head_n
    half = avail // 2

    def keep_body(ls: np.ndarray) -> np.ndarray:  # prompt tokens that side would keep
        return np.where(lb + ls <= avail, lb, np.maximum(avail - ls, np.minimum(lb, half)))

    kb = np.minimum(keep_body(lc), keep_body(lr))
    kc, kr = np.minimum(lc, avail - kb), np.minimum(lr, avail - kb)
    # one pool: head ids, tail ids, then every encoded text; each side is 4 runs of it
    pool = np.concatenate([np.asarray(r.head_ids, dtype=np.int32), np.asarray(r.tail_ids, dtype=np.int32),
                           ids.values])
    base = H + T
    off = ids.offsets

    def side(first: int, resp_len: np.ndarray, keep: np.ndarray) -> Encoded:
        starts = np.stack([np.zeros(n, dtype=np.int64),                       # head
                           base + off[:n] + lb - kb,                          # the body's last kb tokens
                           base + off[first:first + n] + resp_len - keep,     # the response's last `keep` tokens
                           np.full(n, H, dtype=np.int64)], axis=1)            # tail
        runs = np.stack([head_n, kb, keep, np.full(n, T)], axis=1)
        return gather_runs(pool, starts, runs, 4)

    full_c = lb + lc + T + head_n
    full_r = lb + lr + T + head_n
    return PairIds(
        chosen=side(n, lc, kc), rejected=side(2 * n, lr, kr),
        prompt_len=(kb + head_n).astype(np.int32), full_chosen=full_c, full_rejected=full_r,
        chosen_response_tokens=lc.astype(np.int32), rejected_response_tokens=lr.astype(np.int32),
        truncated=(full_c > max_length) | (full_r > max_length))


def tokenize_frame(df: pl.DataFrame, r: Renderer, enc: ParallelEncoder, max_length: int) -> pl.DataFrame:
    """Canonical rows -> the same rows plus chosen_ids / rejected_ids (after the length policy), truncated,
    chosen_len / rejected_len, prompt_len, chosen_response_tokens / rejected_response_tokens, and _full_c / _full_r
    (each side's length before any cut, for the drop policy)."""
    p = encode_pairs(df, r, enc, max_length)
    return df.with_columns(
        _list_series("chosen_ids", p.chosen), _list_series("rejected_ids", p.rejected),
        pl.Series("truncated", p.truncated, dtype=pl.Boolean),
        pl.Series("chosen_len", p.chosen.lengths.astype(np.int32), dtype=pl.Int32),
        pl.Series("rejected_len", p.rejected.lengths.astype(np.int32), dtype=pl.Int32),
        pl.Series("prompt_len", p.prompt_len, dtype=pl.Int32),
        # the responses' own length before any cut: what length bias and length control are measured in
        pl.Series("chosen_response_tokens", p.chosen_response_tokens, dtype=pl.Int32),
        pl.Series("rejected_response_tokens", p.rejected_response_tokens, dtype=pl.Int32),
        pl.Series("_full_c", p.full_chosen, dtype=pl.Int64), pl.Series("_full_r", p.full_rejected, dtype=pl.Int64),
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
