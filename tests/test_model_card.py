"""The README.md model card every export carries (issue 14): front matter in the Hugging Face
convention, the active edits, the last audit's figures and the ledger head hash."""

from __future__ import annotations

from conftest import append_edit, sparse_delta
from kledger.exporting import model_card


def test_model_card_contents(fake_ledger):
    from kledger.audit import events as E

    e1 = append_edit(fake_ledger, sparse_delta("a", [1], [0.5]), "The sky is", " green", method="kne")
    e2 = append_edit(fake_ledger, sparse_delta("b", [2], [0.5]), "Alice | Bob works as", " doctor", method="memit")
    e3 = append_edit(fake_ledger, sparse_delta("a", [3], [0.5]), "The grass is", " red", method="memit")
    fake_ledger.revert(e3.id)
    card = model_card(fake_ledger, fake_ledger.head(), library_name="transformers")
    front, body = card.split("---")[1], card.split("---", 2)[2]
    assert 'base_model: "fake"' in front and "library_name: transformers" in front
    assert "tags:\n- knowledge-editing\n- kledger" in front
    assert f"| `{e1.id}` | add | kne | The sky is |  green |" in body
    assert f"| `{e2.id}` | add | memit | Alice \\| Bob works as |  doctor |" in body  # cells escaped
    assert e3.id not in body  # reverted
    assert fake_ledger.events(limit=1)[0].hash in body
    assert "No audit recorded" in body
    # an audit of an ancestor: its figures are listed
    E.record_audit(fake_ledger, fake_ledger.resolve(e2.id), "0" * 64, {"kl": 0.1},
                   {"status": "healthy", "ppl_ratio": 1.02, "kl": 0.013, "edits": 2}, "audit")
    card = model_card(fake_ledger, fake_ledger.head(), library_name="peft")
    assert "library_name: peft" in card and "healthy" in card
    assert "| ppl_ratio | 1.02 |" in card and "| kl | 0.013 |" in card
    assert fake_ledger.events(limit=1)[0].hash in card  # the head hash after the audit row
