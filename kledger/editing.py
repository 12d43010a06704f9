"""What an editor is given and how its output goes back into a model: one place for
``Workspace``, ``rebase`` and ``merging``.

* ``make_editor`` / ``edit_context`` / ``compute_edit``: the registered editor with its recorded
  config, and the context it may see (base fingerprint, cache, and — for editors that declare
  ``needs_history`` — the method state of the earlier active events, ``method_states``);
* ``input_digests`` / ``recompute_config``: the files an editor's config names (``Editor.input_files``),
  recorded by path and sha256 when an edit is made and checked before it is recomputed;
* ``write_exact``: rewrite the tensors some deltas touch exactly as ``materialise`` writes them, so
  an in-process sequence and a fresh process agree bit for bit.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from kledger.editors.base import EditContext, Editor, EditResult, make_config
from kledger.editors.registry import editor_class
from kledger.ledger.canonical import file_sha256
from kledger.ledger.compose import apply_deltas
from kledger.ledger.errors import StateError, UsageError
from kledger.ledger.records import Event, FactRequest
from kledger.ledger.store import Ledger

log = logging.getLogger(__name__)


def make_editor(method: str, config: Mapping[str, Any] | None = None) -> Editor:
    """The registered editor ``method`` with its config built from ``config`` (JSON or strings)."""
    cls = editor_class(method)
    return cls(make_config(cls.config_cls, dict(config or {})))


def input_digests(editor: Editor) -> dict[str, dict[str, str]]:
    """``{field: {"path": absolute path, "sha256": …}}`` for each file ``editor``'s config names
    (``Editor.input_files``); a named file that does not exist is refused before any work."""
    out = {}
    for name in editor.input_files:
        value = getattr(editor.config, name)
        if value is None:
            continue
        p = Path(value)
        if not p.is_file():
            raise UsageError(f"{editor.name}: expected a file at {name}={value!r}, found none")
        out[name] = {"path": str(p.resolve()), "sha256": file_sha256(p)}
    return out


def with_inputs(ensemble: Mapping[str, Any], inputs: Mapping[str, Any]) -> dict[str, Any]:
    """The ensemble record of an event, with its input files (if any) under ``"inputs"``."""
    return dict(ensemble) | ({"inputs": dict(inputs)} if inputs else {})


def recompute_config(ev: Event) -> dict[str, Any]:
    """The config to recompute ``ev`` with: its recorded config (fields it predates at their
    ``Editor.recorded_defaults``), each input file named by the absolute path recorded at edit
    time, after checking that the file still hashes to the recorded sha256 (a changed file would
    silently give another edit)."""
    config = dict(ev.config or {})
    if ev.config is not None:  # a field added with a non-neutral default: what a config from before it meant
        for name, value in editor_class(ev.method).recorded_defaults.items():
            config.setdefault(name, value)
    for name, rec in sorted(((ev.ensemble or {}).get("inputs") or {}).items()):
        p = Path(rec["path"])
        found = file_sha256(p) if p.is_file() else None
        if found != rec["sha256"]:
            what = f"content with sha256 {found[:16]}…" if found else "no file"
            raise StateError(f"event {ev.id} was computed with {name}={rec['path']!r} (sha256 {rec['sha256'][:16]}…),"
                             f" found {what}: restore that file to recompute the event")
        config[name] = rec["path"]
    return config


def edit_context(ledger: Ledger, editor: Editor, states: Sequence[Mapping] = (), *, progress: bool = False,
                 seed: int = 0, stats_corpus: str | None = None) -> EditContext:
    """What an editor may know: the base fingerprint and cache, and (when it declares
    ``needs_history``) ``states``, the method state of the earlier active events."""
    return EditContext(
        fingerprint=ledger.base_model().get("fingerprint", ""), cache_dir=ledger.cache_dir,
        history={"states": [dict(s) for s in states]} if editor.needs_history else {},
        progress=progress, seed=seed, stats_corpus=stats_corpus,
    )


def method_states(ledger: Ledger, method: str, events: Sequence[Event],
                  cache: dict[str, dict] | None = None) -> list[dict]:
    """The ``Delta.state`` of those ``events`` made by ``method`` (an editor's history).

    ``cache``: event id → state, filled as states are read (an event's delta never changes, so a
    long sequence reads each event's state once instead of once per later batch)."""
    out = []
    for e in events:
        if e.method != method:
            continue
        st = cache.get(e.id) if cache is not None else None
        if st is None:
            st = dict(ledger.load_delta(e).state)
            if cache is not None:
                cache[e.id] = st
        out.append(st)
    return out


def compute_edit(ledger: Ledger, model, tok, method: str, config: Mapping[str, Any] | None,
                 requests: Sequence[FactRequest], states: Sequence[Mapping] = (), progress: bool = False,
                 seed: int = 0, stats_corpus: str | None = None, **compute_kwargs: Any) -> list[EditResult]:
    """Run ``method`` with a recorded ``config`` on ``requests``; ``states`` = its history.

    ``stats_corpus``: the key-statistics corpus the original edits used, if not the default
    (it is not recorded in the event; key statistics are cached per corpus)."""
    editor = make_editor(method, config)
    ctx = edit_context(ledger, editor, states, progress=progress, seed=seed, stats_corpus=stats_corpus)
    return editor.compute(model, tok, list(requests), ctx, **compute_kwargs)


def attach_modules(ledger: Ledger, model) -> None:
    """Add to a freshly loaded base model the modules that the ledger's edits write beside it (the
    edit memory, ``Editor.attaches``): one per distinct recorded config of such a method, on any branch."""
    seen: set[tuple[str, str]] = set()
    for ev in ledger.events(newest_first=False):
        if not ev.method or ev.config is None:
            continue
        try:
            cls = editor_class(ev.method)
        except UsageError:
            continue  # a method this install does not know: its deltas are refused where they are read
        key = (ev.method, json.dumps(ev.config, sort_keys=True))
        if cls.attaches and key not in seen:
            seen.add(key)
            make_editor(ev.method, recompute_config(ev)).attach(model)


def write_exact(model, deltas: Sequence[Any], base_value: Callable[[str, torch.Tensor], torch.Tensor | None]) -> bool:
    """Rewrite every tensor ``deltas`` touch as ``materialise`` writes it: the base value
    (``base_value(name, current)``) + the same fixed, chunked fp32 sum, cast once. Used after
    each batch instead of keeping batch-by-batch additions, so the working model is bit for bit
    the model a new process loads: a sequence continued tomorrow (or recomputed by a rebase)
    computes exactly what one uninterrupted run computes. Returns False (and changes nothing)
    when a base value is unavailable (e.g. a ``.bin`` checkpoint)."""
    from kledger.ledger.compose import DEFAULT_CHUNK

    params = dict(model.named_parameters())
    names = sorted({n for d in deltas for n in d.tensors})
    base = {n: base_value(n, params[n]) for n in names}
    if any(v is None for v in base.values()):
        log.debug("exact rewrite skipped: a base tensor is not in safetensors files")
        return False
    with torch.no_grad():
        for n, v in base.items():
            params[n].copy_(v)
    if deltas:
        apply_deltas(model, deltas, chunk=DEFAULT_CHUNK)
    return True
