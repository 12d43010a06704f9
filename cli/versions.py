"""Naming and comparing versions: ``tag``, ``tags``, ``diff`` (thin calls into kledger.ledger)."""

from __future__ import annotations

import click

from kledger.cli.app import App, pass_app
from kledger.cli.main import cli


@cli.command()
@click.argument("name")
@click.argument("ref", default="HEAD")
@click.option("-m", "--message", help="A note recorded with the tag.")
@pass_app
def tag(app: App, name: str, ref: str, message: str | None) -> None:
    """Name the version REF (default HEAD) NAME, for good: a tag never moves and its name is never
    reused. Every ref (--at, show, diff, export) accepts it."""
    from kledger.ledger.tags import create_tag

    ev = create_tag(app.ledger(), name, ref, message)
    app.emit({"tag": name, "id": ev.target, "event": ev.id, "resolved": {"ref": ref, "id": ev.target}},
             ev.target if app.quiet else f"tagged {ev.target} as {name} (event {ev.id})")


@cli.command()
@pass_app
def tags(app: App) -> None:
    """List tags, oldest first: name, the event it names, when it was made."""
    from kledger.ledger.tags import tag_events

    ledger = app.ledger()
    with ledger.session():
        found = tag_events(ledger)
        targets = {e.id: e for e in ledger.events_by_ids([ev.target for ev in found.values()])} if found else {}
    rows = [{"tag": n, "id": ev.target, "event": ev.id, "created_at": ev.created_at, "message": ev.message}
            for n, ev in found.items()]
    if app.as_json:
        app.emit(rows)
        return
    for n, ev in found.items():
        t = targets.get(ev.target)
        click.echo(f"{n:<20} {t.describe() if t else ev.target}")


@cli.command()
@click.argument("a")
@click.argument("b", default="HEAD")
@click.option("--name-only", is_flag=True, help="Only the edit lists (no delta is read).")
@click.option("--top", type=click.IntRange(min=0), default=20, show_default=True, help="Tensors listed (text output).")
@pass_app
def diff(app: App, a: str, b: str, name_only: bool, top: int) -> None:
    """Edits active in A and not B (-) and in B and not A (+), and per tensor ||W_B - W_A||_F,
    summed from the deltas that differ (the model is never loaded)."""
    from kledger.ledger.diff import diff_versions

    d = diff_versions(app.ledger(), a, b, tensors=not name_only)
    if app.as_json:
        app.emit(d.to_json())
        return
    lines = [f"diff {a} ({d.a.id}) → {b} ({d.b.id}): {len(d.only_a)} edit(s) only in {a}, {len(d.only_b)} only in"
             f" {b}, {d.common} in both"]
    lines += [f"- {e.describe()}" for e in d.only_a] + [f"+ {e.describe()}" for e in d.only_b]
    if d.tensors:
        ranked = sorted(d.tensors.items(), key=lambda kv: -kv[1]["fro_norm"])
        width = max(len(n) for n, _ in ranked[:top]) if top else 0
        for n, v in ranked[:top]:
            lines.append(f" {n:<{width}} | ‖ΔW‖ {v['fro_norm']:.4g}  ({v['events']} delta(s))")
        if len(ranked) > top:
            lines.append(f" … {len(ranked) - top} more tensors (--top, --json)")
        lines.append(f" {len(ranked)} tensor(s) differ")
    app.emit(None, "\n".join(lines))
