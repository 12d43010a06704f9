"""How many of the stream's CounterFact "rephrase" prompts keep the edited relation's wording (lifelong.md): the
count whose text holds the prompt's last two words (the subject removed), and 20 drawn at random (seed 1) to read.

    python bench/cf_rephrase_kinds.py
"""
import json
import os
import random
from pathlib import Path

DATA = Path(os.environ.get("KLEDGER_DATA", Path(__file__).resolve().parent.parent.parent / "shared" / "data"))
records = json.loads((DATA / "counterfact-600.json").read_text())
kept = 0
for r in records:
    words = r["prompt"].replace(r["subject"], "").strip(" ,").split()
    kept += " ".join(words[-2:]).lower() in r["rephrase_prompt"].lower()
print(f"{kept} of {len(records)} rephrase prompts hold their prompt's last two words")
random.seed(1)
for i in sorted(random.sample(range(len(records)), 20)):
    r = records[i]
    print(i, "|", r["prompt"], "|", " ".join(r["rephrase_prompt"].split())[-80:], "|", r["target_new"])
