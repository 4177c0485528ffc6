"""Scoring with a trained model: load a model folder, score token sequences and pairs, evaluate a set of pairs.

What the evaluate stage, `worldpm evaluate` and `worldpm score` share. Pairs go through the training text path of
worldpm/data/render.py: normalised as the normalise stage normalises training text (``prepare_pairs``), then rendered
and cut exactly as the tokenize stage does. A reward model (objective bt) scores a response with its head; a DPO
policy with its implicit reward beta * (log pi(y|x) - log ref(y|x)) (``ImplicitReward``).

`evaluate_pairs` returns metrics.summarize of a set plus its predictions, one row per pair (PRED_SCHEMA): set,
pair_id, source, domain, subset, chosen_score, rejected_score, margin (the label's), chosen_len / rejected_len
(response tokens before truncation), truncated, correct (1 / 0.5 tie / 0).
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import polars as pl

from worldpm.data.render import tokenize_pairs
from worldpm.data.splits import token_arrays
from worldpm.data.text import normalize_frame
from worldpm.data.textpath import TextPath
from worldpm.errors import StageError
from worldpm.modeling import metrics as M
from worldpm.store import ArtifactRef

PRED_SCHEMA = {
    "set": pl.String, "pair_id": pl.String, "source": pl.String, "domain": pl.String, "subset": pl.String,
    "chosen_score": pl.Float32, "rejected_score": pl.Float32, "margin": pl.Float64, "chosen_len": pl.Int32,
    "rejected_len": pl.Int32, "truncated": pl.Boolean, "correct": pl.Float32,
}

# ---- model and scoring --------------------------------------------------------------------------------------------
def pick_device(device: str | None = None) -> str:
    if device:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_model_dir(model_dir: str | Path) -> Path:
    """A model folder, or a train artifact whose model/ holds it."""
    d = Path(model_dir)
    if not d.is_dir():
        raise StageError(f"no model folder at {d}")
    if (d / "model").is_dir() and not (d / "config.json").exists() and not (d / "adapter_config.json").exists():
        d = d / "model"
    return d


def model_card(model_dir: str | Path) -> dict:
    """The model folder's worldpm.json (what the train stage recorded: objective, reward token, pad token, and the
    text path the model was trained with: ``text`` normalisation and ``render`` settings), or {} for a folder
    worldpm did not write. A worldpm.json that is not JSON is an error naming it."""
    f = resolve_model_dir(model_dir) / "worldpm.json"
    if not f.is_file():
        return {}
    try:
        card = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise StageError(f"{f}: not valid JSON ({e.msg}, line {e.lineno})") from None
    return card if isinstance(card, dict) else {}


def load_model_dir(model_dir: str | Path, device: str | None = None, tokenizer_dir: str | Path | None = None):
    """(model, tokenizer, pad_id) for scoring. The pad id is the model config's: decoders find the reward token as
    the last token that is not the config's pad token, so padding must use exactly that id."""
    from worldpm.modeling import models

    d = resolve_model_dir(model_dir)
    try:
        model = models.load_reward_model(d, device=pick_device(device))
        tok = models.load_tokenizer(str(tokenizer_dir or d))
    except models.ModelError as e:
        raise StageError(str(e)) from None
    pad_id = int(model.config.pad_token_id)
    return model, tok, pad_id


