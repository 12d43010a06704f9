"""KNE — Knowledge Neuronal Ensemble editing (arXiv 2412.20637).

For each request (prompt x, target tokens y*₁…y*ₛ):

1. **Attribution.** Every entry of every candidate tensor (default: all MLP weight matrices of
   all layers, ``sites.mlp_in`` + ``sites.mlp_out``: Llama gate/up/down_proj, GPT-2 c_fc/c_proj)
   gets a score from the gradient of the target's teacher-forced negative log-likelihood ``L``:

   * ``grad_x_weight``: ``|∂L/∂w · w|`` — one backward pass;
   * ``integrated_gradients``: ``|w̄ · (1/m) Σ_{i=1..m} ∂L/∂w (w = (i/m)·w̄)|`` where the path
     scales *all* candidate tensors jointly (one backward per step, ``ig_steps`` = m). The paper
     scales neuron activations one layer at a time (m·L passes); the joint parameter path is the
     workable per-entry reading at m passes and is what is implemented here.

2. **Ensemble.** ``threshold="global"``: one threshold over the pooled scores of all candidate
   entries, keeping the top ``budget`` entries (``count``, or ``fraction`` of all candidate
   entries); the ensemble spans layers. ``threshold="per_layer"``: every layer keeps its own share
   of the budget (its top entries pooled over that layer's candidate tensors).

3. **Edit.** Only ensemble entries are optimised (the gradient is gathered at the ensemble's flat
   indices, so nothing else can move), jointly over all layers with Adam, on
   ``mean teacher-forced NLL`` of the target after the prompt and after each context prefix
   + ``locality_weight`` · KL(unedited ‖ edited) of the next-token distributions at every position
   of a few neutral prompts ("{subject} is a" and fixed generic ones). Stops as soon as every
   target token is the greedy argmax of the plain prompt under teacher forcing with a log-prob
   lead of at least ``stop_margin`` over the runner-up, or after ``max_steps`` updates.

4. Optional ``alpha``: the learned update enters the weights as ``(alpha/√n)·δ`` (n = ensemble
   size), as in the paper. With Adam this is a rescaling of the learning rate by ``alpha/√n``
   (the total update norm then no longer grows with the budget); ``None`` means no scaling.

The delta is one ``SparseDelta`` per touched tensor whose indices ARE the ensemble entries (all
of them, zero-valued ones included), in the parameter's own storage layout (GPT-2 Conv1D
weights are in×out), flat row-major.

Defaults were chosen by measurement on SmolLM2-135M with the first 20 CounterFact records (each
edit computed on the base model, then all 20 deltas applied together); see
``bench/kne_tune.py`` and ``bench/results/kne.md``. The field comments give the reason for each
default.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn as nn

from kledger.editors.base import EditContext, Editor, EditResult, preserved
from kledger.editors.hooks import gradient_through
from kledger.editors.locate import subject_token_span
from kledger.editors.sites import num_layers, sites_for
from kledger.editors.tokens import encode_pairs, pad, pad_id
from kledger.ledger.deltas import Delta, SparseDelta
from kledger.ledger.errors import UsageError
from kledger.ledger.records import FactRequest

log = logging.getLogger(__name__)

ATTRIBUTIONS = ("grad_x_weight", "integrated_gradients")
THRESHOLDS = ("per_layer", "global")
GRAD_POSITIONS = ("all", "subject")
OPTIMIZERS = ("adam", "normalized_gd")


@dataclass(frozen=True)
class KNEConfig:
    """KNE hyper-parameters (defaults measured on SmolLM2-135M / CounterFact, see bench/results/kne.md)."""

    #: "grad_x_weight" (|∂NLL/∂w · w|, one backward) or "integrated_gradients" (ig_steps
    #: backwards). grad×weight: same efficacy/locality as IG at equal budget, ig_steps× cheaper.
    attribution: str = "grad_x_weight"
    #: m, the Riemann steps of the integrated-gradients path (only for attribution="integrated_gradients").
    ig_steps: int = 8
    #: "global" (one threshold over the pooled scores of all layers, as in the paper) or
    #: "per_layer" (each layer keeps its share of the budget).
    threshold: str = "global"
    #: budget as a fraction of all candidate entries (used when ``count`` is None).
    fraction: float = 0.001
    #: budget as an absolute number of entries (overrides ``fraction``).
    count: int | None = None
    #: candidate layers (None = all layers); every MLP weight matrix of these layers is a candidate.
    layers: tuple[int, ...] | None = None
    #: layers removed from the candidates (negative = from the end). Default: the last layer, whose
    #: MLP writes straight into the logits: edits there act as global output-token biases
    #: (measured: +2.3 nats NLL on generic text per edit with it, +0.1 without; see kne.md).
    exclude_layers: tuple[int, ...] = (-1,)
    #: Adam learning rate on the ensemble entries.
    lr: float = 0.001
    #: the most Adam updates per request.
    max_steps: int = 25
    #: stop when every target token leads the runner-up by this much log-probability (nats);
    #: 0 = as soon as the target is the greedy continuation under teacher forcing.
    stop_margin: float = 0.0
    #: weight of the KL locality term.
    locality_weight: float = 1.0
    #: neutral prompts for the KL term ("{subject}" is replaced; skipped when the request has none).
    locality_prompts: tuple[str, ...] = (
        "{subject} is a",
        "The following is a short story about",
        "Here is a list of things to do today:",
    )
    #: extra context prefixes: the target NLL is averaged over the plain prompt and prefix + prompt.
    context_prefixes: tuple[str, ...] = ("Fact: ", "I read that ")
    #: the edit prompt with its subject replaced by each of these is added to the KL term, so that
    #: the relation itself ("... plays the sport") keeps its predictions for other subjects.
    contrast_subjects: tuple[str, ...] = ()
    #: γ: adds γ · mean_c relu(NLL_c(unedited) + contrast_margin − NLL_c) to the loss, NLL_c being
    #: the target's NLL after a contrast prompt: the target must not become likelier for other
    #: subjects. It is active from the first step, so the attribution (the loss gradient at the
    #: unedited weights, ∇NLL − γ·∇NLL_c) already prefers subject-specific entries. 0 = off (paper).
    contrast_weight: float = 0.0
    #: how far (nats per token) the contrast NLL is pushed above its unedited value before the term stops.
    contrast_margin: float = 0.5
    #: the learned update enters as (alpha/√n)·δ; None = no scaling.
    alpha: float | None = None
    #: where the loss gradient may reach the candidate weights: "all" token positions (the paper),
    #: or only the "subject" tokens of each row (elsewhere the candidate layers compute with a
    #: detached copy of their weights, so the ensemble is attributed and fitted through the
    #: subject's representation, as locate-then-edit methods key their edits on the subject; a
    #: request without a subject falls back to "all", recorded in its metrics). Measured on
    #: SmolLM2-135M, CounterFact 0–19, two sequential batches of 10 (bench/results/kne.md):
    #: "subject" kept the locality prompt's top-1 answer for 0.50 of them against 0.15 for "all",
    #: neighbourhood score 0.25 vs 0.15, fluency 4.01 vs 3.84, at efficacy 0.95 vs 1.00 and
    #: paraphrase 0.90 vs 0.85; each forward costs one more matmul per candidate layer.
    grad_positions: str = "subject"
    #: "adam" (the paper; ``lr`` per entry and step: Adam's first step moves every ensemble entry
    #: by ``lr`` whatever its gradient, so entries that barely matter move as much as the ones
    #: that do) or "normalized_gd" (each step moves δ by ``step_norm`` in L2 along −∇: entries move
    #: in proportion to their gradient, the least-norm direction for a given loss decrease).
    #: the first positions of every row never carry the loss gradient to the candidate weights
    #: (they compute with the frozen copy there, see ``grad_positions``). Position 0 is the
    #: attention-sink token: its MLP outputs carry the model's massive activations, which every
    #: later token's attention depends on; an edit that fits through them changes every prompt.
    #: Measured on SmolLM2-135M (bench/results/kne.md): see the field's table there.
    sink_positions: int = 1
    optimizer: str = "adam"
    #: L2 length of one "normalized_gd" step (ignored by "adam").
    step_norm: float = 0.05
    #: norm budget: after every step δ is projected onto the L2 ball of this radius (None = none).
    max_norm: float | None = None

    def __post_init__(self) -> None:
        if self.attribution not in ATTRIBUTIONS:
            raise UsageError(f"attribution: expected one of {ATTRIBUTIONS}, found {self.attribution!r}")
        if self.grad_positions not in GRAD_POSITIONS:
            raise UsageError(f"grad_positions: expected one of {GRAD_POSITIONS}, found {self.grad_positions!r}")
        if self.optimizer not in OPTIMIZERS:
            raise UsageError(f"optimizer: expected one of {OPTIMIZERS}, found {self.optimizer!r}")
        if self.sink_positions < 0:
            raise UsageError(f"sink_positions: expected a non-negative integer, found {self.sink_positions!r}")
        if self.step_norm <= 0:
            raise UsageError(f"step_norm: expected a positive number, found {self.step_norm!r}")
        if self.max_norm is not None and self.max_norm <= 0:
            raise UsageError(f"max_norm: expected a positive number or None, found {self.max_norm!r}")
        if self.threshold not in THRESHOLDS:
            raise UsageError(f"threshold: expected one of {THRESHOLDS}, found {self.threshold!r}")
        if not (0.0 < self.fraction <= 1.0):
            raise UsageError(f"fraction: expected a number in (0, 1], found {self.fraction!r}")
        if self.count is not None and self.count < 1:
            raise UsageError(f"count: expected a positive integer or None, found {self.count!r}")
        if self.ig_steps < 1:
            raise UsageError(f"ig_steps: expected a positive integer, found {self.ig_steps!r}")
        if self.max_steps < 0:
            raise UsageError(f"max_steps: expected a non-negative integer, found {self.max_steps!r}")
        if self.lr <= 0:
            raise UsageError(f"lr: expected a positive number, found {self.lr!r}")
        if self.locality_weight < 0:
            raise UsageError(f"locality_weight: expected a non-negative number, found {self.locality_weight!r}")
        if self.contrast_weight < 0 or self.contrast_margin < 0:
            raise UsageError(
                f"contrast_weight and contrast_margin: expected non-negative numbers, found"
                f" {self.contrast_weight!r} and {self.contrast_margin!r}"
            )
        if self.alpha is not None and self.alpha <= 0:
            raise UsageError(f"alpha: expected a positive number or None, found {self.alpha!r}")
        for name in ("layers", "exclude_layers"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, int) or not all(isinstance(x, int) and not isinstance(x, bool) for x in value):
                raise UsageError(f"{name}: expected a list of layer indices (integers), found {value!r}")
            object.__setattr__(self, name, tuple(value))
        if self.layers is not None and not self.layers:
            raise UsageError("layers: expected at least one layer index or None, found an empty list")
        object.__setattr__(self, "locality_prompts", tuple(self.locality_prompts))
        object.__setattr__(self, "context_prefixes", tuple(self.context_prefixes))
        object.__setattr__(self, "contrast_subjects", tuple(self.contrast_subjects))


# --------------------------------------------------------------------------------------------
# candidates and ensemble selection


def candidate_params(
    model: nn.Module, layers: Sequence[int] | None = None, exclude: Sequence[int] = ()
) -> dict[str, tuple[int, nn.Parameter]]:
    """Candidate tensors: name → (layer, parameter), every MLP weight matrix of the given layers
    (None = all) minus ``exclude`` (negative indices count from the end)."""
    sites = sites_for(model)
    n = num_layers(model)
    for layer in list(layers or ()) + list(exclude):
        if not (-n <= layer < n):
            raise UsageError(f"layers: expected indices in [-{n}, {n}), found {layer}")
    dropped = {x % n for x in exclude}
    chosen = [x % n for x in (range(n) if layers is None else layers) if x % n not in dropped]
    if not chosen:
        raise UsageError(f"expected at least one candidate layer, found none (layers={layers}, exclude={exclude})")
    out: dict[str, tuple[int, nn.Parameter]] = {}
    for layer in chosen:
        for name in sites.mlp_in_params(layer) + [sites.mlp_out_param(layer)]:
            out[name] = (layer, model.get_parameter(name))
    return out


def _top_entries(scores: dict[str, torch.Tensor], n: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Exact top-``n`` entries over the pooled flat ``scores`` → name → sorted flat indices.

    A quantile estimated on a random sample gives a threshold below the n-th largest score; only
    entries above it are ranked exactly (avoids a top-k over tens of millions of entries).
    """
    names = list(scores)
    sizes = [scores[k].numel() for k in names]
    total = sum(sizes)
    if n >= total:
        return {k: torch.arange(scores[k].numel()) for k in names}
    thr = None
    k_sample = min(total, 1 << 20)
    if total > 4 * k_sample:
        sample = torch.cat([
            scores[k][torch.randint(0, s, (max(1, math.ceil(k_sample * s / total)),), generator=gen)]
            for k, s in zip(names, sizes)
        ])
        q = 1.0 - 1.3 * n / total - 5.0 / math.sqrt(sample.numel())
        if q > 0:
            kth = max(1, int(q * sample.numel()))
            thr = float(sample.kthvalue(kth).values)
    cand_idx, cand_sc, cand_t = [], [], []
    for t, k in enumerate(names):
        s = scores[k]
        idx = torch.nonzero(s >= thr).squeeze(1) if thr is not None else torch.arange(s.numel())
        cand_idx.append(idx)
        cand_sc.append(s[idx])
        cand_t.append(torch.full((idx.numel(),), t, dtype=torch.int32))
    if sum(x.numel() for x in cand_idx) < n:  # sample was unlucky: rank everything
        cand_idx = [torch.arange(scores[k].numel()) for k in names]
        cand_sc = [scores[k] for k in names]
        cand_t = [torch.full((scores[k].numel(),), t, dtype=torch.int32) for t, k in enumerate(names)]
    sc, ix, tt = torch.cat(cand_sc), torch.cat(cand_idx), torch.cat(cand_t)
    top = torch.topk(sc, n, sorted=False).indices
    ix, tt = ix[top], tt[top]
    out = {}
    for t, k in enumerate(names):
        sel = ix[tt == t]
        if sel.numel():
            out[k] = torch.sort(sel).values
    return out


