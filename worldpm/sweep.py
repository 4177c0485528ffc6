"""Sweeps: the `sweep:` section of pipeline.yaml, a grid of points, each the same DAG with overrides.

    sweep:
      axes:                                   # the grid: the product of every axis, in this order
        model:                                # an axis of bundles: each value sets several keys at once
          - {label: 0.5B, set: {model.name_or_path: Qwen/Qwen2.5-0.5B-Instruct, train.batch_size: 8}}
          - {label: 1.5B, set: {model.name_or_path: Qwen/Qwen2.5-1.5B-Instruct, train.batch_size: 4}}
        train.lr: [1.0e-5, 3.0e-5]            # an axis of one key: its values
      fit: bt_loss                            # what the sweep report fits against pairs seen

A point is a list of ``--set`` overrides applied on top of the config (and of the run's own overrides), plus
``name=<name>-<point slug>``: the history of runs and the regression guard stay per point, and only the plot
stage (whose key holds the name) differs between points that share everything else. Points share every cached
artifact their overrides do not change: give the models of one family the same ``model.tokenizer`` and they share
one tokenize.

Keys a sweep may not vary: ``artifacts_dir`` (points share one store), ``name`` (set per point), ``sweep.*``,
``serve.*``, ``schedule.*``.
"""
from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass
from typing import Annotated, Any, Callable, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from worldpm.errors import ConfigError

FORBIDDEN = ("artifacts_dir", "name", "sweep", "serve", "schedule")


class Strict(BaseModel):
    """As config.py's: unknown keys are errors. Not imported from there, so that config.py can import SweepConfig
    for its `sweep:` section without an import circle."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SweepValue(Strict):
    """One value of a bundle axis: a label (the figure's and report's name for it) and the keys it sets."""

    label: str = Field(min_length=1)
    set: dict[str, Any] = Field(min_length=1, description="dotted config keys and their values")


class SweepConfig(Strict):
    # left to right: a list of {label, set} mappings is a bundle axis, anything else the values of one key
    axes: dict[str, Annotated[list[SweepValue] | list[Any], Field(union_mode="left_to_right")]] = Field(
        min_length=1, description="{axis: values}: a dotted key and its values, or a name and a list of "
        "{label, set} bundles; the grid is the product of the axes, in their order")
    fit: Literal["bt_loss"] = Field("bt_loss", description="the eval-curve metric fitted against pairs seen")

    @field_validator("axes")
    @classmethod
    def _axes(cls, axes: dict) -> dict:
        for name, values in axes.items():
            if not values:
                raise ValueError(f"axis {name!r} has no values")
            bundles = [v for v in values if isinstance(v, SweepValue)]
            looks_like = [v for v in values if isinstance(v, dict) and {"label", "set"} & set(v)]
            if looks_like:  # a bundle that did not validate, or bundles among plain values
                raise ValueError(f"axis {name!r} mixes {{label, set}} bundles and plain values, or a bundle is not "
                                 f"{{label: text, set: {{key: value}}}}: {looks_like[0]!r}")
            if bundles and len(bundles) != len(values):
                raise ValueError(f"axis {name!r} mixes {{label, set}} bundles and plain values")
            keys = [k for v in bundles for k in v.set] if bundles else [name]
            for k in keys:
                if k.split(".")[0] in FORBIDDEN:
                    raise ValueError(f"axis {name!r}: a sweep cannot vary {k} (points share the store, the name is "
                                     "set per point, and serve/schedule/sweep are not the DAG's)")
            labels = [v.label for v in bundles] if bundles else [_value_text(v) for v in values]
            dup = sorted({x for x in labels if labels.count(x) > 1})
            if dup:
                raise ValueError(f"axis {name!r}: repeated value(s) {', '.join(dup)}")
        return axes

    @model_validator(mode="after")
    def _size(self) -> "SweepConfig":
        n = 1
        for v in self.axes.values():
            n *= len(v)
        if n > 256:
            raise ValueError(f"the grid has {n} points; at most 256")
        return self


def _value_text(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v)


def _yaml(v: Any) -> str:
    """A value as the YAML that ``--set`` parses back to it (1e-05 -> '1.0e-05': PyYAML reads '1e-05' as text)."""
    text = yaml.safe_dump(v, default_flow_style=True, width=10**9).strip()
    return text[:-3].strip() if text.endswith("...") else text


def _slug(text: str) -> str:
    return re.sub(r"-+", "-", re.sub(r"[^A-Za-z0-9_.-]+", "-", text)).strip("-.") or "point"


@dataclass(frozen=True)
class SweepPoint:
    """One point of the grid: its label ('0.5B, train.lr=1e-05'), per-axis labels, and its --set overrides."""

    label: str
    coords: dict[str, str]
    overrides: tuple[str, ...]

    @property
    def slug(self) -> str:
        return _slug(self.label.replace(", ", "_").replace("=", "-"))

    def with_name(self, base_name: str) -> tuple[str, ...]:
        """The overrides of this point, with the point's own pipeline name."""
        return (*self.overrides, f"name={base_name}-{self.slug}")


