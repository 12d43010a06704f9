"""The compositor on a tiny llama: exact revert, replay determinism, versions, export."""

from __future__ import annotations

import copy
import json
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kledger.ledger.compose import apply_deltas, export, materialise
from kledger.ledger.deltas import Delta, DenseDelta, LowRankDelta, SparseDelta, accumulate
from kledger.ledger.errors import UsageError
from kledger.ledger.store import Ledger

from conftest import append_edit, tensor_delta

EDITABLE = (
    "model.layers.0.mlp.down_proj.weight",
    "model.layers.1.mlp.down_proj.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.norm.weight",
)


@pytest.fixture(scope="module")
def base(tiny_llama_dir):
    from kledger.editors.models import load_model

    model, tok, info = load_model(str(tiny_llama_dir), "cpu")
    names = dict(model.named_parameters())
    assert all(n in names for n in EDITABLE)
    return model, tok, info


def fresh(base):
    return copy.deepcopy(base[0])


def params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_params_equal(a, b):
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys()
    for n in pa:
        assert torch.equal(pa[n], pb[n]), n


def assert_is_base_plus(model, base_model, deltas):
    """Independent of accumulate(): every parameter is base + Σ to_dense(), summed in float64."""
    base_p = dict(base_model.named_parameters())
    touched = {n for d in deltas for n in d.tensors}
    for n, p in model.named_parameters():
        if n not in touched:
            assert torch.equal(p, base_p[n]), n
            continue
        ref = base_p[n].double() + sum(d.tensors[n].to_dense().double() for d in deltas if n in d.tensors)
        assert torch.allclose(p.double(), ref, rtol=1e-6, atol=1e-6), n


def new_ledger(tmp, base) -> Ledger:
    info = base[2]
    return Ledger.create(tmp, {"spec": info.spec, "path": info.path, "fingerprint": info.fingerprint})


def make_delta(model, seed: int, kinds=("sparse", "lowrank", "dense")) -> Delta:
    """A random delta on 1–2 real parameters, in their own layout."""
    g = torch.Generator().manual_seed(seed)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    pick = torch.randperm(len(EDITABLE), generator=g)[: 1 + seed % 2].tolist()
    tensors = {}
    for j, i in enumerate(pick):
        name = EDITABLE[i]
        shape = shapes[name]
        kind = kinds[(seed + j) % len(kinds)]
        if len(shape) == 1 and kind == "lowrank":
            kind = "dense"
        tensors[name] = tensor_delta(kind, shape, g, nnz=1 + seed % 7, rank=1 + seed % 3,
                                     scale=0.01 if kind == "dense" else 0.1)
    return Delta(tensors, {"keys": torch.randn(2, 4, generator=g)})


def add(ledger, delta, i=0):
    return append_edit(ledger, delta, f"p{i}", " t")


# --- the main property --------------------------------------------------------------------
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(st.tuples(st.just("add"), st.integers(0, 10_000)),
                          st.tuples(st.just("revert"), st.integers(0, 10))), min_size=1, max_size=6))
def test_apply_then_revert_restores_the_base_bit_for_bit(base, ops):
    with tempfile.TemporaryDirectory() as tmp:
        L = new_ledger(tmp, base)
        active: list[tuple[str, Delta]] = []
        for op, arg in ops:
            if op == "add":
                d = make_delta(base[0], arg)
                active.append((add(L, d, arg).id, d))
            elif active:
                eid, _ = active.pop(arg % len(active))
                L.revert(eid)
        model = fresh(base)
        m = materialise(L, model, "HEAD")
        assert [e.id for e in m.active] == [eid for eid, _ in active]
        touched = sorted({n for _, d in active for n in d.tensors})
        assert list(m.tensors) == touched
        # equals base + Σ active deltas, summed by accumulate on a fresh model ...
        ref = fresh(base)
        apply_deltas(ref, [d for _, d in active])
        assert_params_equal(model, ref)
        # ... and, independently, the float64 dense sum to fp32 rounding
        assert_is_base_plus(model, base[0], [d for _, d in active])
        # revert everything that is left: the model is the base again, exactly
        for eid, _ in active:
            L.revert(eid)
        back = fresh(base)
        m2 = materialise(L, back, "HEAD")
        assert m2.active == () and m2.tensors == ()
        assert_params_equal(back, base[0])
        assert L.verify().ok


