"""lifelong.md's suffix-pass timing: the memory's fit of one stream batch (10 records from each START) with the
suffix pass and with full passes, interleaved twice in one process (two threads): time, steps, worst NLL, and the
largest relative difference between the two fits' values.

    python bench/memory_suffix_speed.py 0 600
"""
import sys, time, logging, os, torch, dataclasses
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
import lifelong as L
from kledger.editors.models import load_model
from kledger.editors.memory import MemoryConfig, MemoryEditor, fit_values
from kledger.editors.locate import context_templates
torch.set_num_threads(2)
logging.basicConfig(level=logging.INFO)
model, tok, _ = load_model("smollm2-135m", device="cpu")
items = L.stream(1000)
ed = MemoryEditor(MemoryConfig())
mem = ed.attach(model)
for p in model.parameters(): p.requires_grad_(False)
templates = context_templates(model, tok, 2, 10, 0)
for start in [int(a) for a in sys.argv[1:]]:
    reqs = [r for _, r in items[start:start + 10]]
    res = {}
    for cp in [True, False, True, False]:
        cfg = dataclasses.replace(ed.config, cache_prefix=cp)
        t0 = time.perf_counter()
        f = fit_values(model, tok, mem.path, mem.values.shape[1], reqs, templates, cfg)
        dt = time.perf_counter() - t0
        print(f"start {start} cache_prefix={cp}: {dt:.1f} s, steps {f['steps'].tolist()}, max nll {f['nll'].max():.3f}, load {os.getloadavg()[0]:.2f}", flush=True)
        res[cp] = f
    print("value max rel diff", float(((res[True]['values'] - res[False]['values']).norm(dim=1) / res[False]['values'].norm(dim=1)).max()))
