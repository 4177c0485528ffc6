"""How a flow run of `worldpm` tells itself apart on Prefect's runs page.

* its name says what ran: ``<pipeline name>: <the stages asked for>`` while it runs (``worldpm: all stages``,
  ``worldpm: until clean``), then ``<pipeline name>: ran tokenize, train, evaluate, plot`` or
  ``<pipeline name>: nothing ran (cached)``;
* its tags: the pipeline name, ``objective:<bt|dpo>``, ``model:<model>``, and ``cached`` when nothing ran (beside
  a deployment's own tags);
* the resolved configuration: a markdown artifact of the run (no key: it belongs to this run only) with the config
  file, the overrides, the sources, the stages asked for and the whole configuration as the run used it (the
  Parameters tab shows only what was passed, often just a config path).

Both the console script's runs and deployment runs get them (the flow sets them once it has its configuration). A
failure to label (the API busy) is a warning in the run's log, never a failed run.
"""
from __future__ import annotations

from pathlib import Path

import yaml

from worldpm.config import PipelineConfig

CACHED_TAG = "cached"


def model_label(cfg: PipelineConfig) -> str:
    """The model as a short label: `minilm`, a hub id, a local folder's name, `<model_type> (from_config)`."""
    m = cfg.model
    if m.from_config:
        return f"{dict(m.from_config).get('model_type', '?')} (from_config)"
    name = m.name_or_path or "minilm"
    p = Path(name).expanduser()
    return p.name if (p.is_absolute() or name.startswith(".")) else name


def tags(cfg: PipelineConfig, ran: list[str] | None = None) -> list[str]:
    """The run's tags; `ran` (the stages that ran) once it is known: `cached` when none did."""
    out = [cfg.name, f"objective:{cfg.train.objective}", f"model:{model_label(cfg)}"]
    if ran is not None and not ran:
        out.append(CACHED_TAG)
    return out


def selection(until: str | None = None, only: str | None = None, start: str | None = None) -> str:
    if only:
        return f"only {only}"
    if start and until:
        return f"from {start} until {until}"
    if start:
        return f"from {start}"
    if until:
        return f"until {until}"
    return "all stages"


def finished_name(cfg: PipelineConfig, results: list[dict]) -> str:
    ran = [r["stage"] for r in results if r["status"] == "ran"]
    if not ran:
        return f"{cfg.name}: nothing ran (cached)"
    if len(ran) > 4:
        return f"{cfg.name}: ran {ran[0]} .. {ran[-1]} ({len(ran)} stages)"
    return f"{cfg.name}: ran {', '.join(ran)}"


def resolved_markdown(cfg: PipelineConfig, config_path: str | None, overrides: list[str] | None,
                      sources: list[str] | None, stages: str) -> str:
    def cell(v) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    rows = [("pipeline", cfg.name), ("config file", config_path or "the built-in defaults (pipeline.yaml as shipped)"),
            ("overrides (--set)", ", ".join(f"`{o}`" for o in overrides or []) or "none"),
            ("sources (--source)", ", ".join(f"`{s}`" for s in sources or []) or "the config's"),
            ("stages asked for", stages), ("objective", cfg.train.objective), ("model", model_label(cfg)),
            ("tokenize.max_length", cfg.tokenize.max_length), ("artifacts_dir", cfg.artifacts_dir)]
    table = "\n".join(f"| {k} | {cell(v)} |" for k, v in rows)
    full = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True, width=110)
    return (f"## {cfg.name}: the resolved configuration\n\n| setting | value |\n|---|---|\n{table}\n\n"
            f"The whole configuration this run used (defaults, the file and the overrides resolved):\n\n"
            f"```yaml\n{full}```\n")


class RunLabel:
    """Names and tags the current flow run (see the module doc); a no-op outside one."""

    def __init__(self, cfg: PipelineConfig, log, until: str | None = None, only: str | None = None,
                 start: str | None = None):
        from prefect.runtime import flow_run

        self.cfg, self.log = cfg, log
        self.stages = selection(until, only, start)
        self.run_id = flow_run.get_id()

    def started(self, config_path: str | None, overrides: list[str] | None, sources: list[str] | None) -> None:
        if self.run_id is None:
            return
        self._update(f"{self.cfg.name}: {self.stages}", tags(self.cfg))
        try:
            from prefect.artifacts import create_markdown_artifact

            create_markdown_artifact(markdown=resolved_markdown(self.cfg, config_path, overrides, sources,
                                                                self.stages),
                                     description=f"{self.cfg.name}: the resolved configuration of this run")
        except Exception as e:  # the API busy or gone: the run goes on (its log keeps the configuration's path)
            self.log.warning("could not publish the resolved configuration to Prefect: %s: %s", type(e).__name__,
                             str(e).splitlines()[0] if str(e) else "")

    def finished(self, results: list[dict]) -> None:
        if self.run_id is None:
            return
        self._update(finished_name(self.cfg, results), tags(self.cfg, [r["stage"] for r in results
                                                                       if r["status"] == "ran"]))

    def _update(self, name: str, new_tags: list[str]) -> None:
        from prefect.client.orchestration import get_client

        try:
            with get_client(sync_client=True) as client:
                current = client.read_flow_run(self.run_id)
                keep = [t for t in current.tags or [] if t != CACHED_TAG]
                client.update_flow_run(self.run_id, name=name, tags=list(dict.fromkeys(keep + new_tags)))
        except Exception as e:  # the API busy or gone: the run itself goes on
            self.log.warning("could not name the flow run %r in Prefect: %s: %s", name, type(e).__name__,
                             str(e).splitlines()[0] if str(e) else "")
