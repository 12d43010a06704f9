"""v* of the locate-then-edit editors: the target vector ``z = h + δ`` at a block's output.

All requests of a batch are optimised side by side (Adam written out per request, so a finished
request stops exactly), with MEMIT's loss, ENCORE's MPES stop and NAS's norm anchor as
``LocateConfig`` fields; see ``compute_z``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn as nn

from kledger.editors.hooks import Trace, edit_output, input_device, module_device
from kledger.editors.kvcache import build_cache, cache_layers, returned_cache, with_cache
from kledger.editors.locate import LocateConfig, _fill, subject_last_index
from kledger.editors.sites import Sites, get_module
from kledger.editors.tokens import encode_pairs, pad, pad_id
from kledger.ledger.errors import UsageError
from kledger.ledger.records import FactRequest

log = logging.getLogger(__name__)


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
    dev = input_device(model)
    try:
        with torch.no_grad():
            out = model(input_ids=torch.tensor([list(ids)], device=dev), use_cache=True, logits_to_keep=1)
        kv = cache_layers(returned_cache(out))
    except (AttributeError, TypeError, ValueError) as exc:
        log.debug("no prefix cache for %s: %s", type(model).__name__, exc)
        return None
    if kv is None:
        log.debug("no prefix cache for %s", type(model).__name__)
    return kv


def _expand_cache(model: nn.Module, kv, batch: int):
    return build_cache(model, [(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) for k, v in kv])


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
    its KL row's log-probs, and whether every target token of every template is the argmax.
    Ids go to the input device; δ, h0 and the indices that place δ live on block ``layer``'s."""
    dev = input_device(model)
    ldev = leaf.device
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
        b_rows = torch.arange(B, device=ldev)
        b_idx = torch.tensor([r.idx - P for _, r, _ in batch], device=ldev)
        b_req = torch.tensor([i for i, _, _ in batch], device=ldev)
        b_raw = torch.tensor([j == 0 for _, _, j in batch], device=ldev)  # raw prompt rows: h = block output

        def add_delta(h: torch.Tensor) -> torch.Tensor:
            rows_h, idx_h = b_rows.to(h.device), b_idx.to(h.device)
            if capture:
                sel = b_raw.nonzero()[:, 0]
                h0[b_req[sel]] = h[rows_h[sel.to(h.device)], idx_h[sel.to(h.device)]].detach().to(ldev, torch.float32)
            return h.index_put((rows_h, idx_h), leaf[b_req].to(h.device, h.dtype), accumulate=True)

        if P:
            kwargs = {**with_cache(model, _expand_cache(model, kv, B)), "use_cache": True}
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
        out = fn.output
        vecs.append(out[torch.tensor(g_row, device=out.device), torch.tensor(g_pos, device=out.device)])
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
    w = model.get_parameter(sites.mlp_out_param(layer))
    dev = module_device(get_module(model, sites.layer.format(layer)))  # δ lives where the block runs
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
                wd = (leaf[i].norm() / (h0[i].norm() ** 2)).to(nll[i].device)
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
