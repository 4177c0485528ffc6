"""plot: training curves and evaluation figures (PNG + SVG) and report.md, from clean, train and evaluate.

The figures are worldpm/report/figures.py's, the report worldpm/report/markdown.py's. The output depends only on
the inputs (SVGs without a date, a fixed hash salt; report.md without timestamps or paths).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from worldpm.config import PipelineConfig, PlotConfig, StageConfig
from worldpm.engine import StageSpec
from worldpm.errors import StageError
from worldpm.store import ArtifactRef

# the files of its inputs plot opens: what is checked against their digests before it runs (not the model weights)
READS = {"clean": ("report.json",), "train": ("train_summary.json", "metrics.jsonl", "eval_curve.jsonl"),
         "evaluate": ("metrics.json",)}


class PlotStageConfig(StageConfig):
    name: str  # the pipeline's, in the report's title
    plot: PlotConfig


def stage_config(cfg: PipelineConfig) -> PlotStageConfig:
    return PlotStageConfig(name=cfg.name, plot=cfg.plot)


def run(scfg: PlotStageConfig, inputs: dict[str, ArtifactRef], out: Path, log, work: Path) -> dict:
    from worldpm.modeling.eval_curve import FILE as EVAL_CURVE
    from worldpm.modeling.eval_curve import read_eval_curve
    from worldpm.report.figures import (
        plot_eval_accuracy,
        plot_eval_curves,
        plot_grad_norm,
        plot_length_bias,
        plot_loss,
        plot_reliability,
        plot_train_accuracy_margin,
    )
    from worldpm.report.history import read_jsonl
    from worldpm.report.markdown import render_report
    from worldpm.report.trainlog import grad_norm_spikes

    formats = list(scfg.plot.formats) or ["png"]
    clean_dir, train_dir, eval_dir = (Path(inputs[s].path) for s in ("clean", "train", "evaluate"))

    clean_report = _read_json(clean_dir / "report.json")
    train_summary = _read_json(train_dir / "train_summary.json")
    metrics = _read_json(eval_dir / "metrics.json")
    if metrics is None:
        raise StageError(f"plot: the evaluate artifact has no metrics.json ({eval_dir})")
    rows = read_jsonl(train_dir / "metrics.jsonl")
    points = read_eval_curve(train_dir / EVAL_CURVE)  # evaluation during training (train.eval_at); [] without

    files: dict[str, list[str]] = {}
    spikes = None
    if rows:
        files["loss"] = plot_loss(rows, scfg.plot.smoothing, out, formats)
        files["train_accuracy_margin"] = plot_train_accuracy_margin(rows, scfg.plot.smoothing, out, formats)
        if any(r.get("grad_norm") is not None for r in rows):
            spikes = grad_norm_spikes([r.get("step") for r in rows], [r.get("grad_norm") for r in rows])
            files["grad_norm"] = plot_grad_norm(rows, spikes, out, formats)
    else:
        log.warning("plot: %s has no logged steps; no training curves", train_dir / "metrics.jsonl")
    if points:  # each set's BT loss against pairs seen beside the training loss, and per category
        files["eval_curves"] = plot_eval_curves(rows, points, out, formats, scfg.plot.smoothing)
    files["eval_accuracy"] = plot_eval_accuracy(metrics, out, formats)
    files["reliability"] = plot_reliability(metrics, out, formats)
    files["length_bias"] = plot_length_bias(metrics, out, formats)
    files = {k: v for k, v in files.items() if v}
    # the report links the PNG where there is one (GitHub/VS Code previews render both; PNG is smaller)
    images = {k: next((f for f in v if f.endswith(".png")), v[0]) for k, v in files.items()}
    md = render_report(name=scfg.name, clean_report=clean_report, train_summary=train_summary,
                       metrics=metrics, images=images, spikes=spikes, eval_points=points or None,
                       digests={s: ref.digest for s, ref in inputs.items()})
    (out / "report.md").write_text(md)
    log.info("plot: %d figures (%s) and report.md", len(files), ", ".join(formats))
    return {"figures": sorted(files), "figure_files": sorted(f for v in files.values() for f in v) + ["report.md"]}


def _read_json(path: Path) -> Any:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise StageError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None


STAGE = StageSpec(config=stage_config, run=run, reads=READS)
