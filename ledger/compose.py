"""The compositor: materialise a ledger version onto a base model, and export it.

``materialise`` writes base + Σ active deltas into the given *base* model's parameters, summed
per tensor in fp32 on the model's device and cast once (see ``deltas.accumulate``). Only the
tensors that active edits touch are read and written. Because the sum is always recomputed from
the base over the active set, ``add A, add B, revert A`` gives exactly base + Δ_B, bit for bit.

The compositor reads the ledger and the deltas; it never computes edits.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn as nn

from kledger.ledger.deltas import Delta, accumulate
from kledger.ledger.errors import StateError, UsageError
from kledger.ledger.records import Event
from kledger.ledger.store import Ledger

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Materialised:
    version: Event  # the event the model now reflects
    active: tuple[Event, ...]
    tensors: tuple[str, ...]  # parameter names written
    seconds: float

    def provenance(self, ledger: Ledger) -> dict:
        return {
            "kledger_version": __import__("kledger").__version__,
            "ledger": str(ledger.root.resolve()),
            "version": self.version.id,
            "version_hash": self.version.hash,
            "ledger_head_hash": ledger.events(limit=1)[0].hash,
            "base_model": ledger.base_model(),
            "active_events": [e.id for e in self.active],
            "edited_tensors": list(self.tensors),
        }


def apply_deltas(model: nn.Module, deltas: Iterable[Delta], signs: Iterable[float] | None = None) -> list[str]:
    """Write base + Σ deltas into the model's parameters (fp32 accumulation, one cast)."""
    params = dict(model.named_parameters())
    new = accumulate(params, deltas, signs)
    with torch.no_grad():
        for name, value in new.items():
            params[name].copy_(value.to(params[name].dtype))
    return sorted(new)


def materialise(ledger: Ledger, model: nn.Module, ref: str | Event = "HEAD",
                progress: Callable[[int], None] | None = None, *, chunk: int = 4096,
                workers: int | None = None, snapshots: bool = True) -> Materialised:
    """Turn a freshly loaded base model into the model at ``ref``. The model must be the base.

    Delta objects are read and decoded in a thread pool (``Ledger.load_deltas``) and summed per
    tensor in fp32, ``chunk`` events at a time, so memory stays bounded by one chunk of deltas
    plus the fp32 sums of the touched tensors; with at most ``chunk`` active edits this is one
    ``accumulate`` call over the whole active set, exactly as before. The sums are written into
    the parameters in place, cast once.

    Snapshots (optional, made only by ``snapshot``): when a snapshot's active list is a prefix
    of this version's, its dense fp32 Σ replaces reading those deltas, so the time grows with
    the edits since the snapshot. The result then equals the plain sum up to fp32 summation
    order (not bit for bit); ``snapshots=False`` ignores them.
    """
    t0 = time.perf_counter()
    version = ref if isinstance(ref, Event) else ledger.resolve(ref)
    active = ledger.active(version)
    params = dict(model.named_parameters())
    sums: dict[str, torch.Tensor] = {}
    start = 0
    snap = find_snapshot(ledger, [e.id for e in active]) if snapshots else None
    if snap is not None:  # base + Σ(prefix) from the snapshot, then the rest as usual
        start, dense = snap
        for name, t in dense.items():
            sums[name] = params[name].detach().to(torch.float32) + t.to(params[name].device)
        if progress:
            progress(start)
    for i in range(start, len(active), max(1, chunk)):
        part = active[i : i + max(1, chunk)]
        deltas = ledger.load_deltas(part, workers)
        sums.update(accumulate({**params, **sums}, deltas))
        del deltas
        if progress:
            progress(len(part))
    with torch.no_grad():
        for name, value in sums.items():
            params[name].copy_(value.to(params[name].dtype))
    return Materialised(version, tuple(active), tuple(sorted(sums)), time.perf_counter() - t0)


# --- optional dense snapshots (derived data under cache/snapshots, rebuildable) ----------
def _ids_key(ids: Iterable[str]) -> str:
    import hashlib

    return hashlib.sha256("\n".join(ids).encode()).hexdigest()


def snapshot(ledger: Ledger, ref: str | Event = "HEAD", workers: int | None = None) -> Path:
    """Store Σ of the active deltas at ``ref`` (dense fp32 per touched tensor) as a snapshot that
    ``materialise`` uses for every later version whose active list starts with the same events."""
    from safetensors.torch import save_file

    version = ref if isinstance(ref, Event) else ledger.resolve(ref)
    ids = [e.id for e in ledger.active(version)]
    events = ledger.events_by_ids(ids)
    dense: dict[str, torch.Tensor] = {}
    for i in range(0, len(events), 4096):
        deltas = ledger.load_deltas(events[i : i + 4096], workers)
        zeros = {}
        for d in deltas:
            for name, td in d.tensors.items():
                if name not in dense and name not in zeros:
                    zeros[name] = torch.zeros(td.shape, dtype=torch.float32)
        dense.update(accumulate({**zeros, **dense}, deltas))
    root = ledger.cache_dir / "snapshots"
    root.mkdir(parents=True, exist_ok=True)
    key = _ids_key(ids)
    path = root / f"{len(ids):08d}-{key[:16]}.safetensors"
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in dense.items()}, str(tmp),
              metadata={"n": str(len(ids)), "ids_sha256": key, "version": version.id})
    import hashlib

    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    path.with_suffix(".sha256").write_text(digest + "\n")
    os.replace(tmp, path)
    return path


def find_snapshot(ledger: Ledger, ids: list[str]) -> tuple[int, dict[str, torch.Tensor]] | None:
    """The longest snapshot whose active list is a prefix of ``ids``: (its length, Σ tensors)."""
    root = ledger.cache_dir / "snapshots"
    if not root.is_dir():
        return None
    import hashlib

    from safetensors import safe_open
    from safetensors.torch import load as st_load

    for path in sorted(root.glob("*.safetensors"), reverse=True):
        try:
            n = int(path.name.split("-")[0])
        except ValueError:
            continue
        if n == 0 or n > len(ids):
            continue
        try:
            with safe_open(str(path), "pt") as fh:
                key = (fh.metadata() or {}).get("ids_sha256")
            if key != _ids_key(ids[:n]):
                continue
            data = path.read_bytes()  # a cache, but still checked: a damaged file is never used
            if hashlib.sha256(data).hexdigest() != path.with_suffix(".sha256").read_text().strip():
                raise ValueError("content hash mismatch")
            return n, st_load(data)
        except Exception as exc:  # a damaged cache file is skipped, never trusted
            log.warning("ignoring snapshot %s: %s", path, exc)
    return None


def export(ledger: Ledger, model: nn.Module, tok, out_dir: str | os.PathLike, ref: str | Event = "HEAD",
           overwrite: bool = False) -> Materialised:
    """Write a ``from_pretrained``-loadable folder of the model at ``ref`` plus ``kledger.json``.

    ``model`` must be the base model (it is modified in place). The folder is written to a
    temporary sibling and renamed, so a crash never leaves a half-written export under OUT.
    """
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UsageError(f"expected an empty or new folder for the export, found {out} not empty (use --force)")
    m = materialise(ledger, model, ref)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        model.save_pretrained(str(tmp))
        if tok is not None:
            tok.save_pretrained(str(tmp))
        (tmp / "kledger.json").write_text(json.dumps(m.provenance(ledger), indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return m
