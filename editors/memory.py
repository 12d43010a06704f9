"""A key-gated edit memory (``--method memory``): edits that leave every other input untouched.

The family is GRACE's (Hartvigsen et al., arXiv 2211.11031): a codebook of (key, radius, value)
entries beside one layer, consulted on every token. Here an entry adds its value to the output of
layer ``layer``'s MLP output projection (``down_proj``) at every token whose key — that
projection's input — and the keys of the tokens before it match the entry's key span (each within
its radius; the best match wins); every other token sees the unedited model. Weight editors write
each fact into shared weights and trade edit strength against what the model already knew
(``bench/results/lifelong.md``); an entry does not, because it is silent wherever its gate is closed.

One edit, per request:

* **key span**: the projection's input at the subject's last ``span`` tokens of the prompt (all of
  a shorter subject). A span, not the last token alone: "Martin France" must not fire on "France";
* **value**: a vector δ fitted (Adam, at most ``steps``) so that adding it at the subject's last
  token makes the target the continuation under the prompt and ``prefixes`` sampled context
  prefixes, stopping as soon as every context's mean target NLL is below ``nll_stop`` (the requests
  of a batch are fitted side by side in one padded batch, each with its own δ, and leave the batch
  when done);
* **radii**: ``gamma`` × the distance from the last key to the nearest key of ``bank_tokens``
  tokens of the sampled statistics corpus (``editors/stats.py``: text the base model writes, no
  evaluation data) or of the other entries' last keys; at the earlier span positions, a looser
  ``span_gamma`` × the distance to the nearest bank key. Chosen on the 1,000 subjects of the
  lifelong stream (``bench/results/lifelong.md``): span 2 with ``span_gamma`` 1.2 keeps 0.889 of
  the paraphrases naming their subject inside their gate (0.904 with the last token alone) and
  opens the gate on 11 of the audit's 231 prompts (18 with the last token alone, 6 at span 4 —
  which keeps only 0.687 of the paraphrases).
  A span the gate of a live entry already matches (the same subject edited again) is written into
  that entry instead: its δ, fitted with the memory on, adds to the entry's value.

**Storage.** The memory is three tensors beside the model (``kledger_memory.<layer>.keys``
capacity × span × d_in, ``.radii`` capacity × span, ``.values`` capacity × d_out; zero in the
base): an edit's delta is a ``SparseDelta`` on its slot's rows, so the ledger stores, sums,
reverts and merges it like any other delta, and replaying the ledger rebuilds the memory bit for
bit. A slot is free while it is all zero: a reverted entry's slot is reused. The gate's hook is
installed by ``hooks.install_memory``; the orchestrator adds the memory to a freshly loaded base
model (``Editor.attach``) before any delta is written into it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn

from kledger.editors.base import EditContext, Editor, EditResult, preserved
from kledger.editors.hooks import GatedMemory, StopAfter, StopForward, edit_output, install_memory, memory_off, memory_prefix
from kledger.editors.locate import context_templates, subject_token_span
from kledger.editors.sites import num_layers, sites_for
from kledger.editors.stats import _corpus_path, _load_ids, _store_ids, corpus_descriptor, corpus_windows
from kledger.editors.tokens import encode_pairs, pad, pad_id
from kledger.ledger.deltas import Delta
from kledger.ledger.errors import UsageError
from kledger.ledger.kinds import SparseDelta
from kledger.ledger.records import FactRequest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MemoryConfig:
    layer: int = 3  # the MLP whose output an entry adds to (its key: that projection's input)
    capacity: int = 2048  # entries the memory holds (rows of its tensors)
    span: int = 2  # an entry matches up to the subject's last ``span`` tokens (fewer for shorter subjects)
    span_gamma: float = 1.2  # radius at the earlier span positions: span_gamma × distance to the nearest bank key
    gamma: float = 0.8  # radius = gamma × distance to the nearest bank key (or other entry's last key)
    prefixes: int = 2  # sampled context prefixes the value is fitted under (besides the bare prompt)
    steps: int = 40  # most Adam steps per value
    lr: float = 0.5
    nll_stop: float = 0.1  # a value is done once every context's mean target NLL is below this
    bank_tokens: int = 4096  # tokens of the sampled corpus whose keys bound each radius
    bank_seq_len: int = 64

    def __post_init__(self) -> None:
        if self.capacity < 1 or self.span < 1 or self.steps < 1 or self.bank_tokens < 1 or self.bank_seq_len < 2:
            raise ValueError("expected capacity, span, steps, bank_tokens ≥ 1 and bank_seq_len ≥ 2")
        if self.span_gamma <= 0:
            raise ValueError(f"expected span_gamma > 0, found {self.span_gamma}")
        if not 0 < self.gamma < 1:
            raise ValueError(f"expected 0 < gamma < 1 (a radius short of the nearest other key), found {self.gamma}")
        if self.lr <= 0 or self.nll_stop <= 0 or self.prefixes < 0:
            raise ValueError("expected lr > 0, nll_stop > 0 and prefixes ≥ 0")


def _site(model: nn.Module, layer: int) -> tuple[str, int, int]:
    """(module path, key width, value width) of ``layer``'s MLP output projection."""
    sites = sites_for(model)
    w = dict(model.named_parameters())[sites.mlp_out_param(layer)]
    d_out, d_in = (w.shape[1], w.shape[0]) if sites.mlp_out_transposed else (w.shape[0], w.shape[1])
    return sites.mlp_out.format(layer), int(d_in), int(d_out)


