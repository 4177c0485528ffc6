"""Content-addressed artifact store: ``<root>/<stage>/<key>/`` with ``manifest.json``.

* key = sha256(stage, stage code version, canonical stage config, upstream content digests). A stage whose
  inputs are unchanged has the same key and is skipped; a stage whose *output* is byte-identical to before has
  the same content digest, so everything downstream keeps its key too (early cutoff).
* Commit is atomic: a stage writes into ``<stage>/.tmp-<key>-<pid>-<rand>/``; the manifest is written last and
  the folder is renamed into place. A folder at ``<stage>/<key>/`` always holds a finished artifact; a crash
  leaves only a ``.tmp-*`` folder, which the next run removes.
* Locks (fcntl.flock): a stage holds the store lock shared while it resolves and computes, and its key's lock
  exclusive, so two runs of one key wait for each other instead of both writing; ``gc`` takes the store lock
  exclusive.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

MANIFEST = "manifest.json"
_LIB_NAMES = ("polars", "pyarrow", "datasets", "torch", "transformers", "accelerate", "deepspeed", "peft", "prefect")


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def file_sha256(path: Path, bufsize: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


_digest_memo: dict[tuple, str] = {}


def file_digest(path: str | Path, bufsize: int = 1 << 22) -> str:
    """Content digest of an input file (xxh3-128, several GB/s), memoised per (path, size, mtime, inode) within
    a process: what a local source's key depends on, so touching a file without changing it changes nothing."""
    import xxhash

    p = Path(path)
    st = p.stat()
    memo = (str(p.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    if memo not in _digest_memo:
        h = xxhash.xxh3_128()
        with open(p, "rb") as f:
            while chunk := f.read(bufsize):
                h.update(chunk)
        _digest_memo[memo] = "xxh3:" + h.hexdigest()
    return _digest_memo[memo]


def dir_digest(root: Path, exclude: tuple[str, ...] = (MANIFEST,)) -> tuple[str, int, list[dict]]:
    """sha256 over (relative path, file sha256) of every file, sorted: the artifact's content digest."""
    files = []
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.relative_to(root).as_posix() not in exclude:
            files.append({"path": p.relative_to(root).as_posix(), "bytes": p.stat().st_size, "sha256": file_sha256(p)})
    h = hashlib.sha256(canonical_json([(f["path"], f["sha256"]) for f in files]).encode())
    return h.hexdigest(), sum(f["bytes"] for f in files), files


def library_versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in _LIB_NAMES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def stage_key(stage: str, code_version: str, config: Any, upstream_digests: dict[str, str]) -> str:
    payload = {"stage": stage, "code": code_version, "config": config, "upstream": upstream_digests}
    return sha256_text(canonical_json(payload))[:20]


@dataclass(frozen=True)
class ArtifactRef:
    """What passes between tasks: a reference, never the data."""

    stage: str
    key: str
    path: str
    digest: str

    def manifest(self) -> dict:
        return json.loads((Path(self.path) / MANIFEST).read_text())

    def to_dict(self) -> dict:
        return {"stage": self.stage, "key": self.key, "path": self.path, "digest": self.digest}


class ArtifactStore:
    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()

    # ---- lookup -------------------------------------------------------------------------------------------
    def path(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def get(self, stage: str, key: str) -> ArtifactRef | None:
        d = self.path(stage, key)
        m = d / MANIFEST
        if not m.is_file():
            return None
        try:
            manifest = json.loads(m.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        return ArtifactRef(stage, key, str(d), manifest["digest"])

    def manifests(self, stage: str | None = None) -> list[dict]:
        """Every finished artifact's manifest (newest first)."""
        stages = [stage] if stage else sorted(p.name for p in self.root.iterdir() if p.is_dir()) if self.root.exists() else []
        out = []
        for s in stages:
            d = self.root / s
            if not d.is_dir():
                continue
            for k in d.iterdir():
                m = k / MANIFEST
                if k.is_dir() and not k.name.startswith(".") and m.is_file():
                    try:
                        man = json.loads(m.read_text())
                    except json.JSONDecodeError:
                        continue
                    man["path"] = str(k)
                    out.append(man)
        out.sort(key=lambda m: m.get("finished_at", 0), reverse=True)
        return out

    # ---- locking ------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _flock(self, path: Path, mode: int) -> Iterator[None]:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a+") as fh:
            fcntl.flock(fh.fileno(), mode)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    @contextlib.contextmanager
    def using(self) -> Iterator[None]:
        """Held (shared) while one stage resolves and runs, so gc cannot delete what that stage reads."""
        with self._flock(self.root / ".store.lock", fcntl.LOCK_SH):
            yield

    @contextlib.contextmanager
    def key_lock(self, stage: str, key: str) -> Iterator[None]:
        with self._flock(self.root / stage / f".{key}.lock", fcntl.LOCK_EX):
            yield

    # ---- writing ------------------------------------------------------------------------------------------
    def clear_stale_tmp(self, stage: str, key: str) -> list[Path]:
        """Remove tmp folders of this key left by a crashed run (call with the key lock held)."""
        removed = []
        d = self.root / stage
        if d.is_dir():
            for t in d.glob(f".tmp-{key}-*"):
                shutil.rmtree(t, ignore_errors=True)
                removed.append(t)
        return removed

    def work_dir(self, stage: str, key: str) -> Path:
        """Scratch space of one key that survives a crash (checkpoints), removed after a successful commit."""
        w = self.root / stage / f".work-{key}"
        w.mkdir(parents=True, exist_ok=True)
        return w

    def drop_work_dir(self, stage: str, key: str) -> None:
        shutil.rmtree(self.root / stage / f".work-{key}", ignore_errors=True)

    def new_tmp(self, stage: str, key: str) -> Path:
        tmp = self.root / stage / f".tmp-{key}-{os.getpid()}-{secrets.token_hex(4)}"
        tmp.mkdir(parents=True)
        return tmp

    def commit(self, stage: str, key: str, tmp: Path, manifest: dict, replace: bool = False) -> ArtifactRef:
        """Digest the tmp folder, write its manifest last, fsync, rename into place.

        ``replace`` (a forced rerun): the old artifact is moved aside first, then deleted after the rename."""
        digest, nbytes, files = dir_digest(tmp)
        manifest = dict(manifest)
        manifest.update(
            stage=stage, key=key, digest=digest, bytes=nbytes, files=files,
            finished_at=time.time(), libraries=library_versions(),
        )
        mpath = tmp / MANIFEST
        with open(mpath, "w") as f:
            f.write(json.dumps(manifest, indent=2, sort_keys=True, default=str))
            f.flush()
            os.fsync(f.fileno())
        final = self.path(stage, key)
        old = None
        if replace and final.exists():
            old = final.with_name(f".tmp-{key}-old-{secrets.token_hex(4)}")
            os.rename(final, old)
        if final.exists():  # a finished artifact of the same key exists already (someone else won): keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
            ref = self.get(stage, key)
            if ref is not None:
                return ref
            shutil.rmtree(final, ignore_errors=True)  # an unfinished folder without manifest: never trusted
        os.rename(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        dfd = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        return ArtifactRef(stage, key, str(final), digest)

    # ---- garbage collection -------------------------------------------------------------------------------
    def gc(self, keep: set[tuple[str, str]], dry_run: bool = False, stages: tuple[str, ...] | None = None) -> list[Path]:
        """Delete every artifact whose (stage, key) is not in ``keep``, stale tmp and work folders.

        ``stages``: only these stage folders are touched (others under the root, e.g. history/, are left alone)."""
        removed: list[Path] = []
        if not self.root.exists():
            return removed
        with self._flock(self.root / ".store.lock", fcntl.LOCK_EX):
            for sdir in sorted(p for p in self.root.iterdir() if p.is_dir()):
                if stages is not None and sdir.name not in stages:
                    continue
                for k in sorted(sdir.iterdir()):
                    if not k.is_dir():
                        continue
                    name = k.name.removeprefix(".work-")
                    if k.name.startswith(".tmp-") or (sdir.name, name) not in keep:
                        removed.append(k)
                        if not dry_run:
                            shutil.rmtree(k, ignore_errors=True)
        return removed
