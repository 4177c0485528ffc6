"""`worldpm evaluate` and `worldpm score`: any HF sequence-classification reward model, outside the DAG.

    worldpm evaluate --model DIR --data FILE [--format NAME] [--json] [--batch-size N] [--max-length N]
                     [--predictions FILE]
    worldpm score --model DIR [FILE] [--output FILE] [--batch-size N] [--max-length N]

DIR is a model folder (config.json + weights + tokenizer) or a train artifact holding model/. Text goes through the
training text path: normalised as the normalise stage normalised the training text (`--normalize`; by default what the
model folder's worldpm.json records, else clean's default, markup), rendered the way the tokenize stage renders it
(the tokenizer's chat template, else `--template`) and cut to --max-length keeping the end of the response and the
reward token. --template, --max-length and the system prompt default to what worldpm.json records (the tokenize
settings the model was trained with), else to pipeline.yaml's defaults.

score reads JSON lines from FILE or stdin: {prompt, chosen, rejected} rows get chosen_score and rejected_score,
{prompt, response} rows get score; `prompt` is a string or a list of {role, content} messages. Every input row is
written back with its score(s) added, in input order, as JSON lines (stdout or --output).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import logging
import sys
from pathlib import Path

import polars as pl

from worldpm.config import SOURCE_FORMATS, EvaluateConfig, PipelineConfig, TokenizeConfig
from worldpm.data.textpath import RenderSettings, TextPath
from worldpm.errors import StageError

log = logging.getLogger("worldpm.evaluate")
_TOK = TokenizeConfig()


def _text_path(args, model, card: dict) -> tuple[TextPath, str]:
    """The text path the model was trained with (its worldpm.json; pipeline.yaml's defaults for what it does not
    record), with --normalize / --max-length / --template / --no-system-prompt on top; and where the normalisation
    came from."""
    text, origin = TextPath.from_card(card, TextPath.of(PipelineConfig()))
    rs = text.render
    max_length = args.max_length
    limit = getattr(model.config, "max_position_embeddings", None)
    if max_length is None:
        max_length = min(rs.max_length, limit) if limit else rs.max_length
    elif limit and max_length > limit:
        raise StageError(f"--max-length {max_length} exceeds the model's max_position_embeddings {limit}")
    render = RenderSettings.of({"max_length": max_length,
                                "plain_template": rs.plain_template if args.template is None else args.template,
                                "system_prompt": None if args.no_system_prompt else rs.system_prompt})
    if args.normalize != "auto":
        markup, why = args.normalize == "markup", "--normalize"
    else:
        markup = text.normalize_markup
        why = ("the model's worldpm.json" if origin["normalize_markup"] != "the default"
               else "clean's default; the model folder records none")
    return TextPath.model_construct(normalize_markup=markup, render=render), why


def _stdout_is_ours(cmd):
    """Run a command with sys.stdout pointing at stderr and hand it the real stdout: libraries print to stdout
    while loading (DeepSpeed's accelerator notice, ...), which would corrupt the JSON this command writes."""
    @functools.wraps(cmd)
    def wrapped(args) -> int:
        real = sys.stdout
        with contextlib.redirect_stdout(sys.stderr):
            return cmd(args, real)
    return wrapped


# ---- evaluate ---------------------------------------------------------------------------------------------------
@_stdout_is_ours
def cmd_evaluate(args, stdout) -> int:
    from worldpm.modeling.scoring import RewardScorer, evaluate_pairs, model_card, read_eval_file

    data = Path(args.data)
    if not data.is_file():
        raise StageError(f"--data {data}: no such file")
    card = model_card(args.model)
    scorer = RewardScorer(args.model, None, args.device, args.batch_size, log=log)
    text, why = _text_path(args, scorer.model, card)
    pairs, rejects, info = read_eval_file(data, args.format, data.stem)
    if rejects.height:
        log.warning("%s: %d record(s) could not become a pair: %s", data, rejects.height,
                    ", ".join(f"{r['reason']} x{r['len']}" for r in
                              rejects.group_by("reason").len().sort("reason").iter_rows(named=True)))
    if pairs.height == 0:
        raise StageError(f"{data}: no pairs to evaluate")
    summary, preds = evaluate_pairs(scorer, pairs, text, bins=args.bins, set_name=data.stem, log=log)
    summary = {**summary, **info, "model": str(Path(args.model).resolve()), "max_length": text.render.max_length}
    summary["text"]["from"] = why
    if args.predictions:
        p = Path(args.predictions)
        if p.suffix == ".parquet":
            preds.write_parquet(p)
        else:
            preds.write_ndjson(p)
    if args.json:
        print(json.dumps(summary, indent=2), file=stdout)
    else:
        print_summary(summary, data.name, stdout)
    return 0


def _pct(x) -> str:
    return "    -" if x is None else f"{100 * x:5.1f}%"


def _ci(ci) -> str:
    return "" if not ci else f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def print_summary(m: dict, title: str, stream=None) -> None:
    """A human-readable view of one metrics.summarize object: overall with its 95% interval and n, what the model
    learned beyond length (length-controlled accuracy, margin/length correlation, the length rule beside it),
    calibration with the confidences it rests on, per subset (or domain), sections."""
    stream = stream or sys.stdout
    w = lambda s="": print(s, file=stream)  # noqa: E731
    w(f"{title}: {m['n']} pairs ({m.get('format', '?')} format, {m.get('rows_rejected', 0)} rejected, "
      f"{m.get('truncated', 0)} truncated)")
    text = m.get("text") or {}
    if text:
        w(f"  text: {text.get('normalization', '?')} normalisation ({text.get('from', 'as in training')}), "
          f"{text.get('texts_changed', 0)} texts changed")
    if not m["n"]:
        w("  no pairs")
        return
    w(f"  accuracy {_pct(m['accuracy'])}{_ci(m.get('accuracy_ci'))} (n={m['n']})   BT loss {m['bt_loss']:.4f}   "
      f"ties {m['ties']}")
    unit = m.get("length_unit", "characters")
    if m.get("length_rule_n"):
        nl, ns = m.get("lc_n") or (0, 0)
        w(f"  length-controlled accuracy {_pct(m.get('lc_accuracy'))}{_ci(m.get('lc_accuracy_ci'))} "
          f"(mean of chosen longer n={nl} and chosen shorter n={ns}; the length rule scores 50.0%)")
        corr = m.get("margin_length_corr")
        cci = m.get("margin_length_corr_ci")
        w(f"  margin/length correlation {'-' if corr is None else f'{corr:+.3f}'}"
          + (f" [{cci[0]:+.3f}, {cci[1]:+.3f}]" if cci else "") + f" (n={m.get('corr_n')}, {unit})   "
          f"prefers the longer response {_pct(m.get('prefers_longer')).strip()}")
        w(f"  length rule (longer wins) on the same pairs: accuracy {_pct(m.get('length_rule_accuracy'))}"
          f"{_ci(m.get('length_rule_accuracy_ci'))} (n={m['length_rule_n']}) vs the model's {_pct(m['accuracy'])}")
    conf = m.get("confidence_mean")
    w(f"  ECE {m['ece']:.4f}   mean confidence {'-' if conf is None else f'{conf:.3f}'}, "
      f"{_pct(m.get('confidence_share_below')).strip()} of pairs below {m.get('confidence_below', 0.55)}"
      + ("  (near-uninformative: a small ECE says little)" if (m.get("confidence_share_below") or 0) >= 0.9
         else ""))
    hist = [r for r in m.get("reliability") or [] if r["n"]]
    if hist:
        w("  confidence histogram (pairs per bin, empty bins left out): " + ", ".join(
            f"{r['bin_lo']:.2f}-{r['bin_hi']:.2f}: {r['n']}" for r in hist))
    w(f"  reward chosen {m['chosen_mean']:.3f} ± {m['chosen_std']:.3f}   rejected {m['rejected_mean']:.3f} ± "
      f"{m['rejected_std']:.3f}   margin {m['margin_mean']:.3f}")
    for kind in ("subset", "domain", "source"):
        groups = m.get(f"by_{kind}") or {}
        if not groups or (kind != "subset" and len(groups) < 2):
            continue
        width = max(len(k) for k in groups)
        w()
        w(f"  {kind:<{width}}  pairs  accuracy")
        for k, v in groups.items():
            w(f"  {k:<{width}}  {v['n']:5d}  {_pct(v['accuracy'])}")
    if m.get("sections"):
        w()
        w("  RewardBench section (prompt-weighted)  score  subsets present")
        for s, v in m["sections"].items():
            missing = "" if v["complete"] else " (incomplete)"
            w(f"  {s:<37}  {_pct(v['accuracy'])}  {len(v['subsets'])}{missing}")
        if m.get("rewardbench_score") is not None:
            w(f"  RewardBench score (mean of sections): {_pct(m['rewardbench_score'])}")
    lb = m.get("length_bias") or {}
    if lb:
        w()
        w(f"  length bias ({unit}): " + ", ".join(
            f"{k.replace('_', ' ')} {_pct(v['accuracy']).strip()}{_ci(v.get('ci'))} (n={v['n']})"
            for k, v in lb.items()))


# ---- score --------------------------------------------------------------------------------------------------------
def _read_rows(args) -> tuple[pl.DataFrame, str]:
    name = args.file or "<stdin>"
    try:
        if args.file:
            p = Path(args.file)
            if not p.is_file():
                raise StageError(f"{p}: no such file")
            df = pl.read_ndjson(p, infer_schema_length=None)
        else:
            raw = sys.stdin.buffer.read()
            if not raw.strip():
                raise StageError("<stdin>: no input rows")
            df = pl.read_ndjson(io.BytesIO(raw), infer_schema_length=None)
    except pl.exceptions.PolarsError as e:
        raise StageError(f"{name}: not valid JSON lines: {str(e).splitlines()[0]}") from None
    return df, name


def _prompt_messages(df: pl.DataFrame, name: str) -> pl.Expr:
    from worldpm.data.sources.common import to_messages

    if "prompt" not in df.columns:
        raise StageError(f"{name}: rows need a `prompt` (string or list of {{role, content}} messages); "
                         f"columns found: {', '.join(df.columns)}")
    expr = to_messages(pl.col("prompt"), df.schema["prompt"])
    if df.schema["prompt"] == pl.String:
        # rows mixing string and message-list prompts: polars reads the lists as their JSON text; decode those
        from worldpm.data.schema import MESSAGE

        looks = pl.col("prompt").str.contains(r'^\s*\[\s*\{[\s\S]*"role"[\s\S]*\}\s*\]\s*$').fill_null(False)
        decoded = pl.when(looks).then(pl.col("prompt")).otherwise(pl.lit("[]")).str.json_decode(pl.List(MESSAGE))
        expr = pl.when(looks).then(decoded).otherwise(expr)
    if expr is None:
        raise StageError(f"{name}: `prompt` has type {df.schema['prompt']}, not a string or a message list")
    return expr


@_stdout_is_ours
def cmd_score(args, stdout) -> int:
    from worldpm.data.render import renderer, tokenize_pairs
    from worldpm.data.text import normalize_frame
    from worldpm.modeling.scoring import load_model_dir, model_card, score_pairs, score_sequences

    df, name = _read_rows(args)
    cols = set(df.columns)
    if {"chosen", "rejected"} <= cols:
        mode = "pair"
    elif "response" in cols:
        mode = "single"
    else:
        raise StageError(f"{name}: rows need `chosen` and `rejected`, or `response`; columns found: "
                         f"{', '.join(df.columns)}")
    for c in ("chosen", "rejected") if mode == "pair" else ("response",):
        if df.schema[c] not in (pl.String, pl.Null):
            raise StageError(f"{name}: `{c}` must be a string, got {df.schema[c]}")
    prompt = _prompt_messages(df, name)
    card = model_card(args.model)
    model, tok, pad_id = load_model_dir(args.model, device=args.device)
    text, why = _text_path(args, model, card)
    rs = text.render
    log.info("score: %s normalisation (%s), max_length %d", text.describe()["normalization"], why, rs.max_length)
    r = renderer(tok, rs)
    out = open(args.output, "w") if args.output else stdout
    total = 0
    try:
        for chunk in df.iter_slices(n_rows=args.chunk_rows):
            frame = chunk.select(
                prompt=prompt,
                chosen=pl.col("chosen" if mode == "pair" else "response").fill_null(""),
                rejected=pl.col("rejected").fill_null("") if mode == "pair" else pl.lit(""),
            )
            bad = frame.select(pl.arg_where(pl.col("prompt").is_null() | (pl.col("prompt").list.len() == 0)))
            if bad.height:
                raise StageError(f"{name}: row {total + bad.item(0, 0) + 1}: empty or missing prompt")
            t = tokenize_pairs(normalize_frame(frame, text.normalize_markup), tok, rs, r=r)
            if mode == "pair":
                c, rj = score_pairs(model, t["chosen_ids"].to_list(), t["rejected_ids"].to_list(), pad_id,
                                    args.batch_size, device=args.device)
                res = chunk.with_columns(chosen_score=pl.Series(c, dtype=pl.Float64),
                                         rejected_score=pl.Series(rj, dtype=pl.Float64))
            else:
                s = score_sequences(model, t["chosen_ids"].to_list(), pad_id, args.batch_size, device=args.device)
                res = chunk.with_columns(score=pl.Series(s, dtype=pl.Float64))
            out.write(res.write_ndjson())
            out.flush()
            total += chunk.height
            log.info("score: %d/%d rows", total, df.height)
    finally:
        if out is not stdout:
            out.close()
    return 0


# ---- parser -------------------------------------------------------------------------------------------------------
def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="DIR",
                   help="a reward model folder (AutoModelForSequenceClassification, num_labels=1, with its "
                        "tokenizer), or a train artifact holding model/")
    p.add_argument("--batch-size", type=_like(EvaluateConfig, "evaluate.batch_size"), default=32, metavar="N",
                   help="sequences per forward pass (32; >= 1, as evaluate.batch_size)")
    p.add_argument("--max-length", type=_like(TokenizeConfig, "tokenize.max_length"), default=None, metavar="N",
                   help=f"tokens per sequence, template included (default: the model's worldpm.json, else "
                        f"{_TOK.max_length}; capped at the model's max_position_embeddings)")
    p.add_argument("--template", default=None,
                   help="for tokenizers without a chat template (default: the model's worldpm.json, else "
                        f"{_TOK.plain_template!r})")
    p.add_argument("--normalize", choices=["auto", "markup", "light"], default="auto",
                   help="text normalisation, as the normalise stage does it: markup (HTML/Markdown residue -> plain "
                        "text), light (line endings and control characters only); auto (default): what the "
                        "model's worldpm.json records, else markup")
    p.add_argument("--no-system-prompt", action="store_true",
                   help="chat templates: add no empty system turn (the template's own default instead)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")


