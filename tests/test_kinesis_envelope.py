"""The Kinesis message envelope and the virtual partitions' hash-key ranges."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from topics.backends.kinesis.envelope import (
    HASH_SPACE,
    EnvelopeError,
    decode,
    encode,
    hash_key_of,
    partition_of_hash_key,
    range_of,
)


@given(st.integers(0, 1 << 20), st.one_of(st.none(), st.binary(max_size=300)), st.binary())
def test_envelope_round_trips(partition: int, key: bytes | None, value: bytes) -> None:
    got = decode(encode(partition, key, value))
    assert (got.partition, got.key, got.value) == (partition, key, value)


@given(st.binary(max_size=40))
def test_foreign_or_cut_data_is_refused_not_misread(data: bytes) -> None:
    try:
        got = decode(data)
    except EnvelopeError:
        return
    assert encode(got.partition, got.key, got.value) == data


@given(st.integers(1, 5000), st.data())
def test_ranges_tile_the_hash_space_and_invert(partitions: int, data: st.DataObject) -> None:
    v = data.draw(st.integers(0, partitions - 1))
    start, end = range_of(v, partitions)
    assert start <= hash_key_of(v, partitions) <= end
    for h in (start, end, hash_key_of(v, partitions)):
        assert partition_of_hash_key(h, partitions) == v
    if v + 1 < partitions:
        assert range_of(v + 1, partitions)[0] == end + 1
    assert range_of(0, partitions)[0] == 0
    assert range_of(partitions - 1, partitions)[1] == HASH_SPACE - 1


def test_out_of_range_partition_is_refused() -> None:
    with pytest.raises(ValueError, match="out of range"):
        range_of(4, 4)
