"""Streaming readers for the importer's input files: CSV, JSON Lines and Parquet.

Every reader yields RowChunks in file order, holding at most `chunk_rows` records at a time.
Whole-file problems raise InputFileError before the first chunk; a bad row becomes a
RejectedRow and never stops the read, so the importer can dead-letter it and count it
against the error budget.

Speed: a chunk is first validated column-wise with C-level builtins (map, join, max,
isprintable); only a chunk where that finds a doubt is re-checked row by row, and the
row-by-row path is the one that says what is wrong.
"""

from __future__ import annotations

import codecs
import csv
import gc
import hashlib
import io
import json
import json.scanner
import os
import re
import stat
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial
from itertools import chain, islice, repeat
from operator import itemgetter
from typing import TYPE_CHECKING, Any, cast

from connectors import compression
from connectors.rows import MODES, OPS, InputFileError, RejectedRow, RowChunk

if TYPE_CHECKING:  # pyarrow is imported only when a Parquet file is read
    import pyarrow as pa
    import pyarrow.parquet as pq

MAX_ID_CHARS = 256
RAW_CHARS = 500
# Bounds one CSV field and one JSON line: far above any real row, yet low enough that an
# unterminated quote cannot pull the rest of the file into memory.
MAX_RECORD_BYTES = 16 * 1024 * 1024

_BLOCK = 1024 * 1024
_SNIFF_BYTES = 64 * 1024
FORMATS = ("csv", "tsv", "jsonl", "parquet")
_FORMATS = FORMATS
_ALIASES = {
    "csv": "csv",
    "tsv": "tsv",
    "tab": "tsv",
    "jsonl": "jsonl",
    "ndjson": "jsonl",
    "json": "jsonl",
    "parquet": "parquet",
    "pq": "parquet",
}
_SUFFIXES = {f".{name}": kind for name, kind in _ALIASES.items()}
_OP_SET = frozenset(OPS)
_RESERVED = ("user_id", "segment_id", "op")
_ID_KEYS = ("user_id", "segment_id")
# UTF-32 before UTF-16: the UTF-32-LE mark starts with the UTF-16-LE one.
_FOREIGN_BOMS = (
    (codecs.BOM_UTF32_LE, "UTF-32"),
    (codecs.BOM_UTF32_BE, "UTF-32"),
    (codecs.BOM_UTF16_LE, "UTF-16"),
    (codecs.BOM_UTF16_BE, "UTF-16"),
)
_NEEDS_HEADER = "expected a first line naming the columns, with user_id among them"
_DELIMITER_NAMES = {"tab": "\t", "\\t": "\t", "comma": ",", "semicolon": ";", "pipe": "|"}


# ---------------------------------------------------------------------------- public API


def detect_format(path: str, fmt: str | None = None) -> str:
    """Return "csv", "tsv", "jsonl" or "parquet": from `fmt` when given, else from the
    extension under any compression suffix (`a.csv.gz` is CSV)."""
    if fmt is not None:
        found = _ALIASES.get(fmt.strip().lower())
        if found is None:
            raise InputFileError(
                f"{path}: unknown format {fmt!r}; expected one of: {', '.join(_FORMATS)}"
            )
        return found
    suffix = os.path.splitext(compression.inner_name(path))[1].lower()
    found = _SUFFIXES.get(suffix)
    if found is None:
        what = f"extension {suffix!r}" if suffix else "no extension"
        raise InputFileError(
            f"{path}: unknown format ({what}); expected .csv, .tsv, .jsonl/.ndjson/.json or "
            f".parquet/.pq (optionally compressed: .gz, .bz2, .zst), or an explicit format: "
            f"{', '.join(_FORMATS)}"
        )
    return found


def parse_delimiter(text: str) -> str:
    """One character, or a name: tab (or \\t), comma, semicolon, pipe."""
    value = _DELIMITER_NAMES.get(text.strip().lower(), text)
    if len(value) != 1 or value in "\r\n\"" or value.isalnum():
        raise ValueError(
            f"--delimiter {text!r}: expected one character other than a quote, a letter, a "
            "digit or a line break, e.g. ';' or '|', or a name: tab, comma, semicolon, pipe"
        )
    return value


def resolve_format(
    path: str, fmt: str | None = None, delimiter: str | None = None
) -> tuple[str, str]:
    """(kind, delimiter): kind is "csv", "jsonl" or "parquet"; the delimiter is "" unless
    the kind is CSV (TSV is CSV with tabs). Raises InputFileError or ValueError."""
    kind = detect_format(path, fmt)
    if kind == "tsv":
        return "csv", parse_delimiter(delimiter) if delimiter else "\t"
    if kind == "csv":
        return "csv", parse_delimiter(delimiter) if delimiter else ","
    if delimiter:
        raise ValueError(f"--delimiter applies to CSV and TSV files; {path} is {kind}")
    return kind, ""


