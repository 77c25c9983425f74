"""Compressed input files, read as streams: gzip, bzip2 and Zstandard.

The compression is recognised by its magic bytes, so a gzip file named `.csv` is read as
gzip rather than refused as "not UTF-8"; the file's format comes from the name without the
compression suffix (`users.csv.gz` is CSV). gzip and bzip2 come with Python; Zstandard is
decoded by pyarrow's codec, already a dependency, so no library is added for it.
"""

from __future__ import annotations

import bz2
import gzip
import io
import os
import zlib
from typing import BinaryIO

# gzip: 1f 8b + deflate; bzip2: "BZh" + block size 1-9; Zstandard frame magic.
_MAGIC = ((b"\x1f\x8b\x08", "gzip"), (b"\x28\xb5\x2f\xfd", "zstd"))
_SUFFIXES = {".gz": "gzip", ".gzip": "gzip", ".bz2": "bz2", ".zst": "zstd", ".zstd": "zstd"}
NAMES = {"gzip": "gzip", "bz2": "bzip2", "zstd": "Zstandard"}
# What a damaged stream raises while it is read (zlib, bz2, pyarrow's codec, truncation).
STREAM_ERRORS: tuple[type[BaseException], ...] = (OSError, EOFError, zlib.error)


def inner_name(path: str) -> str:
    """The name without a compression suffix: the part that names the format."""
    root, suffix = os.path.splitext(path)
    return root if suffix.lower() in _SUFFIXES else path


def sniff(path: str) -> str | None:
    """"gzip", "bz2", "zstd" from the first bytes of the file, or None (not compressed)."""
    with open(path, "rb") as f:
        head = f.read(4)
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            return kind
    if head[:3] == b"BZh" and head[3:4].isdigit() and head[3:4] != b"0":
        return "bz2"
    return None


def open_binary(path: str, kind: str | None) -> BinaryIO:
    """The file's content as a binary stream, decompressed on the fly when `kind` is set."""
    if kind is None:
        return open(path, "rb")
    if kind == "gzip":
        return gzip.open(path, "rb")  # type: ignore[return-value]
    if kind == "bz2":
        return bz2.open(path, "rb")  # type: ignore[return-value]
    import pyarrow as pa

    # BufferedReader gives pyarrow's stream readline(limit) and peek, as open() would.
    return io.BufferedReader(pa.input_stream(path, compression="zstd"))  # type: ignore[arg-type]
