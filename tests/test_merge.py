"""TIES against a reference computation, interference scores, `resolve` merges and rebase-revert.

`resolve` and rebase-revert run an editor; here it is ``LsqEditor``, a test-only method
registered for the test: a rank-n least-squares write ``W k_i = v_i`` into one MLP output
matrix with AlphaEdit-style null-space projection against the keys of earlier edits (its
history), so each result depends on the weights and on the history it was computed on.
"""

from __future__ import annotations

import json
import math
import zlib
from dataclasses import dataclass
from typing import Sequence

import pytest
import torch

from kledger import Workspace, init_ledger, rebase_revert
from kledger.editors.base import EditContext, Editor, EditResult, preserved
from kledger.editors.models import load_model
from kledger.ledger.compose import materialise
from kledger.ledger.deltas import Delta, LowRankDelta, SparseDelta
from kledger.ledger.merge import analyse, ties_correction
from kledger.ledger.mergeplan import plan_merge
from kledger.ledger.records import FactRequest
from kledger.ledger.store import Ledger

from conftest import invoke

from conftest import FAKE_MODEL, Params, add_fact as add, run_on as run, sparse_delta as sparse, weights

PARAM = "model.layers.1.mlp.down_proj.weight"  # tiny llama: 32 × 64 (out × in)


# --------------------------------------------------------------------------------------------
# TIES: reference computation written independently (dense tensors, a Python loop per entry)

def ties_reference(base: torch.Tensor, ours: list[dict[int, float]], theirs: list[dict[int, float]], density: float):
    def side(ds):
        tau: dict[int, float] = {}
        for d in ds:
            for i, v in d.items():
                tau[i] = tau.get(i, 0.0) + v
        return tau

    ta, tb = side(ours), side(theirs)

    def kept(tau):
        mags = sorted((abs(v) for v in tau.values()), reverse=True)
        k = max(1, math.ceil(density * len(mags)))
        thr = mags[k - 1]
        return {i: (v if abs(v) >= thr else 0.0) for i, v in tau.items()}

    ka, kb = kept(ta), kept(tb)
    out = base.clone().reshape(-1).double()
    for i in set(ta) | set(tb):
        if i in ta and i in tb:
            a, b = ka[i], kb[i]
            s = a + b
            sign = (s > 0) - (s < 0)
            agree = [x for x in (a, b) if x != 0 and ((x > 0) - (x < 0)) == sign]
            out[i] += sum(agree) / len(agree) if agree else 0.0
        else:
            out[i] += ta.get(i, 0.0) + tb.get(i, 0.0)
    return out.reshape(base.shape).float()


@pytest.mark.parametrize("density", [1.0, 0.5, 0.2])
def test_ties_matches_reference(tmp_path, density):
    g = torch.Generator().manual_seed(int(density * 10))
    L = Ledger.create(tmp_path, FAKE_MODEL)
    ours, theirs = [], []
    add(L, "Base", "Lima", sparse("a", [0, 1], [0.3, 0.3]))
    L.create_branch("t")
    for side, br, subjects in ((ours, "main", ["Alice", "Bob"]), (theirs, "t", ["Carol", "Dan"])):
        for subj in subjects:
            idx = torch.randperm(48, generator=g)[:20].tolist()  # 48 entries, heavy overlap
            vals = (torch.randn(20, generator=g)).tolist()
            side.append(dict(zip(idx, vals)))
            add(L, subj, "X", sparse("a", idx, vals), branch=br)
    L.set_current_branch("main")
    r = run(L, "merge", "t", "--strategy", "ties", "--density", str(density))
    assert r.exit_code == 0, r.output
    got = weights(L)["a"]
    base = Params().a.detach() + sparse("a", [0, 1], [0.3, 0.3]).tensors["a"].to_dense()
    want = ties_reference(base, ours, theirs, density)
    # the merge stores a correction: fp32 (base + Σa + Σb) + (m − Σa − Σb) is within a few ulp of
    # base + m; |values| < 10 here, so 1e-5 absolute is ~100 ulp of the largest magnitude
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    summed = Params().a.detach() + sum(torch.tensor(0.0) + sparse("a", list(d), list(d.values())).tensors["a"].to_dense()
                                        for d in ours + theirs) + sparse("a", [0, 1], [0.3, 0.3]).tensors["a"].to_dense()
    assert not torch.allclose(got, summed, atol=1e-3)  # it is not a plain sum
    ev = L.head()
    assert ev.type == "merge" and ev.config["strategy"] == "ties" and ev.metrics["ties"]["overlap_entries"] > 0
    # reverting the ties merge gives the plain sum back exactly as the compositor sums it
    L.revert(ev.id)
    torch.testing.assert_close(weights(L)["a"], summed, atol=1e-5, rtol=0)


def test_ties_without_overlap_is_sum():
    a = Delta({"a": SparseDelta((6, 8), torch.tensor([0, 1]), torch.tensor([1.0, 2.0]))})
    b = Delta({"a": SparseDelta((6, 8), torch.tensor([2, 3]), torch.tensor([1.0, -2.0]))})
    corr, stats = ties_correction([a], [b], 0.2)
    assert corr is None and stats["overlap_entries"] == 0


