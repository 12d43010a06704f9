"""``kledger forget`` and ``kledger learn``: UNLEARN/LEARN a set of facts as one ledger event.

Both take the facts as PROMPT TARGET (one fact) or ``--from-file F`` (a set), and an optional
``--retain-file R`` of related facts to keep (the subspace is made orthogonal to theirs).
Each invocation appends exactly one ``forget``/``learn`` event recording the set, the retain
set (size, sha256 and the facts used), the config, the ranks and per-layer subspace sizes
before and after discrimination, and the low-rank delta; ``kledger revert ID`` undoes it.

Torch, transformers and the editors are imported inside the commands (fast ``--help``).
"""

from __future__ import annotations

import os

import click

from kledger.cli.app import App, pass_app
from kledger.cli.main import cli
from kledger.ledger.errors import UsageError


def _load_set(path: str, option: str, limit: int | None = None):
    """Facts from a JSON/JSON-lines file, with one-line errors naming the option."""
    from kledger.ledger.records import load_requests

    if os.path.isdir(path):
        raise UsageError(f"{option}: expected a JSON file of fact records, found a directory at {path!r}")
    try:
        requests = load_requests(path)
    except UsageError as exc:
        raise UsageError(f"{option}: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{option}: expected a readable UTF-8 JSON file of fact records at {path!r},"
                         f" found: {exc}") from None
    if limit is not None:
        if limit < 1:
            raise UsageError(f"expected --limit ≥ 1, found {limit}")
        requests = requests[:limit]
    return requests


def _subspace_options(mode: str):
    verb = "forget" if mode == "forget" else "learn"

    def decorate(f):
        opts = [
            click.argument("prompt", required=False),
            click.argument("target", required=False),
            click.option("--subject", help="The subject, a substring of PROMPT (recorded; not needed by the method)."),
            click.option("--from-file", "from_file", metavar="FILE",
                         help=f"JSON list of facts to {verb} (EasyEdit flat CounterFact, zsRE, or ROME known-facts"
                              " records with prompt + target_new/attribute). All of them form ONE event."),
            click.option("--limit", type=int, help="Only the first N records of --from-file."),
            click.option("--retain-file", "retain_file", metavar="FILE",
                         help="JSON list of related facts to keep: the subspace is made orthogonal to theirs."),
            click.option("--no-discriminate", is_flag=True,
                         help="Ignore the retain set's subspace (same as --set discriminate=false)."),
            click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
                         help="Override a config field (see editors/unlearn.py SubspaceConfig)."),
            click.option("--config", "config_file", metavar="FILE", help="JSON file of config fields."),
            click.option("--model", "model_spec", help="Base model; creates the ledger here if none exists."),
            click.option("-m", "--message", help="A note recorded with the event."),
            click.option("--guard", is_flag=True,
                         help="Refuse the event if its per-edit pulse crosses an audit threshold (exit 3,"
                              " nothing appended; needs a probe set)."),
        ]
        for opt in reversed(opts):
            f = opt(f)
        return f

    return decorate


def _facts(prompt, target, subject, from_file, limit, mode: str):
    from kledger.ledger.records import FactRequest

    if from_file and (prompt or target):
        raise UsageError("expected either PROMPT TARGET or --from-file, found both")
    if from_file:
        return _load_set(from_file, "--from-file", limit)
    if prompt is None or target is None:
        raise UsageError(f"expected PROMPT and TARGET arguments (or --from-file FILE) naming the facts to {mode}")
    return [FactRequest(prompt=prompt, target_new=target, subject=subject)]