def select_ensemble(
    scores: dict[str, torch.Tensor], layer_of: dict[str, int], mode: str, budget: int, gen: torch.Generator
) -> dict[str, torch.Tensor]:
    """Ensemble entries (name → sorted flat indices) from per-entry scores.

    ``global``: the top ``budget`` entries over all pooled scores. ``per_layer``: the budget is
    split over the candidate layers in proportion to their sizes (largest remainders first), and
    each layer keeps its top entries pooled over its tensors.
    """
    if mode == "global":
        return _top_entries(scores, budget, gen)
    layers = sorted(set(layer_of.values()))
    size = {l: sum(scores[k].numel() for k in scores if layer_of[k] == l) for l in layers}
    total = sum(size.values())
    exact = {l: budget * size[l] / total for l in layers}
    quota = {l: int(math.floor(exact[l])) for l in layers}
    for l in sorted(layers, key=lambda l: (quota[l] - exact[l], l))[: budget - sum(quota.values())]:
        quota[l] += 1
    out: dict[str, torch.Tensor] = {}
    for l in layers:
        if quota[l]:
            out.update(_top_entries({k: v for k, v in scores.items() if layer_of[k] == l}, quota[l], gen))
    return out


# --------------------------------------------------------------------------------------------
# batches and losses


@dataclass
class _Batch:
    enc: dict
    spans: list[tuple[int, int]]  # target spans of the rows that carry a target
    n_nll: int  # rows 0..n_nll-1: prompt (and prefix + prompt) + target_new, trained on
    true_row: int | None  # prompt + target_true (scored, never trained on)
    contrast_rows: list[int]  # contrast prompt + target_new (KL before the target; attribution)
    kl_rows: list[int]  # every row with a KL term: contrast rows, then neutral prompts
    kl_lengths: list[int]  # positions 0..len-1 of each KL row are compared with the unedited model
    subject_mask: torch.Tensor | None = None  # rows × width × 1, True at the subject's tokens