def file_checksum(path: str) -> str:
    """sha256 hex digest of the file, streamed in 1 MiB blocks."""
    _check_file(path, allow_empty=True)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def read_chunks(
    path: str,
    *,
    segment: str | None,
    mode: str,
    fmt: str | None = None,
    delimiter: str | None = None,
    chunk_rows: int = 50_000,
    name: str | None = None,
) -> Iterator[RowChunk]:
    """Stream `path` as RowChunks in file order; `name` is what messages and dead letters
    call the file (default: `path`; "<stdin>" for a spooled standard input).

    Whole-file problems raise InputFileError here, at call time, before any chunk exists;
    a damaged compressed stream or Parquet page, and a CSV quote that never closes, raise
    it mid-stream. A header-only file yields no chunks; chunks with neither rows nor
    rejects are never yielded. Row numbers (`seqs`, `RejectedRow.row`) count data records
    from 1, skipping blank lines and the header; `RejectedRow.line` is the physical line.
    """
    if name is not None and name != path:
        return _renamed(path, name, lambda: read_chunks(
            path, segment=segment, mode=mode, fmt=fmt, delimiter=delimiter,
            chunk_rows=chunk_rows))
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of: {', '.join(MODES)}")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be at least 1, got {chunk_rows}")
    kind, sep = resolve_format(path, fmt, delimiter)
    rules = _Rules(path, _default_segment(segment), "remove" if mode == "remove" else "add",
                   sep or ",")
    _check_file(path)
    packed = compression.sniff(path)
    rules = replace(rules, compression=packed)
    if kind == "parquet":
        if packed:
            raise InputFileError(
                f"{path}: is {compression.NAMES[packed]}-compressed Parquet; expected a plain "
                "Parquet file (Parquet compresses its own pages)")
        return _read_parquet(path, rules, chunk_rows)
    try:
        _sniff_utf8(path, rules)
        chunks = _read_csv(path, rules, chunk_rows) if kind == "csv" else _jsonl_chunks(
            path, rules, chunk_rows)
    except compression.STREAM_ERRORS as exc:
        raise _damaged(path, packed, 0, exc) from None
    return _guarded(path, packed, chunks)


def _damaged(path: str, packed: str | None, row: int, exc: BaseException) -> InputFileError:
    what = f"{compression.NAMES[packed]} data" if packed else "file"
    return InputFileError(
        f"{path}: damaged {what} after row {row} ({exc}); expected a complete file, "
        "nothing was imported")


def _guarded(path: str, packed: str | None, chunks: Iterator[RowChunk]) -> Iterator[RowChunk]:
    """The chunks, with a damaged or truncated compressed stream as an InputFileError."""
    row = 0
    try:
        for chunk in chunks:
            row = max([row, *chunk.seqs[-1:], *(r.row for r in chunk.rejects[-1:])])
            yield chunk
    except compression.STREAM_ERRORS as exc:
        raise _damaged(path, packed, row, exc) from None


def _renamed(path: str, name: str, read: Callable[[], Iterator[RowChunk]]) -> Iterator[RowChunk]:
    """read(), with `path` called `name` in its errors and dead letters."""
    try:
        chunks = read()
    except InputFileError as exc:
        raise InputFileError(str(exc).replace(path, name)) from None

    def renamed() -> Iterator[RowChunk]:
        try:
            for chunk in chunks:
                chunk.rejects = [RejectedRow(name, r.row, r.reason, r.raw, r.line)
                                 for r in chunk.rejects]
                yield chunk
        except InputFileError as exc:
            raise InputFileError(str(exc).replace(path, name)) from None

    return renamed()


# ------------------------------------------------------------------- whole-file checks


@dataclass(frozen=True, slots=True)
class _Rules:
    file: str
    segment: str | None  # the --segment default, validated; None when not given
    default_op: str  # op of rows that do not name one
    delimiter: str = ","  # CSV and TSV
    compression: str | None = None  # "gzip", "bz2", "zstd" (from the magic bytes)


@dataclass(frozen=True, slots=True)
class _Layout:
    """Where the known columns sit in a CSV record or Parquet batch."""

    names: tuple[str, ...]
    user_id: int
    segment_id: int | None
    op: int | None
    attr_idx: tuple[int, ...]
    attr_names: tuple[str, ...]


def _default_segment(segment: str | None) -> str | None:
    value = segment.strip() if segment else ""
    if not value:
        return None
    problem = _id_problem("segment", value)
    if problem:
        raise ValueError(problem)
    return value


def _check_file(path: str, *, allow_empty: bool = False) -> None:
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise InputFileError(f"{path}: no such file; expected a readable file") from None
    except OSError as exc:
        raise InputFileError(f"{path}: cannot be read ({exc.strerror})") from None
    if stat.S_ISDIR(info.st_mode):
        raise InputFileError(f"{path}: is a directory; expected a file")
    if info.st_size == 0 and not allow_empty:
        raise InputFileError(f"{path}: is empty (0 bytes); expected rows of user ids")


def _not_utf8(path: str, detail: str) -> InputFileError:
    return InputFileError(
        f"{path}: is not UTF-8 text ({detail}); expected UTF-8, re-export the file as UTF-8"
    )


