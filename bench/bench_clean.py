"""Clean throughput benchmark: the normalise and clean stages vs their floors (scan + zstd write) and a per-row loop.

    .venv/bin/python bench/bench_clean.py                  # 1 GB of JSONL (and the same pairs as Parquet)
    .venv/bin/python bench/bench_clean.py --size-mb 100    # a quick run

The input is made by repeating the shared StackExchange pairs (../shared/data/stack-exchange-paired) with
perturbations, so that dedupe does not collapse it (nor Parquet's dictionaries): copy i appends "(copy i)" to
the question, the chosen and the rejected answer; every 10th copy turns the chosen answer into HTML residue
(<p>, &amp;, <br>); every 10th copy repeats the previous one exactly (real duplicates, 10%); margins cycle
through null, 0, 1, 2, 3. It is cached under --cache (default tmp/bench) as canonical JSONL and canonical Parquet
(zstd).

Each variant runs in its own subprocess, which reports its own peak RSS (VmHWM) and wall time, side by side:
  floor             a bare polars scan of the input + a zstd Parquet write (no rules): normalise's floor
  normalise         tasks.normalise.normalise_frame on a scan of the input (the stage's code path: parts of 50,000
                    pairs normalised and measured in memory, written as pairs/*.parquet, then measures.parquet)
  floor_normalised  a bare scan of what normalise wrote (its pairs/) + a zstd write: the re-filter's floor
  refilter          tasks.clean.filter_pairs on what normalise wrote, with a changed threshold (min_margin: 1):
                    what a threshold tweak costs
  loop              the same rules as a per-row Python loop, as the original scripts do: json.loads per line
                    (pyarrow to_pylist per batch for Parquet), re.sub, html.unescape, a set of seen keys; JSONL out
normalise + refilter is a clean from scratch (the old single clean stage did both).
MB/s is data MB (the JSONL size of the rows, for both formats) per second; pairs/s counts input pairs.
Never a timed test: run it by hand.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SE = ROOT.parent / "shared" / "data" / "stack-exchange-paired" / "data"


# ---- input ---------------------------------------------------------------------------------------------------

def _canonical_base():
    import polars as pl

    se = pl.scan_parquet(sorted(SE.glob("**/*.parquet")))
    return se.select(
        qid=pl.col("qid").cast(pl.String),
        j=pl.int_range(pl.len()).cast(pl.String),
        domain=pl.col("metadata").list.first().str.extract(r"https?://([^/]+)"),
        question=pl.col("question"), chosen=pl.col("response_j"), rejected=pl.col("response_k"),
        date=pl.col("date"),
    ).collect()


def build_inputs(size_mb: int, cache: Path) -> tuple[Path, Path]:
    """Canonical JSONL of about size_mb MB and the same rows as zstd Parquet (cached)."""
    import polars as pl

    from worldpm.data.schema import CANONICAL_SCHEMA, COLUMNS

    cache.mkdir(parents=True, exist_ok=True)
    jl, pq = cache / f"pairs-{size_mb}mb.jsonl", cache / f"pairs-{size_mb}mb.parquet"
    if jl.exists() and pq.exists():
        return jl, pq
    base = _canonical_base()
    probe = cache / "probe.jsonl"
    _expand(base, 4).select(COLUMNS).collect().write_ndjson(probe)
    copies = max(1, round(size_mb * 1e6 / (probe.stat().st_size / 4)))
    probe.unlink()
    print(f"building {copies} copies of {base.height} pairs -> {jl} and {pq}", flush=True)
    lf = _expand(base, copies).select([pl.col(c).cast(t) for c, t in CANONICAL_SCHEMA.items()])
    lf.sink_ndjson(jl.with_suffix(".tmp"), engine="streaming")
    os.replace(jl.with_suffix(".tmp"), jl)
    pl.scan_ndjson(jl, schema=CANONICAL_SCHEMA).sink_parquet(pq.with_suffix(".tmp"), compression="zstd",
                                                             data_page_size=1 << 20, row_group_size=50_000,
                                                             engine="streaming")
    os.replace(pq.with_suffix(".tmp"), pq)
    return jl, pq


def _expand(base, copies: int):
    import polars as pl

    from worldpm.data.schema import MESSAGE

    i = pl.col("i")
    # every 50th copy repeats the previous copy's text exactly: duplicates the clean stage must catch
    tag = pl.when((i % 10 == 9)).then(i - 1).otherwise(i)
    stamp = "\n\n(copy " + tag.cast(pl.String) + ")"
    html = pl.lit("<p>") + pl.col("chosen").str.replace_all("&", "&amp;", literal=True) \
        .str.replace_all("\n\n", "</p>\n<p>", literal=True).str.replace_all("\n", "<br>\n", literal=True) + "</p>"
    return (
        # copy-major order: the copies of one pair lie a whole copy (~3 MB) apart, further than a Parquet page, so
        # the Parquet file compresses like real text instead of like repeats
        pl.LazyFrame({"i": pl.int_range(copies, eager=True)})
        .join(base.lazy(), how="cross", maintain_order="left_right")
        .with_columns(
            pair_id=pl.col("qid") + "-" + pl.col("j") + "-" + i.cast(pl.String),
            source=pl.lit("se-bench"),
            group_id=pl.lit("se:") + pl.col("qid") + ":" + tag.cast(pl.String),
            prompt=pl.concat_list(pl.struct(role=pl.lit("user"),
                                            content=pl.col("question") + stamp).cast(MESSAGE)),
            chosen=pl.when(tag % 10 == 3).then(html).otherwise(pl.col("chosen")) + stamp,
            rejected=pl.col("rejected") + stamp,
            chosen_score=pl.lit(None, pl.Float64), rejected_score=pl.lit(None, pl.Float64),
            margin=pl.when(tag % 5 == 0).then(pl.lit(None, pl.Float64)).otherwise((tag % 5 - 1).cast(pl.Float64)),
        )
    )


# ---- variants (each in its own process) ------------------------------------------------------------------------

def _scan(path: Path):
    import polars as pl

    from worldpm.data.schema import CANONICAL_SCHEMA

    return pl.scan_parquet(path) if path.suffix == ".parquet" else pl.scan_ndjson(path, schema=CANONICAL_SCHEMA)


def variant_floor(path: Path, out: Path, scfg: dict) -> int:
    """A bare scan of the input and a zstd Parquet write: the floor of the normalise stage."""
    import polars as pl

    _scan(path).sink_parquet(out / "pairs.parquet", compression="zstd", engine="streaming")
    return pl.scan_parquet(out / "pairs.parquet").select(pl.len()).collect().item()


def variant_normalise(path: Path, out: Path, scfg: dict) -> int:
    """The normalise stage's code path on a scan of the input (Parquet: in parts with progress, as the stage)."""
    import polars as pl

    from tasks import normalise

    logging.basicConfig(level=logging.WARNING)
    src = _scan(path)
    rows = src.select(pl.len()).collect().item() if path.suffix == ".parquet" else None
    rep = normalise.normalise_frame(src, normalise.NormaliseConfig(normalize_markup=scfg["normalize_markup"]), out,
                                    logging.getLogger("bench"), rows=rows)
    return rep["rows_in"]


