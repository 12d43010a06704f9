"""A token-gated edit memory (``--method memory``): edits that leave every other input untouched.

The family is GRACE's (Hartvigsen et al., arXiv 2211.11031): a codebook of entries beside one
layer, consulted at every token. Here an entry is the subject's last ``span`` token ids and a value
vector: wherever those tokens occur (the subject named in any text), the value is added to the
output of layer ``layer``'s MLP output projection (``down_proj``) at the subject's last token;
every other token sees the unedited model. Weight editors write each fact into shared weights and
trade edit strength against what the model already knew (``bench/results/lifelong.md``); an entry
does not, because it is silent wherever its subject is not named.

Why token ids and not hidden-state keys with radii (GRACE's gate): on smollm2-135m layer 3's keys
are dominated by the token itself, and a sentence's first token has nearly the same key whatever
it is — a key-gated entry for "Italy is affiliated with …" (radius 0.29) opened on "Japan", "China",
"Chicago" … at the start of audit prompts and cost 13 known facts by edit 200, while keys of a
paraphrase's subject land inside their entry's radius only 0.89 of the time (``lifelong.md``).
A span of ids matches every paraphrase that names the subject, and nothing else but that name.

One edit, per request:

* **span**: the ids of the subject's last ``span`` tokens in the prompt, and their other spelling
  where the subject follows other text (a leading space changes a word-initial token; with
  ``initial_spelling`` also the subject tokenised alone, as when it opens a text);
* **value**: a vector δ fitted (Adam, at most ``steps``) so that adding it at the subject's last
  token makes the target the continuation under the prompt and ``prefixes`` sampled context
  prefixes, stopping as soon as every context's mean target NLL is below ``nll_stop``. The requests
  of a batch are fitted side by side in one padded batch, each with its own δ, and leave it when
  done. δ is fitted with the memory on: a subject edited again (the same span) adds its δ to the
  entry's value. Each step reruns only the tokens from the subject's last on (``editors/suffix.py``:
  the earlier tokens' keys and values are computed once; ``cache_prefix``), half the time of full passes.

**Storage.** The memory is two tensors beside the model (``kledger_memory.<layer>.ids``
capacity × span × 2, ``.values`` capacity × d_out; zero in the base): an edit's delta is a
``SparseDelta`` on its slot's rows, so the ledger stores, sums, reverts and merges it like any other
delta, and replaying the ledger rebuilds the memory bit for bit. A slot is free while it is all
zero: a reverted entry's slot is reused. The gate's hooks are installed by ``gate.install_memory``;
the orchestrator adds the memory to a freshly loaded base model (``Editor.attach``) before any
delta is written into it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn

from kledger.editors.base import EditContext, Editor, EditResult, preserved
from kledger.editors.gate import GatedMemory, install_memory, memory_off, memory_prefix
from kledger.editors.hooks import edit_output, logits_at
from kledger.editors.locate import context_templates, subject_token_span
from kledger.editors.sites import num_layers, sites_for
from kledger.editors.suffix import SuffixPass
from kledger.editors.tokens import encode_pairs
from kledger.ledger.deltas import Delta
from kledger.ledger.errors import UsageError
from kledger.ledger.kinds import SparseDelta
from kledger.ledger.records import FactRequest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MemoryConfig:
    layer: int | None = None  # the MLP whose output an entry adds to; None: a tenth of the way up (3 of 30)
    capacity: int = 2048  # entries the memory holds (rows of its tensors)
    span: int = 4  # an entry matches the subject's last ``span`` tokens (all of a shorter subject)
    prefixes: int = 2  # sampled context prefixes the value is fitted under (besides the bare prompt)
    steps: int = 40  # most Adam steps per value
    lr: float = 0.5
    nll_stop: float = 0.1  # a value is done once every context's mean target NLL is below this
    # ROME's essence term: KL(unedited ‖ edited) of the next token after these subject prompts, times this
    # weight, joins the loss, so the value changes the edited relation and less of what else the subject says
    essence_weight: float = 0.0
    # also match the subject's sentence-initial spelling (the subject tokenised alone); off in the measured default
    initial_spelling: bool = False
    essence_prompts: tuple[str, ...] = ("{} is a", "{} was")
    # each step reruns only the tokens from the subject's last on, the earlier ones' keys and values cached
    # (``editors/suffix.py``; checked against a full pass, which it falls back to); False: full passes
    cache_prefix: bool = True

    def __post_init__(self) -> None:
        if self.capacity < 1 or self.span < 1 or self.steps < 1:
            raise ValueError("expected capacity, span and steps ≥ 1")
        if self.lr <= 0 or self.nll_stop <= 0 or self.prefixes < 0 or self.essence_weight < 0:
            raise ValueError("expected lr > 0, nll_stop > 0, prefixes ≥ 0 and essence_weight ≥ 0")
        if any(p.count("{}") != 1 for p in self.essence_prompts):
            raise ValueError(f"expected essence prompts with one {{}} for the subject, found {self.essence_prompts}")


def _site(model: nn.Module, layer: int) -> tuple[str, int]:
    """(module path, output width) of ``layer``'s MLP output projection."""
    sites = sites_for(model)
    w = dict(model.named_parameters())[sites.mlp_out_param(layer)]
    return sites.mlp_out.format(layer), int(w.shape[1] if sites.mlp_out_transposed else w.shape[0])


