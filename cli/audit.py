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

from kledger.audit import thresholds as T
from kledger.cli.app import App, pass_app
from kledger.cli.main import cli
from kledger.ledger.errors import AuditThresholdError

def _f(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _table(metrics: Mapping[str, Any], prev: Mapping[str, Any] | None, th: Mapping[str, Any],
           crossed_: list[str]) -> str:
    lines = [f"{'metric':<21}{'base':>9}{'previous':>11}{'now':>11}{'threshold':>12}"]
    for n in T.THRESHOLDS:
        bound = th.get(n)
        flag = "  CROSSED" if n in crossed_ else ""
        lines.append(f"{n:<21}{_f(T.BASE_FIGURES[n]):>9}{_f((prev or {}).get(n)):>11}{_f(metrics.get(n)):>11}"
                     f"{('<= ' + _f(bound)) if bound is not None else 'off':>12}{flag}")
    return "\n".join(lines)


@cli.command()
@click.option("--at", "ref", default="HEAD", show_default=True, help="Version to audit (HEAD, HEAD~N, id, branch).")
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
def audit(app: App, ref, report_dir, blame, max_culprits, probes_file, one_off, persist,
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
    ledger = app.ledger()
    if persist:
        ev = T.record_thresholds(ledger, dict(T.parse_threshold(p) for p in persist))
        th, _ = T.stored_thresholds(ledger)
        app.emit({"event": ev.id, "thresholds": th},
                 f"recorded thresholds in {ev.id}: " + ", ".join(f"{k}={_f(v) if v is not None else 'off'}"
                                                               for k, v in th.items()))
        return
    th, th_ev = T.stored_thresholds(ledger)
    th.update(dict(T.parse_threshold(p) for p in one_off))
    if show_thresholds:
        app.emit({"thresholds": th, "recorded_in": th_ev.id if th_ev else None, "meaning": T.THRESHOLDS},
                 "\n".join(f"{k:<21}{('<= ' + _f(v)) if v is not None else 'off':<10} {T.THRESHOLDS[k]}"
                           for k, v in th.items()))
        return
    from kledger.audit.probes import describe_sources
    from kledger.auditing import run_audit

    t0 = time.perf_counter()
    version = ledger.resolve(ref)
    model, tok, _info = app.load_base(model_spec)
    run = run_audit(ledger, model, tok, version, th, probes_file=probes_file, record=not no_record, blame=blame,
                    max_culprits=max_culprits, report_dir=report_dir, note=app.progress_note,
                    bisect_note=app.progress_note if (app.verbose or app.show_progress) else None,
                    load_s=time.perf_counter() - t0)
    res, bl, metrics, prev = run.result, run.blame, run.metrics, run.previous
    lines = [f"audit of {version.id} ({res.active} active edits) on {describe_sources(run.probes)}"
             f" {run.probes_event.delta_sha256[:12]}: {run.status.upper()}",
             _table(metrics, prev.metrics if prev else None, th, res.crossed)]
    if res.details.get("lost_edits"):
        lines.append(f"edits no longer holding: {len(res.details['lost_edits'])} of {res.metrics.get('edits')}")
    if run.event:
        lines.append(f"recorded as audit event {run.event.id} ({metrics['total_s']:.1f} s)")
    if bl is not None:
        if bl.culprits:
            for c in bl.culprits:
                lines.append(f"blame: {c['describe']}" + (f"\n  fix: {c['revert']}" if c.get("revert") else
                                                         f"\n  note: {c.get('note')}"))
            lines.append("after reverting: " + ("within thresholds" if bl.fixed else "still crossing "
                                                 + ", ".join((bl.after_revert or {}).get("crossed", []))))
        else:
            lines.append("blame: no single event found (the thresholds are crossed from the first event on)")
    if run.report:
        lines.append(f"report: {run.report}")
    app.emit(run.to_json(), "\n".join(lines))
    if not res.healthy:
        raise AuditThresholdError(
            f"audit of {version.id}: expected every figure within its threshold, found {', '.join(res.crossed)}"
            " crossed" + (f"; fix: {'; '.join(bl.revert_commands())}" if bl and bl.revert_commands() else
                          "; run `kledger audit --blame` to find the edits responsible" if not blame else "")
        )
