"""What a deployment run may change: the served config's `serve.allowed_overrides`, and never more.

Anyone who can reach the Prefect API can start a run of `worldpm/full` or `worldpm/clean` with parameters of their
choosing. Taken as they come, `overrides` would let them write anywhere (`artifacts_dir=/elsewhere`), read any
file as data (`sources`, `evaluate.eval_sets`) or, with `model.trust_remote_code=true` and a model of theirs, run
code as the user who runs `worldpm serve`. So a deployment run is checked against what was served, before
anything runs:

* ``config_path`` is the served config (``worldpm serve --config``); a run cannot name another file;
* each of its ``overrides`` that is not one of serve's own ``--set`` entries must match a glob of
  ``serve.allowed_overrides`` in the served config, and must not touch NEVER (whatever the list says); the run
  then has serve's ``--set`` entries followed by its own (``effective_overrides``);
* ``sources`` needs ``sources`` in the list; each must be a hub id or a path inside the project (the served
  config's folder);
* the config that results must keep artifacts_dir, trust_remote_code, accelerate_args, nodes and callbacks as served,
  and every path that differs from the served config must lie inside the project;
* a local source is checked by the files it expands to (a glob, a folder), each resolved: `data/share*/x.jsonl`
  reaches outside when data/shared is a symlink that points there. And at read time too: the run reads under
  `Served.roots` (worldpm.data.sources.read_root), so a link that appears after this check is refused where
  the file is opened.

Runs from `worldpm run` (the terminal: the user's own authority) are not checked. A run is a deployment run when
`worldpm serve` started it (it marks the flow runs it executes through the environment, which the API cannot set
for a served run) or when Prefect says it belongs to a deployment (a worker: then the deployment's own parameters
are the baseline, and its work pool must let no run set its command or environment: flows/workers.py).
"""
from __future__ import annotations

import fnmatch
import json
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from worldpm.config import PipelineConfig, load_config, parse_override, source_from_cli
from worldpm.data.sources import AdapterError, local_files, outside_read_root
from worldpm.errors import ConfigError

ENV = "WORLDPM_SERVED"
NEVER = ("artifacts_dir", "model.trust_remote_code", "train.accelerate_args", "train.nodes", "train.callbacks",
         "serve", "sweep")


@dataclass
class Served:
    """The trusted baseline of a deployment run: the config file and --set entries it was served with."""

    config_path: str | None
    overrides: list[str] = field(default_factory=list)
    origin: str = "worldpm serve"

    @property
    def project(self) -> Path:
        """Where a run's paths may point: the served config's folder (the working directory without one)."""
        return Path(self.config_path).resolve().parent if self.config_path else Path.cwd().resolve()

    @cached_property
    def base(self) -> PipelineConfig:
        """The served config itself, loaded and validated once per run (check_run and `roots` compare with it)."""
        return load_config(self.config_path, self.overrides)

    @cached_property
    def roots(self) -> list[Path]:
        """Where a deployment run may read data files: the project folder, and what the served config itself reads
        (its local sources and eval sets, which the operator may have put anywhere), resolved; found once per run
        (check_run checks the run's sources against them, and the run's reads are checked where they open)."""
        roots = [self.project]
        for s in self.base.sources:
            if s.kind == "local" and s.path:
                try:
                    roots += [f.resolve() for f in local_files(s.path)]
                except AdapterError:  # nothing there now: the run's download stage says so
                    pass
        return roots + [Path(e.path).resolve() for e in self.base.evaluate.eval_sets]


def mark_served(config_path: str | None, overrides: list[str]) -> None:
    """Called by `worldpm serve` before it serves: the flow runs it starts inherit this."""
    os.environ[ENV] = json.dumps({"config_path": config_path, "overrides": list(overrides)})


def served_run() -> Served | None:
    """The baseline if this flow run is a deployment run, else None (a `worldpm run` from the terminal).

    A worker's run is checked against its deployment, never the environment: on a work pool, a run's job variables
    may set environment variables (flows/workers.py)."""
    from prefect.runtime import deployment, flow_run

    dep_id = deployment.get_id()
    if dep_id:
        from flows.workers import worker_baseline

        if (baseline := worker_baseline(flow_run.get_id())) is not None:
            config_path, overrides, origin = baseline
            return Served(config_path, overrides, origin=origin)
    if os.environ.get(ENV):
        d = json.loads(os.environ[ENV])
        return Served(d.get("config_path"), list(d.get("overrides") or []))
    if not dep_id:
        return None
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        dep = client.read_deployment(dep_id)
    params = dep.parameters or {}
    return Served(params.get("config_path"), list(params.get("overrides") or []), origin=f"deployment {dep.name}")


def _key(override: str) -> str:
    return ".".join(parse_override(override)[0])