@torch.no_grad()
def token_keys(model: nn.Module, path: str, rows: Sequence[Sequence[int]], pad_value: int,
               batch: int = 16) -> list[torch.Tensor]:
    """Each id row's keys at ``path`` (the module's input), one (len(row) × d_in) fp32 tensor per row;
    the forward pass stops at the module."""
    out: list[torch.Tensor] = []
    dev = next(model.parameters()).device
    for i in range(0, len(rows), batch):
        part = rows[i : i + batch]
        ids, mask = pad(part, pad_value, dev)
        with StopAfter(model, path, retain_input=True, retain_output=False) as tr:
            try:
                model(input_ids=ids, attention_mask=mask, use_cache=False)
            except StopForward:
                pass
        out.extend(tr.input[j, : len(r)].float().cpu() for j, r in enumerate(part))
    return out


def bank_keys(model: nn.Module, tok, path: str, cfg: MemoryConfig, ctx: EditContext) -> torch.Tensor:
    """Keys of the first ``bank_tokens`` tokens of the sampled statistics corpus (ids cached per base model)."""
    corpus = corpus_descriptor(ctx, cfg.bank_seq_len, ctx.seed)
    cpath = _corpus_path(ctx.cache_dir, corpus, ctx.fingerprint) if corpus["kind"] == "sampled" else None
    had = _load_ids(cpath)
    rows = corpus_windows(model, tok, corpus, cfg.bank_tokens, cfg.bank_seq_len, ctx.seed, cpath)
    if had is None and cpath is not None and rows and all(len(r) == cfg.bank_seq_len for r in rows):
        _store_ids(cpath, torch.tensor(rows))
    return torch.cat(token_keys(model, path, rows, pad_id(tok)))


def _contexts(tok, requests: Sequence[FactRequest], templates: Sequence[str]):
    """Every (request, template) text, its owner request, and its subject's last and first token index."""
    texts, owner, pos, first = [], [], [], []
    for i, r in enumerate(requests):
        for t in templates:
            start = t.index("{}")
            text = t[:start] + r.prompt + t[start + 2 :]
            s, e = subject_token_span(tok, text, r.subject, start)
            texts.append(text)
            owner.append(i)
            pos.append(e - 1)
            first.append(s)
    return texts, owner, pos, first


def fit_values(model: nn.Module, tok, path: str, d_out: int, requests: Sequence[FactRequest], templates: Sequence[str],
               cfg: MemoryConfig) -> dict[str, torch.Tensor]:
    """Each request's key and value, fitted side by side (the model's parameters must be frozen).

    Returns ``keys`` (R × span × d_in: the bare prompt's keys at the subject's last ``span`` tokens, last
    first, zero where the subject is shorter), ``span`` (R, the positions each uses), ``values`` (R × d_out),
    ``steps`` (R, the Adam steps each took) and ``nll`` (R, its worst context's mean target NLL).
    A request leaves the batch once done: later steps run only the rows still being fitted."""
    texts, owner, pos, first = _contexts(tok, requests, templates)
    dev = next(model.parameters()).device
    enc, spans = encode_pairs(tok, texts, [requests[i].target_new for i in owner], dev)
    n_req = len(requests)
    width = max(e - s for s, e in spans)
    rows = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "pos": torch.tensor(pos, device=dev), "first": torch.tensor(first, device=dev), "own": torch.tensor(owner, device=dev),
            "index": torch.tensor([[s - 1 + min(t, e - s - 1) for t in range(width)] for s, e in spans], device=dev),
            "valid": torch.tensor([[t < e - s for t in range(width)] for s, e in spans], device=dev)}
    rows["tgt"] = rows["input_ids"].gather(1, rows["index"] + 1)
    delta = torch.zeros(n_req, d_out, device=dev, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=cfg.lr)
    done = torch.zeros(n_req, dtype=torch.bool, device=dev)
    steps = torch.full((n_req,), cfg.steps, dtype=torch.long)
    worst = torch.zeros(n_req, device=dev)
    keys = None
    for step in range(cfg.steps + 1):
        sel = {k: v[(~done)[rows["own"]]] for k, v in rows.items()}
        row_nll, k = _rows_nll(model, path, sel, delta, keys is None)
        if keys is None:  # the first pass holds every row: the bare prompts' keys at their subjects
            keys, span = _span_keys(k[:: len(templates)], rows["pos"][:: len(templates)],
                                    rows["first"][:: len(templates)], cfg.span)
        worst[~done] = torch.full((n_req,), -1.0, device=dev).scatter_reduce(
            0, sel["own"], row_nll.detach(), "amax")[~done]
        newly = ~done & (worst < cfg.nll_stop)
        steps[newly.cpu()] = step
        if bool((done | newly).all()) or step == cfg.steps:
            break
        opt.zero_grad()
        (row_nll * (~newly)[sel["own"]]).sum().backward()
        done |= newly
        frozen = delta.detach()[done].clone()
        opt.step()
        with torch.no_grad():
            delta[done] = frozen
    return {"keys": keys.cpu(), "span": span.cpu(), "values": delta.detach().float().cpu(), "steps": steps,
            "nll": worst.cpu()}