def _sniff_utf8(path: str, rules: _Rules) -> None:
    """Refuse UTF-16/32 and binary files by their first line, before parsing anything."""
    with compression.open_binary(path, rules.compression) as f:
        head = f.read(_SNIFF_BYTES)
    for bom, name in _FOREIGN_BOMS:
        if head.startswith(bom):
            raise _not_utf8(path, f"starts with a {name} byte-order mark")
    first, newline, _ = head.partition(b"\n")
    if b"\x00" in first:
        raise _not_utf8(path, "NUL bytes in the first line")
    try:
        # Incremental: the sample may end inside a multi-byte character.
        codecs.getincrementaldecoder("utf-8")().decode(first, final=bool(newline))
    except UnicodeDecodeError as exc:
        raise _not_utf8(path, f"undecodable byte at offset {exc.start}") from None


def _delimiter_hint(names: Sequence[str]) -> str:
    """A one-column header holding another separator: the file likely uses it."""
    if len(names) != 1:
        return ""
    for sep, spelled in (("\t", "tab"), (";", "';'"), ("|", "'|'")):
        if sep in names[0]:
            return (f"; the header looks separated by {spelled}: give --delimiter {spelled}"
                    + (" or name the file .tsv" if sep == "\t" else ""))
    return ""


def _column_name(raw: str) -> str:
    name = raw.strip()
    return name.lower() if name.lower() in _RESERVED else name


def _layout(path: str, raw_names: Sequence[str], rules: _Rules) -> _Layout:
    names = tuple(map(_column_name, raw_names))
    if not _encodable(names) or "\x00" in "".join(names):
        raise _not_utf8(path, "undecodable bytes or NUL in the header")
    if "user_id" not in names:
        shown = ", ".join(names)
        shown = shown if len(shown) <= 200 else shown[:200] + "..."
        raise InputFileError(f"{path}: no user_id column in the header ({shown}); {_NEEDS_HEADER}"
                             + _delimiter_hint(names))
    twice = sorted(name for name, count in Counter(names).items() if count > 1)
    if twice:
        raise InputFileError(
            f"{path}: the header names column(s) {', '.join(map(repr, twice))} more than once; "
            "expected each column once"
        )
    if "" in names:
        raise InputFileError(
            f"{path}: header column {names.index('') + 1} has no name; "
            "expected every column to be named"
        )
    segment_at = names.index("segment_id") if "segment_id" in names else None
    if segment_at is None and rules.segment is None:
        raise InputFileError(
            f"{path}: no segment: the file has no segment_id column and no segment was "
            "given; expected a segment_id column or --segment"
        )
    attr_idx = tuple(i for i, name in enumerate(names) if name not in _RESERVED)
    return _Layout(
        names=names,
        user_id=names.index("user_id"),
        segment_id=segment_at,
        op=names.index("op") if "op" in names else None,
        attr_idx=attr_idx,
        attr_names=tuple(names[i] for i in attr_idx),
    )


# ------------------------------------------------------------------------ row checks


def _id_problem(column: str, value: str) -> str | None:
    """Why a stripped, non-blank id is unusable, or None."""
    if len(value) > MAX_ID_CHARS:
        return f"{column} is {len(value)} characters long; at most {MAX_ID_CHARS} allowed"
    if value.isprintable():  # the fast answer for nearly every id
        return None
    for ch in value:
        if ch.isprintable():
            continue
        category = unicodedata.category(ch)
        if category == "Cs":  # surrogateescape'd byte or a lone JSON surrogate
            return f"{column} contains undecodable bytes (not valid UTF-8)"
        if category in ("Cc", "Zl", "Zp"):
            return f"{column} contains control character U+{ord(ch):04X}"
    return None  # only e.g. non-ASCII spaces or format characters: legitimate text


def _clean_row(
    rules: _Rules, uid: str | None, seg: str | None, op: str | None
) -> tuple[str, str, str] | str:
    """The validated (user_id, segment_id, op), or the reason to reject the row."""
    uid = uid.strip() if uid else ""
    if not uid:
        return "user_id is missing or blank"
    problem = _id_problem("user_id", uid)
    if problem:
        return problem
    seg = seg.strip() if seg else ""
    if seg:
        problem = _id_problem("segment_id", seg)
        if problem:
            return problem
    elif rules.segment:
        seg = rules.segment
    else:
        return "segment_id is blank and no default segment (--segment) was given"
    op = op.strip().lower() if op else ""
    if not op:
        op = rules.default_op
    elif op not in _OP_SET:
        return f"op {_preview(op)} is not one of: {', '.join(OPS)}"
    return uid, seg, op


def _attr_problem(attrs: dict[str, str]) -> str | None:
    """Attributes are free text, but must be encodable as UTF-8 downstream."""
    for name, value in attrs.items():
        if not _encodable((name, value)):
            return f"attribute {_preview(name)} contains undecodable bytes (not valid UTF-8)"
    return None