def _run(app: App, mode: str, prompt, target, subject, from_file, limit, retain_file, no_discriminate, sets,
         config_file, model_spec, message, guard=False) -> None:
    from kledger.cli.edit import _event_summary, _ledger_or_init, _parse_sets
    from kledger.editors.base import make_config
    from kledger.editors.registry import editor_class

    requests = _facts(prompt, target, subject, from_file, limit, mode)
    retain = _load_set(retain_file, "--retain-file") if retain_file else []
    both = {(r.prompt, r.target_new) for r in requests} & {(r.prompt, r.target_new) for r in retain}
    if both:
        p, t = sorted(both)[0]
        raise UsageError(f"expected the retain set to exclude the facts to {mode}, found {len(both)} in both"
                         f" (e.g. {p!r} →{t!r})")
    overrides = _parse_sets(sets, config_file)
    if no_discriminate:
        overrides["discriminate"] = False
    cls = editor_class(mode)
    cfg = make_config(cls.config_cls, overrides)  # a bad --set fails before any model is loaded
    if not retain and cfg.retain_file:
        retain = _load_set(cfg.retain_file, "retain_file")
    ledger = _ledger_or_init(app, model_spec)
    if not app.quiet and not app.as_json:
        disc = "discriminated against" if cfg.discriminate and retain else "not discriminated;"
        click.echo(f"{mode}: {len(requests)} fact(s), subspace {disc} {len(retain)} retain fact(s);"
                   f" fitting (steps {cfg.steps}, {cfg.fit})…", err=True)
    from kledger.workspace import Workspace

    ws = Workspace(ledger, device=app.device, device_map=app.device_map, progress=app.show_progress, model_spec=model_spec, guard=guard)
    app.progress_note(f"loading the working model at {ledger.head().id}")
    ev = getattr(ws, mode)(requests, retain=retain, overrides=overrides, message=message)
    summary = _event_summary(ev) | {"ensemble": ev.ensemble, "config": ev.config}
    app.emit(summary, "\n".join([ev.describe(), _describe_ranks(ev)]))


def _describe_ranks(ev) -> str:
    ens, m = ev.ensemble or {}, ev.metrics or {}
    mode = ev.type
    layers = ens.get("layers", [])
    retain = ens.get("retain") or {}
    parts = [f"rank {ens.get('rank_before')} → {ens.get('rank')} over {len(layers)} weights"
             + (" after discrimination" if m.get("discriminated") else "")]
    if f"{mode}_loss_before" in m:
        parts.append(f"{mode} NLL {m[f'{mode}_loss_before']:.3f} → {m[f'{mode}_loss_after']:.3f}")
    if "retain_loss_before" in m:
        parts.append(f"retain NLL {m['retain_loss_before']:.3f} → {m['retain_loss_after']:.3f}"
                     f" ({retain.get('given', 0)} facts)")
    return "  " + "; ".join(parts)


@cli.command()
@_subspace_options("forget")
@pass_app
def forget(app: App, prompt, target, subject, from_file, limit, retain_file, no_discriminate, sets, config_file,
           model_spec, message, guard) -> None:
    """UNLEARN facts: PROMPT whose answer TARGET is to be forgotten (or --from-file).

    Fits the weight-update subspace that carries the facts, removes from it what the retain
    set's subspace shares (--retain-file), and subtracts it. The whole set is ONE `forget`
    event; `kledger revert ID` restores the model exactly. Method: arXiv 2408.04140.
    """
    _run(app, "forget", prompt, target, subject, from_file, limit, retain_file, no_discriminate, sets, config_file,
         model_spec, message, guard)


@cli.command()
@_subspace_options("learn")
@pass_app
def learn(app: App, prompt, target, subject, from_file, limit, retain_file, no_discriminate, sets, config_file,
          model_spec, message, guard) -> None:
    """LEARN facts: PROMPT continued by TARGET (or --from-file), added in a low-rank subspace.

    The dual of `forget`: the fitted subspace (orthogonal to --retain-file's, if given) is
    added. The whole set is ONE `learn` event; `kledger revert ID` removes it exactly.
    """
    _run(app, "learn", prompt, target, subject, from_file, limit, retain_file, no_discriminate, sets, config_file,
         model_spec, message, guard)
