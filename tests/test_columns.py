"""Packed columns (topics/columns.py): every column round-trips through Avro, whatever its
values, and a value that cannot be packed is refused rather than split in two."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from topics.codec import decode, encode
from topics.columns import (
    pack_dictionary,
    pack_longs,
    pack_text,
    read_columns,
    unpack_dictionary,
    unpack_longs,
    unpack_text,
    write_columns,
)

texts = st.text(st.characters(blacklist_characters="\n", blacklist_categories=("Cs",)),
                max_size=12)


@settings(max_examples=300, deadline=None)
@given(st.lists(texts, max_size=40))
def test_text_round_trips_including_empty_values(values: list[str]) -> None:
    assert unpack_text(pack_text(values), len(values)) == values


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(min_value=-(2**63), max_value=2**63 - 1), max_size=40))
def test_longs_round_trip(values: list[int]) -> None:
    packed = pack_longs(values)
    assert len(packed) == 8 * len(values)
    assert unpack_longs(packed) == values


@pytest.mark.parametrize("distinct", [1, 2, 256, 257, 65_536, 65_537])
def test_dictionary_index_width_follows_the_distinct_values(distinct: int) -> None:
    values = [f"s{i % distinct}" for i in range(distinct + 3)]
    packed = pack_dictionary(values)
    width = 1 if distinct <= 256 else 2 if distinct <= 65_536 else 4
    assert len(packed["values"]) == distinct
    assert len(packed["index"]) == width * len(values)
    assert unpack_dictionary(packed, len(values)) == values


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(min_value=-1, max_value=10**12), texts,
                          st.sampled_from(["s1", "s2", "vip", "ü"]),
                          st.sampled_from(["add", "remove"])), max_size=30))
def test_columns_round_trip_through_avro(rows: list[tuple[int, str, str, str]]) -> None:
    seqs, users, segments, ops = ([r[i] for r in rows] for i in range(4))
    value = {"batch_id": "b", "source_position": 3, **write_columns(seqs, users, segments, ops)}
    _name, decoded = decode(encode("SegmentChanges", value))
    columns = read_columns(decoded)
    assert (columns.seqs, columns.user_ids, columns.segment_ids, columns.ops) == (
        seqs, users, segments, ops)
    assert len(columns) == len(rows)


def test_a_value_holding_the_separator_is_refused() -> None:
    with pytest.raises(ValueError, match="cannot pack 'a\\\\nb': values of a text column"):
        pack_text(["x", "a\nb"])


def test_columns_of_different_lengths_are_refused() -> None:
    with pytest.raises(ValueError, match="column lengths differ: seqs 2, user_ids 1"):
        write_columns([1, 2], ["u"], ["s", "s"], ["add", "add"])


@pytest.mark.parametrize(("unpack", "message"), [
    (lambda: unpack_text("a\nb", 3), "holds 2 values, expected 3"),
    (lambda: unpack_longs(b"1234567"), "7 bytes: not 8 bytes each"),
    (lambda: unpack_dictionary({"values": ["a", "b"], "index": b"\x00"}, 2),
     "holds 1 rows, expected 2"),
])
def test_a_column_of_the_wrong_size_is_an_error(unpack: Callable[[], object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        unpack()
