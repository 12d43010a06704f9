"""Content-addressed, immutable object store: ``objects/ab/cdef….safetensors``.

Objects are written to a temp file, fsynced, renamed into place and the directory fsynced, so a
crash leaves at worst an orphan object (reported by ``verify``), never a half-written one under
its final name. Reads check the content hash.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from kledger.ledger.canonical import sha256_hex
from kledger.ledger.errors import IntegrityError, NotFoundError

SUFFIX = ".safetensors"


class ObjectStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, sha: str) -> Path:
        return self.root / sha[:2] / (sha[2:] + SUFFIX)

    def _no_links(self, p: Path) -> None:
        """Objects live in real folders of the ledger: a link on the way is refused, never followed."""
        for q in (self.root, p.parent, p):
            if q.is_symlink():
                raise IntegrityError(f"expected a real file or folder at {q}, found a link (refused: objects are"
                                     " never read or written through links)")

    def exists(self, sha: str) -> bool:
        return self.path(sha).is_file()

    def put(self, data: bytes) -> tuple[str, int]:
        sha = sha256_hex(data)
        final = self.path(sha)
        self._no_links(final)
        if final.is_file():
            return sha, len(data)
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=final.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, 0o444)
            os.replace(tmp, final)
            _fsync_dir(final.parent)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return sha, len(data)

    def get(self, sha: str) -> bytes:
        p = self.path(sha)
        self._no_links(p)
        try:
            data = p.read_bytes()
        except FileNotFoundError:
            raise NotFoundError(f"expected delta object {sha[:16]}… at {p}, found no file (missing object)") from None
        found = sha256_hex(data)
        if found != sha:
            raise IntegrityError(f"object {sha[:16]}… is corrupted: its content hashes to {found[:16]}…")
        return data

    def __iter__(self) -> Iterator[str]:
        if not self.root.is_dir():
            return
        for sub in sorted(self.root.iterdir()):
            if sub.is_dir() and len(sub.name) == 2:
                for f in sorted(sub.iterdir()):
                    if f.name.endswith(SUFFIX) and not f.name.startswith("."):
                        yield sub.name + f.name[: -len(SUFFIX)]

    def temp_files(self) -> list[Path]:
        return sorted(self.root.glob("*/.tmp-*")) if self.root.is_dir() else []


@contextlib.contextmanager
def replacing_dir(target: str | os.PathLike) -> Iterator[Path]:
    """A new temporary sibling folder of ``target`` to fill; when the block ends without an
    error it replaces ``target``, and in any case it is gone afterwards: a crash never leaves a
    half-written folder under ``target``'s name. An existing ``target`` is first renamed aside
    (not removed), so until the new folder is in place the old one is whole; it is removed last."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    old: Path | None = None
    try:
        yield tmp
        if target.exists() or target.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}-old-", dir=target.parent))
            os.replace(target, old / "x")
        try:
            os.replace(tmp, target)
        except BaseException:
            if old is not None:  # put the old folder back
                os.replace(old / "x", target)
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