def _build_batch(tok, req: FactRequest, cfg: KNEConfig, device) -> _Batch:
    """One right-padded batch for one request (see ``_Batch``)."""
    prompts = [req.prompt] + [p + req.prompt for p in cfg.context_prefixes]
    targets = [req.target_new] * len(prompts)
    n_nll = len(prompts)
    true_row = None
    if req.target_true:
        true_row = len(prompts)
        prompts.append(req.prompt)
        targets.append(req.target_true)
    contrast = [req.prompt.replace(req.subject, c) for c in cfg.contrast_subjects] if req.subject else []
    first_c = len(prompts)
    prompts += contrast
    targets += [req.target_new] * len(contrast)
    enc, spans = encode_pairs(tok, prompts, targets, device)
    rows = [enc["input_ids"][i, :e].tolist() for i, (_, e) in enumerate(spans)]
    subjects = [req.subject] * first_c + list(cfg.contrast_subjects[: len(contrast)])
    texts = list(prompts)  # the prompt part of each row is tokenised alone by encode_pairs
    contrast_rows = list(range(first_c, len(rows)))
    kl_rows = list(contrast_rows)
    kl_lengths = [spans[i][0] for i in contrast_rows]
    neutral = [p.format(subject=req.subject) for p in cfg.locality_prompts if "{subject}" not in p or req.subject]
    for p in neutral:
        ids = tok(p, add_special_tokens=False)["input_ids"]
        if ids:
            kl_rows.append(len(rows))
            kl_lengths.append(len(ids))
            rows.append(ids)
            texts.append(p)
            subjects.append(req.subject if req.subject and req.subject in p else None)
    input_ids, mask = pad(rows, pad_id(tok), device)
    width = input_ids.shape[1]
    subject_mask = None
    if cfg.grad_positions == "subject" and req.subject:
        sm = torch.zeros((len(rows), width, 1), dtype=torch.bool)
        for i, (text, subj) in enumerate(zip(texts, subjects)):
            if subj and subj in text:
                a, b = subject_token_span(tok, text, subj)
                sm[i, a:b] = True
        sm[:, : cfg.sink_positions] = False
        subject_mask = sm.to(device)
    elif cfg.sink_positions:
        sm = torch.ones((len(rows), width, 1), dtype=torch.bool)
        sm[:, : cfg.sink_positions] = False
        subject_mask = sm.to(device)
    return _Batch({"input_ids": input_ids, "attention_mask": mask}, spans, n_nll, true_row,
                  contrast_rows, kl_rows, kl_lengths, subject_mask)


