"""The rows an UltraEdit turn writes (``editors/ultraedit.py``): keys and output gradients at the
chosen positions of one teacher-forced pass, and the subject's keys under sampled context prefixes."""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn

from kledger.editors.hooks import LogitsAt, Trace, edit_output, input_device, rows_at
from kledger.editors.locate import context_templates, keys_and_outputs, subject_last_index
from kledger.editors.sites import Sites
from kledger.editors.tokens import encode_pairs
from kledger.ledger.errors import UsageError
from kledger.ledger.records import FactRequest


@dataclass
class Turn:
    """One forward/backward pass: per layer keys (rows×in) and grads (rows×out), row owners, success."""

    keys: dict[int, torch.Tensor]
    grads: dict[int, torch.Tensor]
    owners: list[int]  # request index of each row
    top1: list[bool]  # per request of the pass: every target token is the argmax
    nll: list[float]
    # per row: it is a target-predicting position (not the subject's row) whose next token is already the argmax
    settled: list[bool]


def features(model: nn.Module, tok, sites: Sites, layers: Sequence[int], requests: Sequence[FactRequest],
             with_grad: bool = True, positions: str = "target", first_weight: float = 1.0) -> Turn:
    """Keys and output gradients at the positions that predict target tokens (one padded batch).

    A request's loss is the weighted mean NLL of its target tokens, the first token weighted
    ``first_weight`` and the others 1 (1: the plain mean)."""
    dev = input_device(model)  # inputs go where the embedding is (device maps)
    enc, spans = encode_pairs(tok, [r.prompt for r in requests], [r.target_new for r in requests], dev)
    rows, subject_rows = [], set()
    for i, (r, (s, e)) in enumerate(zip(requests, spans)):
        if positions in ("subject", "both", "answer"):
            if r.subject is None:
                raise UsageError(f"ultraedit positions={positions!r} needs a subject; found none for {r.prompt!r}")
            subject_rows.add(len(rows))
            rows.append((i, subject_last_index(tok, r.prompt, r.subject)))
        if positions in ("target", "both"):
            rows.extend((i, p) for p in range(s - 1, e - 1))
        elif positions == "answer":  # inside the answer: the key of target token t predicts token t+1
            rows.extend((i, p) for p in range(s, e - 1))
    hit_rows = [(i, p) for i, (s, e) in enumerate(spans) for p in range(s - 1, e - 1)]
    ri = torch.tensor([i for i, _ in hit_rows], device=dev)
    rp = torch.tensor([p for _, p in hit_rows], device=dev)
    tgt = enc["input_ids"][ri, rp + 1]
    ki = torch.tensor([i for i, _ in rows], device=dev)
    kp = torch.tensor([p for _, p in rows], device=dev)
    outs: dict[int, torch.Tensor] = {}

    def grab(l: int):
        def fn(h: torch.Tensor) -> torch.Tensor:
            if with_grad and not h.requires_grad:  # parameters are frozen: make the output a leaf
                h = h.detach().requires_grad_(True)
            outs[l] = h
            return h
        return fn

    with contextlib.ExitStack() as stack, torch.set_grad_enabled(with_grad):
        tr = {l: stack.enter_context(Trace(model, sites.mlp_out.format(l), retain_input=True, retain_output=False))
              for l in layers}
        for l in layers:
            stack.enter_context(edit_output(model, sites.mlp_out.format(l), grab(l)))
        # the LM head sees only each row's target-predicting positions (padded by repeating the last)
        width = max(e - s for s, e in spans)
        index = torch.tensor([[s - 1 + min(t, e - s - 1) for t in range(width)] for s, e in spans], device=dev)
        with LogitsAt(model, index) as head:
            out = model(**enc, use_cache=False).logits
            hooked = head.handle is not None
        if hooked:  # row i's target token t is at column t
            col = torch.tensor([p - spans[i][0] + 1 for i, p in hit_rows], device=dev)
        else:
            col = rp
        logits = out[ri.to(out.device), col.to(out.device)].float().to(dev)  # split models: logits on the last device
        logp = torch.log_softmax(logits, dim=-1)
        tok_nll = -logp.gather(1, tgt[:, None])[:, 0]
        hit = logits.argmax(-1) == tgt
        n = len(requests)
        w = torch.tensor([first_weight if p == spans[i][0] - 1 else 1.0 for i, p in hit_rows], device=dev)
        counts = torch.zeros(n, device=dev).index_add_(0, ri, w)
        per_req = torch.zeros(n, device=dev).index_add_(0, ri, w * tok_nll) / counts
        top1 = [bool(hit[ri == i].all()) for i in range(n)]
        hit_at = dict(zip(hit_rows, hit.tolist()))
        settled = [j not in subject_rows and hit_at.get(row, False) for j, row in enumerate(rows)]
        keys = {l: rows_at(tr[l].input, ki, kp) for l in layers}  # each on its layer's device
        grads = {}
        if with_grad:
            gs = torch.autograd.grad(per_req.sum(), [outs[l] for l in layers])
            grads = {l: rows_at(g, ki, kp) for l, g in zip(layers, gs)}
    return Turn(keys, grads, [i for i, _ in rows], top1, [float(x) for x in per_req.detach()], settled)


