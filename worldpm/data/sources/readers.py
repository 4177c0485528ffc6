"""Raw readers: a file -> a lazy frame of its records, how many records it holds, and the records that could
not be read (quarantined with a reason, never dropped silently).

JSONL is read by polars (scan_ndjson, streaming). One full parse up front validates the file and counts its
records (about 1.4 s a GB); if polars rejects the file (a malformed line, invalid UTF-8, a type clash) the file
goes through a line reader instead, which quarantines the bad lines (reason malformed_json / invalid_utf8, with
file and line number) and hands the good lines, unchanged, to the same polars scan. JSON (one array) is loaded
whole (that is the format) and goes the same way. CSV is scanned lazily the same way: if polars rejects the file
(a record in Latin-1 or another non-UTF-8 encoding, a record with the wrong number of fields), Python's csv
module reads it record by record and quarantines those (invalid_utf8 / malformed_csv, with the line where the
record starts). Parquet is scanned lazily.
"""
from __future__ import annotations

import atexit
import gzip
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import xxhash

from worldpm.data.sources.common import AdapterError, empty_rejects, reject_rows

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".jsonl.gz", ".ndjson.gz")
JSON_SUFFIXES = (".json", ".json.gz")
PARQUET_SUFFIXES = (".parquet",)
CSV_SUFFIXES = (".csv",)
XML_NAMES = ("posts.xml",)
INFER_ROWS = 1000
_COUNT = "__worldpm_records"


@dataclass
class RawTable:
    lf: pl.LazyFrame
    records: int
    rejects: pl.DataFrame
    container: str  # jsonl | json | parquet | csv


def container_of(path: Path) -> str | None:
    """The file container from its name, or None for files that are no data (README, LICENSE, ...)."""
    name = path.name.lower()
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(JSON_SUFFIXES):
        return "json"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if name.endswith(CSV_SUFFIXES):
        return "csv"
    if name in XML_NAMES:
        return "xml"
    return None


_tmp_dirs: list[str] = []


def scratch_dir(work: Path | None) -> Path:
    """The adapter's scratch folder: the stage's work dir, or a temp dir removed at exit (never before: the
    lazy frames handed out may still scan files in it)."""
    if work is not None:
        work.mkdir(parents=True, exist_ok=True)
        return work
    d = tempfile.mkdtemp(prefix="worldpm-src-")
    if not _tmp_dirs:
        atexit.register(lambda: [shutil.rmtree(x, ignore_errors=True) for x in _tmp_dirs])
    _tmp_dirs.append(d)
    return Path(d)


def _open_binary(path: Path):
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rb")
    return open(path, "rb")


def check_not_empty(path: Path) -> None:
    """`<file>: empty file` for a file with no bytes, or only whitespace (decompressed)."""
    try:
        with _open_binary(path) as f:
            while chunk := f.read(1 << 16):
                if chunk.strip():
                    return
    except (OSError, EOFError) as e:
        raise AdapterError(f"{path}: cannot read: {_first_line(e)}") from None
    raise AdapterError(f"{path}: empty file")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _validate(lf: pl.LazyFrame) -> int:
    """One streaming pass that parses every value of every column (so a bad line deep in the file is found
    now, not while the stage writes) and counts the records."""
    cols = lf.collect_schema().names()
    exprs = [pl.len().alias(_COUNT)] + [pl.col(c).null_count().alias(f"__n{i}") for i, c in enumerate(cols)]
    return int(lf.select(exprs).collect(engine="streaming")[_COUNT][0])


def read_raw(path: Path, tag: str, work: Path | None) -> RawTable:
    container = container_of(path)
    if container in (None, "xml"):
        raise AdapterError(f"{path}: not a tabular data file (.jsonl, .jsonl.gz, .json, .parquet, .csv)")
    check_not_empty(path)
    if container == "jsonl":
        raw = _read_jsonl(path, tag, work)
    elif container == "json":
        raw = _read_json(path, tag, work)
    elif container == "parquet":
        raw = _read_parquet(path)
    else:
        raw = _read_csv(path, tag, work)
    if raw.records == 0:
        raise AdapterError(f"{path}: empty file (no records)")
    return raw