def variant_floor_normalised(path: Path, out: Path, scfg: dict) -> int:
    """A bare scan of the normalised pairs (a normalise artifact's pairs/) and a zstd write: the refilter's floor."""
    import polars as pl

    pl.scan_parquet(sorted((path / "pairs").glob("*.parquet"))).sink_parquet(
        out / "pairs.parquet", compression="zstd", engine="streaming")
    return pl.scan_parquet(out / "pairs.parquet").select(pl.len()).collect().item()


def variant_refilter(path: Path, out: Path, scfg: dict) -> int:
    """The clean stage's code path (the filters) on a normalise artifact, with a changed threshold: a tweak."""
    from tasks import clean
    from worldpm.config import CleanRules

    logging.basicConfig(level=logging.WARNING)
    filters = CleanRules.model_validate({k: v for k, v in scfg.items() if k != "normalize_markup"})
    rep = clean.filter_pairs(path, filters, out, logging.getLogger("bench"),
                             normalize_markup=scfg["normalize_markup"])
    return rep["rows_in"]


def variant_loop(path: Path, out: Path, scfg: dict) -> int:
    """The same rules, one row at a time in Python, as the original preprocessing scripts do."""
    import html as htmlmod
    import math

    fence = re.compile(r"(?s)```(.*?)(?:```|\Z)")
    pre = re.compile(r"(?is)<pre\b[^>]*>(?:\s*<code\b[^>]*>)?(.*?)(?:</code>\s*)?</pre\s*>")
    control = re.compile(r"[\x00-\x08\x0B\x0C\x0E-\x1F\x7F]")
    comment = re.compile(r"(?s)<!--.*?-->")
    inline_code = re.compile(r"(?is)<code\b[^<>]*>(.*?)</code\s*>")
    li = re.compile(r"(?i)<li\b[^<>]*>")
    block = re.compile(r"(?i)<br\s*/?>|</?(?:p|div|ul|ol|h[1-6]|blockquote|table|tr|td|th|hr)\b[^<>]*>")
    inline = re.compile(r"(?i)</?(?:a|b|i|u|s|em|strong|span|img|sup|sub|strike|del|kbd|code|pre|li)\b[^<>]*>")
    img_alt = re.compile(r"""(?i)<img\b[^<>]*?\salt\s*=\s*(?:"([^"<>]*)"|'([^'<>]*)'|([^\s"'<>=`]+))[^<>]*>""")
    setext = re.compile(r"(?m)^[ \t]{0,3}(?:={3,}|-{3,})[ \t]*$\n?")
    image = re.compile(r"!\[([^\]\n]*)\]\([^)\s]*\)")
    link = re.compile(r"\[([^\[\]\n]+)\]\((https?://[^)\s]+)\)")
    bold = re.compile(r"(^|[\s(\[])\*\*([^\s*](?:[^*\n]*[^\s*])?)\*\*")
    trailing, blanks, inner = re.compile(r"[ \t]+\n"), re.compile(r"\n{3,}"), re.compile(r"(\S)(?:[ \t]{2,}|\t)")
    canon = re.compile(r"[\W_]+")
    word = re.compile(r"\w+")

    def prose(s: str) -> str:
        s = comment.sub("", s)
        s = inline_code.sub(r"`\1`", s)
        s = li.sub("\n- ", s)
        s = block.sub("\n", s)
        s = img_alt.sub(lambda m: m.group(1) or m.group(2) or m.group(3) or "", s)
        s = inline.sub("", s)
        s = htmlmod.unescape(s).replace("\u00a0", " ")
        s = setext.sub("", s)
        s = image.sub(r"\1", s)
        s = link.sub(r"\1 (\2)", s)
        s = bold.sub(r"\1\2", s)
        return inner.sub(r"\1 ", blanks.sub("\n\n", trailing.sub("\n", s)))

    def norm(s):
        if s is None:
            return None
        s = control.sub("", s.replace("\r\n", "\n").replace("\r", "\n"))
        s = pre.sub(lambda m: "\n```\n" + m.group(1) + "\n```\n", s)
        parts, last = [], 0
        for m in fence.finditer(s):
            parts.append(prose(s[last:m.start()]))
            parts.append("```" + htmlmod.unescape(m.group(1)) + "```")
            last = m.end()
        parts.append(prose(s[last:]))
        return "".join(parts).strip()

    cpt = float(scfg["chars_per_token"])
    t = scfg["near_identical"]
    seen: set = set()

    def judge(r: dict) -> tuple[str | None, str | None]:
        texts = {"prompt": "\n".join(m["content"] or "" for m in r["prompt"] or []),
                 "chosen": r["chosen"] or "", "rejected": r["rejected"] or ""}
        for f, s in texts.items():
            if not s:
                return f"empty_{f}", f"{f} is empty"
        for f, s in texts.items():
            lim, n = scfg[f], len(s)
            toks = math.ceil(n / cpt)
            if n < lim["min_chars"]:
                return f"{f}.min_chars", f"{n} < {lim['min_chars']}"
            if lim["max_chars"] is not None and n > lim["max_chars"]:
                return f"{f}.max_chars", f"{n} > {lim['max_chars']}"
            if toks < lim["min_tokens"]:
                return f"{f}.min_tokens", f"{toks} < {lim['min_tokens']}"
            if lim["max_tokens"] is not None and toks > lim["max_tokens"]:
                return f"{f}.max_tokens", f"{toks} > {lim['max_tokens']}"
        m = r["margin"]
        if m is None or not math.isfinite(m):
            r["margin"] = None
            if scfg["missing_margin"] == "drop":
                return "missing_margin", "no margin"
        elif scfg["min_margin"] is not None and m < scfg["min_margin"]:
            return "min_margin", f"{m} < {scfg['min_margin']}"
        a, b = canon.sub("", r["chosen"].lower()), canon.sub("", r["rejected"].lower())
        if a == b:
            return "identical", "same text"
        if t is not None and min(len(a), len(b)) >= t * max(len(a), len(b)):
            wa, wb = set(word.findall(r["chosen"].lower())), set(word.findall(r["rejected"].lower()))
            if len(wa & wb) / max(len(wa | wb), 1) >= t:
                return "near_identical", "jaccard"
        key = hash((texts["prompt"], r["chosen"], r["rejected"]))
        if scfg["dedupe"] and key in seen:
            return "duplicate", "seen"
        seen.add(key)
        return None, None

    def rows():
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            for batch in pq.ParquetFile(path).iter_batches(batch_size=2000):
                yield from batch.to_pylist()
        else:
            with open(path, encoding="utf-8") as f:
                for line in f:
                    yield json.loads(line)

    n = 0
    with open(out / "pairs.jsonl", "w", encoding="utf-8") as kept, \
            open(out / "rejects.jsonl", "w", encoding="utf-8") as rej:
        for r in rows():
            n += 1
            for m in r["prompt"] or []:
                m["content"] = norm(m["content"])
            r["chosen"], r["rejected"] = norm(r["chosen"]), norm(r["rejected"])
            reason, detail = judge(r)
            if reason is None:
                kept.write(json.dumps(r, ensure_ascii=False) + "\n")
            else:
                r["reason"], r["detail"] = reason, detail
                rej.write(json.dumps(r, ensure_ascii=False) + "\n")
    return n


