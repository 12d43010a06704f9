"""UltraEdit — training-, subject- and memory-free lifelong editing (Gu et al., arXiv 2505.14679).

No covariance statistics and no v* optimisation. Per batch of fact requests, one *turn* is:

1. one teacher-forced forward/backward pass over ``prompt + target_new`` (loss: each request's
   mean target NLL, summed over requests, so a request's features do not depend on its batch);
   at every edited MLP output projection ``W`` (``down_proj`` / GPT-2 ``c_proj``) read, at each
   position that predicts a target token, the key ``k`` (the projection's input) and the gradient
   ``g`` of the loss with respect to the projection's output;
2. **lifelong normalisation**: the running mean and variance of ``g`` over *every* row the edit
   stream has produced so far (earlier active events + this turn) normalise it:
   ``ĝ = (g − m) / sqrt(s² + ε)``; the value shift of a row is what a gradient step would give at
   its key, with the normalised direction: ``v = −lr · ‖k‖² · ĝ`` (MALMEN's / UltraEdit's form);
3. one ridge solve per layer: ``ΔWᵀ = (KᵀK + μ·H_hist + λ I)⁻¹ Kᵀ V`` (float64), written as the
   low-rank pair ``ΔW = Vᵀ · (S⁻¹Kᵀ)ᵀ`` (rank = rows). ``H_hist = Σ K_e K_eᵀ`` over earlier active
   UltraEdit events (μ = ``history_weight``; 0 turns it off and needs no key history), which
   keeps ``ΔW k_old ≈ 0`` for keys of earlier edits, as AlphaEdit's key history does.

Turns repeat (at most ``max_turns``) for the requests whose target is not yet the argmax of
every target token, each on the working copy with the earlier turns written in (ENCORE's MPES
idea applied to turns: stop as soon as the target is top-1, plus ``extra_turns``). A turn's one
pass over the requests not yet done both checks them and gives the features of those still active.

**Reading of the paper** (its code is not public in full): the normaliser here keeps the gradient
part only, since the solve uses raw keys; with few rows the running statistics are shrunk toward
an isotropic prior of ``norm_prior`` pseudo-rows (mean 0, variance the pooled mean square), so a
first edit of one token is well defined (centering one row would remove it entirely).

**State in the ledger**: every result's ``Delta.state`` holds, per edited layer, ``gcount.<l>``
(1, float64), ``gsum.<l>`` and ``gsq.<l>`` (out, float64): the sufficient statistics of the rows
this request contributed, and ``keys.<l>`` (in × rows, float32) when ``history_weight > 0``: every
turn's rows, or with ``history_keys="final"`` the rows of the request's last turn. The
state before an edit is the sum over ``ctx.history["states"]`` (earlier active UltraEdit events, in
ledger order), so a sequence continued after a restart sees exactly the state of one
uninterrupted run, and a reverted event's rows leave the statistics with it.

Every closed form is linear in the columns of ``V``, so with ``split_batch`` each request's
event holds the rank-(its rows) share and the shares sum to the batch update exactly.
The rows a turn reads live in ``editors/ultraedit_rows.py``, the normaliser's statistics and the solve
in ``editors/ultraedit_solve.py``. Defaults were chosen on the lifelong benchmark (bench/lifelong.py; bench/results/lifelong.md).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn as nn

from kledger.editors.base import EditContext, Editor, EditResult, preserved
from kledger.editors.ultraedit_solve import GradStats, _history_keys, _state_stats, history_factor, ridge_factors
from kledger.editors.locate import context_templates
from kledger.editors.ultraedit_rows import _with_context_mean, _with_context_rows, context_grads, context_keys, features
from kledger.editors.sites import early_window, num_layers, sites_for
from kledger.editors.entitystats import entity_covariances, fact_covariances, sampled_fact_covariances
from kledger.editors.stats import key_covariances
from kledger.ledger.deltas import Delta, LowRankDelta
from kledger.ledger.errors import NumericalError, UsageError
from kledger.ledger.records import FactRequest

log = logging.getLogger(__name__)
POSITIONS = ("subject", "target", "both", "answer")


@dataclass(frozen=True)
class UltraEditConfig:
    """UltraEdit hyper-parameters (defaults measured; see the module docstring)."""

    # None: sites.early_window(num_layers(model)), 3–6 of 30 since the seventh session. The damage of a
    # 4–8 sequence sat in layers 7–8 (`bench/lifelong.py damage`); at 300 edits 3–6 lost 0.055 of the
    # known facts against 0.164 (3–7: 0.104); 2–6 was worse than 4–8 from 300 on (KL 0.224: at layer 2
    # a subject's last-token key is mostly the token piece) (bench/results/lifelong.md)
    layers: tuple[int, ...] | None = None
    lr: float = 2.5e-3  # value shift per turn = −lr·‖k‖²·ĝ (small steps: less overshoot past top-1)
    ridge: float = 1e2  # λ of the ridge solve
    # μ: weight of earlier UltraEdit events' keys (0: off, no keys stored). 10 since the sixth session:
    # over the lifelong stream the retention drop at 300 / 400 edits was 0.164 / 0.186 against
    # 0.257 / 0.284 with μ 1 (bench/results/lifelong.md)
    history_weight: float = 10.0
    # which keys an event leaves in the history: "turns" (every turn's rows: a request that took 40 turns
    # weighs 40× one that took 1; half of a 1,000-edit stream's requests used all 40, most of them misses) or
    # "final" (each row's key of the request's last turn: one weight per edit, a history a few turns' size)
    history_keys: str = "turns"
    max_turns: int = 40  # closed-form turns per batch at most (lr × max_turns bounds the push)
    # > 1: a request's t-th turn (from 0) steps lr·step_growth^t, so the requests still short of top-1
    # after many turns (a fifth of CounterFact's, most of zsRE's hit max_turns at 1.0) get larger steps
    step_growth: float = 1.0
    extra_turns: int = 0  # turns a request keeps taking after its target became top-1
    # per-row stop: a row inside the answer (or at the prompt's end) leaves the solve once the token it predicts
    # is the argmax; the subject's row and the rows still short keep writing. Off: on 100 zsRE edits from the base
    # (λ_f 5000, lr 5e-3) it cost efficacy 0.790 vs 0.848 and paraphrase 0.497 vs 0.638 for a retention drop of
    # 0.087 vs 0.109 (4 of 183 facts): settled rows keep their tokens in place while the subject's row moves
    row_stop: bool = False
    # weight of the answer's first token in a request's loss (the others 1): zsRE's misses are first tokens
    # (teacher-forced accuracy 0.65 vs 0.93 on the later ones), whose share of a 3-token answer's mean is a third.
    # 1: on 100 zsRE edits from the base (λ_f 5000) a weight of 4 lowered token accuracy 0.790 → 0.747 and
    # paraphrase 0.559 → 0.500 at the same retention drop (0.027)
    first_weight: float = 1.0
    norm_prior: float = 16.0  # pseudo-rows of the isotropic prior of the lifelong normaliser
    norm_eps: float = 1e-8  # ε added to the variance (relative to the pooled mean square)
    split_batch: bool = True  # one EditResult (its rows' share) per request
    # rows: "subject" (its last token), "target" (tokens predicting the target), "both", or "answer": the
    # subject's last token and the target's own tokens that predict its next one (not the prompt's last
    # token, whose key is a generic word shared by countless contexts). "answer" since the eighth session:
    # single-token targets get the subject row only, as before; a multi-token answer also teaches its own
    # continuation. Over the 1,000-edit stream (3–6): efficacy 0.732 vs 0.701, paraphrase 0.506 vs 0.471,
    # zsRE token accuracy 0.548 vs 0.484; the retention drop rose by the same 0.011 over the zsRE part
    # (0.148 vs 0.115 at the end, a gap already there at 600 edits and not from these rows: the multi-token
    # edits alone lose 0.055 vs 0.060 with subject rows) (bench/results/lifelong.md, `lifelong.py kept`)
    positions: str = "answer"
    # > 0: the subject's key is also read under this many context prefixes sampled from the model
    # (MEMIT's context templates, once per batch) and each such row gets its prompt row's value, so the
    # update answers the subject in other contexts too (paraphrases); needs a subject row (positions ≠ target)
    context_prefixes: int = 0
    prefix_tokens: int = 10  # tokens per context prefix
    # how the prefixes' keys enter: "rows" (each its own row, the prompt row's value) or "mean" (the subject's
    # row key becomes the mean of its prompt key and its prefix keys, MEMIT's averaged key: no extra rows). With
    # known facts preserved (λ_f 5000, lr 5e-3), 3 prefixes, 200 CounterFact edits: "rows" paraphrase 0.760 at a
    # retention drop of 0.246, "mean" 0.690 at 0.066, none 0.675 at 0.038 (bench/results/lifelong.md); or
    # "grad": no extra rows or keys, each row's gradient is the mean of its gradients under the prompt and
    # each prefixed prompt (a direction that moves the answer after other text too; 1 + n passes a turn)
    context_mode: str = "rows"
    preserve_weight: float = 5000.0  # λ_c: weight of the preserved-key covariance C0 (0: the paper's, no statistics)
    stats_tokens: int = 8192  # tokens of the key-statistics corpus when preserve_weight > 0
    # λ_e: weight of C_ent, the covariance of the corpus's keys at names only (editors/entitystats.py):
    # the keys through which a sequence damages known facts; 0: off
    entity_weight: float = 0.0
    # λ_f: weight of C_facts, the covariance of the keys at every token of known facts, the kind of
    # sentence whose answers a sequence must keep (editors/entitystats.py); 0: off. The facts: a file
    # (``preserve_facts``: known_1000.json records, {"prompt", "answer"} or [prompt, answer]), or without
    # one, ``facts_samples`` sentences per opener that the model writes itself (editors/factsample.py).
    # 5000 with sampled facts since the tenth session: over the 1,000-edit stream the retention drop was
    # 0.087 against 0.148 without (KL 0.028 vs 0.047, perplexity ×1.010 vs ×1.017), efficacy / paraphrase
    # 0.712 / 0.493 vs 0.732 / 0.506, 3.6 s per edit (bench/results/lifelong.md, runs gs-5k and a-36)
    facts_weight: float = 5000.0
    preserve_facts: str | None = None
    facts_samples: int = 32
    facts_exclude: tuple[str, ...] = ()  # sampled sentences naming one of these are left out

    def __post_init__(self) -> None:
        if isinstance(self.layers, list):
            object.__setattr__(self, "layers", tuple(self.layers))
        if self.layers is not None and (not self.layers or not all(isinstance(x, int) for x in self.layers)):
            raise ValueError(f"layers must be a non-empty list of integers, found {self.layers!r}")
        if not self.lr > 0 or not self.ridge > 0:
            raise ValueError(f"lr and ridge must be > 0, found {self.lr} and {self.ridge}")
        if min(self.history_weight, self.norm_prior, self.norm_eps, self.preserve_weight, self.entity_weight,
               self.facts_weight) < 0:
            raise ValueError("history_weight, norm_prior, norm_eps, preserve_weight, entity_weight and facts_weight "
                             "must be ≥ 0")
        if self.preserve_facts is not None and not self.facts_weight > 0:
            raise ValueError("preserve_facts (a JSON file of known facts) needs facts_weight > 0, found "
                             f"facts_weight={self.facts_weight}")
        if self.facts_samples < 1:
            raise ValueError(f"facts_samples must be ≥ 1, found {self.facts_samples}")
        if isinstance(self.facts_exclude, list):
            object.__setattr__(self, "facts_exclude", tuple(self.facts_exclude))
        if not all(isinstance(x, str) and x for x in self.facts_exclude):
            raise ValueError(f"facts_exclude must be a list of non-empty strings, found {self.facts_exclude!r:.200}")
        if self.facts_exclude and self.preserve_facts is not None:
            raise ValueError("facts_exclude filters the sampled facts; with preserve_facts, leave those facts out of "
                             "the file instead")
        if self.history_keys not in ("turns", "final"):
            raise ValueError(f"history_keys must be turns or final, found {self.history_keys!r}")
        if self.history_keys == "final" and self.row_stop:
            raise ValueError("history_keys='final' keeps the rows of a request's last turn; with row_stop the rows "
                             "that settled earlier would leave no key: use history_keys='turns'")
        if self.positions not in POSITIONS:
            raise ValueError(f"positions must be one of {', '.join(POSITIONS)}, found {self.positions!r}")
        if self.context_prefixes < 0 or self.prefix_tokens < 1:
            raise ValueError(f"context_prefixes must be ≥ 0 and prefix_tokens ≥ 1, found {self.context_prefixes}, "
                             f"{self.prefix_tokens}")
        if self.context_mode not in ("rows", "mean", "grad"):
            raise ValueError(f"context_mode must be rows, mean or grad, found {self.context_mode!r}")
        if self.context_prefixes and self.positions == "target":
            raise ValueError("context_prefixes needs the subject's row: use positions subject, both or answer")
        if not self.first_weight > 0:
            raise ValueError(f"first_weight must be > 0, found {self.first_weight}")
        if not self.step_growth >= 1.0:
            raise ValueError(f"step_growth must be ≥ 1, found {self.step_growth}")
        if self.max_turns < 1 or self.extra_turns < 0:
            raise ValueError(f"max_turns must be ≥ 1 and extra_turns ≥ 0, found {self.max_turns}, {self.extra_turns}")


class UltraEditEditor(Editor):
    """The lifelong default: gradient-derived values, lifelong normalisation, one ridge solve a turn.

    Reads ``ctx.history["states"]`` (``needs_history``): earlier active UltraEdit events' normaliser
    sums and keys. Solves a batch jointly (``batch_solve``), so ``merge --strategy resolve`` can
    re-solve both sides' UltraEdit edits together."""

    config_cls = UltraEditConfig
    name, needs_history, batch_solve = "ultraedit", True, True
    input_files = ("preserve_facts",)
    # events recorded before these options kept no known facts and every turn's keys
    recorded_defaults = {"facts_weight": 0.0, "history_keys": "turns"}
    summary = "UltraEdit: lifelong-normalised ridge update at the subject (C0 + sampled known facts preserved; low-rank, PEFT-exportable)"
    paper = "https://arxiv.org/abs/2505.14679"

    def compute(self, model: nn.Module, tok, requests: Sequence[FactRequest], ctx: EditContext) -> list[EditResult]:
        if not requests:
            raise UsageError("ultraedit: expected at least one fact request, found none")
        t0 = time.perf_counter()
        cfg, requests = self.config, list(requests)
        sites = sites_for(model)
        n_layers = num_layers(model)
        layers = tuple(sorted(set(cfg.layers))) if cfg.layers is not None else early_window(n_layers)
        if any(not 0 <= l < n_layers for l in layers):
            raise UsageError(f"ultraedit: expected layers in [0, {n_layers}), found {list(layers)}")
        params = {l: sites.mlp_out_param(l) for l in layers}
        states = list(ctx.history.get("states") or [])
        self._stats_desc = None
        shares = self._turns(model, tok, sites, layers, params, requests, states, ctx)
        return self._results(model, sites, layers, params, requests, shares, time.perf_counter() - t0, len(states))

    def _extra_covariances(self, model, tok, layers, ctx) -> dict[int, torch.Tensor]:
        """``λ_e·C_ent + λ_f·C_facts`` per layer (the name-key and known-fact terms of the solve), or {}."""
        cfg, out = self.config, {}
        parts = []
        if cfg.entity_weight > 0:
            cent, self._stats_desc["entity"] = entity_covariances(model, tok, layers, ctx, n_tokens=cfg.stats_tokens,
                                                                  seed=ctx.seed)
            parts.append((cfg.entity_weight, cent))
        if cfg.facts_weight > 0:
            cf, self._stats_desc["facts"] = (
                fact_covariances(model, tok, layers, ctx, cfg.preserve_facts) if cfg.preserve_facts is not None
                else sampled_fact_covariances(model, tok, layers, ctx, per_opener=cfg.facts_samples,
                                              exclude=cfg.facts_exclude))
            parts.append((cfg.facts_weight, cf))
        for l in layers:
            for w, cov in parts:
                c = cov.pop(l)
                out[l] = c.mul_(w) if l not in out else out[l].add_(c, alpha=w)
        return out

    def _turns(self, model, tok, sites, layers, params, requests, states, ctx) -> dict[str, Any]:
        """Run the turns on the working copy (restored on exit); collect per-request shares."""
        cfg = self.config
        n = len(requests)
        dims = {}
        for l in layers:
            w = model.get_parameter(params[l])
            dims[l] = (w.shape[0], w.shape[1]) if sites.mlp_out_transposed else (w.shape[1], w.shape[0])  # (in, out)
        stats = {l: _state_stats(states, l, dims[l][1]) for l in layers}
        devs = {l: model.get_parameter(params[l]).device for l in layers}
        c0: dict[int, torch.Tensor] = {}
        if cfg.preserve_weight > 0 or cfg.entity_weight > 0 or cfg.facts_weight > 0:
            c0, self._stats_desc = key_covariances(model, tok, layers, ctx, n_tokens=cfg.stats_tokens, seed=ctx.seed)
        cent = self._extra_covariances(model, tok, layers, ctx)
        chol: dict[int, torch.Tensor] = {}
        for l in layers:  # one layer at a time, its C0 and H freed once factorised: peak ≈ one set of in×in
            H = _history_keys(states, l, dims[l][0], devs[l]) if cfg.history_weight > 0 else None
            C0, Ce = c0.pop(l, None), cent.pop(l, None)
            if H is not None or C0 is not None:
                chol[l] = history_factor(H, cfg.ridge, cfg.history_weight, C0, cfg.preserve_weight, Ce, 1.0)
            del H, C0, Ce
        grad_mode = cfg.context_prefixes > 0 and cfg.context_mode == "grad"
        ctx_keys = (context_keys(model, tok, sites, layers, requests, cfg.context_prefixes, cfg.prefix_tokens, ctx.seed)
                    if cfg.context_prefixes and not grad_mode else None)
        templates = (context_templates(model, tok, cfg.context_prefixes, cfg.prefix_tokens, ctx.seed)[1:]
                     if grad_mode else [])
        u = {l: [[] for _ in range(n)] for l in layers}  # per request: list of (out×r) pieces
        v = {l: [[] for _ in range(n)] for l in layers}
        mine = {l: [GradStats.zeros(dims[l][1]) for _ in range(n)] for l in layers}
        keys = {l: [[] for _ in range(n)] for l in layers}
        after = [0] * n  # turns taken after top-1
        turns_taken = [0] * n
        nll0: list[float] = []
        with preserved(model, params.values()):  # only the weights the turns write
            done = [False] * n
            for turn in range(cfg.max_turns):
                cand = [i for i in range(n) if not done[i]]
                if not cand:
                    break
                # one pass gives both the check (is the target top-1 yet?) and the features
                ft = features(model, tok, sites, layers, [requests[i] for i in cand], positions=cfg.positions,
                              first_weight=cfg.first_weight)
                if turn == 0:
                    nll0 = ft.nll
                active = []
                for j, i in enumerate(cand):
                    if ft.top1[j] and after[i] >= cfg.extra_turns:
                        done[i] = True
                        continue
                    after[i] += int(ft.top1[j])
                    active.append(i)
                if not active:
                    break
                grads = (context_grads(model, tok, sites, layers, [requests[i] for i in cand], ft, templates,
                                       cfg.positions, cfg.first_weight) if grad_mode else ft.grads)
                keep = set(active)
                rows = [r for r, o in enumerate(ft.owners) if cand[o] in keep and not (cfg.row_stop and ft.settled[r])]
                owners = [cand[ft.owners[r]] for r in rows]
                for i in active:
                    turns_taken[i] += 1
                for l in layers:
                    K, G = ft.keys[l][rows], grads[l][rows]
                    if not (torch.isfinite(K).all() and torch.isfinite(G).all()):
                        raise NumericalError(f"ultraedit: non-finite keys or gradients at layer {l}")
                    for i in set(owners):
                        sel = torch.tensor([j for j, o in enumerate(owners) if o == i])
                        mine[l][i] = mine[l][i] + GradStats.of(G[sel])
                    stats[l] = stats[l] + GradStats.of(G)
                    Gn = stats[l].normalise(G, cfg.norm_prior, cfg.norm_eps).to(K.device)
                    if cfg.step_growth != 1.0:  # per row: its request's turn count so far
                        Gn = Gn * torch.tensor([cfg.step_growth ** (turns_taken[o] - 1) for o in owners],
                                               dtype=Gn.dtype, device=Gn.device)[:, None]
                    V = -cfg.lr * (K * K).sum(1, keepdim=True) * Gn  # rows × out
                    row_owners = owners
                    if ctx_keys is not None and cfg.context_mode == "mean":
                        K = _with_context_mean(K, owners, ctx_keys[l])
                    elif ctx_keys is not None:
                        K, V, row_owners = _with_context_rows(K, Gn, V, owners, ctx_keys[l], cfg.lr)
                    for i in set(row_owners):
                        sel = torch.tensor([j for j, o in enumerate(row_owners) if o == i])
                        if cfg.history_keys == "final":  # this turn's rows replace the earlier turns'
                            keys[l][i].clear()
                        keys[l][i].append(K[sel].float().cpu())
                    M = ridge_factors(K, V, cfg.ridge, None, 0.0, chol.get(l))  # in × rows (history is in chol)
                    if not (torch.isfinite(V).all() and torch.isfinite(M).all()):
                        raise NumericalError(f"ultraedit: the solve at layer {l} produced NaN/Inf")
                    U_, V_ = V.T.float(), M.float()  # ΔW (out×in) = U_ V_ᵀ
                    if sites.mlp_out_transposed:
                        U_, V_ = V_, U_
                    w = model.get_parameter(params[l])
                    with torch.no_grad():
                        w.addmm_(U_.to(w.device, w.dtype), V_.to(w.device, w.dtype).T)
                    for i in set(row_owners):
                        sel = torch.tensor([j for j, o in enumerate(row_owners) if o == i], device=U_.device)
                        u[l][i].append(U_[:, sel].cpu())
                        v[l][i].append(V_[:, sel].cpu())
            final = features(model, tok, sites, layers, requests, with_grad=False)
        return {"u": u, "v": v, "stats": mine, "keys": keys, "turns": turns_taken, "top1": final.top1,
                "nll_start": nll0, "nll_end": final.nll}

    def _results(self, model, sites, layers, params, requests, sh, elapsed, n_hist) -> list[EditResult]:
        cfg = self.config
        n = len(requests)
        groups = [[i] for i in range(n)] if cfg.split_batch else [list(range(n))]
        results = []
        for g in groups:
            tensors, state, d_norms, ranks = {}, {}, {}, {}
            for l in layers:
                us = [p for i in g for p in sh["u"][l][i]]
                vs = [p for i in g for p in sh["v"][l][i]]
                st = GradStats.zeros(sh["stats"][l][g[0]].total.numel())
                for i in g:
                    st = st + sh["stats"][l][i]
                state[f"gcount.{l}"], state[f"gsum.{l}"], state[f"gsq.{l}"] = st.count, st.total, st.sq
                ks = [k for i in g for k in sh["keys"][l][i]]
                if cfg.history_weight > 0 and ks:
                    state[f"keys.{l}"] = torch.cat(ks).T.contiguous()
                if not us:
                    continue
                U, Vv = torch.cat(us, 1).contiguous(), torch.cat(vs, 1).contiguous()
                shape = tuple(model.get_parameter(params[l]).shape)
                tensors[params[l]] = LowRankDelta(shape, U, Vv)
                ranks[params[l]] = int(U.shape[1])
                d_norms[str(l)] = round(float(torch.sqrt(((U.T @ U) * (Vv.T @ Vv)).sum().clamp_min(0))), 6)
            metrics = {
                "turns": [sh["turns"][i] for i in g] if len(g) > 1 else sh["turns"][g[0]],
                "top1": [sh["top1"][i] for i in g] if len(g) > 1 else sh["top1"][g[0]],
                "nll_start": round(sum(sh["nll_start"][i] for i in g) / len(g), 5),
                "nll_end": round(sum(sh["nll_end"][i] for i in g) / len(g), 5),
                "delta_norm": d_norms, "time_s": round(elapsed * len(g) / n, 4),
                "batch_time_s": round(elapsed, 4), "batch_size": n, "history_events": n_hist,
            }
            ens = {"layers": list(layers), "tensors": [params[l] for l in layers], "rank": ranks,
                   "positions": cfg.positions, "stats": self._stats_desc}
            results.append(EditResult(tuple(requests[i] for i in g), Delta(tensors, state), ens, metrics))
        return results