def score_sequences(model, seqs: Sequence[Sequence[int]], pad_id: int, batch_size: int, *,
                    padding_side: str = "right", log=None, label: str = "", device: str | None = None) -> np.ndarray:
    """Rewards of token id sequences, in input order, longest first in batches of batch_size; progress every
    ~10% of the work (done/total, rate, ETA) when there are more than a few batches."""
    from worldpm.modeling.models import score_token_ids

    if batch_size < 1:  # a negative size scored nothing and returned np.empty's leftovers as rewards
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(seqs)
    out = np.empty(n, dtype=np.float32)
    if n == 0:
        return out
    order = np.argsort(np.fromiter((len(s) for s in seqs), dtype=np.int64, count=n), kind="stable")[::-1]
    nb = math.ceil(n / batch_size)
    per_chunk = max(1, math.ceil(nb / 10)) * batch_size
    t0 = time.perf_counter()
    for lo in range(0, n, per_chunk):
        idx = order[lo:lo + per_chunk]
        out[idx] = score_token_ids(model, [seqs[i] for i in idx], pad_id, batch_size=batch_size, device=device,
                                   padding_side=padding_side)
        done = min(lo + per_chunk, n)
        if log is not None and nb > 4:
            el = time.perf_counter() - t0
            rate = done / max(el, 1e-9)
            log.info("evaluate: %s: scored %d/%d sequences (%.1f/s, ETA %.0fs)", label, done, n, rate,
                     (n - done) / max(rate, 1e-9))
    return out


def score_pairs(model, chosen_ids: Sequence[Sequence[int]], rejected_ids: Sequence[Sequence[int]], pad_id: int,
                batch_size: int, **kw) -> tuple[np.ndarray, np.ndarray]:
    """(chosen scores, rejected scores): both sides in one length-sorted pass."""
    s = score_sequences(model, list(chosen_ids) + list(rejected_ids), pad_id, batch_size, **kw)
    return s[:len(chosen_ids)], s[len(chosen_ids):]


def _subset_column_present(path: Path) -> bool:
    """Whether the raw file has a `subset` column (RewardBench). The adapters put it in `domain`."""
    name = path.name.lower()
    try:
        if name.endswith((".jsonl", ".ndjson", ".jsonl.gz", ".ndjson.gz")):
            return "subset" in pl.scan_ndjson(path, infer_schema_length=1000).collect_schema().names()
        if name.endswith(".parquet"):
            return "subset" in pl.read_parquet_schema(path)
        if name.endswith(".csv"):
            return "subset" in pl.scan_csv(path).collect_schema().names()
        if name.endswith((".json", ".json.gz")):
            import gzip

            opener = gzip.open if name.endswith(".gz") else open
            with opener(path, "rt") as f:
                data = json.load(f)
            rows = data if isinstance(data, list) else next((v for v in data.values() if isinstance(v, list)), [])
            return any(isinstance(x, dict) and "subset" in x for x in rows[:1000])
    except Exception:  # the adapter reports unreadable files; here only the column matters
        return False
    return False


def read_eval_file(path: str | Path, fmt: str = "auto", name: str | None = None) -> tuple[pl.DataFrame, pl.DataFrame, dict]:
    """(canonical pairs with a `subset` column, rejects, info) of an eval file, via the source adapters."""
    from worldpm.data.sources import AdapterError, read_source_file

    p = Path(path)
    try:
        res = read_source_file(p, fmt, tag=name or p.stem)
        pairs, rejects = pl.collect_all([res.pairs, res.rejects])  # one pass over the file for both
    except AdapterError as e:
        raise StageError(str(e)) from None
    has_subset = _subset_column_present(p)
    if has_subset and pairs.height and pairs["domain"].null_count() == pairs.height:
        raise StageError(f"{p}: has a `subset` column but the adapter kept no subset (domain is empty)")
    pairs = pairs.with_columns(subset=pl.col("domain") if has_subset else pl.lit(None, pl.String))
    if has_subset:  # the subset is not a domain: report it once, as a subset
        pairs = pairs.with_columns(domain=pl.lit(None, pl.String))
    info = {"path": str(p), "format": res.format, "records": int(res.records), "rows_rejected": rejects.height,
            "pairs": pairs.height}
    return pairs, rejects, info


def prepare_pairs(pairs: pl.DataFrame, text: TextPath) -> tuple[pl.DataFrame, dict]:
    """Pairs read from outside the training data, normalised as the normalise stage normalises training text.

    (normalised pairs, text info: TextPath.describe + texts_changed, the number of prompt/chosen/rejected
    texts the normalisation changed). Nothing is dropped: a benchmark keeps every pair, even one whose text
    normalises to empty (the clean stage would reject it from training)."""
    norm = normalize_frame(pairs, text.normalize_markup)
    changed = 0
    if pairs.height:
        msgs = lambda df: df["prompt"].list.eval(pl.element().struct.field("content")).list.join("\x03")  # noqa: E731
        changed = int(msgs(pairs).ne_missing(msgs(norm)).sum() + pairs["chosen"].ne_missing(norm["chosen"]).sum()
                      + pairs["rejected"].ne_missing(norm["rejected"]).sum())
    return norm, {**text.describe(), "texts_changed": changed}


