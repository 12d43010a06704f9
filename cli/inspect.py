"""Read commands: ``log``, ``show``, ``status``, ``verify``."""

from __future__ import annotations

import click

from kledger.cli.app import App, pass_app
from kledger.cli.main import cli
from kledger.ledger.errors import IntegrityError, UsageError


@cli.command(name="log")
@click.option("-n", "limit", type=click.IntRange(0, 2**62), default=None, help="Show at most N events.")
@click.option("--all", "show_all", is_flag=True, help="Every event of every branch, newest first.")
@click.option("--at", "ref", default="HEAD", show_default=True, help="Start from this ref.")
@pass_app
def log_cmd(app: App, limit, show_all, ref) -> None:
    """List events, newest first (one line each)."""
    ledger = app.ledger()
    with ledger.session():  # one connection; only the listed window of history is read
        start = None if show_all else ledger.resolve(ref)
        events = ledger.events(limit=limit) if show_all else ledger.graph.history(start, limit)
        active = ledger.active_among(events, start) if not show_all else None
        head = start.id if start is not None and ref.strip() == "HEAD" else ledger.head().id
    if app.as_json:
        app.emit([e.to_json() | ({"active": e.id in active}
                                 if active is not None and e.type in ("add", "forget", "learn", "merge") else {})
                  for e in events])
        return
    for e in events:
        mark = " (HEAD)" if e.id == head else ""
        if active is not None and e.type in ("add", "forget", "learn", "merge") and e.id not in active:
            mark += " [reverted]"
        click.echo(f"{e.seq:>6} {e.describe()}{mark}")


@cli.command()
@click.argument("event", default="HEAD")
@pass_app
def show(app: App, event: str) -> None:
    """Show one event in full: request, method config, ensemble, metrics, delta."""
    ledger = app.ledger()
    with ledger.session():
        ev = ledger.resolve(event)
        data = ev.to_json()
        data["active_at_head"] = ev.id in ledger.active_among([ev], "HEAD")
        data["resolved"] = {"ref": event, "id": ev.id}
    if ev.delta_sha256:
        data["delta"] = ledger.delta_summary(ev)  # without torch: `show` starts fast
    if app.as_json:
        app.emit(data)
        return
    import json

    click.echo(f"{'ref':>14}: {event} → {ev.id}")
    for k in ("id", "seq", "type", "branch", "created_at", "parent", "method", "target", "message",
              "delta_sha256", "delta_bytes", "active_at_head", "hash"):
        if data.get(k) not in (None, [], ""):
            click.echo(f"{k:>14}: {data[k]}")
    for k in ("request", "config", "ensemble", "metrics"):
        if data.get(k):
            click.echo(f"{k:>14}: " + json.dumps(data[k], indent=2, sort_keys=True).replace("\n", "\n" + " " * 16))
    if data.get("delta"):
        d = data["delta"]
        sizes = {f: sum(1 for v in d.values() if v["format"] == f) for f in ("sparse", "lowrank", "dense")}
        nnz = sum(v.get("nnz", 0) for v in d.values())
        click.echo(f"{'delta':>14}: {len(d)} tensors ({', '.join(f'{n} {f}' for f, n in sizes.items() if n)})"
                   + (f", {nnz} entries" if nnz else ""))
        top = sorted(d.items(), key=lambda kv: -kv[1]["fro_norm"])
        for name, v in top[:8]:
            size = f"nnz {v['nnz']}" if "nnz" in v else (f"rank {v['rank']}" if "rank" in v else "dense")
            click.echo(f"{'':>16}{name}  {tuple(v['shape'])}  {size}  ‖Δ‖={v['fro_norm']:.4g}")
        if len(top) > 8:
            click.echo(f"{'':>16}… {len(top) - 8} more (--json for all)")


