"""Text normalisation as polars expressions: HTML/Markdown residue -> plain text, code blocks kept.

`normalize_columns(lf, columns, prompt=...)` adds the steps to a lazy frame (successive with_columns, so each
step reads its input once); it runs in the streaming engine, with no Python per row. In this order:

1. line endings -> "\\n"; C0 control characters (other than tab and newline) and DEL removed.
2. `<pre>[<code>]...[</code>]</pre>` -> a fenced code block (```), its content and line breaks untouched.
3. fenced code blocks (``` ... ```, an unclosed fence runs to the end) are *code*; the rest is *prose*.
4. prose only: HTML comments removed; inline `<code>x</code>` -> `x`; block tags (br, p, div, li, h1-h6,
   blockquote, table rows and cells, hr ...) -> a line break; other known HTML tags (a, b, i, em, strong, span,
   img, ...) removed, their text kept. Only known tag names are touched, so `vector<int>`, `x <= y`, `a<b>c`
   in a sentence survive.
5. everywhere (code too, as HTML code blocks are escaped): HTML entities decoded once: the HTML5 named entities
   (&amp; &lt; &gt; &quot; &apos; &nbsp; &eacute; ...) and numeric ones (&#39; &#x27; &#233; &#x4F60; ...);
   invalid ones (control characters, surrogates, beyond U+10FFFF) are left as written. NBSP -> space.
6. prose only: Markdown images `![alt](url)` -> alt; links `[text](http...)` -> `text (http...)`; `**bold**`
   -> bold (only at word edges, so `x**2` survives); trailing spaces at line ends removed; runs of three or more
   line breaks -> one blank line; inner runs of spaces/tabs after a visible character -> one space
   (indentation at the start of a line is kept: Markdown's indented code blocks).
7. leading and trailing whitespace stripped.

Nothing else is removed: punctuation, symbols (C++, x <= y, ¿Qué?), CJK text (你好，世界。), emoji and accents
survive. Code segments are found by splitting on ``` after marking each opening fence with NUL (removed from
the input in step 1, so it cannot collide), then only the prose segments are rewritten. Each multi-segment
step runs only on the rows that need it (rows with a fence, rows with an '&'); the others take a plain
regex path, so a corpus without markup pays only for the regex scans.
"""
from __future__ import annotations

import html.entities

import polars as pl

_MARK = "\x00"       # marks an opening code fence while prose and code are told apart
_ENT = "\x01"        # brackets an entity while entities are decoded
_FENCE = "```"

BLOCK_TAGS = ("p", "div", "ul", "ol", "h1", "h2", "h3", "h4", "h5", "h6", "blockquote", "table", "thead",
              "tbody", "tfoot", "tr", "td", "th", "dl", "dt", "dd", "hr", "section", "article", "header",
              "footer", "figure", "figcaption", "details", "summary", "caption")
INLINE_TAGS = ("a", "b", "i", "u", "s", "em", "strong", "span", "img", "sup", "sub", "strike", "del", "ins", "kbd",
               "font", "small", "big", "abbr", "cite", "q", "mark", "code", "pre", "center", "tt", "var", "samp",
               "nobr", "wbr", "label", "time", "bdi", "bdo", "dfn", "acronym")

_RE_CRLF = r"\r\n?"
_RE_CONTROL = r"[\x00-\x08\x0B\x0C\x0E-\x1F\x7F]"
_RE_PRE = r"(?is)<pre\b[^>]*>(?:\s*<code\b[^>]*>)?(.*?)(?:</code>\s*)?</pre\s*>"
_RE_FENCE = r"(?s)```(.*?)(?:```|(\x03)|\z)"  # \x03 ends a prompt message
_RE_COMMENT = r"(?s)<!--.*?-->"
_RE_INLINE_CODE = r"(?is)<code\b[^<>]*>(.*?)</code\s*>"
_RE_SETEXT = r"(?m)^[ \t]{0,3}(?:={3,}|-{3,})[ \t]*$\n?"
# a tag is a known name with name=value attributes only, so "a<b and c>d" in a sentence is no tag
_ATTRS = r"""(?:\s+[A-Za-z_:][\w:.-]*\s*=\s*(?:"[^"<>]*"|'[^'<>]*'|[^\s"'<>=`]+))*\s*/?>"""
_RE_LI = r"(?i)<li" + _ATTRS
_RE_BLOCK = r"(?i)<br\s*/?>|<(?:" + "|".join(BLOCK_TAGS) + r")" + _ATTRS + r"|</(?:" + "|".join(BLOCK_TAGS) + r")\s*>"
_RE_INLINE = r"(?i)<(?:" + "|".join(INLINE_TAGS) + r")" + _ATTRS + r"|</(?:li|" + "|".join(INLINE_TAGS) + r")\s*>"
_RE_ENTITY = r"&(#[0-9]{1,7}|#[xX][0-9a-fA-F]{1,6}|[A-Za-z][A-Za-z0-9]{1,31});"
_RE_IMAGE = r"!\[([^\]\n]*)\]\([^)\s]*(?:\s+\"[^\"\n]*\")?\)"
_RE_LINK = r"\[([^\[\]\n]+)\]\((https?://[^)\s]+)(?:\s+\"[^\"\n]*\")?\)"
_RE_BOLD = r"(^|[\s(\[])\*\*([^\s*](?:[^*\n]*[^\s*])?)\*\*"
_RE_TRAILING = r"[ \t]+\n"
_RE_BLANKS = r"\n{3,}"
_RE_INNER = r"(\S)(?:[ \t]{2,}|\t)"

