"""``kledger audit``: measure a version on the probe set, record it, compare, blame, report.

Exit codes: 0 healthy · 3 a threshold is crossed (after the report is written and the audit event
appended) · 1/2/4/75 errors as for every command (see ``kledger.cli.main``).

Thresholds live in the ledger, which has no mutable config: ``--set-threshold NAME=VALUE``
appends an ``audit`` event whose config holds the merged thresholds (the latest such event wins;
``off`` disables one, ``default`` restores it) and exits without measuring. ``--threshold
NAME=VALUE`` overrides one for this run only; the thresholds used are recorded with each audit.
"""

from __future__ import annotations

import time
from typing import Any, Mapping

import click

from kledger.cli.app import App, pass_app
from kledger.cli.main import cli
from kledger.ledger import audit as A
from kledger.ledger.errors import AuditThresholdError
from kledger.ledger.probes import describe_sources, find_or_build
from kledger.ledger.records import Event

def probe_set(app: App, ledger, model, tok, probes_file: str | None):
    """The ledger's probe set (built from the base ``model`` and recorded if there is none yet, or
    if ``probes_file`` differs from the latest): (probes, its event, recorded now?)."""
    from kledger.editors.models import cache_dir
    from kledger.ledger.probes import PROBES_VERSION

    fp = ledger.base_model()["fingerprint"]
    probes, pev, built = find_or_build(ledger, model, tok, probes_file, base_info=ledger.base_model(),
                                       cache=cache_dir() / "probes" / f"default-{fp[:16]}-v{PROBES_VERSION}.safetensors")
    if built:
        app.progress_note(f"recorded {describe_sources(probes)} as event {pev.id}")
    return probes, pev, built


_ORDER = ("ppl_ratio", "kl", "retention_drop", "edit_retention_drop", "weight_rel", "sv_growth")
_BASE = {"ppl_ratio": 1.0, "kl": 0.0, "retention_drop": 0.0, "edit_retention_drop": None, "weight_rel": 0.0,
         "sv_growth": 1.0}


def previous_audit(ledger, version: Event, probes_sha: str) -> Event | None:
    """The latest recorded audit, on the same probe set, of ``version`` or one of its ancestors."""
    anc = ledger.ancestors(version)
    for ev in ledger.events(types=["audit"]):
        cfg = ev.config if isinstance(ev.config, Mapping) else {}
        if cfg.get("kind") == "audit" and cfg.get("probes") == probes_sha and cfg.get("version") in anc:
            return ev
    return None


