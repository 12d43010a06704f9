"""Render ``bench/results/model_scale.jsonl`` (rows of ``bench/model_scale.py run``) as Markdown."""

from __future__ import annotations

GIB = 2**30
COMMAND_CPU = "python bench/model_scale.py run --device cpu --shapes 0.5b 1b --threads 2"
COMMAND_GPU = ("bash bench/gpu_run.sh   # on the GPU machine: model_scale.py run --device cuda --shapes 8b 1b 0.5b"
               " --budget-s 330, then SHAPES=0.5b for the shape the budget left out")


def _latest(rows: list[dict]) -> dict[tuple, dict]:
    out: dict[tuple, dict] = {}
    for r in rows:
        out[(r["shape"], r["device"].split(":")[0], r["op"])] = r
    return out


def _gib(n) -> str:
    return "" if n is None else f"{n / GIB:.2f}"


def _mib_gib(n) -> str:
    return "" if n is None else f"{n / 1024:.2f}"


def _line(r: dict, weights: float | None, stats: float | None) -> str:
    if r.get("skipped") or r.get("error"):
        why = r.get("skipped") or f"error: {r['error']}"
        return f"| {r['shape']} | {r['device']} | {r['op']} | {why} | | | | | |"
    # rows of the first GPU call: materialise/export held the working model beside their own (†)
    twice = "materialise_only_s" in r or (r["op"] == "export" and "load_s" in r)
    seconds = r.get("materialise_only_s", r.get("seconds", ""))
    peak = r.get("peak_gpu_mib") if r["device"].startswith("cuda") else r.get("peak_rss_mib")
    peak_gib = None if peak is None else peak / 1024
    ratio = ""
    if peak_gib is not None and weights:
        budget = 1.5 * weights + (stats or 0.0)
        ratio = f"{peak_gib / weights:.2f}× ({'≤' if peak_gib <= budget else '>'} 1.5×W+S = {budget:.2f})"
    extra = r.get("steps") if r["op"].startswith("edit:") else ""
    mark = " †" if twice else ""
    return (f"| {r['shape']} | {r['device']} | {r['op']} | {seconds} | {extra if extra is not None else ''} |"
            f" {'' if peak_gib is None else f'{peak_gib:.2f}'}{mark} | {ratio} | {r.get('load_s', '')} |"
            f" {r.get('load_before', '')} |")


def render(rows: list[dict]) -> str:
    latest = _latest(rows)
    out = ["# Model scale: one edit per method on random-weight Llama shapes in bfloat16", "",
           "Produced by `bench/model_scale.py` (see its docstring); rows in `model_scale.jsonl`.", "",
           f"- CPU: `{COMMAND_CPU}`", f"- GPU: `{COMMAND_GPU}`", "",
           "Peak: VmHWM of the operation's own process on CPU, `torch.cuda.max_memory_allocated` on GPU"
           " (GiB, the loaded model included). W = the bfloat16 weight bytes, S = the five edited layers'"
           " in×in key statistics at the float64 precision of the solves (since this session they are held"
           " in float32 between solves, half of S); the issue's CPU bar is peak ≤ 1.5×W + S. Seconds exclude loading"
           " the model (`load s`); `edit:` rows have a warm statistics cache (the `stats` row is the cold"
           " pass); steps = v* steps (MEMIT/AlphaEdit) or turns (UltraEdit; random weights never reach the"
           " target, so every turn is usually taken; 0 turns: the random model already ranks the target first"
           " and nothing is written). `materialise` is the compositor alone on a freshly loaded base; `export`"
           " loads the base itself and writes the folder (its seconds include that load).", "",
           "† measured by the first version of the worker, which had loaded the working model before the"
           " operation's own copy: the peak holds two models (subtract one W); the seconds are the operation's.",
           ""]
    devices = sorted({(r["device"].split(":")[0], r.get("device_name", "")) for r in rows})
    for dev, name in devices:
        out.append(f"## {dev}: {name}")
        out.append("")
        out.append("| shape | device | op | seconds | steps | peak GiB | peak/W | load s | load avg |")
        out.append("|---|---|---|---|---|---|---|---|---|")
        for key, r in latest.items():
            if key[1] != dev:
                continue
            w = next((x.get("weight_bytes") for k, x in latest.items() if k[:2] == key[:2] and x.get("weight_bytes")), None)
            s = next((x.get("stats_bytes") for k, x in latest.items() if k[:2] == key[:2] and x.get("stats_bytes")), None)
            out.append(_line(r, None if w is None else w / GIB, None if s is None else s / GIB))
        out.append("")
    if not any(d == "cuda" for d, _ in devices):
        out += ["## cuda", "", "GPU rows: **not measured** (no GPU machine was available when this file was written).", ""]
    return "\n".join(out)