def _encodable(texts: Sequence[str]) -> bool:
    try:
        "".join(texts).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _ids_clean(ids: list[str]) -> bool:
    """Column-wide check at C speed; False only means "look row by row"."""
    return all(ids) and max(map(len, ids)) <= MAX_ID_CHARS and "".join(ids).isprintable()


def _preview(value: str, limit: int = 40) -> str:
    return repr(value[:limit]) + ("..." if len(value) > limit else "")


def _clip(raw: str) -> str:
    """Bound the raw text and make it encodable (escaped bytes) for the dead-letter topic."""
    raw = raw[:RAW_CHARS]
    if _encodable((raw,)):
        return raw
    try:
        data = raw.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate that never was a byte
        data = raw.encode("utf-8", "backslashreplace")
    return data.decode("utf-8", "backslashreplace")


class _Builder:
    """Accumulates one chunk on the row-by-row path."""

    __slots__ = ("chunk", "file")

    def __init__(self, file: str, with_attrs: bool) -> None:
        self.file = file
        self.chunk = RowChunk(attributes=[] if with_attrs else None)

    def add(self, row: int, clean: tuple[str, str, str], attrs: dict[str, str] | None) -> None:
        chunk = self.chunk
        chunk.seqs.append(row)
        chunk.user_ids.append(clean[0])
        chunk.segment_ids.append(clean[1])
        chunk.ops.append(clean[2])
        if chunk.attributes is not None:
            chunk.attributes.append(attrs or {})

    def reject(self, row: int, reason: str, raw: str, line: int = 0) -> None:
        self.chunk.rejects.append(RejectedRow(self.file, row, reason, _clip(raw), line))


def _bulk_chunk(
    rules: _Rules,
    first_row: int,
    uids: Sequence[str],
    segs: Sequence[str] | None,
    ops: Sequence[str] | None,
    attr_names: tuple[str, ...],
    attr_cols: list[Sequence[str]],
) -> RowChunk | None:
    """Validate whole columns at once; None when any row needs the row-by-row path."""
    user_ids = list(map(str.strip, uids))
    if not _ids_clean(user_ids):
        return None
    count = len(user_ids)
    if segs is None:
        if rules.segment is None:
            return None
        segment_ids = [rules.segment] * count
    else:
        segment_ids = _by_distinct(segs, partial(_clean_segment, rules.segment))
        if segment_ids is None:
            return None
    if ops is None:
        op_col = [rules.default_op] * count
    else:
        op_col = _by_distinct(ops, partial(_clean_op, rules.default_op))
        if op_col is None:
            return None
    attributes = None
    if attr_names:
        values = [list(map(str.strip, col)) for col in attr_cols]
        if not all(map(_encodable, values)):
            return None
        # dict(zip(names, row)) per row, driven by map so the loop stays in C.
        attributes = list(map(dict, map(zip, repeat(attr_names), zip(*values, strict=True))))
    return RowChunk(
        seqs=list(range(first_row, first_row + count)),
        user_ids=user_ids,
        segment_ids=segment_ids,
        ops=op_col,
        attributes=attributes,
    )


def _by_distinct(values: Sequence[str], clean: Callable[[str], str | None]) -> list[str] | None:
    """Clean a low-cardinality column (segments, ops) once per distinct value.

    A chunk names few segments and two ops, so this is a set, a handful of calls and one
    C-level lookup per row. None when any value fails: the row path will say why.
    """
    table: dict[str, str] = {}
    for value in set(values):
        cleaned = clean(value)
        if cleaned is None:
            return None
        table[value] = cleaned
    return list(map(table.__getitem__, values))


def _clean_segment(default: str | None, value: str) -> str | None:
    value = value.strip() or (default or "")
    return value if value and _id_problem("segment_id", value) is None else None


def _clean_op(default: str, value: str) -> str | None:
    value = value.strip().lower() or default
    return value if value in _OP_SET else None


def _yieldable(chunk: RowChunk) -> bool:
    return bool(chunk.seqs or chunk.rejects)


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic GC while one batch is parsed (never across a yield).

    A batch allocates ~100k short-lived, acyclic containers (records, column tuples); the
    collector would traverse them again and again as they age, which costs about as much
    as parsing. Nothing in a batch forms a cycle, so pausing frees nothing late. The pause
    is process-wide but lasts one batch (tens of milliseconds).
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


# ----------------------------------------------------------------------------------- CSV


class _Malformed(list[str]):
    """Stands in for a record the csv module refused; its length never matches a header.

    `end_line` is the physical line the parser was on when it gave up: with the line the
    record started on, it tells a one-line mistake from a quote that ran across lines.
    """

    __slots__ = ("end_line", "reason")

    def __init__(self, reason: str, end_line: int) -> None:
        super().__init__()
        self.reason = reason
        self.end_line = end_line


_EOF_IN_QUOTES = "unexpected end of data"