def expand(sweep: SweepConfig) -> list[SweepPoint]:
    """The points of the grid, the first axis varying slowest. Two points with the same overrides are an error."""
    per_axis = []
    for name, values in sweep.axes.items():
        opts = []
        for v in values:
            if isinstance(v, SweepValue):
                opts.append((name, v.label, v.label, tuple(f"{k}={_yaml(x)}" for k, x in v.set.items())))
            else:
                opts.append((name, _value_text(v), f"{name}={_value_text(v)}", (f"{name}={_yaml(v)}",)))
        per_axis.append(opts)
    points, seen = [], {}
    for combo in itertools.product(*per_axis):
        label = ", ".join(part for _, _, part, _ in combo)
        overrides = tuple(o for *_, ovs in combo for o in ovs)
        keys = [o.split("=", 1)[0] for o in overrides]
        clash = sorted({k for k in keys if keys.count(k) > 1})
        if clash:
            raise ConfigError(f"sweep point {label!r}: two axes set {', '.join(clash)}")
        if overrides in seen:
            raise ConfigError(f"sweep points {seen[overrides]!r} and {label!r} are the same run")
        seen[overrides] = label
        points.append(SweepPoint(label, {name: lab for name, lab, _, _ in combo}, overrides))
    slugs = [p.slug for p in points]
    dup = sorted({s for s in slugs if slugs.count(s) > 1})
    if dup:
        raise ConfigError(f"sweep points with the same name once made file-safe: {', '.join(dup)}; relabel them")
    return points


def point_configs(sweep: SweepConfig, load: Callable[[list[str]], Any], base_name: str) -> list[tuple[SweepPoint, Any]]:
    """Each point with its validated config: ``load(overrides)`` is load_config(path, run overrides + these). A
    point whose config is invalid is a ConfigError naming the point, before any point runs."""
    out = []
    for p in expand(sweep):
        try:
            cfg = load(list(p.with_name(base_name)))
        except ConfigError as e:
            raise ConfigError(f"sweep point {p.label!r}: {e}") from None
        out.append((p, cfg))
    return out


# ---- which devices a point holds: the slots of Prefect's global concurrency limits ---------------------------------
@dataclass(frozen=True)
class SlotPlan:
    """Prefect global concurrency limits for a sweep on one host, and what each point takes from them.

    ``limits``: {limit name: slots}, created (upserted) before the points start; ``per_point[i]``: the names point
    i acquires, one slot of each, all at once (``prefect.concurrency.sync.concurrency(names, occupy=1,
    strict=True)``: the server grants a multi-name request in one transaction, all or nothing); ``devices[i]``:
    the GPUs point i is pinned to (its CUDA_VISIBLE_DEVICES), None on a CPU host. Limits are global to the
    Prefect server, so their names carry the host: two GPU hosts on one server never wait on each other."""

    limits: dict[str, int]
    per_point: list[tuple[str, ...]]
    devices: list[tuple[int, ...] | None]


def plan_slots(processes: list[int], gpus: list[int] | None, host: str = "local") -> SlotPlan:
    """One limit of one slot per GPU (``worldpm-<host>-gpu-<i>``); a point that runs p processes is pinned to a block
    of p consecutive GPUs, the least loaded block so far (points on the same block run one after the other, points on
    disjoint blocks at once). Without GPUs one limit ``worldpm-<host>-cpu`` of one slot: points run one at a time."""
    h = _slug(host)
    if not gpus:
        name = f"worldpm-{h}-cpu"
        return SlotPlan({name: 1}, [(name,)] * len(processes), [None] * len(processes))
    load = {d: 0 for d in gpus}
    per_point, devices = [], []
    for i, p in enumerate(processes):
        if p < 1 or p > len(gpus):
            raise ConfigError(f"sweep point {i + 1} runs {p} GPU processes; this host has {len(gpus)} GPU(s)")
        blocks = [tuple(gpus[j:j + p]) for j in range(0, len(gpus) - p + 1, p)]
        block = min(blocks, key=lambda b: max(load[d] for d in b))
        for d in block:
            load[d] += 1
        devices.append(block)
        per_point.append(tuple(f"worldpm-{h}-gpu-{d}" for d in block))
    return SlotPlan({f"worldpm-{h}-gpu-{d}": 1 for d in gpus}, per_point, devices)