@cli.command()
@pass_app
def status(app: App) -> None:
    """Current branch, head, active edits and base model."""
    ledger = app.ledger()
    with ledger.session():  # one connection; the active edits are counted in SQL, not read
        head = ledger.head()
        data = {"ledger": str(ledger.root), "branch": ledger.current_branch(), "head": head.id,
                "events": ledger.count(), "active_edits": ledger.active_count(head),
                "base_model": ledger.base_model()}
    base = data["base_model"] or {}
    lines = [f"ledger:       {data['ledger']}",
             f"branch:       {data['branch']}",
             f"head:         {head.describe()}",
             f"events:       {data['events']}",
             f"active edits: {data['active_edits']}",
             f"base model:   {base.get('spec', '?')}" + (f" ({base['path']})" if base.get("path") not in (None, base.get("spec")) else ""),
             f"fingerprint:  {str(base.get('fingerprint', '?'))[:16]}"]
    app.emit(data, "\n".join(lines))


@cli.command()
@click.option("--no-objects", is_flag=True, help="Check the hash chain only, not the delta objects.")
@click.option("--anchor", metavar="HASH", help="A row hash kept outside the ledger that the chain must contain.")
@click.option("--deep", is_flag=True, help="Also recompute every cached snapshot from the base model's weights"
                                            " and the deltas (loads the base model).")
@pass_app
def verify(app: App, no_objects: bool, anchor: str | None, deep: bool) -> None:
    """Check the hash chain, every row, every delta object (decoded) and the cache; exit 4 on the
    first problem."""
    ledger = app.ledger()
    model = None
    if deep:
        from kledger.workspace import Workspace  # torch: only for --deep

        model = Workspace(ledger, device=app.device, device_map=app.device_map).load_base()[0]
    bar = app.progress(total=ledger.count(), desc="verify")
    try:
        rep = ledger.verify(check_objects=not no_objects, progress=bar.update, anchor=anchor, deep_model=model)
    finally:
        bar.close()
    data = rep.to_json()
    if not app.as_json:
        if rep.ok:
            click.echo(f"ok: {rep.rows} rows, {rep.objects_checked} objects verified in {rep.seconds:.2f} s"
                       f" ({data['rows_per_s']} rows/s)")
            if rep.snapshots_checked and not deep:
                click.echo(f"note: {rep.snapshots_checked} cached snapshot(s) match the ledger's record; their values"
                           " are recomputed only by `kledger verify --deep`")
            elif deep:
                click.echo(f"deep: {rep.snapshots_recomputed} cached snapshot(s) recomputed bit for bit")
        for name in rep.pending_snapshots:
            click.echo(f"warning: snapshot {name} is not recorded yet (the next append records it); unused until then")
        for sha in rep.orphans:
            click.echo(f"warning: orphan object {sha} (no row refers to it; left by an interrupted add)")
        for p in rep.temp_files:
            click.echo(f"warning: temporary file {p} (left by an interrupted write)")
    else:
        app.emit(data)
    if not rep.ok:
        raise IntegrityError(rep.problem)


@cli.command()
@click.argument("prompt")
@click.option("--at", "ref", default="HEAD", show_default=True, help="Version to run (HEAD, HEAD~N, id, branch).")
@click.option("-n", "--max-new-tokens", default=8, show_default=True)
@click.option("--expect", help="Exit 1 unless the greedy continuation starts with this text.")
@pass_app
def generate(app: App, prompt: str, ref: str, max_new_tokens: int, expect: str | None) -> None:
    """Greedy continuation of PROMPT by the model at a version."""
    from kledger.editors.scoring import greedy
    from kledger.ledger.errors import KledgerError
    from kledger.ledger.records import FactRequest
    from kledger.workspace import Workspace, check_lengths

    ws = Workspace(app.ledger(), device=app.device, device_map=app.device_map, progress=app.show_progress)
    model, tok, m = ws.model_at(ref)
    if max_new_tokens < 1:
        raise UsageError(f"expected -n ≥ 1, found {max_new_tokens}")
    check_lengths(model, tok, [FactRequest(prompt, " " + "x" * max_new_tokens)] if prompt.strip() else [])
    text = greedy(model, tok, prompt, max_new_tokens)
    ok = expect is None or text.startswith(expect) or text.lstrip().startswith(expect.strip())
    app.emit({"prompt": prompt, "continuation": text, "version": m.version.id, "expect": expect, "ok": ok},
             f"{prompt}\x1b[1m{text}\x1b[0m" if app.show_progress else f"{prompt}{text}")
    if not ok:
        raise KledgerError(f"expected the continuation to start with {expect!r}, found {text!r}")
