"""Where a lifelong run's damage to known facts comes from (``python bench/lifelong.py damage NAME``).

On the run's current model, for the known facts of the audit's probe set that it lost (the base's
3-token greedy answer is no longer the greedy answer), two attributions, JSON on stdout:

* ``positions``: how many lost facts are *still lost* when the edited projections' change is applied
  only at some positions of the 3 greedy steps (the base projection's output elsewhere): ``all``,
  ``prompt`` (the prompt's tokens), ``prompt_but_last``, ``last`` (the prompt's last token),
  ``answer`` (the generated tokens). ``none`` is the check (every lost fact holds with no change).
* ``layers``: per edited tensor, how many lost facts hold again when only that tensor is reset to
  the base, and how many are lost with only that tensor edited.
"""

from __future__ import annotations

import json
from typing import Callable

import torch

MODES: dict[str, Callable[[int, int], torch.Tensor]] = {
    "all": lambda T, P: torch.ones(T, dtype=torch.bool),
    "none": lambda T, P: torch.zeros(T, dtype=torch.bool),
    "prompt": lambda T, P: torch.arange(T) < P,
    "prompt_but_last": lambda T, P: torch.arange(T) < P - 1,
    "last": lambda T, P: torch.arange(T) == P - 1,
    "answer": lambda T, P: torch.arange(T) >= P,
}


@torch.no_grad()
def _greedy(model, tok, prompt: str, base_w: dict[str, torch.Tensor], mask_fn, steps: int = 3) -> str:
    """Greedy continuation with each edited module's output = base output outside ``mask_fn``'s positions."""
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    P, new = len(ids), []
    for _ in range(steps):
        m = mask_fn(len(ids), P)

        def hook_for(W):
            def hook(mod, args, output):
                return torch.where(m[None, :, None], output, torch.nn.functional.linear(args[0], W))
            return hook

        handles = [model.get_submodule(n.rsplit(".", 1)[0]).register_forward_hook(hook_for(W)) for n, W in base_w.items()]
        try:
            nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        finally:
            for h in handles:
                h.remove()
        ids.append(nxt)
        new.append(nxt)
    return tok.decode(new)


def damage(ws) -> dict:
    from kledger.audit.figures import answers_hold  # noqa: PLC0415
    from kledger.auditing import probe_set  # noqa: PLC0415

    base, tok, _ = ws.load_base()
    facts = list(probe_set(ws.ledger, base, tok)[0].facts)
    w0 = {n: p.detach().clone() for n, p in base.named_parameters()}
    del base
    model, tok = ws.working()
    params = dict(model.named_parameters())
    edited = {n: params[n].detach().clone() for n in params if n in w0 and not torch.equal(params[n], w0[n])}
    if any(not n.endswith("weight") or params[n].ndim != 2 for n in edited):
        raise SystemExit("damage: expected only edited linear weights")
    lost = [f for f, h in zip(facts, answers_hold(model, tok, facts)) if not h[0]]
    base_w = {n: w0[n] for n in edited}
    positions = {mode: sum(_greedy(model, tok, p, base_w, fn) != a for p, a in lost) for mode, fn in MODES.items()}
    layers = {}
    for n in edited:
        with torch.no_grad():
            params[n].copy_(w0[n])
            back = sum(h[0] for h in answers_hold(model, tok, lost))
            for m in edited:
                params[m].copy_(w0[m])
            params[n].copy_(edited[n])
            alone = sum(not h[0] for h in answers_hold(model, tok, lost))
            for m in edited:
                params[m].copy_(edited[m])
        rel = float((edited[n] - w0[n]).norm() / w0[n].norm())
        layers[n] = {"back_without_it": back, "lost_with_it_alone": alone, "rel_change": round(rel, 4)}
    return {"facts": len(facts), "lost": len(lost), "still_lost_with_change_only_at": positions, "layers": layers}


def main(ws, name: str) -> None:
    print(json.dumps({"run": name, **damage(ws)}))