def _touches(key: str, never: str) -> bool:
    """`key` is `never`, inside it, or a section that contains it (`model={...}` sets model.trust_remote_code)."""
    return key == never or key.startswith(never + ".") or never.startswith(key + ".")


def _inside(path: str | Path, root: Path) -> bool:
    return Path(path).expanduser().resolve().is_relative_to(root)


def _is_path(value: str | None) -> bool:
    """A model/tokenizer value that names a local path rather than a hub id or 'minilm'."""
    if not value:
        return False
    return value.startswith(("/", ".", "~")) or Path(value).expanduser().exists()


def _paths(cfg: PipelineConfig) -> dict[str, str]:
    """Every setting of `cfg` that names a file or folder, by a readable name."""
    out: dict[str, str] = {}
    for i, s in enumerate(cfg.sources):
        if s.kind == "local" and s.path:
            out[f"sources.{i}.path"] = s.path
    for name, value in (("model.name_or_path", cfg.model.name_or_path), ("model.tokenizer", cfg.model.tokenizer),
                        ("train.reference", cfg.train.reference)):
        if _is_path(value):
            out[name] = value
    if cfg.train.deepspeed.config_file:
        out["train.deepspeed.config_file"] = cfg.train.deepspeed.config_file
    for i, e in enumerate(cfg.evaluate.eval_sets):
        out[f"evaluate.eval_sets.{i}.path"] = e.path
    return out


def effective_overrides(served: Served, overrides: list[str] | None) -> list[str]:
    """What a deployment run runs with: the served --set entries, then the run's own (a run's `overrides` parameter
    replaces the deployment's default list in Prefect, so without this a run that sets one threshold would drop
    every entry serve was started with)."""
    return list(served.overrides) + [o for o in overrides or [] if o not in served.overrides]


def check_run(served: Served, config_path: str | None, overrides: list[str] | None,
              sources: list[str] | None) -> PipelineConfig:
    """The config a deployment run runs with (served --set entries, then its own: ``effective_overrides``),
    validated once; ConfigError (one line, naming the parameter) unless its parameters are allowed."""
    where = f"a deployment run ({served.origin})"
    same = (lambda a, b: (a and str(Path(a).resolve())) == (b and str(Path(b).resolve())))
    if not same(config_path, served.config_path):
        raise ConfigError(f"{where} cannot change config_path (to {config_path!r}): it runs the served config "
                          f"{served.config_path or '<defaults>'}")
    base = served.base
    allowed = list(base.serve.allowed_overrides)
    for o in overrides or []:
        if o in served.overrides:  # the operator's own --set entries
            continue
        key = _key(o)
        if any(_touches(key, n) for n in NEVER):
            raise ConfigError(f"{where} may not override {key} ({o!r}): never allowed from a run (docs/deploy.md); "
                              "change it in the served config")
        if not any(fnmatch.fnmatchcase(key, pat) for pat in allowed):
            raise ConfigError(f"{where} may not override {key} ({o!r}): not in serve.allowed_overrides of "
                              f"{served.config_path or 'the built-in defaults'}")
    root = served.project
    if sources:
        if not any(fnmatch.fnmatchcase("sources", pat) for pat in allowed):
            raise ConfigError(f"{where} may not replace the sources: `sources` is not in serve.allowed_overrides")
        for s in sources:
            d = source_from_cli(s)
            if d["kind"] == "local" and not _inside(d["path"], root):
                raise ConfigError(f"{where}: source {s!r} is outside the project folder {root}")
    cfg = load_config(config_path, effective_overrides(served, overrides), sources or None)
    if cfg.artifacts_dir != base.artifacts_dir:
        raise ConfigError(f"{where} may not move artifacts_dir (to {cfg.artifacts_dir})")
    if cfg.model.trust_remote_code and not base.model.trust_remote_code:
        raise ConfigError(f"{where} may not turn on model.trust_remote_code")
    if cfg.train.accelerate_args != base.train.accelerate_args or cfg.train.callbacks != base.train.callbacks \
            or cfg.train.nodes != base.train.nodes or cfg.serve != base.serve or cfg.sweep != base.sweep:
        raise ConfigError(f"{where} may not change train.accelerate_args, train.nodes, train.callbacks, serve or "
                          "sweep")
    before = _paths(base)
    for name, value in _paths(cfg).items():
        if before.get(name) != value and not _inside(value, root):
            raise ConfigError(f"{where}: {name} {value!r} is outside the project folder {root}")
    roots = served.roots
    for i, s in enumerate(cfg.sources):
        if s.kind != "local" or not s.path:
            continue
        try:
            files = local_files(s.path)
        except AdapterError:  # nothing to read: the download stage says so
            continue
        for f in files:
            real = outside_read_root(f, roots)
            if real is not None:
                raise ConfigError(f"{where}: sources.{i}.path {s.path!r} reads {f}, which resolves to {real}, "
                                  f"outside the project folder {root}")
    return cfg
