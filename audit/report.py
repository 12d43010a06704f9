"""Audit reports people can read: ``index.html`` plus one PNG per metric (matplotlib, Agg).

Everything is read back from the ledger, so a report can be rebuilt at any time: the audit events
of a version's history (function-level figures over the event sequence) and the ``drift`` figures
that every ``add`` event records (weight-level figures per edit). Edits are marked on the x axis
(the event sequence number), reverts in red; thresholds are drawn as dashed lines; blamed edits
get a labelled red line. The "worst edits" table names the edits with the largest jumps in top
singular value and the largest deltas, the edits the latest audit found lost, and blame culprits.
"""

from __future__ import annotations

import html
import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from kledger.audit import events as E
from kledger.audit.thresholds import BASE_FIGURES, DEFAULT_THRESHOLDS, THRESHOLDS
from kledger.ledger.records import DELTA_EVENT_TYPES, Event

log = logging.getLogger(__name__)

_PLOTTED = tuple(THRESHOLDS)


def history(ledger, version: Event) -> dict[str, Any]:
    """Events of ``version``'s history: model events, and the audits of versions in it."""
    anc = ledger.ancestors(version)
    model_events = [e for e in ledger.events(newest_first=False) if e.id in anc and e.type != "audit"]
    audits, probes_sha = E.history(ledger, "audit", anc), None
    if audits:  # only audits on the same probe set as the latest are comparable
        probes_sha = audits[-1].config.get("probes")
        audits = [a for a in audits if a.config.get("probes") == probes_sha]
    blames = E.history(ledger, "blame", anc)
    seq_of = {e.id: e.seq for e in model_events}
    return {"events": model_events, "audits": audits, "blames": blames, "probes": probes_sha, "seq_of": seq_of}


def edit_drift_rows(events: Sequence[Event]) -> list[dict[str, Any]]:
    """One row per add event with recorded drift: the largest figures over its tensors, and the
    jump it caused in each tensor's cumulative drift and top singular value."""
    last: dict[str, dict[str, float]] = {}
    rows = []
    for ev in events:
        drift = (ev.metrics or {}).get("drift") if isinstance(ev.metrics, Mapping) else None
        if ev.type not in DELTA_EVENT_TYPES or not isinstance(drift, Mapping) or not drift:
            continue
        best: dict[str, Any] = {"id": ev.id, "seq": ev.seq, "describe": ev.describe().split(" ", 1)[-1].strip(),
                                "tensors": len(drift),
                                "delta_fro": 0.0, "cum_rel": 0.0, "sv_growth": 0.0, "sv_jump": 0.0, "tensor": None}
        for name, f in drift.items():
            prev = last.get(name, {"cum_rel": 0.0, "sv_growth": 1.0})
            jump = f.get("sv_growth", 1.0) - prev["sv_growth"]
            if jump >= best["sv_jump"] or best["tensor"] is None:
                best["sv_jump"], best["tensor"] = jump, name
            best["delta_fro"] = max(best["delta_fro"], f.get("delta_fro", 0.0))
            best["cum_rel"] = max(best["cum_rel"], f.get("cum_rel", 0.0))
            best["sv_growth"] = max(best["sv_growth"], f.get("sv_growth", 0.0))
            last[name] = {"cum_rel": f.get("cum_rel", 0.0), "sv_growth": f.get("sv_growth", 1.0)}
        rows.append(best)
    return rows


def tensor_series(events: Sequence[Event], top: int = 8) -> dict[str, dict[str, list]]:
    """Per edited tensor, its drift figures at each edit that touched it (the ``top`` tensors with
    the largest final top-singular-value growth), extended to the last edit."""
    series: dict[str, dict[str, list]] = {}
    last_seq = None
    for ev in events:
        drift = (ev.metrics or {}).get("drift") if isinstance(ev.metrics, Mapping) else None
        if ev.type not in DELTA_EVENT_TYPES or not isinstance(drift, Mapping):
            continue
        last_seq = ev.seq
        for name, f in drift.items():
            s = series.setdefault(name, {"x": [], "cum_rel": [], "sv_growth": []})
            s["x"].append(ev.seq)
            s["cum_rel"].append(f.get("cum_rel"))
            s["sv_growth"].append(f.get("sv_growth"))
    for s in series.values():
        if last_seq is not None and s["x"][-1] != last_seq:
            for k in ("cum_rel", "sv_growth"):
                s[k].append(s[k][-1])
            s["x"].append(last_seq)
    keep = sorted(series, key=lambda n: -(series[n]["sv_growth"][-1] or 0))[:top]
    return {n: series[n] for n in keep}


