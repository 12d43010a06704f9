"""Branches and merges: ``branch``, ``switch``, ``branches``, ``merge``.

A branch is a ref over the one append-only log: a ``branch`` event (``branch=NAME``,
``parent`` = the event it starts at) creates it, and its head is the newest model event
recorded on it. ``switch`` only rewrites ``.kledger/HEAD``. ``merge`` appends one ``merge`` event
on the current branch (``parent`` = our head, ``parents`` = [our head, their head]); its
semantics (three-way active set, ``supersedes``) are documented in ``kledger.ledger.mergeplan``
and the strategies in ``kledger.merging``; this module parses options and prints.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from kledger.cli.app import App, pass_app
from kledger.cli.main import cli
from kledger.ledger.errors import StateError
from kledger.merging import STRATEGIES, all_options

if TYPE_CHECKING:
    from kledger.ledger.mergeplan import MergePlan


# --------------------------------------------------------------------------------------------
@cli.command(name="branch")
@click.argument("name")
@click.option("--at", "ref", default="HEAD", show_default=True, help="Where the branch starts (HEAD~N, id, branch).")
@click.option("-s", "--switch", "do_switch", is_flag=True, help="Also switch to the new branch.")
@pass_app
def branch_cmd(app: App, name: str, ref: str, do_switch: bool) -> None:
    """Create branch NAME starting at REF (appends a `branch` event)."""
    ledger = app.ledger()
    ev = ledger.create_branch(name, ref)
    if do_switch:
        ledger.set_current_branch(name)
    app.emit({"branch": name, "event": ev.id, "at": ev.parent, "switched": do_switch},
             f"created branch {name} at {ev.parent}" + (f"; switched to {name}" if do_switch else ""))


@cli.command()
@click.argument("name")
@click.option("-c", "--create", is_flag=True, help="Create the branch first (at --at).")
@click.option("--at", "ref", default="HEAD", show_default=True, help="With --create: where it starts.")
@pass_app
def switch(app: App, name: str, create: bool, ref: str) -> None:
    """Make NAME the current branch (later edits go there)."""
    ledger = app.ledger()
    if create:
        ledger.create_branch(name, ref)
    ledger.set_current_branch(name)
    head = ledger.head()
    app.emit({"branch": name, "head": head.id}, f"switched to {name} (head {head.id})")


@cli.command()
@pass_app
def branches(app: App) -> None:
    """List branches with their heads (* marks the current one)."""
    ledger = app.ledger()
    cur = ledger.current_branch()
    with ledger.session():
        heads = ledger.branches()
    if app.as_json:
        app.emit([{"branch": n, "current": n == cur, "head": h.id, "seq": h.seq, "type": h.type}
                  for n, h in heads.items()])
        return
    for n, h in heads.items():
        click.echo(f"{'*' if n == cur else ' '} {n:<20} {h.describe()}")


# --------------------------------------------------------------------------------------------
def _strategy_options(f):
    """``--NAME`` for every option the strategies declare (``kledger.merging``)."""
    for o in reversed(all_options()):
        f = click.option(f"--{o.name.replace('_', '-')}", o.name, default=o.default, show_default=o.default is not None,
                         type=click.Path(dir_okay=False) if o.is_file else o.type, help=o.help)(f)
    return f


@cli.command()
@click.argument("branch")
@click.option("--strategy", type=click.Choice(list(STRATEGIES)), default="sum", show_default=True,
              help="; ".join(f"{n}: {s.help}" for n, s in STRATEGIES.items()) + ".")
@click.option("--dry-run", is_flag=True, help="Report conflicts and interference; write nothing.")
@click.option("--ours", "choose_ours", multiple=True, metavar="FACT",
              help="Keep our side for a conflicting fact (subject, prompt or event id).")
@click.option("--theirs", "choose_theirs", multiple=True, metavar="FACT",
              help="Keep their side for a conflicting fact.")
@_strategy_options
@click.option("--top", type=int, default=20, show_default=True, help="Rows of the interference table.")
@click.option("-m", "--message", help="A note recorded with the merge.")
@pass_app
def merge(app: App, branch: str, strategy: str, dry_run: bool, choose_ours, choose_theirs, top: int,
          message: str | None, **options) -> None:
    """Merge BRANCH into the current branch as one `merge` event.

    Hard conflicts (the same subject and relation with different targets on the two sides) stop
    the merge unless each is given a side with --ours/--theirs; nothing is written then, and
    the exit code is 1. Warnings (same fact on both sides, overlapping sparse entries,
    opposite-sign updates) and the interference table ‖Δ_B k_A‖ are shown either way.
    """
    from kledger.merging import do_merge, prepare

    ledger = app.ledger()
    plan = prepare(ledger, branch, choose_ours, choose_theirs)
    data: dict[str, Any] = {"strategy": strategy, "branch": branch, "into": ledger.current_branch(),
                            "dry_run": dry_run} | plan.to_json()
    if not app.as_json and not app.quiet:
        click.echo(render_plan(plan, branch, ledger.current_branch(), strategy, top))
    if plan.up_to_date:
        data["merged"] = None
        app.emit(data, f"already up to date with {branch}; nothing to merge")
        return
    if plan.unresolved:
        if app.as_json:
            app.emit(data)
        facts = "; ".join(c.fact for c in plan.unresolved)
        raise StateError(f"expected no hard conflicts, found {len(plan.unresolved)} ({facts}); pick a side per fact"
                         " with --ours FACT or --theirs FACT; nothing was merged")
    if dry_run:
        app.emit(data, "dry run: nothing was written")
        return
    ev, extra = do_merge(ledger, plan, strategy, branch=branch, message=message, device=app.device,
                         device_map=app.device_map, progress=app.show_progress, **options)
    data["merged"] = ev.id
    data.update(extra)
    app.emit(data, f"merged {branch} into {ledger.current_branch()}: {ev.describe()}")


# --------------------------------------------------------------------------------------------
def render_plan(plan: MergePlan, branch: str, into: str, strategy: str, top: int = 20) -> str:
    lines = [f"merge {branch} ({plan.theirs.id}) into {into} ({plan.ours.id}), strategy {strategy}:"
             f" {len(plan.ours_only)} edits ours, {len(plan.theirs_only)} theirs"]
    if plan.conflicts:
        lines.append("hard conflicts (same subject and relation, different targets):")
        for c in plan.conflicts:
            o = ", ".join(f"{t!r} ({e})" for e, t in c.ours)
            t = ", ".join(f"{t!r} ({e})" for e, t in c.theirs)
            state = {"ours": "keeping ours", "theirs": "keeping theirs"}.get(c.choice or "", "UNRESOLVED")
            lines.append(f"  {c.fact}: ours {o} | theirs {t}  [{state}]")
    warns = []
    for d in plan.duplicates:
        warns.append(f"same fact on both sides: {d['fact']} →{d['target']!r}"
                     " (sum and ties apply it twice; resolve solves it once)")
    if plan.overlaps:
        pairs = {(o["ours"], o["theirs"]) for o in plan.overlaps}
        shared = sum(o["shared_entries"] for o in plan.overlaps)
        opp = sum(o["opposite_sign"] for o in plan.overlaps)
        warns.append(f"overlapping sparse ensembles: {len(pairs)} edit pairs share {shared} entries,"
                     f" {opp} with opposite-sign updates")
    warns += plan.notes
    if warns:
        lines.append("warnings:")
        lines += ["  " + w for w in warns]
    rows = sorted(plan.interference, key=lambda r: -max(r.get("theirs_on_our_keys_rel") or 0,
                                                        r.get("ours_on_their_keys_rel") or 0, abs(r["cosine"])))
    if rows:
        lines.append(f"interference ({len(rows)} pairs sharing tensors; top {min(top, len(rows))}):"
                     " ‖Δ_theirs k_ours‖ and ‖Δ_ours k_theirs‖, relative to the edit's own ‖Δ k‖")
        lines.append(f"  {'ours':<12} {'theirs':<12} {'shared':>7} {'opp':>5} {'cos':>7} "
                     f"{'Δt·k_o':>10} {'rel':>7} {'Δo·k_t':>10} {'rel':>7}  keys")
        for r in rows[:top]:
            def f(k, w=10, p=4):
                v = r.get(k)
                return f"{v:>{w}.{p}g}" if isinstance(v, (int, float)) else f"{'-':>{w}}"
            lines.append(f"  {r['ours']:<12} {r['theirs']:<12} {r['shared_entries']:>7} {r['opposite_sign']:>5}"
                         f" {r['cosine']:>7.3f} {f('theirs_on_our_keys')} {f('theirs_on_our_keys_rel', 7, 3)}"
                         f" {f('ours_on_their_keys')} {f('ours_on_their_keys_rel', 7, 3)}  {r['keys']}")
    return "\n".join(lines)
