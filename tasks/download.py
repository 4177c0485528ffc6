"""download: every configured source -> canonical pair files, one per input file, plus the rejects.

Sources (pipeline.yaml `sources`, each tagged in the `source` column):
    demo   the deterministic demo dataset generated here (tasks/demo.py): offline, the embedded default
    local  a file, a directory (searched recursively) or a glob of JSONL, JSONL.gz, JSON, Parquet, CSV, Posts.xml
    hf     a dataset repo on the Hugging Face hub: the revision (branch, tag or unset = main) is resolved to a commit
           sha in stage_config, so the key changes exactly when the upstream does (a nightly run on an unchanged
           repo is a cache hit); files come through huggingface_hub.snapshot_download (resumable, its own cache),
           with retries on network errors.

Output: pairs/<nnnnn>-<tag>.parquet (canonical schema, zstd), rejects.parquet, sources.json. Every record is
accounted for, checked per file: records == records that gave pairs + records rejected (reason, file, line).
A StackExchange question gives several pairs, so the manifest's rows_in counts a record once per pair it gave
(rows_in == rows_out + rows_rejected); records_in / records_used are the plain counts. Candidate answer pairs
that are not written are counted in sources.json: equal_score_pairs (a tie), capped_pairs (beyond
max_pairs_per_question), answers_unusable / answers_orphan (no text or score / no question in the file).

Bad input: a file that cannot be used at all (missing, empty, unknown shape, missing columns) stops the run with
one line naming it; a bad record (malformed JSON, invalid UTF-8, a NaN / Infinity number, a NaN margin in a typed
column, no preference) is quarantined in rejects.parquet with its reason, file and line, and the rest is read.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import polars as pl

from pydantic import field_serializer

from worldpm.config import PipelineConfig, SourceConfig, StageConfig
from worldpm.data.sources import AdapterError, is_data_file, read_source_file
from worldpm.data.sources import local_files as sources_local_files
from worldpm.data.sources.common import REJECTS_SCHEMA, empty_rejects
from worldpm.engine import StageSpec
from worldpm.errors import StageError
from worldpm.store import ArtifactRef, file_digest

HF_RETRIES = 4
ROW_GROUP = 20_000  # rows per Parquet row group written (the sink holds one in memory)
_SHA = re.compile(r"^[0-9a-f]{40}$")
_UNUSED = {  # SourceConfig fields that a kind of source ignores
    "demo": ("path", "repo_id", "revision", "data_dir", "allow_patterns", "format"),
    "local": ("repo_id", "revision", "data_dir", "allow_patterns", "rows", "seed"),
    "hf": ("path", "rows", "seed"),
}


class HubUnreachable(StageError):
    pass


# ---- the key: what the output depends on ---------------------------------------------------------------------
class ResolvedSource(StageConfig):
    """One source with what identifies its content: a digest of each local file (path, size and mtime are not
    content), the resolved commit of an hf source."""

    source: SourceConfig
    tag: str
    files: dict[str, str] | None = None    # local: path -> content digest
    resolved_revision: str | None = None   # hf: the commit sha

    @field_serializer("source")
    def _what_its_kind_reads(self, s: SourceConfig) -> dict:
        # only the settings this kind of source reads: `rows` of a local source changes nothing, so no new key
        return s.model_dump(mode="json", exclude_none=True, exclude=set(_UNUSED[s.kind]))


class DownloadConfig(StageConfig):
    sources: list[ResolvedSource]


def stage_config(cfg: PipelineConfig) -> DownloadConfig:
    out = []
    for s in cfg.sources:
        files = {str(p): file_digest(p) for p in local_files(s)} if s.kind == "local" else None
        rev = resolve_revision(s) if s.kind == "hf" else None
        out.append(ResolvedSource(source=s, tag=s.tag(), files=files, resolved_revision=rev))
    return DownloadConfig(sources=out)


def local_files(s: SourceConfig) -> list[Path]:
    """The data files of a local source, sorted: a file, a directory (recursive) or a glob (within the read root
    of a deployment run: worldpm.data.sources.local_files)."""
    try:
        return sources_local_files(s.path or "")
    except AdapterError as e:
        raise StageError(f"download: {e}") from None


def _hub_error(s: SourceConfig, e: BaseException | None = None) -> HubUnreachable:
    why = f" ({type(e).__name__})" if e is not None else ""
    return HubUnreachable(
        f"download: cannot reach the Hugging Face hub for dataset {s.repo_id}{why} (offline?): use a local copy "
        f"instead: `worldpm run --source /path/to/files` or a source with kind: local")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in ("1", "true", "yes", "on")


def _not_found(s: SourceConfig, rev: str | None, e: BaseException) -> StageError:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return StageError(f"download: {s.repo_id}@{rev or 'main'}: {type(e).__name__}: {first}")


def _with_retries(what: str, fn, s: SourceConfig, log=None):
    """fn() with HF_RETRIES tries and exponential backoff on network errors; a missing repo, revision or file
    (or offline mode) fails at once."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    last: BaseException | None = None
    for attempt in range(HF_RETRIES):
        try:
            return fn()
        except (RepositoryNotFoundError, RevisionNotFoundError, GatedRepoError, EntryNotFoundError) as e:
            raise _not_found(s, s.revision, e) from None
        except (OfflineModeIsEnabled, LocalEntryNotFoundError) as e:
            raise _hub_error(s, e) from None
        except Exception as e:  # connection errors, timeouts, 5xx: retried with backoff
            last = e
            if log is not None:
                log.warning("download: %s: %s, attempt %d of %d failed: %s", s.repo_id, what, attempt + 1,
                            HF_RETRIES, (str(e).strip().splitlines() or [type(e).__name__])[0])
            if attempt + 1 < HF_RETRIES:
                time.sleep(min(2 ** attempt, 8))
    raise _hub_error(s, last)