def _positive(v: str) -> int:
    try:
        n = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {v!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def _like(model, key: str):
    """An argparse type that validates an option as the config key it stands for (its type and bounds), so a
    command-line number is refused where the same number in pipeline.yaml would be (`--batch-size 0` or -1)."""
    from typing import Annotated

    from pydantic import TypeAdapter, ValidationError

    field = model.model_fields[key.rsplit(".", 1)[1]]
    adapter = TypeAdapter(Annotated[(field.annotation, *field.metadata)])

    def parse(text: str):
        try:
            return adapter.validate_python(text)
        except ValidationError as e:
            msg = e.errors()[0]["msg"]
            raise argparse.ArgumentTypeError(f"{msg[0].lower()}{msg[1:]}, got {text!r} (as {key} in "
                                             "pipeline.yaml)") from None

    parse.__name__ = key  # argparse names the type in some messages
    return parse


def register(sub) -> None:
    p = sub.add_parser("evaluate", help="evaluate a reward model on a preference file (accuracy, BT loss, "
                       "per-subset and RewardBench section scores, calibration, length bias)",
                       description="Score every pair of FILE (RewardBench's prompt/chosen/rejected/subset, or any "
                                   "format the source adapters read) and print the metrics.")
    _model_args(p)
    p.add_argument("--data", required=True, metavar="FILE", help="a .jsonl/.json/.parquet/.csv preference file")
    p.add_argument("--format", default="auto", choices=[f for f in SOURCE_FORMATS if f != "stackexchange_posts_xml"],
                   help="the file's format (default: detected from its columns)")
    p.add_argument("--json", action="store_true", help="print the metrics object as JSON")
    p.add_argument("--bins", type=_like(EvaluateConfig, "evaluate.ece_bins"), default=10,
                   help="ECE confidence bins (10; >= 2, as evaluate.ece_bins)")
    p.add_argument("--predictions", metavar="FILE", help="also write per-pair scores (.parquet, else JSON lines)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("score", help="score JSON lines of pairs or (prompt, response) rows with a reward model",
                       description="Read JSON lines ({prompt, chosen, rejected} or {prompt, response}) from FILE "
                                   "or stdin; write each row back with chosen_score/rejected_score or score.")
    _model_args(p)
    p.add_argument("file", nargs="?", metavar="FILE", help="JSON lines (default: stdin)")
    p.add_argument("--output", "-o", metavar="FILE", help="write here instead of stdout")
    p.add_argument("--chunk-rows", type=_positive, default=1024, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_score)
