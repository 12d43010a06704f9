"""Shared pieces of the locate-then-edit editors (MEMIT, AlphaEdit, and their BLUE variants).

* ``subject_last_index``: the token position of the subject's last token in a prompt;
* ``context_templates``: the raw prompt plus a few short prefixes sampled from the model
  (``"<prefix>. {}"``, as in MEMIT), with a fixed seed;
* ``keys_and_outputs``: keys ``k`` (input of the MLP output projection at the subject's last
  token, averaged over the context templates) for several layers and the block output ``h`` at the
  subject's last token of the raw prompt, in one forward pass that stops after the last layer
  needed;
* ``compute_z``: the target vectors ``z = h + δ`` (v*), all requests of a batch optimised side by
  side, each with its own early stop;
* ``memit_solve``: ``V = (λ C0 + K Kᵀ)⁻¹ K`` in float64, so that ``ΔW = R Vᵀ``;
* ``locate_edit``: the per-batch driver both editors share. A ``Solver`` supplies the method's
  closed form (MEMIT or AlphaEdit). Every closed form here is ``ΔW = R Vᵀ`` with ``V`` depending
  on the keys only, so the update is linear in the columns of ``R``: request i's share at layer l
  is the rank-1 pair ``(R_l[:, i], V_l[:, i])`` and the shares sum to the batch update exactly.

Layout: ``ΔW`` is out×in; GPT-2's Conv1D stores in×out, so its factors are swapped (``u = V``,
``v = R``) and the delta is always in the parameter's own storage layout.

Shared defaults (``LocateConfig``), measured on SmolLM2-135M with CounterFact records 0–19
(bench/locate_edit.py; tables in bench/results/locate_edit.md):

* ``v_lr = 2.0`` and the NLL-based early stop: with the reference lr 0.5 and the reference stop
  (total loss < 0.05) all 4 probe requests ran the full 25 evaluations (the KL term alone stays at
  0.05–0.1); stopping on the target NLL < 0.05, lr 1.0 needed 13–19 evaluations and lr 2.0 9–12
  for the same final NLL (≈0.04); the hidden state at layer 8 has norm ≈ 125–150 here, so lr 0.5
  moves δ too slowly to reach the clamp (0.75·‖h‖) in a few steps. On 20 requests lr 2.0 took
  9.4 evaluations on average.
* ``layers``: windows 2–6 / 3–7 / 4–8 on one batch of 20 (λ = 5000): efficacy 0.90 / 1.00 / 0.95,
  paraphrase 0.85 / 0.95 / 0.90, neighbourhood score 0.75 / 0.75 / 0.80, top-1 kept
  0.90 / 0.90 / 0.85 — 3–7 and 4–8 tie within one fact of 20; ``default_layers`` keeps 4–8 (same
  rule as the Llama3-8B reference, better neighbourhood score).
* ``stats_tokens = 8192``: C0 from 8k, 16k and 32k sampled tokens gave the same scores on one
  batch of 20 for both MEMIT (0.95 / 0.90 / 0.80 / 0.85–0.90) and AlphaEdit (1.00 / 0.95 / 0.80 /
  0.85–0.90); the sampled corpus costs a full forward pass per token, so the smallest is the default.
* ``clamp_norm_factor`` 0.75, ``kl_factor`` 0.0625, ``v_weight_decay`` 0.5, 5 prefixes of 10
  tokens, 25 steps: the reference values (not swept here).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn as nn

from kledger.editors.base import EditContext, EditResult, preserved
from kledger.editors.tokens import encode_pairs, pad, pad_id
from kledger.editors.sites import Sites, get_module, num_layers, sites_for
from kledger.editors.hooks import StopAfter, StopForward, Trace, edit_output
from kledger.editors.stats import banned_ids, key_covariances, sample_continuations
from kledger.ledger.deltas import Delta, LowRankDelta
from kledger.ledger.errors import NumericalError, UsageError
from kledger.ledger.records import FactRequest

log = logging.getLogger(__name__)

#: First words of the context prefixes (MEMIT's choice), cycled when more prefixes are asked for.
PREFIX_STARTS = ("The", "Therefore", "Because", "I", "You")
PREFIX_TOP_K = 5


def default_layers(n_layers: int) -> tuple[int, ...]:
    """Critical layers by model depth: a window of 5 consecutive layers starting at ~13 % depth.

    References: GPT-J (28 layers) 3–8, Llama3-8B (32) 4–8, GPT2-XL (48) 13–17. For SmolLM2-135M
    (30 layers) this gives 4–8; windows 2–6, 3–7 and 4–8 were measured (bench/locate_edit.py
    ``--layers``, results in bench/results/locate_edit.md). Models with ≤ 5 layers edit all.
    """
    if n_layers <= 5:
        return tuple(range(n_layers))
    start = max(1, round(0.13 * n_layers))
    start = min(start, n_layers - 5)
    return tuple(range(start, start + 5))


@dataclass(frozen=True)
class LocateConfig:
    """Hyper-parameters shared by MEMIT and AlphaEdit (see each editor's docstring for defaults)."""

    layers: tuple[int, ...] | None = None  # None: default_layers(num_layers(model))
    v_lr: float = 2.0  # Adam learning rate of δ (v*); see module docstring for the measurement
    v_steps: int = 25  # at most this many loss evaluations (updates: one fewer)
    v_stop_loss: float = 0.05  # a request stops once its v* target NLL (per token) is below this
    clamp_norm_factor: float = 0.75  # ‖δ‖ ≤ factor·‖h‖ after every step
    kl_factor: float = 0.0625  # weight of KL(next token after the subject in "{subject} is a")
    v_weight_decay: float = 0.5  # weight of ‖δ‖/‖h‖²
    n_prefixes: int = 5  # context prefixes sampled from the model (plus the raw prompt)
    prefix_tokens: int = 10  # tokens per context prefix
    stats_tokens: int = 8192  # tokens of the key-statistics corpus (8k ≈ 16k ≈ 32k measured)
    stats_seq_len: int = 64  # window / sampled sequence length of the statistics corpus
    blue: bool = False  # BLUE: edit only the first and last critical layers, each with its own z
    split_batch: bool = True  # one EditResult (rank-1 share per layer) per request
    # --- norm control for long sequences (bench/lifelong.py; bench/results/lifelong.md) ---------
    mpes_steps: int = -1  # ENCORE's MPES: stop v* this many steps after the target is top-1 (-1: off)
    norm_penalty: float = 0.0  # ENCORE: ρ·‖ΔW‖²_F in the closed form (ρ I beside λ C0 / α I)
    norm_anchor: bool = False  # NAS: rescale each solved z to the norm of the unedited h
    batch_templates: bool = True  # one padded forward pass for every template of v* (else one per template)

    def __post_init__(self) -> None:
        if isinstance(self.layers, list):
            object.__setattr__(self, "layers", tuple(self.layers))
        if self.layers is not None:
            if not isinstance(self.layers, tuple) or not self.layers or not all(isinstance(x, int) for x in self.layers):
                raise ValueError(f"layers must be a non-empty list of integers, found {self.layers!r}")
        for name in ("v_lr", "clamp_norm_factor"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, found {getattr(self, name)}")
        for name in ("kl_factor", "v_weight_decay", "v_stop_loss"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be ≥ 0, found {getattr(self, name)}")
        if self.v_steps < 1 or self.n_prefixes < 0 or self.prefix_tokens < 1:
            raise ValueError("v_steps and prefix_tokens must be ≥ 1 and n_prefixes ≥ 0")
        if self.mpes_steps < -1 or self.norm_penalty < 0:
            raise ValueError(f"mpes_steps must be ≥ -1 and norm_penalty ≥ 0, found {self.mpes_steps}, {self.norm_penalty}")
        if self.stats_tokens < 1 or self.stats_seq_len < 2:
            raise ValueError("stats_tokens must be ≥ 1 and stats_seq_len ≥ 2")


def resolve_layers(cfg: LocateConfig, model: nn.Module) -> tuple[int, ...]:
    n = num_layers(model)
    layers = tuple(sorted(set(cfg.layers))) if cfg.layers is not None else default_layers(n)
    bad = [l for l in layers if not 0 <= l < n]
    if bad:
        raise UsageError(f"expected critical layers in [0, {n}), found {bad}")
    return layers


def check_requests(requests: Sequence[FactRequest], method: str) -> None:
    if not requests:
        raise UsageError(f"{method}: expected at least one fact request, found none")
    for r in requests:
        if r.subject is None:
            raise UsageError(
                f"{method} reads keys at the subject's last token, so each request needs a subject;"
                f" found none for prompt {r.prompt!r} (pass --subject, or a 'subject' field)"
            )


# --- tokens ------------------------------------------------------------------------------------
def subject_token_span(tok, text: str, subject: str, start: int = 0) -> tuple[int, int]:
    """[first, last + 1) token indices of the first occurrence of ``subject`` at or after char
    ``start`` of ``text`` (tokenised without special tokens)."""
    pos = text.find(subject, start)
    if pos < 0:
        raise UsageError(f"expected subject {subject!r} in {text!r}, found none")
    end = pos + len(subject)
    try:
        offsets = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        hits = [i for i, (s, e) in enumerate(offsets) if s < end and e > pos]
        if hits:
            return hits[0], hits[-1] + 1
    except (NotImplementedError, KeyError, TypeError, ValueError):
        pass
    first = len(tok(text[:pos], add_special_tokens=False)["input_ids"]) if pos else 0
    return first, max(first + 1, len(tok(text[:end], add_special_tokens=False)["input_ids"]))


def subject_last_index(tok, text: str, subject: str, start: int = 0) -> int:
    """Index of the last token of the first occurrence of ``subject`` at or after char ``start``."""
    return subject_token_span(tok, text, subject, start)[1] - 1


def _fill(template: str, prompt: str) -> tuple[str, int]:
    start = template.index("{}")
    return template[:start] + prompt + template[start + 2 :], start


def context_templates(model: nn.Module, tok, n: int, length: int, seed: int) -> list[str]:
    """``["{}"] + [f"{prefix}. {{}}"]``: n prefixes of ``length`` sampled tokens (top-5, fixed seed)."""
    templates = ["{}"]
    if n == 0:
        return templates
    dev = next(model.parameters()).device
    starts = [tok(PREFIX_STARTS[i % len(PREFIX_STARTS)], add_special_tokens=False)["input_ids"] for i in range(n)]
    gen = torch.Generator().manual_seed(seed)
    ban = banned_ids(tok)
    texts: dict[int, str] = {}
    by_len: dict[int, list[int]] = {}
    for i, s in enumerate(starts):
        by_len.setdefault(len(s), []).append(i)
    for _, idx in sorted(by_len.items()):
        start = torch.tensor([starts[i] for i in idx], device=dev)
        out = sample_continuations(model, start, length, gen, PREFIX_TOP_K, ban)
        for i, row in zip(idx, out):
            texts[i] = tok.decode(row.tolist(), skip_special_tokens=True)
    for i in range(n):
        templates.append(texts[i].replace("{", " ").replace("}", " ") + ". {}")
    return templates


# --- keys and block outputs ----------------------------------------------------------------------
@torch.no_grad()
def keys_and_outputs(model: nn.Module, tok, sites: Sites, requests: Sequence[FactRequest], templates: Sequence[str],
                     key_layers: Sequence[int], out_layer: int | None = None,
                     rows_per_pass: int = 96) -> tuple[dict[int, torch.Tensor], torch.Tensor | None]:
    """Keys ``{layer: K (in×n float64)}`` averaged over templates; ``H`` (d×n) at ``out_layer``.

    ``H`` is block ``out_layer``'s output at the subject's last token of the raw prompt (template
    0). One forward pass per chunk of rows, stopped after the highest layer needed.
    """
    dev = next(model.parameters()).device
    texts, idxs = [], []
    for r in requests:
        for t in templates:
            text, start = _fill(t, r.prompt)
            texts.append(tok(text, add_special_tokens=False)["input_ids"])
            idxs.append(subject_last_index(tok, text, r.subject, start))
    n, m = len(requests), len(templates)
    top = max(list(key_layers) + ([out_layer] if out_layer is not None else []))
    keys: dict[int, list[torch.Tensor]] = {l: [] for l in key_layers}
    outs: list[torch.Tensor] = []
    for c in range(0, len(texts), rows_per_pass):
        ids, mask = pad(texts[c : c + rows_per_pass], pad_id(tok), dev)
        rows = torch.arange(ids.shape[0], device=dev)
        pos = torch.tensor(idxs[c : c + rows_per_pass], device=dev)
        with contextlib.ExitStack() as stack:
            kt = {l: stack.enter_context(Trace(model, sites.mlp_out.format(l), retain_input=True, retain_output=False))
                  for l in key_layers}
            ot = (stack.enter_context(Trace(model, sites.layer.format(out_layer))) if out_layer is not None else None)
            stack.enter_context(StopAfter(model, sites.layer.format(top), retain_output=False))
            try:
                model(input_ids=ids, attention_mask=mask, use_cache=False)
            except StopForward:
                pass
            for l in key_layers:
                keys[l].append(kt[l].input[rows, pos].double())
            if ot is not None:
                outs.append(ot.output[rows, pos].double())
    K = {l: torch.cat(v).view(n, m, -1).mean(dim=1).T.contiguous() for l, v in keys.items()}
    H = torch.cat(outs).view(n, m, -1)[:, 0].T.contiguous() if outs else None
    return K, H


# --- v* ------------------------------------------------------------------------------------------
@dataclass
class _ZRow:
    ids: list[int]
    idx: int  # subject's last token
    span: tuple[int, int] | None  # target tokens (None: the KL row)


@dataclass
class ZInfo:
    losses: list[list[float]] = field(default_factory=list)  # per request: loss per evaluated step
    nll: list[float] = field(default_factory=list)  # per request: last NLL
    delta_norm: list[float] = field(default_factory=list)
    h_norm: list[float] = field(default_factory=list)
    top1: list[bool] = field(default_factory=list)  # per request: the target became top-1 on every template

    def for_request(self, i: int) -> dict[str, Any]:
        traj = self.losses[i]
        return {"loss_start": round(traj[0], 5), "loss_end": round(traj[-1], 5), "steps": len(traj),
                "nll_end": round(self.nll[i], 5), "delta_norm": round(self.delta_norm[i], 4),
                "h_norm": round(self.h_norm[i], 4)}


def _z_rows(tok, r: FactRequest, templates: Sequence[str]) -> list[_ZRow]:
    rows = []
    for t in templates:
        text, start = _fill(t, r.prompt)
        enc, spans = encode_pairs(tok, [text], [r.target_new], "cpu")
        idx = subject_last_index(tok, text, r.subject, start)
        if idx >= spans[0][0]:
            raise UsageError(f"subject {r.subject!r} must end before the target in {text!r}")
        rows.append(_ZRow(enc["input_ids"][0].tolist(), idx, spans[0]))
    kl_text = f"{r.subject} is a"
    rows.append(_ZRow(tok(kl_text, add_special_tokens=False)["input_ids"], subject_last_index(tok, kl_text, r.subject), None))
    return rows


def _prefix_kv(model: nn.Module, ids: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Per-layer (key, value) cache of a token prefix (batch 1), or None if the model has none."""
    dev = next(model.parameters()).device
    try:
        with torch.no_grad():
            out = model(input_ids=torch.tensor([list(ids)], device=dev), use_cache=True, logits_to_keep=1)
        return [(layer.keys, layer.values) for layer in out.past_key_values.layers]
    except (AttributeError, TypeError, ValueError) as exc:
        log.debug("no prefix cache for %s: %s", type(model).__name__, exc)
        return None


def _expand_cache(model: nn.Module, kv, batch: int):
    from transformers import DynamicCache

    return DynamicCache([(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) for k, v in kv],
                        config=model.config)


def _passes(model, tok, rows, n: int, m: int, batched: bool, prefix_cache: bool) -> list[tuple[list[tuple[int, int]], int, Any]]:
    """The forward passes of one v* step: ``(cells, prefix length, prefix KV cache)`` where each
    cell ``(i, j)`` is request i's row for template j (j = m: the KL row). Batched: one pass of
    every cell, no prefix cache. Otherwise one pass per template, the tokens all its rows share
    before the first δ position run once into a KV cache."""
    if batched:
        return [([(i, j) for i in range(n) for j in range(m + 1)], 0, None)]
    out = []
    for j in range(m + 1):
        grp = [rows[i][j] for i in range(n)]
        P, kv = 0, None
        if prefix_cache:
            p = min(r.idx for r in grp)  # every δ position stays outside the cache
            first = grp[0].ids
            for r in grp[1:]:
                k = 0
                while k < min(p, len(r.ids)) and r.ids[k] == first[k]:
                    k += 1
                p = k
            if p >= 2:
                kv = _prefix_kv(model, first[:p])
                if kv is not None:
                    P = p
        out.append(([(i, j) for i in range(n)], P, kv if P else None))
    return out


def _step_losses(model, tok, sites: Sites, layer: int, rows, passes, active: list[int], leaf: torch.Tensor,
                 h0: torch.Tensor, capture: bool, m: int):
    """Run one v* step's forward passes: per active request its mean target NLL (over templates),
    its KL row's log-probs, and whether every target token of every template is the argmax."""
    dev = next(model.parameters()).device
    lm_head = get_module(model, sites.lm_head)
    softcap = getattr(model.config, "final_logit_softcapping", None)
    live = set(active)
    vecs, targets, owners = [], [], []  # gathered final-norm vectors; target id (-1: KL); (request, kind, template)
    for cells, P, kv in passes:
        batch = [(i, rows[i][j], j) for i, j in cells if i in live]
        if not batch:
            continue
        ids, mask = pad([r.ids[P:] for _, r, _ in batch], pad_id(tok), dev)
        B = len(batch)
        b_rows = torch.arange(B, device=dev)
        b_idx = torch.tensor([r.idx - P for _, r, _ in batch], device=dev)
        b_req = torch.tensor([i for i, _, _ in batch], device=dev)
        b_raw = torch.tensor([j == 0 for _, _, j in batch], device=dev)  # raw prompt rows: h = block output

        def add_delta(h: torch.Tensor) -> torch.Tensor:
            if capture:
                sel = b_raw.nonzero()[:, 0]
                h0[b_req[sel]] = h[b_rows[sel], b_idx[sel]].detach().float()
            return h.index_put((b_rows, b_idx), leaf[b_req].to(h.dtype), accumulate=True)

        if P:
            kwargs = {"past_key_values": _expand_cache(model, kv, B), "use_cache": True}
            mask = torch.cat([torch.ones(B, P, dtype=mask.dtype, device=dev), mask], dim=1)
        else:
            kwargs = {"use_cache": False}
        with edit_output(model, sites.layer.format(layer), add_delta), \
                Trace(model, sites.final_norm, detach=False) as fn:
            model(input_ids=ids, attention_mask=mask, logits_to_keep=1, **kwargs)
        g_row, g_pos = [], []
        for q, (i, r, j) in enumerate(batch):
            if r.span is None:
                g_row.append(q), g_pos.append(r.idx - P), targets.append(-1), owners.append((i, "kl", j))
            else:
                s, e = r.span
                for pos in range(s, e):
                    g_row.append(q), g_pos.append(pos - 1 - P), targets.append(r.ids[pos])
                    owners.append((i, "nll", j))
        vecs.append(fn.output[torch.tensor(g_row, device=dev), torch.tensor(g_pos, device=dev)])
    logits = lm_head(torch.cat(vecs)).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    logp = torch.log_softmax(logits, dim=-1)
    top = logits.argmax(-1).tolist()
    nll_terms: dict[tuple[int, int], list[torch.Tensor]] = {}
    kl_rows: dict[int, torch.Tensor] = {}
    hit = {i: True for i in active}
    for q, ((i, kind, j), t) in enumerate(zip(owners, targets)):
        if kind == "nll":
            nll_terms.setdefault((i, j), []).append(-logp[q, t])
            hit[i] = hit[i] and top[q] == t
        else:
            kl_rows[i] = logp[q]
    nll = {i: torch.stack([torch.stack(nll_terms[(i, j)]).mean() for j in range(m)]).mean() for i in active}
    return nll, kl_rows, hit


def compute_z(model: nn.Module, tok, sites: Sites, layer: int, requests: Sequence[FactRequest],
              templates: Sequence[str], cfg: LocateConfig, prefix_cache: bool = True) -> tuple[torch.Tensor, ZInfo]:
    """Target vectors ``Z`` (d×n, float64) at block ``layer``'s output, and per-request traces.

    Loss per request: mean over templates of the target's NLL (per token), read at the final
    layer with δ added to block ``layer``'s output at the subject's last token of every prompt
    + ``kl_factor``·KL(p_δ ‖ p_0) of the next token after the subject in "{subject} is a" (as in
    the MEMIT reference) + ``v_weight_decay``·‖δ‖/‖h‖². Adam (per request, written out so that a
    finished request stops exactly), ‖δ‖ clamped to ``clamp_norm_factor``·‖h‖ after each step,
    early stop when the target NLL term < ``v_stop_loss`` (the reference compares the total loss,
    but on SmolLM2-135M the KL term alone stays at 0.05–0.1 once the target is learnt, so the total
    never fell below 0.05 and every request ran all steps). Finished requests leave the batch.

    MPES (``cfg.mpes_steps`` ≥ 0, ENCORE): a request also stops ``mpes_steps`` updates after the
    first evaluation at which every target token of every template is the argmax. NAS
    (``cfg.norm_anchor``): ``z`` is rescaled to ``‖h‖``, the unedited vector's norm.

    ``cfg.batch_templates``: every template's rows of every request run as one padded batch per
    step (as EasyEdit does); otherwise one pass per template, with the tokens all its rows share
    before the first δ position run once into a KV cache (``prefix_cache``). Both give the same
    losses up to float rounding (tested).
    """
    dev = next(model.parameters()).device
    w = model.get_parameter(sites.mlp_out_param(layer))
    d = w.shape[1] if sites.mlp_out_transposed else w.shape[0]
    n, m = len(requests), len(templates)
    rows = [_z_rows(tok, r, templates) for r in requests]  # per request: m template rows + 1 KL row
    passes = _passes(model, tok, rows, n, m, cfg.batch_templates, prefix_cache)
    delta = torch.zeros(n, d, device=dev, dtype=torch.float32)
    m1, m2 = torch.zeros_like(delta), torch.zeros_like(delta)
    t_adam = torch.zeros(n)
    h0 = torch.zeros(n, d, device=dev, dtype=torch.float32)
    init_kl: dict[int, torch.Tensor] = {}
    info = ZInfo(losses=[[] for _ in range(n)], nll=[0.0] * n)
    done = [False] * n
    since_top1: list[int | None] = [None] * n
    b1, b2, eps = 0.9, 0.999, 1e-8
    for step in range(cfg.v_steps):
        active = [i for i in range(n) if not done[i]]
        if not active:
            break
        leaf = delta.clone().requires_grad_(True)
        with torch.enable_grad():
            nll, kl_rows, hit = _step_losses(model, tok, sites, layer, rows, passes, active, leaf, h0, step == 0, m)
            losses: dict[int, torch.Tensor] = {}
            for i in active:
                cur = kl_rows[i]
                if i not in init_kl:
                    init_kl[i] = cur.detach().clone()
                kl = (cur.exp() * (cur - init_kl[i])).sum()
                wd = leaf[i].norm() / (h0[i].norm() ** 2)
                losses[i] = nll[i] + cfg.kl_factor * kl + cfg.v_weight_decay * wd
                info.losses[i].append(float(losses[i].detach()))
                info.nll[i] = float(nll[i].detach())
                if hit[i] and since_top1[i] is None:
                    since_top1[i] = 0
            stepping = []
            for i in active:
                mpes_done = cfg.mpes_steps >= 0 and since_top1[i] is not None and since_top1[i] >= cfg.mpes_steps
                if info.nll[i] < cfg.v_stop_loss or mpes_done:
                    done[i] = True
                else:
                    stepping.append(i)
            if step == cfg.v_steps - 1 or not stepping:
                break
            total = torch.stack([losses[i] for i in stepping]).sum()
            (grad,) = torch.autograd.grad(total, leaf)
        for i in stepping:
            if since_top1[i] is not None:
                since_top1[i] += 1
        _adam_step(delta, m1, m2, t_adam, grad, stepping, h0, cfg, (b1, b2, eps))
    info.delta_norm = [float(x) for x in delta.norm(dim=1)]
    info.h_norm = [float(x) for x in h0.norm(dim=1)]
    info.top1 = [since_top1[i] is not None for i in range(n)]
    Z = h0 + delta
    if cfg.norm_anchor:
        Z = Z * (h0.norm(dim=1, keepdim=True) / Z.norm(dim=1, keepdim=True).clamp_min(1e-12))
    return Z.double().T.contiguous(), info


@torch.no_grad()
def _adam_step(delta, m1, m2, t_adam, grad, stepping, h0, cfg: LocateConfig, betas) -> None:
    """One Adam update of the stepping requests' δ rows, then the clamp ‖δ‖ ≤ factor·‖h‖."""
    b1, b2, eps = betas
    dev = delta.device
    sel = torch.tensor(stepping, device=dev)
    g = grad[sel]
    t_adam[stepping] += 1
    tt = t_adam[stepping].to(dev).unsqueeze(1)
    m1[sel] = b1 * m1[sel] + (1 - b1) * g
    m2[sel] = b2 * m2[sel] + (1 - b2) * g * g
    mhat = m1[sel] / (1 - b1**tt)
    vhat = m2[sel] / (1 - b2**tt)
    upd = delta[sel] - cfg.v_lr * mhat / (vhat.sqrt() + eps)
    max_norm = cfg.clamp_norm_factor * h0[sel].norm(dim=1, keepdim=True)
    norm = upd.norm(dim=1, keepdim=True)
    delta[sel] = torch.where(norm > max_norm, upd * (max_norm / norm), upd)


# --- closed forms --------------------------------------------------------------------------------
def memit_solve(K: torch.Tensor, C0: torch.Tensor, lam: float, rho: float = 0.0) -> torch.Tensor:
    """``V = (λ C0 + K Kᵀ + ρ I)⁻¹ K`` (float64), so that ``ΔW = R Vᵀ`` minimises
    ``‖ΔW K − R‖² + λ·tr(ΔW C0 ΔWᵀ) + ρ‖ΔW‖²_F`` (ρ: ENCORE's norm penalty)."""
    K = K.double()
    A = lam * C0.double() + K @ K.T
    if rho:
        A = A + rho * torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
    return torch.linalg.solve(A, K)


class Solver(ABC):
    """A method's closed form: prepared once per batch, then ``V`` for each layer's keys."""

    wants_final_keys = False  # whether locate_edit should return post-edit keys (AlphaEdit's state)

    @abstractmethod
    def setup(self, model: nn.Module, tok, layers: Sequence[int], ctx: EditContext, cfg: LocateConfig) -> dict:
        """Load statistics for ``layers``; return a JSON description of them."""

    @abstractmethod
    def solve(self, layer: int, K: torch.Tensor) -> torch.Tensor:
        """``V`` (in×n float64) with ``ΔW = R Vᵀ``."""

    def state(self, layer: int, K: torch.Tensor) -> dict[str, torch.Tensor]:
        return {}


def stats_for(model, tok, layers, ctx: EditContext, cfg: LocateConfig) -> tuple[dict[int, torch.Tensor], dict]:
    return key_covariances(model, tok, layers, ctx, n_tokens=cfg.stats_tokens, seq_len=cfg.stats_seq_len,
                           seed=ctx.seed)


# --- the driver ----------------------------------------------------------------------------------
def locate_edit(method: str, model: nn.Module, tok, requests: Sequence[FactRequest], ctx: EditContext,
                cfg: LocateConfig, solver: Solver) -> list[EditResult]:
    """Compute one batch: v*, keys, per-layer solves with the residual recomputed after each layer.

    Plain: z at the last critical layer L; for each critical layer l (ascending)
    ``R = (Z − H_L)/(layers left)`` with ``H_L`` from the current working copy, then ``ΔW_l``
    is written into the working copy. BLUE (``cfg.blue``): for l in (first, last critical
    layer): z at l, ``R = Z_l − H_l`` (whole residual), ``ΔW_l`` written before the next one.
    The model is restored bit for bit on exit.
    """
    t0 = time.perf_counter()
    check_requests(requests, method)
    requests = list(requests)
    sites = sites_for(model)
    layers = resolve_layers(cfg, model)
    if cfg.blue:
        edit_layers = tuple(sorted({layers[0], layers[-1]}))
        phases = [(l, (l,)) for l in edit_layers]
    else:
        edit_layers = layers
        phases = [(layers[-1], layers)]
    n = len(requests)
    params = {l: sites.mlp_out_param(l) for l in edit_layers}
    per_layer: dict[int, dict[str, Any]] = {}
    zinfos: dict[int, ZInfo] = {}
    with preserved(model):
        t_stats = time.perf_counter()
        stats_desc = solver.setup(model, tok, edit_layers, ctx, cfg)
        stats_s = time.perf_counter() - t_stats
        templates = context_templates(model, tok, cfg.n_prefixes, cfg.prefix_tokens, ctx.seed)
        for z_layer, lays in phases:
            Z, zinfos[z_layer] = compute_z(model, tok, sites, z_layer, requests, templates, cfg)
            for j, l in enumerate(lays):
                K, H = keys_and_outputs(model, tok, sites, requests, templates, [l], z_layer)
                R = (Z - H) / (len(lays) - j)
                V = solver.solve(l, K[l])
                if not (torch.isfinite(V).all() and torch.isfinite(R).all()):
                    raise NumericalError(f"{method}: the solve at layer {l} produced NaN/Inf")
                u, v = _factors(R, V, sites.mlp_out_transposed)
                w = model.get_parameter(params[l])
                with torch.no_grad():
                    w.addmm_(u.to(w.device, w.dtype), v.to(w.device, w.dtype).T)
                per_layer[l] = {"R": R, "V": V, "K": K[l], "z_layer": z_layer}
        final_keys = (keys_and_outputs(model, tok, sites, requests, templates, list(edit_layers))[0]
                      if solver.wants_final_keys else {})
    batch_s = time.perf_counter() - t0
    common_ens = {"layers": list(edit_layers), "critical_layers": list(layers), "z_layers": [p[0] for p in phases],
                  "tensors": [params[l] for l in edit_layers], "blue": cfg.blue,
                  "context_templates": templates, "stats": stats_desc}
    groups = [[i] for i in range(n)] if cfg.split_batch else [list(range(n))]
    results = []
    for g in groups:
        tensors, state = {}, {}
        ens_norms, res_norms, d_norms, ranks = {}, {}, {}, {}
        for l in edit_layers:
            pl = per_layer[l]
            R, V = pl["R"][:, g], pl["V"][:, g]
            u, v = _factors(R, V, sites.mlp_out_transposed)
            shape = tuple(model.get_parameter(params[l]).shape)
            tensors[params[l]] = LowRankDelta(shape, u.contiguous(), v.contiguous())
            ranks[params[l]] = len(g)
            ens_norms[str(l)] = [round(float(x), 4) for x in pl["K"][:, g].norm(dim=0)]
            res_norms[str(l)] = [round(float(x), 4) for x in R.norm(dim=0)]
            d_norms[str(l)] = round(float(torch.sqrt(((R.T @ R) * (V.T @ V)).sum().clamp_min(0))), 6)
            if l in final_keys:
                state.update(solver.state(l, final_keys[l][:, g]))
        vstar = {str(zl): (zi.for_request(g[0]) if len(g) == 1 else
                           {"loss_start": [zi.for_request(i)["loss_start"] for i in g],
                            "loss_end": [zi.for_request(i)["loss_end"] for i in g],
                            "steps": [zi.for_request(i)["steps"] for i in g]})
                 for zl, zi in zinfos.items()}
        last = vstar[str(phases[-1][0])]
        metrics = {
            "v_loss_start": last["loss_start"], "v_loss_end": last["loss_end"], "v_steps": last["steps"],
            "v_star": vstar, "residual_norm": res_norms, "delta_norm": d_norms,
            "time_s": round(batch_s * len(g) / n, 4), "batch_time_s": round(batch_s, 4), "batch_size": n,
            "stats_hit": bool(stats_desc.get("hit")), "stats_time_s": round(stats_s, 4),
        }
        ens = dict(common_ens, key_norms=ens_norms, rank=ranks)
        results.append(EditResult(tuple(requests[i] for i in g), Delta(tensors, state), ens, metrics))
    return results


def _factors(R: torch.Tensor, V: torch.Tensor, transposed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 factors (u, v) with ``u @ v.T`` = ΔW in storage layout (out×in, or in×out for Conv1D)."""
    R32, V32 = R.float(), V.float()
    return (V32, R32) if transposed else (R32, V32)
