"""ref_logps: the frozen reference model's log-probs of every pair's chosen and rejected response, computed once.

DPO compares the policy with a frozen reference; the reference's side of that comparison depends only on the
reference weights and the token ids, so it is a stage of its own, cached like every stage: changing beta, the loss
variant, the learning rate or the number of steps reuses it (its key holds the reference model and the tokenize
artifact's digest, nothing of the training settings). The reference is ``train.reference`` when set, otherwise the
policy's own starting point (``model.name_or_path`` / ``model.from_config``; a random-initialised ``from_config``
model is drawn from ``train.seed``, exactly as the trainer draws the policy).

Output per split (train, eval, test), rows in the tokenize split's order:
    <split>.parquet   pair_id, ref_chosen_logp, ref_rejected_logp (Float64: the SUM of response-token log-probs,
                      prompt and template head masked, end marker included; see worldpm/modeling/logps.py),
                      chosen_tokens, rejected_tokens (Int32: the response tokens summed over, for length-averaged
                      DPO: mean = sum / tokens)

With ``train.objective: bt`` nothing is needed: the artifact is a one-line marker (objective.json) whose content
never changes, so the BT training key does not move when DPO settings or this file change.

Batches are length-sorted sequences up to a token budget (``train.ref_tokens_per_batch``, default 16k on CPU,
64k on a GPU; not part of the key: it changes the values only at float rounding level). fp32 on CPU; on a GPU bf16
when train.precision is auto/bf16 (as the policy trains), fp32 when it is fp32. One process, one device.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import polars as pl

from worldpm.config import PipelineConfig, ReferenceModel, StageConfig, dpo_reference, runtime_field
from worldpm.data.splits import SPLITS, token_arrays
from worldpm.engine import StageSpec
from worldpm.errors import StageError
from worldpm.store import ArtifactRef

OUT_SCHEMA = {"pair_id": pl.String, "ref_chosen_logp": pl.Float64, "ref_rejected_logp": pl.Float64,
              "chosen_tokens": pl.Int32, "rejected_tokens": pl.Int32}
MARKER = "objective.json"


class RefLogpsConfig(StageConfig):
    objective: str
    reference: ReferenceModel | None = None  # dpo only
    precision: str | None = None             # dpo only
    tokens_per_batch: int | None = runtime_field(None)


def stage_config(cfg: PipelineConfig) -> RefLogpsConfig:
    t = cfg.train
    if t.objective != "dpo":
        return RefLogpsConfig(objective=t.objective)
    return RefLogpsConfig(objective="dpo", reference=dpo_reference(cfg), precision=t.precision,
                          tokens_per_batch=t.ref_tokens_per_batch)


def run(scfg: RefLogpsConfig, inputs: dict[str, ArtifactRef], out: Path, log, work: Path) -> dict:
    if scfg.objective != "dpo" or scfg.reference is None:
        (out / MARKER).write_text(json.dumps({"objective": scfg.objective}) + "\n")
        log.info("ref_logps: train.objective is %s: no reference log-probs needed", scfg.objective)
        return {"objective": scfg.objective, "rows_in": 0, "rows_out": 0, "rows_rejected": 0}

    import torch

    from worldpm.modeling import logps, models

    tok_dir = Path(inputs["tokenize"].path)
    try:
        tok = models.load_tokenizer(str(tok_dir / "tokenizer"))
    except models.ModelError as e:
        raise StageError(f"ref_logps: {e}") from None
    pad_id = tok.pad_token_id
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = logps.pick_dtype(scfg.precision or "auto", device)
    tokens_per_batch = logps.tokens_per_batch(device, scfg.tokens_per_batch)
    ref_cfg = scfg.reference
    t0 = time.perf_counter()
    try:
        model = logps.load_reference(ref_cfg, tok, device, dtype)
    except StageError as e:
        raise StageError(f"ref_logps: {e}") from None
    n_params = sum(p.numel() for p in model.parameters())
    log.info("ref_logps: reference %s (%s parameters) on %s, %s, %d tokens per batch",
             ref_cfg.name_or_path if not ref_cfg.from_config else
             f"from_config {ref_cfg.from_config.get('model_type')} (seed {ref_cfg.init_seed})",
             f"{n_params:,}", device, str(dtype).replace("torch.", ""), tokens_per_batch)
    (out / MARKER).write_text(json.dumps({"objective": "dpo", "reference": ref_cfg.model_dump(mode="json")},
                                         sort_keys=True) + "\n")

    splits: dict[str, dict] = {}
    tot = tot_tokens = 0
    for split in SPLITS:
        path = tok_dir / f"{split}.parquet"
        if not path.is_file():
            raise StageError(f"ref_logps: the tokenize artifact has no {split}.parquet ({path})")
        names = pl.read_parquet_schema(path)
        if "prompt_len" not in names:
            raise StageError(f"ref_logps: {path} has no prompt_len column (a tokenize artifact from before DPO); "
                             "rerun tokenize")
        df = pl.read_parquet(path, columns=["pair_id", "chosen_ids", "rejected_ids", "prompt_len"])
        n = df.height
        seqs = token_arrays(df["chosen_ids"]) + token_arrays(df["rejected_ids"])
        plen = df["prompt_len"].to_numpy().astype(np.int64)
        sums, counts = logps.response_logps(model, seqs, np.concatenate([plen, plen]), pad_id, device,
                                      tokens_per_batch, log=log, label=split)
        bad = ~np.isfinite(sums)
        if bad.any():
            ids = [df["pair_id"][int(i) % n] for i in np.flatnonzero(bad)[:8]]
            raise StageError(f"ref_logps: {split}: non-finite reference log-probs for pair ids {', '.join(ids)} "
                             f"({path})")
        res = pl.DataFrame({
            "pair_id": df["pair_id"], "ref_chosen_logp": sums[:n], "ref_rejected_logp": sums[n:],
            "chosen_tokens": counts[:n], "rejected_tokens": counts[n:],
        }, schema=OUT_SCHEMA)
        res.write_parquet(out / f"{split}.parquet", compression="zstd")
        toks = int(sum(len(s) for s in seqs))
        splits[split] = {
            "pairs": n, "tokens": toks, "response_tokens": int(counts.sum()),
            "mean_ref_chosen_logp": float(sums[:n].mean()) if n else None,
            "mean_ref_rejected_logp": float(sums[n:].mean()) if n else None,
        }
        log.info("ref_logps: %s: %d pairs, mean reference log-prob chosen %s, rejected %s", split, n,
                 _fmt(splits[split]["mean_ref_chosen_logp"]), _fmt(splits[split]["mean_ref_rejected_logp"]))
        tot += n
        tot_tokens += toks
    seconds = time.perf_counter() - t0
    return {
        "objective": "dpo", "rows_in": tot, "rows_out": tot, "rows_rejected": 0, "splits": splits,
        "device": device, "dtype": str(dtype).replace("torch.", ""), "reference_parameters": n_params,
        "tokens_per_s": round(tot_tokens / max(seconds, 1e-9), 1),
    }


def _fmt(x) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


STAGE = StageSpec(config=stage_config, run=run)