NAMED_ENTITIES: dict[str, str] = {f"&{k}": v for k, v in html.entities.html5.items() if k.endswith(";")}
_HEX = {i: f"{i:02x}" for i in range(256)}


def _split_map(text: pl.Expr, sep: str, prose) -> pl.Expr:
    """Split on the fence, rewrite the prose segments (those not starting with the fence mark), join back."""
    el = pl.element()
    return text.str.split(sep).list.eval(
        pl.when(el.str.starts_with(_MARK)).then(el).otherwise(prose(el))
    ).list.join(sep)


def _prose_only(text: pl.Expr, has_fence: pl.Expr, prose) -> pl.Expr:
    """prose(text) outside code fences: split only the rows that have a fence, plain regexes for the rest."""
    fenced = _split_map(pl.when(has_fence).then(text).otherwise(pl.lit("")), _FENCE, prose)
    plain = prose(pl.when(has_fence).then(pl.lit("")).otherwise(text))
    return pl.when(has_fence).then(fenced).otherwise(plain)


def _strip_tags(e: pl.Expr) -> pl.Expr:
    return (
        e.str.replace_all(_RE_COMMENT, "")
        .str.replace_all(_RE_INLINE_CODE, "`$1`")
        .str.replace_all(_RE_LI, "\n- ")
        .str.replace_all(_RE_BLOCK, "\n")
        .str.replace_all(_RE_INLINE, "")
    )


def _prose_text(e: pl.Expr) -> pl.Expr:
    return (
        e.str.replace_all(_RE_SETEXT, "")
        .str.replace_all(_RE_IMAGE, "$1")
        .str.replace_all(_RE_LINK, "$1 ($2)")
        .str.replace_all(_RE_BOLD, "$1$2")
        .str.replace_all(_RE_TRAILING, "\n")
        .str.replace_all(_RE_BLANKS, "\n\n")
        .str.replace_all(_RE_INNER, "$1 ")
    )


