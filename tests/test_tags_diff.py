"""Tags (immutable names usable as refs) and ``kledger diff`` (issue 14). Hand-made deltas on the
fake ledger: no model is loaded."""

from __future__ import annotations

import json

import pytest
from conftest import append_edit, run_on, sparse_delta, weights
from kledger.ledger.errors import StateError, UsageError
from kledger.ledger.tags import create_tag, lookup, tag_events


def _three(led):
    e1 = append_edit(led, sparse_delta("a", [1, 2], [0.5, -1.0]), "The sky is", " green")
    e2 = append_edit(led, sparse_delta("b", [3], [2.0]), "The grass is", " blue")
    e3 = append_edit(led, sparse_delta("a", [2, 7], [0.25, 3.0]), "Alice works as", " doctor")
    return e1, e2, e3


def test_tag_names_a_version_and_is_usable_as_a_ref(fake_ledger):
    e1, e2, e3 = _three(fake_ledger)
    t = create_tag(fake_ledger, "shipped-2026.11", e2.id, message="the model we shipped")
    assert t.type == "tag" and t.target == e2.id
    assert fake_ledger.head().id == e3.id  # a note: the branch head does not move
    assert fake_ledger.resolve("shipped-2026.11").id == e2.id
    assert fake_ledger.resolve("shipped-2026.11~1").id == e1.id
    assert weights(fake_ledger, "shipped-2026.11")["a"].equal(weights(fake_ledger, e2.id)["a"])
    r = run_on(fake_ledger, "--json", "show", "shipped-2026.11")
    assert json.loads(r.output)["id"] == e2.id
    r = run_on(fake_ledger, "log", "--at", "shipped-2026.11", "--json")
    assert [e["id"] for e in json.loads(r.output)][0] == e2.id
    r = run_on(fake_ledger, "tags", "--json")
    assert [(x["tag"], x["id"]) for x in json.loads(r.output)] == [("shipped-2026.11", e2.id)]
    assert run_on(fake_ledger, "verify").exit_code == 0


def test_tags_never_move_and_duplicates_are_refused(fake_ledger):
    e1, e2, e3 = _three(fake_ledger)
    create_tag(fake_ledger, "v1", e1.id)
    with pytest.raises(StateError, match="already names"):
        create_tag(fake_ledger, "v1", e3.id)
    r = run_on(fake_ledger, "tag", "v1", e3.id)
    assert r.exit_code == 1 and "already names" in r.output
    # new edits, reverts and branches do not move it
    fake_ledger.revert(e1.id)
    append_edit(fake_ledger, sparse_delta("b", [0], [1.0]), "Bob plays", " piano")
    assert lookup(fake_ledger, "v1").id == e1.id
    # even a second tag row of the same name written around the check is ignored: the oldest wins
    fake_ledger.append("tag", parent=e3.id, target=e3.id, config={"name": "v1"}, message="forged")
    assert fake_ledger.resolve("v1").id == e1.id and tag_events(fake_ledger)["v1"].target == e1.id


def test_tag_names_follow_branch_rules_and_do_not_shadow_branches(fake_ledger):
    _three(fake_ledger)
    for bad in ("HEAD", "a..b", "abc123", "with space", "-x", "x/"):
        with pytest.raises(UsageError):
            create_tag(fake_ledger, bad)
    with pytest.raises(StateError, match="branch"):
        create_tag(fake_ledger, "main")
    create_tag(fake_ledger, "release")
    with pytest.raises(StateError, match="tag"):
        fake_ledger.create_branch("release")
    r = run_on(fake_ledger, "tag", "-q", "ok-name", "HEAD~1")
    assert r.exit_code == 0 and r.output.strip() == fake_ledger.resolve("HEAD~1").id


def test_diff_lists_edits_and_tensor_norms_without_a_model(fake_ledger):
    e1, e2, e3 = _three(fake_ledger)
    rv = fake_ledger.revert(e1.id)
    create_tag(fake_ledger, "before", e3.id)
    from kledger.ledger.diff import diff_versions

    d = diff_versions(fake_ledger, "before", "HEAD")
    assert [e.id for e in d.only_a] == [e1.id] and d.only_b == [] and d.common == 2
    assert set(d.tensors) == {"a"}
    expected = float((weights(fake_ledger, "HEAD")["a"] - weights(fake_ledger, "before")["a"]).norm())
    assert d.tensors["a"]["fro_norm"] == pytest.approx(expected, rel=1e-6)
    d2 = diff_versions(fake_ledger, e1.id, e3.id)
    assert [e.id for e in d2.only_b] == [e2.id, e3.id] and set(d2.tensors) == {"a", "b"}
    for name in ("a", "b"):
        exp = float((weights(fake_ledger, e3.id)[name] - weights(fake_ledger, e1.id)[name]).norm())
        assert d2.tensors[name]["fro_norm"] == pytest.approx(exp, rel=1e-6)
    r = run_on(fake_ledger, "diff", "before", "--json")
    out = json.loads(r.output)
    assert out["only_a"][0]["id"] == e1.id and out["only_a"][0]["request"]["prompt"] == "The sky is"
    assert out["b"] == rv.id and set(out["tensors"]) == {"a"}
    r = run_on(fake_ledger, "diff", e1.id, e3.id)
    assert r.exit_code == 0 and f"+ {e2.id}" in r.output and "2 tensor(s) differ" in r.output
    r = run_on(fake_ledger, "diff", "before", "HEAD", "--name-only", "--json")
    assert json.loads(r.output)["tensors"] is None
    # no model was loaded: the fake ledger's base model (/nonexistent) does not exist
