"""Commands that append events: ``init``, ``add``, ``revert``."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import click

from kledger.cli.app import App, pass_app
from kledger.cli.main import cli
from kledger.editors.registry import DEFAULT_METHOD, EDITORS, editor_class
from kledger.ledger.errors import NotFoundError, UsageError
from kledger.ledger.records import FactRequest, load_requests
from kledger.ledger.store import Ledger


def _method_help() -> str:
    lines = []
    for name in sorted(EDITORS):
        try:
            cls = editor_class(name)
            lines.append(f"{name}: {cls.summary} ({cls.paper})")
        except Exception:  # an editor whose module fails to import must not break --help
            lines.append(f"{name}")
    return "\b\nMethods:\n" + "\n".join("  " + l for l in lines)


def _parse_sets(pairs: tuple[str, ...], config_file: str | None) -> dict:
    out: dict = {}
    if config_file:
        try:
            data = json.loads(Path(config_file).read_text())
        except (OSError, ValueError) as exc:
            raise UsageError(f"expected a JSON object in --config {config_file!r}, found: {exc}") from None
        if not isinstance(data, dict):
            raise UsageError(f"expected a JSON object in --config {config_file!r}, found {type(data).__name__}")
        out.update(data)
    for p in pairs:
        if "=" not in p:
            raise UsageError(f"expected --set KEY=VALUE, found {p!r}")
        k, v = p.split("=", 1)
        out[k.strip()] = v
    return out


@cli.command()
@click.option("--model", "model_spec", required=True, help="Local HF model folder or alias (smollm2-135m).")
@click.option("--dir", "directory", default=".", show_default=True, type=click.Path(file_okay=False),
              help="Where to create .kledger/.")
@click.option("--probes", "probes", metavar="default|FILE",
              help="Also record the audit probe set now (the defaults, or facts/prompts/texts from FILE):"
                   " every later edit then gets a per-edit pulse (KL, retention) in its metrics.")
@click.option("--dtype", "dtype", default="auto", show_default=True, metavar="auto|float32|bfloat16|float16",
              help="Precision every command loads the base model in (auto: the checkpoint's own, from its"
                   " config.json; float32 when it names none). Deltas are stored in float32 either way.")
@pass_app
def init(app: App, model_spec: str, directory: str, probes: str | None, dtype: str) -> None:
    """Create a ledger (.kledger/) for a base model; record its fingerprint."""
    from kledger.workspace import init_ledger  # torch and the editors: only when a model is needed

    if probes not in (None, "default") and not Path(probes).is_file():
        raise UsageError(f"--probes: expected 'default' or a probe file, found no file {probes!r}")
    Path(directory).mkdir(parents=True, exist_ok=True)
    ledger = init_ledger(directory, model_spec, dtype=dtype)
    base = ledger.base_model()
    out = {"ledger": str(ledger.root), "base_model": base, "head": ledger.head().id}
    if probes:
        from kledger.auditing import probe_set

        app._ledger = ledger
        model, tok, _ = app.load_base()
        ps, pev, _ = probe_set(ledger, model, tok, None if probes == "default" else probes, app.progress_note)
        out["probes"] = {"event": pev.id, "sha256": ps.sha256, **ps.summary()}
    app.emit(out, f"initialised {ledger.root} for {model_spec} ({base['dtype']}, fingerprint {base['fingerprint'][:16]}…)")


class _AddCommand(click.Command):
    def format_epilog(self, ctx, formatter):  # the method list is built from the registry
        formatter.write_paragraph()
        formatter.write_text(_method_help())


@cli.command(cls=_AddCommand)
@click.argument("prompt", required=False)
@click.argument("target", required=False)
@click.option("--subject", help="The subject, a substring of PROMPT (needed by locate-then-edit methods).")
@click.option("--target-true", help="The answer being replaced, if known (for efficacy scores).")
@click.option("--method", default=DEFAULT_METHOD, show_default=True, help="Editing method (see below).")
@click.option("--from-file", "from_file", type=click.Path(dir_okay=False),
              help="JSON list of facts (EasyEdit flat CounterFact or zsRE format); one event per fact.")
@click.option("--batch", "batch_file", type=click.Path(dir_okay=False), hidden=True)
@click.option("--limit", type=click.IntRange(min=0), help="Only the first N records of --from-file.")
@click.option("--batch-size", default=1, show_default=True, help="Facts per editor call (one solve per batch).")
@click.option("--blue", is_flag=True, help="BLUE variant of a locate-then-edit method (same as --set blue=true).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override a method config field.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="JSON file of config fields.")
@click.option("--stats-corpus", type=click.Path(dir_okay=False),
              help="Text/JSONL corpus for key statistics (locate-then-edit); default: text sampled from the base model.")
@click.option("--model", "model_spec", help="Base model; creates the ledger here if none exists.")
@click.option("-m", "--message", help="A note recorded with each event.")
@click.option("--allow-duplicate", is_flag=True,
              help="With --from-file: also edit facts identical to an active edit (default: skip them).")
@click.option("--guard/--no-guard", default=None,
              help="Refuse an edit whose per-edit pulse crosses an audit threshold: exit 3, nothing appended"
                   " (needs a probe set: init --probes or a first audit). Default: off, except for several"
                   " facts with a method that guards sequences (kne) when the ledger has a probe set.")
@pass_app
def add(app: App, prompt, target, subject, target_true, method, from_file, batch_file, limit, batch_size,
        blue, sets, config_file, stats_corpus, model_spec, message, allow_duplicate, guard) -> None:
    """Edit facts into the model: PROMPT continued by TARGET (or --from-file).

    Each fact becomes one `add` event with its delta; see `kledger log`.
    """
    from_file = from_file or batch_file
    if from_file and (prompt or target):
        raise UsageError("expected either PROMPT TARGET or --from-file, found both")
    if from_file:
        requests = load_requests(from_file)
        if limit is not None:
            requests = requests[:limit]
    else:
        if prompt is None or target is None:
            raise UsageError("expected PROMPT and TARGET arguments (or --from-file FILE)")
        requests = [FactRequest(prompt=prompt, target_new=target, subject=subject, target_true=target_true)]
    overrides = _parse_sets(sets, config_file)
    cls = editor_class(method)  # unknown method → usage error before any model is loaded
    if blue:
        if "blue" not in {f.name for f in dataclasses.fields(cls.config_cls)}:
            raise UsageError(f"--blue: expected a locate-then-edit method (memit, alphaedit), found {method!r}")
        overrides["blue"] = True
    from kledger.workspace import Workspace, active_duplicates, default_guard  # torch: only when needed

    ledger = _ledger_or_init(app, model_spec)
    if from_file and not allow_duplicate:
        dup = active_duplicates(ledger, requests)
        if dup:
            requests = [r for i, r in enumerate(requests) if i not in dup]
            click.echo(f"kledger: skipped {len(dup)} fact(s) identical to active edits (--allow-duplicate edits"
                       " them again)", err=True)
        if not requests:
            return app.emit([], "nothing to edit: every fact is already an active edit")
    if guard is None:
        guard = default_guard(ledger, cls, len(requests))
    ws = Workspace(ledger, device=app.device, device_map=app.device_map, progress=app.show_progress, model_spec=model_spec, guard=guard)
    bar = app.progress(total=len(requests), desc=f"{method} edits")
    out = []

    def on_event(ev):
        bar.update(len(ev.request) if isinstance(ev.request, list) else 1)
        out.append(ev)
        app.recorded.append(ev)  # reported if the batch stops part-way (cli/main.py)
        if not app.as_json and not app.quiet:
            click.echo(ev.describe())

    try:
        ws.add(requests, method=method, overrides=overrides, batch_size=batch_size, on_event=on_event,
               message=message, stats_corpus=stats_corpus)
    finally:
        bar.close()
    app.emit([_event_summary(e) for e in out])


def _ledger_or_init(app: App, model_spec: str | None) -> Ledger:
    try:
        return app.ledger()
    except NotFoundError:
        if model_spec is None or app.ledger_dir or os.environ.get("KLEDGER_DIR"):
            raise
    from kledger.workspace import init_ledger

    ledger = init_ledger(".", model_spec)
    if not app.quiet and not app.as_json:
        click.echo(f"initialised {ledger.root} for {model_spec}", err=True)
    app._ledger = ledger
    return ledger


def _event_summary(ev) -> dict:
    return {"id": ev.id, "seq": ev.seq, "type": ev.type, "method": ev.method, "request": ev.request,
            "metrics": ev.metrics, "target": ev.target, "delta_sha256": ev.delta_sha256}


@cli.command()
@click.argument("event")
@click.option("-m", "--message", help="A note recorded with the revert.")
@click.option("--rebase", is_flag=True, help="Also recompute every later edit as if EVENT had never happened.")
@pass_app
def revert(app: App, event: str, message: str | None, rebase: bool = False) -> None:
    """Undo EVENT exactly by appending a compensating event (like git revert)."""
    ledger = app.ledger()
    target = ledger.resolve(event)  # said back: which event the ref named
    resolved = {"ref": event, "id": target.id}
    if rebase:
        from kledger.rebase import rebase_revert

        res = rebase_revert(ledger, target.id, device=app.device, progress=app.show_progress, message=message,
                            device_map=app.device_map)
        app.recorded.extend(res.reverts + res.added)
        text = [f"reverted {event} → {res.reverts[0].target} and recomputed {res.recomputed} later edits"
                f" ({len(res.added)} new events) in {res.seconds:.1f} s"]
        if not app.quiet:
            text += [e.describe() for e in res.reverts + res.added]
        return app.emit(res.to_json() | {"resolved": resolved}, "\n".join(text))
    ev = ledger.revert(target.id, message=message)
    app.emit(_event_summary(ev) | {"resolved": resolved},
             ev.describe() if app.quiet else f"reverted {event} → {target.id}\n{ev.describe()}")
