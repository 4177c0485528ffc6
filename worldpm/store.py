"""Content-addressed artifact store: ``<root>/<stage>/<key>/`` with ``manifest.json``.

* key = sha256(stage, stage code version, canonical stage config, upstream content digests). A stage whose
  inputs are unchanged has the same key and is skipped; a stage whose *output* is byte-identical to before has
  the same content digest, so everything downstream keeps its key too (early cutoff).
* Commit is atomic: a stage writes into ``<stage>/.tmp-<key>-<pid>-<rand>/``; the manifest is written last and
  the folder is renamed into place. A folder at ``<stage>/<key>/`` always holds a finished artifact; a crash
  leaves only a ``.tmp-*`` folder, which the next run removes.
* Locks (fcntl.flock): a run holds the store lock shared from its first stage to its last (``run_lock``, with a
  note in ``.runs/`` saying who holds it), a stage holds it shared while it resolves and computes, and its key's
  lock exclusive, so two runs of one key wait for each other instead of both writing. ``gc`` (and ``artifacts
  verify`` to set a damaged artifact aside) take the store lock exclusive without waiting: while a run is in
  progress they refuse (``StoreBusy``, naming the run), so they never delete what a run is about to read.
* Verified reuse: a cache hit is checked against its manifest (every file there, none added, each of its size:
  ``find``); what a stage is about to read is checked against the content digests (``verify(deep=True)``). A bad
  artifact is set aside as ``.bad-<key>-*`` (kept for inspection, removed by gc) and rebuilt.
* A forced rerun replaces the old artifact in one step (``renameat2(RENAME_EXCHANGE)`` on Linux): the old one is
  in place until the new one is.
* gc deletes only what is ours: folders with a manifest of that stage and key, and ``.tmp-/.work-/.bad-<key>``
  folders. Anything else under a stage folder is left alone and reported.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import fnmatch
import hashlib
import json
import os
import platform
import re
import secrets
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from worldpm.errors import StageError

MANIFEST = "manifest.json"
# the folders of ours that are not artifacts: <stage>/.tmp-<key>-*, .work-<key>, .bad-<key>-*
_OURS_RE = re.compile(r"^\.(?:tmp-(?P<tmp>[0-9a-f]{20})-.+|work-(?P<work>[0-9a-f]{20})|bad-(?P<bad>[0-9a-f]{20})-.+)$")
_KEY_RE = re.compile(r"[0-9a-f]{20}")  # stage_key's length
_LIB_NAMES = ("polars", "pyarrow", "datasets", "torch", "transformers", "accelerate", "deepspeed", "peft", "prefect")


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def json_lines(path: str | Path) -> Iterator[tuple[str, Any]]:
    """Each non-blank line of a JSON-lines file (metrics.jsonl, eval_curve.jsonl, the run history) as (where, value),
    where = "<path>:<line number>"; nothing when the file does not exist. A line that is not JSON is a StageError
    naming the file and line."""
    p = Path(path)
    if not p.exists():
        return
    for i, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise StageError(f"{p}:{i}: not a JSON line ({e.msg})") from None
        yield f"{p}:{i}", value


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


class StoreBusy(StageError):
    """gc / verify while a run holds the store: they refuse rather than delete what the run reads."""


@dataclass
class GcPlan:
    removed: list[Path] = field(default_factory=list)   # what gc removed (or would remove, dry run)
    foreign: list[Path] = field(default_factory=list)   # folders under a stage folder that are not ours: left alone


class ArtifactStore:
    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()

    # ---- lookup -------------------------------------------------------------------------------------------
    def path(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def get(self, stage: str, key: str) -> ArtifactRef | None:
        """The artifact committed at this key (its manifest says so), else None; nothing is checked or moved."""
        d = self.path(stage, key)
        return None if folder_problem(d, stage, key) else ArtifactRef(stage, key, str(d), _read_manifest(d)["digest"])

    def check(self, stage: str, key: str) -> tuple[ArtifactRef | None, str | None]:
        """What a run would find at this key, without changing anything: (ref, None) for a sound cache hit, (ref,
        problem) for a damaged one (a file missing, of another size or added; its manifest missing or unreadable),
        (None, None) where there is nothing. `find` sets the damaged ones aside; `status` only says so."""
        d = self.path(stage, key)
        if not os.path.lexists(d):
            return None, None
        ref = ArtifactRef(stage, key, str(d), "")
        problem = folder_problem(d, stage, key)
        if problem is not None:
            return ref, problem
        ref = ArtifactRef(stage, key, str(d), _read_manifest(d)["digest"])
        return ref, self.verify(ref)

    def damaged_folders(self, stage: str) -> list[tuple[ArtifactRef, str]]:
        """Folders at a key of `stage` whose manifest is missing or unreadable (`manifests` cannot list them, and
        `verify` must not pass them over): (ref, problem)."""
        d = self.root / stage
        out = []
        for k in sorted(d.iterdir()) if d.is_dir() else []:
            if _KEY_RE.fullmatch(k.name) and (problem := folder_problem(k, stage, k.name)) is not None:
                out.append((ArtifactRef(stage, k.name, str(k), ""), problem))
        return out

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
                    except (OSError, json.JSONDecodeError):
                        continue
                    if not isinstance(man, dict) or "key" not in man or "stage" not in man:
                        continue  # not a manifest of ours
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
    def run_lock(self, what: str) -> Iterator[None]:
        """Held (shared) for a whole run, from its first stage to its last: gc and verify refuse meanwhile, so an
        artifact a stage wrote is still there when a later stage of the run reads it. ``.runs/<pid>-*.json`` says
        who holds it (for gc's message)."""
        with self._flock(self.root / ".store.lock", fcntl.LOCK_SH):
            runs = self.root / ".runs"
            runs.mkdir(parents=True, exist_ok=True)
            note = runs / f"{os.getpid()}-{secrets.token_hex(4)}.json"
            note.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                                        "what": what}))
            try:
                yield
            finally:
                note.unlink(missing_ok=True)

    def runs_in_progress(self) -> list[dict]:
        """The notes of the runs that hold the store now (on this host: those whose process is alive)."""
        out = []
        for p in sorted((self.root / ".runs").glob("*.json")):
            try:
                note = json.loads(p.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if note.get("host") == socket.gethostname() and not _alive(int(note.get("pid", 0))):
                continue
            out.append(note)
        return out

    @contextlib.contextmanager
    def exclusive(self, what: str) -> Iterator[None]:
        """The store lock exclusive, without waiting: StoreBusy (one line naming the run) while a run holds it."""
        path = self.root / ".store.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a+") as fh:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                runs = self.runs_in_progress()
                who = "; ".join(f"pid {r['pid']} on {r['host']}, since {time.strftime('%H:%M:%S', time.localtime(r['started']))}: "
                                f"{r['what']}" for r in runs) or "a worldpm process"
                raise StoreBusy(f"{what}: the store {self.root} is in use by a run in progress ({who}); nothing "
                                f"was changed: run it again when the run has ended") from None
            try:
                for stale in (self.root / ".runs").glob("*.json"):  # notes of runs that died (none holds the lock)
                    stale.unlink(missing_ok=True)
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

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

        ``replace`` (a forced rerun): the new folder and the old artifact swap places in one rename (the old one
        stays in place until the new one is), then the old one is deleted."""
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
        if replace and final.exists():
            replace_dir(tmp, final)  # tmp now holds the old artifact
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            if os.path.lexists(final):
                ref, problem = self.check(stage, key)
                if problem is None:  # a sound artifact of the same key exists already (someone else won): keep it
                    shutil.rmtree(tmp, ignore_errors=True)
                    return ref
                # a damaged one (its manifest missing or unreadable, a file gone): set aside, as find does, and
                # ours goes in its place; the fresh output is never the one removed
                self.set_aside(ref, problem)
            os.rename(tmp, final)
        dfd = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        return ArtifactRef(stage, key, str(final), digest)

    # ---- verification ---------------------------------------------------------------------------------------
    def verify(self, ref: ArtifactRef, deep: bool = False, patterns: tuple[str, ...] | None = None) -> str | None:
        """What is wrong with a committed artifact, or None. Always: every file of its manifest is there with its
        size, and no file was added (a stage reads folders by glob); ``deep``: every file's sha256 too.
        ``patterns``: check only the files that match (what a stage reads, INPUT_FILES)."""
        d = Path(ref.path)
        problem = folder_problem(d, ref.stage, ref.key)
        if problem is not None:
            return problem
        files = _read_manifest(d).get("files", [])
        pick = (lambda p: any(fnmatch.fnmatch(p, pat) for pat in patterns)) if patterns else (lambda p: True)
        listed = {f["path"]: f for f in files}
        on_disk = {p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file()} - {MANIFEST}
        added = sorted(p for p in on_disk - listed.keys() if pick(p))
        if added:
            return f"{added[0]} is not in its manifest" + (f" (and {len(added) - 1} more)" if len(added) > 1 else "")
        for rel, f in listed.items():
            if not pick(rel):
                continue
            p = d / rel
            if rel not in on_disk:
                return f"{rel} is missing"
            size = p.stat().st_size
            if size != f["bytes"]:
                return f"{rel} has {size} bytes, its manifest says {f['bytes']}"
            if deep and file_sha256(p) != f["sha256"]:
                return f"{rel}: its content (sha256) differs from its manifest"
        return None

    def set_aside(self, ref: ArtifactRef, problem: str) -> Path:
        """Move a bad artifact out of the cache (``<stage>/.bad-<key>-*``, kept for inspection, removed by gc): the
        next lookup of its key misses and the stage runs again."""
        d = Path(ref.path)
        bad = d.with_name(f".bad-{ref.key}-{secrets.token_hex(4)}")
        try:
            os.rename(d, bad)
        except FileNotFoundError:  # another run set it aside first
            return bad
        if bad.is_dir():
            (bad / "SET_ASIDE.txt").write_text(f"{time.strftime('%Y-%m-%d %H:%M:%S')}: {problem}\n")
        return bad

    def bad_copies(self, stage: str, key: str) -> list[Path]:
        return sorted((self.root / stage).glob(f".bad-{key}-*"))

    def find(self, stage: str, key: str, log=None) -> ArtifactRef | None:
        """`get`, with the artifact's files checked against its manifest (sizes, nothing added: cheap). A bad one
        (its manifest missing or unreadable too) is set aside (and logged by name), so the caller rebuilds it."""
        ref, problem = self.check(stage, key)
        if ref is None or problem is None:
            return ref
        bad = self.set_aside(ref, problem)
        if log is not None:
            log.warning("%s: the cached artifact %s is damaged (%s): set aside as %s; it is rebuilt", stage, ref.path,
                        problem, bad.name)
        return None

    # ---- garbage collection -------------------------------------------------------------------------------
    def _artifact_key(self, stage: str, d: Path) -> str | None:
        """The key of a folder that is a committed artifact of `stage` (its manifest says so), else None."""
        try:
            m = json.loads((d / MANIFEST).read_text())
        except (OSError, json.JSONDecodeError):
            return None
        return d.name if isinstance(m, dict) and m.get("stage") == stage and m.get("key") == d.name else None

    def gc(self, keep: set[tuple[str, str]], dry_run: bool = False, stages: tuple[str, ...] | None = None) -> GcPlan:
        """Delete every artifact whose (stage, key) is not in ``keep``, the work folders of those keys, unfinished
        (.tmp-) and set-aside (.bad-) folders. Only folders that are ours: anything else under a stage folder is
        left alone (reported in ``foreign``). Refuses (StoreBusy) while a run holds the store.

        ``stages``: only these stage folders are touched (others under the root, e.g. history/, are left alone)."""
        plan = GcPlan()
        if not self.root.exists():
            return plan
        with self.exclusive("artifacts gc"):
            for sdir in sorted(p for p in self.root.iterdir() if p.is_dir()):
                if stages is not None and sdir.name not in stages:
                    continue
                for k in sorted(sdir.iterdir()):
                    if not k.is_dir():
                        continue
                    m = _OURS_RE.match(k.name)
                    if m:
                        drop = m["work"] is None or (sdir.name, m["work"]) not in keep
                    elif self._artifact_key(sdir.name, k) is not None:
                        drop = (sdir.name, k.name) not in keep
                    else:
                        plan.foreign.append(k)
                        continue
                    if drop:
                        plan.removed.append(k)
                        if not dry_run:
                            shutil.rmtree(k, ignore_errors=True)
        return plan


def _read_manifest(d: Path) -> Any:
    return json.loads((d / MANIFEST).read_text())


def folder_problem(d: Path, stage: str, key: str) -> str | None:
    """What keeps the folder at <stage>/<key> from being a committed artifact (its manifest.json missing,
    unreadable, or not this artifact's), or None. Every folder there was renamed into place with its manifest, so a
    problem here is damage, not a write in progress."""
    if not d.is_dir():
        return "it is not a folder" if os.path.lexists(d) else "it is missing"
    try:
        m = _read_manifest(d)
    except FileNotFoundError:
        return f"its {MANIFEST} is missing"
    except json.JSONDecodeError as e:
        return f"its {MANIFEST} is not valid JSON ({e.msg}, line {e.lineno})"
    except (OSError, UnicodeDecodeError) as e:
        return f"its {MANIFEST} cannot be read ({getattr(e, 'strerror', None) or type(e).__name__})"
    if not isinstance(m, dict) or not isinstance(m.get("digest"), str):
        return f"its {MANIFEST} has no content digest"
    if m.get("stage", stage) != stage or m.get("key", key) != key:
        return f"its {MANIFEST} is that of {m.get('stage')}/{m.get('key')}"
    return None


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---- replacing a folder in one step -----------------------------------------------------------------------------
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _renameat2():
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # not Linux, or a libc without renameat2
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_RENAMEAT2 = _renameat2()


def exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE). False where the system or filesystem cannot."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def replace_dir(new: Path, final: Path) -> None:
    """Put folder `new` at `final` where a folder is already; afterwards `new` holds the old one. One atomic swap
    where the system has it; else the old one is moved aside, the new one renamed in, and the old one put back if
    that fails, so `final` is never left without an artifact."""
    if exchange(new, final):
        return
    aside = final.with_name(f".tmp-{final.name}-old-{secrets.token_hex(4)}")
    os.rename(final, aside)
    try:
        os.rename(new, final)
    except BaseException:
        os.rename(aside, final)
        raise
    os.rename(aside, new)


def work_dir_key(work: str | Path) -> str | None:
    """The key whose work folder (ArtifactStore.work_dir) ``work`` is, or None for another folder."""
    name = Path(work).name
    return name[len(".work-"):] if name.startswith(".work-") else None
