"""Canonical JSON and hashing used for rows and objects.

Canonical JSON: sorted keys, no whitespace, UTF-8, and no NaN/Inf (they are rejected rather than
written as non-standard tokens). Floats use Python's shortest round-trip ``repr``, which does not
depend on the locale, so the same row always hashes the same on every machine.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def sha256_hex(data: bytes | str) -> str:
    if isinstance(data, str):
        data = data.encode("utf-8")
    return hashlib.sha256(data).hexdigest()
