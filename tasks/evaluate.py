"""evaluate: score the test split and every configured eval set with the trained model.

Inputs: the tokenize artifact (``<tokenize>/test.parquet`` with chosen_ids / rejected_ids, and the tokenizer it used
in ``<tokenize>/tokenizer/``) and the train artifact (``<train>/model/``). Eval sets (``evaluate.eval_sets`` in
pipeline.yaml: RewardBench's ``prompt, chosen, rejected, subset`` or any format the source adapters read) are read
with the source adapters, normalised as the normalise stage normalises training text (clean.normalize_markup), and
rendered + tokenized by worldpm/data/render.py with the tokenize stage's settings, so they go through exactly the
text path the training pairs went through. Eval sets are always truncated, never dropped (a benchmark keeps all its
pairs); the counts (truncated, texts the normalisation changed) are reported per set, and the manifest records the
normalisation and the template.

Output:
    metrics.json       {"test": metrics.summarize(...), "<eval set>": {...}}, plus per set: truncated,
                       and for eval sets: path, format, records, rows_rejected
    predictions.parquet  one row per scored pair (worldpm.modeling.scoring.PRED_SCHEMA)
    rejects.parquet    records of eval sets that could not become a pair (the adapters' rejects, with reason)

Length bias and length control (length-controlled accuracy, margin/length correlation, the length rule) are measured
in response tokens before truncation, on the test split and on eval sets alike.

With ``train.objective: dpo`` the trained model is a policy (a causal LM), not a reward model: the score of a
response is DPO's implicit reward beta * (log pi(y|x) - log ref(y|x)) (summed response log-probs, or per-token
means with train.logp_average), so accuracy is the implicit reward accuracy and every other metric (bt_loss, ECE,
length bias ...) is computed on those rewards. The test split's reference log-probs come from the cached
``ref_logps`` artifact; eval sets' are computed here with the same frozen reference. Each set's metrics carry
``score: dpo_implicit_reward`` and ``beta``. With bt the ``ref_logps`` input is a marker and is not read.

After a new evaluation is committed, `after_commit` appends the run to the history of this pipeline name and runs
the regression guard (worldpm/report/history.py).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import polars as pl

from worldpm.config import PipelineConfig, ReferenceModel, StageConfig, Strict, dpo_reference, runtime_field
from worldpm.data.evalsets import EvalSetFile, eval_set_files
from worldpm.data.splits import read_split
from worldpm.data.tokstore import TokenStore, TokenStoreError, store_path
from worldpm.data.textpath import TextPath
from worldpm.engine import StageSpec
from worldpm.errors import ConfigError, StageError
from worldpm.store import ArtifactRef

# what evaluate reads of the test split's Parquet file: every column but the token ids (mapped from the token store)
TEST_COLUMNS = ("pair_id", "source", "domain", "margin", "truncated", "prompt_len", "chosen_response_tokens",
                "rejected_response_tokens")
REJECTS_SCHEMA = {"set": pl.String, "file": pl.String, "line": pl.Int64, "reason": pl.String, "detail": pl.String}


class DpoScoring(Strict):
    """How a DPO policy scores a response: beta * (log pi - log ref) against this reference."""

    beta: float
    logp_average: bool
    reference: ReferenceModel
    precision: str
    tokens_per_batch: int | None = runtime_field(None)


class EvaluateStageConfig(StageConfig):
    SECTION = "evaluate"
    batch_size: int
    ece_bins: int
    eval_sets: list[EvalSetFile]
    # how eval-set text is normalised, rendered and cut: the training text path (its parts may change while the
    # tokenize output does not, e.g. a larger max_length with no long pair, so they are part of this key too)
    text: TextPath
    dpo: DpoScoring | None = None  # only with objective dpo: a BT evaluation's key does not move with DPO settings


def stage_config(cfg: PipelineConfig) -> EvaluateStageConfig:
    e = cfg.evaluate
    sets = eval_set_files(e.eval_sets)
    t = cfg.train
    dpo = DpoScoring(beta=t.beta, logp_average=t.logp_average, reference=dpo_reference(cfg), precision=t.precision,
                     tokens_per_batch=t.ref_tokens_per_batch) if t.objective == "dpo" else None
    return EvaluateStageConfig(batch_size=e.batch_size, ece_bins=e.ece_bins, eval_sets=sets, text=TextPath.of(cfg),
                               dpo=dpo)


def preflight(cfg: PipelineConfig) -> None:
    """Before a run starts: the test split is what this stage scores (the engine's preflight)."""
    if cfg.shard.test == 0:
        raise ConfigError("evaluate scores the test split, and shard.test is 0: give shard.test a fraction above 0 "
                          "(shard.train + shard.eval + shard.test = 1), or stop the run before evaluate (--until "
                          "train)")


def run(scfg: EvaluateStageConfig, inputs: dict[str, ArtifactRef], out: Path, log, work: Path) -> dict:
    from worldpm.modeling.scoring import (
        ImplicitReward,
        RewardScorer,
        evaluate_pairs,
        pick_device,
        predictions,
        read_eval_file,
        summarize_predictions,
    )

    tok_dir, train_dir = Path(inputs["tokenize"].path), Path(inputs["train"].path)
    # the test split's per-pair columns (small) in memory, its tokens memory-mapped from the token store: only the
    # sequences of the batch being scored are read
    try:
        test_store = TokenStore(store_path(tok_dir, "test"), madvise_random=True)
    except TokenStoreError as e:
        raise StageError(f"evaluate: {e}") from None
    test = read_split(inputs["tokenize"], "test", columns=list(TEST_COLUMNS))
    if test.height != len(test_store):
        raise StageError(f"evaluate: {store_path(tok_dir, 'test')} holds {len(test_store)} pairs, test.parquet "
                         f"{test.height}: rerun tokenize")
    if test.height == 0:  # shard and tokenize stop on a test split they emptied; this is shard.test: 0
        raise StageError(f"evaluate: the test split has no pairs ({tok_dir / 'test.parquet'}): an evaluation of 0 "
                         "pairs measures nothing; give shard.test a fraction above 0")
    device = pick_device()
    bins = scfg.ece_bins
    if scfg.dpo is not None:
        ref_ref = inputs.get("ref_logps")
        if ref_ref is None or ref_ref.manifest().get("objective") != "dpo":
            raise StageError(f"evaluate: train.objective dpo needs the ref_logps artifact of a dpo config "
                             f"({ref_ref.path if ref_ref else 'none given'})")
        scorer = ImplicitReward(scfg.dpo, tok_dir, train_dir, ref_ref, device, log)
        log.info("evaluate: DPO policy %s on %s: implicit reward beta * log(pi/ref), beta %g", train_dir / "model",
                 device, scorer.beta)
    else:
        tman = inputs["tokenize"].manifest()
        scorer = RewardScorer(train_dir, tok_dir, device, scfg.batch_size, tman.get("padding_side", "right"), log)
        if tman.get("pad_token_id") is not None and int(tman["pad_token_id"]) != scorer.pad_id:
            raise StageError(f"evaluate: the model's pad_token_id {scorer.pad_id} ({train_dir}/model/config.json) "
                             f"differs from the tokenizer's {tman['pad_token_id']} ({tok_dir}/tokenizer)")
        log.info("evaluate: model %s on %s, batch %d", train_dir / "model", device, scorer.batch_size)

    metrics: dict[str, dict] = {}
    preds: list[pl.DataFrame] = []
    # test split: already tokenized by the tokenize stage, exactly as training saw its pairs
    test = test.with_columns(subset=pl.lit(None, pl.String))
    c, r = scorer.rewards(test, "test", cached_reference=True, seqs=test_store.sequences())
    tp = predictions("test", test, c, r, test["chosen_response_tokens"], test["rejected_response_tokens"])
    metrics["test"] = {**summarize_predictions(tp, bins), **scorer.tag,
                       "text": {**scfg.text.describe(), "by": "the normalise stage"}}
    preds.append(tp)
    log.info("evaluate: test: %d pairs, accuracy %s, BT loss %s", tp.height, _fmt(metrics["test"]["accuracy"]),
             _fmt(metrics["test"]["bt_loss"]))

    rejects: list[pl.DataFrame] = []
    for es in scfg.eval_sets:
        name = es.name
        pairs, rej, info = read_eval_file(es.path, es.format, name)
        if rej.height:
            rejects.append(rej.select(pl.lit(name).alias("set"), "file", "line", "reason", "detail"))
            log.warning("evaluate: %s: %d record(s) could not become a pair (rejects.parquet)", name, rej.height)
        summary, p = evaluate_pairs(scorer, pairs, scfg.text, bins=bins, set_name=name, log=log)
        metrics[name] = {**summary, **info, **scorer.tag, **({"category": es.category} if es.category else {})}
        preds.append(p)
        log.info("evaluate: %s: %d pairs, accuracy %s%s", name, p.height, _fmt(summary["accuracy"]),
                 "".join(f", {k} {_fmt(v['accuracy'])}" for k, v in summary["sections"].items()))
    template = inputs["tokenize"].manifest().get("template")
    return {**_write(out, metrics, preds, rejects, device), "text": scfg.text.describe(),
            **({"template": template} if template else {}),
            **({"score": "dpo_implicit_reward"} if scfg.dpo is not None else {})}


def after_commit(cfg: PipelineConfig, ref: ArtifactRef, log) -> None:
    """The run's line in the history of this pipeline name, the trend plot and the regression guard (a history of
    runs, not a function of one run's inputs: it lives beside the store, not in it). A cached evaluation is the
    same model on the same data: nothing new to record, so this runs only after a new artifact."""
    from worldpm.report.history import after_evaluate

    root = Path(ref.path).parents[1]  # the store the artifact went to (<root>/evaluate/<key>): its history, even
    if Path(cfg.artifacts_dir).resolve() != root.resolve():  # when a caller hands the engine another store
        cfg = cfg.model_copy(update={"artifacts_dir": str(root)})
    if cfg.train.report_to:
        _track_final(root, ref, log)
    after_evaluate(cfg, ref, log)


def _track_final(root: Path, ref: ArtifactRef, log) -> None:
    """train.report_to: this evaluation's metrics into the tracker runs of the model's training run (its record in
    <root>/tracking/runs/<train key>.json), at its last step, tagged with the evaluate key. A tracker is a
    convenience: a failure here is a warning, never a failed run."""
    from worldpm.modeling.tracking import log_final_metrics, read_record

    train_key = (ref.manifest().get("upstream") or {}).get("train", {}).get("key")
    record = read_record(root / "tracking", train_key) if train_key else {}
    if not record:
        log.info("report_to: no tracker run recorded for train %s (trained before train.report_to was set); final "
                 "metrics not logged", train_key)
        return
    try:
        metrics = json.loads((Path(ref.path) / "metrics.json").read_text())
        done = log_final_metrics(record, metrics, int(record.get("steps") or 0), tags={"evaluate_key": ref.key})
        log.info("report_to: final metrics of %d set(s) logged to %s (run %s)", len(metrics), ", ".join(done),
                 record.get("run_name"))
    except Exception as e:  # noqa: BLE001
        log.warning("report_to: final metrics not logged: %s: %s", type(e).__name__, e)


def _write(out: Path, metrics: dict, preds: list[pl.DataFrame], rejects: list[pl.DataFrame], device: str) -> dict:
    from worldpm.modeling.scoring import PRED_SCHEMA

    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=False))
    allp = pl.concat(preds) if preds else pl.DataFrame(schema=PRED_SCHEMA)
    allp.write_parquet(out / "predictions.parquet", compression="zstd")
    rj = pl.concat(rejects) if rejects else pl.DataFrame(schema=REJECTS_SCHEMA)
    rj.write_parquet(out / "rejects.parquet", compression="zstd")
    return {
        "rows_out": allp.height,
        "rows_rejected": rj.height,
        "sets": {k: {"n": v["n"], "accuracy": v["accuracy"], "accuracy_ci": v.get("accuracy_ci"),
                     "lc_accuracy": v.get("lc_accuracy"), "margin_length_corr": v.get("margin_length_corr"),
                     "length_rule_accuracy": v.get("length_rule_accuracy"), "bt_loss": v["bt_loss"]}
                 for k, v in metrics.items()},
        "test_accuracy": metrics["test"]["accuracy"],
        "device": device,
    }


def _fmt(x: Any) -> str:
    return "-" if x is None else f"{x:.4f}"


STAGE = StageSpec(config=stage_config, run=run, after_commit=after_commit, preflight=preflight)
