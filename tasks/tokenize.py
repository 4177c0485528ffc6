"""tokenize: render each pair with the model's chat template (or the plain template) and tokenize it, int32 ids.

The layout of a sequence, the truncation policy and the reward token are worldpm/data/render.py's, shared with
evaluate and `worldpm score`. Output per split (train, eval, test): ``<split>.parquet`` with the columns of
OUT_SCHEMA; ``tokenizer/`` (the tokenizer used, pad token set, right padding); ``rejects.parquet`` (pairs dropped
by ``overlength: drop``, with both lengths). The manifest counts pairs in/out, truncated and dropped per split.
"""
from __future__ import annotations

import time
from pathlib import Path

import polars as pl

from worldpm.config import PipelineConfig, StageConfig, Strict, TokenizeConfig
from worldpm.data.render import IDS, ParallelEncoder, Renderer, renderer, tokenize_frame
from worldpm.data.splits import SPLITS, data_files
from worldpm.data.textpath import RenderSettings
from worldpm.engine import StageSpec
from worldpm.errors import StageError
from worldpm.store import ArtifactRef

OUT_SCHEMA = {
    "pair_id": pl.String, "source": pl.String, "domain": pl.String, "group_id": pl.String, "margin": pl.Float64,
    "chosen_ids": IDS, "rejected_ids": IDS, "chosen_len": pl.Int32, "rejected_len": pl.Int32,
    "truncated": pl.Boolean,
    # tokens before the response (head + prompt + assistant header), the same for both sides: what a policy
    # objective (DPO) masks out of its log-probs
    "prompt_len": pl.Int32,
    # the responses' token counts before truncation (template excluded): what length bias, length control and
    # train.length_balance / length_debias measure (a cut sequence no longer shows which response was longer)
    "chosen_response_tokens": pl.Int32, "rejected_response_tokens": pl.Int32,
}
REJECT_SCHEMA = {"pair_id": pl.String, "split": pl.String, "reason": pl.String, "chosen_len": pl.Int32,
                 "rejected_len": pl.Int32}


class Tokenizer(Strict):
    """What decides the tokenizer (model.tokenizer, else the model's own); weights and training settings do not
    change the token ids."""

    name_or_path: str
    revision: str | None = None
    trust_remote_code: bool = False


class TokenizeStageConfig(StageConfig):
    tokenize: TokenizeConfig
    tokenizer: Tokenizer

    @property
    def render(self) -> RenderSettings:
        """The text path's template and cut (the part of TextPath.of(cfg) this stage applies)."""
        return RenderSettings.of(self.tokenize)


def stage_config(cfg: PipelineConfig) -> TokenizeStageConfig:
    m = cfg.model
    tokenizer = Tokenizer(name_or_path=m.tokenizer or m.name_or_path, revision=None if m.tokenizer else m.revision,
                          trust_remote_code=m.trust_remote_code)
    return TokenizeStageConfig(tokenize=cfg.tokenize, tokenizer=tokenizer)