VARIANTS = {"floor": variant_floor, "normalise": variant_normalise, "floor_normalised": variant_floor_normalised,
            "refilter": variant_refilter, "loop": variant_loop}


# what each variant imports before its clock starts: the seconds are the work, not loading the modules (a run
# has them loaded already; the loop needs none)
IMPORTS = {"floor": ["polars"], "normalise": ["polars", "tasks.normalise"], "floor_normalised": ["polars"],
           "refilter": ["polars", "tasks.clean"], "loop": []}


def _child(name: str, path: Path, out: Path, scfg: dict) -> None:
    import importlib

    sys.path.insert(0, str(ROOT))  # this checkout's code, whatever the venv has installed
    out.mkdir(parents=True, exist_ok=True)
    for m in IMPORTS[name]:
        importlib.import_module(m)
    t0 = time.perf_counter()
    rows = VARIANTS[name](path, out, scfg)
    dt = time.perf_counter() - t0
    # VmHWM: this process's own peak RSS (ru_maxrss would carry the parent's peak across fork + exec)
    status = Path("/proc/self/status").read_text()
    rss = next(int(ln.split()[1]) * 1024 for ln in status.splitlines() if ln.startswith("VmHWM:"))
    print(json.dumps({"variant": name, "rows": rows, "seconds": dt, "peak_rss": rss}))


