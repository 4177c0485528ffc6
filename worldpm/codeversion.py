"""The code version of a stage: a hash of the source files its module imports, followed through the project.

Not Prefect's TASK_SOURCE, which covers only the task's own lines and misses the helpers it calls, and not a
hand-kept list, which drifts from the imports: the files a stage's module imports, directly or not, at module level
or inside a function (a stage imports heavy libraries lazily), with the __init__.py of every package on the way.
Only the import lists are memoised (by file size and mtime, across processes); the files are hashed as they are.
"""
from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import os
import sys
import threading
import time
from pathlib import Path
from types import ModuleType

_code_cache: dict[str, str] = {}
# Imported by every stage, yet unable to change what a stage writes except through values that are in its key
# already: the settings (a default or a validator changes the stage config a key is made of), the engine and this
# versioner (how a stage is keyed and run), the store (digests are keyed), the one-line errors; and process
# supervision (the trainer's guard, process groups: who may run, never what it computes). Left out, so that
# editing them does not recompute every artifact.
KEY_NEUTRAL = ("worldpm/config.py", "worldpm/engine.py", "worldpm/codeversion.py", "worldpm/errors.py",
               "worldpm/store.py", "worldpm/procs.py", "worldpm/modeling/trainer/guard.py")


def _project_roots() -> dict[str, Path]:
    """{top-level package: its folder} of the packages whose code can change a stage's output."""
    roots = {}
    for top in ("worldpm", "tasks"):
        spec = importlib.util.find_spec(top)
        if spec and spec.submodule_search_locations:
            roots[top] = Path(list(spec.submodule_search_locations)[0]).resolve()
    return roots


def _module_file(name: str, roots: dict[str, Path]) -> Path | None:
    top, _, rest = name.partition(".")
    if top not in roots:
        return None
    base = roots[top].joinpath(*rest.split(".")) if rest else roots[top]
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def _package_of(path: Path, roots: dict[str, Path]) -> str:
    for top, root in roots.items():
        if path.is_relative_to(root):
            parts = [top, *path.relative_to(root).with_suffix("").parts]
            return ".".join(parts[:-1])  # the package a module (or an __init__.py) is in
    return ""


_parse_lock = threading.Lock()


def _parse(f: Path) -> ast.AST:
    """ast.parse, retried: CPython 3.11's AST constructor keeps its recursion depth in per-interpreter state, so a
    parse that overlaps one in another thread of a flow run can fail with "SystemError: AST constructor recursion
    depth mismatch" (seen here in a served flow run; python/cpython#106905 and the reports around it). Our own
    parses take a lock; one that collides with another thread's is retried."""
    text = f.read_text()
    for attempt in range(10):
        try:
            with _parse_lock:
                return ast.parse(text, filename=str(f))
        except SystemError:
            if attempt == 9:
                raise
            time.sleep(0.01 * (attempt + 1))
    raise AssertionError("unreachable")


_names_cache: dict[str, list[str]] | None = None  # "file|package|size|mtime_ns" -> the names it imports
_names_dirty = False
_memo_lock = threading.RLock()  # stages resolve in the threads of a flow run


def _names_file() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "worldpm" / "imports.json"


def _names_memo() -> dict[str, list[str]]:
    """The import lists of the project's files, memoised by (file, size, mtime) across processes (parsing ~100
    files was ~0.8 s of every `worldpm run`, cached or not). Only what a file imports is memoised, never its
    content: the code version always hashes the files as they are. Call with _memo_lock held."""
    global _names_cache
    if _names_cache is None:
        try:
            loaded = json.loads(_names_file().read_text())
            _names_cache = loaded if isinstance(loaded, dict) else {}
        except (OSError, ValueError):
            _names_cache = {}
    return _names_cache


def _save_names_memo() -> None:
    global _names_dirty
    with _memo_lock:
        if not _names_dirty:
            return
        path = _names_file()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(_names_memo()))
            os.replace(tmp, path)  # atomic: a reader sees the old memo or the new one
        except OSError:  # a read-only home: the memo stays in this process
            pass
        _names_dirty = False


def _imported_names(f: Path, pkg: str) -> list[str]:
    """The module names file `f` imports anywhere in its body, memoised per (file, size, mtime) (_names_memo)."""
    global _names_dirty
    st = f.stat()
    prefix = f"{f}|{pkg}|"
    memo = f"{prefix}{st.st_size}|{st.st_mtime_ns}"
    with _memo_lock:
        cache = _names_memo()
        if memo in cache:
            return cache[memo]
        names: list[str] = []
        for node in ast.walk(_parse(f)):
            if isinstance(node, ast.Import):
                names += [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                    base = ".".join([*up, base] if base else up)
                names.append(base)
                names += [f"{base}.{a.name}" for a in node.names]  # `from pkg import module`
        for old in [k for k in cache if k.startswith(prefix)]:  # the file's earlier versions
            del cache[old]
        cache[memo] = names
        _names_dirty = True
        return names


def imported_files(path: Path, roots: dict[str, Path] | None = None) -> list[Path]:
    """`path` and every project source file it imports, directly or not, at module level or inside a function
    (a stage imports heavy libraries lazily), with the __init__.py of every package on the way."""
    roots = roots or _project_roots()
    seen: set[Path] = set()
    todo = [path.resolve()]
    while todo:
        f = todo.pop()
        if f in seen:
            continue
        seen.add(f)
        for name in _imported_names(f, _package_of(f, roots)):
            parts = name.split(".")
            for i in range(1, len(parts) + 1):  # the packages on the way are executed too
                m = _module_file(".".join(parts[:i]), roots)
                if m is not None and m.resolve() not in seen:
                    todo.append(m.resolve())
    return sorted(seen)


_loaded: dict[Path, bytes] = {}  # project file -> its content when its module was first seen loaded


def remember_loaded_sources() -> None:
    """Keep the content of every project file whose module is loaded and not yet remembered. A code version hashes
    a loaded module's file as it was when it was first seen loaded (at the latest the next call here), not as it is
    on disk at key time: a stage file edited while a run goes on would otherwise key what the old code writes
    under the new code's version. A module not loaded yet (a stage's lazy imports) is hashed from disk."""
    roots = _project_roots()
    for m in list(sys.modules.values()):
        f = getattr(m, "__file__", None)
        if not f or not f.endswith(".py"):
            continue
        path = Path(f).resolve()
        if path not in _loaded and any(path.is_relative_to(r) for r in roots.values()):
            try:
                _loaded[path] = path.read_bytes()
            except OSError:
                pass


def code_version(name: str, module: ModuleType) -> str:
    """sha256 of the stage module's source and of every project file it imports (not Prefect's TASK_SOURCE,
    which misses the helpers a task calls, and not a hand-kept list, which drifts from the imports)."""
    if name in _code_cache:
        return _code_cache[name]
    remember_loaded_sources()
    roots = _project_roots()
    h = hashlib.sha256()
    for f in imported_files(Path(module.__file__), roots):
        top = next(t for t, r in roots.items() if f.is_relative_to(r))
        rel = f"{top}/{f.relative_to(roots[top]).as_posix()}"
        if rel in KEY_NEUTRAL:
            continue
        h.update(rel.encode())
        h.update(_loaded.get(f) or f.read_bytes())
    _save_names_memo()
    _code_cache[name] = h.hexdigest()[:16]
    return _code_cache[name]
