"""Eval sets (`evaluate.eval_sets`) as stage inputs: files outside the store, so each one's content digest goes into
the key of every stage that reads it (evaluate; train when it evaluates during training, train.eval_at)."""
from __future__ import annotations

from pathlib import Path

from worldpm.config import EvalSetConfig, Strict
from worldpm.errors import StageError
from worldpm.store import file_digest


class EvalSetFile(Strict):
    """An eval set as a key sees it: its name, file, format, category and the file's content digest."""

    name: str
    path: str
    format: str
    digest: str
    category: str | None = None


def eval_set_files(sets: list[EvalSetConfig]) -> list[EvalSetFile]:
    """The configured eval sets with their digests; a missing file is a one-line StageError naming the set."""
    out = []
    for s in sets:
        p = Path(s.path)
        if not p.is_file():
            raise StageError(f"evaluate.eval_sets {s.name!r}: no such file: {p}")
        out.append(EvalSetFile(name=s.name, path=str(p), format=s.format, digest=file_digest(p), category=s.category))
    return out
