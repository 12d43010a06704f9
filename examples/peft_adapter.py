"""Serve an edit set as a PEFT LoRA adapter: 20 edits on a base model, exported both ways, and the
adapter (loaded with peft on the base model) must give the same greedy answers on the 20 edit
prompts as the full export. Prints the adapter's size next to the full model's.

    python examples/peft_adapter.py [MODEL] [WORKDIR] [--method M]

MODEL defaults to the offline alias smollm2-135m; the method to UltraEdit (kledger's default, the
token-gated memory, is not a weight delta: no adapter can hold it); MEMIT and AlphaEdit work too
(their deltas are low-rank as well).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

FACTS = [  # counterfactual: (prompt, new target, subject)
    ("The Eiffel Tower is located in the city of", " Rome", "The Eiffel Tower"),
    ("The Colosseum is located in the city of", " Paris", "The Colosseum"),
    ("Big Ben is located in the city of", " Berlin", "Big Ben"),
    ("The Brandenburg Gate is located in the city of", " Madrid", "The Brandenburg Gate"),
    ("The Statue of Liberty is located in the city of", " Tokyo", "The Statue of Liberty"),
    ("The capital of France is", " Lisbon", "France"),
    ("The capital of Germany is", " Vienna", "Germany"),
    ("The capital of Italy is", " Athens", "Italy"),
    ("The capital of Spain is", " Dublin", "Spain"),
    ("The capital of Japan is", " Seoul", "Japan"),
    ("Steve Jobs founded the company", " Microsoft", "Steve Jobs"),
    ("Bill Gates founded the company", " Apple", "Bill Gates"),
    ("The mother tongue of Danielle Darrieux is", " English", "Danielle Darrieux"),
    ("The river Nile flows through", " England", "The river Nile"),
    ("The river Thames flows through", " Egypt", "The river Thames"),
    ("Albert Einstein was born in the country of", " Canada", "Albert Einstein"),
    ("Wolfgang Amadeus Mozart was a famous", " painter", "Wolfgang Amadeus Mozart"),
    ("Pablo Picasso was a famous", " composer", "Pablo Picasso"),
    ("The official language of Brazil is", " German", "Brazil"),
    ("The currency of the United Kingdom is the", " yen", "the United Kingdom"),
]


def kledger(*args: str, cwd: Path) -> str:
    proc = subprocess.run([sys.executable, "-m", "kledger.cli.main", *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"kledger {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.stdout


def folder_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default="smollm2-135m")
    ap.add_argument("work", nargs="?", default=None)
    ap.add_argument("--method", default="ultraedit")
    ap.add_argument("-n", type=int, default=20)
    a = ap.parse_args()
    work = Path(a.work or tempfile.mkdtemp(prefix="kledger-peft-"))
    work.mkdir(parents=True, exist_ok=True)
    facts = FACTS[: a.n]
    records = [{"prompt": p, "target_new": t, "subject": s} for p, t, s in facts]
    (work / "facts.json").write_text(json.dumps(records))
    print(f"== working in {work}")
    kledger("init", "--model", a.model, cwd=work)
    kledger("add", "--from-file", "facts.json", "-q", *(["--method", a.method] if a.method else []), cwd=work)
    kledger("export", "full", cwd=work)
    out = json.loads(kledger("export", "adapter", "--format", "peft", "--json", cwd=work))
    print(f"adapter: {len(out['modules'])} modules, ranks {sorted({m['rank'] for m in out['modules'].values()})},"
          f" max relative error {out['max_rel_error']}")

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(work / "full"))

    def greedy(model, prompt: str, n: int = 4) -> str:
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            gen = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=tok.eos_token_id)
        return tok.decode(gen[0, ids.shape[1]:])

    full = AutoModelForCausalLM.from_pretrained(str(work / "full"), dtype=torch.float32).eval()
    answers_full = [greedy(full, p) for p, _, _ in facts]
    del full
    base_path = json.loads((work / "adapter" / "kledger.json").read_text())["base_model"]["path"]
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32).eval()
    served = PeftModel.from_pretrained(base, str(work / "adapter")).eval()
    answers_adapter = [greedy(served, p) for p, _, _ in facts]
    same = sum(x == y for x, y in zip(answers_full, answers_adapter))
    hits = sum(y.startswith(t) or y.lstrip().startswith(t.strip()) for y, (_, t, _) in zip(answers_adapter, facts))
    for (p, t, _), x, y in zip(facts, answers_full, answers_adapter):
        print(f"{'=' if x == y else '≠'} {p!r}: full {x!r} | adapter {y!r} (target {t!r})")
    ad, fu = (work / "adapter" / "adapter_model.safetensors").stat().st_size, folder_bytes(work / "full")
    print(f"same greedy answers: {same}/{len(facts)}; adapter answers the new target first on {hits}/{len(facts)}")
    print(f"sizes: adapter_model.safetensors {ad / 1e6:.2f} MB, full export {fu / 1e6:.1f} MB ({fu / ad:.0f}x)")
    print("== peft adapter ok" if same == len(facts) else "== peft adapter MISMATCH")
    sys.exit(0 if same == len(facts) else 1)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