def _open_csv(path: str, rules: _Rules) -> io.TextIOWrapper:
    # utf-8-sig drops a BOM; surrogateescape turns bad bytes into non-printable surrogates
    # that the row checks reject; newline="" lets csv handle CRLF and quoted newlines.
    return io.TextIOWrapper(compression.open_binary(path, rules.compression),
                            encoding="utf-8-sig", errors="surrogateescape", newline="")


def _take(reader: Any, count: int) -> list[list[str]]:
    """Up to `count` records; a record csv refuses becomes a _Malformed and reading goes on
    at the next physical line (the strict parser drops the rest of the line it failed on)."""
    batch: list[list[str]] = []
    while len(batch) < count:
        try:
            batch.extend(islice(reader, count - len(batch)))  # keeps what it read on error
            break
        except csv.Error as exc:
            batch.append(_Malformed(str(exc), reader.line_num))
    return batch


def _lines_of(record: list[str]) -> int:
    """Physical lines a well-formed record spans: one, plus the line breaks inside quoted
    fields (the file is read with newline="", so CRLF, LF and a lone CR each end a line)."""
    if len(record) < 2 and not (record and ("\n" in record[0] or "\r" in record[0])):
        return 1
    text = "".join(record)
    return 1 + text.count("\n") + text.count("\r") - text.count("\r\n")


def _quote_error(path: str, record: _Malformed, start: int, rules: _Rules) -> InputFileError:
    """The whole-file error for a quoted field that never closes, or that runs across lines
    into a quoting mistake: rows after it would otherwise vanish into one field."""
    if record.reason == _EOF_IN_QUOTES:
        opened = _open_quote_line(path, start, rules)
        return InputFileError(
            f"{path}: line {opened}: a quoted field opened here is never closed (the file "
            "ends inside it); expected a closing quote (a quote inside a field is written "
            '""); nothing was imported')
    return InputFileError(
        f"{path}: line {start}: a quoted field in the record starting here runs across "
        f"lines to line {record.end_line}, where the parser stopped ({record.reason}); "
        'expected every quoted field to be closed (a quote inside a field is written ""); '
        "nothing was imported")


def _open_quote_line(path: str, start: int, rules: _Rules) -> int:
    """The line of the opening quote of a record's last, unclosed field; `start` is the
    record's first line. Only called on the error path: re-reads the record's lines."""
    with _open_csv(path, rules) as f:
        for _ in islice(f, start - 1):
            pass
        text = "".join(f)
    specials = re.compile(f'["\r\n{re.escape(rules.delimiter)}]')
    line, opened, in_quotes, field_begin, pos = start, start, False, 0, 0
    while match := specials.search(text, pos):
        at, ch = match.start(), match.group()
        pos = at + 1
        if ch == "\r" or (ch == "\n" and text[at - 1 : at] != "\r"):
            line += 1
        if in_quotes:
            if ch == '"':
                if text.startswith('"', pos):
                    pos += 1  # "" stands for one quote inside the field
                else:
                    in_quotes = False
        elif ch == '"':
            if at == field_begin:
                in_quotes, opened = True, line
        else:  # a delimiter or a line break outside quotes: a new field begins
            field_begin = pos
    return opened


def _is_blank(record: list[str]) -> bool:
    return not record or (len(record) == 1 and not record[0].strip())


def _csv_reader(f: io.TextIOWrapper, rules: _Rules) -> Any:
    # strict: a quote closed before the end of a field, or a file that ends inside quotes,
    # is an error instead of text silently glued to the field.
    return csv.reader(f, delimiter=rules.delimiter, strict=True)


def _csv_header(path: str, reader: Any) -> list[str]:
    while True:
        batch = _take(reader, 1)
        if not batch:
            raise InputFileError(f"{path}: no header row; {_NEEDS_HEADER}")
        record = batch[0]
        if isinstance(record, _Malformed):
            raise InputFileError(
                f"{path}: unreadable header row (line {reader.line_num}: {record.reason}); "
                f"{_NEEDS_HEADER}"
            )
        if not _is_blank(record):
            return record


def _csv_layout(path: str, rules: _Rules) -> _Layout:
    with _open_csv(path, rules) as f:
        return _layout(path, _csv_header(path, _csv_reader(f, rules)), rules)


def _read_csv(path: str, rules: _Rules, chunk_rows: int) -> Iterator[RowChunk]:
    if csv.field_size_limit() < MAX_RECORD_BYTES:  # process-wide; only ever raised
        csv.field_size_limit(MAX_RECORD_BYTES)
    return _csv_chunks(path, rules, _csv_layout(path, rules), chunk_rows)


def _csv_chunks(path: str, rules: _Rules, layout: _Layout, chunk_rows: int) -> Iterator[RowChunk]:
    with _open_csv(path, rules) as f:
        reader = _csv_reader(f, rules)
        if _layout(path, _csv_header(path, reader), rules) != layout:
            raise InputFileError(f"{path}: the header changed while the file was being read")
        row = 0
        while True:
            line = reader.line_num  # physical lines read before this batch
            with _gc_paused():
                batch = _take(reader, chunk_rows)
                if not batch:
                    return
                chunk = _csv_fast(batch, layout, rules, row + 1)
                if chunk is None:
                    chunk, row = _csv_slow(batch, layout, rules, row, line)
                else:
                    row += len(batch)
                del batch
            if _yieldable(chunk):
                yield chunk


