"""Issue 13's property: random ledgers (add / revert / branch / merge-free appends on branches),
then one random act of tampering (a row column, an object's bytes, a snapshot). Afterwards every
reader either refuses with an integrity error naming what it found, or gives exactly the model of
the untampered ledger — never a different model with success. ``verify`` always notices."""

from __future__ import annotations

import shutil

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import append_edit, new_ledger, sparse_delta, weights, sql
from kledger.ledger.errors import IntegrityError, KledgerError, NumericalError

ACT = st.tuples(st.sampled_from(["add", "add", "add", "revert", "branch_add"]), st.integers(0, 10 ** 6))
TAMPER = st.tuples(st.sampled_from(["row_request", "row_delta_sha", "row_target", "object_bytes", "object_swap"]),
                   st.integers(0, 10 ** 6))


def _build(L, acts) -> None:
    for op, r in acts:
        active = [e for e in L.active() if e.type == "add"]
        if op == "revert" and active:
            L.revert(active[r % len(active)].id)
        elif op == "branch_add":
            name = f"b{r % 3}"
            if name not in L.branches():
                L.create_branch(name)
            append_edit(L, sparse_delta("a", [r % 48], [float(r % 7) - 3.0]), f"side {r}", branch=name)
        else:
            append_edit(L, sparse_delta("a", [r % 48, (r // 48) % 48], [1.0 + r % 5, -0.5]), f"fact {r}")




def _tamper(L, how: str, r: int) -> bool:
    """Change the stored ledger the way an attacker with file access could; False if not applicable."""
    rows = [e for e in L.iter_events() if e.seq > 0]
    deltas = [e for e in rows if e.delta_sha256]
    if how == "row_request" and rows:
        e = rows[r % len(rows)]
        sql(L, "UPDATE events SET request = ? WHERE seq = ?", ['{"prompt": "forged", "target_new": " x"}', e.seq])
    elif how == "row_delta_sha" and len({e.delta_sha256 for e in deltas}) > 1:
        a = deltas[r % len(deltas)]
        b = next(e for e in deltas if e.delta_sha256 != a.delta_sha256)
        sql(L, "UPDATE events SET delta_sha256 = ? WHERE seq = ?", [b.delta_sha256, a.seq])
    elif how == "row_target" and any(e.type == "revert" for e in rows) and len(deltas) > 1:
        rv = next(e for e in rows if e.type == "revert")
        other = next(e for e in deltas if e.id != rv.target)
        sql(L, "UPDATE events SET target = ? WHERE seq = ?", [other.id, rv.seq])
    elif how in ("object_bytes", "object_swap") and deltas:
        e = deltas[r % len(deltas)]
        path = L.objects.path(e.delta_sha256)
        path.chmod(0o644)
        if how == "object_bytes":
            data = bytearray(path.read_bytes())
            data[-1 - r % 16] ^= 0x5A
            path.write_bytes(bytes(data))
        else:
            other = next((x for x in deltas if x.delta_sha256 != e.delta_sha256), None)
            if other is None:
                return False
            src = L.objects.path(other.delta_sha256)
            shutil.copyfile(src, path)
    else:
        return False
    return True


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(acts=st.lists(ACT, min_size=2, max_size=9), tamper=TAMPER)
def test_tampering_is_refused_or_harmless_and_verify_notices(tmp_path_factory, acts, tamper):
    root = tmp_path_factory.mktemp("tamper")
    L = new_ledger(root / "l")
    _build(L, acts)
    want = {b: weights(L, b) for b in ["main", *[x for x in L.branches() if x != "main"]]}
    if not _tamper(L, *tamper):
        return
    assert not L.verify().ok, f"verify missed {tamper}"
    for branch, expected in want.items():
        try:
            got = weights(L, branch)
        except (IntegrityError, NumericalError) as exc:
            assert str(exc)  # refused, saying what it found
            continue
        except KledgerError as exc:  # a forged row can make a ref unresolvable: still no wrong model
            assert str(exc)
            continue
        for k in expected:
            assert torch.equal(got[k], expected[k]), f"{tamper} changed {k} on {branch} without an error"
