"""bench/lifelong.py's bookkeeping: the time per edit of a run that was stopped and resumed; the
consolidation's closed form against lstsq."""

from __future__ import annotations

import importlib.util
import json
import pathlib

BENCH = pathlib.Path(__file__).resolve().parent.parent / "bench" / "lifelong.py"


def _bench():
    spec = importlib.util.spec_from_file_location("lifelong_bench", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_spent_counts_every_logged_batch_and_carries_an_older_run_over(tmp_path):
    L = _bench()
    run = tmp_path / "new"
    run.mkdir()
    assert L._spent(run, 0) == 0.0  # a new run: an empty carry-over line
    with open(run / "batches.jsonl", "a") as fh:
        for edits, s in ((10, 5.0), (20, 6.0), (30, 7.0)):
            fh.write(json.dumps({"edits": edits, "s": s}) + "\n")
    assert L._spent(run, 30) == 18.0 and L._spent(run, 20) == 11.0
    old = tmp_path / "old"  # from before the log: its audited windows are carried over once
    old.mkdir()
    (old / "rows.jsonl").write_text(json.dumps({"edits": 100, "edit_s_window": 250.0}) + "\n")
    assert L._spent(old, 130) == 250.0
    assert json.loads((old / "batches.jsonl").read_text())["from"] == "audited windows"
    assert L._spent(old, 130) == 250.0  # not carried twice


def test_sampled_facts_leave_out_the_probe_subjects_by_default_and_when_set():
    from kledger.audit.probes import probe_subjects

    L = _bench()
    assert L.sampled_facts_exclude("ultraedit", {}) == probe_subjects()  # the default samples facts
    assert L.sampled_facts_exclude("ultraedit", {"facts_weight": "5000"}) == probe_subjects()
    assert L.sampled_facts_exclude("ultraedit", {"facts_weight": "0"}) is None
    assert L.sampled_facts_exclude("ultraedit", {"preserve_facts": "f.json"}) is None
    assert L.sampled_facts_exclude("memit", {}) is None


def test_consolidated_update_is_the_penalised_least_squares_fit_to_the_history_keys():
    """ΔW H (H + αΣ)⁻¹ = argmin ‖(ΔW' − ΔW) K‖² + α tr(ΔW' Σ ΔW'ᵀ), H = K Kᵀ: against lstsq on the stacked
    system [Kᵀ; √α Lᵀ] ΔW'ᵀ = [Kᵀ ΔWᵀ; 0] (Σ = L Lᵀ); α → 0 keeps ΔW on span(K); GPT-2's layout agrees."""
    import sys

    import torch

    sys.path.insert(0, str(BENCH.parent))
    from lifelong_consolidate import consolidated

    g = torch.Generator().manual_seed(0)
    out, dim, rows = 3, 6, 9
    D = torch.randn(out, dim, generator=g, dtype=torch.float64)
    K = torch.randn(dim, rows, generator=g, dtype=torch.float64)
    A = torch.randn(dim, dim, generator=g, dtype=torch.float64)
    Sig = A @ A.T + 0.1 * torch.eye(dim, dtype=torch.float64)
    H = K @ K.T
    for alpha in (0.1, 1.0, 10.0):
        L = torch.linalg.cholesky(Sig)
        lhs = torch.cat([K.T, alpha ** 0.5 * L.T])
        rhs = torch.cat([K.T @ D.T, torch.zeros(dim, out, dtype=torch.float64)])
        want = torch.linalg.lstsq(lhs, rhs).solution.T
        torch.testing.assert_close(consolidated(D, H, Sig, alpha), want)
        torch.testing.assert_close(consolidated(D.T, H, Sig, alpha, transposed=True), want.T)
    torch.testing.assert_close(consolidated(D, H, Sig, 1e-9), D)  # 9 rows span the 6 inputs: ΔW kept
