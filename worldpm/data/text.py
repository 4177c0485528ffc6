"""Text normalisation as polars expressions: HTML/Markdown residue -> plain text, code blocks kept.

Public (the one text path: the normalise stage writes what these return, and evaluation texts go through them too):
    normalize_pairs(lf, markup=True)   the canonical pair table: prompt message contents, chosen, rejected
    normalize_frame(frame, markup)     the same, collected: for texts scored outside the training data
    normalize_columns(lf, columns, prompt=None)   the given String columns and the message-list column `prompt`
    normalize_series(s)                 one String Series
    light_text(expr)                    what `clean.normalize_markup: false` does instead: line endings, control
                                        characters, strip

The rules, in this order:

1. line endings -> "\\n"; C0 control characters (other than tab and newline) and DEL removed.
2. `<pre>[<code>]...[</code>]</pre>` -> a fenced code block (```), its content and line breaks untouched.
3. fenced code blocks (``` ... ```, an unclosed fence runs to the end) are *code*; the rest is *prose*.
4. prose only: HTML comments removed; inline `<code>x</code>` -> `x`; block tags (br, p, div, li, h1-h6,
   blockquote, table rows and cells, hr ...) -> a line break; `<img ... alt="text" ...>` -> its alt text; other
   known HTML tags (a, b, i, em, strong, span, img without alt, ...) removed, their text kept. Only known tag names
   are touched, so `vector<int>`, `x <= y`, `a<b>c` in a sentence survive.
5. everywhere (code too, as HTML code blocks are escaped): HTML entities decoded once: the HTML5 named entities
   (&amp; &lt; &gt; &quot; &apos; &nbsp; &eacute; ...) and numeric ones (&#39; &#x27; &#233; &#x4F60; ...);
   invalid ones (control characters, surrogates, beyond U+10FFFF) are left as written. NBSP -> space.
6. prose only: Markdown images `![alt](url)` -> alt; links `[text](http...)` -> `text (http...)`; `**bold**`
   -> bold (only at word edges, so `x**2` survives); trailing spaces at line ends removed; runs of three or more
   line breaks -> one blank line; inner runs of spaces/tabs after a visible character -> one space
   (indentation at the start of a line is kept: Markdown's indented code blocks).
7. leading and trailing whitespace stripped.

Nothing else is removed: punctuation, symbols (C++, x <= y, ¿Qué?), CJK text (你好，世界。), emoji and accents
survive. Rule changes are listed in docs/normalisation.md (an <img>'s alt text was dropped before 2026-11).

How it runs: six successive `with_columns` steps a column (each reads the previous one's column once), in the
streaming engine, no Python per row. Code segments are found by splitting on ``` after marking each opening fence
with NUL (removed from the input in step 1, so it cannot collide); only the rows with a fence are split, and only
their prose segments are rewritten. Every other rule, or group of rules, runs only on the rows that can match it:
a literal test per row (memchr-fast: `"](http"` for links, `"**"` for bold, `"  "` or a tab for inner runs, a
byte class of at most eight bytes for control characters ...) that every match contains, on the text *as the
rules before it left it*, so skipping a row changes nothing. `gated=False` runs every rule on every row: the
plain definition, which a test compares the gated path against on real data, byte for byte. docs/normalisation.md
says more (and why few distinct regexes: polars' per-thread regex cache).
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
_ATTR = r"""[A-Za-z_:][\w:.-]*\s*=\s*(?:"[^"<>]*"|'[^'<>]*'|[^\s"'<>=`]+)"""
_ATTRS = r"(?:\s+" + _ATTR + r")*\s*/?>"
_RE_LI = r"(?i)<li" + _ATTRS
_RE_BLOCK = r"(?i)<br\s*/?>|<(?:" + "|".join(BLOCK_TAGS) + r")" + _ATTRS + r"|</(?:" + "|".join(BLOCK_TAGS) + r")\s*>"
# an <img> with an alt attribute (its first one, as HTML reads it) -> the alt text; the value is taken as written
# (quoted or not) and its entities are decoded with the rest of the text in step 5
_RE_IMG_ALT = (r"<img(?:\s+" + _ATTR + r""")*?\s+alt\s*=\s*(?:"([^"<>]*)"|'([^'<>]*)'|([^\s"'<>=`]+))"""
               + _ATTRS)