def evaluate_pairs(scorer, pairs: pl.DataFrame, text: TextPath, *, bins: int = 10, set_name: str = "eval",
                   log=None, num_proc: int = 1) -> tuple[dict, pl.DataFrame]:
    """(metrics.summarize of the set + truncated count + text info, predictions) for canonical pairs with optional
    subset, through the training text path (prepare_pairs, then render + tokenize), scored by `scorer` (a
    RewardScorer, or an ImplicitReward for a DPO policy)."""
    pairs, text_info = prepare_pairs(pairs, text)
    t = tokenize_pairs(pairs, scorer.tok, text.render, num_proc=num_proc)
    if log is not None:
        log.info("evaluate: %s: %d pairs, %s normalisation changed %d texts, %d truncated to %d tokens", set_name,
                 t.height, text_info["normalization"], text_info["texts_changed"], int(t["truncated"].sum() or 0),
                 text.render.max_length)
    c, r = scorer.rewards(t, set_name, cached_reference=False)
    if "subset" not in t.columns:
        t = t.with_columns(subset=pl.lit(None, pl.String))
    preds = predictions(set_name, t, c, r, t["chosen_response_tokens"], t["rejected_response_tokens"])
    return {**summarize_predictions(preds, bins), "text": text_info}, preds


def predictions(set_name: str, t: pl.DataFrame, c: np.ndarray, r: np.ndarray, clen, rlen) -> pl.DataFrame:
    n = t.height
    cols = {k: (t[k] if k in t.columns else pl.Series(k, [None] * n, dtype=PRED_SCHEMA[k]))
            for k in ("pair_id", "source", "domain", "subset", "margin", "truncated")}
    df = pl.DataFrame({
        "set": pl.Series("set", [set_name] * n, dtype=pl.String),
        **{k: v.cast(PRED_SCHEMA[k]) for k, v in cols.items()},
        "chosen_score": pl.Series(c, dtype=pl.Float32), "rejected_score": pl.Series(r, dtype=pl.Float32),
        "chosen_len": pl.Series(clen, dtype=pl.Int32), "rejected_len": pl.Series(rlen, dtype=pl.Int32),
        "correct": pl.Series(M.pair_correct(c, r), dtype=pl.Float32),
    })
    return df.select([pl.col(k).cast(v) for k, v in PRED_SCHEMA.items()])


def summarize_predictions(preds: pl.DataFrame, bins: int) -> dict:
    """metrics.summarize over a predictions frame (what metrics.json holds, so it can be recomputed from it)."""
    def col(k):
        s = preds[k]
        return None if s.null_count() == s.len() else s.to_list()

    out = M.summarize(preds["chosen_score"].to_numpy().astype(np.float64),
                      preds["rejected_score"].to_numpy().astype(np.float64),
                      source=col("source"), domain=col("domain"), subset=col("subset"),
                      chosen_chars=col("chosen_len"), rejected_chars=col("rejected_len"), bins=bins,
                      length_unit="response tokens")
    out["truncated"] = int(preds["truncated"].sum() or 0)
    return out


class RewardScorer:
    """Rewards of tokenized pairs under a reward model (objective bt): the model's head at the reward token."""

    tag: dict = {}

    def __init__(self, model_dir: Path, tok_dir: Path | None, device: str | None, batch_size: int,
                 padding_side: str = "right", log=None):
        self.model, self.tok, self.pad_id = load_model_dir(
            model_dir, device=device, tokenizer_dir=tok_dir / "tokenizer" if tok_dir is not None else None)
        self.device, self.batch_size, self.padding_side, self.log = device, batch_size, padding_side, log

    def rewards(self, t: pl.DataFrame, label: str, cached_reference: bool = False) -> tuple[np.ndarray, np.ndarray]:
        return score_pairs(self.model, t["chosen_ids"].to_list(), t["rejected_ids"].to_list(), self.pad_id,
                           self.batch_size, padding_side=self.padding_side, log=self.log, label=label,
                           device=self.device)


