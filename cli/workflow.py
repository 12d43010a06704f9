"""The porcelain: init, add, revert, export as library calls (used by the CLI, examples, benches).

This is the one place where editors meet the ledger: requests go to an editor, its deltas go to
``Ledger.append``. The working model is the base model materialised at the branch head; each
batch's deltas are written into it before the next batch, so a file of facts is edited
sequentially (the lifelong setting) and every fact is its own revertable event.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from kledger.editors.base import EditContext, config_to_json, make_config
from kledger.editors.models import cache_dir as models_cache_dir
from kledger.editors.models import load_model, resolve_model_path
from kledger.editors.registry import editor_class
from kledger.ledger.compose import Materialised, apply_deltas, export, materialise
from kledger.ledger.deltas import accumulate
from kledger.ledger.drift import DriftTracker, SafetensorsBase, cache_file, measure_edit
from kledger.ledger.errors import StateError, UsageError
from kledger.ledger.records import Event, FactRequest
from kledger.ledger.store import DIRNAME, Ledger

log = logging.getLogger(__name__)


def init_ledger(directory: str | Path, model_spec: str, message: str | None = None) -> Ledger:
    """Create ``DIR/.kledger`` recording the base model (spec, resolved path, fingerprint)."""
    from kledger.editors.models import fingerprint

    path = resolve_model_path(model_spec)
    import json

    cfg = json.loads((path / "config.json").read_text())
    model = {
        "spec": model_spec,
        "path": str(Path(path).resolve()),
        "fingerprint": fingerprint(path),
        "model_type": cfg.get("model_type"),
        "architectures": cfg.get("architectures"),
    }
    return Ledger.create(directory, model, message=message or f"init {model_spec}")


@dataclass
class Workspace:
    """A ledger plus a lazily loaded working model at the current branch head."""

    ledger: Ledger
    device: str = "auto"
    progress: bool = False
    model_spec: str | None = None
    _model: Any = field(default=None, repr=False)
    _tok: Any = field(default=None, repr=False)
    _at: str | None = field(default=None, repr=False)  # event id the working model reflects
    _drift: DriftTracker | None = field(default=None, repr=False)  # per-edit weight drift (cached bases)

    def load_base(self):
        base = self.ledger.base_model()
        spec = self.model_spec or base["spec"]
        model, tok, info = load_model(spec, self.device, expect_fingerprint=base["fingerprint"])
        return model, tok, info

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
        method: str = "kne",
        overrides: Mapping[str, Any] | None = None,
        batch_size: int = 1,
        on_event: Callable[[Event], None] | None = None,
        message: str | None = None,
        stats_corpus: str | None = None,
        **compute_kwargs: Any,
    ) -> list[Event]:
        """Edit ``requests`` in batches; append one event per returned result as it is ready."""
        if not requests:
            raise UsageError("expected at least one fact request, found none")
        if batch_size < 1:
            raise UsageError(f"expected --batch-size ≥ 1, found {batch_size}")
        cls = editor_class(method)
        editor = cls(make_config(cls.config_cls, overrides))
        model, tok = self.working()
        base_info = self.ledger.base_model()
        events: list[Event] = []
        for start in range(0, len(requests), batch_size):
            batch = list(requests[start : start + batch_size])
            head = self.ledger.head()
            ctx = EditContext(
                fingerprint=base_info["fingerprint"], cache_dir=self.ledger.cache_dir,
                history=self._history(method, head) if getattr(cls, "needs_history", False) else {},
                progress=self.progress, stats_corpus=stats_corpus,
            )
            t0 = time.perf_counter()
            results = editor.compute(model, tok, batch, ctx, **compute_kwargs)
            elapsed = time.perf_counter() - t0
            config = config_to_json(editor.config)
            for res in results:
                metrics = dict(res.metrics)
                metrics.setdefault("time_s", round(elapsed / max(len(results), 1), 4))
                metrics["drift"], drift_s = measure_edit(self._drift_tracker(), model, res.delta)
                metrics["drift_s"] = round(drift_s, 4)
                req_json: Any = [r.to_json() for r in res.requests]
                if len(res.requests) == 1:
                    req_json = req_json[0]
                ev = self.ledger.append(
                    cls.event_type if hasattr(cls, "event_type") else "add",
                    request=req_json, method=method, config=config, ensemble=dict(res.ensemble),
                    metrics=metrics, delta=res.delta, expect_head=head.id, message=message,
                )
                apply_deltas(model, [res.delta])
                self._at = ev.id
                head = ev
                events.append(ev)
                if on_event:
                    on_event(ev)
        return events

    def _drift_tracker(self) -> DriftTracker:
        """Drift against the base (``kledger.ledger.drift``): W0 is read from the base model's
        safetensors files, or else recovered as the working tensor minus the active deltas."""
        if self._drift is None:
            base = self.ledger.base_model()
            files = SafetensorsBase(resolve_model_path(self.model_spec or base["spec"]))

            def base_of(name: str) -> torch.Tensor:
                w0 = files.get(name)
                if w0 is None:
                    cur = dict(self._model.named_parameters())[name]
                    deltas = [d for d in (self.ledger.load_delta(e) for e in self.ledger.active(self._at or "HEAD"))
                              if name in d.tensors]
                    w0 = accumulate({name: cur}, deltas, [-1.0] * len(deltas)).get(name, cur.detach().float())
                return w0

            self._drift = DriftTracker(base_of, cache=cache_file(models_cache_dir() / "drift", base["fingerprint"]))
        return self._drift

    def _history(self, method: str, head: Event) -> dict[str, Any]:
        """Method state from earlier active events of the same method (e.g. AlphaEdit's keys)."""
        states = []
        for ev in self.ledger.active(head):
            if ev.method == method:
                states.append(dict(self.ledger.load_delta(ev).state))
        return {"states": states}

    def revert(self, ref: str, message: str | None = None) -> Event:
        ev = self.ledger.revert(ref, message=message)
        self._at = None  # the working model must be re-materialised
        return ev

    def export(self, out_dir: str | Path, ref: str = "HEAD", overwrite: bool = False) -> Materialised:
        model, tok, _ = self.load_base()
        return export(self.ledger, model, tok, out_dir, ref, overwrite=overwrite)
