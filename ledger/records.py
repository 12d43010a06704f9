"""Frozen records that flow through kledger: fact requests and ledger events.

Data flows one way: ``FactRequest`` → editor → ``Delta`` → ``Ledger.append`` → ``Event``.
These classes hold no behaviour beyond validation and (de)serialisation.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Mapping

from kledger.ledger.errors import UsageError

#: Event types that change the model (they may carry a delta or cancel one).
MODEL_EVENT_TYPES = ("init", "add", "revert", "merge", "forget", "learn", "branch")
#: Event types that only record observations.
NOTE_EVENT_TYPES = ("audit", "tag")  # a tag names a version (kledger.ledger.tags)
EVENT_TYPES = MODEL_EVENT_TYPES + NOTE_EVENT_TYPES
#: Event types whose delta is part of the model while they are active.
DELTA_EVENT_TYPES = ("add", "merge", "forget", "learn")


def _normalise_target(target: str) -> str:
    # Targets are continuations of the prompt: " Rome", not "Rome". A target given without a
    # leading space gets one (as EasyEdit and ROME do), so tokenisation matches generation.
    return target if target[:1].isspace() else " " + target


@dataclass(frozen=True)
class FactRequest:
    """One fact to write into the model: ``prompt`` continued by ``target_new``.

    ``subject`` must occur in ``prompt`` (its last token is where locate-then-edit methods read
    keys). ``target_true`` is the answer being replaced, when known (for efficacy scores).
    ``rephrase_prompts`` and ``locality_prompts``/``locality_answers`` are evaluation material
    (CounterFact/zsRE); they are recorded but never used to compute the edit.
    """

    prompt: str
    target_new: str
    subject: str | None = None
    target_true: str | None = None
    rephrase_prompts: tuple[str, ...] = ()
    locality_prompts: tuple[str, ...] = ()
    locality_answers: tuple[str, ...] = ()
    case_id: str | None = None

    def __post_init__(self) -> None:
        for name in ("subject", "target_true", "case_id"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise UsageError(f"{name} must be a string when given, found {type(value).__name__} {value!r:.60}")
        for name in ("prompt", "target_new", "subject", "target_true", "case_id"):
            _utf8(name, getattr(self, name))
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise UsageError(f"prompt must be a non-empty string, found {self.prompt!r}")
        if not isinstance(self.target_new, str) or not self.target_new.strip():
            raise UsageError(f"target must be a non-empty string, found {self.target_new!r}")
        object.__setattr__(self, "target_new", _normalise_target(self.target_new))
        if self.target_true is not None:
            if not self.target_true.strip():
                object.__setattr__(self, "target_true", None)
            else:
                object.__setattr__(self, "target_true", _normalise_target(self.target_true))
        if self.subject is not None:
            if not self.subject.strip():
                raise UsageError(f"subject must be non-empty when given, found {self.subject!r}")
            if self.subject not in self.prompt:
                raise UsageError(
                    f"subject {self.subject!r} must occur in the prompt, found prompt {self.prompt!r}"
                )
        for name in ("rephrase_prompts", "locality_prompts", "locality_answers"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = (value,)
            if not isinstance(value, (tuple, list)) or not all(isinstance(v, str) for v in value):
                raise UsageError(f"{name} must be a list of strings, found {value!r:.80}")
            for v in value:
                _utf8(name, v)
            object.__setattr__(self, name, tuple(value))
        if len(self.locality_answers) not in (0, len(self.locality_prompts)):
            raise UsageError(
                f"expected one locality answer per locality prompt, found {len(self.locality_answers)}"
                f" answers for {len(self.locality_prompts)} prompts"
            )

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {
            k: list(getattr(self, k)) for k in ("rephrase_prompts", "locality_prompts", "locality_answers")
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "FactRequest":
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in fields})

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> "FactRequest":
        """Build from an EasyEdit flat record (CounterFact), a zsRE record, a ROME known-facts
        record (``prompt`` + ``attribute``: the model's known answer, e.g. to forget), or our own JSON."""
        if "src" in rec and "alt" in rec:  # ROME/MEND zsRE format
            answers = rec.get("answers") or []
            return cls(
                prompt=rec["src"], target_new=rec["alt"], subject=rec.get("subject"),
                target_true=answers[0] if answers else None,
                rephrase_prompts=_as_tuple(rec.get("rephrase")),
                locality_prompts=_as_tuple(rec.get("loc")),
                locality_answers=_as_tuple(rec.get("loc_ans")),
                case_id=_opt_str(rec.get("case_id")),
            )
        if "attribute" in rec and "prompt" in rec and "target_new" not in rec:  # ROME known_1000.json
            return cls(prompt=rec["prompt"], target_new=rec["attribute"], subject=rec.get("subject"),
                       case_id=_opt_str(rec.get("known_id", rec.get("case_id"))))
        if "target_new" not in rec or "prompt" not in rec:
            raise UsageError(
                "expected a record with 'prompt' and 'target_new' (EasyEdit flat format), 'src' and"
                f" 'alt' (zsRE) or 'prompt' and 'attribute' (known facts), found keys {sorted(rec)}"
            )
        target_new = rec["target_new"]
        if isinstance(target_new, Mapping):  # ROME format {"str": ...}
            target_new = target_new.get("str", "")
        prompt = rec["prompt"]
        subject = rec.get("subject")
        if subject and "{}" in prompt:
            prompt = prompt.format(subject)
        return cls(
            prompt=prompt, target_new=target_new, subject=subject,
            target_true=rec.get("ground_truth") or rec.get("target_true"),
            rephrase_prompts=_as_tuple(rec.get("rephrase_prompt") or rec.get("rephrase_prompts")),
            locality_prompts=_as_tuple(rec.get("locality_prompt") or rec.get("locality_prompts")),
            locality_answers=_as_tuple(rec.get("locality_ground_truth") or rec.get("locality_answers")),
            case_id=_opt_str(rec.get("case_id")),
        )


def _utf8(name: str, v: Any) -> None:
    if isinstance(v, str):
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            raise UsageError(f"{name} must be UTF-8 text, found {ascii(v)[:60]}") from None


def _as_tuple(v: Any) -> tuple[str, ...]:
    if v is None or v == "":
        return ()
    if isinstance(v, str):
        return (v,)
    if not isinstance(v, (list, tuple)):
        raise UsageError(f"expected a string or a list of strings, found {type(v).__name__} {v!r:.60}")
    return tuple(v)  # each checked to be a string by FactRequest


def _opt_str(v: Any) -> str | None:
    return None if v is None else str(v)


def load_requests(path: str) -> list[FactRequest]:
    """Read a JSON list (or JSON-lines file) of fact records into requests, with clear errors."""
    import os

    if not os.path.exists(path):
        raise UsageError(f"expected a JSON file of fact records, found no file at {path!r}")
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        try:
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as exc:
            raise UsageError(f"expected JSON or JSON lines in {path!r}, found invalid JSON: {exc}") from None
    if isinstance(data, Mapping):
        data = [data]
    if not isinstance(data, list) or not data:
        raise UsageError(f"expected a non-empty list of fact records in {path!r}, found {type(data).__name__}")
    out = []
    for i, rec in enumerate(data):
        if not isinstance(rec, Mapping):
            raise UsageError(f"record {i} of {path!r}: expected an object, found {type(rec).__name__}")
        try:
            out.append(FactRequest.from_record(rec))
        except UsageError as exc:
            raise UsageError(f"record {i} of {path!r}: {exc}") from None
    return out


@dataclass(frozen=True)
class Event:
    """One ledger row. Rows are never updated or deleted; see ``kledger.ledger.store``.

    ``hash = sha256(prev_hash ‖ canonical_json(body) ‖ delta_sha256)`` where ``body`` is every
    field except ``id`` and ``hash``; ``id`` is the first 12 hex digits of ``hash``.
    """

    seq: int
    id: str
    type: str
    parent: str | None
    parents: tuple[str, ...]
    branch: str
    created_at: str
    request: Any = None  # FactRequest JSON, or a list of them (forget/learn sets)
    method: str | None = None
    config: Any = None
    ensemble: Any = None
    metrics: Any = None
    target: str | None = None  # the event a revert cancels
    message: str | None = None
    delta_sha256: str | None = None
    delta_bytes: int | None = None
    prev_hash: str = ""
    hash: str = ""

    HASHED_FIELDS = (
        "seq", "type", "parent", "parents", "branch", "created_at", "request", "method", "config",
        "ensemble", "metrics", "target", "message", "delta_sha256", "delta_bytes", "prev_hash",
    )

    def body(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.HASHED_FIELDS}
        d["parents"] = list(self.parents)
        return d

    def to_json(self) -> dict[str, Any]:
        return self.body() | {"id": self.id, "hash": self.hash}

    @property
    def short(self) -> str:
        return self.id[:8]

    def describe(self) -> str:
        """One line, like ``git log --oneline``."""
        if self.type in ("add",) and isinstance(self.request, Mapping):
            what = f"{self.request.get('prompt')!s} →{self.request.get('target_new')!s} [{self.method}]"
        elif self.type in ("forget", "learn") and isinstance(self.request, list) and self.request:
            first = self.request[0] if isinstance(self.request[0], Mapping) else {}
            n = len(self.request)
            what = (f"{n} fact{'s' if n != 1 else ''}: {first.get('prompt')!s} →{first.get('target_new')!s}"
                    + (" …" if n > 1 else ""))
            retain = self.ensemble.get("retain") if isinstance(self.ensemble, Mapping) else None
            if isinstance(retain, Mapping) and retain.get("given"):
                what += f" (retain {retain['given']})"
            what += f" [{self.method}]" + (f" — {self.message}" if self.message else "")
        elif self.type == "revert":
            what = f"revert {self.target}"
        elif self.message:
            what = self.message
        else:
            what = self.method or ""
        return f"{self.id} {self.type:<7} {what}"