def _contexts(tok, requests: Sequence[FactRequest], templates: Sequence[str]):
    """Every (request, template) text with its owner request and the subject's [first, last + 1) tokens."""
    texts, owner, spans = [], [], []
    for i, r in enumerate(requests):
        for t in templates:
            start = t.index("{}")
            text = t[:start] + r.prompt + t[start + 2 :]
            texts.append(text)
            owner.append(i)
            spans.append(subject_token_span(tok, text, r.subject, start))
    return texts, owner, spans


def span_ids(ids: Sequence[Sequence[int]], spans: Sequence[tuple[int, int]], span: int) -> torch.Tensor:
    """One request's entry ids (span × 2, id + 1, 0 = none) from its contexts' token ids and subject
    spans: position j holds the subject's (j+1)-th last token as the first context spells it, and a
    second spelling where another context's differs (the subject after other text). Positions are
    those every context's subject has."""
    m = min([span] + [e - s for s, e in spans])
    out = torch.zeros(span, 2)
    for j in range(m):
        seen = list(dict.fromkeys(int(row[e - 1 - j]) for row, (_, e) in zip(ids, spans)))
        for v, tid in enumerate(seen[:2]):
            out[j, v] = tid + 1
    return out


def _entry_ids(tok, req: FactRequest, rows: list[list[int]], spans: list[tuple[int, int]], cfg: MemoryConfig
               ) -> torch.Tensor:
    """``span_ids`` over a request's contexts and, with ``initial_spelling``, the subject opening a text."""
    if not cfg.initial_spelling:
        return span_ids(rows, spans, cfg.span)
    alone = tok(req.subject, add_special_tokens=False)["input_ids"]
    return span_ids(rows + [alone], spans + [(0, len(alone))], cfg.span)


