"""KNE — Knowledge Neuronal Ensemble editing (arXiv 2412.20637).

For each request (prompt x, target tokens y*₁…y*ₛ):

1. **Attribution.** Every entry of every candidate tensor (all MLP weight matrices,
   ``sites.mlp_in`` + ``sites.mlp_out``: Llama gate/up/down_proj, GPT-2 c_fc/c_proj, of the
   candidate layers: by default ``sites.early_window``, the paper's all layers with ``window="all"``)
   gets a score from the gradient of the target's teacher-forced negative log-likelihood ``L``:

   * ``grad_x_weight``: ``|∂L/∂w · w|`` — one backward pass;
   * ``integrated_gradients``: ``|w̄ · (1/m) Σ_{i=1..m} ∂L/∂w (w = (i/m)·w̄)|`` where the path
     scales *all* candidate tensors jointly (one backward per step, ``ig_steps`` = m). The paper
     scales neuron activations one layer at a time (m·L passes); the joint parameter path is the
     workable per-entry reading at m passes and is what is implemented here.

2. **Ensemble.** ``threshold="global"``: one threshold over the pooled scores of all candidate
   entries, keeping the top ``budget`` entries (``count``, or ``fraction`` of all candidate
   entries); the ensemble spans layers. ``threshold="per_layer"``: every layer keeps its own share
   of the budget (its top entries pooled over that layer's candidate tensors).

3. **Edit.** Only ensemble entries are optimised (the gradient is gathered at the ensemble's flat
   indices, so nothing else can move), jointly over the candidate layers with Adam, on
   ``mean teacher-forced NLL`` of the target after the prompt and after each context prefix
   + ``locality_weight`` · KL(unedited ‖ edited) of the next-token distributions at every position
   of a few neutral prompts ("{subject} is a" and fixed generic ones). Stops as soon as every
   target token is the greedy argmax of the plain prompt under teacher forcing with a log-prob
   lead of at least ``stop_margin`` over the runner-up, or after ``max_steps`` updates.

4. Optional ``alpha``: the learned update enters the weights as ``(alpha/√n)·δ`` (n = ensemble
   size), as in the paper. With Adam this is a rescaling of the learning rate by ``alpha/√n``
   (the total update norm then no longer grows with the budget); ``None`` means no scaling.

The delta is one ``SparseDelta`` per touched tensor whose indices ARE the ensemble entries (all
of them, zero-valued ones included), in the parameter's own storage layout (GPT-2 Conv1D
weights are in×out), flat row-major.

Defaults were chosen by measurement on SmolLM2-135M with the first 20 CounterFact records (each
edit computed on the base model, then all 20 deltas applied together); see
``bench/kne_tune.py`` and ``bench/results/kne.md``. The field comments give the reason for each
default.

The method is split along its steps: ``config`` (``KNEConfig``, with the measured reason for each
default), ``ensemble`` (candidate tensors and the ensemble's selection), ``losses`` (the
per-request batch, the loss terms and the optimiser step) and ``editor`` (``KNEEditor``:
attribution, selection, the masked fit, the delta).
"""

from kledger.editors.kne.config import KNEConfig
from kledger.editors.kne.editor import KNEEditor
from kledger.editors.kne.ensemble import candidate_params, select_ensemble

__all__ = ["KNEConfig", "KNEEditor", "candidate_params", "select_ensemble"]
