"""Model-scale benchmark: one edit per method on random-weight Llama shapes in bfloat16.

Shapes (random weights from a config, no download; built once and saved in bfloat16 under
``--workdir``):

* ``0.5b``: hidden 1024, MLP 4096, 24 layers, tied embeddings (≈ 0.5 B parameters);
* ``1b``: Llama-3.2-1B's shape (hidden 2048, MLP 8192, 16 layers, tied; 1.24 B);
* ``8b``: Llama-3-8B's shape (hidden 4096, MLP 14336, 32 layers; 8.03 B).

Vocabulary 128,256 (Llama 3); the tokenizer is SmolLM2's (``--tokenizer``, default the offline
``smollm2-135m`` alias folder), whose ids all fall inside that vocabulary. Per shape a ledger is made
with ``init_ledger(..., dtype="bfloat16")`` and each operation runs in a fresh subprocess, so its
peak memory is its own: **stats** (the one-pass key statistics of the default layers, 8,192 sampled
tokens, cold cache), **edit:METHOD** for MEMIT, AlphaEdit and UltraEdit (``Workspace.add`` of one
fact, statistics cache warm; the seconds are the edit alone), **materialise** (HEAD onto a freshly
loaded base) and **export** (the full model folder). Peak memory is the process's VmHWM on CPU and
``torch.cuda.max_memory_allocated`` on GPU (with the RSS beside it); every row records the load
average. The weights are random, so efficacy means nothing here: only time and memory do.

Usage::

    python bench/model_scale.py run --device cpu --shapes 0.5b 1b            # this CPU
    python bench/model_scale.py run --device cuda --shapes 8b 1b 0.5b --budget-s 420   # one GPU call
    python bench/model_scale.py write                                        # → bench/results/model_scale.md

``run`` appends JSON rows to ``--out`` (default ``bench/results/model_scale.jsonl``); ``write``
renders every row there (the newest per shape, device and operation) into the Markdown table.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
LLAMA3 = dict(vocab_size=128256, max_position_embeddings=2048, rope_theta=500000.0, bos_token_id=1, eos_token_id=2,
              pad_token_id=2)
SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=True),  # a smoke run of the whole script
    "0.5b": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                 num_key_value_heads=4, tie_word_embeddings=True),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, tie_word_embeddings=False),
}
METHODS = ("memit", "alphaedit", "ultraedit")
OPS = ("stats",) + tuple(f"edit:{m}" for m in METHODS) + ("materialise", "export")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
log = logging.getLogger("model_scale")


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _peak(device: str) -> dict:
    """Peak memory so far: VmHWM (MiB) always, plus the CUDA allocator's peak on GPU."""
    out = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                out["peak_rss_mib"] = round(int(line.split()[1]) / 1024)
    except OSError:
        pass
    if device.startswith("cuda"):
        import torch

        out["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
    return out


def tokenizer_dir(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    from kledger.editors.models import resolve_model_path

    return resolve_model_path("smollm2-135m")


def build(shape: str, workdir: Path, device: str, tok_dir: Path) -> tuple[Path, float]:
    """The random bfloat16 model folder of ``shape`` (built once; seconds spent building)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    folder = workdir / "models" / shape
    if (folder / "config.json").is_file():
        return folder, 0.0
    t0 = time.perf_counter()
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    cfg = LlamaConfig(**LLAMA3, **SHAPES[shape])
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(str(tmp))
    for name in TOKENIZER_FILES:
        if (tok_dir / name).is_file():
            shutil.copy(tok_dir / name, tmp / name)
    del model
    os.replace(tmp, folder)
    return folder, time.perf_counter() - t0


def _workspace(ledger_dir: Path, device: str):
    from kledger import Workspace
    from kledger.ledger.store import Ledger

    ws = Workspace(Ledger.open(ledger_dir), device=device)
    ws.pulse = False  # no probe set in these ledgers; only time and memory are measured
    return ws


REQUEST = dict(prompt="The Eiffel Tower is located in the city of", target_new=" Rome", subject="The Eiffel Tower",
               target_true=" Paris")


def worker(args) -> dict:
    """One operation in this process; returns its row (printed as the last line of stdout).

    Exactly one model is loaded: the working model (stats, edits), a fresh base (materialise) or
    the one ``Workspace.export`` loads itself (export: its seconds include that load)."""
    import torch
    torch.set_num_threads(args.threads)
    from kledger.ledger.records import FactRequest

    ws = _workspace(Path(args.ledger), args.device)
    row: dict = {}
    model = None
    if args.op != "export":
        t0 = time.perf_counter()
        model, tok = ws.working() if args.op != "materialise" else ws.load_base()[:2]
        _sync(args.device)
        row["load_s"] = round(time.perf_counter() - t0, 2)
        row["weight_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
        row["dtype"] = str(next(model.parameters()).dtype).replace("torch.", "")
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    if args.op == "stats":
        row.update(_stats(ws, model, tok))
    elif args.op.startswith("edit:"):
        method = args.op.split(":", 1)[1]
        ev = ws.add([FactRequest(**REQUEST)], method=method)[0]
        m = ev.metrics or {}
        row.update(method=method, event=ev.id[:12], metric_time_s=m.get("time_s"),
                   steps=m.get("v_steps") or m.get("turns"), stats_hit=m.get("stats_hit"), drift_s=m.get("drift_s"))
    elif args.op == "materialise":
        from kledger.ledger.compose import materialise

        materialise(ws.ledger, model, "HEAD")
    elif args.op == "export":
        out = Path(args.ledger) / "export"
        ws.export(out, overwrite=True)
        row["export_bytes"] = sum(f.stat().st_size for f in out.iterdir() if f.suffix == ".safetensors")
    else:
        raise SystemExit(f"unknown op {args.op!r}; expected one of {OPS}")
    _sync(args.device)
    row["seconds"] = round(time.perf_counter() - t0, 2)
    row.update(_peak(args.device))
    return row


def _stats(ws, model, tok) -> dict:
    """Cold key statistics of the default layers (what MEMIT/AlphaEdit/UltraEdit read)."""
    from kledger.editors.base import EditContext
    from kledger.editors.locate import default_layers
    from kledger.editors.sites import num_layers
    from kledger.editors.stats import key_covariances

    layers = default_layers(num_layers(model))
    shutil.rmtree(Path(ws.ledger.cache_dir) / "keystats", ignore_errors=True)
    ctx = EditContext(fingerprint=ws.ledger.base_model()["fingerprint"], cache_dir=ws.ledger.cache_dir,
                      history={}, progress=False, seed=0, stats_corpus=None)
    c0, desc = key_covariances(model, tok, layers, ctx, n_tokens=8192, seed=0)
    return {"layers": list(layers), "stats_tokens": desc["tokens"],
            # S: the five in×in statistics at the float64 precision of the solves (held in float32)
            "stats_bytes": sum(c.numel() * 8 for c in c0.values()),
            "stats_held_bytes": sum(c.numel() * c.element_size() for c in c0.values())}


def run(args) -> None:
    import torch

    from kledger import init_ledger

    workdir = Path(args.workdir)
    tok_dir = tokenizer_dir(args.tokenizer)
    device_name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else f"CPU ({os.cpu_count()} cores)"
    t_start = time.perf_counter()
    for shape in args.shapes:
        folder, build_s = build(shape, workdir, args.device, tok_dir)
        ledger_dir = workdir / "ledgers" / f"{shape}-{args.device.replace(':', '')}"
        shutil.rmtree(ledger_dir, ignore_errors=True)
        ledger_dir.mkdir(parents=True)
        t0 = time.perf_counter()
        init_ledger(ledger_dir, str(folder), dtype="bfloat16")
        base = {"shape": shape, "device": args.device, "device_name": device_name, "build_s": round(build_s, 1),
                "init_s": round(time.perf_counter() - t0, 1)}
        for op in args.ops:
            if args.budget_s and time.perf_counter() - t_start > args.budget_s:
                _emit(args.out, {**base, "op": op, "skipped": "time budget spent"})
                continue
            row = _run_op(args, ledger_dir, op)
            _emit(args.out, {**base, "op": op, **row})


def _run_op(args, ledger_dir: Path, op: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "worker", "--ledger", str(ledger_dir),
           "--op", op, "--device", args.device, "--threads", str(args.threads)]
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = round(time.perf_counter() - t0, 1)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout)[-1500:]
        log.error("%s failed (exit %d):\n%s", op, proc.returncode, tail)
        return {"error": tail.strip().splitlines()[-1] if tail.strip() else f"exit {proc.returncode}",
                "wall_s": wall, "load_before": round(load, 2)}
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    row.update(wall_s=wall, load_before=round(load, 2), load_after=round(os.getloadavg()[0], 2), threads=args.threads)
    return row


def _emit(path: str, row: dict) -> None:
    row["at"] = _dt.datetime.now().isoformat(timespec="seconds")
    log.info("%s", json.dumps(row))
    with open(path, "a") as fh:
        fh.write(json.dumps(row) + "\n")


def write(args) -> None:
    from model_scale_report import render  # noqa: PLC0415

    rows = [json.loads(l) for l in Path(args.out).read_text().splitlines() if l.strip()] if Path(args.out).exists() else []
    Path(args.md).write_text(render(rows))
    log.info("wrote %s (%d rows)", args.md, len(rows))


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="build the shapes (once) and measure each operation")
    r.add_argument("--device", default="cpu")
    r.add_argument("--shapes", nargs="+", default=["0.5b", "1b"], choices=sorted(SHAPES))
    r.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS)
    r.add_argument("--workdir", default=os.environ.get("KLEDGER_BENCH_RUNS", "/tmp/kledger-bench") + "/model_scale")
    r.add_argument("--tokenizer", default=None, help="folder with tokenizer.json (default: the smollm2-135m alias)")
    r.add_argument("--out", default=str(RESULTS / "model_scale.jsonl"))
    r.add_argument("--threads", type=int, default=2)
    r.add_argument("--budget-s", type=float, default=0.0, help="skip the remaining operations after this many seconds")
    w = sub.add_parser("worker", help=argparse.SUPPRESS)
    w.add_argument("--ledger", required=True)
    w.add_argument("--op", required=True)
    w.add_argument("--device", default="cpu")
    w.add_argument("--threads", type=int, default=2)
    wr = sub.add_parser("write", help="render the rows into Markdown")
    wr.add_argument("--out", default=str(RESULTS / "model_scale.jsonl"))
    wr.add_argument("--md", default=str(RESULTS / "model_scale.md"))
    args = ap.parse_args()
    if args.cmd == "worker":
        print(json.dumps(worker(args)))
    elif args.cmd == "run":
        run(args)
    else:
        sys.path.insert(0, str(HERE))
        write(args)


if __name__ == "__main__":
    main()