def resolve_revision(s: SourceConfig) -> str:
    """The commit sha of the source's revision (a pinned sha is taken as is, without the network)."""
    if s.revision and _SHA.match(s.revision):
        return s.revision
    if _offline():
        raise _hub_error(s)
    from huggingface_hub import HfApi

    return _with_retries("resolving the revision",
                         lambda: HfApi().dataset_info(s.repo_id, revision=s.revision).sha, s)


def hf_patterns(s: SourceConfig) -> list[str] | None:
    patterns = list(s.allow_patterns or [])
    if s.data_dir:
        patterns.append(f"{s.data_dir.strip('/')}/**")
    return patterns or None


def hf_files(s: SourceConfig, sha: str, log) -> list[Path]:
    """snapshot_download of the pinned commit (resumable: a retry or a later run continues partial files; the
    hub cache makes an unchanged revision free), then the data files that match the patterns."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import filter_repo_objects

    patterns = hf_patterns(s)
    root = Path(_with_retries("downloading", lambda: snapshot_download(
        repo_id=s.repo_id, repo_type="dataset", revision=sha, allow_patterns=patterns), s, log))
    # the snapshot folder is shared by every download of this commit: keep only what these patterns select
    rel = [f.relative_to(root).as_posix() for f in root.rglob("*") if f.is_file() and is_data_file(f)]
    files = sorted(root / r for r in filter_repo_objects(rel, allow_patterns=patterns))
    if not files:
        raise StageError(f"download: {s.repo_id}@{sha[:10]}: no data files (.jsonl[.gz], .json, .parquet, .csv, "
                         f"Posts.xml) match {patterns or 'the repo'}")
    return files


# ---- run -----------------------------------------------------------------------------------------------------
def _safe(tag: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", tag)[:60]


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def run(scfg: DownloadConfig, inputs: dict[str, ArtifactRef], out: Path, log, work: Path) -> dict:
    """Each file of each source -> pairs/<nnnnn>-<tag>.parquet, streamed. Accounting, checked per file:
    records == records that gave pairs + records rejected. The manifest's rows_in counts a record once per pair
    it gave (a StackExchange question gives several), so rows_in == rows_out (pairs) + rows_rejected holds too."""
    (out / "pairs").mkdir(parents=True)
    rej_dir = work / "rejects"
    if rej_dir.exists():
        shutil.rmtree(rej_dir)
    rej_dir.mkdir(parents=True)
    report: list[dict] = []
    n_file = 0
    for src in scfg.sources:
        s, tag = src.source, src.tag
        entry: dict = {"kind": s.kind, "tag": tag, "format": s.format, "files": []}
        report.append(entry)
        if s.kind == "demo":
            entry["files"].append(_demo(s, tag, out / "pairs" / f"{n_file:05d}-{_safe(tag)}.parquet", log))
            n_file += 1
            continue
        if s.kind == "hf":
            sha = src.resolved_revision
            entry.update(repo_id=s.repo_id, revision=s.revision, resolved_revision=sha, allow_patterns=hf_patterns(s))
            log.info("download: %s@%s -> commit %s", s.repo_id, s.revision or "main", sha)
            files = hf_files(s, sha, log)
        else:
            entry["path"] = s.path
            files = [Path(f) for f in src.files or {}]
        total_bytes = sum(f.stat().st_size for f in files) or 1
        done_bytes, t_src = 0, time.perf_counter()
        for i, f in enumerate(files, 1):
            t0 = time.perf_counter()
            e = _one_file(f, s, tag, out / "pairs" / f"{n_file:05d}-{_safe(tag)}.parquet",
                          rej_dir / f"{n_file:05d}.parquet", work / f"src-{n_file:05d}", log)
            entry["files"].append(e)
            n_file += 1
            done_bytes += e["bytes"]
            rate = done_bytes / max(time.perf_counter() - t_src, 1e-9)
            log.info("download: %s [%d/%d] %s: %s, %d records -> %d pairs, %d rejected (%.1fs; %.1f MB/s, ETA %.0fs)",
                     tag, i, len(files), f.name, e["format"], e["records"], e["pairs"], e["rejected"],
                     time.perf_counter() - t0, rate / 1e6, (total_bytes - done_bytes) / max(rate, 1e-9))
        entry["formats"] = sorted({x["format"] for x in entry["files"]})
        if len(entry["formats"]) == 1:
            entry["format"] = entry["formats"][0]
    return _finish(report, rej_dir, out, log)


def _demo(s: SourceConfig, tag: str, target: Path, log) -> dict:
    """The generated demo data set: pairs of `s.rows` questions, offline and deterministic."""
    from worldpm.data import demo

    t0 = time.perf_counter()
    df = demo.generate(rows=s.rows, seed=s.seed, tag=tag, max_pairs_per_question=s.max_pairs_per_question)
    df.write_parquet(target, compression="zstd")
    used = df["group_id"].n_unique()
    if used != s.rows:
        raise StageError(f"download: demo: {s.rows} questions generated, {used} gave pairs: records lost")
    log.info("download: demo: %d pairs from %d generated questions (%.2fs)", df.height, s.rows,
             time.perf_counter() - t0)
    return {"file": "<demo>", "format": "demo", "records": s.rows, "pairs": df.height, "rejected": 0,
            "records_used": used, "seed": s.seed}


def _one_file(f: Path, s: SourceConfig, tag: str, target: Path, rej_part: Path, work: Path, log) -> dict:
    """One source file through its adapter into `target` (pairs) and `rej_part` (rejected records), accounted."""
    try:
        res = read_source_file(f, s.format, tag, max_pairs_per_question=s.max_pairs_per_question, work=work, log=log)
        # separate streaming passes: one collect_all over the shared plan caches it whole (measured: 2.3
        # GB peak RSS vs 1.4 GB on a 600 MB JSONL); small row groups keep the sink's buffer small
        res.pairs.sink_parquet(target, compression="zstd", row_group_size=ROW_GROUP, engine="streaming")
        res.rejects.select([pl.col(c).cast(t) for c, t in REJECTS_SCHEMA.items()]) \
            .sink_parquet(rej_part, compression="zstd", row_group_size=ROW_GROUP, engine="streaming")
        counted = pl.collect_all(res.frames(), engine="streaming") if res.frames() else []
    except AdapterError as e:
        raise StageError(f"download: {e}") from None
    except pl.exceptions.PolarsError as e:
        raise StageError(f"download: {f}: {_first_line(e)}") from None
    n_pairs = pl.scan_parquet(target).select(pl.len()).collect().item()
    n_rej = pl.scan_parquet(rej_part).select(pl.len()).collect().item()
    # one staged row per record (most formats): the records that gave pairs are the pairs written
    used = int(counted[0]["n"][0]) if res.pair_records is not None else n_pairs
    extra = counted[-1].row(0, named=True) if res.lazy_stats is not None else {}
    if res.records != used + n_rej:
        raise StageError(f"download: {f}: {res.records} records read, but {used} gave pairs and {n_rej} "
                         "were rejected: records were lost")
    if "candidate_pairs" in extra:  # the answer formats: the pairs they could have made, accounted for
        extra["capped_pairs"] = extra["candidate_pairs"] - extra["equal_score_pairs"] - n_pairs
    return {"file": str(f), "format": res.format, "records": res.records, "pairs": n_pairs, "rejected": n_rej,
            "records_used": used, "bytes": f.stat().st_size, **res.stats, **extra}


def _finish(report: list[dict], rej_dir: Path, out: Path, log) -> dict:
    """rejects.parquet and sources.json from the per-file parts; the manifest's counts."""
    parts = sorted(rej_dir.glob("*.parquet"))
    rejects = pl.scan_parquet(parts) if parts else empty_rejects().lazy()
    rejects.sink_parquet(out / "rejects.parquet", compression="zstd", engine="streaming")
    by_reason = dict(pl.scan_parquet(out / "rejects.parquet").group_by("reason").len().sort("reason")
                     .collect().rows())
    for e in report:
        e["records"] = sum(x["records"] for x in e["files"])
        e["pairs"] = sum(x["pairs"] for x in e["files"])
        e["rejected"] = sum(x["rejected"] for x in e["files"])
    (out / "sources.json").write_text(json.dumps(report, indent=2))
    tot = {k: sum(x[k] for e in report for x in e["files"]) for k in ("records", "records_used", "pairs", "rejected")}
    if tot["pairs"] == 0:
        raise StageError("download: no pair in any source"
                         + (f" ({tot['rejected']} records rejected; reasons: "
                            + ", ".join(f"{k} {v}" for k, v in by_reason.items()) + ")" if tot["rejected"] else ""))
    log.info("download: %d records -> %d pairs, %d rejected%s", tot["records"], tot["pairs"], tot["rejected"],
             "".join(f"; {k}: {v}" for k, v in by_reason.items()))
    return {
        # a record counts once per pair it gave: rows_in == rows_out + rows_rejected (checked by the runner)
        "rows_in": tot["records"] + tot["pairs"] - tot["records_used"],
        "rows_out": tot["pairs"],
        "rows_rejected": tot["rejected"],
        "records_in": tot["records"],
        "records_used": tot["records_used"],
        "records_rejected": tot["rejected"],
        "rejected_by_reason": by_reason,
        "sources": report,
    }


STAGE = StageSpec(config=stage_config, run=run)