_RE_INLINE = (r"(?i)" + _RE_IMG_ALT + r"|<(?:" + "|".join(INLINE_TAGS) + r")" + _ATTRS
              + r"|</(?:li|" + "|".join(INLINE_TAGS) + r")\s*>")
_RE_ENTITY = r"&(#[0-9]{1,7}|#[xX][0-9a-fA-F]{1,6}|[A-Za-z][A-Za-z0-9]{1,31});"
_RE_IMAGE = r"!\[([^\]\n]*)\]\([^)\s]*(?:\s+\"[^\"\n]*\")?\)"
_RE_LINK = r"\[([^\[\]\n]+)\]\((https?://[^)\s]+)(?:\s+\"[^\"\n]*\")?\)"
_RE_BOLD = r"(^|[\s(\[])\*\*([^\s*](?:[^*\n]*[^\s*])?)\*\*"
_RE_TRAILING = r"[ \t]+\n"
_RE_BLANKS = r"\n{3,}"
_RE_INNER = r"(\S)(?:[ \t]{2,}|\t)"

NAMED_ENTITIES: dict[str, str] = {f"&{k}": v for k, v in html.entities.html5.items() if k.endswith(";")}
_HEX_DIGITS = "0123456789abcdef"


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
        .str.replace_all(_RE_INLINE, "$1$2$3")  # the alt text of an <img>, nothing for any other tag
    )


def _prose_text(e: pl.Expr) -> pl.Expr:
    """Step 6, every rule in order (setext, images, links, bold, trailing spaces, blank lines, inner spaces)."""
    return _PROSE_SPACES[1](_PROSE_MARKDOWN[1](e))