def _span_keys(inputs: torch.Tensor, last: torch.Tensor, first: torch.Tensor, span: int):
    """(R × span × d keys at tokens last, last−1, … down to the subject's first token; R counts)."""
    m = torch.clamp(last - first + 1, max=span)
    out = torch.zeros(inputs.shape[0], span, inputs.shape[-1])
    for i in range(inputs.shape[0]):
        for j in range(int(m[i])):
            out[i, j] = inputs[i, int(last[i]) - j].float().cpu()
    return out, m


def _rows_nll(model: nn.Module, path: str, sel: dict, delta: torch.Tensor, want_keys: bool):
    """One forward pass over the selected rows with each row's δ added at its subject: each row's mean
    target NLL (with grad) and, if asked, every row's keys (the hooked module's input)."""
    from kledger.editors.hooks import LogitsAt, Trace

    n = int(sel["attention_mask"].sum(1).max())  # right-padded: drop columns no selected row uses
    idx = torch.arange(sel["pos"].numel(), device=sel["pos"].device)

    def add(out: torch.Tensor) -> torch.Tensor:
        return out.index_put((idx, sel["pos"]), delta[sel["own"]].to(out.dtype), accumulate=True)

    with Trace(model, path, retain_input=want_keys, retain_output=False) as tr, \
            edit_output(model, path, add), LogitsAt(model, sel["index"]) as head:
        logits = model(input_ids=sel["input_ids"][:, :n], attention_mask=sel["attention_mask"][:, :n],
                       use_cache=False).logits
        hooked = head.handle is not None
    if not hooked:  # no separate output embedding: pick the positions from the full logits
        logits = logits.gather(1, sel["index"][..., None].expand(-1, -1, logits.shape[-1]))
    nll = -torch.log_softmax(logits.float(), -1).gather(2, sel["tgt"][..., None])[..., 0]
    row_nll = (nll * sel["valid"]).sum(1) / sel["valid"].sum(1)
    return row_nll, (tr.input.detach() if want_keys else None)


#: the radius, relative to the key's norm, of an entry whose last key equals another key (it matches that
#: exact context only)
EXACT = 1e-4


@dataclass(frozen=True)
class Placement:
    slot: int
    reused: bool  # the gate of this live entry already fires on the key span: the value adds to it
    radii: tuple[float, ...]  # the new entry's radius at each span position it uses (empty when reused)


def place(mem: GatedMemory, bank: torch.Tensor, keys: torch.Tensor, m: int, gamma: float,
          span_gamma: float | None = None) -> Placement:
    """Where a key span (``keys[:m]``, last token first) goes in memory ``mem`` (read, never written).

    If a live entry's gate fires on the span, the edit goes into that entry. Otherwise it takes the
    first free slot, with radius ``gamma`` × the distance to the nearest bank key at the last token (or
    to the nearest live entry's last key), and ``span_gamma`` (default ``gamma``) × the distance to the
    nearest bank key at the earlier positions (a looser filter: a paraphrase changes their context more)."""
    which, live = mem.scores(keys[:m].flip(0)[None].to(mem.keys.device))  # tokens in text order
    if int(which[-1]) >= 0:
        return Placement(int(live[which[-1]]), True, ())
    free = ((mem.radii == 0).all(1) & (mem.keys.abs().amax((1, 2)) == 0)).nonzero().flatten()
    if not free.numel():
        raise UsageError(f"memory: expected a free slot, found all {mem.keys.shape[0]} in use (set a larger"
                         " capacity, or revert entries)")
    radii: list[float] = []
    for j in range(m):
        k = keys[j].to(bank.device)
        near = float(torch.cdist(k[None], bank).min()) if bank.numel() else float("inf")
        if j == 0 and live.numel():
            near = min(near, float(torch.cdist(k[None].to(mem.keys.device), mem.keys[live, 0]).min()))
        if near == float("inf"):
            near = float(k.norm())  # nothing to compare with (an empty bank): the key's own scale
        if near > 0:
            radii.append((gamma if j == 0 or span_gamma is None else span_gamma) * near)
        elif j > 0:  # the same token in the same context as some bank text (e.g. a first word): no filter
            break
        else:  # the last key equals another key: match that exact context only
            radii.append(EXACT * max(float(k.norm()), 1.0))
    return Placement(int(free[0]), False, tuple(radii))


