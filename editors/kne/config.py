"""KNE's hyper-parameters (see ``kledger.editors.kne`` for the method)."""

from __future__ import annotations

from dataclasses import dataclass

from kledger.ledger.errors import UsageError

ATTRIBUTIONS = ("grad_x_weight", "integrated_gradients")
THRESHOLDS = ("per_layer", "global")
GRAD_POSITIONS = ("all", "subject")
OPTIMIZERS = ("adam", "normalized_gd")
WINDOWS = ("early", "all")


@dataclass(frozen=True)
class KNEConfig:
    """KNE hyper-parameters (defaults measured on SmolLM2-135M / CounterFact, see bench/results/kne.md)."""

    #: "grad_x_weight" (|∂NLL/∂w · w|, one backward) or "integrated_gradients" (ig_steps
    #: backwards). grad×weight: same efficacy/locality as IG at equal budget, ig_steps× cheaper.
    attribution: str = "grad_x_weight"
    #: m, the Riemann steps of the integrated-gradients path (only for attribution="integrated_gradients").
    ig_steps: int = 8
    #: "global" (one threshold over the pooled scores of all layers, as in the paper) or
    #: "per_layer" (each layer keeps its share of the budget).
    threshold: str = "global"
    #: budget as a fraction of all candidate entries (used when ``count`` is None). 0.01 with the early
    #: window since the eleventh session (≈106k entries on SmolLM2-135M, the paper's 0.001 of all layers
    #: gave 77k); 0.001 of the window (10.6k) barely moved the target in 25 steps (kne.md).
    fraction: float = 0.01
    #: budget as an absolute number of entries (overrides ``fraction``).
    count: int | None = None
    #: candidate layers; every MLP weight matrix of these layers is a candidate. None: the ``window``.
    layers: tuple[int, ...] | None = None
    #: the candidate layers when ``layers`` is None: "early" (``sites.early_window``: 4 layers from 10 %
    #: of the depth, UltraEdit's; 3–6 of SmolLM2-135M's 30) or "all" (the paper's). "early" since the
    #: eleventh session: over the first 20 CounterFact records, each edit alone on the base model, the
    #: audit's 183 known facts, one edit cost 0.9 points of retention on average against 5.3 (KL 0.002 vs
    #: 0.017) at efficacy 0.90 vs 0.95 and paraphrase 0.80 vs 0.80; the 20 together 18 points vs 58
    #: (bench/results/kne.md)
    window: str = "early"
    #: layers removed from the candidates (negative = from the end). Default: the last layer, whose
    #: MLP writes straight into the logits: edits there act as global output-token biases
    #: (measured: +2.3 nats NLL on generic text per edit with it, +0.1 without; see kne.md).
    exclude_layers: tuple[int, ...] = (-1,)
    #: Adam learning rate on the ensemble entries.
    lr: float = 0.001
    #: the most Adam updates per request (40 since the early window: its edits took 22.5 on average)
    max_steps: int = 40
    #: stop when every target token leads the runner-up by this much log-probability (nats);
    #: 0 = as soon as the target is the greedy continuation under teacher forcing.
    stop_margin: float = 0.0
    #: weight of the KL locality term.
    locality_weight: float = 1.0
    #: neutral prompts for the KL term ("{subject}" is replaced; skipped when the request has none).
    locality_prompts: tuple[str, ...] = (
        "{subject} is a",
        "The following is a short story about",
        "Here is a list of things to do today:",
    )
    #: extra context prefixes: the target NLL is averaged over the plain prompt and prefix + prompt.
    context_prefixes: tuple[str, ...] = ("Fact: ", "I read that ")
    #: the edit prompt with its subject replaced by each of these is added to the KL term, so that
    #: the relation itself ("... plays the sport") keeps its predictions for other subjects.
    contrast_subjects: tuple[str, ...] = ()
    #: γ: adds γ · mean_c relu(NLL_c(unedited) + contrast_margin − NLL_c) to the loss, NLL_c being
    #: the target's NLL after a contrast prompt: the target must not become likelier for other
    #: subjects. It is active from the first step, so the attribution (the loss gradient at the
    #: unedited weights, ∇NLL − γ·∇NLL_c) already prefers subject-specific entries. 0 = off (paper).
    contrast_weight: float = 0.0
    #: how far (nats per token) the contrast NLL is pushed above its unedited value before the term stops.
    contrast_margin: float = 0.5
    #: the learned update enters as (alpha/√n)·δ; None = no scaling.
    alpha: float | None = None
    #: where the loss gradient may reach the candidate weights: "all" token positions (the paper),
    #: or only the "subject" tokens of each row (elsewhere the candidate layers compute with a
    #: detached copy of their weights, so the ensemble is attributed and fitted through the
    #: subject's representation, as locate-then-edit methods key their edits on the subject; a
    #: request without a subject falls back to "all", recorded in its metrics). Measured on
    #: SmolLM2-135M, CounterFact 0–19, two sequential batches of 10 (bench/results/kne.md):
    #: "subject" kept the locality prompt's top-1 answer for 0.50 of them against 0.15 for "all",
    #: neighbourhood score 0.25 vs 0.15, fluency 4.01 vs 3.84, at efficacy 0.95 vs 1.00 and
    #: paraphrase 0.90 vs 0.85; each forward costs one more matmul per candidate layer.
    grad_positions: str = "subject"
    #: "adam" (the paper; ``lr`` per entry and step: Adam's first step moves every ensemble entry
    #: by ``lr`` whatever its gradient, so entries that barely matter move as much as the ones
    #: that do) or "normalized_gd" (each step moves δ by ``step_norm`` in L2 along −∇: entries move
    #: in proportion to their gradient, the least-norm direction for a given loss decrease).
    #: the first positions of every row never carry the loss gradient to the candidate weights
    #: (they compute with the frozen copy there, see ``grad_positions``). Position 0 is the
    #: attention-sink token: its MLP outputs carry the model's massive activations, which every
    #: later token's attention depends on; an edit that fits through them changes every prompt.
    #: Measured on SmolLM2-135M (bench/results/kne.md): see the field's table there.
    sink_positions: int = 1
    optimizer: str = "adam"
    #: L2 length of one "normalized_gd" step (ignored by "adam").
    step_norm: float = 0.05
    #: norm budget: after every step δ is projected onto the L2 ball of this radius (None = none).
    max_norm: float | None = None

    def __post_init__(self) -> None:
        if self.attribution not in ATTRIBUTIONS:
            raise UsageError(f"attribution: expected one of {ATTRIBUTIONS}, found {self.attribution!r}")
        if self.grad_positions not in GRAD_POSITIONS:
            raise UsageError(f"grad_positions: expected one of {GRAD_POSITIONS}, found {self.grad_positions!r}")
        if self.optimizer not in OPTIMIZERS:
            raise UsageError(f"optimizer: expected one of {OPTIMIZERS}, found {self.optimizer!r}")
        if self.sink_positions < 0:
            raise UsageError(f"sink_positions: expected a non-negative integer, found {self.sink_positions!r}")
        if self.step_norm <= 0:
            raise UsageError(f"step_norm: expected a positive number, found {self.step_norm!r}")
        if self.max_norm is not None and self.max_norm <= 0:
            raise UsageError(f"max_norm: expected a positive number or None, found {self.max_norm!r}")
        if self.window not in WINDOWS:
            raise UsageError(f"window: expected one of {WINDOWS}, found {self.window!r}")
        if self.threshold not in THRESHOLDS:
            raise UsageError(f"threshold: expected one of {THRESHOLDS}, found {self.threshold!r}")
        if not (0.0 < self.fraction <= 1.0):
            raise UsageError(f"fraction: expected a number in (0, 1], found {self.fraction!r}")
        if self.count is not None and self.count < 1:
            raise UsageError(f"count: expected a positive integer or None, found {self.count!r}")
        if self.ig_steps < 1:
            raise UsageError(f"ig_steps: expected a positive integer, found {self.ig_steps!r}")
        if self.max_steps < 0:
            raise UsageError(f"max_steps: expected a non-negative integer, found {self.max_steps!r}")
        if self.lr <= 0:
            raise UsageError(f"lr: expected a positive number, found {self.lr!r}")
        if self.locality_weight < 0:
            raise UsageError(f"locality_weight: expected a non-negative number, found {self.locality_weight!r}")
        if self.contrast_weight < 0 or self.contrast_margin < 0:
            raise UsageError(
                f"contrast_weight and contrast_margin: expected non-negative numbers, found"
                f" {self.contrast_weight!r} and {self.contrast_margin!r}"
            )
        if self.alpha is not None and self.alpha <= 0:
            raise UsageError(f"alpha: expected a positive number or None, found {self.alpha!r}")
        for name in ("layers", "exclude_layers"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, int) or not all(isinstance(x, int) and not isinstance(x, bool) for x in value):
                raise UsageError(f"{name}: expected a list of layer indices (integers), found {value!r}")
            object.__setattr__(self, name, tuple(value))
        if self.layers is not None and not self.layers:
            raise UsageError("layers: expected at least one layer index or None, found an empty list")
        object.__setattr__(self, "locality_prompts", tuple(self.locality_prompts))
        object.__setattr__(self, "context_prefixes", tuple(self.context_prefixes))
        object.__setattr__(self, "contrast_subjects", tuple(self.contrast_subjects))
