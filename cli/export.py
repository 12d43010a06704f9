"""``kledger export``: write a from_pretrained-loadable model folder, or a PEFT LoRA adapter, at a version."""

from __future__ import annotations

import click

from kledger.cli.app import App, pass_app
from kledger.cli.main import cli


@cli.command()
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--at", "ref", default="HEAD", show_default=True, help="Version to export (HEAD, HEAD~N, id, branch, tag).")
@click.option("--format", "fmt", type=click.Choice(["full", "peft"]), default="full", show_default=True,
              help="full: the edited model (from_pretrained folder); peft: a LoRA adapter of the active edits.")
@click.option("--max-rank", type=click.IntRange(min=1), default=None,
              help="peft: compress each module's LoRA factors by SVD to at most this rank (the error is reported).")
@click.option("--lossy", is_flag=True, help="peft: also take sparse (KNE) and dense deltas, compressed by SVD.")
@click.option("--model", "model_spec", help="A copy of the base model (same fingerprint) to read instead.")
@click.option("--force", is_flag=True, help="Replace OUT if it is an earlier export (it holds kledger.json); nothing else is ever removed.")
@pass_app
def export(app: App, out: str, ref: str, fmt: str, max_rank: int | None, lossy: bool, model_spec: str | None,
           force: bool) -> None:
    """Materialise a version onto the base model and save it to OUT, with kledger.json provenance and a
    README.md model card; or (--format peft) write the active low-rank edits as a PEFT LoRA adapter."""
    if fmt == "peft":
        from kledger.exporting import export_peft

        p = export_peft(app.ledger(), out, ref, max_rank=max_rank, lossy=lossy, overwrite=force, model_spec=model_spec)
        text = [f"exported {p.version.id} ({len(p.active)} active edits) as a LoRA adapter on {len(p.modules)}"
                f" modules ({_size(p.bytes)}) to {out}"]
        if p.max_rel_error and not app.quiet:
            text += [f"  {m}: rank {v['rank']} (of {v['summed_rank']}), relative error {v['rel_error']:.3g}"
                     for m, v in p.modules.items() if v["rel_error"]]
        app.emit(p.to_json(), "\n".join(text))
        return
    if max_rank is not None or lossy:
        from kledger.ledger.errors import UsageError

        raise UsageError("--max-rank and --lossy apply to --format peft only")
    from kledger.workspace import Workspace  # torch: only when a model is needed

    ws = Workspace(app.ledger(), device=app.device, device_map=app.device_map, progress=app.show_progress, model_spec=model_spec)
    m = ws.export(out, ref, overwrite=force)
    app.emit({"out": out, "format": "full", "version": m.version.id, "active_events": [e.id for e in m.active],
              "edited_tensors": list(m.tensors), "seconds": round(m.seconds, 3)},
             f"exported {m.version.id} ({len(m.active)} active edits) to {out}")


def _size(n: int) -> str:
    for unit, k in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= k:
            return f"{n / k:.1f} {unit}"
    return f"{n} B"
