"""Function-level audits: measure a materialised model on the stored probe set, judge it against
thresholds, and find the edits responsible by bisection over the event sequence.

Figures (all relative to the base model, whose reference figures the probe set stores):

* ``ppl_ratio``           perplexity on the held-out text ÷ the base model's;
* ``kl``                  mean KL(base ‖ model) of the next-token distribution after each neutral
                          prompt, in nats, over the base's top-k tokens plus one bin for all other
                          tokens (a lower bound of the full KL, exact when k ≥ vocabulary);
* ``retention_drop``      base retention − retention: the fraction of known facts (answered
                          correctly by the base) whose answer is no longer the greedy answer;
* ``edit_retention_drop`` the fraction of active edits whose target is no longer the greedy
                          answer to their prompt (an edit that never took counts as lost);
* ``weight_rel``          the largest ‖W − W₀‖_F / ‖W₀‖_F over edited tensors;
* ``sv_growth``           the largest σ₁(W) / σ₁(W₀) over edited tensors.

"Answered correctly" is teacher-forced: every answer token is the arg-max after the prompt and
the answer's earlier tokens, i.e. greedy decoding would produce the answer.

Where this code lives, and why: the ledger never imports editors, but an audit must run a model.
The measurement here is deliberately written with plain torch calls on any Hugging Face causal
LM (``model(input_ids, attention_mask).logits``) and its tokenizer, like ``compose`` writes
deltas into any ``nn.Module``; loading the model stays in ``kledger.cli``. The figures are
recorded in the ledger, so their definition must stay fixed: it belongs to the ledger (versioned
by ``AUDIT_VERSION``), not to editor scoring helpers that may change with a method.

Audits take no lock: they read through short read-only connections and only the final
``Ledger.append`` of the audit event holds the write lock.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
import torch.nn as nn

from kledger.ledger import compose as _compose
from kledger.ledger.compose import apply_deltas
from kledger.ledger.deltas import Delta
from kledger.ledger.drift import DriftTracker
from kledger.ledger.errors import UsageError
from kledger.ledger.probes import ProbeSet
from kledger.ledger.records import DELTA_EVENT_TYPES, Event

log = logging.getLogger(__name__)

AUDIT_VERSION = 1
#: Tokens per forward batch (rows × padded length); bounds the logits' memory (× vocabulary × 4 B).
BATCH_TOKENS = 1024
MAX_TEXT_TOKENS = 128

#: Threshold name → what it bounds (from above). Metric names equal threshold names.
THRESHOLDS: dict[str, str] = {
    "ppl_ratio": "perplexity on the held-out text / the base model's",
    "kl": "mean KL(base || model) of next-token distributions on neutral prompts (nats)",
    "retention_drop": "fraction of known facts (answered by the base) no longer answered",
    "edit_retention_drop": "fraction of active edits whose target is no longer the answer",
    "weight_rel": "largest ||W - W0||_F / ||W0||_F over edited tensors",
    "sv_growth": "largest top-singular-value growth sigma1(W)/sigma1(W0) over edited tensors",
}
#: Defaults, from measurements on smollm2-135m (bench/drift.py, bench/results/drift.md):
#: * 200 benign edits (random rank-2 deltas, 0.2 % of each tensor's norm) gave perplexity ratio
#:   1.00, KL 0.0006 and retention drop 0.00: every bound is far above that noise;
#: * one destructive edit (rank-1, ‖ΔW‖ = ‖W‖ on one down_proj) gave ratio 1.114, KL 0.20 and a
#:   retention drop of 0.38: KL crosses at 2x its bound, the ratio just, retention at 7x;
#: * KNE sequences (two versions of editors/kne.py) gave ratio 1.28, KL 1.06 and retention drop
#:   0.76 after 25 edits (and far worse with the earlier version).
#: ``retention_drop`` 0.05 is half the 10-point loss that an audit must catch; ``edit_retention_drop``
#: 0.5 flags when most active edits no longer hold (KNE: 0.52 after 25 edits, 0.67 after 55): it
#: is loose because an edit that never took counts as lost. Weight-level bounds are off by
#: default: in the second KNE run ‖W−W₀‖/‖W₀‖ stayed below 0.01 and σ₁ growth below 1.001 while
#: the function collapsed (in the first, 0.16 and 1.50 after 60 edits), and large but harmless
#: deltas would be flagged; they are reported and plotted.
DEFAULT_THRESHOLDS: dict[str, float | None] = {
    "ppl_ratio": 1.10,
    "kl": 0.10,
    "retention_drop": 0.05,
    "edit_retention_drop": 0.50,
    "weight_rel": None,
    "sv_growth": None,
}
_PARTS = {"ppl_ratio": "texts", "kl": "prompts", "retention_drop": "facts", "edit_retention_drop": "edits",
          "weight_rel": "weights", "sv_growth": "weights"}
ALL_PARTS = frozenset(_PARTS.values())
_COST = {"weights": 0, "texts": 1, "prompts": 2, "facts": 3, "edits": 4}  # measured order, see blame()


# --- thresholds ------------------------------------------------------------------------------
def parse_threshold(text: str) -> tuple[str, float | None]:
    """``name=value``; value ``off``/``none`` disables, ``default`` restores the default."""
    if "=" not in text:
        raise UsageError(f"expected a threshold as NAME=VALUE, found {text!r}")
    name, raw = (s.strip() for s in text.split("=", 1))
    if name not in THRESHOLDS:
        raise UsageError(f"unknown threshold {name!r}; expected one of {sorted(THRESHOLDS)}")
    low = raw.lower()
    if low in ("off", "none", ""):
        return name, None
    if low == "default":
        return name, DEFAULT_THRESHOLDS[name]
    try:
        value = float(raw)
    except ValueError:
        raise UsageError(f"threshold {name}: expected a number, 'off' or 'default', found {raw!r}") from None
    if not math.isfinite(value) or value < 0:
        raise UsageError(f"threshold {name}: expected a finite number ≥ 0, found {raw!r}")
    return name, value


def stored_thresholds(ledger) -> tuple[dict[str, float | None], Event | None]:
    """Effective thresholds: the defaults, overridden by the latest ``thresholds`` audit event."""
    for ev in ledger.events(types=["audit"]):
        if isinstance(ev.config, Mapping) and ev.config.get("kind") == "thresholds":
            stored = ev.config.get("thresholds") or {}
            return {k: stored.get(k, v) for k, v in DEFAULT_THRESHOLDS.items()}, ev
    return dict(DEFAULT_THRESHOLDS), None


def record_thresholds(ledger, changes: Mapping[str, float | None]) -> Event:
    """Append an ``audit`` event (``config.kind == "thresholds"``) with the merged thresholds."""
    current, _ = stored_thresholds(ledger)
    merged = current | dict(changes)
    text = ", ".join(f"{k}={'off' if v is None else v}" for k, v in sorted(changes.items()))
    return ledger.append("audit", config={"kind": "thresholds", "thresholds": merged},
                         message=f"thresholds: {text}")


def crossed(metrics: Mapping[str, Any], thresholds: Mapping[str, float | None]) -> list[str]:
    """Names of thresholds whose metric exceeds its bound (unmeasured metrics never cross)."""
    out = []
    for name, bound in thresholds.items():
        value = metrics.get(name)
        if bound is not None and value is not None and value > bound:
            out.append(name)
    return out


# --- measurement primitives (plain torch on a HF causal LM) ---------------------------------
def _ids(tok, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def _pair_ids(tok, prompt: str, answer: str) -> tuple[list[int], int, int]:
    p = _ids(tok, prompt)
    full = _ids(tok, prompt + answer)
    if full[: len(p)] == p and len(full) > len(p):
        a = full[len(p):]
    else:  # tokenisation merged across the boundary: tokenise the answer on its own
        a = _ids(tok, answer)
    return p + a, len(p), len(p) + len(a)


def _batches(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Index groups of similar length with rows × longest ≤ budget (longest first)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    out: list[list[int]] = []
    cur: list[int] = []
    width = 0
    for i in order:
        w = max(width, lengths[i])
        if cur and w * (len(cur) + 1) > budget:
            out.append(cur)
            cur, w = [], lengths[i]
        cur.append(i)
        width = w
    if cur:
        out.append(cur)
    return out


def _pad_id(tok) -> int:
    for v in (tok.pad_token_id, tok.eos_token_id):
        if v is not None:
            return int(v)
    return 0


class _LogitsAt:
    """Context manager: the output embedding (LM head) sees only the hidden states at ``index``
    (rows × P positions), so the logits are rows × P × vocabulary instead of rows × length ×
    vocabulary. The head is most of a small model's cost per token (SmolLM2-135M: 49k × 576 of its
    135M parameters); the hook is always removed."""

    def __init__(self, model: nn.Module, index: torch.Tensor | None) -> None:
        self.model, self.index, self.handle = model, index, None

    def __enter__(self) -> "_LogitsAt":
        head = self.model.get_output_embeddings() if self.index is not None else None
        if head is not None:
            idx = self.index

            def pre(module, args):
                h = args[0]
                return (h.gather(1, idx[..., None].expand(-1, -1, h.shape[-1])),) + tuple(args[1:])

            self.handle = head.register_forward_pre_hook(pre)
        return self

    def __exit__(self, *exc) -> None:
        if self.handle is not None:
            self.handle.remove()


def _forward(model: nn.Module, rows: Sequence[Sequence[int]], pad: int,
             positions: Sequence[Sequence[int]] | None = None) -> torch.Tensor:
    """Logits of right-padded ``rows``: all positions (rows × width × V), or with ``positions``
    only those of each row (rows × max count × V; row j's k-th entry is position positions[j][k])."""
    dev = next(model.parameters()).device
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    index = None
    if positions is not None:
        n = max(max((len(p) for p in positions), default=1), 1)
        index = torch.zeros((len(rows), n), dtype=torch.long)
        for i, p in enumerate(positions):
            index[i, : len(p)] = torch.tensor(list(p), dtype=torch.long)
        index = index.to(dev)
    with _LogitsAt(model, index) as hook:
        logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits.float()
    if index is not None and hook.handle is None:  # no separate output embedding: select afterwards
        logits = logits.gather(1, index[..., None].expand(-1, -1, logits.shape[-1]))
    return logits


@torch.no_grad()
def last_logprobs(model: nn.Module, tok, prompts: Sequence[str], batch_tokens: int = BATCH_TOKENS
                  ) -> Iterator[tuple[list[int], torch.Tensor]]:
    """(prompt indices, log-softmax of the next-token logits after each) per batch."""
    rows = [_ids(tok, p) for p in prompts]
    pad = _pad_id(tok)
    for group in _batches([len(r) for r in rows], batch_tokens):
        logits = _forward(model, [rows[i] for i in group], pad, [[len(rows[i]) - 1] for i in group])
        yield group, torch.log_softmax(logits[:, 0], dim=-1)


@torch.no_grad()
def perplexity(model: nn.Module, tok, texts: Sequence[str], batch_tokens: int = BATCH_TOKENS
               ) -> tuple[float, float, int]:
    """(perplexity, mean NLL per token, tokens) over the texts (each cut to MAX_TEXT_TOKENS)."""
    rows = [r[:MAX_TEXT_TOKENS] for r in (_ids(tok, t) for t in texts)]
    rows = [r for r in rows if len(r) >= 2]
    if not rows:
        return float("nan"), float("nan"), 0
    pad = _pad_id(tok)
    total, n = 0.0, 0
    for group in _batches([len(r) for r in rows], batch_tokens):
        sub = [rows[i] for i in group]
        logits = _forward(model, sub, pad)
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        for j, r in enumerate(sub):
            tgt = torch.tensor(r[1:], device=logp.device)
            total -= float(logp[j, : len(r) - 1].gather(-1, tgt[:, None]).sum())
            n += len(r) - 1
    nll = total / n
    return math.exp(nll), nll, n


@torch.no_grad()
def answers_hold(model: nn.Module, tok, pairs: Sequence[tuple[str, str]], batch_tokens: int = BATCH_TOKENS
                 ) -> list[tuple[bool, float, float]]:
    """Per (prompt, answer): (every answer token is the arg-max, fraction of tokens that are,
    margin: the smallest lead in log-probability of an answer token over the best other token,
    negative when some answer token is not the arg-max)."""
    enc = [_pair_ids(tok, p, a) for p, a in pairs]
    out: list[tuple[bool, float, float]] = [(False, 0.0, float("-inf"))] * len(enc)
    pad = _pad_id(tok)
    for group in _batches([len(e[0]) for e in enc], batch_tokens):
        spans = [range(enc[i][1] - 1, enc[i][2] - 1) if enc[i][2] > enc[i][1] else range(0) for i in group]
        logits = _forward(model, [enc[i][0] for i in group], pad, spans)
        top2 = logits.topk(2, dim=-1)
        for j, i in enumerate(group):
            ids, s, e = enc[i]
            if e <= s:
                continue
            pos = torch.arange(0, e - s, device=logits.device)  # the answer positions, selected in _forward
            tgt = torch.tensor(ids[s:e], device=logits.device)
            val = logits[j, pos, tgt]
            first, second = top2.values[j, pos, 0], top2.values[j, pos, 1]
            ok = top2.indices[j, pos, 0] == tgt
            margin = torch.where(ok, first - second, val - first)
            out[i] = (bool(ok.all()), float(ok.float().mean()), float(margin.min()))
    return out


@torch.no_grad()
def greedy_answers(model: nn.Module, tok, prompts: Sequence[str], n_tokens: int,
                   batch_tokens: int = BATCH_TOKENS) -> list[str]:
    """Greedy continuations of up to ``n_tokens`` tokens, cut at the first newline or EOS."""
    rows = [_ids(tok, p) for p in prompts]
    new: list[list[int]] = [[] for _ in rows]
    done = [False] * len(rows)
    pad, eos = _pad_id(tok), tok.eos_token_id
    for _ in range(n_tokens):
        todo = [i for i in range(len(rows)) if not done[i]]
        if not todo:
            break
        cur = [rows[i] + new[i] for i in todo]
        for group in _batches([len(c) for c in cur], batch_tokens):
            logits = _forward(model, [cur[g] for g in group], pad, [[len(cur[g]) - 1] for g in group])
            for j, g in enumerate(group):
                i = todo[g]
                t = int(logits[j, 0].argmax())
                if eos is not None and t == eos:
                    done[i] = True
                else:
                    new[i].append(t)
    out = []
    for ids in new:
        text = tok.decode(ids, skip_special_tokens=True)
        out.append(text.split("\n")[0].rstrip())
    return out


@torch.no_grad()
def kl_to_base(model: nn.Module, tok, probes: ProbeSet, batch_tokens: int = BATCH_TOKENS) -> torch.Tensor:
    """KL(base ‖ model) per neutral prompt over the base's top-k tokens and one bin for the rest."""
    out = torch.zeros(len(probes.prompts))
    for group, logq in last_logprobs(model, tok, probes.prompts, batch_tokens):
        g = torch.tensor(group)
        ref_idx = probes.kl_topk_idx[g].to(logq.device)
        ref_lp = probes.kl_topk_logp[g].to(logq.device)
        ref_tail = probes.kl_tail_logp[g].to(logq.device)
        q_top = logq.gather(-1, ref_idx)
        q_tail = torch.logsumexp(logq.scatter(-1, ref_idx, float("-inf")), dim=-1)
        top = (ref_lp.exp() * (ref_lp - q_top)).sum(-1)
        has_tail = torch.isfinite(ref_tail)
        tail = torch.where(has_tail, ref_tail.exp() * (ref_tail - q_tail), torch.zeros_like(ref_tail))
        out[g] = (top + torch.nan_to_num(tail, nan=0.0, posinf=1e6)).clamp_min(0.0).float().cpu()
    return out


@dataclass(frozen=True)
class EditProbe:
    event: str  # id of the add event
    prompt: str
    target: str


def edit_probes(events: Iterable[Event]) -> list[EditProbe]:
    """Each active add/merge event's own prompt and target (forget/learn sets are not facts)."""
    out = []
    for ev in events:
        if ev.type not in ("add", "merge"):
            continue
        reqs = ev.request if isinstance(ev.request, list) else [ev.request]
        for r in reqs:
            if isinstance(r, Mapping) and r.get("prompt") and r.get("target_new"):
                out.append(EditProbe(ev.id, str(r["prompt"]), str(r["target_new"])))
    return out


#: Per-edit pulse: the first prompts / facts of the probe set. Its cost is one forward pass over
#: their tokens (~250 tokens here; ~1–2 s on one CPU core for SmolLM2-135M, whose body costs
#: ~0.2 GFLOP per token): 24 facts resolve a retention drop in steps of 0.042, so two lost facts
#: cross the default 0.05 bound (one KNE edit measured a 0.31 drop; bench/results/drift.md).
PULSE_PROMPTS = 8
PULSE_FACTS = 24
#: the pulse's figures, judged with the audit thresholds of the same name
PULSE_THRESHOLDS = ("kl", "retention_drop")


def pulse(model: nn.Module, tok, probes: ProbeSet, *, n_prompts: int = PULSE_PROMPTS, n_facts: int = PULSE_FACTS,
          batch_tokens: int = BATCH_TOKENS) -> dict[str, Any]:
    """A cheap function-level check run after every edit: KL to the base on the first
    ``n_prompts`` neutral prompts and the retention drop on the first ``n_facts`` known facts.

    Same definitions as the audit's ``kl`` and ``retention_drop`` on a fixed subset (so figures of
    successive edits compare); a full ``kledger audit`` measures the whole probe set. The base's
    retention of the subset is 1 by construction of the probe set (facts the base answers), so
    the drop is ``1 − retention`` where the base retention is not recorded.
    """
    t0 = time.perf_counter()
    k = min(n_prompts, len(probes.prompts))
    sub = ProbeSet(texts=(), prompts=probes.prompts[:k], facts=probes.facts[:n_facts],
                   kl_topk_idx=probes.kl_topk_idx[:k], kl_topk_logp=probes.kl_topk_logp[:k],
                   kl_tail_logp=probes.kl_tail_logp[:k], base=probes.base, source=probes.source)
    was_training = model.training
    model.eval()
    try:
        out: dict[str, Any] = {"prompts": k, "facts": len(sub.facts)}
        out["kl"] = _r(float(kl_to_base(model, tok, sub, batch_tokens).mean())) if k else None
        if sub.facts:
            holds = answers_hold(model, tok, sub.facts, batch_tokens)
            ret = sum(h[0] for h in holds) / len(holds)
            out["retention_drop"] = _r(max(1.0 - ret, 0.0))
        else:
            out["retention_drop"] = None
    finally:
        model.train(was_training)
    out["seconds"] = round(time.perf_counter() - t0, 3)
    return out


def measure(model: nn.Module, tok, probes: ProbeSet, edits: Sequence[EditProbe] = (), *,
            parts: Iterable[str] = ALL_PARTS - {"weights"}, batch_tokens: int = BATCH_TOKENS
            ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(metrics, details) of the model as it is now. ``parts``: texts, prompts, facts, edits."""
    parts = set(parts)
    m: dict[str, Any] = {}
    d: dict[str, Any] = {}
    secs: dict[str, float] = {}
    was_training = model.training
    model.eval()
    try:
        if "texts" in parts:
            t0 = time.perf_counter()
            ppl, nll, ntok = perplexity(model, tok, probes.texts, batch_tokens)
            base_ppl = probes.base.get("ppl")
            m.update(ppl=_r(ppl), ppl_ratio=_r(ppl / base_ppl) if base_ppl else None, text_tokens=ntok)
            secs["texts"] = time.perf_counter() - t0
        if "prompts" in parts and probes.prompts:
            t0 = time.perf_counter()
            kl = kl_to_base(model, tok, probes, batch_tokens)
            m.update(kl=_r(float(kl.mean())), kl_p90=_r(float(kl.quantile(0.9))), kl_max=_r(float(kl.max())),
                     prompts=len(probes.prompts))
            secs["prompts"] = time.perf_counter() - t0
        if "facts" in parts:
            t0 = time.perf_counter()
            if probes.facts:
                holds = answers_hold(model, tok, probes.facts, batch_tokens)
                ret = sum(h[0] for h in holds) / len(holds)
                base_ret = probes.base.get("retention") or 1.0
                m.update(retention=_r(ret), retention_drop=_r(max(base_ret - ret, 0.0)), facts=len(holds))
                d["lost_facts"] = [list(f) for f, h in zip(probes.facts, holds) if not h[0]][:50]
            else:
                m.update(retention=None, retention_drop=None, facts=0)
            secs["facts"] = time.perf_counter() - t0
        if "edits" in parts:
            t0 = time.perf_counter()
            if edits:
                holds = answers_hold(model, tok, [(e.prompt, e.target) for e in edits], batch_tokens)
                er = sum(h[0] for h in holds) / len(holds)
                m.update(edit_retention=_r(er), edit_retention_drop=_r(1.0 - er),
                         edit_token_acc=_r(sum(h[1] for h in holds) / len(holds)), edits=len(edits))
                d["lost_edits"] = sorted({e.event for e, h in zip(edits, holds) if not h[0]})
            else:
                m.update(edit_retention=None, edit_retention_drop=None, edits=0)
            secs["edits"] = time.perf_counter() - t0
    finally:
        model.train(was_training)
    m["seconds"] = {k: round(v, 3) for k, v in secs.items()}
    return m, d


def _r(x: float | None) -> float | None:
    if x is None or not math.isfinite(x):
        return None if x is None or math.isnan(x) else 1e308
    return float(f"{x:.6g}")


# --- ledger-level audits --------------------------------------------------------------------
@dataclass
class AuditResult:
    version: Event
    metrics: dict[str, Any]
    details: dict[str, Any]
    thresholds: dict[str, float | None]
    crossed: list[str]
    active: int
    excluded: tuple[str, ...] = ()
    seconds: float = 0.0

    @property
    def healthy(self) -> bool:
        return not self.crossed

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version.id, "seq": self.version.seq, "healthy": self.healthy,
                "crossed": list(self.crossed), "thresholds": dict(self.thresholds), "metrics": dict(self.metrics),
                "details": dict(self.details), "active_edits": self.active, "excluded": list(self.excluded),
                "seconds": round(self.seconds, 3)}


@dataclass
class BlameResult:
    culprits: list[dict[str, Any]] = field(default_factory=list)
    steps: list[dict[str, Any]] = field(default_factory=list)
    after_revert: dict[str, Any] | None = None
    fixed: bool = False
    seconds: float = 0.0

    def revert_commands(self) -> list[str]:
        return [c["revert"] for c in self.culprits if c.get("revert")]

    def to_json(self) -> dict[str, Any]:
        return {"culprits": self.culprits, "steps": self.steps, "after_revert": self.after_revert,
                "fixed": self.fixed, "revert_commands": self.revert_commands(), "seconds": round(self.seconds, 3)}


class Auditor:
    """Audits ledger versions on one loaded BASE model, switching between versions in place.

    The model must be the freshly loaded base. Each version is written as base + Σ its active
    deltas with ``compose.apply_deltas`` (the same fp32 accumulation as ``materialise``, so the
    audited model is bit-identical to an export), after restoring every tensor an earlier version
    touched from a cached copy of its base value — the base is loaded once, however many versions
    a bisection visits. Deltas are cached per event. ``drift_cache``: the file of base σ₁ figures
    (``drift.cache_file``) shared with the per-edit drift of ``kledger add``.
    """

    def __init__(self, ledger, model: nn.Module, tok, probes: ProbeSet,
                 thresholds: Mapping[str, float | None] | None = None, batch_tokens: int = BATCH_TOKENS,
                 on_measure: Callable[[], None] | None = None, drift_cache: str | Path | None = None) -> None:
        self.ledger, self.model, self.tok, self.probes = ledger, model, tok, probes
        self.thresholds = dict(DEFAULT_THRESHOLDS if thresholds is None else thresholds)
        self.batch_tokens = batch_tokens
        self.on_measure = on_measure  # test hook: runs just before each measurement
        self._params = dict(model.named_parameters())
        self._base: dict[str, torch.Tensor] = {}
        self._written: set[str] = set()
        self._deltas: dict[str, Delta] = {}
        self.drift = DriftTracker(lambda n: self._base[n], cache=drift_cache)
        self.measurements = 0

    # --- model state ---------------------------------------------------------------------
    def _delta(self, ev: Event) -> Delta:
        d = self._deltas.get(ev.id)
        if d is None:
            d = self._deltas[ev.id] = self.ledger.load_delta(ev)
        return d

    @torch.no_grad()
    def set_state(self, events: Sequence[Event]) -> list[str]:
        """Make the model base + Σ deltas of ``events``; returns the tensors written."""
        deltas = [self._delta(e) for e in events]
        names = {n for d in deltas for n in d.tensors}
        for n in names - set(self._params):
            raise UsageError(f"a delta names parameter {n!r}, which the model does not have")
        for n in names:
            if n not in self._base:
                self._base[n] = self._params[n].detach().clone()
        for n in self._written:
            self._params[n].copy_(self._base[n])
        self._written = set(apply_deltas(self.model, deltas, chunk=_compose.CHUNK)) if deltas else set()
        return sorted(self._written)

    def restore(self) -> None:
        self.set_state([])

    def weight_figures(self) -> dict[str, dict[str, float]]:
        return {n: self.drift.figures(n, self._params[n]) for n in sorted(self._written)}

    # --- measuring -----------------------------------------------------------------------
    def measure_state(self, events: Sequence[Event], parts: Iterable[str] = ALL_PARTS) -> tuple[dict, dict]:
        parts = set(parts)
        self.set_state(events)
        if self.on_measure is not None:
            self.on_measure()
        self.measurements += 1
        m, d = measure(self.model, self.tok, self.probes, edit_probes(events) if "edits" in parts else (),
                       parts=parts - {"weights"}, batch_tokens=self.batch_tokens)
        if "weights" in parts:
            t0 = time.perf_counter()
            w = self.weight_figures()
            self.drift.save()
            m["weight_rel"] = max((f["cum_rel"] for f in w.values()), default=0.0)
            m["sv_growth"] = max((f["sv_growth"] for f in w.values()), default=1.0)
            m["edited_tensors"] = len(w)
            d["weights"] = w
            m["seconds"]["weights"] = round(time.perf_counter() - t0, 3)
        return m, d

    def audit(self, version: Event, exclude: Iterable[str] = (), parts: Iterable[str] = ALL_PARTS) -> AuditResult:
        t0 = time.perf_counter()
        exclude = tuple(exclude)
        active = [e for e in self.ledger.active(version) if e.id not in exclude]
        m, d = self.measure_state(active, parts)
        return AuditResult(version, m, d, dict(self.thresholds), crossed(m, self.thresholds), len(active),
                           exclude, time.perf_counter() - t0)

    # --- blame ---------------------------------------------------------------------------
    def sequence(self, version: Event) -> list[Event]:
        """The events that change the active set in ``version``'s history, in sequence order."""
        g = self.ledger._graph()
        ids = [i for i in self.ledger.ancestors(version) if g[i][1] in DELTA_EVENT_TYPES + ("revert",)]
        ids.sort(key=lambda i: g[i][0])
        events = {e.id: e for e in self.ledger.events(types=list(DELTA_EVENT_TYPES) + ["revert"])}
        return [events[i] for i in ids]

    def blame(self, version: Event, result: AuditResult | None = None, max_culprits: int = 3,
              progress: Callable[[str], None] | None = None) -> BlameResult:
        """Bisect ``version``'s event sequence for the first event after which a threshold that
        ``version`` crosses is crossed; exclude it and check; repeat up to ``max_culprits``.

        Like ``git bisect`` this assumes that once crossed, a threshold stays crossed as events are
        added. Midpoints measure only the cheapest crossed figure (weights, then perplexity, KL,
        fact retention, edit retention: on smollm2-135m about 0, 19, 35, 45 and 45+ s at 200
        edits on the busy 2-core machine); each culprit is then confirmed by measuring every
        crossed figure of ``version`` without it.
        """
        t0 = time.perf_counter()
        out = BlameResult()
        if result is None:
            result = self.audit(version)
        if result.healthy:
            out.fixed = True
            out.seconds = time.perf_counter() - t0
            return out
        all_parts = {_PARTS[n] for n in result.crossed}
        still = list(result.crossed)
        seq = self.sequence(version)
        excluded: list[str] = []

        def active_after(k: int) -> list[Event]:
            if k == 0:
                return []
            return [e for e in self.ledger.active(seq[k - 1]) if e.id not in excluded]

        def bad(k: int, target: str) -> bool:
            m, _ = self.measure_state(active_after(k), {_PARTS[target]})
            hit = crossed(m, {target: self.thresholds[target]})
            out.steps.append({"after": seq[k - 1].id if k else None, "index": k, "metric": target,
                              "value": m.get(target), "crossed": bool(hit), "excluded": list(excluded)})
            if progress:
                progress(f"bisect: after {'base' if k == 0 else seq[k - 1].id} ({k}/{len(seq)}): {target}"
                         f" {m.get(target)} {'crossed' if hit else 'within'}")
            return bool(hit)

        while len(out.culprits) < max_culprits and still:
            target = min(still, key=lambda n: _COST[_PARTS[n]])
            lo, hi = 0, len(seq)  # state lo is within the threshold (the base), state hi crosses it
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if bad(mid, target):
                    hi = mid
                else:
                    lo = mid
            if hi == 0:
                break
            culprit = seq[hi - 1]
            entry = {"id": culprit.id, "seq": culprit.seq, "type": culprit.type, "describe": culprit.describe(),
                     "index": hi, "of": len(seq), "metric": target}
            if culprit.type not in DELTA_EVENT_TYPES or culprit.id not in {e.id for e in self.ledger.active(version)}:
                entry["note"] = ("this event is not an active edit at the audited version; "
                                 "inspect it with `kledger show`")
                out.culprits.append(entry)
                break
            entry["revert"] = f"kledger revert {culprit.id}"
            excluded.append(culprit.id)
            out.culprits.append(entry)
            after = self.audit(version, exclude=excluded, parts=all_parts)
            still = list(after.crossed)
            out.after_revert = {"excluded": list(excluded), "crossed": still,
                                "metrics": {n: after.metrics.get(n) for n in result.crossed}}
            if progress:
                progress(f"without {', '.join(excluded)}: "
                         f"{'crossed ' + ', '.join(still) if still else 'within thresholds'}")
            if not still:
                out.fixed = True
                break
            seq = [e for e in seq if e.id not in excluded]
        self.restore()
        out.seconds = time.perf_counter() - t0
        return out