def _row_logp(logp: torch.Tensor, batch: _Batch, i: int) -> torch.Tensor:
    s, e = batch.spans[i]
    pos = torch.arange(s - 1, e - 1, device=logp.device)
    return logp[i, pos, batch.enc["input_ids"][i, s:e]]


def _nll_terms(logp: torch.Tensor, batch: _Batch) -> tuple[torch.Tensor, float, float, float | None]:
    """(mean per-token NLL over the NLL rows, min log-prob lead of the prompt's target tokens over
    the runner-up, logP(target_new | prompt), logP(target_true | prompt) or None)."""
    nll = torch.stack([-_row_logp(logp, batch, i).mean() for i in range(batch.n_nll)]).mean()
    s, e = batch.spans[0]
    pos = torch.arange(s - 1, e - 1, device=logp.device)
    tgt = batch.enc["input_ids"][0, s:e]
    row = logp[0, pos].detach()
    tgt_lp = row.gather(1, tgt[:, None]).squeeze(1)
    other = row.scatter(1, tgt[:, None], float("-inf")).max(dim=1).values
    lead = float((tgt_lp - other).min())
    lp_true = None if batch.true_row is None else float(_row_logp(logp.detach(), batch, batch.true_row).sum())
    return nll, lead, float(tgt_lp.sum()), lp_true


