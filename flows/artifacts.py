"""Prefect artifacts of a flow run: a markdown artifact (the plot stage's report.md, its figures embedded) and a
table artifact (metrics, funnel, sizes, seconds per stage, artifact paths)."""
from __future__ import annotations

import json
import re
from pathlib import Path


def _artifact_key(text: str) -> str:
    """Prefect artifact keys: lowercase letters, digits and dashes."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", text.lower())).strip("-") or "worldpm"


def run_table(results: list[dict]) -> list[dict]:
    """Rows of the run's table artifact: per stage seconds/status/size/path, then metrics and the funnel."""
    rows: list[dict] = []
    by_stage = {r["stage"]: r for r in results}
    for r in results:
        size = rows_out = None
        if r.get("path"):
            try:
                man = json.loads((Path(r["path"]) / "manifest.json").read_text())
                size, rows_out = man.get("bytes"), man.get("rows_out")
            except (OSError, json.JSONDecodeError):
                pass
        rows.append({"kind": "stage", "name": r["stage"], "value": r.get("status"),
                     "seconds": r.get("seconds"), "bytes": size, "rows_out": rows_out, "key": r.get("key"),
                     "path": r.get("path")})
    ev = by_stage.get("evaluate")
    if ev and ev.get("path") and (Path(ev["path"]) / "metrics.json").exists():
        metrics = json.loads((Path(ev["path"]) / "metrics.json").read_text())
        for set_name, m in metrics.items():
            for k in ("n", "accuracy", "lc_accuracy", "margin_length_corr", "length_rule_accuracy", "bt_loss", "ece",
                      "margin_mean"):
                rows.append({"kind": "metric", "name": f"{set_name}.{k}", "value": m.get(k), "seconds": None,
                             "bytes": None, "rows_out": None, "key": None, "path": None})
    cl = by_stage.get("clean")
    if cl and cl.get("path") and (Path(cl["path"]) / "report.json").exists():
        rep = json.loads((Path(cl["path"]) / "report.json").read_text())
        funnel = [("rows_in", rep.get("rows_in"))] + [(f"rejected:{k}", v) for k, v in
                                                        rep.get("rejected_by_rule", {}).items()]
        funnel.append(("rows_out", rep.get("rows_out")))
        for k, v in funnel:
            rows.append({"kind": "funnel", "name": k, "value": v, "seconds": None, "bytes": None,
                         "rows_out": None, "key": None, "path": None})
    return rows


def report_markdown(plot_path: str | Path) -> str:
    """The report artifact's Markdown: the plot artifact's report.md with its figures embedded as data URIs (the
    UI cannot read the PNG files next to report.md; Prefect's UIs show an embedded image), after a line naming the
    folder that holds the report's files (PNG and SVG)."""
    from worldpm.report.markdown import embed_images

    folder = Path(plot_path)
    md = embed_images((folder / "report.md").read_text(), folder)
    return f"Report files (PNG and SVG figures, report.md): `{folder}`\n\n" + md


def publish_prefect_artifacts(cfg, results: list[dict]) -> bool:
    """Inside a Prefect flow run: a markdown artifact (the plot stage's report.md) and a table artifact (stage
    seconds/sizes/paths, metrics, data funnel), keyed by the pipeline name (`<name>-report`, `<name>-run`: two
    pipelines never share a key; two folders whose configs keep the same name do). Outside a flow run, or a run in
    which no stage ran (nothing changed: the latest report stands): nothing.

    ``results``: run_pipeline's list of {stage, key, status, path, seconds}. Returns True when published."""
    from prefect.context import FlowRunContext

    if FlowRunContext.get() is None or not any(r["status"] == "ran" for r in results):
        return False
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    key = _artifact_key(cfg.name)
    plot = next((r for r in results if r["stage"] == "plot" and r.get("path")), None)
    if plot and (Path(plot["path"]) / "report.md").exists():
        create_markdown_artifact(markdown=report_markdown(plot["path"]), key=f"{key}-report",
                                 description=f"{cfg.name}: run report")
    create_table_artifact(table=run_table(results), key=f"{key}-run",
                          description=f"{cfg.name}: stages (seconds, sizes, paths), metrics, data funnel")
    return True
