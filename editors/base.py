"""The editor protocol, its result type, and config handling shared by every method.

An editor turns fact requests into ``Delta``s. It never leaves the model it was given changed
(weights are restored exactly, hooks removed) and never touches the ledger store: whatever state
it needs from earlier edits arrives in ``EditContext.history`` and whatever it wants remembered
goes into ``Delta.state`` tensors or ``EditResult.metrics``/``ensemble`` JSON.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import types
import typing
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterable, Iterator, Mapping, Sequence

import torch
import torch.nn as nn

from kledger.ledger.deltas import Delta, accumulate
from kledger.ledger.errors import UsageError
from kledger.ledger.records import FactRequest


@dataclass(frozen=True)
class EditResult:
    """One ledger event's worth of edit: the requests it covers and their delta."""

    requests: tuple[FactRequest, ...]
    delta: Delta
    ensemble: Mapping[str, Any]
    metrics: Mapping[str, Any]


@dataclass(frozen=True)
class EditContext:
    """What an editor may know beyond the model: caches, earlier method state, progress."""

    fingerprint: str = ""
    cache_dir: Path | None = None  # content-addressed caches (e.g. key statistics)
    history: Mapping[str, Any] = field(default_factory=dict)  # method state from earlier events
    progress: bool = False
    seed: int = 0
    stats_corpus: str | None = None  # a user text/JSONL file for covariance statistics


class Editor(ABC):
    """Base class. Subclasses set ``name``, ``summary``, ``paper``, ``config_cls``, and override
    the three declarations the orchestrator (``kledger.workspace``) reads where their default is
    not theirs: ``event_type``, ``needs_history`` and ``batch_solve``."""

    name: ClassVar[str]
    summary: ClassVar[str]
    paper: ClassVar[str]
    config_cls: ClassVar[type]
    #: the ledger event type appended for each result ("forget"/"learn" for UNLEARN/LEARN)
    event_type: ClassVar[str] = "add"
    #: whether ``compute`` reads ``EditContext.history["states"]``: the ``Delta.state`` of the
    #: earlier active events of the same method (AlphaEdit's keys), which the orchestrator loads
    needs_history: ClassVar[bool] = False
    #: whether one call solves a batch of requests jointly (one closed form): a merge's
    #: ``resolve`` strategy re-solves such a method's side edits together
    batch_solve: ClassVar[bool] = False
    #: whether a sequence of this method's edits is guarded by default (``kledger add`` with
    #: several facts refuses an edit whose pulse crosses a threshold unless ``--no-guard``)
    guard_sequences: ClassVar[bool] = False
    #: config fields added with a default that changes the computation, and the value a recorded config
    #: without them meant (UltraEdit's ``facts_weight``: 0 before the tenth session), so that ``revert
    #: --rebase`` / ``merge --strategy resolve`` recompute old events as they were computed
    recorded_defaults: ClassVar[Mapping[str, Any]] = {}
    #: config fields that name files the computation reads (UltraEdit's ``preserve_facts``): the
    #: orchestrator records each file's absolute path and sha256 in the event (``ensemble["inputs"]``)
    #: and refuses to recompute the event (``revert --rebase``, ``merge --strategy resolve``) from a
    #: file whose content differs
    input_files: ClassVar[tuple[str, ...]] = ()
    #: whether the method's deltas name tensors of a module it adds beside the model (the edit memory):
    #: then ``attach`` adds that module to a freshly loaded base before any delta is written into it
    attaches: ClassVar[bool] = False

    def __init__(self, config: Any = None) -> None:
        self.config = config if config is not None else self.config_cls()

    def attach(self, model: nn.Module) -> None:
        """Add the module(s) this method's deltas write (``attaches``); by default there are none."""

    @abstractmethod
    def compute(self, model: nn.Module, tok, requests: Sequence[FactRequest], ctx: EditContext) -> list[EditResult]:
        """Return one ``EditResult`` per ledger event to append (usually one per request)."""


def make_config(cls: type, overrides: Mapping[str, Any] | None = None) -> Any:
    """Build a frozen config from string/JSON overrides, with type coercion and clear errors."""
    overrides = dict(overrides or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, raw in overrides.items():
        if key not in fields:
            raise UsageError(f"unknown config field {key!r} for {cls.__name__}; expected one of {sorted(fields)}")
        kwargs[key] = _coerce(key, raw, hints[key])
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"invalid {cls.__name__}: {exc}") from None


def _coerce(key: str, raw: Any, hint: Any) -> Any:
    if not isinstance(raw, str):
        return tuple(raw) if isinstance(raw, list) else raw
    origin = typing.get_origin(hint)
    union = origin is typing.Union or origin is types.UnionType  # Optional[X] and X | None alike
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    target = hint if origin is None else (args[0] if union and len(args) == 1 else None)
    if union and raw == "null":
        return None
    try:
        if target is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if target in (int, float, str):
            return target(raw)
        value = json.loads(raw)
        if union and value is None:
            return None
        return tuple(value) if isinstance(value, list) else value
    except (ValueError, json.JSONDecodeError):
        raise UsageError(f"config field {key!r}: expected a value of type {hint}, found {raw!r}") from None


def config_to_json(config: Any) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(config).items()}


@contextlib.contextmanager
def preserved(model: nn.Module, names: Iterable[str] | None = None) -> Iterator[None]:
    """Restore parameters bit for bit on exit (editors call this around their work).

    ``names``: only these parameters are saved and restored (the ones the editor writes), so a
    large or half-precision model is not copied whole; None saves every parameter. Every
    parameter's ``requires_grad`` flag is restored and its ``.grad`` cleared either way."""
    params = dict(model.named_parameters())
    keep = list(params) if names is None else list(dict.fromkeys(names))
    unknown = [n for n in keep if n not in params]
    if unknown:
        raise UsageError(f"preserved: expected parameter names of the model, found {unknown[:3]}")
    saved = {n: params[n].detach().clone() for n in keep}
    flags = {n: p.requires_grad for n, p in params.items()}
    try:
        yield
    finally:
        with torch.no_grad():
            for n, p in params.items():
                if n in saved:
                    p.copy_(saved[n])
                p.requires_grad_(flags[n])
                p.grad = None


@contextlib.contextmanager
def applied(model: nn.Module, deltas: Sequence[Delta]) -> Iterator[None]:
    """Temporarily write deltas into the model (fp32 accumulation); restore exactly on exit."""
    params = dict(model.named_parameters())
    new = accumulate({k: v for k, v in params.items()}, deltas)
    saved = {n: params[n].detach().clone() for n in new}
    try:
        with torch.no_grad():
            for n, t in new.items():
                params[n].copy_(t.to(params[n].dtype))
        yield
    finally:
        with torch.no_grad():
            for n, t in saved.items():
                params[n].copy_(t)
