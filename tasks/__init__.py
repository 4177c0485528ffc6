"""The stages of the worldpm pipeline and the DAG they form, written once.

Each stage is a module of this package that declares ``STAGE = StageSpec(config=..., run=...)`` (worldpm/engine.py):
its typed config (a worldpm.config.StageConfig built from the pipeline config: the part its output depends on,
in its key) and ``run(scfg, inputs, out, log, work)`` (writes its artifact), optionally the files it reads of its
inputs and an ``after_commit`` hook. A stage reads its inputs as artifacts by the names listed here; stages never
import each other, and the library they stand on is worldpm/.

    download -> normalise -> clean -> shard -> tokenize -> ref_logps -> train -> evaluate -> plot

To add a stage: write tasks/<name>.py with its config type, stage_config, run and STAGE, and list it below after
the stages it reads.
"""
from __future__ import annotations

from tasks import clean, download, evaluate, normalise, plot, ref_logps, shard, tokenize, train
from worldpm.engine import Pipeline, Stage

PIPELINE = Pipeline([
    Stage("download", download),
    # normalise: the texts once (expensive, rarely changed); clean: the filters over them (cheap, often tweaked)
    Stage("normalise", normalise, upstream=("download",)),
    Stage("clean", clean, upstream=("normalise",)),
    Stage("shard", shard, upstream=("clean",)),
    Stage("tokenize", tokenize, upstream=("shard",)),
    # ref_logps: DPO's cached reference log-probs; for bt a constant marker, so a BT key never moves with it
    Stage("ref_logps", ref_logps, upstream=("tokenize",)),
    Stage("train", train, upstream=("tokenize", "ref_logps")),
    Stage("evaluate", evaluate, upstream=("tokenize", "train", "ref_logps")),
    Stage("plot", plot, upstream=("clean", "train", "evaluate")),
])
