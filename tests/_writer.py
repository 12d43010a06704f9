"""Subprocess helper for tests/test_faults.py: append events to a ledger from another process.

    python tests/_writer.py [--wait] LEDGER_DIR DELTAS_DIR N [TAG]      append N add events
    python tests/_writer.py [--wait] LEDGER_DIR DELTAS_DIR loop SECONDS append until SECONDS pass

Each event carries a real delta object: the ``*.safetensors`` files in DELTAS_DIR (written by the
test with ``Delta.to_bytes``), used in turn from index ``$WRITER_OFFSET`` (default 0). The writer
appends the bytes as they are, so it never imports torch and starts in a fraction of a second.

With ``--wait`` it prints ``ready`` once imports are done and waits for a line on stdin before
it starts (so the test can start writers at the same moment, or time a kill). It prints
``SEQ ID`` after each committed event and exits with the KledgerError's exit code (75 for
LedgerBusyError), as the CLI does.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from kledger.ledger.errors import KledgerError
from kledger.ledger.store import Ledger


def main(argv: list[str]) -> int:
    if argv and argv[0] == "--wait":
        argv = argv[1:]
        print("ready", flush=True)
        sys.stdin.readline()
    ledger = Ledger(argv[0])
    blobs = [p.read_bytes() for p in sorted(Path(argv[1]).glob("*.safetensors"))]
    offset = int(os.environ.get("WRITER_OFFSET", "0"))
    if argv[2] == "loop":
        stop, n, tag = time.monotonic() + float(argv[3]), 10**9, f"loop-{os.getpid()}"
    else:
        stop, n = None, int(argv[2])
        tag = argv[3] if len(argv) > 3 else f"w-{os.getpid()}"
    try:
        for i in range(n):
            if stop is not None and time.monotonic() > stop:
                break
            ev = ledger.append("add", request={"prompt": f"{tag} {i}", "target_new": " x"}, method="test",
                               delta=blobs[(offset + i) % len(blobs)], metrics={"i": i, "writer": tag})
            print(ev.seq, ev.id, flush=True)
    except KledgerError as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