def _utf8_hex(cp: pl.Expr) -> pl.Expr:
    """A code point (UInt32) -> its UTF-8 bytes as a hex string (for str.decode('hex'))."""
    def byte(x: pl.Expr) -> pl.Expr:  # two hex digits, sliced out of a literal (a dict lookup costs ms a call)
        return pl.concat_str([pl.lit(_HEX_DIGITS).str.slice(x // 16, 1), pl.lit(_HEX_DIGITS).str.slice(x % 16, 1)])

    cont = lambda shift: byte(((cp // (1 << shift)) % 64) + 0x80)  # noqa: E731 (10xxxxxx continuation byte)
    one = byte(cp)
    two = pl.concat_str([byte(cp // 64 + 0xC0), cont(0)])
    three = pl.concat_str([byte(cp // 4096 + 0xE0), cont(6), cont(0)])
    four = pl.concat_str([byte(cp // 262144 + 0xF0), cont(12), cont(6), cont(0)])
    return (pl.when(cp < 0x80).then(one).when(cp < 0x800).then(two).when(cp < 0x10000).then(three)
            .otherwise(four))


def _code_point(el: pl.Expr) -> pl.Expr:
    """One list element: the code point of a valid numeric entity (`&#...;`), null for anything else."""
    is_num = el.str.starts_with("&#")
    is_hex = el.str.starts_with("&#x") | el.str.starts_with("&#X")
    body = pl.when(is_num).then(el.str.strip_chars_end(";")).otherwise(pl.lit(None, pl.String))
    cp = (
        pl.when(is_hex).then(body.str.slice(3).str.to_integer(base=16, strict=False))
        .otherwise(body.str.slice(2).str.to_integer(base=10, strict=False))
    )
    valid = (cp.is_in([9, 10]) | ((cp >= 0x20) & (cp < 0x7F)) | (cp >= 0xA0)) & ~cp.is_between(0xD800, 0xDFFF) \
        & (cp <= 0x10FFFF)
    return pl.when(valid).then(cp).otherwise(pl.lit(None)).cast(pl.UInt32)


def _decode_piece(piece: pl.Expr, cp: pl.Expr) -> pl.Expr:
    """A piece and its code point (null unless a valid numeric entity) -> the character, the named entity's
    character(s), or the piece unchanged."""
    numeric = _utf8_hex(cp).str.decode("hex").cast(pl.String)
    named = piece.replace(NAMED_ENTITIES)
    return pl.when(piece.str.starts_with("&#")).then(pl.coalesce(numeric, piece)).otherwise(named)


def _decode_split(text: pl.Expr) -> pl.Expr:
    """Every entity bracketed, the text split at the brackets, each piece decoded, joined. Two passes over the
    pieces (code point, then character): the code point is a field there, not an expression repeated in each of
    the UTF-8 encoder's branches (a tree that polars would plan anew at every call)."""
    bracketed = text.str.replace_all(_RE_ENTITY, f"{_ENT}&$1;{_ENT}")
    el = pl.element()
    with_cp = bracketed.str.split(_ENT).list.eval(pl.struct(piece=el, cp=_code_point(el)))
    return with_cp.list.eval(_decode_piece(el.struct.field("piece"), el.struct.field("cp"))).list.join("")


def decode_entities(text: pl.Expr) -> pl.Expr:
    """Every HTML entity decoded exactly once (`&amp;lt;` -> `&lt;`, not `<`); rows without '&' untouched."""
    has = text.str.contains("&", literal=True)
    return pl.when(has).then(_decode_split(pl.when(has).then(text).otherwise(pl.lit("")))).otherwise(text)


def _decode_entities_gated(col: pl.Expr, has_amp: pl.Expr) -> pl.Expr:
    """decode_entities, faster: a row whose entities are all named (no `&#`) gets one Aho-Corasick pass over the
    HTML5 names (every name ends with ';' and is alphanumeric, so a match is exactly a named token of _RE_ENTITY,
    and a single left-to-right pass decodes once); only the rows with a numeric entity take the split path."""
    numeric = has_amp & col.str.contains("&#", literal=True)
    named = has_amp & ~numeric
    return (pl.when(numeric).then(_decode_split(_mask(col, numeric)))
            .when(named).then(_mask(col, named).str.replace_many(NAMED_ENTITIES, leftmost=True))
            .otherwise(col))


_MSG = "\x03"        # separates the messages of a prompt while it is normalised as one string
_ROLE = "\x02"       # separates a message's role from its content
_FLAGS = ("__fence", "__tag", "__amp")

# step 1's bytes (CR, C0 controls but tab and newline, DEL), in classes of eight: the regex engine finds a class of
# up to eight bytes with a SIMD prefilter (~10 GB/s), a larger class with its DFA (~0.3 GB/s, the cost of a whole
# pass). Few classes, too: polars keeps compiled regexes in a per-thread cache of 32, and a streaming plan with more
# distinct patterns than that recompiles them for every morsel
_STEP1_BYTES = [*range(0x00, 0x09), 0x0B, 0x0C, 0x0D, *range(0x0E, 0x20), 0x7F]
_STEP1_GATES = ["[" + "".join(f"\\x{b:02x}" for b in _STEP1_BYTES[i:i + 8]) + "]"
                for i in range(0, len(_STEP1_BYTES), 8)]


def _has_step1_bytes(e: pl.Expr) -> pl.Expr:
    """Whether step 1 (line endings, control characters) can change the text."""
    out = e.str.contains(_STEP1_GATES[0])
    for g in _STEP1_GATES[1:]:
        out = out | e.str.contains(g)
    return out


def _line_endings_controls(e: pl.Expr) -> pl.Expr:
    # _RE_CRLF (\r\n?) as two literal passes: the same result, one regex fewer (see _STEP1_GATES on the cache)
    return e.str.replace_all("\r\n", "\n", literal=True).str.replace_all("\r", "\n", literal=True) \
        .str.replace_all(_RE_CONTROL, "")


def _only_where(e: pl.Expr, gate: pl.Expr, rule) -> pl.Expr:
    """rule(e) on the rows where `gate` holds, e elsewhere. polars evaluates both branches of a when/then on
    every row, so the rule reads "" on the other rows (a null mask would not do: string kernels still walk the
    values under a null; list kernels do skip them: the fence splits take a null mask). `gate` must be a necessary
    condition for the rule to change the text (so the result
    equals rule(e) on every row)."""
    return pl.when(gate).then(rule(_mask(e, gate))).otherwise(e)


def _mask(e: pl.Expr, gate: pl.Expr) -> pl.Expr:
    return pl.when(gate).then(e).otherwise(pl.lit(""))


def _rule(pattern: str, replacement: str):
    return lambda e: e.str.replace_all(pattern, replacement)


def _any_literal(*needles: str):
    """A gate: whether the text contains any of these literals (one memchr-fast scan each)."""
    def gate(e: pl.Expr) -> pl.Expr:
        out = e.str.contains(needles[0], literal=True)
        for n in needles[1:]:
            out = out | e.str.contains(n, literal=True)
        return out
    return gate


def _chain(*rules):
    def apply(e: pl.Expr) -> pl.Expr:
        for r in rules:
            e = r(e)
        return e
    return apply


# step 6 in two groups, each run as one chain on the rows that contain one of its literals (every match of every
# rule of the group contains one of them, so where none occurs the whole chain leaves the text as it is): the
# common Markdown (setext underlines, images, links, bold), then the whitespace rules. The rules whose regex has no
# literal to start from (setext, trailing and inner spaces: a DFA over every byte) also get a branch of their own.
_SETEXT_LITERALS = _any_literal("---", "===")
_PROSE_MARKDOWN = (_any_literal("---", "===", "![", "](http", "**"),
                   _chain(_rule(_RE_SETEXT, ""), _rule(_RE_IMAGE, "$1"), _rule(_RE_LINK, "$1 ($2)"),
                          _rule(_RE_BOLD, "$1$2")))
_MARKDOWN_NO_SETEXT = _chain(_rule(_RE_IMAGE, "$1"), _rule(_RE_LINK, "$1 ($2)"), _rule(_RE_BOLD, "$1$2"))
_SPACE_LITERALS = _any_literal(" \n", "\t\n", "  ", "\t")
_PROSE_SPACES = (_any_literal(" \n", "\t\n", "\n\n\n", "  ", "\t"),
                 _chain(_rule(_RE_TRAILING, "\n"), _rule(_RE_BLANKS, "\n\n"), _rule(_RE_INNER, "$1 ")))
_BLANKS_ONLY = _rule(_RE_BLANKS, "\n\n")


def _nbsp(e: pl.Expr) -> pl.Expr:
    return e.str.replace_all("\u00a0", " ", literal=True)


def _steps(c: str, *, prompt: bool, gated: bool = True) -> list[list[pl.Expr]]:
    """The normalisation of column `c` as successive with_columns steps (each reads the previous one's column
    once: a nested single expression would repeat its input in every when/then and grow exponentially).

    gated=False: every rule on every row (the definition); gated=True: the same result, each group of rules only
    on the rows its gate selects (see the module doc), in few steps (a step costs a pass over the column, and the
    streaming engine pays per step per morsel: NDJSON scans hand it morsels of a few hundred rows)."""
    col = pl.col(c)
    f_fence, f_tag, f_amp = (pl.col(f"{f}_{c}") for f in _FLAGS)
    flags = [col.str.contains(_MARK, literal=True).alias(f"__fence_{c}"),
             col.str.contains("<", literal=True).alias(f"__tag_{c}"),
             col.str.contains("&", literal=True).alias(f"__amp_{c}")]
    # steps 1 and 2 (a prompt's messages had step 1 when they were joined: normalize_columns)
    first = [_rule(_RE_PRE, "\n```\n$1\n```\n"), _rule(_RE_FENCE, f"```{_MARK}$1```$2")]
    if not prompt:
        first.insert(0, _line_endings_controls)
    if not gated:
        return [
            [_chain(*first)(col).alias(c)],
            flags,
            [pl.when(f_tag).then(_prose_only(pl.when(f_tag).then(col).otherwise(pl.lit("")), f_fence, _strip_tags))
             .otherwise(col).alias(c)],
            [_nbsp(pl.when(f_amp).then(decode_entities(pl.when(f_amp).then(col).otherwise(pl.lit(""))))
                   .otherwise(col)).alias(c)],
            [_prose_only(col, f_fence, _prose_text).str.replace_all(_MARK, "", literal=True)
             .str.strip_chars().alias(c)],
        ]
    # steps 1-2: a row with none of CR, a control character, "<" (a <pre>) or ``` is left as it is; a row without
    # CR or control characters (nearly all) skips step 1's DFA scans
    pre_fence = col.str.contains("<", literal=True) | col.str.contains(_FENCE, literal=True)
    if prompt:
        first_step = _only_where(col, pre_fence, _chain(*first))
    else:
        ctl = _has_step1_bytes(col)
        first_step = (pl.when(ctl).then(_chain(*first)(_mask(col, ctl)))
                      .when(pre_fence).then(_chain(*first[1:])(_mask(col, pre_fence))).otherwise(col))
    tag_fenced, tag_plain = f_tag & f_fence, f_tag & ~f_fence
    ent = f_amp | col.str.contains("\u00a0", literal=True)
    md_gate, md_rules = _PROSE_MARKDOWN
    sp_gate, sp_rules = _PROSE_SPACES
    setext = ~f_fence & _SETEXT_LITERALS(col)
    markdown, spaces = ~f_fence & md_gate(col), ~f_fence & _SPACE_LITERALS(col)
    blanks = ~f_fence & col.str.contains("\n\n\n", literal=True)
    return [
        [first_step.alias(c)],
        flags,
        # step 4 (tags): the rows with a fence split into code and prose, the other tagged rows in one go
        [pl.when(tag_fenced).then(_split_map(pl.when(tag_fenced).then(col), _FENCE, _strip_tags))
         .when(tag_plain).then(_strip_tags(_mask(col, tag_plain)))
         .otherwise(col).alias(c)],
        # step 5 (entities, NBSP): the rows with a '&' or an NBSP
        [pl.when(ent).then(_nbsp(_decode_entities_gated(_mask(col, ent), f_amp))).otherwise(col).alias(c)],
        # step 6: the rows with a code fence split, every rule on their prose segments (then the fence marks go);
        # the others in the two groups
        [pl.when(f_fence).then(_split_map(pl.when(f_fence).then(col), _FENCE, _prose_text)
                               .str.replace_all(_MARK, "", literal=True))
         .when(setext).then(md_rules(_mask(col, setext)))
         .when(markdown).then(_MARKDOWN_NO_SETEXT(_mask(col, markdown)))
         .otherwise(col).alias(c)],
        [pl.when(spaces).then(sp_rules(_mask(col, spaces)))
         .when(blanks).then(_BLANKS_ONLY(_mask(col, blanks)))
         .otherwise(col).str.strip_chars().alias(c)],
    ]


def normalize_columns(lf: pl.LazyFrame, columns: list[str], prompt: str | None = None, *,
                      gated: bool = True) -> pl.LazyFrame:
    """HTML/Markdown residue -> plain text in the String `columns` and in the contents of the message-list
    column `prompt` (roles untouched); code blocks, punctuation and CJK kept (see the module doc).

    `gated=False` applies every rule to every row: the same output, slower (the reference for tests)."""
    cols = list(columns)
    if prompt is not None:
        el = pl.element()
        content = el.struct.field("content").fill_null("")
        content = (_only_where(content, _has_step1_bytes(content), _line_endings_controls) if gated
                   else _line_endings_controls(content))
        enc = pl.col(prompt).list.eval(pl.concat_str([el.struct.field("role").fill_null(""), pl.lit(_ROLE),
                                                      content])).list.join(_MSG)
        lf = lf.with_columns(enc.alias("__prompt"))
    todo = [(c, False) for c in cols] + ([("__prompt", True)] if prompt is not None else [])
    if not todo:
        return lf
    per_col = [_steps(c, prompt=p, gated=gated) for c, p in todo]
    for k in range(max(len(s) for s in per_col)):
        lf = lf.with_columns([e for steps in per_col if k < len(steps) for e in steps[k]])
    drop = [f"{f}_{c}" for c, _ in todo for f in _FLAGS]
    if prompt is not None:
        el = pl.element()
        role_content = el.str.splitn(_ROLE, 2)  # a literal split: no regex (see _STEP1_GATES on the cache)
        dec = pl.col("__prompt").str.split(_MSG).list.eval(pl.struct(
            role=role_content.struct.field("field_0"),
            content=role_content.struct.field("field_1").str.strip_chars(),
        ))
        orig = pl.col(prompt)
        lf = lf.with_columns(pl.when(orig.list.len() > 0).then(dec).otherwise(orig).alias(prompt))
        drop.append("__prompt")
    return lf.drop(drop)


def normalize_series(s: pl.Series) -> pl.Series:
    """normalize_columns on one String Series (evaluation texts, tests, the benchmark's spot checks)."""
    return normalize_columns(pl.LazyFrame({"t": s}, schema={"t": pl.String}), ["t"]).collect()["t"].rename(s.name)


def light_text(text: pl.Expr) -> pl.Expr:
    """normalize_markup off: line endings and control characters only, then strip."""
    return _line_endings_controls(text).str.strip_chars()


def normalize_pairs(lf: pl.LazyFrame, markup: bool = True) -> pl.LazyFrame:
    """The canonical pair table with its texts normalised: the prompt's message contents (roles kept), chosen and
    rejected; `markup=False` (clean.normalize_markup: false) only fixes line endings and control characters and
    strips. What the normalise stage writes; other columns untouched."""
    if markup:
        return normalize_columns(lf, ["chosen", "rejected"], prompt="prompt")
    content = pl.element().struct.field("content")
    return lf.with_columns(
        prompt=pl.col("prompt").list.eval(pl.struct(role=pl.element().struct.field("role"),
                                                    content=light_text(content))),
        chosen=light_text(pl.col("chosen")),
        rejected=light_text(pl.col("rejected")),
    )


def normalize_frame(frame: pl.DataFrame | pl.LazyFrame, markup: bool) -> pl.DataFrame:
    """normalize_pairs on pairs from outside the training data (eval sets, `worldpm evaluate`, `worldpm score`),
    collected: the one implementation, so eval text is normalised exactly as the normalise stage's."""
    lf = frame.lazy() if isinstance(frame, pl.DataFrame) else frame
    return normalize_pairs(lf, markup=markup).collect()


def canonical_text(text: pl.Expr) -> pl.Expr:
    """For the identical rule only (never written): lower-cased; whitespace, punctuation and symbols removed."""
    return text.str.to_lowercase().str.replace_all(r"[\s\p{P}\p{S}]+", "")


# words for the Jaccard similarity: a run of letters/digits, except CJK, where a character is a word
_RE_WORD = r"[\p{Han}\p{Hiragana}\p{Katakana}]|[\w--\p{Han}\p{Hiragana}\p{Katakana}]+"


def word_set(text: pl.Expr) -> pl.Expr:
    return text.str.to_lowercase().str.extract_all(_RE_WORD).list.unique()


def jaccard(a: pl.Expr, b: pl.Expr) -> pl.Expr:
    """Word-set Jaccard |A ∩ B| / |A ∪ B| of two texts (1.0 when both have no words). As one expression the word
    sets are built more than once: on a frame, `with_jaccard` builds each once."""
    wa, wb = word_set(a), word_set(b)
    return _jaccard_of_sets(wa, wb)


def _jaccard_of_sets(wa: pl.Expr, wb: pl.Expr) -> pl.Expr:
    inter = wa.list.set_intersection(wb).list.len()
    union = wa.list.len() + wb.list.len() - inter
    return pl.when(union == 0).then(pl.lit(1.0)).otherwise(inter / union)


def with_jaccard(lf: pl.LazyFrame, a: pl.Expr, b: pl.Expr, name: str) -> pl.LazyFrame:
    """lf with column `name` = jaccard(a, b), each word set built once (two steps)."""
    lf = lf.with_columns(word_set(a).alias("__wa"), word_set(b).alias("__wb"))
    return lf.with_columns(_jaccard_of_sets(pl.col("__wa"), pl.col("__wb")).alias(name)).drop("__wa", "__wb")
