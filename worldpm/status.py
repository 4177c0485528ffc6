"""`worldpm status`: for the current config, which stages are cached, which would run, and why.

A stage's key is resolvable only when its upstream artifacts are known (the key hashes their content digests), so
the walk follows the DAG: a cached stage hands its digest on; below a stage that would run, keys are unknown until
it has run. A cached artifact is checked as run checks it: its files against its manifest (a damaged one is
"damaged": the next run sets it aside and rebuilds it), and what a stage that would run reads of it against its
content digests. For a stage that would run, the reason is a diff against the newest artifact of that stage for this
pipeline name: which config values changed, whether the stage's code changed, which upstream content changed.
"""
from __future__ import annotations

from typing import Any

from worldpm import engine
from worldpm.config import PipelineConfig, StageConfig, key_dict
from worldpm.engine import Pipeline, Stage
from worldpm.errors import StageError
from worldpm.store import ArtifactRef, ArtifactStore, canonical_json


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(d, list) and d and all(isinstance(x, dict) for x in d):
        out = {}
        for i, v in enumerate(d):
            out.update(_flatten(v, f"{prefix}[{i}]"))
        return out
    return {prefix: d}


def _short(v: Any, n: int = 40) -> str:
    s = repr(v)
    return s if len(s) <= n else s[: n - 3] + "..."


def explain(stage: Stage, cfg: PipelineConfig, scfg: StageConfig, inputs: dict[str, ArtifactRef],
            store: ArtifactStore) -> str:
    """Why `stage` is not cached: the difference to its newest earlier artifact of this pipeline."""
    previous = [m for m in store.manifests(stage.name) if m.get("pipeline") == cfg.name] or store.manifests(stage.name)
    if not previous:
        return "never run in this store"
    last = previous[0]
    reasons = []
    if last.get("code_version") != stage.code_version:
        reasons.append("stage code changed")
    old, new = _flatten(last.get("config", {})), _flatten(key_dict(scfg))
    changed = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    section = type(scfg).SECTION  # the key as pipeline.yaml spells it: clean.normalize_markup, not normalize_markup
    for k in changed[:5]:
        name = f"{section}.{k}" if section else k
        reasons.append(f"{name}: {_short(old.get(k))} -> {_short(new.get(k))}" if k else "config changed")
    if len(changed) > 5:
        reasons.append(f"and {len(changed) - 5} more setting(s)")
    for u, ref in inputs.items():
        if last.get("upstream", {}).get(u, {}).get("digest") != engine.input_digest(stage, u, ref):
            reasons.append(f"{u} output changed")
    return "; ".join(reasons) or "forced or removed"


def pipeline_status(pipeline: Pipeline, cfg: PipelineConfig) -> list[dict]:
    store = ArtifactStore(cfg.artifacts_dir)
    refs: dict[str, ArtifactRef] = {}
    rows = []
    for stage in pipeline:
        blocked = [u for u in stage.upstream if u not in refs]
        if blocked:
            try:  # its key waits for its inputs, but what it reads from outside the store must be there now
                stage.config(cfg)
            except StageError as e:
                rows.append({"stage": stage.name, "status": "unknown", "key": None, "why": str(e)})
                continue
            rows.append({"stage": stage.name, "status": "would run", "key": None,
                         "why": f"after {', '.join(blocked)} (its inputs are not computed yet)"})
            continue
        inputs = {u: refs[u] for u in stage.upstream}
        try:
            key, scfg = engine.resolve(stage, cfg, inputs)
        except StageError as e:
            rows.append({"stage": stage.name, "status": "unknown", "key": None, "why": str(e)})
            continue
        ref, problem = store.check(stage.name, key)
        if ref is not None and problem is None:
            refs[stage.name] = ref
            rows.append({"stage": stage.name, "status": "cached", "key": key, "why": f"cached at {ref.path}"})
            continue
        if ref is not None:  # what run's cache lookup finds damaged (and sets aside), status says is damaged
            rows.append({"stage": stage.name, "status": "damaged", "key": key,
                         "why": f"the cached artifact {ref.path} is damaged ({problem}): the next run sets it aside "
                                "and rebuilds it"})
            continue
        rows.append({"stage": stage.name, "status": "would run", "key": key,
                     "why": explain(stage, cfg, scfg, inputs, store)})
        # before a stage runs, run checks what it reads of its inputs against their content digests
        for u, uref in inputs.items():
            bad = store.verify(uref, deep=True, patterns=stage.reads(u))
            if bad is not None:
                row = next(r for r in rows if r["stage"] == u)
                row.update(status="damaged", why=f"the cached artifact {uref.path} is damaged ({bad}): {stage.name} "
                                                 "reads it, so the next run sets it aside and rebuilds it first")
    return rows


def may_use(stage: Stage, cfg: PipelineConfig, store: ArtifactStore) -> list[str]:
    """Keys of `stage`'s artifacts that `cfg` may still resolve to while the key cannot be computed (an upstream stage
    would run first): those of this code version and this config. Only the content digests of the inputs are
    unknown, and an upstream that reruns to byte-identical output (a threshold that drops nothing) hands on the
    same digests, so these keys come back."""
    mine = canonical_json(key_dict(stage.config(cfg)))  # what the manifests record as the stage's config
    version = stage.code_version
    return [m["key"] for m in store.manifests(stage.name)
            if m.get("code_version") == version and canonical_json(m.get("config")) == mine]


def referenced_keys(pipeline: Pipeline, cfg: PipelineConfig, origin: str = "the config",
                    said: list[str] | None = None) -> set[tuple[str, str]]:
    """(stage, key) of every artifact the config resolves to, as far as the cache goes, and of every artifact it may
    resolve to below a stage that would run (for `artifacts gc`: it keeps what it cannot prove unused). `said` gets
    one line naming what was kept for that reason.

    A stage whose key cannot be worked out (a hub source offline, a missing local source or eval-set file) is a
    StageError: gc must not take "unknown" for "unused" and delete what the config would use."""
    rows = pipeline_status(pipeline, cfg)
    unknown = [r for r in rows if r["status"] == "unknown"]
    if unknown:
        r = unknown[0]
        why = r["why"] if r["why"].startswith(f"{r['stage']}") else f"{r['stage']}: {r['why']}"
        raise StageError(f"cannot tell which artifacts {origin} uses: {why}")
    keep = {(r["stage"], r["key"]) for r in rows if r["key"]}
    waiting = [r["stage"] for r in rows if r["key"] is None and r["status"] == "would run"]
    if waiting:
        store = ArtifactStore(cfg.artifacts_dir)
        first = next(r["stage"] for r in rows if r["key"] is not None and r["status"] != "cached")
        kept = [(name, key) for name in waiting for key in may_use(pipeline[name], cfg, store)]
        keep |= set(kept)
        if kept and said is not None:
            said.append(f"kept {len(kept)} artifact(s) of {', '.join(dict.fromkeys(n for n, _ in kept))} that "
                        f"{origin} may still use: their keys wait for the output of {first}, which would run "
                        f"first, so gc cannot prove them unused ({', '.join(f'{n}/{k}' for n, k in kept)})")
    return keep
