"""Table and plot for bench/lifelong.py: rows of every run → lifelong.jsonl, lifelong_table.md, lifelong.png."""

from __future__ import annotations

import json
from pathlib import Path

METRICS = (
    ("efficacy", "efficacy (all edits so far)"),
    ("paraphrase", "paraphrase (all edits so far)"),
    ("neighbourhood_kept", "neighbourhood top-1 kept"),
    ("retention_drop", "known-fact retention drop"),
    ("ppl_ratio", "perplexity ratio"),
    ("kl", "KL to base (nats)"),
    ("weight_rel", "max ‖W−W₀‖/‖W₀‖"),
    ("edit_s", "seconds per edit"),
    ("audit_s", "seconds per audit"),
)


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def collect(names: list[str], runs: Path) -> list[dict]:
    rows = []
    dirs = [runs / n for n in names] if names else sorted(p for p in runs.iterdir() if (p / "rows.jsonl").exists())
    for d in dirs:
        p = d / "rows.jsonl"
        if p.exists():
            rows += [json.loads(x) for x in p.read_text().splitlines() if x.strip()]
    return rows


def table(rows: list[dict]) -> str:
    head = "| run | method | config | edits | " + " | ".join(k for k, _ in METRICS) + " | load |"
    sep = "|" + "---|" * (len(METRICS) + 5)
    lines = [head, sep]
    for r in rows:
        cfg = " ".join(r.get("set") or []) or "defaults"
        lines.append(f"| {r['name']} | {r['method']} | {cfg} | {r['edits']} | "
                     + " | ".join(_fmt(r.get(k)) for k, _ in METRICS) + f" | {_fmt(r.get('load'))} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["name"] for r in rows))
    fig, axes = plt.subplots(3, 3, figsize=(13, 10))
    for ax, (key, title) in zip(axes.flat, METRICS):
        for i, n in enumerate(names):
            pts = [(r["edits"], r.get(key)) for r in rows if r["name"] == n and r.get(key) is not None]
            if pts:  # the colour cycle has 10 colours: runs past the tenth are dashed with square markers
                ax.plot(*zip(*pts), marker="os"[i // 10 % 2], ms=3, ls=("-", "--")[i // 10 % 2], color=f"C{i % 10}",
                        label=n)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("sequential edits", fontsize=8)
        ax.grid(alpha=0.3)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 0.82, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(names: list[str], runs: Path, results: Path) -> None:
    """Rows of the named runs (every run under ``runs`` if none named): a run whose folder is not on this
    machine keeps the rows the committed ``lifelong.jsonl`` holds for it (runs are long; machines change)."""
    rows = collect(names, runs)
    kept = results / "lifelong.jsonl"
    if names and kept.exists():
        have = {r["name"] for r in rows}
        old = [json.loads(x) for x in kept.read_text().splitlines() if x.strip()]
        rows += [r for r in old if r["name"] in set(names) - have]
        order = {n: i for i, n in enumerate(names)}
        rows.sort(key=lambda r: (order.get(r["name"], len(order)), r["edits"]))
    results.mkdir(parents=True, exist_ok=True)
    (results / "lifelong.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (results / "lifelong_table.md").write_text(table(rows) + "\n")
    plot(rows, results / "lifelong.png")


def run_table(rows: list[dict]) -> str:
    """One run's rows as lifelong.md's per-run table (all-edit, CounterFact and zsRE columns)."""
    head = ("| edits | efficacy (all) | paraphrase (all) | CF efficacy / paraphrase | zsRE efficacy / paraphrase |"
            " neighbourhood kept | retention drop | ppl ratio | KL | max ‖W−W₀‖/‖W₀‖ | s/edit (cumulative) |"
            " s/audit | load |")
    lines = [head, "|" + "---|" * 13]
    for r in sorted(rows, key=lambda r: r["edits"]):
        cf = f"{_fmt(r.get('cf_efficacy'))} / {_fmt(r.get('cf_paraphrase'))}"
        zs = f"{_fmt(r.get('zsre_efficacy'))} / {_fmt(r.get('zsre_paraphrase'))}"
        cells = [str(r["edits"]), _fmt(r.get("efficacy")), _fmt(r.get("paraphrase")), cf, zs,
                 _fmt(r.get("neighbourhood_kept")), _fmt(r.get("retention_drop")), _fmt(r.get("ppl_ratio")),
                 _fmt(r.get("kl")), _fmt(r.get("weight_rel")), f"{r.get('edit_s', 0):.2f}",
                 f"{r.get('audit_s', 0):.1f}", f"{r.get('load', 0):.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def trial_table(rows: list[dict]) -> str:
    """Short trials (one audit each): config, quality and cost side by side."""
    keys = ("efficacy", "paraphrase", "neighbourhood_kept", "retention_drop", "kl", "ppl_ratio", "weight_rel",
            "edit_retention", "edit_s", "load")
    lines = ["| run | stream records | config (`--set`) | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 3)]
    for r in rows:
        cfg = " ".join(r.get("set") or []) or "defaults"
        start = r.get("start") or 0  # --start: 0–599 CounterFact, 600– zsRE
        span = f"{start}–{start + r['edits'] - 1} ({'zsRE' if start >= 600 else 'CF'})"
        lines.append(f"| {r['name']} | {span} | {cfg} | " + " | ".join(_fmt(r.get(k)) for k in keys) + " |")
    return "\n".join(lines)
