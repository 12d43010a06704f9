"""Measuring a model: the figures every audit and every per-edit pulse records.

Figures (all relative to the base model, whose reference figures the probe set stores):

* ``ppl_ratio``           perplexity on the held-out text ÷ the base model's;
* ``kl``                  mean KL(base ‖ model) of the next-token distribution after each neutral
                          prompt, in nats, over the base's top-k tokens plus one bin for all other
                          tokens (a lower bound of the full KL, exact when k ≥ vocabulary);
* ``retention_drop``      base retention − retention: the fraction of known facts (answered
                          correctly by the base) whose answer is no longer the greedy answer;
* ``edit_retention_drop`` the fraction of active edits whose target is no longer the greedy
                          answer to their prompt (an edit that never took counts as lost);
* ``weight_rel``, ``sv_growth``: weight-level figures, from ``kledger.audit.drift``.

"Answered correctly" is teacher-forced: every answer token is the arg-max after the prompt and
the answer's earlier tokens, i.e. greedy decoding would produce the answer.

The measurement is written with plain torch calls on any Hugging Face causal LM
(``model(input_ids, attention_mask).logits``) and its tokenizer; batches come from
``kledger.editors.tokens`` and the LM-head hook from ``kledger.editors.hooks``. The figures are
recorded in the ledger, so their definition must stay fixed (versioned by
``kledger.audit.events.AUDIT_VERSION``), apart from editor scoring helpers that may change with
a method. This module needs a probe set's fields but not its module (``kledger.audit.probes``
builds probe sets with the primitives here).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Mapping, Sequence

import torch
import torch.nn as nn

from kledger.audit.thresholds import ALL_PARTS
from kledger.editors.hooks import LogitsAt, input_device
from kledger.editors.tokens import ids as _ids
from kledger.editors.tokens import pad, pad_id, pair_ids
from kledger.ledger.records import Event

if TYPE_CHECKING:
    from kledger.audit.probes import ProbeSet

#: Tokens per forward batch (rows × padded length); bounds the logits' memory (× vocabulary × 4 B).
BATCH_TOKENS = 1024
MAX_TEXT_TOKENS = 128


# --- primitives ------------------------------------------------------------------------------
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


def _forward(model: nn.Module, rows: Sequence[Sequence[int]], pad_value: int,
             positions: Sequence[Sequence[int]] | None = None) -> torch.Tensor:
    """Logits of right-padded ``rows``: all positions (rows × width × V), or with ``positions``
    only those of each row (rows × max count × V; row j's k-th entry is position positions[j][k])."""
    dev = input_device(model)
    ids, mask = pad(rows, pad_value, dev)
    index = None
    if positions is not None:
        n = max(max((len(p) for p in positions), default=1), 1)
        index = torch.zeros((len(rows), n), dtype=torch.long)
        for i, p in enumerate(positions):
            index[i, : len(p)] = torch.tensor(list(p), dtype=torch.long)
        index = index.to(dev)
    with LogitsAt(model, index) as hook:
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        hooked = hook.handle is not None
    if index is not None and not hooked:  # no separate output embedding: select afterwards
        logits = logits.gather(1, index[..., None].expand(-1, -1, logits.shape[-1]))
    return logits


@torch.no_grad()
def last_logprobs(model: nn.Module, tok, prompts: Sequence[str], batch_tokens: int = BATCH_TOKENS
                  ) -> Iterator[tuple[list[int], torch.Tensor]]:
    """(prompt indices, log-softmax of the next-token logits after each) per batch."""
    rows = [_ids(tok, p) for p in prompts]
    pv = pad_id(tok)
    for group in _batches([len(r) for r in rows], batch_tokens):
        logits = _forward(model, [rows[i] for i in group], pv, [[len(rows[i]) - 1] for i in group])
        yield group, torch.log_softmax(logits[:, 0], dim=-1)


@torch.no_grad()
def perplexity(model: nn.Module, tok, texts: Sequence[str], batch_tokens: int = BATCH_TOKENS
               ) -> tuple[float, float, int]:
    """(perplexity, mean NLL per token, tokens) over the texts (each cut to MAX_TEXT_TOKENS)."""
    rows = [r[:MAX_TEXT_TOKENS] for r in (_ids(tok, t) for t in texts)]
    rows = [r for r in rows if len(r) >= 2]
    if not rows:
        return float("nan"), float("nan"), 0
    pv = pad_id(tok)
    total, n = 0.0, 0
    for group in _batches([len(r) for r in rows], batch_tokens):
        sub = [rows[i] for i in group]
        logits = _forward(model, sub, pv)
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
    enc = [pair_ids(tok, p, a) for p, a in pairs]
    out: list[tuple[bool, float, float]] = [(False, 0.0, float("-inf"))] * len(enc)
    pv = pad_id(tok)
    for group in _batches([len(e[0]) for e in enc], batch_tokens):
        spans = [range(enc[i][1] - 1, enc[i][2] - 1) if enc[i][2] > enc[i][1] else range(0) for i in group]
        logits = _forward(model, [enc[i][0] for i in group], pv, spans)
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
    pv, eos = pad_id(tok), tok.eos_token_id
    for _ in range(n_tokens):
        todo = [i for i in range(len(rows)) if not done[i]]
        if not todo:
            break
        cur = [rows[i] + new[i] for i in todo]
        for group in _batches([len(c) for c in cur], batch_tokens):
            logits = _forward(model, [cur[g] for g in group], pv, [[len(cur[g]) - 1] for g in group])
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


# --- figures on a probe set ------------------------------------------------------------------
@torch.no_grad()
def kl_to_base(model: nn.Module, tok, probes: "ProbeSet", batch_tokens: int = BATCH_TOKENS) -> torch.Tensor:
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


def pulse(model: nn.Module, tok, probes: "ProbeSet", *, n_prompts: int = PULSE_PROMPTS,
          n_facts: int = PULSE_FACTS, batch_tokens: int = BATCH_TOKENS) -> dict[str, Any]:
    """A cheap function-level check run after every edit: KL to the base on the first
    ``n_prompts`` neutral prompts and the retention drop on the first ``n_facts`` known facts.

    Same definitions as the audit's ``kl`` and ``retention_drop`` on a fixed subset (so figures of
    successive edits compare); a full ``kledger audit`` measures the whole probe set. The base's
    retention of the subset is 1 by construction of the probe set (facts the base answers), so
    the drop is ``1 − retention`` where the base retention is not recorded.
    """
    t0 = time.perf_counter()
    k = min(n_prompts, len(probes.prompts))
    sub = dataclasses.replace(probes, texts=(), prompts=probes.prompts[:k], facts=probes.facts[:n_facts],
                              kl_topk_idx=probes.kl_topk_idx[:k], kl_topk_logp=probes.kl_topk_logp[:k],
                              kl_tail_logp=probes.kl_tail_logp[:k])
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


def measure(model: nn.Module, tok, probes: "ProbeSet", edits: Sequence[EditProbe] = (), *,
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