def _read_jsonl(path: Path, tag: str, work: Path | None) -> RawTable:
    try:
        lf = pl.scan_ndjson(path, infer_schema_length=INFER_ROWS)
        n = _validate(lf)
        return RawTable(lf, n, empty_rejects(), "jsonl")
    except pl.exceptions.PolarsError:
        pass  # some line is not valid JSON / UTF-8, or the types clash: read line by line
    return _jsonl_by_line(path, tag, work)


class _NonFinite(ValueError):
    pass


def _reject_constant(name: str):
    raise _NonFinite(name)


def _jsonl_by_line(path: Path, tag: str, work: Path | None) -> RawTable:
    out = scratch_dir(work) / f"{path.name.split('.')[0]}-{xxhash.xxh3_64_hexdigest(str(path).encode())[:10]}.valid.jsonl"
    bad: list[dict] = []
    good = 0
    with _open_binary(path) as f, open(out, "wb") as w:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                bad.append({"line": lineno, "reason": "invalid_utf8", "detail": f"{path}:{lineno}: {e.reason} at byte {e.start}",
                            "raw": raw.decode("utf-8", errors="replace")})
                continue
            try:
                obj = json.loads(text, parse_constant=_reject_constant)
            except _NonFinite as e:  # NaN / Infinity are not JSON; Python tools write them for a NaN margin
                bad.append({"line": lineno, "reason": "non_finite_number",
                            "detail": f"{path}:{lineno}: {e.args[0]} is not a JSON number", "raw": text})
                continue
            except json.JSONDecodeError as e:
                bad.append({"line": lineno, "reason": "malformed_json", "detail": f"{path}:{lineno}: {e.msg} (column {e.colno})",
                            "raw": text})
                continue
            if not isinstance(obj, dict):
                bad.append({"line": lineno, "reason": "not_an_object",
                            "detail": f"{path}:{lineno}: a JSON {type(obj).__name__}, not an object", "raw": text})
                continue
            w.write(raw if raw.endswith(b"\n") else raw + b"\n")
            good += 1
    rejects = reject_rows(tag, path, bad)
    if good == 0:
        if bad:
            raise AdapterError(f"{path}: no readable record ({len(bad)} lines rejected, first: {bad[0]['detail']})")
        raise AdapterError(f"{path}: empty file")
    lf = pl.scan_ndjson(out, infer_schema_length=None)
    try:
        n = _validate(lf)
    except pl.exceptions.PolarsError as e:  # every line is JSON, yet polars cannot type a column
        raise AdapterError(f"{path}: records do not share one schema: {_first_line(e)}") from None
    _check_count(path, n, good)
    return RawTable(lf, good + len(bad), rejects, "jsonl")


