"""Canonical JSON and hashing used for rows and objects.

Canonical JSON: sorted keys, no whitespace, UTF-8, and no NaN/Inf (they are rejected rather than
written as non-standard tokens). Floats use Python's shortest round-trip ``repr``, which does not
depend on the locale, so the same row always hashes the same on every machine.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_hex(data: bytes | str) -> str:
    if isinstance(data, str):
        data = data.encode("utf-8")
    return hashlib.sha256(data).hexdigest()