def _plot(path: Path, title: str, ylabel: str, series: Mapping[str, tuple[list, list]], marks: Mapping[str, Any],
          threshold: float | None = None, logy: bool = False, scatter: bool = False, steps: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.4), dpi=100)
    for x in marks.get("adds", []):
        ax.axvline(x, color="0.85", lw=0.5, zorder=0)
    for x in marks.get("reverts", []):
        ax.axvline(x, color="tab:red", lw=0.8, ls=":", zorder=0)
    for label, (xs, ys) in series.items():
        pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
        if not pts:
            continue
        px, py = zip(*pts)
        if scatter:
            ax.scatter(px, py, s=8, label=label)
        elif steps:
            ax.step(px, py, where="post", lw=1.2, label=label)
        else:
            ax.plot(px, py, marker="o", ms=3, lw=1.2, label=label)
    if threshold is not None:
        ax.axhline(threshold, color="tab:red", ls="--", lw=1, label=f"threshold {threshold:g}")
    for x, name in marks.get("culprits", []):
        ax.axvline(x, color="tab:red", lw=1.5)
        ax.annotate(f"blamed {name}", (x, 1), xycoords=("data", "axes fraction"), rotation=90, va="top",
                    ha="right", fontsize=7, color="tab:red")
    if logy:
        ax.set_yscale("log")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("event sequence number (grey: edits, red dotted: reverts)", fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    if series or threshold is not None:
        handles, labels = ax.get_legend_handles_labels()
        if handles:
            ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}"
    return html.escape(str(v))