def _contrast_nll(logp: torch.Tensor, batch: _Batch) -> torch.Tensor:
    """Per contrast row: mean per-token NLL of the target after the contrast prompt."""
    return torch.stack([-_row_logp(logp, batch, i).mean() for i in batch.contrast_rows])


def _contrast_term(logp: torch.Tensor, batch: _Batch, base: torch.Tensor | None, cfg: KNEConfig) -> torch.Tensor:
    """γ · mean relu(base + margin − NLL_c): zero once the target is margin less likely for them."""
    if base is None:
        return logp.new_zeros(())
    return cfg.contrast_weight * torch.relu(base + cfg.contrast_margin - _contrast_nll(logp, batch)).mean()


def _kl_term(logp: torch.Tensor, ref: list[torch.Tensor], batch: _Batch) -> torch.Tensor:
    """Mean over neutral prompts of the mean over their positions of KL(unedited ‖ edited)."""
    if not batch.kl_rows:
        return logp.new_zeros(())
    terms = []
    for r, n, lp_ref in zip(batch.kl_rows, batch.kl_lengths, ref):
        lp = logp[r, :n]
        terms.append((lp_ref.exp() * (lp_ref - lp)).sum(-1).mean())
    return torch.stack(terms).mean()


class _Optimizer:
    """One update of δ from ``δ.grad``: Adam, or a normalised gradient step; then the norm budget."""

    def __init__(self, delta: torch.Tensor, cfg: KNEConfig) -> None:
        self.delta, self.cfg = delta, cfg
        self.adam = torch.optim.Adam([delta], lr=cfg.lr) if cfg.optimizer == "adam" else None

    @torch.no_grad()
    def step(self) -> None:
        d, cfg = self.delta, self.cfg
        if self.adam is not None:
            self.adam.step()
        else:
            g = d.grad
            norm = float(g.norm())
            if norm > 0 and math.isfinite(norm):
                d.add_(g, alpha=-cfg.step_norm / norm)
        if cfg.max_norm is not None:
            norm = float(d.norm())
            if norm > cfg.max_norm:
                d.mul_(cfg.max_norm / norm)