def _read_json(path: Path, tag: str, work: Path | None) -> RawTable:
    with _open_binary(path) as f:
        data = f.read()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise AdapterError(f"{path}: invalid UTF-8 at byte {e.start}") from None
    stripped = text.lstrip()
    if not stripped.startswith("["):
        # `.json` files are often JSON Lines (MedicalGPT's test.json is): read them as such
        first = stripped.split("\n", 1)[0]
        try:
            json.loads(first)
            return _read_jsonl(path, tag, work)
        except json.JSONDecodeError:
            pass
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise AdapterError(f"{path}:{e.lineno}: not valid JSON: {e.msg} (column {e.colno})") from None
    if isinstance(obj, dict):  # {"data": [...]} / {"train": [...]}: one list of records inside
        lists = [v for v in obj.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise AdapterError(f"{path}: a JSON object, not a list of records (keys: {', '.join(list(obj)[:10])})")
        obj = lists[0]
    if not isinstance(obj, list):
        raise AdapterError(f"{path}: a JSON {type(obj).__name__}, not a list of records")
    if not obj:
        raise AdapterError(f"{path}: empty file (no records)")
    out = scratch_dir(work) / f"{path.name.split('.')[0]}-{xxhash.xxh3_64_hexdigest(str(path).encode())[:10]}.records.jsonl"
    bad, good = [], 0
    with open(out, "w", encoding="utf-8") as w:
        for i, rec in enumerate(obj):
            if not isinstance(rec, dict):
                bad.append({"line": None, "reason": "not_an_object",
                            "detail": f"{path}: item {i}: a JSON {type(rec).__name__}, not an object",
                            "raw": json.dumps(rec, ensure_ascii=False)})
                continue
            w.write(json.dumps(rec, ensure_ascii=False) + "\n")
            good += 1
    if good == 0:
        raise AdapterError(f"{path}: no record is a JSON object")
    lf = pl.scan_ndjson(out, infer_schema_length=None)
    try:
        n = _validate(lf)
    except pl.exceptions.PolarsError as e:
        raise AdapterError(f"{path}: records do not share one schema: {_first_line(e)}") from None
    _check_count(path, n, good)
    return RawTable(lf, good + len(bad), reject_rows(tag, path, bad), "json")


def _read_parquet(path: Path) -> RawTable:
    try:
        lf = pl.scan_parquet(path)
        n = int(lf.select(pl.len()).collect().item())  # from the footer, no data read
    except pl.exceptions.PolarsError as e:
        raise AdapterError(f"{path}: not a readable Parquet file: {_first_line(e)}") from None
    return RawTable(lf, n, empty_rejects(), "parquet")


def _read_csv(path: Path, tag: str, work: Path | None) -> RawTable:
    try:
        lf = pl.scan_csv(path, infer_schema_length=10_000)
        n = _validate(lf)
        return RawTable(lf, n, empty_rejects(), "csv")
    except pl.exceptions.PolarsError:
        pass  # a record that is not UTF-8, or has another number of fields: read record by record
    return _csv_by_record(path, tag, work)


def _csv_by_record(path: Path, tag: str, work: Path | None) -> RawTable:
    """The good records of a CSV file, rewritten as UTF-8 CSV for the polars scan; the bad ones quarantined with
    the line where they start (a quoted field may span lines)."""
    import csv

    csv.field_size_limit(1 << 30)
    out = scratch_dir(work) / f"{path.name.split('.')[0]}-{xxhash.xxh3_64_hexdigest(str(path).encode())[:10]}.valid.csv"
    bad: list[dict] = []
    good = 0
    # surrogateescape: a byte that is not UTF-8 becomes a lone surrogate, found per record below
    with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f, \
            open(out, "w", newline="", encoding="utf-8") as w:
        reader, writer = csv.reader(f), csv.writer(w)
        try:
            header = next(reader)
            "".join(header).encode("utf-8")
        except StopIteration:
            raise AdapterError(f"{path}: empty file") from None
        except UnicodeEncodeError:
            raise AdapterError(f"{path}:1: the header is not UTF-8 text; save the file as UTF-8") from None
        except csv.Error as e:
            raise AdapterError(f"{path}: not a readable CSV file: {e}") from None
        writer.writerow(header)
        line = reader.line_num + 1
        while True:
            try:
                rec = next(reader)
            except StopIteration:
                break
            except csv.Error as e:
                raise AdapterError(f"{path}:{line}: not a readable CSV record: {e}") from None
            start, line = line, reader.line_num + 1
            if not rec:
                continue
            joined = "\x1f".join(rec)
            try:
                joined.encode("utf-8")
            except UnicodeEncodeError as e:
                raw = joined.encode("utf-8", errors="surrogateescape")
                bad.append({"line": start, "reason": "invalid_utf8",
                            "detail": f"{path}:{start}: invalid UTF-8 (byte {raw[e.start:e.start + 1]!r}; Latin-1 or "
                                      "another encoding?)",
                            "raw": raw.decode("utf-8", errors="replace").replace("\x1f", ",")})
                continue
            if len(rec) != len(header):
                bad.append({"line": start, "reason": "malformed_csv",
                            "detail": f"{path}:{start}: {len(rec)} fields, the header has {len(header)}",
                            "raw": joined.replace("\x1f", ",")})
                continue
            writer.writerow(rec)
            good += 1
    if good == 0:
        if bad:
            raise AdapterError(f"{path}: no readable record ({len(bad)} rejected, first: {bad[0]['detail']})")
        raise AdapterError(f"{path}: empty file (no records)")
    lf = pl.scan_csv(out, infer_schema_length=10_000)
    try:
        n = _validate(lf)
    except pl.exceptions.PolarsError as e:
        raise AdapterError(f"{path}: not a readable CSV file: {_first_line(e)}") from None
    _check_count(path, n, good)
    return RawTable(lf, good + len(bad), reject_rows(tag, path, bad), "csv")


def _check_count(path: Path, read: int, staged: int) -> None:
    """The staged copy holds every record that was judged readable: a difference would lose records silently."""
    if read != staged:
        raise AdapterError(f"{path}: {staged} records were staged but {read} read back: records would be lost")