def _csv_fast(
    batch: list[list[str]], layout: _Layout, rules: _Rules, first_row: int
) -> RowChunk | None:
    # Every record of the right width means no blank lines and no malformed records.
    if set(map(len, batch)) != {len(layout.names)}:
        return None
    cols = [list(map(itemgetter(i), batch)) for i in range(len(layout.names))]
    return _bulk_chunk(
        rules,
        first_row,
        cols[layout.user_id],
        None if layout.segment_id is None else cols[layout.segment_id],
        None if layout.op is None else cols[layout.op],
        layout.attr_names,
        [cols[i] for i in layout.attr_idx],
    )


def _csv_slow(
    batch: list[list[str]], layout: _Layout, rules: _Rules, row: int, line: int
) -> tuple[RowChunk, int]:
    """The row-by-row path; `line` counts the physical lines before the batch, so every
    reject names the line its record starts on."""
    out = _Builder(rules.file, bool(layout.attr_names))
    width = len(layout.names)
    seg_at, op_at = layout.segment_id, layout.op
    for record in batch:
        start = line + 1
        if isinstance(record, _Malformed):
            if record.reason == _EOF_IN_QUOTES or record.end_line > start:
                raise _quote_error(rules.file, record, start, rules)
            line = record.end_line
            row += 1
            out.reject(row, f"malformed CSV record: {record.reason}", "", start)
            continue
        line += _lines_of(record)
        if _is_blank(record):
            continue
        row += 1
        if len(record) != width:
            out.reject(row, f"expected {width} fields, got {len(record)}",
                       _csv_raw(record, rules.delimiter), start)
            continue
        clean = _clean_row(
            rules,
            record[layout.user_id],
            None if seg_at is None else record[seg_at],
            None if op_at is None else record[op_at],
        )
        if isinstance(clean, str):
            out.reject(row, clean, _csv_raw(record, rules.delimiter), start)
            continue
        attrs = None
        if layout.attr_names:
            attrs = {
                n: record[i].strip()
                for n, i in zip(layout.attr_names, layout.attr_idx, strict=True)
            }
            problem = _attr_problem(attrs)
            if problem:
                out.reject(row, problem, _csv_raw(record, rules.delimiter), start)
                continue
        out.add(row, clean, attrs)
    return out.chunk, row


def _csv_raw(record: list[str], delimiter: str = ",") -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, delimiter=delimiter, lineterminator="")
    writer.writerow([field[:RAW_CHARS] for field in record])
    return buf.getvalue()


# ---------------------------------------------------------------------------- JSON Lines


def _take_lines(pieces: Iterator[bytes], count: int, limit: int) -> list[bytes | None]:
    """Up to `count` lines; None stands for a line over `limit` bytes, drained unkept."""
    batch = list(islice(pieces, count))
    if not batch or max(map(len, batch)) < limit:
        return cast(list[bytes | None], batch)
    out: list[bytes | None] = []
    rest = iter(batch)
    for piece in rest:
        if len(piece) < limit or piece.endswith(b"\n"):
            out.append(piece)
            continue
        out.append(None)
        # The tail of the long line: from this batch first, then straight from the file.
        for tail in chain(rest, pieces):
            if tail.endswith(b"\n"):
                break
    return out


def _jsonl_chunks(path: str, rules: _Rules, chunk_rows: int) -> Iterator[RowChunk]:
    limit = MAX_RECORD_BYTES
    with compression.open_binary(path, rules.compression) as f:
        # readline(limit) bounds memory per line; the callable iterator keeps the loop in C.
        pieces = iter(partial(f.readline, limit), b"")
        row, first = 0, True
        while True:
            with _gc_paused():
                batch = _take_lines(pieces, chunk_rows, limit)
                if not batch:
                    return
                if first and batch[0] and batch[0].startswith(codecs.BOM_UTF8):
                    batch[0] = batch[0][len(codecs.BOM_UTF8) :]
                first = False
                chunk = _jsonl_fast(batch, rules, row + 1)
                if chunk is None:
                    chunk, row = _jsonl_batch(batch, rules, row)
                else:
                    row += len(batch)
                del batch
            if _yieldable(chunk):
                yield chunk


# The C scanner behind json.loads, without its per-call Python wrappers: scan(text, 0)
# returns (value, end) or raises StopIteration when no JSON value starts at 0.
_scan_json = json.scanner.make_scanner(json.JSONDecoder())  # type: ignore[attr-defined]