def test_add_a_add_b_revert_a_equals_only_b(base, tmp_path):
    A, B = make_delta(base[0], 11, ("lowrank",)), make_delta(base[0], 12, ("sparse", "dense"))
    # make them overlap on one tensor, so the test can see an incomplete revert
    shared = EDITABLE[0]
    shape = tuple(base[0].get_parameter(shared).shape)
    A = Delta({**A.tensors, shared: LowRankDelta(shape, torch.full((shape[0], 1), 0.1), torch.full((shape[1], 1), 0.1))})
    B = Delta({**B.tensors, shared: SparseDelta(shape, torch.tensor([0, 5, 17]), torch.tensor([0.3, -0.2, 0.1]))})
    L1 = Ledger.create(tmp_path / "one", {"spec": "tiny"})
    a = add(L1, A)
    add(L1, B)
    L1.revert(a.id)
    L2 = Ledger.create(tmp_path / "two", {"spec": "tiny"})
    add(L2, B)
    m1, m2 = fresh(base), fresh(base)
    materialise(L1, m1)
    materialise(L2, m2)
    assert_params_equal(m1, m2)
    only_b = fresh(base)
    apply_deltas(only_b, [B])
    assert_params_equal(m1, only_b)
    assert_is_base_plus(m1, base[0], [B])
    with_a = fresh(base)
    materialise(L1, with_a, "HEAD~1")  # before the revert: A and B
    assert not torch.equal(with_a.get_parameter(shared), m1.get_parameter(shared))


def test_replay_is_deterministic(base, tmp_path):
    L = new_ledger(tmp_path, base)
    name = EDITABLE[0]
    shape = tuple(base[0].get_parameter(name).shape)
    g = torch.Generator().manual_seed(5)
    for i in range(6):  # many deltas on one tensor, with repeated sparse indices across events
        add(L, make_delta(base[0], 100 + i), i)
        add(L, Delta({name: SparseDelta(shape, torch.tensor([3, 4, 5]), torch.randn(3, generator=g))}), i)
    L.revert("HEAD~3")
    runs = []
    for _ in range(2):
        m = fresh(base)
        mat = materialise(L, m)
        runs.append((m, mat))
    assert_params_equal(runs[0][0], runs[1][0])
    assert runs[0][1].active == runs[1][1].active and runs[0][1].tensors == runs[1][1].tensors
    assert len(runs[0][1].active) == 11


def test_materialise_older_versions(base, tmp_path):
    L = new_ledger(tmp_path, base)
    ds = [make_delta(base[0], 200 + i) for i in range(3)]
    evs = [add(L, d, i) for i, d in enumerate(ds)]
    L.append("audit", message="not a version")
    for ref, expected in (("HEAD", ds), ("HEAD~1", ds[:2]), ("HEAD~2", ds[:1]), (evs[1].id, ds[:2]),
                          (evs[0].id[:6], ds[:1]), (evs[1], ds[:2]), ("HEAD~3", [])):
        m = fresh(base)
        mat = materialise(L, m, ref)
        ref_model = fresh(base)
        apply_deltas(ref_model, expected)
        assert_params_equal(m, ref_model)
        assert_is_base_plus(m, base[0], expected)
        assert len(mat.active) == len(expected)
    m = fresh(base)
    assert materialise(L, m, L.get_seq(0).id).active == ()
    assert_params_equal(m, base[0])