# --------------------------------------------------------------------------------------------
def test_interference_uses_recorded_keys(tmp_path):
    L = Ledger.create(tmp_path, FAKE_MODEL)
    L.create_branch("t")
    g = torch.Generator().manual_seed(3)
    ka = torch.randn(2, 8, generator=g)  # two keys of our edit (rows), input side = 8 columns
    da = Delta({"a": LowRankDelta((6, 8), torch.randn(6, 2, generator=g), torch.randn(8, 2, generator=g))},
               state={"keys": ka})
    db_dense = torch.randn(6, 8, generator=g)
    idx = torch.arange(48)
    db = Delta({"a": SparseDelta((6, 8), idx, db_dense.reshape(-1))})
    add(L, "Alice", "Paris", da)
    add(L, "Bob", "Rome", db, branch="t")
    plan = plan_merge(L, L.branch_head("main"), L.branch_head("t"))
    analyse(plan, L.load_delta)
    (row,) = plan.interference
    want = torch.linalg.norm(db_dense @ ka.T).item()
    own = torch.linalg.norm(da.tensors["a"].to_dense() @ ka.T).item()
    assert row["keys"] == "keys+proxy" or row["keys"] == "keys"
    assert row["theirs_on_our_keys"] == pytest.approx(want, rel=1e-5)
    assert row["theirs_on_our_keys_rel"] == pytest.approx(want / own, rel=1e-4)
    cos = (da.tensors["a"].to_dense() * db_dense).sum() / (da.tensors["a"].to_dense().norm() * db_dense.norm())
    assert row["cosine"] == pytest.approx(cos.item(), abs=1e-4)
    assert "ours_on_their_keys" not in row  # a sparse delta without keys: nothing to compute


# --------------------------------------------------------------------------------------------
# a history-dependent batch editor, registered for these tests only

@dataclass(frozen=True)
class LsqConfig:
    param: str = PARAM
    lam: float = 1e-6
    scale: float = 1.0


def _vec(text: str, n: int, salt: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32((salt + text).encode()))
    v = torch.randn(n, generator=g)
    return v / v.norm()


class LsqEditor(Editor):
    name = "lsq"
    summary = "test-only least-squares key→value write with null-space projection"
    paper = "-"
    config_cls = LsqConfig
    needs_history = True
    batch_solve = True

    def compute(self, model, tok, requests: Sequence[FactRequest], ctx: EditContext) -> list[EditResult]:
        cfg: LsqConfig = self.config
        with preserved(model):
            W = model.get_parameter(cfg.param).detach().double()
            out_dim, in_dim = W.shape
            K = torch.stack([_vec(r.subject or r.prompt, in_dim, "k") for r in requests], 1).double()
            V = torch.stack([_vec(r.target_new, out_dim, "v") for r in requests], 1).double() * cfg.scale
            prev = [s["keys"].double() for s in ctx.history.get("states", []) if "keys" in s]
            P = torch.eye(in_dim, dtype=torch.float64)
            if prev:
                Kp = torch.cat(prev, 1)
                P = P - Kp @ torch.linalg.solve(Kp.T @ Kp + cfg.lam * torch.eye(Kp.shape[1], dtype=torch.float64), Kp.T)
            R = V - W @ K
            A = K.T @ P @ K + cfg.lam * torch.eye(K.shape[1], dtype=torch.float64)
            u = (R @ torch.linalg.inv(A)).float()
            v = (P @ K).float()  # ΔW = R A⁻¹ Kᵀ P  (P symmetric)
        delta = Delta({cfg.param: LowRankDelta((out_dim, in_dim), u, v)}, state={"keys": K.float()})  # d×n, as AlphaEdit
        return [EditResult(tuple(requests), delta, {"keys": len(requests)}, {"n": len(requests)})]


def residual(model, requests) -> float:
    W = model.get_parameter(PARAM).detach().double()
    errs = []
    for r in requests:
        k = _vec(r.subject, W.shape[1], "k").double()
        v = _vec(r.target_new, W.shape[0], "v").double()
        errs.append(torch.linalg.norm(W @ k - v).item())
    return max(errs)


@pytest.fixture
def lsq(monkeypatch):
    from kledger.editors import registry

    monkeypatch.setitem(registry.EDITORS, "lsq", f"{__name__}:LsqEditor")


def facts(*pairs) -> list[FactRequest]:
    return [FactRequest(prompt=f"{s} works as a", target_new=t, subject=s) for s, t in pairs]


def model_at(ledger: Ledger, tiny_dir, ref="HEAD"):
    model, tok, _ = load_model(str(tiny_dir), "cpu")
    materialise(ledger, model, ref)
    return model


