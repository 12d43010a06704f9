"""Deltas: safetensors round trips (bit-exact), malformed bytes, validation, and accumulate()."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as st_save

from kledger.ledger.canonical import sha256_hex
from kledger.ledger.deltas import Delta, DenseDelta, LowRankDelta, SparseDelta, accumulate
from kledger.ledger.errors import IntegrityError, NumericalError, UsageError

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

NAMES = ("model.layers.0.mlp.down_proj.weight", "model.layers.1.self_attn.q_proj.weight",
         "transformer.h.0.mlp.c_proj.weight", "lm_head.weight", "w")
FLOAT32 = st.floats(width=32, allow_nan=False, allow_infinity=False)


# --- strategies ---------------------------------------------------------------------------
def _tensor(draw, shape, elements=FLOAT32) -> torch.Tensor:
    n = math.prod(shape)
    vals = draw(st.lists(elements, min_size=n, max_size=n))
    return torch.tensor(vals, dtype=torch.float32).reshape(shape)


@st.composite
def tensor_deltas(draw, shape=None, kind=None, elements=FLOAT32):
    kind = kind or draw(st.sampled_from(["sparse", "lowrank", "dense"]))
    if shape is None:
        if kind == "lowrank":
            shape = (draw(st.integers(1, 6)), draw(st.integers(1, 6)))
        else:
            shape = tuple(draw(st.lists(st.integers(1, 6), min_size=1, max_size=2)))
    if kind == "sparse":
        n = math.prod(shape)
        idx = draw(st.lists(st.integers(0, n - 1), unique=True, max_size=n))
        return SparseDelta(shape, torch.tensor(idx, dtype=torch.int64), _tensor(draw, (len(idx),), elements))
    if kind == "lowrank":
        r = draw(st.integers(1, 3))
        return LowRankDelta(shape, _tensor(draw, (shape[0], r), elements), _tensor(draw, (shape[1], r), elements))
    return DenseDelta(shape, _tensor(draw, shape, elements))


@st.composite
def state_tensors(draw):
    out = {}
    for key in draw(st.lists(st.sampled_from(["keys", "cov", "step", "layer0/keys"]), unique=True, max_size=3)):
        dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.int64]))
        shape = tuple(draw(st.lists(st.integers(0, 4), min_size=0, max_size=2)))
        t = torch.arange(math.prod(shape), dtype=torch.float64).reshape(shape) * draw(st.floats(-3, 3))
        out[key] = t.to(dtype)
    return out


@st.composite
def deltas(draw):
    names = draw(st.lists(st.sampled_from(NAMES), unique=True, min_size=1, max_size=4))
    return Delta({n: draw(tensor_deltas()) for n in names}, draw(state_tensors()))


def _bits(t: torch.Tensor) -> torch.Tensor:
    # bit pattern, so -0.0 vs 0.0 and every NaN payload would count as a difference
    t = t.contiguous().reshape(-1)
    return t.view(torch.uint8) if t.numel() else t


def assert_bit_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and tuple(a.shape) == tuple(b.shape)
    assert torch.equal(_bits(a), _bits(b))


def assert_same_delta(a: Delta, b: Delta) -> None:
    assert sorted(a.tensors) == sorted(b.tensors)
    for name, ta in a.tensors.items():
        tb = b.tensors[name]
        assert type(ta) is type(tb)
        assert tuple(ta.shape) == tuple(tb.shape)
        if isinstance(ta, SparseDelta):
            assert_bit_equal(ta.indices, tb.indices)
            assert_bit_equal(ta.values, tb.values)
        elif isinstance(ta, LowRankDelta):
            assert_bit_equal(ta.u, tb.u)
            assert_bit_equal(ta.v, tb.v)
        else:
            assert_bit_equal(ta.values, tb.values)
    assert sorted(a.state) == sorted(b.state)
    for k in a.state:
        assert_bit_equal(a.state[k], b.state[k])


# --- round trips --------------------------------------------------------------------------
@SETTINGS
@given(deltas())
def test_round_trip_is_bit_exact(d):
    data = d.to_bytes()
    back = Delta.from_bytes(data, expected_sha256=sha256_hex(data))
    assert_same_delta(d, back)
    # canonical bytes: the content address of a delta does not change on a round trip
    assert back.to_bytes() == data
    s = back.summary()
    assert set(s) == set(d.tensors)
    for name, td in d.tensors.items():
        assert s[name]["format"] == td.kind and s[name]["shape"] == list(td.shape)


@pytest.mark.parametrize("kind", ["sparse", "lowrank", "dense"])
def test_round_trip_each_format_with_state(kind):
    g = torch.Generator().manual_seed(0)
    if kind == "sparse":
        td = SparseDelta((3, 5), torch.tensor([0, 7, 14]), torch.tensor([-0.0, 1e-45, -3.4e38]))
    elif kind == "lowrank":
        td = LowRankDelta((3, 5), torch.randn(3, 2, generator=g), torch.randn(5, 2, generator=g))
    else:
        td = DenseDelta((3, 5), torch.randn(3, 5, generator=g))
    d = Delta({"a.weight": td}, {"keys": torch.randn(2, 3, generator=g).half(), "n": torch.tensor([4])})
    back = Delta.from_bytes(d.to_bytes())
    assert_same_delta(d, back)
    assert back.state["keys"].dtype == torch.float16 and back.state["n"].dtype == torch.int64


def test_round_trip_mixed_and_shared_memory():
    # u and v the same tensor (a symmetric update u uᵀ): safetensors refuses shared memory
    x = torch.randn(4, 2)
    buf = torch.randn(20)
    d = Delta({"sym": LowRankDelta((4, 4), x, x), "a": DenseDelta((10,), buf[:10]),
               "b": SparseDelta((10,), torch.tensor([1, 2]), torch.tensor([1.0, 2.0]))},
              {"k0": buf[10:], "k1": x})
    back = Delta.from_bytes(d.to_bytes())
    assert_same_delta(d, back)


def test_bytes_are_canonical():
    # the object's content address must depend only on the delta: same bytes every call and for
    # any insertion order (safetensors writes its metadata in hash-map order)
    a = DenseDelta((2,), torch.tensor([1.0, 2.0]))
    b = SparseDelta((3,), torch.tensor([2]), torch.tensor([4.0]))
    d1 = Delta({"a": a, "b": b}, {"k": torch.ones(1), "j": torch.zeros(2)})
    d2 = Delta({"b": b, "a": a}, {"j": torch.zeros(2), "k": torch.ones(1)})
    assert len({d1.to_bytes() for _ in range(20)} | {d2.to_bytes() for _ in range(20)}) == 1


def test_empty_sparse_and_empty_state_round_trip():
    d = Delta({"w": SparseDelta((2, 2), torch.zeros(0, dtype=torch.int64), torch.zeros(0))},
              {"none": torch.zeros(0, 3)})
    assert_same_delta(d, Delta.from_bytes(d.to_bytes()))


# --- integrity ----------------------------------------------------------------------------
def _small() -> Delta:
    return Delta({"w": SparseDelta((4, 4), torch.tensor([1, 5]), torch.tensor([0.5, -2.0])),
                  "v": LowRankDelta((4, 3), torch.ones(4, 1), torch.ones(3, 1))}, {"keys": torch.ones(2)})


def test_wrong_expected_hash_is_integrity_error():
    data = _small().to_bytes()
    Delta.from_bytes(data, expected_sha256=sha256_hex(data))
    with pytest.raises(IntegrityError, match="hash mismatch"):
        Delta.from_bytes(data, expected_sha256="0" * 64)
    with pytest.raises(IntegrityError):
        Delta.from_bytes(data + b" ", expected_sha256=sha256_hex(data))


def _st(tensors, meta=None, version="1"):
    md = None if meta is None else {"kledger_delta": version, "tensors": meta if isinstance(meta, str) else json.dumps(meta)}
    return st_save(tensors, metadata=md)


T = {"w::dense": torch.zeros(2, 2)}
MALFORMED = {
    "empty": b"",
    "short": b"\x01\x02",
    "garbage": bytes(range(256)) * 3,
    "header length too big": (10**6).to_bytes(8, "little") + b"{}",
    "header not json": (5).to_bytes(8, "little") + b"{nope",
    "header not utf8": (4).to_bytes(8, "little") + b'{"\xff"',
    "header a list": (2).to_bytes(8, "little") + b"[]",
    "no kledger metadata": st_save(T),
    "other metadata": st_save(T, metadata={"format": "pt"}),
    "wrong version": _st(T, {"w": {"format": "dense", "shape": [2, 2]}}, version="99"),
    "tensors not json": _st(T, "{oops"),
    "tensors a list": _st(T, "[1, 2]"),
    "entry not an object": _st(T, {"w": 3}),
    "entry without format": _st(T, {"w": {"shape": [2, 2]}}),
    "shape not a list": _st(T, {"w": {"format": "dense", "shape": 4}}),
    "shape of strings": _st(T, {"w": {"format": "dense", "shape": ["a", "b"]}}),
    "negative shape": _st({"w::indices": torch.zeros(0, dtype=torch.int64), "w::values": torch.zeros(0)},
                          {"w": {"format": "sparse", "shape": [-2, 2]}}),
    "missing tensor": _st(T, {"x": {"format": "dense", "shape": [2, 2]}}),
    "missing factor": _st({"w::u": torch.zeros(2, 1)}, {"w": {"format": "lowrank", "shape": [2, 2]}}),
    "unknown format": _st(T, {"w": {"format": "cubic", "shape": [2, 2]}}),
    "dense shape mismatch": _st(T, {"w": {"format": "dense", "shape": [3, 2]}}),
    "float indices": _st({"w::indices": torch.zeros(2), "w::values": torch.zeros(2)},
                         {"w": {"format": "sparse", "shape": [2, 2]}}),
    "index out of range": _st({"w::indices": torch.tensor([9]), "w::values": torch.zeros(1)},
                              {"w": {"format": "sparse", "shape": [2, 2]}}),
    "nan stored": _st({"w::dense": torch.full((2, 2), float("nan"))}, {"w": {"format": "dense", "shape": [2, 2]}}),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_bytes_are_integrity_errors(case):
    with pytest.raises(IntegrityError):
        Delta.from_bytes(MALFORMED[case])


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_truncated_or_flipped_bytes_never_raise_other_errors(data):
    raw = _small().to_bytes()
    cut = data.draw(st.integers(0, len(raw) - 1), label="cut")
    with pytest.raises(IntegrityError):
        Delta.from_bytes(raw[:cut])
    pos = data.draw(st.integers(0, len(raw) - 1), label="pos")
    bit = data.draw(st.integers(0, 7), label="bit")
    flipped = bytearray(raw)
    flipped[pos] ^= 1 << bit
    with pytest.raises(IntegrityError):
        Delta.from_bytes(bytes(flipped), expected_sha256=sha256_hex(raw))
    try:  # without the hash a flipped bit may still parse (a changed value), but nothing else
        Delta.from_bytes(bytes(flipped))
    except IntegrityError:
        pass


@settings(max_examples=30, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_are_integrity_errors(blob):
    with pytest.raises(IntegrityError):
        Delta.from_bytes(blob)


# --- validation ---------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nan_inf_is_numerical_error(bad):
    with pytest.raises(NumericalError):
        Delta({"w": SparseDelta((4,), torch.tensor([1]), torch.tensor([bad]))})
    u = torch.ones(3, 1)
    u[1, 0] = bad
    with pytest.raises(NumericalError):
        Delta({"w": LowRankDelta((3, 2), u, torch.ones(2, 1))})
    with pytest.raises(NumericalError):
        Delta({"w": LowRankDelta((2, 3), torch.ones(2, 1), u)})
    dense = torch.zeros(2, 2)
    dense[1, 1] = bad
    with pytest.raises(NumericalError):
        Delta({"w": DenseDelta((2, 2), dense)})
    with pytest.raises(NumericalError):
        Delta({"ok": DenseDelta((2,), torch.ones(2)), "w": DenseDelta((2, 2), dense)})


BAD_USAGE = {
    "index past end": lambda: SparseDelta((2, 2), torch.tensor([4]), torch.ones(1)),
    "negative index": lambda: SparseDelta((2, 2), torch.tensor([-1]), torch.ones(1)),
    "float indices": lambda: SparseDelta((2, 2), torch.tensor([1.0]), torch.ones(1)),
    "int32 indices": lambda: SparseDelta((2, 2), torch.tensor([1], dtype=torch.int32), torch.ones(1)),
    "2-D indices": lambda: SparseDelta((2, 2), torch.tensor([[1]]), torch.ones(1, 1)),
    "length mismatch": lambda: SparseDelta((2, 2), torch.tensor([0, 1]), torch.ones(1)),
    "negative shape": lambda: SparseDelta((-1, 2), torch.zeros(0, dtype=torch.int64), torch.zeros(0)),
    "shape not ints": lambda: DenseDelta(("a",), torch.zeros(1)),
    "lowrank 3-D shape": lambda: LowRankDelta((2, 2, 2), torch.ones(2, 1), torch.ones(2, 1)),
    "lowrank u rows": lambda: LowRankDelta((3, 2), torch.ones(2, 1), torch.ones(2, 1)),
    "lowrank v rows": lambda: LowRankDelta((2, 3), torch.ones(2, 1), torch.ones(2, 1)),
    "lowrank rank mismatch": lambda: LowRankDelta((2, 2), torch.ones(2, 1), torch.ones(2, 2)),
    "lowrank 1-D factor": lambda: LowRankDelta((2, 2), torch.ones(2), torch.ones(2)),
    "dense shape": lambda: DenseDelta((2, 3), torch.zeros(3, 2)),
    "not a tensor delta": lambda: torch.zeros(2),
}


@pytest.mark.parametrize("case", sorted(BAD_USAGE))
def test_bad_shapes_and_indices_are_usage_errors(case):
    with pytest.raises(UsageError):
        Delta({"w": BAD_USAGE[case]()})


def test_name_with_separator_is_usage_error():
    with pytest.raises(UsageError):
        Delta({"a::b": DenseDelta((1,), torch.ones(1))}).to_bytes()


# --- accumulate ---------------------------------------------------------------------------
PARAM_SHAPES = {"a.weight": (5, 4), "b.weight": (3, 6), "c.bias": (7,)}
# magnitudes of real edits (an fp32 overflow of u @ vᵀ is not what this property is about)
MODERATE = st.floats(-1e3, 1e3, width=32)


@st.composite
def params_and_deltas(draw):
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    params = {n: torch.randn(*s, generator=g) for n, s in PARAM_SHAPES.items()}
    out = []
    for _ in range(draw(st.integers(1, 5))):
        names = draw(st.lists(st.sampled_from(sorted(PARAM_SHAPES)), unique=True, min_size=1, max_size=3))
        tensors = {}
        for n in names:
            shape = PARAM_SHAPES[n]
            kinds = ["sparse", "dense"] + (["lowrank"] if len(shape) == 2 else [])
            tensors[n] = draw(tensor_deltas(shape=shape, kind=draw(st.sampled_from(kinds)), elements=MODERATE))
        out.append(Delta(tensors))
    signs = draw(st.one_of(st.none(), st.lists(st.sampled_from([1.0, -1.0, 0.5]), min_size=len(out), max_size=len(out))))
    return params, out, signs


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(params_and_deltas())
def test_accumulate_equals_dense_reference(case):
    params, ds, signs = case
    before = {n: p.clone() for n, p in params.items()}
    got = accumulate(params, ds, signs)
    touched = {n for d in ds for n in d.tensors}
    assert set(got) == touched  # only touched tensors come back
    for n, p in params.items():
        assert torch.equal(p, before[n])  # the inputs are not modified
    sgn = [1.0] * len(ds) if signs is None else signs
    for n in touched:
        ref = params[n].double().clone()
        for d, s in zip(ds, sgn):
            if n in d.tensors:
                ref += s * d.tensors[n].to_dense().double()
        assert got[n].dtype == torch.float32 and tuple(got[n].shape) == tuple(params[n].shape)
        scale = 1.0 + float(ref.abs().max()) + sum(float(d.tensors[n].to_dense().abs().max()) for d in ds if n in d.tensors)
        assert torch.allclose(got[n].double(), ref, rtol=0, atol=1e-5 * scale), n


@SETTINGS
@given(tensor_deltas(shape=(5, 4), kind="sparse"), st.integers(0, 2**16))
def test_accumulate_single_sparse_is_exact(td, seed):
    base = torch.randn(5, 4, generator=torch.Generator().manual_seed(seed))
    got = accumulate({"w": base}, [Delta({"w": td})])["w"]
    assert torch.equal(got, base + td.to_dense())
    untouched = torch.ones(20, dtype=torch.bool)
    untouched[td.indices] = False
    assert torch.equal(_bits(got.view(-1)[untouched]), _bits(base.view(-1)[untouched]))


def test_accumulate_rejects_mismatched_deltas():
    params = {"w": torch.zeros(2, 8)}
    with pytest.raises(UsageError, match="does not have"):
        accumulate(params, [Delta({"x": DenseDelta((2, 8), torch.ones(2, 8))})])
    # same number of elements, transposed layout (GPT-2 Conv1D): refused, not silently applied
    with pytest.raises(UsageError, match="shape"):
        accumulate(params, [Delta({"w": SparseDelta((8, 2), torch.tensor([3]), torch.ones(1))})])
    with pytest.raises(UsageError, match="shape"):
        accumulate(params, [Delta({"w": SparseDelta((100,), torch.tensor([50]), torch.ones(1))})])
    with pytest.raises(UsageError, match="shape"):
        accumulate(params, [Delta({"w": LowRankDelta((8, 2), torch.ones(8, 1), torch.ones(2, 1))})])
    with pytest.raises(UsageError, match="shape"):
        accumulate(params, [Delta({"w": DenseDelta((8, 2), torch.ones(8, 2))})])


def test_accumulate_plus_then_minus_cancels():
    g = torch.Generator().manual_seed(3)
    base = torch.randn(6, 5, generator=g)
    d = Delta({"w": LowRankDelta((6, 5), torch.randn(6, 2, generator=g), torch.randn(5, 2, generator=g))})
    got = accumulate({"w": base}, [d, d], [1.0, -1.0])["w"]
    assert torch.allclose(got, base, atol=1e-6)
    assert not torch.equal(accumulate({"w": base}, [d])["w"], base)


def test_every_kind_carries_its_arithmetic():
    """Each kind's own norm, scaling, products and ``cross`` equal the dense computation."""
    from kledger.ledger.kinds import sum_deltas

    g = torch.Generator().manual_seed(7)
    shape = (6, 5)
    tds = [SparseDelta(shape, torch.tensor([0, 7, 29, 7]), torch.randn(4, generator=g)),  # a repeated index
           LowRankDelta(shape, torch.randn(6, 2, generator=g), torch.randn(5, 2, generator=g)),
           DenseDelta(shape, torch.randn(*shape, generator=g))]
    w, w0 = torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)
    k_in, k_out = torch.randn(5, 3, generator=g), torch.randn(6, 3, generator=g)
    for a in tds:
        da = a.to_dense()
        assert a.fro_norm() == pytest.approx(float(da.norm()), rel=1e-5)
        torch.testing.assert_close(a.scaled(-2.5).to_dense(), -2.5 * da)
        torch.testing.assert_close(a.mv(k_in), da @ k_in, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a.mv(k_out, transpose=True), da.T @ k_out, atol=1e-5, rtol=1e-5)
        cross = a.cross(w, w0)
        if cross is not None:
            assert cross == pytest.approx(float(((w - w0) * da).sum()), rel=1e-5, abs=1e-6)
        flat = torch.tensor([0, 7, 12, 29])
        torch.testing.assert_close(a.at(flat), da.reshape(-1)[flat])
        for b in tds:
            assert a.inner(b) == pytest.approx(float((da * b.to_dense()).sum()), rel=1e-5, abs=1e-6)
        assert type(sum_deltas(shape, [a, a])) is type(a)
        torch.testing.assert_close(sum_deltas(shape, [a, a]).to_dense(), 2 * da, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sum_deltas(shape, tds).to_dense(), sum(t.to_dense() for t in tds), atol=1e-5, rtol=1e-5)