def test_only_touched_tensors_are_written(base, tmp_path):
    L = new_ledger(tmp_path, base)
    name = EDITABLE[1]
    shape = tuple(base[0].get_parameter(name).shape)
    add(L, Delta({name: SparseDelta(shape, torch.tensor([1, 2]), torch.tensor([0.5, -0.5]))}))
    model = fresh(base)
    before = {n: (p, p.data_ptr(), p.detach().clone()) for n, p in model.named_parameters()}
    mat = materialise(L, model)
    assert mat.tensors == (name,)
    for n, p in model.named_parameters():
        obj, ptr, val = before[n]
        assert p is obj  # the module keeps its Parameter objects
        if n != name:
            assert p.data_ptr() == ptr  # untouched tensors are not even copied
        if n == name:
            assert not torch.equal(p, val)
            changed = (p != val).view(-1).nonzero().view(-1).tolist()
            assert changed == [1, 2]
        else:
            assert torch.equal(p, val), n


def test_tensors_sharing_storage_stay_shared(base, tmp_path):
    """Two parameters over one storage (tied weights kept as separate Parameter objects) are
    written in place, so the tie survives materialise."""
    L = new_ledger(tmp_path, base)
    name, other = EDITABLE[0], EDITABLE[1]
    model = fresh(base)
    a, b = model.get_parameter(name), model.get_parameter(other)
    if a.shape != b.shape:
        pytest.skip("needs two parameters of one shape")
    with torch.no_grad():
        b.data = a.data  # tie them by storage
    shape = tuple(a.shape)
    add(L, Delta({name: SparseDelta(shape, torch.tensor([0]), torch.tensor([1.0]))}))
    materialise(L, model)
    assert a.data_ptr() == b.data_ptr() and torch.equal(a, b)


def test_materialise_refuses_a_delta_for_a_missing_or_misshapen_tensor(base, tmp_path):
    L = new_ledger(tmp_path, base)
    add(L, Delta({"model.layers.9.nope.weight": DenseDelta((2,), torch.ones(2))}))
    with pytest.raises(UsageError):
        materialise(L, fresh(base))
    L.revert("HEAD")
    shape = tuple(base[0].get_parameter(EDITABLE[0]).shape)
    add(L, Delta({EDITABLE[0]: SparseDelta(shape[::-1], torch.tensor([0]), torch.ones(1))}))  # transposed layout
    with pytest.raises(UsageError):
        materialise(L, fresh(base))


def test_export_loads_with_transformers(base, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    L = new_ledger(tmp_path / "proj", base)
    evs = [add(L, make_delta(base[0], 300 + i), i) for i in range(3)]
    L.revert(evs[1].id)
    L.append("audit", message="latest row is a note")
    out = tmp_path / "export"
    mat = export(L, fresh(base), base[1], out)
    materialised = fresh(base)
    materialise(L, materialised)
    loaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    lp = dict(loaded.named_parameters())
    for n, p in materialised.named_parameters():
        assert torch.equal(lp[n], p), n
    assert_is_base_plus(loaded, base[0], [L.load_delta(evs[0]), L.load_delta(evs[2])])
    assert any(not torch.equal(lp[n], base[0].get_parameter(n)) for n in EDITABLE)
    AutoTokenizer.from_pretrained(str(out))
    meta = json.loads((out / "kledger.json").read_text())
    assert meta["active_events"] == [evs[0].id, evs[2].id] == [e.id for e in mat.active]
    assert meta["ledger_head_hash"] == L.events(limit=1)[0].hash == L.get_seq(L.count() - 1).hash
    assert meta["version"] == L.head().id and meta["version_hash"] == L.head().hash
    assert meta["base_model"] == L.base_model()
    assert sorted(meta["edited_tensors"]) == sorted(mat.tensors)
    # a non-empty folder is refused unless overwriting; an older version exports its own set
    with pytest.raises(UsageError):
        export(L, fresh(base), base[1], out)
    assert (out / "kledger.json").is_file()
    export(L, fresh(base), None, out, ref=evs[0].id, overwrite=True)
    meta = json.loads((out / "kledger.json").read_text())
    assert meta["active_events"] == [evs[0].id] and meta["version"] == evs[0].id
    older = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    ref = fresh(base)
    apply_deltas(ref, [L.load_delta(evs[0])])
    for n, p in ref.named_parameters():
        assert torch.equal(dict(older.named_parameters())[n], p), n
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".export-")]  # no temp folder left
