"""The orchestrator: init, add, forget, learn, revert, export as library calls (CLI, examples, benches).

This is the one place where editors meet the ledger: requests go to an editor, its deltas go to
``Ledger.append`` (``kledger.rebase`` and ``kledger.merging`` recompute edits through
``compute_edit`` here). The working model is the base model materialised at the branch head; each
batch's deltas are written into it before the next batch, so a file of facts is edited
sequentially (the lifelong setting) and every fact is its own revertable event.
``forget``/``learn`` (UNLEARN/LEARN) take a whole set of facts (plus a retain set) and append
one event for it; they share ``_edit`` with ``add``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from kledger.audit.drift import DriftTracker, SafetensorsBase, cache_file, measure_edit
from kledger.editors.base import config_to_json
from kledger.editors.gate import is_memory_tensor
from kledger.editors.models import cache_dir as models_cache_dir
from kledger.editors.models import DTYPES, fingerprint, load_model, resolve_dtype, resolve_model_path, tokenizer_fingerprint
from kledger.editors.registry import DEFAULT_METHOD, editor_class
from kledger.ledger.compose import Materialised, apply_deltas, check_export_target, export, materialise
from kledger.ledger.deltas import Delta, accumulate
from kledger.ledger.errors import AuditThresholdError, StateError, UsageError
from kledger.ledger.records import Event, FactRequest
from kledger.ledger.store import Ledger
from kledger import memory_export
from kledger.editing import attach_modules, edit_context, input_digests, make_editor, method_states, with_inputs, write_exact

log = logging.getLogger(__name__)


def init_ledger(directory: str | Path, model_spec: str, message: str | None = None, dtype: str = "auto") -> Ledger:
    """Create ``DIR/.kledger`` recording the base model (spec, resolved path, fingerprint) and the
    precision every later command loads it in (``dtype``: float32, bfloat16, float16, or ``auto``,
    the checkpoint's own dtype from its config.json, float32 when it names none)."""
    path = resolve_model_path(model_spec)
    resolved = resolve_dtype(dtype, path)
    if resolved == "float16":
        load_model(model_spec, "auto", dtype=resolved)  # refused now if half precision cannot run here
    cfg = json.loads((path / "config.json").read_text())
    model = {
        "spec": model_spec,
        "path": str(Path(path).resolve()),
        "fingerprint": fingerprint(path),
        "tokenizer_fingerprint": tokenizer_fingerprint(path),
        "model_type": cfg.get("model_type"),
        "architectures": cfg.get("architectures"),
        "dtype": resolved,
    }
    return Ledger.create(directory, model, message=message or f"init {model_spec}")


def active_duplicates(ledger: Ledger, requests: Sequence[FactRequest]) -> set[int]:
    """Indices of ``requests`` whose (prompt, target) is already an active edit at HEAD (a batch
    re-run after a stop part-way would otherwise record its first facts twice)."""
    have = set()
    for ev in ledger.active("HEAD"):
        reqs = ev.request if isinstance(ev.request, list) else [ev.request]
        for r in reqs:
            if isinstance(r, Mapping):
                have.add((r.get("prompt"), r.get("target_new")))
    return {i for i, r in enumerate(requests) if (r.prompt, r.target_new) in have}


def check_lengths(model, tok, requests: Sequence[FactRequest]) -> None:
    """Refuse (usage error, before any work) a fact longer than the model's context."""
    cfg = getattr(model, "config", None)
    limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    if not limit:
        return
    for r in requests:
        if len(r.prompt) + len(r.target_new) < limit:  # a token is at least one character
            continue
        n = len(tok(r.prompt + r.target_new, add_special_tokens=False)["input_ids"])
        if n > limit:
            raise UsageError(f"expected a prompt and target within the model's context of {limit} tokens,"
                             f" found {n} tokens (prompt starting {r.prompt[:40]!r})")


def default_guard(ledger, cls, n_facts: int) -> bool:
    """``--guard`` when not given: on for a sequence (several facts) of a method that declares
    ``guard_sequences`` (KNE), if the ledger has a probe set to guard with; otherwise off."""
    if not (cls.guard_sequences and n_facts > 1):
        return False
    from kledger.audit.probes import latest_probes_event

    if latest_probes_event(ledger) is None:
        log.warning("%s sequences are guarded by default, but this ledger has no probe set (`kledger init"
                    " --probes default`); editing unguarded", cls.name)
        return False
    return True



def _attaches(method: str) -> bool:
    try:
        return bool(editor_class(method).attaches)
    except UsageError:
        return False


@dataclass
class Workspace:
    """A ledger plus a lazily loaded working model at the current branch head."""

    ledger: Ledger
    device: str = "auto"
    device_map: Any = None  # None (one device), "auto"/"balanced", a dict or a JSON file: module → device
    progress: bool = False
    model_spec: str | None = None
    _model: Any = field(default=None, repr=False)
    _tok: Any = field(default=None, repr=False)
    _at: str | None = field(default=None, repr=False)  # event id the working model reflects
    _drift: DriftTracker | None = field(default=None, repr=False)  # per-edit weight drift (cached bases)
    pulse: bool = True  # per-edit function-level check (once per batch) when the ledger has a probe set
    guard: bool = False  # refuse (exit 3, nothing appended) an edit whose pulse crosses an audit threshold
    _probes: Any = field(default=None, repr=False)
    _states: dict = field(default_factory=dict, repr=False)  # event id → method state (history cache)
    exact: bool = True  # after each batch the working model is rewritten as materialise(HEAD) would write it
    _deltas: dict = field(default_factory=dict, repr=False)  # event id → Delta without state (the exact rewrite)
    _base_vals: dict = field(default_factory=dict, repr=False)  # tensor name → base value (exact rewrite)
    _files: Any = field(default=None, repr=False)  # the base model's safetensors files
    _thresholds: dict = field(default_factory=dict, repr=False)

    def load_base(self):
        """The ledger's base model, freshly loaded: (model, tok, ModelInfo). ``model_spec``: a
        copy of it to load instead (refused unless its fingerprint is the recorded one)."""
        base = self.ledger.base_model()
        spec = self.model_spec or base["spec"]
        if self.model_spec is None and spec == base.get("path") and not os.path.isdir(spec):
            raise UsageError(f"expected the base model folder {spec!r} recorded at init, found it missing;"
                             " pass --model with a copy of it")
        # ledgers made before the tokenizer was recorded have no tokenizer_fingerprint: not checked
        loaded = load_model(spec, self.device, expect_fingerprint=base["fingerprint"],
                            expect_tokenizer=base.get("tokenizer_fingerprint"), dtype=self.dtype,
                            device_map=self.device_map)
        attach_modules(self.ledger, loaded[0])  # the edit memory, where the ledger's edits write one
        return loaded

    @property
    def dtype(self) -> str:
        """The precision the base model is loaded in: recorded at init (older ledgers: float32)."""
        return self.ledger.base_model().get("dtype") or "float32"

    def model_with(self, ids: Sequence[str]):
        """A fresh base model with the deltas of events ``ids`` applied: (model, tok, events)."""
        model, tok, _ = self.load_base()
        events = self.ledger.events_by_ids(list(ids))
        if events:
            apply_deltas(model, [self.ledger.load_delta(e) for e in events])
        return model, tok, events

    def model_at(self, ref: str | Event = "HEAD"):
        """A fresh base model materialised at ``ref`` (the workspace's own copy is kept)."""
        model, tok, _ = self.load_base()
        m = materialise(self.ledger, model, ref)
        return model, tok, m

    def working(self):
        head = self.ledger.head()
        if self._model is None or self._at != head.id:
            self._model, self._tok, m = self.model_at(head)
            self._at = head.id
        return self._model, self._tok

    # --- edits ---------------------------------------------------------------------------
    def add(
        self,
        requests: Sequence[FactRequest],
        method: str = DEFAULT_METHOD,
        overrides: Mapping[str, Any] | None = None,
        batch_size: int = 1,
        on_event: Callable[[Event], None] | None = None,
        message: str | None = None,
        stats_corpus: str | None = None,
        **compute_kwargs: Any,
    ) -> list[Event]:
        """Edit ``requests`` in batches; append one event per returned result once its batch is done."""
        if not requests:
            raise UsageError("expected at least one fact request, found none")
        if batch_size < 1:
            raise UsageError(f"expected --batch-size ≥ 1, found {batch_size}")
        batches = [list(requests[i : i + batch_size]) for i in range(0, len(requests), batch_size)]
        return self._edit(method, batches, overrides, on_event=on_event, message=message,
                          stats_corpus=stats_corpus, **compute_kwargs)

    def forget(self, requests: Sequence[FactRequest], retain: Sequence[FactRequest] = (),
               overrides: Mapping[str, Any] | None = None, on_event: Callable[[Event], None] | None = None,
               message: str | None = None, method: str = "forget") -> Event:
        """UNLEARN ``requests`` (keeping what ``retain`` shares): one ``forget`` event for the set."""
        return self._subspace("forget", requests, retain, overrides, on_event, message, method)

    def learn(self, requests: Sequence[FactRequest], retain: Sequence[FactRequest] = (),
              overrides: Mapping[str, Any] | None = None, on_event: Callable[[Event], None] | None = None,
              message: str | None = None, method: str = "learn") -> Event:
        """LEARN ``requests`` (orthogonally to ``retain``): one ``learn`` event for the set."""
        return self._subspace("learn", requests, retain, overrides, on_event, message, method)

    def _subspace(self, mode: str, requests, retain, overrides, on_event, message, method) -> Event:
        if editor_class(method).event_type != mode:
            raise UsageError(f"expected a method that records {mode!r} events, found {method!r}")
        requests = list(requests)
        if not requests:
            raise UsageError(f"expected at least one fact to {mode}, found none")
        events = self._edit(method, [requests], overrides, on_event=on_event, message=message,
                            retain=list(retain), list_requests=True)
        if len(events) != 1:  # pragma: no cover - the subspace editors return one result per call
            raise StateError(f"expected one {mode} event, found {len(events)}")
        return events[0]

    def _edit(
        self,
        method: str,
        batches: Sequence[Sequence[FactRequest]],
        overrides: Mapping[str, Any] | None = None,
        *,
        on_event: Callable[[Event], None] | None = None,
        message: str | None = None,
        stats_corpus: str | None = None,
        list_requests: bool = False,
        **compute_kwargs: Any,
    ) -> list[Event]:
        """Run ``method`` on each batch in turn against the working model: write the batch's deltas
        into it, take the pulse once (if the ledger has probes), refuse the batch if ``guard`` is
        on and the pulse crossed a threshold (nothing appended, the working model is rebuilt),
        else append one event per result (type ``editor.event_type``), the last one
        carrying the pulse. ``list_requests``: record the requests as a list even when there is
        one (a forget/learn *set*); otherwise a single request is recorded as an object.
        """
        editor = make_editor(method, overrides)
        inputs = input_digests(editor)  # the files its config names, checked and hashed before any work
        if self.guard:
            from kledger.audit.probes import latest_probes_event

            if not self.pulse or latest_probes_event(self.ledger) is None:
                raise UsageError("--guard: expected a probe set in the ledger (`kledger init --probes default`"
                                 " or `kledger audit --probes-only`), found none")
        model, tok = self.working()
        check_lengths(model, tok, [r for b in batches for r in b])
        events: list[Event] = []
        for batch in batches:
            head = self.ledger.head()
            states = (method_states(self.ledger, method, self.ledger.active(head), self._states)
                      if editor.needs_history else ())
            ctx = edit_context(self.ledger, editor, states, progress=self.progress, stats_corpus=stats_corpus)
            t0 = time.perf_counter()
            results = editor.compute(model, tok, list(batch), ctx, **compute_kwargs)
            elapsed = time.perf_counter() - t0
            config = config_to_json(editor.config)
            prepared = []
            try:
                for res in results:
                    metrics = dict(res.metrics)
                    metrics.setdefault("time_s", round(elapsed / max(len(results), 1), 4))
                    metrics["drift"], drift_s = measure_edit(self._drift_tracker(), model, res.delta)
                    metrics["drift_s"] = round(drift_s, 4)
                    # the delta goes into the working model first, so the pulse sees HEAD + the batch
                    apply_deltas(model, [res.delta])
                    self._at = None  # the working model holds unrecorded deltas until appended
                    prepared.append((res, metrics))
                if prepared:  # once per editor call, on HEAD + every delta of the batch
                    self._pulse(model, tok, prepared[-1][1])
                    self._guard(prepared[-1][1])
                for res, metrics in prepared:
                    req_json: Any = [r.to_json() for r in res.requests]
                    if len(res.requests) == 1 and not list_requests:
                        req_json = req_json[0]
                    ev = self.ledger.append(
                        editor.event_type, request=req_json, method=method, config=config, ensemble=with_inputs(res.ensemble, inputs),
                        metrics=metrics, delta=res.delta, expect_head=head.id, message=message,
                    )
                    head = ev
                    events.append(ev)
                    if on_event:
                        on_event(ev)
            except BaseException:
                self._at = None  # the working model may hold unrecorded deltas: re-materialise
                raise
            if self.exact:
                self._resync(model, head)
            self._at = head.id
        return events

    def _resync(self, model, head: Event) -> None:
        """Rewrite the working model as ``materialise(HEAD)`` writes it (``write_exact``)."""
        deltas = []
        for ev in self.ledger.active(head):
            d = self._deltas.get(ev.id)
            if d is None:  # one read a delta: its tensors kept here, its method state in the history cache
                full = self.ledger.load_delta(ev)
                d = self._deltas[ev.id] = Delta(full.tensors)
                if full.state:
                    self._states.setdefault(ev.id, dict(full.state))
            deltas.append(d)
        write_exact(model, deltas, self.base_value)

    def base_value(self, name: str, current: torch.Tensor) -> torch.Tensor | None:
        """The base model's value of tensor ``name``, read once from its weight files."""
        v = self._base_vals.get(name)
        if v is None:
            if self._files is None:
                info = self.ledger.base_model()
                self._files = SafetensorsBase(resolve_model_path(self.model_spec or info["spec"]))
            v = self._files.get(name)
            if v is None and is_memory_tensor(name):  # beside the model: zero in the base
                v = torch.zeros_like(current)
            if v is not None:  # cast as from_pretrained casts the checkpoint into the model's dtype
                v = self._base_vals[name] = v.to(current.dtype)
        return v

    def _guard(self, metrics: Mapping[str, Any]) -> None:
        """With ``guard`` on, refuse (exit 3, nothing appended) a batch whose pulse crossed a threshold."""
        crossed = (metrics.get("pulse") or {}).get("crossed")
        if not (self.guard and crossed):
            return
        pl = metrics["pulse"]
        text = ", ".join(f"{k} {pl[k]}" for k in crossed)
        raise AuditThresholdError(
            f"expected the edit to keep the per-edit pulse within the audit thresholds, found {text}"
            f" ({pl['prompts']} prompts / {pl['facts']} facts); nothing was appended (--no-guard appends it anyway)"
        )

    def _pulse(self, model, tok, metrics: dict[str, Any]) -> None:
        """Per-edit function-level check (``kledger.audit.figures.pulse``), run after the last delta
        of each editor call (every edit when the batch size is 1), once the ledger holds a probe set (recorded by the first ``kledger audit``, or ``kledger audit --probes-only``):
        KL to the base and retention drop on a fixed subset of the probes, recorded in the
        event's metrics as ``pulse``; crossing an audit threshold logs a collapse warning."""
        if not self.pulse:
            return
        from kledger.audit.figures import PULSE_THRESHOLDS, pulse
        from kledger.audit.probes import latest_probes_event, load_probes
        from kledger.audit.thresholds import crossed, stored_thresholds

        if self._probes is None:
            pev = latest_probes_event(self.ledger)
            if pev is None:
                return
            self._probes = load_probes(self.ledger, pev)
            self._thresholds = stored_thresholds(self.ledger)[0]
        figures = pulse(model, tok, self._probes)
        bounds = {k: self._thresholds.get(k) for k in PULSE_THRESHOLDS}
        figures["crossed"] = crossed(figures, bounds)
        metrics["pulse"] = figures
        if figures["crossed"]:
            text = ", ".join(f"{k} {figures[k]} > {bounds[k]}" for k in figures["crossed"])
            log.warning("collapse warning after this edit: %s (per-edit pulse on %d prompts / %d facts);"
                        " run `kledger audit --blame`", text, figures["prompts"], figures["facts"])

    def _drift_tracker(self) -> DriftTracker:
        """Drift against the base (``kledger.audit.drift``): W0 is read from the base model's
        safetensors files, or else recovered as the working tensor minus the active deltas."""
        if self._drift is None:
            base = self.ledger.base_model()
            files = SafetensorsBase(resolve_model_path(self.model_spec or base["spec"]))

            def base_of(name: str) -> torch.Tensor:
                w0 = files.get(name)
                if w0 is None and is_memory_tensor(name):
                    return torch.zeros_like(dict(self._model.named_parameters())[name])
                if w0 is not None:  # W₀ as the model holds it (rounded into a half-precision base)
                    w0 = w0.to(DTYPES[self.dtype])
                if w0 is None:
                    cur = dict(self._model.named_parameters())[name]
                    deltas = [d for d in (self.ledger.load_delta(e) for e in self.ledger.active(self._at or "HEAD"))
                              if name in d.tensors]
                    w0 = accumulate({name: cur}, deltas, [-1.0] * len(deltas)).get(name, cur.detach().float())
                return w0

            self._drift = DriftTracker(base_of, cache=cache_file(models_cache_dir() / "drift", base["fingerprint"]))
        return self._drift

    def revert(self, ref: str, message: str | None = None) -> Event:
        ev = self.ledger.revert(ref, message=message)
        self._at = None  # the working model must be re-materialised
        return ev

    def export(self, out_dir: str | Path, ref: str = "HEAD", overwrite: bool = False) -> Materialised:
        check_export_target(self.ledger, out_dir, overwrite)  # refused before the model is loaded
        version = self.ledger.resolve(ref)
        model, tok, _ = self.load_base()
        from kledger.exporting import model_card

        # edits in the token-gated memory: a folder with remote code (kledger/memory_export.py)
        gated = any(_attaches(e.method) for e in self.ledger.active(version) if e.method)
        note = [memory_export.CARD_NOTE] if gated else []
        card = model_card(self.ledger, version, library_name="transformers", extra=note)
        extra = memory_export.prepare(model, gated)
        return export(self.ledger, model, tok, out_dir, version, overwrite=overwrite,
                      extra_files={"README.md": card, **extra})
