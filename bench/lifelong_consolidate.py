"""``lifelong.py consolidate NAME``: re-solve a run's accumulated UltraEdit update, off the ledger.

For each edited layer, with ``ΔW = W − W₀`` the run's accumulated update, ``H = Σ k kᵀ`` over the key
history its events recorded (``keys.<layer>`` of every event's state) and ``Σ = λ_c C0 + λ_f C_facts``
(the preservation terms of the run's config, from its caches), the least-squares update that keeps
``ΔW`` on the history keys with ``α Σ`` as its penalty is

    ΔW' = argmin ‖(ΔW' − ΔW) K‖² + α tr(ΔW' Σ ΔW'ᵀ) = ΔW H (H + α Σ)⁻¹.

Each α is measured on the run's stream (efficacy / paraphrase of every edit, neighbourhood kept) and on
the audit's known facts (retention drop), one JSON line each on stdout; the ledger is not changed. A
question, not a feature: does re-weighing the whole update after the fact land off the trade that every
per-edit setting measured in ``bench/results/lifelong.md`` lands on?
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Sequence

import torch

log = logging.getLogger("lifelong")


def _history_grams(ledger, events, layers: Sequence[int], dim: int, chunk: int = 50) -> dict[int, torch.Tensor]:
    """``H_l = Σ K Kᵀ`` (float64) over the events' recorded keys, read ``chunk`` events at a time."""
    from kledger.editing import method_states  # noqa: PLC0415

    H = {l: torch.zeros(dim, dim, dtype=torch.float64) for l in layers}
    for i in range(0, len(events), chunk):
        for st in method_states(ledger, "ultraedit", events[i:i + chunk]):
            for l in layers:
                K = st.get(f"keys.{l}")
                if K is not None:
                    H[l] += K.double() @ K.double().T
    return H


def _preservation(ledger, base, tok, layers: Sequence[int], cfg: dict) -> dict[int, torch.Tensor]:
    """``λ_c C0 + λ_f C_facts`` per layer as the run's editor built them (from its caches)."""
    from kledger.editing import edit_context, make_editor  # noqa: PLC0415
    from kledger.editors.entitystats import sampled_fact_covariances  # noqa: PLC0415
    from kledger.editors.stats import key_covariances  # noqa: PLC0415

    editor = make_editor("ultraedit", cfg)
    ecfg = editor.config
    if ecfg.preserve_facts is not None or ecfg.entity_weight:
        raise SystemExit("consolidate: expected a run with sampled facts and no entity term")
    ctx = edit_context(ledger, editor, [], seed=0)
    c0, _ = key_covariances(base, tok, layers, ctx, n_tokens=ecfg.stats_tokens, seed=0)
    out = {l: ecfg.preserve_weight * c0[l].double() for l in layers}
    if ecfg.facts_weight > 0:
        cf, _ = sampled_fact_covariances(base, tok, layers, ctx, per_opener=ecfg.facts_samples,
                                         exclude=ecfg.facts_exclude)
        for l in layers:
            out[l] += ecfg.facts_weight * cf[l].double()
    return out


def consolidated(D: torch.Tensor, H: torch.Tensor, Sig: torch.Tensor, alpha: float, transposed: bool = False
                 ) -> torch.Tensor:
    """``ΔW H (H + αΣ)⁻¹`` for ``D = ΔW`` (out × in; in × out when ``transposed``, as GPT-2 stores it)."""
    F = torch.linalg.solve(H + alpha * Sig, H).T  # H (H + αΣ)⁻¹: both symmetric
    return F.T @ D if transposed else D @ F


def consolidate(ws, items, base_loc: list[int], alphas: Sequence[float], edit_scores) -> list[dict]:
    """One row per α (and one for the run as it is): the scores of ``W₀ + ΔW H (H + αΣ)⁻¹``."""
    from kledger.audit.figures import answers_hold  # noqa: PLC0415
    from kledger.auditing import probe_set  # noqa: PLC0415
    from kledger.editors.sites import sites_for  # noqa: PLC0415

    led = ws.ledger
    events = [e for e in led.events(types=["add"]) if e.method == "ultraedit"]
    if not events:
        raise SystemExit("consolidate: the run has no ultraedit events")
    cfg = dict(events[-1].config or {})
    layers = sorted(events[-1].ensemble["layers"])
    base, tok, _ = ws.load_base()
    facts = list(probe_set(led, base, tok)[0].facts)
    sites = sites_for(base)
    names = {l: sites.mlp_out_param(l) for l in layers}
    W0 = {l: base.get_parameter(names[l]).detach().clone() for l in layers}
    dim = W0[layers[0]].shape[0] if sites.mlp_out_transposed else W0[layers[0]].shape[1]
    Sig = _preservation(led, base, tok, layers, cfg)
    del base
    H = _history_grams(led, events, layers, dim)
    model, tok = ws.working()
    W = {l: model.get_parameter(names[l]).detach().clone() for l in layers}
    rows = []
    for a in [None, *alphas]:
        t0 = time.perf_counter()
        with torch.no_grad():
            for l in layers:
                D = (W[l] - W0[l]).double()
                if a is not None:
                    D = consolidated(D, H[l], Sig[l], a, sites.mlp_out_transposed)
                model.get_parameter(names[l]).copy_((W0[l].double() + D).to(W[l].dtype))
        held = answers_hold(model, tok, facts)
        rel = max(float((model.get_parameter(names[l]) - W0[l]).norm() / W0[l].norm()) for l in layers)
        row = {"alpha": a, "edits": len(events), "retention_drop": round(1 - sum(h[0] for h in held) / len(facts), 4),
               **edit_scores(model, tok, items, base_loc), "weight_rel": round(rel, 4),
               "trace_H": {str(l): float(H[l].trace()) for l in layers},
               "trace_Sigma": {str(l): float(Sig[l].trace()) for l in layers},
               "measure_s": round(time.perf_counter() - t0, 1)}
        log.info("consolidate α=%s: %s", a, {k: row[k] for k in ("retention_drop", "efficacy", "paraphrase")})
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main(ws, workdir: Path, items, alphas: Sequence[float], edit_scores) -> None:
    base_loc = json.loads((workdir / "base_locality.json").read_text())
    rows = consolidate(ws, items, base_loc, alphas, edit_scores)
    (workdir / "consolidate.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