def run(scfg: TokenizeStageConfig, inputs: dict[str, ArtifactRef], out: Path, log, work: Path) -> dict:
    from worldpm.modeling import models

    t = scfg.tokenize
    try:
        tok = models.load_tokenizer(scfg.tokenizer)
    except models.ModelError as e:
        raise StageError(f"tokenize: {e}") from None
    tok.padding_side = "right"
    tok.save_pretrained(out / "tokenizer")
    try:
        r = renderer(tok, scfg.render, what="tokenize.max_length")
    except StageError as e:
        raise StageError(f"tokenize: {e}") from None
    max_length = t.max_length
    info = r.describe()
    # BERT-style tokenizers put a [CLS] first; the model (not the tokenizer) decides, this is for the manifest
    reward_token = "last" if r.chat or getattr(tok, "cls_token", None) is None else "first"
    log.info("tokenize: %s template, head %r, suffix %r, reward token %s, max_length %d, policy %s",
             info["template"], r.head_text, r.suffix_text, reward_token, max_length, t.overlength)
    files = data_files(inputs["shard"])
    enc = ParallelEncoder(tok, t.num_proc)
    splits: dict[str, dict] = {}
    rejects: list[pl.DataFrame] = []
    t0 = time.perf_counter()
    try:
        for split in SPLITS:
            splits[split] = tokenize_split(split, files.get(split, []), r, enc, t, out, rejects, log)
    finally:
        enc.close()
    for split, c in splits.items():  # emptied here: fail here, not in the trainer or in an evaluation of 0 pairs
        if c["rows_in"] and not c["rows_out"]:
            msg = (f"tokenize: every pair of the {split} split ({c['rows_in']}) is longer than tokenize.max_length="
                   f"{max_length} tokens and tokenize.overlength=drop removed it; raise max_length or set overlength: "
                   "truncate")
            if split == "eval":  # only the end-of-training eval metrics read it
                log.warning("%s; train_summary.json will have no eval metrics", msg)
            else:
                raise StageError(msg)
    rej_df = pl.concat(rejects) if rejects else pl.DataFrame(schema=REJECT_SCHEMA)
    rej_df.write_parquet(out / "rejects.parquet", compression="zstd")
    total = {k: sum(s[k] for s in splits.values()) for k in ("rows_in", "rows_out", "truncated", "dropped")}
    return {
        "rows_in": total["rows_in"], "rows_out": total["rows_out"], "rows_rejected": total["dropped"],
        "truncated": total["truncated"], "dropped": total["dropped"], "splits": splits,
        "pad_token_id": tok.pad_token_id, "padding_side": "right", "max_length": max_length,
        "overlength": t.overlength, "reward_token": reward_token,
        "template": info,
        # the settings a scorer needs to render new text as this artifact's (train copies them into worldpm.json)
        "render": {**scfg.render.model_dump(), "overlength": t.overlength},
        "pairs_per_s": round(total["rows_in"] / max(time.perf_counter() - t0, 1e-9), 1),
    }


def tokenize_split(split: str, paths: list[str], r: Renderer, enc: ParallelEncoder, tc: TokenizeConfig, out: Path,
                   rejects: list[pl.DataFrame], log) -> dict:
    """Stream one split's shard files in batches into <out>/<split>.parquet; over-length pairs are truncated or
    appended to `rejects`. Returns the split's counts."""
    import pyarrow.parquet as pq

    max_length = tc.max_length
    drop = tc.overlength == "drop"
    path = out / f"{split}.parquet"
    writer = None
    n_in = n_out = n_trunc = n_drop = tokens = 0
    t0 = time.perf_counter()
    batches = pl.scan_parquet(paths).collect_batches(chunk_size=tc.batch_size, engine="streaming") \
        if paths else []
    for batch in batches:
        if batch.height == 0:
            continue
        t = tokenize_frame(batch, r, enc, max_length)
        n_in += t.height
        if drop:
            over = pl.col("_full_c").gt(max_length) | pl.col("_full_r").gt(max_length)
            rej = t.filter(over)
            if rej.height:
                rejects.append(rej.select(
                    "pair_id", pl.lit(split).alias("split"), pl.lit("overlength").alias("reason"),
                    pl.col("_full_c").cast(pl.Int32).alias("chosen_len"),
                    pl.col("_full_r").cast(pl.Int32).alias("rejected_len")))
                n_drop += rej.height
            t = t.filter(~over)
        else:
            n_trunc += int(t["truncated"].sum())
        res = t.select([pl.col(c).cast(dt) for c, dt in OUT_SCHEMA.items()])
        tokens += int(res["chosen_len"].sum() or 0) + int(res["rejected_len"].sum() or 0)
        table = res.to_arrow()
        if writer is None:
            writer = pq.ParquetWriter(path, table.schema, compression="zstd")
        writer.write_table(table)
        n_out += res.height
        dt = time.perf_counter() - t0  # progress on the terminal only once the split takes a while
        log.info("tokenize: %s: %d pairs (%.0f pairs/s)", split, n_in, n_in / max(dt, 1e-9),
                 extra={"worldpm_detail": dt < 10})
    if writer is None:
        pl.DataFrame(schema=OUT_SCHEMA).write_parquet(path, compression="zstd")
    else:
        writer.close()
    log.info("tokenize: %s: %d in, %d out, %d truncated, %d dropped (over %d tokens)",
             split, n_in, n_out, n_trunc, n_drop, max_length)
    return {"rows_in": n_in, "rows_out": n_out, "truncated": n_trunc, "dropped": n_drop, "tokens": tokens}


STAGE = StageSpec(config=stage_config, run=run)