def _jsonl_fast(batch: list[bytes | None], rules: _Rules, first_row: int) -> RowChunk | None:
    """Columnar path for a batch of same-shaped objects with string values; else None."""
    if None in batch:
        return None
    lines = list(map(bytes.strip, cast(list[bytes], batch)))
    if not all(lines):  # blank lines shift row numbers: leave them to the row path
        return None
    try:
        texts = list(map(bytes.decode, lines))
        # A StopIteration inside map ends the list early; the length check below sees it.
        parsed = list(map(_scan_json, texts, repeat(0)))
    except (ValueError, RecursionError):
        return None
    if len(parsed) != len(texts) or list(map(itemgetter(1), parsed)) != list(map(len, texts)):
        return None  # a line failed to parse, or has text after its value
    objs = list(map(itemgetter(0), parsed))
    if set(map(type, objs)) != {dict} or "user_id" not in objs[0]:
        return None
    keys = tuple(objs[0])
    # Same length and every key of the first object present => the same keys everywhere.
    if set(map(len, objs)) != {len(keys)}:
        return None
    try:
        cols = {key: list(map(itemgetter(key), objs)) for key in keys}
    except KeyError:
        return None
    for key in keys:
        allowed = {str, int} if key in _ID_KEYS else {str}
        if not allowed.issuperset(map(type, cols[key])):
            return None  # nulls, nested values, floats: the row path converts or rejects them
    for key in _ID_KEYS:
        if key in cols and int in set(map(type, cols[key])):
            cols[key] = list(map(str, cols[key]))
    attr_names = tuple(key for key in keys if key not in _RESERVED)
    return _bulk_chunk(
        rules,
        first_row,
        cols["user_id"],
        cols.get("segment_id"),
        cols.get("op"),
        attr_names,
        [cols[name] for name in attr_names],
    )


def _jsonl_batch(batch: list[bytes | None], rules: _Rules, row: int) -> tuple[RowChunk, int]:
    out = _Builder(rules.file, with_attrs=True)
    loads, reject = json.loads, out.reject
    kinds: dict[str, set[type]] = {}  # attribute -> JSON types of its values
    for line in batch:
        if line is None:
            row += 1
            reject(row, f"line is longer than {MAX_RECORD_BYTES} bytes", "")
            continue
        line = line.strip()
        if not line:
            continue
        row += 1
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raw = line.decode("utf-8", "backslashreplace")
            reject(row, f"line is not valid UTF-8 (undecodable byte at {exc.start})", raw)
            continue
        try:
            obj = loads(text)
        except ValueError as exc:
            reject(row, f"line is not valid JSON: {_json_error(exc)}", text)
            continue
        except RecursionError:
            reject(row, "line is not valid JSON: nested too deeply", text)
            continue
        clean, attrs = _json_row(obj, rules)
        if isinstance(clean, str):
            reject(row, clean, text)
        else:
            out.add(row, clean, attrs)
            if attrs:
                for key in attrs:
                    kinds.setdefault(key, set()).add(type(obj[key]))
    chunk = out.chunk
    if not any(chunk.attributes or ()):  # no row of this chunk had extra keys
        chunk.attributes = None
    else:
        chunk.attribute_types = _json_types(kinds)
    return chunk, row


def _json_types(kinds: dict[str, set[type]]) -> dict[str, Any]:
    """The Arrow type of each attribute from the JSON types of its values in a chunk:
    integers, numbers and booleans keep their type; strings, nested values and mixes are
    text (nested ones as their JSON)."""
    import pyarrow as pa

    types: dict[str, Any] = {}
    for key, seen in kinds.items():
        if seen == {bool}:
            types[key] = pa.bool_()
        elif seen == {int}:
            types[key] = pa.int64()
        elif seen and seen <= {int, float}:
            types[key] = pa.float64()
    return types


def _json_error(exc: ValueError) -> str:
    if isinstance(exc, json.JSONDecodeError):
        return f"{exc.msg} at column {exc.colno}"
    return str(exc)


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


def _json_id(obj: dict[str, Any], key: str) -> str | None:
    """The id as text; raises TypeError with the reason when it is not a string/integer."""
    value = obj.get(key)
    if value is None or type(value) is str:
        return value
    if type(value) is int:  # not bool: type() is exact
        return str(value)
    raise TypeError(f"{key} is a JSON {_json_type(value)}, expected a string or an integer")


def _json_text(value: Any, default: Any = None) -> str:
    if type(value) is str:
        return value.strip()
    return json.dumps(value, ensure_ascii=False, default=default)


def _json_row(obj: Any, rules: _Rules) -> tuple[tuple[str, str, str] | str, dict[str, str] | None]:
    """(clean fields or reject reason, attributes) for one decoded line."""
    if type(obj) is not dict:
        return f"line is a JSON {_json_type(obj)}, expected an object", None
    op = obj.get("op")
    if op is not None and type(op) is not str:
        return f"op is a JSON {_json_type(op)}, expected a string", None
    try:
        clean = _clean_row(rules, _json_id(obj, "user_id"), _json_id(obj, "segment_id"), op)
    except TypeError as exc:
        return str(exc), None
    if isinstance(clean, str) or all(key in _RESERVED for key in obj):
        return clean, None
    # Extra keys are attributes; null means absent. Non-strings keep their JSON spelling.
    attrs = {k: _json_text(v) for k, v in obj.items() if k not in _RESERVED and v is not None}
    problem = _attr_problem(attrs)
    return (problem, None) if problem else (clean, attrs)


