"""Branches and merges: ``branch``, ``switch``, ``branches``, ``merge``.

A branch is a ref over the one append-only log: a ``branch`` event (``branch=NAME``,
``parent`` = the event it starts at) creates it, and its head is the newest model event
recorded on it. ``switch`` only rewrites ``.kledger/HEAD``. ``merge`` appends one ``merge`` event
on the current branch (``parent`` = our head, ``parents`` = [our head, their head]); its
semantics (three-way active set, ``supersedes``, the strategies) are documented in
``kledger.ledger.merge``. The ``resolve`` strategy lives here because it runs an editor.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import click

from kledger.cli.app import App, pass_app
from kledger.cli.main import cli
from kledger.ledger.canonical import canonical_json
from kledger.ledger.errors import StateError, UsageError
from kledger.ledger.records import Event, FactRequest
from kledger.ledger.store import Ledger

if TYPE_CHECKING:
    from kledger.ledger.merge import MergePlan

log = logging.getLogger(__name__)

# ``kledger.ledger.merge`` needs torch, which `branch`, `switch` and `branches` do not: it is
# imported inside the merge functions, and its option values are repeated here
# (tests/test_cli_imports.py checks that they agree)
STRATEGIES = ("sum", "resolve", "ties")
DEFAULT_DENSITY = 0.2

#: methods that solve a batch of facts jointly when their class does not say (attribute ``batch_solve``)
BATCH_METHODS = ("memit", "alphaedit")


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
@cli.command()
@click.argument("branch")
@click.option("--strategy", type=click.Choice(STRATEGIES), default="sum", show_default=True,
              help="sum: add the deltas (exact, cheap); resolve: re-solve all facts in one batch; "
                   "ties: trim and sign-elect overlapping sparse entries.")
@click.option("--dry-run", is_flag=True, help="Report conflicts and interference; write nothing.")
@click.option("--ours", "choose_ours", multiple=True, metavar="FACT",
              help="Keep our side for a conflicting fact (subject, prompt or event id).")
@click.option("--theirs", "choose_theirs", multiple=True, metavar="FACT",
              help="Keep their side for a conflicting fact.")
@click.option("--density", type=float, default=DEFAULT_DENSITY, show_default=True,
              help="ties: fraction of each side's sparse entries kept by magnitude.")
@click.option("--top", type=int, default=20, show_default=True, help="Rows of the interference table.")
@click.option("--stats-corpus", type=click.Path(dir_okay=False),
              help="resolve: the key-statistics corpus the edits were made with, if not the default.")
@click.option("-m", "--message", help="A note recorded with the merge.")
@pass_app
def merge(app: App, branch: str, strategy: str, dry_run: bool, choose_ours, choose_theirs, density: float,
          top: int, stats_corpus: str | None, message: str | None) -> None:
    """Merge BRANCH into the current branch as one `merge` event.

    Hard conflicts (the same subject and relation with different targets on the two sides) stop
    the merge unless each is given a side with --ours/--theirs; nothing is written then, and
    the exit code is 1. Warnings (same fact on both sides, overlapping sparse entries,
    opposite-sign updates) and the interference table ‖Δ_B k_A‖ are shown either way.
    """
    from kledger.ledger.merge import analyse, plan_merge

    ledger = app.ledger()
    with ledger.session():  # one read-only connection for the whole analysis
        ours = ledger.head()
        theirs = ledger.resolve(branch)
        plan = plan_merge(ledger, ours, theirs, choose_ours, choose_theirs)
    analyse(plan, ledger.load_delta)
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
    ev, extra = do_merge(ledger, plan, strategy, branch=branch, density=density, message=message, app=app,
                         stats_corpus=stats_corpus)
    data["merged"] = ev.id
    data.update(extra)
    app.emit(data, f"merged {branch} into {ledger.current_branch()}: {ev.describe()}")


def do_merge(ledger: Ledger, plan: MergePlan, strategy: str, *, branch: str, density: float = DEFAULT_DENSITY,
             message: str | None = None, app: App | None = None, device: str | None = None,
             progress: bool = False, stats_corpus: str | None = None) -> tuple[Event, dict]:
    """Append the merge event for ``plan`` with ``strategy``; returns it and strategy details."""
    from kledger.ledger.merge import ties_correction

    if plan.unresolved:
        raise StateError(f"expected no unresolved hard conflicts, found {len(plan.unresolved)}")
    if strategy not in STRATEGIES:
        raise UsageError(f"expected a strategy in {STRATEGIES}, found {strategy!r}")
    dropped = plan.dropped()
    config: dict[str, Any] = {"strategy": strategy, "theirs": branch, "theirs_head": plan.theirs.id,
                              "supersedes": dropped, "choices": {c.fact: c.choice for c in plan.conflicts}}
    metrics: dict[str, Any] = {"ours_edits": len(plan.ours_only), "theirs_edits": len(plan.theirs_only),
                               "conflicts": len(plan.conflicts), "duplicates": len(plan.duplicates),
                               "overlapping_pairs": len({(o["ours"], o["theirs"]) for o in plan.overlaps})}
    delta = None
    method = None
    request = None
    extra: dict[str, Any] = {}
    t0 = time.perf_counter()
    if strategy == "ties":
        load = ledger.load_delta
        delta, stats = ties_correction([load(e) for e in plan.kept("ours")], [load(e) for e in plan.kept("theirs")],
                                       density)
        config["density"] = density
        metrics["ties"] = stats
        extra["ties"] = stats
    elif strategy == "resolve":
        delta, info = _resolve(ledger, plan, device=device or (app.device if app else "auto"),
                               progress=progress or bool(app and app.show_progress), stats_corpus=stats_corpus)
        config["supersedes"] = dropped + info["recomputed"]
        config["methods"] = info["methods"]
        method = info["method"]
        request = info["requests"] or None
        metrics["resolve"] = info["metrics"]
        extra["resolve"] = {k: v for k, v in info.items() if k != "requests"}
    metrics["time_s"] = round(time.perf_counter() - t0, 4)
    ev = ledger.append("merge", parent=plan.ours.id, parents=[plan.ours.id, plan.theirs.id], config=config,
                       metrics=metrics, delta=delta, method=method, request=request, expect_head=plan.ours.id,
                       message=message or f"merge {branch} ({strategy})")
    return ev, extra


def _batchable(method: str | None) -> bool:
    from kledger.editors.registry import EDITORS, editor_class

    if not method or method not in EDITORS:
        return False
    cls = editor_class(method)
    flag = getattr(cls, "batch_solve", None)
    return bool(flag) if flag is not None else method in BATCH_METHODS


def _resolve(ledger: Ledger, plan: MergePlan, *, device: str, progress: bool,
             stats_corpus: str | None = None) -> tuple[Any, dict]:
    """Re-solve the union of both sides' batch-method requests in one solve per method+config,
    starting from the merged active set without those edits (so edits of other methods and
    both sides' reverts are already in the model)."""
    from kledger.cli.rebase import compute_edit, load_model_with
    from kledger.ledger.merge import combine, requests_of

    side = sorted(plan.kept("ours") + plan.kept("theirs"), key=lambda e: e.seq)
    groups: dict[tuple[str, str], list[Event]] = {}
    kept_sum = []
    for ev in side:
        if ev.type == "add" and _batchable(ev.method):
            groups.setdefault((ev.method, canonical_json(ev.config or {})), []).append(ev)
        else:
            kept_sum.append(ev.id)
    info: dict[str, Any] = {"recomputed": [], "methods": [], "method": None, "requests": [], "kept_as_sum": kept_sum,
                            "metrics": {}}
    if not groups:
        info["note"] = "no side edit of a batch-solving method; resolve equals sum"
        return None, info
    recomputed = {e.id for g in groups.values() for e in g}
    drop = set(plan.dropped())
    start = [i for i in plan.merged_live if i not in recomputed and i not in drop]
    model, tok, start_events = load_model_with(ledger, start, device)
    deltas = []
    done: dict[str, list[dict]] = {}
    t0 = time.perf_counter()
    per_group = []
    for (method, cfg_json), evs in groups.items():
        reqs: list[FactRequest] = []
        for e in evs:
            for r in requests_of(e):
                fr = FactRequest.from_json(r)
                if fr not in reqs:
                    reqs.append(fr)
        states = [dict(ledger.load_delta(e).state) for e in start_events if e.method == method]
        states += done.get(method, [])
        results = compute_edit(ledger, model, tok, method, evs[0].config, reqs, states, progress=progress,
                               stats_corpus=stats_corpus)
        d = combine([r.delta for r in results])
        from kledger.ledger.compose import apply_deltas

        apply_deltas(model, [d])
        deltas.append(d)
        done.setdefault(method, []).append(dict(d.state))
        info["requests"].extend(r.to_json() for r in reqs)
        info["methods"].append({"method": method, "events": [e.id for e in evs], "requests": len(reqs)})
        per_group.append([dict(r.metrics) for r in results])
    info["recomputed"] = [e.id for e in side if e.id in recomputed]
    info["method"] = info["methods"][0]["method"] if len(info["methods"]) == 1 else None
    info["metrics"] = {"solve_s": round(time.perf_counter() - t0, 3), "results": per_group}
    return combine(deltas), info


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
