"""The per-batch driver of the locate-then-edit editors (MEMIT, AlphaEdit, BLUE) and their
closed forms; the shared pieces are in ``kledger.editors.locate`` and ``kledger.editors.vstar``."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from typing import Any, Sequence

import torch
import torch.nn as nn

from kledger.editors.base import EditContext, EditResult, preserved
from kledger.editors.locate import LocateConfig, check_requests, context_templates, keys_and_outputs, resolve_layers
from kledger.editors.sites import sites_for
from kledger.editors.stats import key_covariances
from kledger.editors.vstar import ZInfo, compute_z
from kledger.ledger.deltas import Delta, LowRankDelta
from kledger.ledger.errors import NumericalError
from kledger.ledger.records import FactRequest


# --- closed forms --------------------------------------------------------------------------------
def memit_solve(K: torch.Tensor, C0: torch.Tensor, lam: float, rho: float = 0.0) -> torch.Tensor:
    """``V = (λ C0 + K Kᵀ + ρ I)⁻¹ K`` (float64), so that ``ΔW = R Vᵀ`` minimises
    ``‖ΔW K − R‖² + λ·tr(ΔW C0 ΔWᵀ) + ρ‖ΔW‖²_F`` (ρ: ENCORE's norm penalty)."""
    K = K.double()
    A = lam * C0.to(K.device, torch.float64) + K @ K.T
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
    with preserved(model, params.values()):  # only the weights written below are saved
        t_stats = time.perf_counter()
        stats_desc = solver.setup(model, tok, edit_layers, ctx, cfg)
        stats_s = time.perf_counter() - t_stats
        templates = context_templates(model, tok, cfg.n_prefixes, cfg.prefix_tokens, ctx.seed)
        for z_layer, lays in phases:
            Z, zinfos[z_layer] = compute_z(model, tok, sites, z_layer, requests, templates, cfg)
            for j, l in enumerate(lays):
                K, H = keys_and_outputs(model, tok, sites, requests, templates, [l], z_layer)
                R = (Z.to(H.device) - H) / (len(lays) - j)
                V = solver.solve(l, K[l])
                if not (torch.isfinite(V).all() and torch.isfinite(R).all()):
                    raise NumericalError(f"{method}: the solve at layer {l} produced NaN/Inf")
                u, v = _factors(R, V, sites.mlp_out_transposed)
                w = model.get_parameter(params[l])
                with torch.no_grad():
                    w.addmm_(u.to(w.device, w.dtype), v.to(w.device, w.dtype).T)
                # kept on the CPU: a split model's layers (and so R, V, K) may lie on different devices
                per_layer[l] = {"R": R.cpu(), "V": V.cpu(), "K": K[l].cpu(), "z_layer": z_layer}
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