def test_resolve_merge_solves_both_sides_jointly(tmp_path, tiny_llama_dir, lsq):
    L = init_ledger(tmp_path, str(tiny_llama_dir))
    ws = Workspace(L, device="cpu")
    ws.add(facts(("Alice", "doctor")), method="lsq")
    L.create_branch("news")
    ours = facts(("Bob", "teacher"), ("Carol", "lawyer"))
    theirs = facts(("Dan", "doctor"), ("Eve", "teacher"), ("Bob", "teacher"))  # Bob: same fact, same target
    ws.add(ours, method="lsq")
    L.set_current_branch("news")
    Workspace(L, device="cpu").add(theirs, method="lsq")
    L.set_current_branch("main")
    everything = facts(("Alice", "doctor")) + ours + theirs[:2]
    r = run(L, "merge", "news", "--dry-run")
    assert r.exit_code == 0 and "same fact on both sides" in r.output
    n = L.count()
    # sum: each side solved on its own; the other side's update disturbs it
    import shutil

    shutil.copytree(tmp_path / ".kledger", tmp_path / "sum" / ".kledger")
    S = Ledger(tmp_path / "sum" / ".kledger")
    assert run(S, "merge", "news", "--strategy", "sum").exit_code == 0
    res_sum = residual(model_at(S, tiny_llama_dir), everything)
    r = run(L, "--json", "--device", "cpu", "merge", "news", "--strategy", "resolve")
    assert r.exit_code == 0, r.output
    assert L.count() == n + 1
    ev = L.head()
    side = [e.id for e in L.events(types=["add"]) if e.request["subject"] != "Alice"]
    assert ev.type == "merge" and ev.method == "lsq" and sorted(ev.config["supersedes"]) == sorted(side)
    assert len(ev.request) == 4  # Bob once
    assert [e.type for e in L.active()] == ["add", "merge"]
    res_resolve = residual(model_at(L, tiny_llama_dir), everything)
    assert res_resolve < 1e-3 < res_sum
    # reverting the resolve merge brings the side edits back (the sum)
    L.revert(ev.id)
    assert sorted(e.id for e in L.active()) == sorted([L.events(types=["add"], newest_first=False)[0].id] + side)
    w_sum = model_at(S, tiny_llama_dir).get_parameter(PARAM)
    torch.testing.assert_close(model_at(L, tiny_llama_dir).get_parameter(PARAM), w_sum, atol=1e-6, rtol=0)


def test_rebase_revert_equals_never_having_the_edit(tmp_path, tiny_llama_dir, lsq):
    seq = facts(("Alice", "doctor"), ("Bob", "teacher"), ("Carol", "lawyer"), ("Dan", "piano"), ("Eve", "guitar"))
    L = init_ledger(tmp_path / "a", str(tiny_llama_dir))
    evs = Workspace(L, device="cpu").add(seq, method="lsq")
    # a ledger that never had Bob
    R = init_ledger(tmp_path / "b", str(tiny_llama_dir))
    Workspace(R, device="cpu").add([f for f in seq if f.subject != "Bob"], method="lsq")
    want = model_at(R, tiny_llama_dir).get_parameter(PARAM).detach()
    # plain revert: exact subtraction, but the later edits still carry Bob's side effects
    import shutil

    shutil.copytree(tmp_path / "a" / ".kledger", tmp_path / "plain" / ".kledger")
    P = Ledger(tmp_path / "plain" / ".kledger")
    P.revert(evs[1].id)
    plain = model_at(P, tiny_llama_dir).get_parameter(PARAM).detach()
    assert not torch.allclose(plain, want, atol=1e-4)
    r = invoke(["--ledger", str(L.root), "--json", "--device", "cpu", "revert", evs[1].id,
                                 "--rebase"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["reverted"] == [e.id for e in evs[1:]] and out["recomputed"] == 3 and len(out["added"]) == 3
    got = model_at(L, tiny_llama_dir).get_parameter(PARAM).detach()
    # same prefix, same recomputation order and the same fp32 operations: bit-identical
    assert torch.equal(got, want)
    assert [e.request["subject"] for e in L.active()] == ["Alice", "Carol", "Dan", "Eve"]
    assert all(e.metrics.get("rebased_from") for e in L.active()[1:])
    # already reverted now
    r = invoke(["--ledger", str(L.root), "revert", evs[1].id, "--rebase"])
    assert r.exit_code == 1 and "already reverted" in r.output


def test_rebase_refuses_across_a_merge(tmp_path, tiny_llama_dir, lsq):
    L = init_ledger(tmp_path, str(tiny_llama_dir))
    ws = Workspace(L, device="cpu")
    first = ws.add(facts(("Alice", "doctor")), method="lsq")[0]
    L.create_branch("t")
    L.set_current_branch("t")
    Workspace(L, device="cpu").add(facts(("Bob", "teacher")), method="lsq")
    L.set_current_branch("main")
    assert run(L, "merge", "t").exit_code == 0
    n = L.count()
    with pytest.raises(Exception, match="across merges"):
        rebase_revert(L, first.id, device="cpu")
    assert L.count() == n