def context_grads(model: nn.Module, tok, sites: Sites, layers: Sequence[int], requests: Sequence[FactRequest],
                  turn: Turn, templates: Sequence[str], positions: str, first_weight: float) -> dict[int, torch.Tensor]:
    """Per layer, ``turn``'s gradients averaged with the same rows' gradients under each context prefix in
    ``templates`` (``"… {}"``): one direction per row that moves the answer after other text too (the keys stay
    the prompt's). A prefixed prompt has the same rows in the same order (subject row, then the answer's)."""
    total = {l: turn.grads[l].clone() for l in layers}
    for t in templates:
        shifted = [dataclasses.replace(r, prompt=t.format(r.prompt)) for r in requests]
        ft = features(model, tok, sites, layers, shifted, positions=positions, first_weight=first_weight)
        if ft.owners != turn.owners:
            raise AssertionError("context_grads: a prefixed prompt gave other rows than the prompt")
        for l in layers:
            total[l] += ft.grads[l].to(total[l].device)
    return {l: g / (1 + len(templates)) for l, g in total.items()}


def context_keys(model: nn.Module, tok, sites: Sites, layers: Sequence[int], requests: Sequence[FactRequest],
                 n_prefixes: int, prefix_tokens: int, seed: int) -> dict[int, torch.Tensor]:
    """Per layer ``(n, m, in)``: each request's subject key under ``m`` sampled context prefixes."""
    templates = context_templates(model, tok, n_prefixes, prefix_tokens, seed)[1:]
    K, _ = keys_and_outputs(model, tok, sites, requests, templates, layers, average=False)
    return {l: K[l].T.reshape(len(requests), len(templates), -1) for l in layers}


def _with_context_rows(K: torch.Tensor, Gn: torch.Tensor, V: torch.Tensor, owners: list[int],
                       ctx_k: torch.Tensor, lr: float) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Append each active request's context-prefix keys as rows whose value direction is its
    prompt row's (the first row it owns: the subject's): ``v = −lr·‖k‖²·ĝ``."""
    first: dict[int, int] = {}
    for j, o in enumerate(owners):
        first.setdefault(o, j)
    order = sorted(first)
    m = ctx_k.shape[1]
    P = torch.cat([ctx_k[i] for i in order]).to(K.device, K.dtype)
    src = torch.tensor([first[i] for i in order for _ in range(m)], device=Gn.device)
    Vp = -lr * (P * P).sum(1, keepdim=True).to(Gn.dtype) * Gn[src]
    return torch.cat([K, P]), torch.cat([V, Vp.to(V.dtype)]), owners + [i for i in order for _ in range(m)]


def _with_context_mean(K: torch.Tensor, owners: list[int], ctx_k: torch.Tensor) -> torch.Tensor:
    """``K`` with each active request's subject row (its first) replaced by the mean of that key and its
    context-prefix keys (MEMIT's averaged key): one row per request, a key shared by the subject's contexts."""
    K = K.clone()
    seen: set[int] = set()
    for j, o in enumerate(owners):
        if o in seen:
            continue
        seen.add(o)
        K[j] = (K[j] + ctx_k[o].to(K.device, K.dtype).sum(0)) / (1 + ctx_k.shape[1])
    return K