# ------------------------------------------------------------------------------- Parquet


def _open_parquet(path: str) -> pq.ParquetFile:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise InputFileError(
            f"{path}: cannot be read as Parquet ({exc}); expected a Parquet file"
        ) from None


def _read_parquet(path: str, rules: _Rules, chunk_rows: int) -> Iterator[RowChunk]:
    with _open_parquet(path) as pf:
        layout = _layout(path, pf.schema_arrow.names, rules)
    return _parquet_chunks(path, rules, layout, chunk_rows)


def _parquet_chunks(
    path: str, rules: _Rules, layout: _Layout, chunk_rows: int
) -> Iterator[RowChunk]:
    import pyarrow as pa

    with _open_parquet(path) as pf:
        if _layout(path, pf.schema_arrow.names, rules) != layout:
            raise InputFileError(f"{path}: the schema changed while the file was being read")
        batches = pf.iter_batches(batch_size=chunk_rows)
        row = 0
        while True:
            try:
                batch = next(batches, None)
            except (pa.ArrowException, OSError) as exc:
                # Only found mid-stream: a corrupt page deep in an otherwise valid file
                # (a bad snappy block is an OSError, not an ArrowException).
                raise InputFileError(
                    f"{path}: corrupt Parquet data after row {row} ({exc})"
                ) from exc
            if batch is None:
                return
            chunk = _parquet_batch(batch, layout, rules, row)
            row += batch.num_rows
            if _yieldable(chunk):
                yield chunk


def _arrow_strings(arr: pa.Array) -> list[str | None]:
    """A column as Python text: strings as-is, scalars cast by Arrow, the rest as JSON."""
    import pyarrow as pa

    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    kind = arr.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return arr.to_pylist()
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        # Bad bytes become surrogates, which the row checks reject as undecodable.
        values = arr.to_pylist()
        return [None if v is None else v.decode("utf-8", "surrogateescape") for v in values]
    try:
        return arr.cast(pa.string()).to_pylist()
    except (pa.ArrowNotImplementedError, pa.ArrowInvalid):
        values = arr.to_pylist()
        return [None if v is None else _json_text(v, default=str) for v in values]


def _parquet_batch(batch: pa.RecordBatch, layout: _Layout, rules: _Rules, row: int) -> RowChunk:
    chunk = _parquet_rows(batch, layout, rules, row)
    if chunk.attributes is not None:
        chunk.attribute_types = _parquet_types(batch, layout)
    return chunk


def _parquet_types(batch: pa.RecordBatch, layout: _Layout) -> dict[str, Any]:
    """The file's type of each attribute that its text converts back to exactly (numbers,
    booleans, dates and times, decimals); nested and binary values stay text."""
    import pyarrow as pa

    types: dict[str, Any] = {}
    for name, i in zip(layout.attr_names, layout.attr_idx, strict=True):
        kind = batch.schema.field(i).type
        if pa.types.is_dictionary(kind):
            kind = kind.value_type
        if (pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)
                or pa.types.is_temporal(kind) or pa.types.is_decimal(kind)):
            types[name] = kind
    return types


def _parquet_rows(batch: pa.RecordBatch, layout: _Layout, rules: _Rules, row: int) -> RowChunk:
    cols = [_arrow_strings(col) for col in batch.columns]
    if not any(col.null_count for col in batch.columns):
        texts = cast(list[list[str]], cols)  # no nulls: every value is a str
        chunk = _bulk_chunk(
            rules,
            row + 1,
            texts[layout.user_id],
            None if layout.segment_id is None else texts[layout.segment_id],
            None if layout.op is None else texts[layout.op],
            layout.attr_names,
            [texts[i] for i in layout.attr_idx],
        )
        if chunk is not None:
            return chunk
    return _parquet_slow(cols, layout, rules, row)


def _parquet_slow(
    cols: list[list[str | None]], layout: _Layout, rules: _Rules, row: int
) -> RowChunk:
    out = _Builder(rules.file, bool(layout.attr_names))
    seg_at, op_at = layout.segment_id, layout.op
    for row_no, record in enumerate(zip(*cols, strict=True), start=row + 1):
        clean = _clean_row(
            rules,
            record[layout.user_id],
            None if seg_at is None else record[seg_at],
            None if op_at is None else record[op_at],
        )
        attrs = None
        if not isinstance(clean, str) and layout.attr_names:
            attrs = {
                name: value.strip()
                for name, value in zip(
                    layout.attr_names, [record[i] for i in layout.attr_idx], strict=True
                )
                if value is not None  # null means absent, as in JSON Lines
            }
            clean = _attr_problem(attrs) or clean
        if isinstance(clean, str):
            raw = json.dumps(dict(zip(layout.names, record, strict=True)), ensure_ascii=False)
            out.reject(row_no, clean, raw)
        else:
            out.add(row_no, clean, attrs)
    return out.chunk
