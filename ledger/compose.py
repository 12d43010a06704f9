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
                workers: int | None = None) -> Materialised:
    """Turn a freshly loaded base model into the model at ``ref``. The model must be the base.

    Delta objects are read and decoded in a thread pool (``Ledger.load_deltas``) and summed per
    tensor in fp32, ``chunk`` events at a time, so memory stays bounded by one chunk of deltas
    plus the fp32 sums of the touched tensors; with at most ``chunk`` active edits this is one
    ``accumulate`` call over the whole active set, exactly as before. The sums are written into
    the parameters in place, cast once.
    """
    t0 = time.perf_counter()
    version = ref if isinstance(ref, Event) else ledger.resolve(ref)
    active = ledger.active(version)
    params = dict(model.named_parameters())
    sums: dict[str, torch.Tensor] = {}
    for i in range(0, len(active), max(1, chunk)):
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