# --------------------------------------------------------------------------------------------
# the editor


class KNEEditor(Editor):
    """Knowledge Neuronal Ensemble: attribute, threshold, and fine-tune only the ensemble entries."""

    name = "kne"
    summary = "Knowledge Neuronal Ensemble: gradient-attributed sparse MLP entries, jointly fine-tuned"
    paper = "https://arxiv.org/abs/2412.20637"
    config_cls = KNEConfig

    def compute(self, model: nn.Module, tok, requests: Sequence[FactRequest], ctx: EditContext) -> list[EditResult]:
        requests = list(requests)
        iterator: Any = requests
        if ctx.progress and len(requests) > 1:
            from tqdm import tqdm

            iterator = tqdm(requests, desc="kne", unit="fact")
        results = []
        for i, req in enumerate(iterator):
            with preserved(model):
                results.append(self._edit_one(model, tok, req, ctx.seed + i))
        return results

    # ----------------------------------------------------------------------------------------
    def _edit_one(self, model: nn.Module, tok, req: FactRequest, seed: int) -> EditResult:
        cfg: KNEConfig = self.config
        t0 = time.perf_counter()
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        try:
            return self._edit_inner(model, tok, req, seed, cfg, device, t0)
        finally:
            model.train(was_training)

    def _edit_inner(self, model, tok, req, seed, cfg: KNEConfig, device, t0) -> EditResult:
        cands = candidate_params(model, cfg.layers, cfg.exclude_layers)
        layer_of = {k: l for k, (l, _) in cands.items()}
        params = {k: p for k, (_, p) in cands.items()}
        total = sum(p.numel() for p in params.values())
        budget = min(total, cfg.count if cfg.count is not None else max(1, round(cfg.fraction * total)))
        batch = _build_batch(tok, req, cfg, device)

        for p in model.parameters():
            p.requires_grad_(False)

        # 1. attribution. This forward at the unedited weights also gives the reference
        #    distributions of the neutral prompts and the "before" scores; its plain gradient
        #    doubles as the first Adam step's gradient (the KL term has zero gradient there).
        names = list(params)
        for p in params.values():
            p.requires_grad_(True)
        with gradient_through(model, names, batch.subject_mask):
            logp = torch.log_softmax(model(**batch.enc).logits.float(), -1)
        ref = [logp[r, :n].detach().clone() for r, n in zip(batch.kl_rows, batch.kl_lengths)]
        nll, lead, lp_new0, lp_true0 = _nll_terms(logp, batch)
        lp_new, lp_true = lp_new0, lp_true0
        c_base = None
        if batch.contrast_rows and cfg.contrast_weight:
            c_base = _contrast_nll(logp, batch).detach()
        loss0 = nll + _contrast_term(logp, batch, c_base, cfg)  # + KL, whose gradient is 0 here
        grads0 = torch.autograd.grad(loss0, [params[k] for k in names])
        del logp
        if cfg.attribution == "grad_x_weight":
            scores = {k: (g * params[k].detach()).abs().reshape(-1) for k, g in zip(names, grads0)}
        else:
            scores = self._integrated_gradients(model, params, names, batch, grads0, cfg, c_base)
        for p in params.values():
            p.requires_grad_(False)
        t_attr = time.perf_counter()

        # 2. ensemble
        gen = torch.Generator().manual_seed(seed)
        ens = select_ensemble({k: v.cpu() for k, v in scores.items()}, layer_of, cfg.threshold, budget, gen)
        touched = [k for k in names if k in ens]
        idx = {k: ens[k].to(device) for k in touched}
        n = sum(int(v.numel()) for v in idx.values())
        scale = cfg.alpha / math.sqrt(n) if cfg.alpha is not None else 1.0
        w0 = {k: params[k].detach().reshape(-1)[idx[k]].clone() for k in touched}
        offsets, o = {}, 0
        for k in touched:
            offsets[k] = (o, o + idx[k].numel())
            o += idx[k].numel()
        delta = torch.zeros(n, device=device, requires_grad=True)
        opt = _Optimizer(delta, cfg)
        g0 = dict(zip(names, grads0))
        first_grad = torch.cat([g0[k].reshape(-1)[idx[k]] for k in touched]) * scale
        del grads0, g0
        t_sel = time.perf_counter()

        # 3. edit: masked Adam on the ensemble entries only. Every forward after an update is
        #    at the current weights, so the last one scores the final state.
        steps, stopped = 0, lead >= cfg.stop_margin
        tparams = [params[k] for k in touched]
        if not stopped and cfg.max_steps > 0:
            delta.grad = first_grad
            opt.step()
            steps = 1
            self._write(params, touched, idx, w0, offsets, delta, scale)
            for p in tparams:
                p.requires_grad_(True)
            while True:
                with gradient_through(model, touched, batch.subject_mask):
                    logp = torch.log_softmax(model(**batch.enc).logits.float(), -1)
                nll, lead, lp_new, lp_true = _nll_terms(logp, batch)
                if lead >= cfg.stop_margin:
                    stopped = True
                    break
                if steps >= cfg.max_steps:
                    break
                loss = nll + cfg.locality_weight * _kl_term(logp, ref, batch) + _contrast_term(logp, batch, c_base, cfg)
                grads = torch.autograd.grad(loss, tparams)
                del logp
                delta.grad = torch.cat([g.reshape(-1)[idx[k]] for k, g in zip(touched, grads)]) * scale
                del grads
                opt.step()
                steps += 1
                self._write(params, touched, idx, w0, offsets, delta, scale)
            for p in tparams:
                p.requires_grad_(False)
        s0, e0 = batch.spans[0]
        final_nll = -lp_new / (e0 - s0)

        values = (delta.detach() * scale).float().cpu()
        tensors = {}
        for k in touched:
            a, b = offsets[k]
            tensors[k] = SparseDelta(tuple(params[k].shape), idx[k].cpu().to(torch.int64), values[a:b].clone())
        out_delta = Delta(tensors)  # raises NumericalError on NaN/Inf
        ensemble = self._summary(ens, scores, layer_of, total, budget, cfg)
        metrics = {
            "steps": steps,
            "grad_positions": "subject" if cfg.grad_positions == "subject" and req.subject else "all",
            "converged": bool(stopped),
            "final_nll": final_nll,
            "p_target_before": math.exp(lp_new0),
            "p_target_after": math.exp(lp_new),
            "logp_target_before": lp_new0,
            "logp_target_after": lp_new,
            "ensemble_size": n,
            "entries_changed": int((values != 0).sum()),
            "update_norm": float(values.norm()),
            "time_s": time.perf_counter() - t0,
            "time_attribution_s": t_attr - t0,
            "time_select_s": t_sel - t_attr,
        }
        if req.target_true:
            metrics.update(p_true_before=math.exp(lp_true0), p_true_after=math.exp(lp_true),
                           logp_true_before=lp_true0, logp_true_after=lp_true)
        log.info("kne: %r → %r: %d steps, p %.3g → %.3g, %d entries, %.1fs", req.prompt, req.target_new, steps,
                 metrics["p_target_before"], metrics["p_target_after"], n, metrics["time_s"])
        return EditResult((req,), out_delta, ensemble, metrics)

    @staticmethod
    @torch.no_grad()
    def _write(params, touched, idx, w0, offsets, delta, scale) -> None:
        for k in touched:
            a, b = offsets[k]
            params[k].view(-1).index_copy_(0, idx[k], w0[k] + scale * delta.detach()[a:b])

    @staticmethod
    def _integrated_gradients(model, params, names, batch, grads_at_1, cfg: KNEConfig, c_base) -> dict[str, torch.Tensor]:
        """|w̄ · mean_i ∂L/∂w at (i/m)·w̄|, all candidate tensors scaled jointly (i = 1..m)."""
        m = cfg.ig_steps
        acc = {k: g.detach().clone() for k, g in zip(names, grads_at_1)}  # i = m
        orig = {k: params[k].detach().clone() for k in names}
        try:
            for i in range(1, m):
                with torch.no_grad():
                    for k in names:
                        params[k].copy_(orig[k] * (i / m))
                with gradient_through(model, names, batch.subject_mask):
                    logp = torch.log_softmax(model(**batch.enc).logits.float(), -1)
                loss = _nll_terms(logp, batch)[0] + _contrast_term(logp, batch, c_base, cfg)
                grads = torch.autograd.grad(loss, [params[k] for k in names])
                del logp
                for k, g in zip(names, grads):
                    acc[k].add_(g)
        finally:
            with torch.no_grad():
                for k in names:
                    params[k].copy_(orig[k])
        return {k: (acc[k] * orig[k]).abs().reshape(-1) / m for k in names}

    @staticmethod
    def _summary(ens, scores, layer_of, total, budget, cfg: KNEConfig) -> dict:
        per_tensor, per_layer = {}, {}
        for k, ix in ens.items():
            sc = scores[k].cpu()[ix]
            top = torch.topk(sc, min(10, sc.numel()))
            per_tensor[k] = {
                "count": int(ix.numel()),
                "top": [[int(ix[j]), float(v)] for v, j in zip(top.values, top.indices)],
            }
            per_layer[str(layer_of[k])] = per_layer.get(str(layer_of[k]), 0) + int(ix.numel())
        n = sum(v["count"] for v in per_tensor.values())
        return {
            "attribution": cfg.attribution,
            "threshold": cfg.threshold,
            "budget": int(budget),
            "size": n,
            "candidates": int(total),
            "fraction": n / total,
            "per_layer": dict(sorted(per_layer.items(), key=lambda kv: int(kv[0]))),
            "tensors": per_tensor,
        }
