"""The errors a user sees as one line, and the exit statuses the CLI gives them.

* ConfigError: a bad pipeline.yaml, --set override or command-line usage; the message names the key or option.
  Exit status 2.
* StageError: a stage failed on its input (or its program failed); the message names the file (and line) where
  there is one. Exit status 1.
* NeedsTheLog (a StageError): the cause is outside the input (a full disk: DiskFull; the Prefect server gone);
  the line says where and what to do, and `worldpm run` adds the path of the run's full log.
"""
from __future__ import annotations

import errno
import os
import shutil

EXIT_STAGE = 1
EXIT_CONFIG = 2


class ConfigError(ValueError):
    """A bad pipeline.yaml, --set override or option; the message names the key."""


class StageError(RuntimeError):
    """A stage failed on its input; the message is one line naming the file (and line) where there is one."""


class NeedsTheLog(StageError):
    """A failure whose cause is outside worldpm's input (the disk, the Prefect server): the one line names the stage,
    the place and what to do, and the CLI adds where the run's full log is (`run --verbose` prints it too)."""


class DiskFull(NeedsTheLog):
    """No space left on a device (or a quota reached) while a stage wrote."""


_FULL = {errno.ENOSPC, errno.EDQUOT}
_FULL_TEXT = tuple(os.strerror(n) for n in sorted(_FULL))  # how polars, pyarrow and torch report it in text


def disk_full(exc: BaseException | None) -> OSError | BaseException | None:
    """The exception in `exc`'s chain (cause, context) that says a disk is full, else None: an OSError with ENOSPC /
    EDQUOT, or a library error whose text says so (polars' ComputeError, pyarrow's OSError)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _FULL:
            return exc
        if any(t in str(exc) for t in _FULL_TEXT):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def free_space(path: str | os.PathLike) -> str:
    """Free space on the device of `path` (or of its nearest existing parent), for a message."""
    p = os.path.abspath(path)
    while p and not os.path.exists(p):
        p = os.path.dirname(p)
    try:
        n = shutil.disk_usage(p).free
    except OSError:
        return "unknown"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