def _utf8_hex(cp: pl.Expr) -> pl.Expr:
    """A code point (UInt32) -> its UTF-8 bytes as a hex string (for str.decode('hex'))."""
    def byte(x: pl.Expr) -> pl.Expr:
        return x.replace_strict(_HEX, default=None, return_dtype=pl.String)

    cont = lambda shift: byte(((cp // (1 << shift)) % 64) + 0x80)  # noqa: E731 (10xxxxxx continuation byte)
    one = byte(cp)
    two = pl.concat_str([byte(cp // 64 + 0xC0), cont(0)])
    three = pl.concat_str([byte(cp // 4096 + 0xE0), cont(6), cont(0)])
    four = pl.concat_str([byte(cp // 262144 + 0xF0), cont(12), cont(6), cont(0)])
    return (pl.when(cp < 0x80).then(one).when(cp < 0x800).then(two).when(cp < 0x10000).then(three)
            .otherwise(four))


def _decode_entity(el: pl.Expr) -> pl.Expr:
    """One list element: an entity (`&...;`) -> its character(s); anything else unchanged."""
    is_num = el.str.starts_with("&#")
    is_hex = el.str.starts_with("&#x") | el.str.starts_with("&#X")
    body = pl.when(is_num).then(el.str.strip_chars_end(";")).otherwise(pl.lit(None, pl.String))
    cp = (
        pl.when(is_hex).then(body.str.slice(3).str.to_integer(base=16, strict=False))
        .otherwise(body.str.slice(2).str.to_integer(base=10, strict=False))
    )
    valid = (cp.is_in([9, 10]) | ((cp >= 0x20) & (cp < 0x7F)) | (cp >= 0xA0)) & ~cp.is_between(0xD800, 0xDFFF) \
        & (cp <= 0x10FFFF)
    cp_ok = pl.when(valid).then(cp).otherwise(pl.lit(None)).cast(pl.UInt32)
    numeric = _utf8_hex(cp_ok).str.decode("hex").cast(pl.String)
    named = el.replace(NAMED_ENTITIES)
    return pl.when(is_num).then(pl.coalesce(numeric, el)).otherwise(named)


def decode_entities(text: pl.Expr) -> pl.Expr:
    """Every HTML entity decoded exactly once (`&amp;lt;` -> `&lt;`, not `<`); rows without '&' untouched."""
    has = text.str.contains("&", literal=True)
    work = pl.when(has).then(text).otherwise(pl.lit(""))
    bracketed = work.str.replace_all(_RE_ENTITY, f"{_ENT}&$1;{_ENT}")
    decoded = bracketed.str.split(_ENT).list.eval(_decode_entity(pl.element())).list.join("")
    return pl.when(has).then(decoded).otherwise(text)


_MSG = "\x03"        # separates the messages of a prompt while it is normalised as one string
_ROLE = "\x02"       # separates a message's role from its content
_FLAGS = ("__fence", "__tag", "__amp")


def _steps(c: str, *, prompt: bool) -> list[list[pl.Expr]]:
    """The normalisation of column `c` as successive with_columns steps (each reads the previous one's column
    once: a nested single expression would repeat its input in every when/then and grow exponentially)."""
    col = pl.col(c)
    f_fence, f_tag, f_amp = (pl.col(f"{f}_{c}") for f in _FLAGS)
    first = col if prompt else col.str.replace_all(_RE_CRLF, "\n").str.replace_all(_RE_CONTROL, "")
    first = first.str.replace_all(_RE_PRE, "\n```\n$1\n```\n").str.replace_all(_RE_FENCE, f"```{_MARK}$1```$2")
    return [
        [first.alias(c)],
        [col.str.contains(_MARK, literal=True).alias(f"__fence_{c}"),
         col.str.contains("<", literal=True).alias(f"__tag_{c}"),
         col.str.contains("&", literal=True).alias(f"__amp_{c}")],
        [pl.when(f_tag).then(_prose_only(pl.when(f_tag).then(col).otherwise(pl.lit("")), f_fence, _strip_tags))
         .otherwise(col).alias(c)],
        [pl.when(f_amp).then(decode_entities(pl.when(f_amp).then(col).otherwise(pl.lit(""))))
         .otherwise(col).str.replace_all("\u00a0", " ", literal=True).alias(c)],
        [_prose_only(col, f_fence, _prose_text).str.replace_all(_MARK, "", literal=True).str.strip_chars().alias(c)],
    ]


def normalize_columns(lf: pl.LazyFrame, columns: list[str], prompt: str | None = None) -> pl.LazyFrame:
    """HTML/Markdown residue -> plain text in the String `columns` and in the contents of the message-list
    column `prompt` (roles untouched); code blocks, punctuation and CJK kept (see the module doc)."""
    cols = list(columns)
    if prompt is not None:
        el = pl.element()
        enc = pl.col(prompt).list.eval(pl.concat_str([
            el.struct.field("role").fill_null(""), pl.lit(_ROLE),
            el.struct.field("content").fill_null("").str.replace_all(_RE_CRLF, "\n").str.replace_all(_RE_CONTROL, ""),
        ])).list.join(_MSG)
        lf = lf.with_columns(enc.alias("__prompt"))
    todo = [(c, False) for c in cols] + ([("__prompt", True)] if prompt is not None else [])
    per_col = [_steps(c, prompt=p) for c, p in todo]
    for k in range(len(per_col[0])):
        lf = lf.with_columns([e for steps in per_col for e in steps[k]])
    drop = [f"{f}_{c}" for c, _ in todo for f in _FLAGS]
    if prompt is not None:
        el = pl.element()
        dec = pl.col("__prompt").str.split(_MSG).list.eval(pl.struct(
            role=el.str.extract(r"^([^\x02]*)\x02", 1),
            content=el.str.replace(r"^[^\x02]*\x02", "").str.strip_chars(),
        ))
        orig = pl.col(prompt)
        lf = lf.with_columns(pl.when(orig.list.len() > 0).then(dec).otherwise(orig).alias(prompt))
        drop.append("__prompt")
    return lf.drop(drop)


def normalize_series(s: pl.Series) -> pl.Series:
    """normalize_columns on one String Series (tests, the benchmark's spot checks)."""
    return normalize_columns(pl.LazyFrame({"t": s}, schema={"t": pl.String}), ["t"]).collect()["t"].rename(s.name)


def light_text(text: pl.Expr) -> pl.Expr:
    """normalize_markup off: line endings and control characters only, then strip."""
    return text.str.replace_all(_RE_CRLF, "\n").str.replace_all(_RE_CONTROL, "").str.strip_chars()


def canonical_text(text: pl.Expr) -> pl.Expr:
    """For the identical rule only (never written): lower-cased; whitespace, punctuation and symbols removed."""
    return text.str.to_lowercase().str.replace_all(r"[\s\p{P}\p{S}]+", "")


# words for the Jaccard similarity: a run of letters/digits, except CJK, where a character is a word
_RE_WORD = r"[\p{Han}\p{Hiragana}\p{Katakana}]|[\w--\p{Han}\p{Hiragana}\p{Katakana}]+"


def word_set(text: pl.Expr) -> pl.Expr:
    return text.str.to_lowercase().str.extract_all(_RE_WORD).list.unique()


def jaccard(a: pl.Expr, b: pl.Expr) -> pl.Expr:
    """Word-set Jaccard |A ∩ B| / |A ∪ B| of two texts (1.0 when both have no words)."""
    wa, wb = word_set(a), word_set(b)
    inter = wa.list.set_intersection(wb).list.len()
    union = wa.list.set_union(wb).list.len()
    return pl.when(union == 0).then(pl.lit(1.0)).otherwise(inter / union)


