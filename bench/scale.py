"""Scale benchmark: synthetic ledgers of 1k / 10k / 100k events with smollm2-135m delta shapes.

Events alternate between two kinds, with the shapes of SmolLM2-135M (30 layers, hidden 576,
MLP 1536); values are random (only sizes and counts matter here):

* KNE-like: one ``SparseDelta`` per touched MLP matrix, 1000–5000 entries in all over 1–3
  gate/up/down_proj matrices of random layers;
* MEMIT-like: rank-1 ``LowRankDelta`` factors on ``mlp.down_proj`` (576×1536) of 5 layers (4–8).

Ledgers are built through the public API (``Ledger.append_many``, one transaction per 2,000
events) under ``--workdir`` (default ``/tmp/kledger-scale``, not the repository). Then, each in a
fresh subprocess so peak memory (VmHWM) is its own:

* ``append``: ``Ledger.append`` of one KNE-like edit (object write with fsync + row), 100 times;
* ``log -n 20`` / ``show ID`` (recent and middle event) / ``status`` through the CLI (click's
  CliRunner in one process: the command itself, after imports; 100 runs each, median and p99)
  and as whole ``kledger`` processes (imports included; 20 runs each);
* ``verify``: the full chain and every object, rows/s;
* ``materialise``: HEAD onto a loaded base model vs. the time to load the base model itself;
* bytes on disk per event.

Usage::

    python bench/scale.py --sizes 1000 10000 100000 --out bench/results/scale.json   # build + measure
    python bench/scale.py --sizes 1000 10000 100000 --skip-build --ops cli process verify_chain verify append \
        --out bench/results/scale.json        # measure the existing ledgers again (no 20-minute rebuild)
    python bench/scale.py --out bench/results/scale.json --md /tmp/table.md   # render the table

Every op records the 1-minute load average before and after it (``OP_loadavg``): on a shared
2-core machine, latencies mean little without it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

LAYERS, HIDDEN, MLP = 30, 576, 1536
MEMIT_LAYERS = (4, 5, 6, 7, 8)
SHAPES = {"gate_proj": (MLP, HIDDEN), "up_proj": (MLP, HIDDEN), "down_proj": (HIDDEN, MLP)}


def synthetic_delta(i: int, g):
    import torch

    from kledger.ledger.deltas import Delta, LowRankDelta, SparseDelta

    if i % 2 == 0:  # KNE-like sparse
        total = int(torch.randint(1000, 5001, (1,), generator=g))
        k = int(torch.randint(1, 4, (1,), generator=g))
        tensors = {}
        for j in range(k):
            layer = int(torch.randint(0, LAYERS, (1,), generator=g))
            kind = ("gate_proj", "up_proj", "down_proj")[int(torch.randint(0, 3, (1,), generator=g))]
            name = f"model.layers.{layer}.mlp.{kind}.weight"
            shape = SHAPES[kind]
            n = total // k
            idx = torch.unique(torch.randint(0, shape[0] * shape[1], (n,), generator=g))
            tensors[name] = SparseDelta(shape, idx, torch.randn(idx.numel(), generator=g) * 1e-3)
        return Delta(tensors), "kne"
    tensors = {
        f"model.layers.{l}.mlp.down_proj.weight": LowRankDelta(
            (HIDDEN, MLP), torch.randn(HIDDEN, 1, generator=g) * 1e-2, torch.randn(MLP, 1, generator=g) * 1e-2)
        for l in MEMIT_LAYERS
    }
    return Delta(tensors), "memit"


def _item(i: int, g) -> dict:
    d, method = synthetic_delta(i, g)
    req = {"prompt": f"Subject {i} is located in", "subject": f"Subject {i}", "target_new": f" City{i % 997}",
           "target_true": None, "rephrase_prompts": [], "locality_prompts": [], "locality_answers": [],
           "case_id": str(i)}
    return {"type": "add", "request": req, "method": method, "config": {"synthetic": True},
            "ensemble": {"size": sum(getattr(t, "nnz", 0) for t in d.tensors.values())},
            "metrics": {"efficacy": 1.0, "time_s": 0.0}, "delta": d.to_bytes()}


def build(root: Path, n: int, chunk: int = 2000) -> dict:
    import torch

    from kledger import init_ledger
    from kledger.ledger.store import Ledger

    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    ledger = init_ledger(root, "smollm2-135m")
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    gen = 0.0
    for start in range(0, n, chunk):
        t1 = time.perf_counter()
        items = [_item(i, g) for i in range(start, min(n, start + chunk))]
        gen += time.perf_counter() - t1
        ledger.append_many(items)
        print(f"  built {min(n, start + chunk)}/{n} events ({time.perf_counter() - t0:.0f} s)", file=sys.stderr,
              flush=True)
    total = time.perf_counter() - t0
    return {"events": Ledger(ledger.root).count(), "build_s": round(total, 1), "generate_s": round(gen, 1),
            "append_many_per_event_ms": round((total - gen) / n * 1000, 3)}


def disk_bytes(root: Path) -> int:
    """Objects + DuckDB file (cache/, e.g. snapshots, is derived data and not counted)."""
    k = root / ".kledger"
    return sum(p.stat().st_size for p in (k / "objects").rglob("*") if p.is_file()) + (k / "ledger.duckdb").stat().st_size


# --------------------------------------------------------------------------------------------
# measurements, each run in its own process (``python bench/scale.py --op NAME --root DIR``)

def _pct(ts: list[float], q: float) -> float:
    ts = sorted(ts)
    return ts[min(len(ts) - 1, int(q * len(ts)))]


def _summary(name: str, ts: list[float]) -> dict:
    return {f"{name}_ms": round(statistics.median(ts) * 1000, 1), f"{name}_p99_ms": round(_pct(ts, 0.99) * 1000, 1),
            f"{name}_reps": len(ts)}


def op_cli(root: Path, reps: int = 100) -> dict:
    """The commands through click's CliRunner in this process (imports already paid)."""
    from click.testing import CliRunner

    from kledger.cli.main import cli
    from kledger.ledger.store import Ledger

    ledger = Ledger(root / ".kledger")
    mid = ledger.get_seq(ledger.count() // 2).id
    recent = ledger.get_seq(ledger.count() - 5).id
    runner = CliRunner()
    out = {}
    for name, args in (("log_n20", ["log", "-n", "20"]), ("show_recent", ["show", recent]), ("show", ["show", mid]),
                       ("status", ["status"])):
        runner.invoke(cli, ["--ledger", str(ledger.root), *args])  # first use: command module import
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            r = runner.invoke(cli, ["--ledger", str(ledger.root), *args])
            ts.append(time.perf_counter() - t)
            assert r.exit_code == 0, r.output
        out.update(_summary(name, ts))
    return out


def kledger_exe() -> str:
    """The console script next to this interpreter (not a pyenv shim, which adds ~0.1 s of bash)."""
    exe = Path(sys.executable).parent / "kledger"
    return str(exe) if exe.exists() else (shutil.which("kledger") or f"{sys.executable} -m kledger.cli.main")


def op_process(root: Path, reps: int = 20) -> dict:
    """Whole ``kledger`` processes: interpreter start, imports and the command."""
    from kledger.ledger.store import Ledger

    ledger = Ledger(root / ".kledger")
    mid = ledger.get_seq(ledger.count() // 2).id
    recent = ledger.get_seq(ledger.count() - 5).id
    exe = kledger_exe()
    out = {"process_exe": exe}
    for name, args in (("version", "--version"), ("log_n20", "log -n 20"), ("show_recent", f"show {recent}"),
                       ("show", f"show {mid}"), ("status", "status"), ("python", None)):
        cmd = (f"{exe} --ledger {ledger.root} {args}" if args else f"{sys.executable} -c pass")
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            subprocess.run(cmd, shell=True, check=True, capture_output=True)
            ts.append(time.perf_counter() - t)
        out.update(_summary(name + "_process", ts))
    return out


def op_append(root: Path, reps: int = 100) -> dict:
    import torch

    from kledger.ledger.store import Ledger

    torch.set_num_threads(1)
    ledger = Ledger(root / ".kledger")
    g = torch.Generator().manual_seed(123)
    items = [_item(2 * i, g) for i in range(reps)]  # deltas made before the clock runs
    ts = []
    for it in items:
        t = time.perf_counter()
        ledger.append("add", request=it["request"], method=it["method"], config=it["config"],
                      ensemble=it["ensemble"], metrics=it["metrics"], delta=it["delta"])
        ts.append(time.perf_counter() - t)
    return {"append_median_ms": round(statistics.median(ts) * 1000, 1),
            "append_p99_ms": round(_pct(ts, 0.99) * 1000, 1), "append_reps": reps}


def op_active(root: Path) -> dict:
    """``Ledger.active("HEAD")`` alone: the list of events materialise reads (3 runs, median)."""
    from kledger.ledger.store import Ledger

    ledger = Ledger(root / ".kledger")
    ts = []
    for _ in range(3):
        t = time.perf_counter()
        n = len(ledger.active("HEAD"))
        ts.append(time.perf_counter() - t)
    return {"active_s": round(statistics.median(ts), 3), "active_events_now": n}


def op_verify(root: Path) -> dict:
    from kledger.ledger.store import Ledger

    rep = Ledger(root / ".kledger").verify()
    assert rep.ok, rep.problem
    return {"verify_rows": rep.rows, "verify_s": round(rep.seconds, 2), "verify_rows_per_s": round(rep.rows / rep.seconds)}


def op_verify_chain(root: Path) -> dict:
    from kledger.ledger.store import Ledger

    rep = Ledger(root / ".kledger").verify(check_objects=False)
    assert rep.ok, rep.problem
    return {"verify_chain_s": round(rep.seconds, 2), "verify_chain_rows_per_s": round(rep.rows / rep.seconds)}


def op_base(root: Path) -> dict:
    from kledger.editors.models import load_model

    load_model("smollm2-135m", "cpu")  # warm the page cache and the fingerprint cache
    ts, touch = [], []
    for _ in range(3):
        t = time.perf_counter()
        model, _, _ = load_model("smollm2-135m", "cpu")
        ts.append(time.perf_counter() - t)
        # transformers memory-maps the weights: reading every parameter once (what the first
        # forward pass does) is part of having the model in memory
        t = time.perf_counter()
        for p in model.parameters():
            float(p.detach().sum())
        touch.append(time.perf_counter() - t + ts[-1])
        del model
    return {"base_load_s": round(statistics.median(ts), 3), "base_load_touch_s": round(statistics.median(touch), 3)}


def op_materialise(root: Path) -> dict:
    from kledger.editors.models import load_model
    from kledger.ledger.compose import materialise
    from kledger.ledger.store import Ledger

    import torch

    from kledger.ledger.deltas import accumulate

    ledger = Ledger(root / ".kledger")
    model, _, _ = load_model("smollm2-135m", "cpu")
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    m = materialise(ledger, model, "HEAD", snapshots=False)
    total = time.perf_counter() - t
    rss = round((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024)
    out = {"materialise_s": round(total, 3), "active_events": len(m.active), "edited_tensors": len(m.tensors),
           "materialise_rss_mb_over_model": rss}
    # where the time goes (the model's pages are resident now)
    t = time.perf_counter()
    active = ledger.active("HEAD")
    out["part_active_s"] = round(time.perf_counter() - t, 3)
    t = time.perf_counter()
    n = 0
    for i in range(0, len(active), 4096):
        n += len(ledger.load_deltas(active[i : i + 4096]))
    out["part_load_deltas_s"] = round(time.perf_counter() - t, 3)
    return out


def op_snapshot(root: Path) -> dict:
    """Periodic snapshots (``compose.DEFAULT_CHUNK`` = 2,048 active events): the first materialise of HEAD
    writes the snapshot of its last whole chunk; a second one, onto a fresh base model, starts
    from it. The two results must be bit for bit equal."""
    import torch

    from kledger.editors.models import load_model
    from kledger.ledger.compose import materialise
    from kledger.ledger.store import Ledger

    ledger = Ledger(root / ".kledger")
    for p in (ledger.cache_dir / "snapshots").glob("*"):
        p.unlink()
    ref, _, _ = load_model("smollm2-135m", "cpu")
    t = time.perf_counter()
    materialise(ledger, ref, "HEAD")  # no snapshot yet: sums everything, writes one
    made = time.perf_counter() - t
    snaps = sorted((ledger.cache_dir / "snapshots").glob("*.safetensors"))
    ts = []
    for _ in range(3):
        model, _, _ = load_model("smollm2-135m", "cpu")
        t = time.perf_counter()
        m = materialise(ledger, model, "HEAD")
        ts.append(time.perf_counter() - t)
    t = time.perf_counter()
    ledger.active("HEAD")
    active_s = time.perf_counter() - t
    same = all(torch.equal(a.detach(), b.detach()) for a, b in zip(model.parameters(), ref.parameters()))
    return {"materialise_first_s": round(made, 3), "snapshot_mb": round(sum(p.stat().st_size for p in snaps) / 2**20),
            "snapshot_events": int(snaps[-1].name.split("-")[0]) if snaps else 0,
            "materialise_with_snapshot_s": round(statistics.median(ts), 3), "snapshot_part_active_s": round(active_s, 3),
            "snapshot_bit_exact": same, "active_events": len(m.active)}


OPS = {"cli": op_cli, "active": op_active, "process": op_process, "append": op_append, "verify": op_verify,
       "verify_chain": op_verify_chain, "base": op_base, "materialise": op_materialise, "snapshot": op_snapshot}


def peak_rss_mb() -> int:
    """This process's peak RSS. VmHWM, not ``ru_maxrss``: Linux carries ``ru_maxrss`` over
    ``fork``+``exec``, so a worker reported at least its parent's RSS (earlier versions of
    bench/results/scale.md did: a 362 MB ``verify`` at 1,000 events was most likely the parent's,
    which had imported torch to build the ledger)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def run_op(name: str, root: Path) -> dict:
    cmd = [sys.executable, __file__, "--op", name, "--root", str(root)]
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if p.returncode != 0:
        raise RuntimeError(f"{name} failed: {p.stderr[-3000:]}")
    res = json.loads(p.stdout.strip().splitlines()[-1])
    return res


def measure(root: Path, ops) -> dict:
    """Run each op in its own process; record the 1-minute load average around each."""
    out = {}
    for name in ops:
        t = time.perf_counter()
        before = os.getloadavg()[0]
        res = run_op(name, root)
        res[f"{name}_loadavg"] = [round(before, 2), round(os.getloadavg()[0], 2)]
        print(f"  {name}: {res} ({time.perf_counter() - t:.0f} s)", file=sys.stderr, flush=True)
        out.update(res)
    return out


ROWS = [
    ("events", "events in the ledger (when last measured)"),
    ("build_s", "build time (append_many, s)"),
    ("append_many_per_event_ms", "bulk append per event (ms, excl. delta generation)"),
    ("disk_bytes_per_event", "bytes on disk per event (objects + DuckDB)"),
    ("db_bytes_per_event", "… of which DuckDB"),
    ("append_median_ms", "`Ledger.append` of one edit, median (ms)"),
    ("append_p99_ms", "`Ledger.append`, p99 (ms)"),
    ("log_n20_ms", "`kledger log -n 20` in-process, median (ms)"),
    ("log_n20_p99_ms", "… p99 (ms)"),
    ("show_recent_ms", "`kledger show ID` (5th newest event) in-process, median (ms)"),
    ("show_recent_p99_ms", "… p99 (ms)"),
    ("show_ms", "`kledger show ID` (middle event) in-process, median (ms)"),
    ("show_p99_ms", "… p99 (ms)"),
    ("status_ms", "`kledger status` in-process, median (ms)"),
    ("status_p99_ms", "… p99 (ms)"),
    ("python_process_ms", "`python -c pass` as a process, median (ms: the interpreter alone)"),
    ("version_process_ms", "`kledger --version` as a process, median (ms)"),
    ("log_n20_process_ms", "`kledger log -n 20` as a process, median (ms)"),
    ("log_n20_process_p99_ms", "… p99 (ms)"),
    ("show_recent_process_ms", "`kledger show ID` (5th newest) as a process, median (ms)"),
    ("show_recent_process_p99_ms", "… p99 (ms)"),
    ("show_process_ms", "`kledger show ID` (middle event) as a process, median (ms)"),
    ("show_process_p99_ms", "… p99 (ms)"),
    ("status_process_ms", "`kledger status` as a process, median (ms)"),
    ("status_process_p99_ms", "… p99 (ms)"),
    ("verify_chain_rows_per_s", "`verify --no-objects` rate (rows/s)"),
    ("verify_chain_peak_rss_mb", "`verify --no-objects` peak RSS of the process (MB)"),
    ("verify_rows_per_s", "`verify` rate, objects included (rows/s)"),
    ("verify_s", "`verify` time (s)"),
    ("verify_peak_rss_mb", "`verify` peak RSS of the process (MB)"),
    ("base_load_s", "base model load, lazy mmap (s)"),
    ("base_load_touch_s", "base model load + reading every weight once (s)"),
    ("materialise_s", "materialise HEAD onto the loaded base (s)"),
    ("part_active_s", "… `Ledger.active` (s)"),
    ("active_s", "`Ledger.active(HEAD)` alone, re-measured after the change (s)"),
    ("part_load_deltas_s", "… reading + decoding the delta objects (s)"),
    ("materialise_rss_mb_over_model", "materialise peak RSS above the loaded model (MB)"),
    ("snapshot_make_s", "make a dense snapshot 500 events behind HEAD (s)"),
    ("snapshot_mb", "snapshot size (MB)"),
    ("materialise_with_snapshot_s", "materialise HEAD with that snapshot (s)"),
    ("snapshot_max_abs_diff", "max abs weight difference, snapshot vs. plain sum"),
]


def write_md(results: dict, path: Path, note: str = "", keys: set[str] | None = None) -> None:
    sizes = sorted(results, key=int)
    lines = ["| measure | " + " | ".join(f"{int(n):,} events" for n in sizes) + " |",
             "|---|" + "---|" * len(sizes)]
    for key, label in ROWS:
        if keys is not None and key not in keys:
            continue
        vals = [results[n].get(key) for n in sizes]
        if all(v is None for v in vals):
            continue
        lines.append(f"| {label} | " + " | ".join("–" if v is None else f"{v:,}" if isinstance(v, int) else f"{v:g}"
                                                   for v in vals) + " |")
    for n in sizes:
        r = results[n]
        if r.get("materialise_s") and r.get("base_load_s"):
            lines.append("")
            lines.append(f"{int(n):,} events: materialise / base load = {r['materialise_s'] / r['base_load_s']:.1f}× "
                         f"(lazy load), {r['materialise_s'] / r.get('base_load_touch_s', r['base_load_s']):.1f}× "
                         "(load + touch)" + (f"; with a snapshot {r['materialise_with_snapshot_s'] / r['base_load_s']:.1f}×"
                                             f" / {r['materialise_with_snapshot_s'] / r.get('base_load_touch_s', 1):.1f}×"
                                             if r.get("materialise_with_snapshot_s") else ""))
    path.write_text(note + "\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="*", default=[1000, 10000])
    ap.add_argument("--workdir", default="/tmp/kledger-scale")
    ap.add_argument("--out", default=None, help="write a JSON of the results here")
    ap.add_argument("--ops", nargs="*", default=["cli", "process", "verify_chain", "verify", "base", "materialise",
                                                  "snapshot", "append"])
    ap.add_argument("--skip-build", action="store_true",
                    help="measure the ledgers already under --workdir (built by an earlier run) without rebuilding")
    ap.add_argument("--md", help="only render the JSON given by --out as a markdown table to this file")
    ap.add_argument("--op")
    ap.add_argument("--root")
    args = ap.parse_args()
    if args.op:  # worker mode
        res = OPS[args.op](Path(args.root))
        res[args.op + "_peak_rss_mb"] = peak_rss_mb()
        print(json.dumps(res))
        return
    results = {}
    if args.out and Path(args.out).exists():
        results = json.loads(Path(args.out).read_text())
    if args.md:
        write_md(results, Path(args.md))
        return
    for n in args.sizes:
        root = Path(args.workdir) / f"n{n}"
        print(f"ledger of {n} events at {root}", file=sys.stderr, flush=True)
        row = dict(results.get(str(n), {}))
        if not args.skip_build:
            row.update(build(root, n))
        elif not (root / ".kledger" / "ledger.duckdb").is_file():
            raise SystemExit(f"--skip-build: expected a ledger at {root}, found none (run without --skip-build)")
        from kledger.ledger.store import Ledger

        events = Ledger(root / ".kledger").count()  # ``append`` runs add 100 events each time
        row["events"] = events
        row["disk_bytes_per_event"] = round(disk_bytes(root) / events)
        row["db_bytes_per_event"] = round((root / ".kledger" / "ledger.duckdb").stat().st_size / events)
        row.update(measure(root, args.ops))
        results[str(n)] = row
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
