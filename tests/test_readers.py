"""Readers: the bad-input catalogue, one test per case, plus round trips per format."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connectors import readers
from connectors.readers import detect_format, file_checksum, read_chunks
from connectors.rows import InputFileError, RejectedRow, RowChunk


@dataclass
class Result:
    """All chunks of one read, flattened."""

    chunks: list[RowChunk]
    rows: list[tuple[int, str, str, str]] = field(default_factory=list)  # seq, user, seg, op
    attrs: list[dict[str, str] | None] = field(default_factory=list)
    rejects: list[RejectedRow] = field(default_factory=list)

    @property
    def users(self) -> list[str]:
        return [user for _, user, _, _ in self.rows]

    @property
    def reject_rows(self) -> list[int]:
        return [r.row for r in self.rejects]


def read(
    path: Path,
    *,
    segment: str | None = "s1",
    mode: str = "add",
    fmt: str | None = None,
    chunk_rows: int = 50_000,
) -> Result:
    chunks = read_chunks(str(path), segment=segment, mode=mode, fmt=fmt, chunk_rows=chunk_rows)
    result = Result(list(chunks))
    for chunk in result.chunks:
        assert len(chunk.user_ids) == len(chunk.segment_ids) == len(chunk.ops) == len(chunk)
        result.rows += zip(chunk.seqs, chunk.user_ids, chunk.segment_ids, chunk.ops, strict=True)
        if chunk.attributes is None:
            result.attrs += [None] * len(chunk)
        else:
            assert len(chunk.attributes) == len(chunk)
            result.attrs += chunk.attributes
        result.rejects += chunk.rejects
    return result


def put(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def only_reject(result: Result) -> RejectedRow:
    assert len(result.rejects) == 1, result.rejects
    return result.rejects[0]


# ------------------------------------------------------------------ whole-file errors


def test_missing_user_id_column_is_a_whole_file_error(tmp_path: Path) -> None:
    path = put(tmp_path, "x.csv", "id,segment_id\nu1,s\n")
    with pytest.raises(InputFileError, match=r"x\.csv: no user_id column.*\(id, segment_id\)"):
        read_chunks(str(path), segment=None, mode="add")  # raised at call, before iteration


def test_data_without_header_is_a_whole_file_error(tmp_path: Path) -> None:
    path = put(tmp_path, "x.csv", "u1,42\nu2,42\n")
    with pytest.raises(InputFileError, match="expected a first line naming the columns"):
        read(path)


def test_only_blank_lines_means_no_header(tmp_path: Path) -> None:
    path = put(tmp_path, "x.csv", "\n  \n\n")
    with pytest.raises(InputFileError, match=r"x\.csv: no header row"):
        read(path)


def test_no_segment_column_and_no_default_is_a_whole_file_error(tmp_path: Path) -> None:
    path = put(tmp_path, "x.csv", "user_id\nu1\n")
    with pytest.raises(InputFileError, match="no segment_id column and no segment was given"):
        read(path, segment=None)
    assert read(path, segment="42").rows == [(1, "u1", "42", "add")]


def test_empty_file(tmp_path: Path) -> None:
    path = put(tmp_path, "x.csv", b"")
    with pytest.raises(InputFileError, match=r"x\.csv: is empty \(0 bytes\)"):
        read(path)


def test_no_such_file(tmp_path: Path) -> None:
    with pytest.raises(InputFileError, match=r"nope\.csv: no such file"):
        read(tmp_path / "nope.csv")


def test_directory(tmp_path: Path) -> None:
    (tmp_path / "d.csv").mkdir()
    with pytest.raises(InputFileError, match=r"d\.csv: is a directory"):
        read(tmp_path / "d.csv")


def test_unknown_extension(tmp_path: Path) -> None:
    path = put(tmp_path, "x.txt", "user_id\tsegment_id\nu1\ts\n")
    with pytest.raises(
        InputFileError, match=r"x\.txt: unknown format \(extension '\.txt'\)"
    ) as exc:
        read(path)
    assert ".csv" in str(exc.value) and ".jsonl" in str(exc.value) and ".parquet" in str(exc.value)
    assert ".tsv" in str(exc.value) and ".gz" in str(exc.value)
    # An explicit format overrides the extension.
    put(tmp_path, "y.txt", "user_id\nu1\n")
    assert read(tmp_path / "y.txt", fmt="csv").users == ["u1"]


def test_detect_format() -> None:
    assert detect_format("a/b.CSV") == "csv"
    assert [detect_format(f"x.{e}") for e in ("jsonl", "ndjson", "json")] == ["jsonl"] * 3
    assert [detect_format(f"x.{e}") for e in ("parquet", "pq")] == ["parquet"] * 2
    assert detect_format("x.txt", "NDJSON") == "jsonl"
    with pytest.raises(InputFileError, match="unknown format 'xml'; expected one of: csv"):
        detect_format("x.csv", "xml")
    with pytest.raises(InputFileError, match="no extension"):
        detect_format("data/file")
    # The format comes from the name under the compression suffix.
    assert [detect_format(f"x.{e}") for e in ("csv.gz", "tsv.bz2", "jsonl.zst")] == [
        "csv", "tsv", "jsonl"]
    with pytest.raises(InputFileError, match=r"x\.gz: unknown format \(no extension\)"):
        detect_format("x.gz")


def test_utf16_file(tmp_path: Path) -> None:
    path = put(tmp_path, "x.csv", "user_id,segment_id\nu1,s\n".encode("utf-16"))
    with pytest.raises(InputFileError, match=r"x\.csv: is not UTF-8 text \(.*UTF-16 byte-order"):
        read(path)


def test_utf16_without_bom_is_caught_by_nul_bytes(tmp_path: Path) -> None:
    path = put(tmp_path, "x.jsonl", '{"user_id": "u1"}\n'.encode("utf-16-le"))
    with pytest.raises(InputFileError, match=r"is not UTF-8 text.*NUL"):
        read(path)


def test_undecodable_header(tmp_path: Path) -> None:
    path = put(tmp_path, "x.csv", b"user_id,s\xe9gment\nu1,x\n")
    with pytest.raises(InputFileError, match=r"is not UTF-8 text.*undecodable byte at offset 9"):
        read(path)


def test_duplicate_header_column(tmp_path: Path) -> None:
    path = put(tmp_path, "x.csv", "user_id,segment_id,User_ID\nu1,s,u2\n")
    with pytest.raises(InputFileError, match=r"names column.*'user_id' more than once"):
        read(path)


def test_unnamed_header_column(tmp_path: Path) -> None:
    path = put(tmp_path, "x.csv", "user_id,segment_id,\nu1,s,\n")
    with pytest.raises(InputFileError, match="header column 3 has no name"):
        read(path)


def test_bad_arguments_are_value_errors(tmp_path: Path) -> None:
    path = put(tmp_path, "x.csv", "user_id\nu1\n")
    with pytest.raises(ValueError, match="mode 'upsert'"):
        read(path, mode="upsert")
    with pytest.raises(ValueError, match=r"segment contains control character U\+0007"):
        read(path, segment="s\x07")


# ------------------------------------------------------------------------- row rules


def test_blank_user_id(tmp_path: Path) -> None:
    path = put(tmp_path, "x.csv", "user_id,segment_id\nu1,s\n  ,s\n,s\nu4,s\n")
    result = read(path)
    assert result.rows == [(1, "u1", "s", "add"), (4, "u4", "s", "add")]
    assert result.reject_rows == [2, 3]
    assert all("user_id is missing or blank" in r.reason for r in result.rejects)
    assert result.rejects[0] == RejectedRow(str(path), 2, "user_id is missing or blank", "  ,s", 3)


def test_missing_segment(tmp_path: Path) -> None:
    path = put(tmp_path, "x.csv", "user_id,segment_id\nu1,s\nu2, \nu3,t\n")
    result = read(path, segment=None)
    assert result.rows == [(1, "u1", "s", "add"), (3, "u3", "t", "add")]
    reject = only_reject(result)
    assert reject.row == 2 and "segment_id is blank" in reject.reason
    # With a default, the column wins when it has a value and the default fills the blank.
    assert read(path, segment=" 9 ").rows == [
        (1, "u1", "s", "add"),
        (2, "u2", "9", "add"),
        (3, "u3", "t", "add"),
    ]


def test_unknown_op(tmp_path: Path) -> None:
    path = put(
        tmp_path, "x.csv", "user_id,segment_id,op\nu1,s, ADD \nu2,s,Remove\nu3,s,delete\nu4,s,\n"
    )
    result = read(path, mode="replace")
    assert result.rows == [(1, "u1", "s", "add"), (2, "u2", "s", "remove"), (4, "u4", "s", "add")]
    reject = only_reject(result)
    assert reject.row == 3
    assert reject.reason == "op 'delete' is not one of: add, remove"


def test_default_op_follows_mode(tmp_path: Path) -> None:
    path = put(tmp_path, "x.csv", "user_id\nu1\nu2\n")
    assert [op for *_, op in read(path, mode="remove").rows] == ["remove", "remove"]
    assert [op for *_, op in read(path, mode="replace").rows] == ["add", "add"]


def test_wrong_column_count(tmp_path: Path) -> None:
    path = put(tmp_path, "x.csv", "user_id,segment_id,op\nu1,s,add\nu2,s\nu3,s,add,x\nu4,s,add\n")
    result = read(path)
    assert result.users == ["u1", "u4"]
    assert result.reject_rows == [2, 3]
    assert [r.reason for r in result.rejects] == [
        "expected 3 fields, got 2",
        "expected 3 fields, got 4",
    ]
    assert result.rejects[1].raw == "u3,s,add,x"


def test_control_characters_in_ids(tmp_path: Path) -> None:
    path = put(
        tmp_path, "x.csv", 'user_id,segment_id\nu1,s\n"u\x012",s\nu3,"s\t3"\nu4,s\x7f\nu5,s\n'
    )
    result = read(path)
    assert result.users == ["u1", "u5"]
    assert result.reject_rows == [2, 3, 4]
    assert [r.reason for r in result.rejects] == [
        "user_id contains control character U+0001",
        "segment_id contains control character U+0009",
        "segment_id contains control character U+007F",
    ]


def test_non_ascii_ids_are_accepted(tmp_path: Path) -> None:
    # Not printable to str.isprintable(), yet real text: a no-break space inside, an accent.
    path = put(tmp_path, "x.csv", "user_id,segment_id\nJos\u00e9\u00a0M,s\n")
    assert read(path).rows == [(1, "Jos\u00e9\u00a0M", "s", "add")]


def test_undecodable_bytes_in_a_row(tmp_path: Path) -> None:
    content = b"user_id,segment_id,note\nu1,s,a\nu\xff2,s,b\nu3,s,n\xe9\nu4,s,d\n"
    result = read(put(tmp_path, "x.csv", content))
    assert result.users == ["u1", "u4"]
    assert result.reject_rows == [2, 3]
    assert result.rejects[0].reason == "user_id contains undecodable bytes (not valid UTF-8)"
    assert (
        result.rejects[1].reason == "attribute 'note' contains undecodable bytes (not valid UTF-8)"
    )
    # The raw text shows the bad byte escaped, so it can go to the dead-letter topic as UTF-8.
    assert result.rejects[0].raw == "u\\xff2,s,b"
    result.rejects[0].raw.encode("utf-8")


def test_bom_is_dropped(tmp_path: Path) -> None:
    result = read(put(tmp_path, "x.csv", b"\xef\xbb\xbfuser_id,segment_id\nu1,s\n"))
    assert result.rows == [(1, "u1", "s", "add")]
    result = read(put(tmp_path, "x.jsonl", b'\xef\xbb\xbf{"user_id": "u1"}\n'))
    assert result.rows == [(1, "u1", "s1", "add")]


def test_crlf_line_endings(tmp_path: Path) -> None:
    path = put(tmp_path, "x.csv", "user_id,segment_id,op\r\nu1,s,add\r\nu2,s,remove\r\n")
    assert read(path).rows == [(1, "u1", "s", "add"), (2, "u2", "s", "remove")]


def test_quoted_newlines_count_records_not_lines(tmp_path: Path) -> None:
    content = 'user_id,segment_id,note\nu1,s,"two\nlines"\n,s,"x\ny\nz"\nu3,s,plain\n'
    result = read(put(tmp_path, "x.csv", content))
    assert result.rows == [(1, "u1", "s", "add"), (3, "u3", "s", "add")]
    assert result.attrs == [{"note": "two\nlines"}, {"note": "plain"}]
    assert result.reject_rows == [2]


def test_blank_lines_are_skipped_and_not_counted(tmp_path: Path) -> None:
    path = put(tmp_path, "x.csv", "user_id,segment_id\n\nu1,s\n   \n\t\nu2,s\n,s\n\n")
    result = read(path)
    assert result.rows == [(1, "u1", "s", "add"), (2, "u2", "s", "add")]
    assert result.reject_rows == [3]


def test_header_only_yields_nothing(tmp_path: Path) -> None:
    for name, content in [("a.csv", "user_id,segment_id\n"), ("b.csv", "user_id\r\n\r\n  \n")]:
        result = read(put(tmp_path, name, content))
        assert result.chunks == [] and result.rows == [] and result.rejects == []
    assert read(put(tmp_path, "c.jsonl", "\n \n")).chunks == []


def test_very_long_line_is_rejected_and_the_next_row_read(tmp_path: Path) -> None:
    long_id = "x" * 1_048_576
    path = put(tmp_path, "x.csv", f"user_id,segment_id\n{long_id},s\nu2,s\n")
    result = read(path)
    assert result.rows == [(2, "u2", "s", "add")]
    reject = only_reject(result)
    assert reject.row == 1
    assert reject.reason == "user_id is 1048576 characters long; at most 256 allowed"
    assert reject.raw == "x" * 500  # bounded


def test_ids_at_the_length_limit(tmp_path: Path) -> None:
    path = put(tmp_path, "x.csv", f"user_id,segment_id\n{'u' * 256},s\nu2,{'s' * 257}\n")
    result = read(path)
    assert result.users == ["u" * 256]
    assert only_reject(result).reason.startswith("segment_id is 257 characters long")


def test_field_over_the_csv_limit_is_a_malformed_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(readers, "MAX_RECORD_BYTES", 100)
    saved = csv.field_size_limit(100)
    try:
        path = put(tmp_path, "x.csv", f'user_id,note\nu1,a\nu2,"{"n" * 200}"\nu3,c\n')
        result = read(path)
    finally:
        csv.field_size_limit(saved)
    assert result.rows == [(1, "u1", "s1", "add"), (3, "u3", "s1", "add")]
    reject = only_reject(result)
    assert reject.row == 2 and "field larger than field limit" in reject.reason


def test_attributes(tmp_path: Path) -> None:
    path = put(tmp_path, "x.csv", "email,USER_ID,country\n a@x , u1 , DE \nb@x,u2,\n")
    result = read(path)
    assert result.rows == [(1, "u1", "s1", "add"), (2, "u2", "s1", "add")]
    assert result.attrs == [{"email": "a@x", "country": "DE"}, {"email": "b@x", "country": ""}]
    plain = read(put(tmp_path, "y.csv", "user_id\nu1\n"))
    assert [c.attributes for c in plain.chunks] == [None]


@pytest.mark.parametrize("chunk_rows", [1, 2, 3, 50_000])
def test_chunks_keep_file_order_and_row_numbers(tmp_path: Path, chunk_rows: int) -> None:
    lines = [f"u{i},s" if i != 4 else ",s" for i in range(1, 8)]
    path = put(tmp_path, "x.csv", "user_id,segment_id\n" + "\n".join(lines) + "\n")
    result = read(path, chunk_rows=chunk_rows)
    assert [seq for seq, *_ in result.rows] == [1, 2, 3, 5, 6, 7]
    assert result.users == ["u1", "u2", "u3", "u5", "u6", "u7"]
    assert result.reject_rows == [4]
    assert all(len(c) + len(c.rejects) <= chunk_rows for c in result.chunks)
    assert len(result.chunks) == -(-7 // chunk_rows)


# ----------------------------------------------------------------------- JSON Lines


def test_jsonl_bad_line_non_object_and_integer_user_id(tmp_path: Path) -> None:
    lines = [
        '{"user_id": "u1", "segment_id": "s", "op": "remove"}',
        '{"user_id": "u2", ',
        "",
        '["u3"]',
        '{"user_id": 42}',
        '{"user_id": true}',
        '{"user_id": 1.5}',
        '{"user_id": "u8", "op": 1}',
        '{"segment_id": "s"}',
        "  ",
        '{"user_id": "u10", "segment_id": 7} ',
    ]
    result = read(put(tmp_path, "x.jsonl", "\n".join(lines) + "\n"))
    assert result.rows == [(1, "u1", "s", "remove"), (4, "42", "s1", "add"), (9, "u10", "7", "add")]
    assert result.reject_rows == [2, 3, 5, 6, 7, 8]
    reasons = [r.reason for r in result.rejects]
    assert reasons[0].startswith("line is not valid JSON: Expecting property name")
    assert reasons[1:] == [
        "line is a JSON array, expected an object",
        "user_id is a JSON boolean, expected a string or an integer",
        "user_id is a JSON number, expected a string or an integer",
        "op is a JSON number, expected a string",
        "user_id is missing or blank",
    ]
    assert result.rejects[0].raw == '{"user_id": "u2",'


def test_jsonl_undecodable_line(tmp_path: Path) -> None:
    content = b'{"user_id": "u1"}\n{"user_id": "u\xff2"}\n{"user_id": "u3"}\n'
    result = read(put(tmp_path, "x.ndjson", content))
    assert result.users == ["u1", "u3"]
    reject = only_reject(result)
    assert reject.row == 2 and "not valid UTF-8" in reject.reason
    assert reject.raw == '{"user_id": "u\\xff2"}'


def test_jsonl_attributes(tmp_path: Path) -> None:
    lines = [
        {"user_id": "u1", "n": 3, "ok": True, "tags": ["a", "é"], "gone": None, "name": " Ann "},
        {"user_id": "u2"},
    ]
    result = read(put(tmp_path, "x.jsonl", "\n".join(map(json.dumps, lines)) + "\n"))
    assert result.users == ["u1", "u2"]
    assert result.attrs == [{"n": "3", "ok": "true", "tags": '["a", "é"]', "name": "Ann"}, {}]
    plain = read(put(tmp_path, "y.jsonl", '{"user_id": "u1"}\n{"user_id": 2}\n'))
    assert plain.users == ["u1", "2"] and [c.attributes for c in plain.chunks] == [None]


def test_jsonl_lone_surrogate_is_rejected(tmp_path: Path) -> None:
    path = put(tmp_path, "x.jsonl", '{"user_id": "u\\ud800"}\n{"user_id": "u2", "a": "\\udc00"}\n')
    result = read(path)
    assert result.rows == []
    assert [r.reason for r in result.rejects] == [
        "user_id contains undecodable bytes (not valid UTF-8)",
        "attribute 'a' contains undecodable bytes (not valid UTF-8)",
    ]
    for reject in result.rejects:
        reject.raw.encode("utf-8")


def test_jsonl_overlong_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(readers, "MAX_RECORD_BYTES", 64)
    long_line = json.dumps({"user_id": "x" * 300})
    path = put(tmp_path, "x.jsonl", f'{{"user_id": "u1"}}\n{long_line}\n{{"user_id": "u3"}}\n')
    for chunk_rows in (1, 2, 50):
        result = read(path, chunk_rows=chunk_rows)
        assert result.rows == [(1, "u1", "s1", "add"), (3, "u3", "s1", "add")]
        assert only_reject(result).reason == "line is longer than 64 bytes"


# -------------------------------------------------------------------------- Parquet


def test_parquet_round_trip(tmp_path: Path) -> None:
    table = pa.table(
        {
            "user_id": ["u1", None, " u3 ", "", "u5"],
            "segment_id": ["s", "s", None, "s", "s"],
            "op": ["add", "add", "REMOVE", "add", "nope"],
            "score": pa.array([1, 2, None, 4, 5], pa.int64()),
        }
    )
    path = tmp_path / "x.parquet"
    pq.write_table(table, path)
    result = read(path, segment="dflt", chunk_rows=2)
    assert result.rows == [(1, "u1", "s", "add"), (3, "u3", "dflt", "remove")]
    assert result.attrs == [{"score": "1"}, {}]  # null means absent
    assert result.reject_rows == [2, 4, 5]
    assert [r.reason for r in result.rejects] == [
        "user_id is missing or blank",
        "user_id is missing or blank",
        "op 'nope' is not one of: add, remove",
    ]
    assert json.loads(result.rejects[2].raw) == {
        "user_id": "u5",
        "segment_id": "s",
        "op": "nope",
        "score": "5",
    }


def test_parquet_fast_path_with_integer_ids(tmp_path: Path) -> None:
    n = 1000
    table = pa.table({"user_id": pa.array(range(n), pa.int64()), "segment_id": ["7"] * n})
    path = tmp_path / "x.pq"
    pq.write_table(table, path, row_group_size=300)
    result = read(path, segment=None, chunk_rows=256)
    assert result.rows == [(i + 1, str(i), "7", "add") for i in range(n)]
    assert result.rejects == [] and set(result.attrs) == {None}


def test_parquet_without_user_id(tmp_path: Path) -> None:
    path = tmp_path / "x.parquet"
    pq.write_table(pa.table({"uid": ["u1"], "segment_id": ["s"]}), path)
    with pytest.raises(InputFileError, match=r"x\.parquet: no user_id column.*\(uid, segment_id\)"):
        read(path)


def test_not_a_parquet_file(tmp_path: Path) -> None:
    path = put(tmp_path, "x.parquet", "user_id\nu1\n")
    with pytest.raises(InputFileError, match=r"x\.parquet: cannot be read as Parquet"):
        read(path)


# ------------------------------------------------------------------------- checksum


def test_file_checksum_streams_blocks(tmp_path: Path) -> None:
    data = bytes(range(256)) * 10_000  # 2.4 MiB: three blocks
    path = put(tmp_path, "x.csv", data)
    assert file_checksum(str(path)) == hashlib.sha256(data).hexdigest()
    assert file_checksum(str(put(tmp_path, "e.csv", b""))) == hashlib.sha256(b"").hexdigest()
    with pytest.raises(InputFileError, match="no such file"):
        file_checksum(str(tmp_path / "nope.csv"))


# ----------------------------------------------------------------- property: round trip

# Printable, with the characters CSV must quote; a no-break space and an accent send
# some chunks down the row-by-row path, so both paths are compared against the input.
_ID_CHARS = "abcXYZ019 ,\"'-_.@é\u00a0"
_ids = st.text(alphabet=_ID_CHARS, min_size=1, max_size=12).filter(lambda s: s == s.strip())
_rows = st.lists(st.tuples(_ids, _ids, st.sampled_from(["add", "remove"])), min_size=1, max_size=40)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(rows=_rows, chunk_rows=st.integers(min_value=1, max_value=16))
def test_csv_and_jsonl_read_back_what_was_written(
    tmp_path: Path, rows: list[tuple[str, str, str]], chunk_rows: int
) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["user_id", "segment_id", "op"])
    writer.writerows(rows)
    csv_path = put(tmp_path, "p.csv", buf.getvalue())
    lines = [json.dumps({"user_id": u, "segment_id": s, "op": o}) for u, s, o in rows]
    jsonl_path = put(tmp_path, "p.jsonl", "".join(line + "\n" for line in lines))
    expected = [(i, u, s, o) for i, (u, s, o) in enumerate(rows, start=1)]
    for path in (csv_path, jsonl_path):
        result = read(path, segment=None, chunk_rows=chunk_rows)
        assert result.rows == expected
        assert result.rejects == []


# ------------------------------------------------- quotes: nothing vanishes uncounted


def test_unclosed_quote_is_a_whole_file_error_naming_its_line(tmp_path: Path) -> None:
    good = "".join(f"u{i},s,fine\n" for i in range(3, 3_000))
    path = put(tmp_path, "x.csv", 'user_id,segment_id,note\nu1,s,ok\nu2,s,"never closed\n' + good)
    with pytest.raises(InputFileError, match=r"x\.csv: line 3: a quoted field opened here is "
                       r"never closed") as exc:
        read(path)
    assert "nothing was imported" in str(exc.value)


def test_unclosed_quote_after_a_multiline_field_names_the_quote_line(tmp_path: Path) -> None:
    path = put(tmp_path, "x.csv", 'user_id,segment_id,note\nu1,"s\nt","open\nu2,s,x\n')
    with pytest.raises(InputFileError, match="line 3: a quoted field opened here is never"):
        read(path)


def test_quote_running_across_lines_into_a_mistake_is_a_whole_file_error(
    tmp_path: Path,
) -> None:
    # The quote of row 2 swallows row 3 and stops at the quote of row 4: without the
    # whole-file error, two good rows would become one malformed record.
    content = 'user_id,segment_id,note\nu1,s,ok\nu2,s,"oops\nu3,s,fine\nu4,s,"x"y\nu5,s,z\n'
    with pytest.raises(InputFileError, match=r"line 3: a quoted field in the record starting "
                       r"here runs across lines to line 5"):
        read(put(tmp_path, "x.csv", content))


def test_quote_mistake_within_one_line_is_a_bad_row_with_its_line(tmp_path: Path) -> None:
    content = 'user_id,segment_id,note\nu1,s,"two\nlines"\nu2,s,"x"y\nu3,s,ok\n'
    result = read(put(tmp_path, "x.csv", content))
    assert result.users == ["u1", "u3"]
    reject = only_reject(result)
    assert (reject.row, reject.line) == (2, 4)
    assert "malformed CSV record" in reject.reason


def test_rejects_name_the_line_their_record_starts_on(tmp_path: Path) -> None:
    content = 'user_id,segment_id,note\n\nu1,s,"a\r\nb"\n,s,x\n\nu3,s,"c\rd"\n,s,"e\nf"\n'
    for chunk_rows in (1, 2, 50):
        result = read(put(tmp_path, "x.csv", content), chunk_rows=chunk_rows)
        assert [(r.row, r.line) for r in result.rejects] == [(2, 5), (4, 9)], chunk_rows


def strict_csv(text: str) -> tuple[list[tuple[int, list[str] | None]], bool]:
    """An independent strict CSV parser (RFC 4180, no CR), written for this test:
    records as (first line, fields, or None for a malformed record) and whether the file
    must be refused. A quote opens a quoted field only as a field's first character; inside
    one, "" is a quote; a closing quote must be followed by a comma, a line break or the
    end. A record breaking that rule ends with its physical line; if it spans lines, or
    the text ends inside quotes, the file is refused."""
    records: list[tuple[int, list[str] | None]] = []
    i, n, line = 0, len(text), 1
    while i < n:
        start, fields, field, state, spans = line, [], "", "start", False
        while True:
            ch = text[i] if i < n else ""
            i += 1
            if state == "quoted":
                if ch == "":
                    return records, True
                if ch == '"' and text[i : i + 1] == '"':
                    field, i = field + '"', i + 1
                elif ch == '"':
                    state = "closed"
                else:
                    field += ch
                    if ch == "\n":
                        line, spans = line + 1, True
                continue
            if ch in (",", "\n", ""):
                fields.append(field)
                field, state = "", "start"
                if ch == ",":
                    continue
                line += ch == "\n"
                records.append((start, fields))
                break
            if state == "closed":  # a character right after a closing quote
                if spans:
                    return records, True
                end = text.find("\n", i)
                i = n if end < 0 else end + 1
                line += end >= 0
                records.append((start, None))
                break
            if ch == '"' and state == "start":
                state = "quoted"
            else:
                field, state = field + ch, "plain"
    return records, False


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(body=st.text(alphabet='ab ,"\n', max_size=80), chunk_rows=st.integers(1, 5))
def test_random_quotes_are_refused_or_every_record_is_counted(
    tmp_path: Path, body: str, chunk_rows: int
) -> None:
    text = "user_id,segment_id,note\n" + body
    records, refused = strict_csv(text)
    path = put(tmp_path, "q.csv", text)
    if refused:
        with pytest.raises(InputFileError, match="quoted field"):
            read(path, chunk_rows=chunk_rows)
        return
    result = read(path, chunk_rows=chunk_rows)
    data = [(start, fields) for start, fields in records[1:]
            if fields is None or not (len(fields) == 1 and not fields[0].strip())]
    # Applied + rejected = the records the strict parser finds, numbered 1..n, none twice.
    numbers = sorted([seq for seq, *_ in result.rows] + result.reject_rows)
    assert numbers == list(range(1, len(data) + 1))
    for seq, user, _segment, _op in result.rows:
        fields = data[seq - 1][1]
        assert fields is not None and len(fields) == 3 and fields[0].strip() == user
    for reject in result.rejects:
        assert reject.line == data[reject.row - 1][0]


# ----------------------------------------------------------- compressed, TSV, delimiters

_CSV = "user_id,segment_id,op\nu1,s,add\nu2,t,remove\n,s,add\n"
_WANT = [(1, "u1", "s", "add"), (2, "u2", "t", "remove")]


def _compressed(kind: str, data: bytes) -> bytes:
    import bz2
    import gzip

    if kind == "gz":
        return gzip.compress(data)
    if kind == "bz2":
        return bz2.compress(data)
    return pa.Codec("zstd").compress(data, asbytes=True)


@pytest.mark.parametrize("kind", ["gz", "bz2", "zst"])
def test_compressed_csv_and_jsonl_are_streamed(tmp_path: Path, kind: str) -> None:
    csv_path = put(tmp_path, f"x.csv.{kind}", _compressed(kind, _CSV.encode()))
    result = read(csv_path, chunk_rows=1)
    assert result.rows == _WANT and result.reject_rows == [3]
    lines = '{"user_id": "u1", "segment_id": "s"}\n{"user_id": "u2", "segment_id": "t"}\n'
    jsonl_path = put(tmp_path, f"x.jsonl.{kind}", _compressed(kind, lines.encode()))
    assert read(jsonl_path).users == ["u1", "u2"]


def test_gzip_named_csv_is_recognised_by_its_magic_bytes(tmp_path: Path) -> None:
    path = put(tmp_path, "export.csv", _compressed("gz", _CSV.encode()))
    assert read(path).rows == _WANT


def test_truncated_gzip_is_a_whole_file_error(tmp_path: Path) -> None:
    data = _compressed("gz", ("user_id\n" + "".join(f"u{i}\n" for i in range(50_000))).encode())
    path = put(tmp_path, "x.csv.gz", data[: len(data) // 2])
    with pytest.raises(InputFileError, match=r"x\.csv\.gz: damaged gzip data after row"):
        read(path, chunk_rows=1000)


def test_compressed_parquet_is_refused(tmp_path: Path) -> None:
    buf = io.BytesIO()
    pq.write_table(pa.table({"user_id": ["u1"]}), buf)
    path = put(tmp_path, "x.parquet.gz", _compressed("gz", buf.getvalue()))
    with pytest.raises(InputFileError, match="gzip-compressed Parquet"):
        read(path)


def test_tsv_by_extension_and_format(tmp_path: Path) -> None:
    content = "user_id\tsegment_id\tnote\nu1\ts\ta, b\nu2\tt\t\"q\"\n"
    want = [(1, "u1", "s", "add"), (2, "u2", "t", "add")]
    result = read(put(tmp_path, "x.tsv", content))
    assert result.rows == want and result.attrs == [{"note": "a, b"}, {"note": "q"}]
    assert read(put(tmp_path, "x.txt", content), fmt="tsv").rows == want


@pytest.mark.parametrize("sep", [";", "|", "tab"])
def test_delimiter_option(tmp_path: Path, sep: str) -> None:
    char = "\t" if sep == "tab" else sep
    path = put(tmp_path, "x.csv", f"user_id{char}segment_id\nu1{char}s\n{char}s\n")
    result = read_chunks(str(path), segment=None, mode="add", delimiter=sep)
    chunks = list(result)
    assert [u for c in chunks for u in c.user_ids] == ["u1"]
    assert [r.raw for c in chunks for r in c.rejects] == [f"{char}s"]


def test_delimiter_is_refused_for_jsonl_and_checked(tmp_path: Path) -> None:
    path = put(tmp_path, "x.jsonl", '{"user_id": "u1"}\n')
    with pytest.raises(ValueError, match="--delimiter applies to CSV and TSV files"):
        read_chunks(str(path), segment="s", mode="add", delimiter=";")
    with pytest.raises(ValueError, match="--delimiter 'ab': expected one character"):
        read_chunks(str(put(tmp_path, "y.csv", "user_id\nu\n")), segment="s", mode="add",
                    delimiter="ab")


@pytest.mark.parametrize(("sep", "named"), [(";", "--delimiter ';'"), ("\t", "--delimiter tab"),
                                            ("|", "--delimiter '|'")])
def test_one_column_header_suggests_the_delimiter(tmp_path: Path, sep: str, named: str) -> None:
    path = put(tmp_path, "x.csv", f"user_id{sep}segment_id\nu1{sep}s\n")
    with pytest.raises(InputFileError, match="no user_id column") as exc:
        read(path)
    assert f"the header looks separated by {named.split()[1]}" in str(exc.value)
    assert named in str(exc.value)


def test_name_replaces_the_path_in_errors_and_dead_letters(tmp_path: Path) -> None:
    path = put(tmp_path, "spooled.part", "user_id,segment_id\nu1,s\n,s\n")
    chunks = list(read_chunks(str(path), segment=None, mode="add", fmt="csv", name="<stdin>"))
    assert [r.file for c in chunks for r in c.rejects] == ["<stdin>"]
    bad = put(tmp_path, "bad.part", "id\nu1\n")
    with pytest.raises(InputFileError, match=r"^<stdin>: no user_id column"):
        read_chunks(str(bad), segment="s", mode="add", fmt="csv", name="<stdin>")


def test_corrupt_parquet_page_is_a_whole_file_error(tmp_path: Path) -> None:
    """Regression: a damaged snappy page raised OSError, which escaped as a traceback."""
    users = [f"user-{i:06d}-{i * 7919 % 1000003}" for i in range(20_000)]
    path = tmp_path / "x.parquet"
    pq.write_table(pa.table({"user_id": users}), path, compression="snappy",
                   row_group_size=5_000, use_dictionary=False)
    data = bytearray(path.read_bytes())
    meta = pq.ParquetFile(path).metadata
    column = meta.row_group(2).column(0)
    start = column.data_page_offset + 40  # inside the page body, past its header
    data[start : start + 200] = bytes(200)
    path.write_bytes(bytes(data))
    with pytest.raises(InputFileError, match=r"x\.parquet: corrupt Parquet data after row"):
        read(path, chunk_rows=5_000)
