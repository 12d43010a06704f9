"""MEMIT — Mass-Editing Memory in a Transformer (Meng et al., arXiv 2210.07229), with BLUE.

Per batch of fact requests (see ``kledger.editors.locate`` for the shared pieces):

1. ``z = h + δ`` at the last critical layer L (v*: target NLL over the raw prompt and a few
   sampled context prefixes, KL on "{subject} is a", weight decay, clamp, Adam, early stop);
2. for each critical layer l (ascending): keys ``K_l`` at the subject's last token (averaged over
   the prefixes), ``R = (Z − H_L)/(critical layers left)`` with ``H_L`` from the current working
   copy, ``ΔW_l = R K_lᵀ (λ C0_l + K_l K_lᵀ)⁻¹`` (float64), written into the working copy before
   the next layer;
3. BLUE (``blue=True``, arXiv 2502.03748): only the first and last critical layers; for each in
   turn z is computed at that layer and the whole residual ``Z_l − H_l`` is written there.

``C0 = E[k kᵀ]`` comes from ``kledger.editors.stats`` (cached, content-addressed). The delta is
a ``LowRankDelta`` per edited tensor; with ``split_batch`` (default) every request gets its own
EditResult holding its rank-1 share per layer, and the shares sum to the batch update.

Defaults (measured on SmolLM2-135M, CounterFact; numbers in bench/results/locate_edit.md): the
shared ones are documented in ``kledger.editors.locate``. ``mom2_weight`` (λ) was swept on one batch
of 20 requests (layers 4–8, v* shared): λ = 500 / 2000 / 5000 / 15000 / 50000 gave efficacy
1.00 / 1.00 / 0.95 / 0.70 / 0.35, paraphrase 0.95 / 0.95 / 0.90 / 0.65 / 0.45, neighbourhood score
0.70 / 0.75 / 0.80 / 0.80 / 0.80 and top-1 kept 0.80 / 0.85 / 0.85 / 0.90 / 1.00. The reference
15000 (GPT-J) under-writes this model; 5000 is the largest λ with efficacy ≥ 0.9, i.e. the most
protective one that still writes the facts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn

from kledger.editors.base import EditContext, Editor, EditResult
from kledger.editors.driver import Solver, locate_edit, memit_solve, stats_for
from kledger.editors.locate import PRE_NORM_CONTROL, LocateConfig
from kledger.ledger.records import FactRequest


@dataclass(frozen=True)
class MEMITConfig(LocateConfig):
    """MEMIT hyper-parameters (shared ones documented in ``LocateConfig``)."""

    mom2_weight: float = 5000.0  # λ: weight of the preserved-key covariance C0 in the solve (measured)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.mom2_weight > 0:
            raise ValueError(f"mom2_weight must be > 0, found {self.mom2_weight}")


class MEMITSolver(Solver):
    def __init__(self, cfg: MEMITConfig) -> None:
        self.cfg = cfg
        self.c0: dict[int, torch.Tensor] = {}

    def setup(self, model, tok, layers, ctx, cfg) -> dict:
        self.c0, desc = stats_for(model, tok, layers, ctx, cfg)
        return desc

    def solve(self, layer: int, K: torch.Tensor) -> torch.Tensor:
        return memit_solve(K, self.c0[layer], self.cfg.mom2_weight, self.cfg.norm_penalty)


class MEMITEditor(Editor):
    name = "memit"
    summary = "MEMIT: closed-form batch update of the MLP output projections of a few layers (BLUE: blue=true)"
    paper = "https://arxiv.org/abs/2210.07229 (BLUE: https://arxiv.org/abs/2502.03748)"
    config_cls = MEMITConfig
    recorded_defaults = PRE_NORM_CONTROL  # events from before MPES / NAS were config fields had neither
    batch_solve = True  # one closed-form solve per batch (merge --strategy resolve re-solves together)

    def compute(self, model: nn.Module, tok, requests: Sequence[FactRequest], ctx: EditContext) -> list[EditResult]:
        return locate_edit(self.name, model, tok, requests, ctx, self.config, MEMITSolver(self.config))