def _f(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _table(metrics: Mapping[str, Any], prev: Mapping[str, Any] | None, th: Mapping[str, Any],
           crossed_: list[str]) -> str:
    lines = [f"{'metric':<21}{'base':>9}{'previous':>11}{'now':>11}{'threshold':>12}"]
    for n in _ORDER:
        bound = th.get(n)
        flag = "  CROSSED" if n in crossed_ else ""
        lines.append(f"{n:<21}{_f(_BASE[n]):>9}{_f((prev or {}).get(n)):>11}{_f(metrics.get(n)):>11}"
                     f"{('<= ' + _f(bound)) if bound is not None else 'off':>12}{flag}")
    return "\n".join(lines)


@cli.command()
@click.option("--at", "ref", default="HEAD", show_default=True, help="Version to audit (HEAD, HEAD~N, id, branch).")
@click.option("--json", "json_flag", is_flag=True, help="Print the figures as JSON (same as the global --json).")
@click.option("--report", "report_dir", type=click.Path(file_okay=False),
              help="Write an HTML report with PNG plots into this folder.")
@click.option("--blame", is_flag=True, help="If a threshold is crossed, bisect the event sequence for the edits "
              "responsible and print the revert command.")
@click.option("--max-culprits", default=3, show_default=True, help="Most edits --blame names.")
@click.option("--probes", "probes_file", type=click.Path(dir_okay=False),
              help="JSON probe file (facts as in known_1000.json, and/or texts, prompts) overriding the defaults;"
                   " recorded in the ledger and used from then on.")
@click.option("--threshold", "one_off", multiple=True, metavar="NAME=VALUE",
              help="Override a threshold for this run only.")
@click.option("--set-threshold", "persist", multiple=True, metavar="NAME=VALUE",
              help="Record a threshold in the ledger (latest wins; off disables, default restores) and exit.")
@click.option("--show-thresholds", is_flag=True, help="Print the effective thresholds and exit.")
@click.option("--no-record", is_flag=True, help="Measure and report without appending the audit event.")
@click.option("--model", "model_spec", help="A copy of the base model (same fingerprint) to load instead.")
@pass_app
def audit(app: App, ref, json_flag, report_dir, blame, max_culprits, probes_file, one_off, persist,
          show_thresholds, no_record, model_spec) -> None:
    """Audit a version for drift: perplexity, KL vs the base, fact and edit retention, weights.

    \b
    Thresholds (upper bounds; defaults in parentheses):
      ppl_ratio (1.10)           held-out perplexity / the base model's
      kl (0.10)                  mean KL(base || model), next-token, neutral prompts, nats
      retention_drop (0.05)      fraction of known facts no longer answered
      edit_retention_drop (0.5)  fraction of active edits no longer holding
      weight_rel (off)           max ||W-W0||_F/||W0||_F over edited tensors
      sv_growth (off)            max sigma1(W)/sigma1(W0) over edited tensors
    Exit 0 healthy, 3 threshold crossed.
    """
    if json_flag:
        app.as_json = True
    ledger = app.ledger()
    if persist:
        changes = dict(A.parse_threshold(p) for p in persist)
        ev = A.record_thresholds(ledger, changes)
        th, _ = A.stored_thresholds(ledger)
        app.emit({"event": ev.id, "thresholds": th},
                 f"recorded thresholds in {ev.id}: " + ", ".join(f"{k}={_f(v) if v is not None else 'off'}"
                                                               for k, v in th.items()))
        return
    th, th_ev = A.stored_thresholds(ledger)
    th.update(dict(A.parse_threshold(p) for p in one_off))
    if show_thresholds:
        app.emit({"thresholds": th, "recorded_in": th_ev.id if th_ev else None, "meaning": A.THRESHOLDS},
                 "\n".join(f"{k:<21}{('<= ' + _f(v)) if v is not None else 'off':<10} {A.THRESHOLDS[k]}"
                           for k, v in th.items()))
        return

    t0 = time.perf_counter()
    version = ledger.resolve(ref)
    model, tok, _info = app.load_base(model_spec)
    t_load = time.perf_counter() - t0
    app.progress_note("preparing the probe set")
    from kledger.editors.models import cache_dir
    from kledger.ledger.drift import cache_file

    fp = ledger.base_model()["fingerprint"]
    probes, pev, built = probe_set(app, ledger, model, tok, probes_file)
    auditor = A.Auditor(ledger, model, tok, probes, th, drift_cache=cache_file(cache_dir() / "drift", fp))
    app.progress_note(f"measuring {version.id}")
    res = auditor.audit(version)
    res.metrics["seconds"]["load"] = round(t_load, 3)
    prev = previous_audit(ledger, version, pev.delta_sha256)
    status = "healthy" if res.healthy else "threshold crossed: " + ", ".join(res.crossed)
    metrics = dict(res.metrics) | {
        "healthy": res.healthy, "crossed": res.crossed, "active_edits": res.active,
        "lost_edits": res.details.get("lost_edits", []), "lost_facts": res.details.get("lost_facts", [])[:20],
        "weights": res.details.get("weights", {}), "previous": prev.id if prev else None,
        "total_s": round(time.perf_counter() - t0, 3),
    }
    ev = None
    if not no_record:
        ev = ledger.append(
            "audit", config={"kind": "audit", "audit_version": A.AUDIT_VERSION, "probes": pev.delta_sha256,
                             "thresholds": th, "version": version.id},
            metrics=metrics, parent=version.id, branch=version.branch,
            message=f"audit {version.id}: {status}",
        )
    bl = None
    if blame and not res.healthy:
        app.progress_note("bisecting for the responsible edits")
        bl = auditor.blame(version, res, max_culprits=max_culprits,
                           progress=app.progress_note if (app.verbose or app.show_progress) else None)
        if not no_record:
            ledger.append("audit", config={"kind": "blame", "version": version.id, "probes": pev.delta_sha256,
                                           "thresholds": th, "audit": ev.id if ev else None},
                          metrics=bl.to_json(), parent=version.id, branch=version.branch,
                          message=f"blame {version.id}: " + (", ".join(c["id"] for c in bl.culprits) or "none found"))
    report_path = None
    if report_dir:
        from kledger.ledger.report import write_report

        report_path = write_report(ledger, report_dir, version, thresholds=th,
                                   current={"metrics": metrics, "crossed": res.crossed, "healthy": res.healthy},
                                   blame=bl.to_json() if bl else None, previous=prev.metrics if prev else None)

    data = {"event": ev.id if ev else None, "version": version.id, "healthy": res.healthy, "crossed": res.crossed,
            "metrics": metrics, "thresholds": th, "probes": {"sha256": pev.delta_sha256, "event": pev.id,
                                                             "recorded_now": built, **probes.summary()},
            "previous": {"event": prev.id, "metrics": {n: (prev.metrics or {}).get(n) for n in _ORDER}} if prev else None,
            "blame": bl.to_json() if bl else None, "report": str(report_path) if report_path else None}
    lines = [f"audit of {version.id} ({res.active} active edits) on {describe_sources(probes)}"
             f" {pev.delta_sha256[:12]}: {status.upper()}", _table(metrics, prev.metrics if prev else None, th,
                                                                 res.crossed)]
    if res.details.get("lost_edits"):
        lines.append(f"edits no longer holding: {len(res.details['lost_edits'])} of {res.metrics.get('edits')}")
    if ev:
        lines.append(f"recorded as audit event {ev.id} ({metrics['total_s']:.1f} s)")
    if bl is not None:
        if bl.culprits:
            for c in bl.culprits:
                lines.append(f"blame: {c['describe']}" + (f"\n  fix: {c['revert']}" if c.get("revert") else
                                                         f"\n  note: {c.get('note')}"))
            lines.append("after reverting: " + ("within thresholds" if bl.fixed else "still crossing "
                                                 + ", ".join((bl.after_revert or {}).get("crossed", []))))
        else:
            lines.append("blame: no single event found (the thresholds are crossed from the first event on)")
    if report_path:
        lines.append(f"report: {report_path}")
    app.emit(data, "\n".join(lines))
    if not res.healthy:
        raise AuditThresholdError(
            f"audit of {version.id}: expected every figure within its threshold, found {', '.join(res.crossed)}"
            " crossed" + (f"; fix: {'; '.join(bl.revert_commands())}" if bl and bl.revert_commands() else
                          "; run `kledger audit --blame` to find the edits responsible" if not blame else "")
        )
