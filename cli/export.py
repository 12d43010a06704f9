"""``kledger export``: write a from_pretrained-loadable model folder at a version."""

from __future__ import annotations

import click

from kledger.cli.app import App, pass_app
from kledger.cli.main import cli


@cli.command()
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--at", "ref", default="HEAD", show_default=True, help="Version to export (HEAD, HEAD~N, id, branch).")
@click.option("--force", is_flag=True, help="Replace OUT if it is an earlier export (it holds kledger.json); nothing else is ever removed.")
@pass_app
def export(app: App, out: str, ref: str, force: bool) -> None:
    """Materialise a version onto the base model and save it to OUT, with kledger.json provenance."""
    from kledger.workspace import Workspace  # torch: only when a model is needed

    ws = Workspace(app.ledger(), device=app.device, progress=app.show_progress)
    m = ws.export(out, ref, overwrite=force)
    app.emit({"out": out, "version": m.version.id, "active_events": [e.id for e in m.active],
              "edited_tensors": list(m.tensors), "seconds": round(m.seconds, 3)},
             f"exported {m.version.id} ({len(m.active)} active edits) to {out}")