class ImplicitReward:
    """Rewards of tokenized pairs under a DPO policy: beta * (log pi - log ref) of the responses. The policy is
    loaded here; the reference's log-probs are the ref_logps artifact's (test split) or computed by the reference
    loaded lazily (eval sets), both through logps.response_logps, the code that filled the cache."""

    def __init__(self, d, tok_dir: Path, train_dir: Path, ref_ref: ArtifactRef, device: str, log):
        """d: the evaluate stage's DpoScoring (beta, logp_average, reference, precision, tokens_per_batch)."""
        from worldpm.modeling import logps, models

        self.beta, self.average, self.ref_cfg = float(d.beta), bool(d.logp_average), d.reference
        self.tag = {"score": "dpo_implicit_reward", "beta": self.beta, "logp_average": self.average}
        self.ref_ref, self.device, self.log = ref_ref, device, log
        try:
            self.tok = models.load_tokenizer(str(tok_dir / "tokenizer"))
        except models.ModelError as e:
            raise StageError(f"evaluate: {e}") from None
        self.pad_id = self.tok.pad_token_id
        # the policy in the dtype the reference was computed in, so that rewards start from 0
        self.dtype = logps.pick_dtype(d.precision, device)
        try:
            self.policy = logps.load_causal_lm(resolve_model_dir(train_dir), dtype=self.dtype, device=device)
        except models.ModelError as e:
            raise StageError(f"evaluate: {e}") from None
        self.reference = None
        self.tokens_per_batch = logps.tokens_per_batch(device, d.tokens_per_batch)

    def logps(self, model, t: pl.DataFrame, label: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        from worldpm.modeling.logps import response_logps

        n = t.height
        plen = t["prompt_len"].to_numpy().astype(np.int64)
        s, c = response_logps(model, token_arrays(t["chosen_ids"]) + token_arrays(t["rejected_ids"]),
                              np.concatenate([plen, plen]), self.pad_id, self.device, self.tokens_per_batch,
                              log=self.log, label=label)
        return s[:n], s[n:], c[:n], c[n:]

    def reference_logps(self, t: pl.DataFrame, label: str, cached: bool):
        from worldpm.data.splits import read_split

        if cached:
            r = read_split(self.ref_ref, label)
            if r["pair_id"].to_list() != t["pair_id"].to_list():
                raise StageError(f"evaluate: {self.ref_ref.path}/{label}.parquet does not hold the tokenize "
                                 f"artifact's {label} pairs in order (another tokenize artifact?)")
            return (r["ref_chosen_logp"].to_numpy(), r["ref_rejected_logp"].to_numpy(),
                    r["chosen_tokens"].to_numpy(), r["rejected_tokens"].to_numpy())
        if self.reference is None:
            from worldpm.modeling.logps import load_reference

            self.reference = load_reference(self.ref_cfg, self.tok, self.device, self.dtype)
        return self.logps(self.reference, t, f"{label} (reference)")

    def rewards(self, t: pl.DataFrame, label: str, cached_reference: bool) -> tuple[np.ndarray, np.ndarray]:
        pc, pr, nc, nr = self.logps(self.policy, t, label)
        rc, rr, mc, mr = self.reference_logps(t, label, cached_reference)
        if not (np.array_equal(nc, mc) and np.array_equal(nr, mr)):
            raise StageError(f"evaluate: {label}: the policy and the reference count different response tokens")
        if self.average:
            dc, dr = np.maximum(nc, 1), np.maximum(nr, 1)
            pc, pr, rc, rr = pc / dc, pr / dr, rc / dc, rr / dr
        return self.beta * (pc - rc), self.beta * (pr - rr)