def fit_values(model: nn.Module, tok, path: str, d_out: int, requests: Sequence[FactRequest], templates: Sequence[str],
               cfg: MemoryConfig) -> dict[str, torch.Tensor]:
    """Each request's entry ids and value, fitted side by side (the model's parameters must be frozen).

    Returns ``ids`` (R × span × 2, ``span_ids``), ``values`` (R × d_out), ``steps`` (R, the Adam steps
    each took) and ``nll`` (R, its worst context's mean target NLL). A request leaves the batch once
    done: later steps run only the rows still being fitted."""
    texts, owner, subj = _contexts(tok, requests, templates)
    n_req, per, n_ctx = len(requests), len(templates), len(texts)
    targets = [requests[i].target_new for i in owner]
    if cfg.essence_weight > 0:  # essence rows after the context rows: "{subject} is a" + a placeholder
        for i, r in enumerate(requests):
            for e in cfg.essence_prompts:
                text = e.replace("{}", r.subject)
                texts.append(text), owner.append(i), targets.append(" x")
                subj.append(subject_token_span(tok, text, r.subject))
    dev = next(model.parameters()).device
    enc, spans = encode_pairs(tok, texts, targets, dev)
    ids = torch.stack([_entry_ids(tok, r, enc["input_ids"][i * per : (i + 1) * per].tolist(), subj[i * per : (i + 1) * per],
                                  cfg) for i, r in enumerate(requests)])
    width = max(e - s for s, e in spans)
    kl = torch.arange(len(texts), device=dev) >= n_ctx
    rows = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "kl": kl,
            "row": torch.arange(len(texts), device=dev),
            "pos": torch.tensor([e - 1 for _, e in subj], device=dev), "own": torch.tensor(owner, device=dev),
            "index": torch.tensor([[s - 1 + min(t, e - s - 1) for t in range(width)] for s, e in spans], device=dev),
            "valid": torch.tensor([[t < (1 if k else e - s) for t in range(width)] for (s, e), k in zip(spans, kl)],
                                  device=dev)}
    rows["tgt"] = rows["input_ids"].gather(1, rows["index"] + 1)
    delta = torch.zeros(n_req, d_out, device=dev, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=cfg.lr)
    done = torch.zeros(n_req, dtype=torch.bool, device=dev)
    steps = torch.full((n_req,), cfg.steps, dtype=torch.long)
    worst = torch.zeros(n_req, device=dev)
    base_logp = None  # the essence rows' next-token log-probabilities before the edit (δ = 0 at step 0)
    suffix = SuffixPass.prepare(model, rows["input_ids"], rows["attention_mask"], rows["pos"], rows["index"]) \
        if cfg.cache_prefix else None
    for step in range(cfg.steps + 1):
        sel = {k: v[(~done)[rows["own"]]] for k, v in rows.items()}
        row_nll, logp = _rows_nll(model, path, sel, delta, suffix)
        if base_logp is None:
            base_logp = logp.detach()
        worst[~done] = torch.full((n_req,), -1.0, device=dev).scatter_reduce(
            0, sel["own"], row_nll.detach().masked_fill(sel["kl"], -1.0), "amax")[~done]
        newly = ~done & (worst < cfg.nll_stop)
        steps[newly.cpu()] = step
        if bool((done | newly).all()) or step == cfg.steps:
            break
        p0 = base_logp[sel["row"]]
        essence = (p0.exp() * (p0 - logp)).sum(-1) * cfg.essence_weight
        loss = torch.where(sel["kl"], essence, row_nll)
        opt.zero_grad()
        (loss * (~newly)[sel["own"]]).sum().backward()
        done |= newly
        frozen = delta.detach()[done].clone()
        opt.step()
        with torch.no_grad():
            delta[done] = frozen
    return {"ids": ids, "values": delta.detach().float().cpu(), "steps": steps, "nll": worst.cpu()}