def entry_delta(prefix: str, mem: GatedMemory, p: Placement, keys: torch.Tensor, value: torch.Tensor) -> Delta:
    """The sparse delta that writes placement ``p`` into the memory tensors ``prefix``.keys/radii/values."""
    cap, span, d_in = mem.keys.shape
    d_out = mem.values.shape[1]
    tensors = {f"{prefix}.values": SparseDelta((cap, d_out), p.slot * d_out + torch.arange(d_out), value.float())}
    if not p.reused:
        m = len(p.radii)
        at = (p.slot * span + torch.arange(m))[:, None] * d_in + torch.arange(d_in)[None]
        tensors[f"{prefix}.keys"] = SparseDelta((cap, span, d_in), at.flatten(), keys[:m].float().flatten())
        tensors[f"{prefix}.radii"] = SparseDelta((cap, span), p.slot * span + torch.arange(m),
                                                 torch.tensor(p.radii, dtype=torch.float32))
    return Delta(tensors)


class MemoryEditor(Editor):
    """Key-gated memory entries at one layer (see the module docstring); one event per request."""

    config_cls = MemoryConfig
    name = "memory"
    summary = "key-gated edit memory: (key, radius, value) entries at one MLP; other inputs untouched"
    paper = "https://arxiv.org/abs/2211.11031"
    attaches = True

    def attach(self, model: nn.Module) -> GatedMemory:
        """The (empty, on a base model) memory this config's entries live in, installed on ``model``."""
        cfg = self.config
        if not 0 <= cfg.layer < num_layers(model):
            raise UsageError(f"memory: expected a layer in [0, {num_layers(model)}), found {cfg.layer}")
        path, d_in, d_out = _site(model, cfg.layer)
        return install_memory(model, path, cfg.layer, cfg.capacity, cfg.span, d_in, d_out)

    def compute(self, model: nn.Module, tok, requests: Sequence[FactRequest], ctx: EditContext) -> list[EditResult]:
        if not requests:
            raise UsageError("memory: expected at least one fact request, found none")
        cfg, requests, t0 = self.config, list(requests), time.perf_counter()
        mem = self.attach(model)
        path, d_in, d_out = _site(model, cfg.layer)
        with preserved(model, names=[]):
            for prm in model.parameters():
                prm.requires_grad_(False)
            with memory_off(model):
                bank = bank_keys(model, tok, path, cfg, ctx)
                templates = context_templates(model, tok, cfg.prefixes, 10, ctx.seed)
            fit = fit_values(model, tok, path, d_out, requests, templates, cfg)
        scratch = GatedMemory(*mem.keys.shape, mem.values.shape[1])  # the memory as this batch fills it
        with torch.no_grad():
            for name in ("keys", "radii", "values"):
                getattr(scratch, name).copy_(getattr(mem, name).detach().float().cpu())
        prefix, per, out = memory_prefix(cfg.layer), (time.perf_counter() - t0) / len(requests), []
        for i, req in enumerate(requests):
            k, m, v = fit["keys"][i], int(fit["span"][i]), fit["values"][i]
            p = place(scratch, bank, k, m, cfg.gamma, cfg.span_gamma)
            with torch.no_grad():
                scratch.values[p.slot] += v
                if not p.reused:  # a span position the bank cannot tell apart is dropped (len(p.radii) ≤ m)
                    u = len(p.radii)
                    scratch.keys[p.slot, :u], scratch.radii[p.slot, :u] = k[:u], torch.tensor(p.radii)
            ensemble = {"layer": cfg.layer, "slot": p.slot, "reused": p.reused, "span": len(p.radii),
                        "radii": [round(r, 4) for r in p.radii]}
            metrics = {"steps": int(fit["steps"][i]), "nll": round(float(fit["nll"][i]), 4),
                       "value_norm": round(float(v.norm()), 3), "time_s": round(per, 4)}
            out.append(EditResult((req,), entry_delta(prefix, scratch, p, k, v), ensemble, metrics))
        log.info("memory: %d entries at layer %d in %.1f s (%d live)", len(requests), cfg.layer,
                 time.perf_counter() - t0, int((scratch.radii[:, 0] > 0).sum()))
        return out