def run_variant(name: str, path: Path, out: Path, scfg: dict, data_mb: float, keep: bool = False) -> dict:
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    p = subprocess.run([sys.executable, __file__, "--_child", name, str(path), str(out), json.dumps(scfg)],
                       capture_output=True, text=True, cwd=ROOT)
    if p.returncode:
        raise SystemExit(f"variant {name} on {path.name} failed:\n{p.stderr[-3000:]}")
    res = json.loads(p.stdout.strip().splitlines()[-1])
    res["input"] = path.name
    # MB/s is counted on the data volume (the JSONL size of the same rows) for every variant and format: the
    # repeated StackExchange text compresses far better in Parquet than real text would
    res["mb"] = data_mb
    if not keep:
        shutil.rmtree(out, ignore_errors=True)
    return res


def _load() -> str:
    """The load average when a variant starts: the machine is shared, so say how busy it was."""
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-mb", type=int, default=1000, help="JSONL input size (default 1000 MB)")
    ap.add_argument("--cache", type=Path, default=ROOT / "tmp" / "bench", help="where inputs are cached")
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help=f"comma-separated, in this order: {','.join(VARIANTS)} (floor_normalised and refilter read "
                         "what normalise wrote)")
    ap.add_argument("--formats", default="jsonl,parquet")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--_child", nargs=4, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._child:
        name, path, out, scfg = a._child
        _child(name, Path(path), Path(out), json.loads(scfg))
        return
    sys.path.insert(0, str(ROOT))
    from worldpm.config import CleanConfig

    scfg = CleanConfig().model_dump(mode="json")
    tweak = dict(scfg, min_margin=1.0)  # the re-filter: a threshold changed after normalisation
    jl, pq = build_inputs(a.size_mb, a.cache)
    data_mb = jl.stat().st_size / 1e6
    variants = a.variants.split(",")
    results = []
    for fmt in a.formats.split(","):
        path = jl if fmt == "jsonl" else pq
        norm = a.cache / f"out-normalised-{fmt}"
        for v in variants:
            reads_norm = v in ("floor_normalised", "refilter")
            if reads_norm and not (norm / "measures.parquet").is_file():
                raise SystemExit(f"variant {v} reads the normalise variant's output: list normalise before it")
            load = _load()
            r = run_variant(v, norm if reads_norm else path, norm if v == "normalise" else a.cache / f"out-{v}",
                            tweak if v == "refilter" else scfg, data_mb, keep=v == "normalise")
            r.update(format=fmt, file_mb=path.stat().st_size / 1e6, load_before=load)
            results.append(r)
            print(f"{fmt:8s} {v:17s} {r['seconds']:8.1f} s {r['mb'] / r['seconds']:8.1f} MB/s "
                  f"{r['rows'] / r['seconds']:9.0f} pairs/s  peak RSS {r['peak_rss'] / 2**20:7.0f} MiB  "
                  f"(load {load})", flush=True)
    by = {(r["format"], r["variant"]): r for r in results}
    print()
    print("| input | variant | seconds | MB/s (data) | pairs/s | peak RSS (MiB) |")
    print("|---|---|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['format']} ({r['file_mb']:.0f} MB file, {r['rows']} pairs) | {r['variant']} | "
              f"{r['seconds']:.1f} | "
              f"{r['mb'] / r['seconds']:.1f} | {r['rows'] / r['seconds']:.0f} | {r['peak_rss'] / 2**20:.0f} |")
    print()
    for fmt in a.formats.split(","):
        sec = {v: by[(fmt, v)]["seconds"] for v in VARIANTS if (fmt, v) in by}
        parts = []
        if "normalise" in sec and "floor" in sec:
            parts.append(f"normalise/floor = {sec['normalise'] / sec['floor']:.2f}x")
        if "refilter" in sec and "floor_normalised" in sec:
            parts.append(f"refilter/floor_normalised = {sec['refilter'] / sec['floor_normalised']:.2f}x")
        if {"normalise", "refilter", "floor"} <= sec.keys():
            scratch = sec["normalise"] + sec["refilter"]
            parts.append(f"(normalise+refilter)/floor = {scratch / sec['floor']:.2f}x")
            if "loop" in sec:
                parts.append(f"loop/(normalise+refilter) = {sec['loop'] / scratch:.2f}x")
        print(f"{fmt}: " + ", ".join(parts))
    if a.json:
        a.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