def _rows_nll(model: nn.Module, path: str, sel: dict, delta: torch.Tensor, suffix: SuffixPass | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass over the selected rows with each row's δ added at its subject's last token (over
    the rows' suffixes alone when given ``suffix``): each row's mean target NLL (with grad), and each
    row's log-probabilities at its first target position."""
    if suffix is not None:
        logits = suffix.logits(sel["row"], path, delta[sel["own"]])
    else:
        logits = _full_logits(model, path, sel, delta)
    logp = torch.log_softmax(logits.float(), -1)
    nll = -logp.gather(2, sel["tgt"][..., None])[..., 0]
    return (nll * sel["valid"]).sum(1) / sel["valid"].sum(1), logp[:, 0]


def _full_logits(model: nn.Module, path: str, sel: dict, delta: torch.Tensor) -> torch.Tensor:
    """The selected rows' logits at their target positions, δ added at each subject's last token."""
    n = int(sel["attention_mask"].sum(1).max())  # right-padded: drop columns no selected row uses
    idx = torch.arange(sel["pos"].numel(), device=sel["pos"].device)

    def add(out: torch.Tensor) -> torch.Tensor:
        return out.index_put((idx, sel["pos"]), delta[sel["own"]].to(out.dtype), accumulate=True)

    with edit_output(model, path, add):
        return logits_at(model, sel["index"], input_ids=sel["input_ids"][:, :n],
                         attention_mask=sel["attention_mask"][:, :n], use_cache=False)[0]


def place(ids: torch.Tensor, entry: torch.Tensor) -> tuple[int, bool]:
    """(slot, reused) for an entry's ids (span × 2) in a memory's ids (capacity × span × 2): the live
    entry with the same span (the same tokens, in either spelling, at every position), else the first
    free slot."""
    live = ids[:, 0, 0] > 0
    used = entry[:, 0] > 0
    # a position matches when the two share a spelling (or both leave it unused)
    share = ((ids[:, :, :, None] == entry[None, :, None, :]) & (entry[None, :, None, :] > 0)).any(-1).any(-1)
    same = live & ((share | ~used[None]) & ((ids[:, :, 0] > 0) == used[None])).all(1)
    if bool(same.any()):
        return int(same.nonzero()[0]), True
    free = (ids == 0).all(2).all(1).nonzero().flatten()
    if not free.numel():
        raise UsageError(f"memory: expected a free slot, found all {ids.shape[0]} in use (set a larger"
                         " capacity, or revert entries)")
    return int(free[0]), False


def entry_delta(prefix: str, shapes: dict[str, tuple[int, ...]], slot: int, reused: bool, entry: torch.Tensor,
                value: torch.Tensor) -> Delta:
    """The sparse delta that writes an entry (or, reused, only its value) into slot ``slot``."""
    d_out = shapes["values"][1]
    tensors = {f"{prefix}.values": SparseDelta(shapes["values"], slot * d_out + torch.arange(d_out), value.float())}
    if not reused:
        n = entry.numel()
        tensors[f"{prefix}.ids"] = SparseDelta(shapes["ids"], slot * n + torch.arange(n), entry.flatten().float())
    return Delta(tensors)


class MemoryEditor(Editor):
    """Token-gated memory entries at one layer (see the module docstring); one event per request."""

    config_cls = MemoryConfig
    name = "memory"
    summary = "token-gated edit memory (default): a value added wherever the subject is named; other inputs untouched"
    paper = "https://arxiv.org/abs/2211.11031"
    attaches = True

    def layer(self, model: nn.Module) -> int:
        n = num_layers(model)
        layer = n // 10 if self.config.layer is None else self.config.layer
        if not 0 <= layer < n:
            raise UsageError(f"memory: expected a layer in [0, {n}), found {layer}")
        return layer

    def attach(self, model: nn.Module) -> GatedMemory:
        """The (empty, on a base model) memory this config's entries live in, installed on ``model``."""
        layer = self.layer(model)
        path, d_out = _site(model, layer)
        return install_memory(model, path, layer, self.config.capacity, self.config.span, d_out)

    def compute(self, model: nn.Module, tok, requests: Sequence[FactRequest], ctx: EditContext) -> list[EditResult]:
        if not requests:
            raise UsageError("memory: expected at least one fact request, found none")
        cfg, requests, t0 = self.config, list(requests), time.perf_counter()
        mem = self.attach(model)
        with preserved(model, names=[]):
            for prm in model.parameters():
                prm.requires_grad_(False)
            with memory_off(model):
                templates = context_templates(model, tok, cfg.prefixes, 10, ctx.seed)
            fit = fit_values(model, tok, mem.path, mem.values.shape[1], requests, templates, cfg)
        ids = mem.ids.detach().float().cpu().clone()  # the memory's ids as this batch fills it
        shapes = {"ids": tuple(mem.ids.shape), "values": tuple(mem.values.shape)}
        layer = self.layer(model)
        prefix, per, out = memory_prefix(layer), (time.perf_counter() - t0) / len(requests), []
        for i, req in enumerate(requests):
            entry, value = fit["ids"][i], fit["values"][i]
            slot, reused = place(ids, entry)
            ids[slot] = entry if not reused else ids[slot]
            span = int((entry[:, 0] > 0).sum())
            ensemble = {"layer": layer, "slot": slot, "reused": reused, "span": span,
                        "tokens": [tok.decode([int(entry[j, 0]) - 1]) for j in reversed(range(span))]}
            metrics = {"steps": int(fit["steps"][i]), "nll": round(float(fit["nll"][i]), 4),
                       "value_norm": round(float(value.norm()), 3), "time_s": round(per, 4)}
            out.append(EditResult((req,), entry_delta(prefix, shapes, slot, reused, entry, value), ensemble, metrics))
        log.info("memory: %d entries at layer %d in %.1f s (%d live)", len(requests), layer,
                 time.perf_counter() - t0, int((ids[:, 0, 0] > 0).sum()))
        return out
