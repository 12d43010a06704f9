"""Drift over long edit sequences on smollm2-135m, audits every K edits, and blame of a planted
destructive edit. Every audit goes through the real command (``kledger audit --json``, in
process), so the figures and times are what a user gets.

    # 1. sequential edits from CounterFact, auditing every 25 (resumable; --time-limit stops adding)
    python bench/drift.py sequence --workdir /tmp/drift-kne --n 500 --every 25 --method kne
    # 2. a destructive edit planted at a random position among the first 200 good edits of run 1
    python bench/drift.py blame --source /tmp/drift-kne --workdir /tmp/drift-blame --good 200
    # 3. audit time against the number of active edits (the run's deltas replayed, cycled)
    python bench/drift.py timing --source /tmp/drift-kne --workdir /tmp/drift-timing --sizes 100,250,500
    # 4. tables and plot
    python bench/drift.py write --runs /tmp/drift-kne --blame /tmp/drift-blame --timing /tmp/drift-timing \\
        --out bench/results/drift.md --plot bench/results/drift.png

Each phase appends JSON lines to WORKDIR/results.jsonl. ``--threads`` (default 1) sets torch's
intra-op threads: on the shared 2-core machine one thread measured ~10x faster than two.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
import sys
import time
from pathlib import Path

import torch

DATA = Path("/work/shared/data/counterfact-600.json")
MODEL = "smollm2-135m"


def _log(workdir: Path, row: dict) -> None:
    row = {"t": time.time(), **row}
    with open(workdir / "results.jsonl", "a") as fh:
        fh.write(json.dumps(row) + "\n")
    print(json.dumps(row)[:400], flush=True)


def _rows(workdir: Path) -> list[dict]:
    p = Path(workdir) / "results.jsonl"
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def _audit(ledger_dir: Path, blame: bool = False, report: Path | None = None
           ) -> tuple[int, dict | None, float, str]:
    """``kledger audit --json`` as a library call: (exit code, the command's JSON, wall s, error)."""
    from kledger import Workspace, run_audit
    from kledger.audit.thresholds import stored_thresholds
    from kledger.ledger.errors import KledgerError
    from kledger.ledger.store import Ledger

    t0 = time.perf_counter()
    try:
        ledger = Ledger.open(ledger_dir)
        model, tok, _ = Workspace(ledger).load_base()
        run = run_audit(ledger, model, tok, ledger.head(), stored_thresholds(ledger)[0], blame=blame,
                        report_dir=report, load_s=time.perf_counter() - t0)
        return (0 if run.healthy else 3), run.to_json(), time.perf_counter() - t0, ""
    except KledgerError as exc:
        return exc.exit_code, None, time.perf_counter() - t0, str(exc)


def _audit_row(code: int, data: dict | None, wall: float, err: str) -> dict:
    if data is None:
        return {"exit": code, "error": err.strip()[-500:], "wall_s": round(wall, 2)}
    m = data["metrics"]
    keep = ("ppl", "ppl_ratio", "kl", "kl_p90", "retention", "retention_drop", "edit_retention",
            "edit_retention_drop", "edit_token_acc", "weight_rel", "sv_growth", "edited_tensors", "active_edits",
            "seconds", "total_s")
    return {"exit": code, "event": data["event"], "healthy": data["healthy"], "crossed": data["crossed"],
            "wall_s": round(wall, 2), **{k: m.get(k) for k in keep}}


# --- phase 1 --------------------------------------------------------------------------------
def sequence(args) -> None:
    from kledger import Workspace, init_ledger
    from kledger.ledger.records import load_requests
    from kledger.ledger.store import Ledger

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    if (work / ".kledger").is_dir():
        ledger = Ledger(work / ".kledger")
    else:
        ledger = init_ledger(work, MODEL)
        import hashlib

        import kledger.editors.registry as reg

        import importlib

        mod = importlib.import_module(str(reg.EDITORS.get(args.method, "")).split(":")[0])
        src = Path(mod.__file__)  # a package (kne/): the sources of all its modules
        files = sorted(src.parent.glob("*.py")) if src.name == "__init__.py" else [src]
        _log(work, {"phase": "config", "method": args.method, "n": args.n, "every": args.every, "batch_size": args.batch_size,
                    "threads": torch.get_num_threads(), "sets": args.sets,
                    "editor_sha256": hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()[:12]})
    done = len([e for e in ledger.events(types=["add"])])
    reqs = load_requests(str(args.data))[: args.n]
    if done == 0 and not any(r.get("phase") == "audit" for r in _rows(work)):
        _log(work, {"phase": "audit", "edits": 0, **_audit_row(*_audit(work))})
    ws = Workspace(ledger, device="cpu")
    overrides = dict(s.split("=", 1) for s in args.sets)
    t_start = time.perf_counter()
    i = done
    while i < len(reqs):
        if args.time_limit and time.perf_counter() - t_start > args.time_limit:
            _log(work, {"phase": "stopped", "edits": i, "reason": f"time limit {args.time_limit} s"})
            if i % args.every:
                _log(work, {"phase": "audit", "edits": i, **_audit_row(*_audit(work))})
            return
        # a batch never straddles an audit point, so audits land exactly every ``every`` edits
        size = min(args.batch_size, len(reqs) - i, args.every - i % args.every)
        t0 = time.perf_counter()
        evs = ws.add(reqs[i : i + size], method=args.method, overrides=overrides, batch_size=size)
        wall = (time.perf_counter() - t0) / len(evs)
        for ev in evs:
            i += 1
            m = ev.metrics or {}
            drift = m.get("drift") or {}
            _log(work, {"phase": "edit", "edits": i, "id": ev.id, "time_s": m.get("time_s"),
                        "drift_s": m.get("drift_s"), "wall_s": round(wall, 3), "tensors": len(drift),
                        "delta_fro": max((f["delta_fro"] for f in drift.values()), default=None),
                        "cum_rel_max": max((f["cum_rel"] for f in drift.values()), default=None),
                        "sv_growth_max": max((f["sv_growth"] for f in drift.values()), default=None),
                        "success": m.get("success", m.get("efficacy")),
                        "pulse_kl": (m.get("pulse") or {}).get("kl"),
                        "pulse_retention_drop": (m.get("pulse") or {}).get("retention_drop"),
                        "pulse_crossed": (m.get("pulse") or {}).get("crossed"),
                        "pulse_s": (m.get("pulse") or {}).get("seconds")})
        if i % args.every == 0 or i == len(reqs):
            _log(work, {"phase": "audit", "edits": i, **_audit_row(*_audit(work))})


# --- phase 2 --------------------------------------------------------------------------------
def _replay(ledger, items, planted: tuple[int, object] | None = None) -> dict:
    """Append ``items`` (request, method, config, ensemble, metrics, delta) as add events with
    freshly computed drift, inserting ``planted = (position, Delta)`` as an add event there."""
    from kledger.editors.models import resolve_model_path
    from kledger.audit.drift import DriftTracker, SafetensorsBase

    files = SafetensorsBase(resolve_model_path(MODEL))
    tracker = DriftTracker(lambda n: files.get(n))
    cur: dict[str, torch.Tensor] = {}
    out = {}

    def add(request, method, config, ensemble, metrics, delta, message=None):
        for n in delta.tensors:
            if n not in cur:
                cur[n] = files.get(n).clone()
        m = dict(metrics or {})
        m["drift"] = tracker.measure(cur, delta)
        ev = ledger.append("add", request=request, method=method, config=config, ensemble=ensemble, metrics=m,
                           delta=delta, message=message)
        for n, td in delta.tensors.items():
            cur[n] += td.to_dense().view(cur[n].shape)
        return ev

    for i, item in enumerate(items):
        if planted is not None and i == planted[0]:
            out["planted"] = add({"prompt": "kledger planted destructive edit", "target_new": " !"}, "planted",
                                 {"kind": "huge-norm rank-1 delta"}, {}, {}, planted[1], "planted destructive edit")
        add(*item)
    if planted is not None and planted[0] >= len(items):
        out["planted"] = add({"prompt": "kledger planted destructive edit", "target_new": " !"}, "planted",
                             {"kind": "huge-norm rank-1 delta"}, {}, {}, planted[1], "planted destructive edit")
    return out


def _synthetic_goods(n: int, scale: float, seed: int, data: str) -> list[tuple]:
    """Benign stand-ins for edits: rank-2 random deltas with ‖Δ‖_F = scale·‖W‖_F on a random MLP
    down_proj, each with a CounterFact request (they do not make the fact hold)."""
    from kledger.editors.models import resolve_model_path
    from kledger.ledger.deltas import Delta, LowRankDelta
    from kledger.audit.drift import SafetensorsBase
    from kledger.ledger.records import load_requests

    files = SafetensorsBase(resolve_model_path(MODEL))
    reqs = load_requests(data)
    g = torch.Generator().manual_seed(seed + 1)
    rng = random.Random(seed + 1)
    out = []
    for i in range(n):
        name = f"model.layers.{rng.randrange(30)}.mlp.down_proj.weight"
        w = files.get(name)
        u, v = torch.randn(w.shape[0], 2, generator=g), torch.randn(w.shape[1], 2, generator=g)
        k = scale * float(w.norm()) / float((u @ v.T).norm())
        out.append((reqs[i % len(reqs)].to_json(), "synthetic", {"scale": scale}, {}, {},
                    Delta({name: LowRankDelta(tuple(w.shape), u * k, v)})))
    return out


def _destructive(name: str, scale: float, seed: int):
    from kledger.editors.models import resolve_model_path
    from kledger.ledger.deltas import Delta, LowRankDelta
    from kledger.audit.drift import SafetensorsBase

    w = SafetensorsBase(resolve_model_path(MODEL)).get(name)
    g = torch.Generator().manual_seed(seed)
    u, v = torch.randn(w.shape[0], 1, generator=g), torch.randn(w.shape[1], 1, generator=g)
    k = scale * float(w.norm()) / float((u @ v.T).norm())
    return Delta({name: LowRankDelta(tuple(w.shape), u * k, v)})


def blame(args) -> None:
    from kledger import init_ledger
    from kledger import audit as A
    from kledger.ledger.store import Ledger

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    if args.source == "synthetic":
        items = _synthetic_goods(args.good, args.good_scale, args.seed, args.data)
    else:
        src = Ledger(Path(args.source) / ".kledger")
        goods = src.active("HEAD")[: args.good]
        if len(goods) < args.good:
            print(f"note: the source has only {len(goods)} active edits; using them all", flush=True)
        items = [(e.request, e.method, e.config, e.ensemble,
                  {k: v for k, v in (e.metrics or {}).items() if k != "drift"}, src.load_delta(e)) for e in goods]
    ledger = init_ledger(work, MODEL)
    if args.source == "synthetic":  # stand-in edits never make their facts hold
        A.record_thresholds(ledger, {"edit_retention_drop": None})
    rng = random.Random(args.seed)
    pos = rng.randrange(len(items) + 1)
    bad = _destructive(args.tensor, args.scale, args.seed)
    t0 = time.perf_counter()
    planted = _replay(ledger, items, (pos, bad))["planted"]
    _log(work, {"phase": "planted", "id": planted.id, "position": pos, "good": len(items), "tensor": args.tensor,
                "scale": args.scale, "source": args.source, "good_scale": args.good_scale if args.source == "synthetic"
                else None, "replay_s": round(time.perf_counter() - t0, 2)})
    code, data, wall, err = _audit(work)
    _log(work, {"phase": "audit", "what": "with planted edit", **_audit_row(code, data, wall, err)})
    code, data, wall, err = _audit(work, blame=True, report=work / "report")
    row = _audit_row(code, data, wall, err)
    bl = (data or {}).get("blame") or {}
    culprits = [c["id"] for c in bl.get("culprits", [])]
    _log(work, {"phase": "blame", "exit": code, "culprits": culprits, "named_planted": culprits[:1] == [planted.id],
                "revert_commands": bl.get("revert_commands"), "fixed": bl.get("fixed"),
                "steps": len(bl.get("steps", [])), "blame_s": bl.get("seconds"), "wall_s": row.get("wall_s")})
    for cmd in bl.get("revert_commands") or []:
        from kledger.ledger.errors import KledgerError
        from kledger.ledger.store import Ledger

        try:
            Ledger.open(work).revert(cmd.split()[-1])
            c, e = 0, ""
        except KledgerError as exc:
            c, e = exc.exit_code, str(exc)
        _log(work, {"phase": "revert", "cmd": cmd, "exit": c, "error": e.strip()[-300:]})
    code, data, wall, err = _audit(work, report=work / "report-after")
    _log(work, {"phase": "audit", "what": "after the suggested revert", **_audit_row(code, data, wall, err)})


# --- phase 3 --------------------------------------------------------------------------------
def timing(args) -> None:
    from kledger import init_ledger
    from kledger.ledger.records import load_requests

    from kledger.ledger.store import Ledger

    src = Ledger(Path(args.source) / ".kledger")
    pool = src.active("HEAD")
    reqs = load_requests(str(args.data))
    for size in [int(s) for s in args.sizes.split(",")]:
        work = Path(args.workdir) / f"n{size}"
        work.mkdir(parents=True, exist_ok=True)
        ledger = init_ledger(work, MODEL)
        for i in range(size):
            ev = pool[i % len(pool)]
            r = reqs[i % len(reqs)].to_json()
            ledger.append("add", request=r, method=ev.method, config=ev.config, metrics={}, delta=src.load_delta(ev),
                          message="timing replay")
        # the first audit ever builds the default probe set (then cached for every ledger of the
        # model): time a steady-state audit
        code, data, wall, err = _audit(work)
        if data is not None and data["probes"].get("recorded_now") and size == int(args.sizes.split(",")[0]):
            code, data, wall, err = _audit(work)
        _log(Path(args.workdir), {"phase": "timing", "active_edits": size, "distinct_deltas": min(size, len(pool)),
                                  **_audit_row(code, data, wall, err)})


# --- phase 4 --------------------------------------------------------------------------------
def _run_section(workdir: Path) -> tuple[list[str], dict]:
    rows = _rows(workdir)
    cfg = next((r for r in rows if r["phase"] == "config"), {})
    edits = [r for r in rows if r["phase"] == "edit"]
    audits = [r for r in rows if r["phase"] == "audit" and "ppl_ratio" in r]
    stopped = next((r for r in rows if r["phase"] == "stopped"), None)
    lines: list[str] = []
    if not edits:
        return lines, {"cfg": cfg, "edits": edits, "audits": audits}
    ts = [e["time_s"] for e in edits if e.get("time_s") is not None]
    ds = [e["drift_s"] for e in edits if e.get("drift_s") is not None]
    ratios = sorted(d / t for d, t in zip(ds, ts) if t)
    lines += [f"## Sequence `{workdir.name}`: {len(edits)} sequential {cfg.get('method')} edits "
              f"(editor source sha256 {cfg.get('editor_sha256')}; {cfg.get('n')} planned"
              f"{'; stopped: ' + stopped['reason'] if stopped else ''})", "",
              f"* edit time: mean {statistics.mean(ts):.2f} s, median {statistics.median(ts):.2f} s; every edit "
              f"touched {statistics.mean(e['tensors'] for e in edits):.0f} tensors on average;",
              f"* per-edit drift figures (recorded with the edit): mean {statistics.mean(ds) * 1000:.0f} ms ="
              f" {100 * statistics.mean(ds) / statistics.mean(ts):.1f} % of the mean edit time; per edit the median"
              f" ratio is {100 * statistics.median(ratios):.1f} %, the largest {100 * ratios[-1]:.1f} %, above 10 % for"
              f" {sum(r > 0.1 for r in ratios)} edits (the run's first edit: {100 * ds[0] / ts[0]:.0f} %);", ""]
    lines += ["| edits | ppl ratio | KL | retention drop | edit retention drop | max ‖W−W₀‖/‖W₀‖ | max σ₁ growth | "
              "status | audit s |", "|---|---|---|---|---|---|---|---|---|"]
    for a in audits:
        lines.append(f"| {a['edits']} | {a['ppl_ratio']} | {a['kl']} | {a['retention_drop']} | "
                     f"{a['edit_retention_drop']} | {a['weight_rel']} | {a['sv_growth']} | "
                     f"{'ok' if a['healthy'] else 'CROSSED ' + ', '.join(a['crossed'])} | {a['total_s']} |")
    first = next((a for a in audits if not a["healthy"]), None)
    ret10 = next((a for a in audits if (a.get("retention_drop") or 0) > 0.10), None)
    lines += ["", "First flagged audit: " + (f"after {first['edits']} edits ({', '.join(first['crossed'])}), "
                                              f"retention drop then {first['retention_drop']}" if first else
                                              "none (no threshold crossed in this run)") + ". "
              "First audit with retention drop > 10 points: "
              + (f"after {ret10['edits']} edits." if ret10 else "none in this run."), ""]
    pulsed = [e for e in edits if e.get("pulse_kl") is not None]
    if pulsed:
        warn = next((e for e in pulsed if e.get("pulse_crossed")), None)
        ps = [e["pulse_s"] for e in pulsed if e.get("pulse_s") is not None]
        before = [a for a in audits if warn and a["edits"] <= warn["edits"]]
        lines += ["Per-edit pulse (KL and retention drop on a fixed subset of the probes, recorded with every edit, "
                  f"mean {statistics.mean(ps):.2f} s per edit): "
                  + (f"first warning at edit {warn['edits']} ({', '.join(warn['pulse_crossed'])}; pulse KL "
                     f"{warn['pulse_kl']}, pulse retention drop {warn['pulse_retention_drop']}); the last audit before "
                     f"it (edit {before[-1]['edits'] if before else 0}) measured retention drop "
                     f"{before[-1]['retention_drop'] if before else 0.0}." if warn else "no warning in this run."), ""]
    return lines, {"cfg": cfg, "edits": edits, "audits": audits, "name": workdir.name}


def _blame_section(workdir: Path) -> list[str]:
    brows = _rows(workdir)
    p = next((r for r in brows if r["phase"] == "planted"), {})
    b = next((r for r in brows if r["phase"] == "blame"), {})
    before = next((r for r in brows if r.get("what") == "with planted edit"), {})
    after = next((r for r in brows if r.get("what") == "after the suggested revert"), {})
    return [f"## Blame `{workdir.name}`: one destructive edit among good ones", "",
            f"A rank-1 delta with ‖Δ‖_F = {p.get('scale')}·‖W‖_F on `{p.get('tensor')}` planted at position "
            f"{p.get('position')} (seeded random) among {p.get('good')} good edits: "
            + ("benign stand-ins (rank-2 random deltas with ‖Δ‖_F = "
               f"{p.get('good_scale')}·‖W‖_F on random MLP down_proj layers, each with a CounterFact request; "
               "they do not make their facts hold, so `edit_retention_drop` is off in this ledger)"
               if p.get("source") == "synthetic" else
               f"the first KNE edits of the run in `{p.get('source')}`, replayed with their recorded deltas") + ".", "",
            f"* audit with it: exit {before.get('exit')}, crossed {before.get('crossed')}, KL {before.get('kl')},"
            f" ppl ratio {before.get('ppl_ratio')}, retention drop {before.get('retention_drop')}"
            f" ({before.get('total_s')} s);",
            f"* `kledger audit --blame`: named {b.get('culprits')}: planted edit "
            f"{'named' if b.get('named_planted') else 'NOT named'} ({p.get('id')}); {b.get('steps')} bisection"
            f" steps, {b.get('blame_s')} s; suggested {b.get('revert_commands')};",
            f"* after running the suggested revert: audit exit {after.get('exit')}, "
            f"{'healthy' if after.get('healthy') else 'crossed ' + str(after.get('crossed'))}, KL {after.get('kl')},"
            f" ppl ratio {after.get('ppl_ratio')}, retention drop {after.get('retention_drop')}.", ""]


def write(args) -> None:
    from kledger.audit.thresholds import DEFAULT_THRESHOLDS as TH

    runs = [Path(r) for r in args.runs.split(",") if r]
    blames = [Path(r) for r in (args.blame or "").split(",") if r]
    trows = [r for r in (_rows(Path(args.timing)) if args.timing else []) if r["phase"] == "timing"]
    lines = ["# Drift over sequential edits, audits and blame (smollm2-135m)", "",
             "Reproduce (every phase is described in the docstring of `bench/drift.py`):", "", "```",
             "# third session: 500 MEMIT edits in sequential batches of 10; KNE with sink_positions=1 (time limit)",
             "python bench/drift.py sequence --workdir /tmp/drift-memit500 --n 500 --every 25 --method memit"
             " --batch-size 10",
             "python bench/drift.py sequence --workdir /tmp/drift-kne-sink --n 500 --every 25 --method kne"
             " --time-limit 4800",
             "# second session: per-edit pulse recorded; stopped by hand after the 25-edit audit",
             "python bench/drift.py sequence --workdir /tmp/drift-kne-subj --n 50 --every 25 --method kne",
             "python bench/drift.py sequence --workdir /tmp/drift-kne-pulse --n 100 --every 25 --method kne"
             " --set grad_positions=all",
             "python bench/drift.py sequence --workdir /tmp/drift-memit --n 500 --every 25 --method memit --batch-size 25",
             "# first session: two earlier versions of editors/kne.py, 30-minute limit, no pulse",
             "python bench/drift.py sequence --workdir /tmp/drift-kne --n 500 --every 25 --method kne --time-limit 1800",
             "python bench/drift.py blame --source synthetic --workdir /tmp/drift-blame-syn2 --good 200",
             "python bench/drift.py timing --source /tmp/drift-kne --workdir /tmp/drift-timing2 --sizes 500",
             f"python bench/drift.py write --runs {args.runs} --blame {args.blame} --timing {args.timing}"
             f" --notes {args.notes} --out {args.out} --plot {args.plot}", "```", "",
             "Machine: 2 CPU cores shared with other jobs of the same kind all the time (load average 4–5 in the "
             "third session, 3–7 in the second, 6–20 in the first), one torch thread per process. Thresholds (defaults): "
             f"{', '.join(f'{k} ≤ {v}' for k, v in TH.items() if v is not None)}.", ""]
    if args.notes and Path(args.notes).is_file():
        lines += [Path(args.notes).read_text().rstrip(), ""]
    datas = []
    for r in runs:
        sec, data = _run_section(r)
        lines += sec
        datas.append(data)
    for b in blames:
        lines += _blame_section(b)
    if trows:
        lines += ["## Audit time against active edits", "",
                  "A full `kledger audit --json` in process (load the base, materialise every active delta, measure,"
                  " append), on ledgers of N add events whose deltas are the first KNE run's, cycled (timing only: "
                  "the figures of these ledgers mean nothing). Steady-state audits: the probe set was already built.", "",
                  "| active edits | distinct deltas | total s | load s | texts s | KL prompts s | facts s | edits s | "
                  "weights s |", "|---|---|---|---|---|---|---|---|---|"]
        for t in trows:
            s = t.get("seconds") or {}
            lines.append(f"| {t['active_edits']} | {t['distinct_deltas']} | {t.get('total_s')} | {s.get('load')} | "
                         f"{s.get('texts')} | {s.get('prompts')} | {s.get('facts')} | {s.get('edits')} | "
                         f"{s.get('weights')} |")
        lines.append("")
    Path(args.out).write_text("\n".join(lines) + "\n")
    if args.plot:
        _plot(datas, trows, Path(args.plot))


def _plot(datas: list[dict], trows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kledger.audit.thresholds import DEFAULT_THRESHOLDS as TH

    panels = [("ppl_ratio", "perplexity ratio (log)", True), ("kl", "KL vs base, nats", False),
              ("retention_drop", "retention drop (known facts)", False),
              ("edit_retention_drop", "edit retention drop", False),
              ("weight_rel", "max ||W-W0||/||W0|| (per edit: line)", False),
              ("sv_growth", "max sigma1 growth (per edit: line)", False)]
    n = len(panels) + (1 if trows else 0)
    fig, axes = plt.subplots((n + 1) // 2, 2, figsize=(11, 2.9 * ((n + 1) // 2)), dpi=100)
    axes = axes.ravel()
    per_edit = {"weight_rel": "cum_rel_max", "sv_growth": "sv_growth_max"}
    for ax, (k, title, logy) in zip(axes, panels):
        for i, d in enumerate(datas):
            label = f"{d.get('name')} ({d['cfg'].get('method')} {d['cfg'].get('editor_sha256')})"
            color = f"C{i}"
            if d["audits"]:
                ax.plot([a["edits"] for a in d["audits"]], [a.get(k) for a in d["audits"]], marker="o", ms=4,
                        color=color, ls="none" if k in per_edit else "-", label=label + " audits")
            if k in per_edit and d["edits"]:
                ax.plot([e["edits"] for e in d["edits"]], [e.get(per_edit[k]) for e in d["edits"]], lw=1,
                        color=color, alpha=0.7)
            pulsed = [e for e in d["edits"] if e.get("pulse_" + k) is not None]
            if pulsed:  # the per-edit pulse (a fixed subset of the probes), thin line
                ax.plot([e["edits"] for e in pulsed], [e["pulse_" + k] for e in pulsed], lw=0.8, color=color,
                        alpha=0.6, label=label + " per-edit pulse")
                first = next((e["edits"] for e in pulsed if e.get("pulse_crossed")), None)
                if first is not None:
                    ax.axvline(first, color=color, lw=0.8, ls="--")
            bad = [a["edits"] for a in d["audits"] if not a["healthy"]]
            if bad:
                ax.axvline(bad[0], color=color, lw=0.8, ls=":")
        if TH.get(k) is not None:
            ax.axhline(TH[k], color="tab:red", ls="--", lw=1, label=f"threshold {TH[k]}")
        if logy:
            ax.set_yscale("log")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("edits (dotted: first flagged audit; dashed: first pulse warning)", fontsize=8)
        ax.legend(fontsize=6)
    if trows:
        ax = axes[len(panels)]
        ax.plot([t["active_edits"] for t in trows], [t.get("total_s") for t in trows], marker="o")
        ax.axhline(300, color="tab:red", ls="--", lw=1, label="5 min")
        ax.set_ylim(bottom=0)
        ax.set_title("audit time (s) vs active edits", fontsize=9)
        ax.set_xlabel("active edits", fontsize=8)
        ax.legend(fontsize=7)
    for ax in axes[n:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    sub = ap.add_subparsers(dest="phase", required=True)
    s = sub.add_parser("sequence")
    s.add_argument("--workdir", required=True)
    s.add_argument("--n", type=int, default=500)
    s.add_argument("--every", type=int, default=25)
    s.add_argument("--method", default="kne")
    s.add_argument("--batch-size", type=int, default=1, help="facts per editor call (one event per fact)")
    s.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    s.add_argument("--data", default=str(DATA))
    s.add_argument("--time-limit", type=float, default=0, help="stop adding after this many seconds")
    b = sub.add_parser("blame")
    b.add_argument("--source", required=True, help="a sequence run's workdir, or 'synthetic'")
    b.add_argument("--workdir", required=True)
    b.add_argument("--good", type=int, default=200)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--tensor", default="model.layers.12.mlp.down_proj.weight")
    b.add_argument("--scale", type=float, default=1.0, help="planted ||dW||_F / ||W||_F")
    b.add_argument("--good-scale", type=float, default=0.002, help="synthetic good edits' ||dW||_F / ||W||_F")
    b.add_argument("--data", default=str(DATA))
    t = sub.add_parser("timing")
    t.add_argument("--source", required=True)
    t.add_argument("--workdir", required=True)
    t.add_argument("--sizes", default="100,250,500")
    t.add_argument("--data", default=str(DATA))
    w = sub.add_parser("write")
    w.add_argument("--runs", required=True, help="sequence workdirs, comma-separated")
    w.add_argument("--blame", help="blame workdirs, comma-separated")
    w.add_argument("--timing")
    w.add_argument("--out", default="bench/results/drift.md")
    w.add_argument("--plot", default="bench/results/drift.png")
    w.add_argument("--notes", default="bench/results/drift-notes.md", help="findings inserted after the header")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    {"sequence": sequence, "blame": blame, "timing": timing, "write": write}[args.phase](args)


if __name__ == "__main__":
    main()