def write_report(ledger, out_dir: str | os.PathLike, version: Event, *, current: Mapping[str, Any] | None = None,
                 blame: Mapping[str, Any] | None = None, thresholds: Mapping[str, float | None] | None = None,
                 previous: Mapping[str, Any] | None = None) -> Path:
    """Write ``out_dir/index.html`` and its PNGs for ``version``; returns the HTML path.

    ``current``: the JSON of the audit just run (else the latest recorded audit of the history);
    ``blame``: a ``BlameResult.to_json()`` (else the latest recorded blame of the history);
    ``previous``: metrics of the audit before ``current`` (else the last but one recorded).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    h = history(ledger, version)
    events, audits = h["events"], h["audits"]
    thresholds = dict(DEFAULT_THRESHOLDS if thresholds is None else thresholds)
    if current is None and audits:
        a = audits[-1]
        current = {"metrics": a.metrics, "crossed": a.metrics.get("crossed", []), "healthy": a.metrics.get("healthy"),
                   "version": a.config.get("version")}
    if blame is None and h["blames"]:
        blame = h["blames"][-1].metrics
    seq_of = h["seq_of"]
    marks: dict[str, Any] = {
        "adds": [e.seq for e in events if e.type in DELTA_EVENT_TYPES],
        "reverts": [e.seq for e in events if e.type == "revert"],
        "culprits": [(seq_of.get(c["id"], c.get("seq")), c["id"]) for c in (blame or {}).get("culprits", [])],
    }
    pngs: list[tuple[str, str]] = []
    xs = [seq_of.get(a.config.get("version"), a.seq) for a in audits]
    for name in _PLOTTED:
        ys = [(a.metrics or {}).get(name) for a in audits]
        if not any(y is not None for y in ys):
            continue
        f = f"{name}.png"
        _plot(out / f, f"{name}: {THRESHOLDS[name]}", name, {"audits": (xs, ys)}, marks, thresholds.get(name))
        pngs.append((f, name))
    rows = edit_drift_rows(events)
    if rows:
        ex = [r["seq"] for r in rows]
        _plot(out / "edit_delta_fro.png", "per edit: largest ||dW||_F over its tensors", "||dW||_F",
              {"edits": (ex, [r["delta_fro"] for r in rows])}, marks, logy=True, scatter=True)
        pngs.append(("edit_delta_fro.png", "per-edit delta norm"))
        ts = tensor_series(events)
        short = {n: n.replace(".weight", "").replace("model.", "").replace("transformer.", "") for n in ts}
        _plot(out / "edit_weight_rel.png", "per edited tensor: ||W - W0||_F / ||W0||_F after each edit", "weight_rel",
              {short[n]: (v["x"], v["cum_rel"]) for n, v in ts.items()}, marks, thresholds.get("weight_rel"),
              steps=True)
        pngs.append(("edit_weight_rel.png", "cumulative relative weight change per tensor"))
        _plot(out / "edit_sv_growth.png", "per edited tensor: sigma1(W)/sigma1(W0) after each edit", "sv_growth",
              {short[n]: (v["x"], v["sv_growth"]) for n, v in ts.items()}, marks, thresholds.get("sv_growth"),
              steps=True)
        pngs.append(("edit_sv_growth.png", "top singular value growth per tensor"))
    worst_sv = sorted(rows, key=lambda r: -r["sv_jump"])[:5]
    worst_fro = sorted(rows, key=lambda r: -r["delta_fro"])[:5]
    active = {e.id for e in ledger.active(version)}

    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>kledger audit {version.id}</title>",
             "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
             "font-size:90%;text-align:left}.bad{color:#b00;font-weight:bold}.ok{color:#070}"
             "img{max-width:100%;display:block;margin:1em 0}code{background:#f4f4f4}</style></head><body>"]
    status = "no audit recorded"
    if current is not None:
        status = ("<span class='ok'>HEALTHY</span>" if current.get("healthy")
                  else f"<span class='bad'>THRESHOLD CROSSED: {html.escape(', '.join(current.get('crossed', [])))}</span>")
    parts.append(f"<h1>kledger audit</h1><p>Ledger <code>{html.escape(str(ledger.root))}</code>, version "
                 f"<code>{version.id}</code> (event {version.seq}), {len(active)} active edits, base model "
                 f"<code>{html.escape(str(ledger.base_model().get('spec')))}</code>. Status: {status}.</p>")
    if current is not None:
        m = current.get("metrics", {})
        prev = previous if previous is not None else (audits[-2].metrics if len(audits) >= 2 else None)
        parts.append("<h2>Figures</h2><table><tr><th>metric</th><th>meaning</th><th>base</th><th>previous audit</th>"
                     "<th>now</th><th>threshold</th></tr>")
        for name in THRESHOLDS:
            cls = " class='bad'" if name in current.get("crossed", []) else ""
            parts.append(f"<tr><td{cls}>{name}</td><td>{html.escape(THRESHOLDS[name])}</td><td>{_fmt(BASE_FIGURES[name])}"
                         f"</td><td>{_fmt((prev or {}).get(name))}</td><td{cls}>{_fmt(m.get(name))}</td>"
                         f"<td>{'≤ ' + _fmt(thresholds.get(name)) if thresholds.get(name) is not None else 'off'}"
                         "</td></tr>")
        parts.append("</table>")
        lost = (m.get("lost_edits") or [])[:20]
        if lost:
            parts.append(f"<p>Edits no longer holding ({len(m.get('lost_edits') or [])}; first 20): "
                         + ", ".join(f"<code>{i}</code>" for i in lost) + "</p>")
    if blame and blame.get("culprits"):
        parts.append("<h2>Blame</h2><table><tr><th>event</th><th>what</th><th>fix</th></tr>")
        for c in blame["culprits"]:
            parts.append(f"<tr><td class='bad'><code>{c['id']}</code> (event {c.get('seq')})</td>"
                         f"<td>{html.escape(c.get('describe', '').split(' ', 1)[-1].strip())}</td><td><code>{html.escape(c.get('revert') or c.get('note', ''))}"
                         "</code></td></tr>")
        parts.append("</table>")
        parts.append(f"<p>After reverting: {'within thresholds' if blame.get('fixed') else 'still crossing'}"
                     f" ({len(blame.get('steps', []))} bisection steps).</p>")
    if rows:
        parts.append("<h2>Worst edits</h2><p>By jump in top singular value of an edited tensor:</p><table>"
                     "<tr><th>event</th><th>what</th><th>tensor</th><th>sv jump</th><th>||dW||_F</th><th>active</th></tr>")
        for r in worst_sv:
            parts.append(f"<tr><td><code>{r['id']}</code></td><td>{html.escape(r['describe'])}</td><td>"
                         f"{html.escape(str(r['tensor']))}</td><td>{_fmt(r['sv_jump'])}</td><td>{_fmt(r['delta_fro'])}"
                         f"</td><td>{'yes' if r['id'] in active else 'reverted'}</td></tr>")
        parts.append("</table><p>By delta norm:</p><table><tr><th>event</th><th>what</th><th>||dW||_F</th><th>active</th></tr>")
        for r in worst_fro:
            parts.append(f"<tr><td><code>{r['id']}</code></td><td>{html.escape(r['describe'])}</td><td>"
                         f"{_fmt(r['delta_fro'])}</td><td>{'yes' if r['id'] in active else 'reverted'}</td></tr>")
        parts.append("</table>")
    parts.append(f"<h2>Over the event sequence</h2><p>{len(audits)} audits on probe set "
                 f"<code>{(h['probes'] or 'none')[:16]}</code>, {len(rows)} edits with recorded drift.</p>")
    for f, name in pngs:
        parts.append(f"<h3>{html.escape(name)}</h3><img src='{f}' alt='{html.escape(name)}'>")
    parts.append("<h2>Audits</h2><table><tr><th>event</th><th>version</th><th>active edits</th><th>status</th>"
                 + "".join(f"<th>{n}</th>" for n in _PLOTTED) + "</tr>")
    for a in audits[-50:]:
        mm = a.metrics or {}
        st = "ok" if mm.get("healthy") else "crossed " + ", ".join(mm.get("crossed", []))
        parts.append(f"<tr><td><code>{a.id}</code></td><td><code>{a.config.get('version')}</code></td>"
                     f"<td>{_fmt(mm.get('active_edits'))}</td><td>{html.escape(st)}</td>"
                     + "".join(f"<td>{_fmt(mm.get(n))}</td>" for n in _PLOTTED) + "</tr>")
    parts.append("</table></body></html>")
    index = out / "index.html"
    index.write_text("\n".join(parts), encoding="utf-8")
    (out / "report.json").write_text(json.dumps({"version": version.id, "current": current, "blame": blame,
                                                 "worst_edits": worst_sv, "audits": [a.id for a in audits]},
                                                indent=2, default=str) + "\n")
    return index
