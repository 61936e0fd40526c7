"""When a LoRA set running in slots is folded into the weights without being asked (`merge=None`).

A merge is a fixed cost, slots a cost per token and step, so the policy counts token-steps: steps x
(image + text tokens) x batch that the set has run in slots plus those its current pipeline call is
about to run. Once that reaches `after_token_steps`, the set is merged before the next step (ski
rental with a look ahead: a 28-step 1024² image merges before its first step, a stream of 4-step
images after two of them).

The default (`AUTO_TOKEN_STEPS`) is the break-even measured on the H200 (random weights, FLUX.1-dev
size, r64 on all 494 block linears, 2026-12-02, benchmarks/results/2026-12-02d-h200-copyplan-kappend):
merge + unmerge 101 ms (93.4 + 7.6; 137.5 when the merge is a process's first GPU work), slots 3.0-3.6
us of GPU work per token and step (1024²: 104.9 vs 90.9 ms a step with CUDA graphs over 4608 tokens;
512²: 39.2 vs 33.7 over 1536; 2048²: 2.3 us). 101 ms / 3.0 us = 34k; 40k leaves room for a slow
first merge. Only CUDA devices merge unasked (the CPU's costs were not measured), and only where the
originals can stay on the GPU (a restore from host memory costs far more; not measured either).
Packages with the merge by address (runtime/address_merge.py) merge + unmerge in ~40 ms of GPU time (31.5 + 8,
benchmarks/results/2026-12-02f-h200-merge-by-address), a break-even near 14k; but `set_loras(..., merge=True)`
took 70 + 13 ms in the same run's bench process (its host ran about twice as slow), 28k. The default stays 40k
until short requests are measured under a lower one: a threshold too high only leaves a little speed unused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging

from ..errors import UnsupportedCallError

logger = logging.getLogger(__name__)

AUTO_TOKEN_STEPS = 40_000
POLICY_NAMES = ("auto", "never", "always")


@dataclasses.dataclass(frozen=True)
class MergePolicy:
    """`after_token_steps`: merge a set once it has run or is about to run this many token-steps in
    slots (0: at its first step); None: never merge unasked."""

    after_token_steps: float | None = None

    @classmethod
    def parse(cls, value, device) -> MergePolicy:
        """"auto" (the measured break-even on CUDA, never on the CPU), "never", "always", or a policy."""
        if isinstance(value, cls):
            return value
        if value == "auto":
            import torch  # here: the CLI reads POLICY_NAMES without loading torch

            return cls(AUTO_TOKEN_STEPS if torch.device(device).type == "cuda" else None)
        if value == "never":
            return cls(None)
        if value == "always":
            return cls(0)
        raise UnsupportedCallError(f"merge policy {value!r} is not one of {', '.join(POLICY_NAMES)}",
                                   "give merge_policy='auto' (default), 'never' or 'always'")

    def due(self, token_steps_run: float, token_steps_ahead: float) -> bool:
        return self.after_token_steps is not None and token_steps_run + token_steps_ahead >= self.after_token_steps


class AutoMerge:
    """The token-step count of the set in slots that `LoRAModes` tracks (entered with `merge=None`)."""

    def __init__(self, policy: MergePolicy):
        self.policy = policy
        self.layers: dict | None = None  # the tracked set's stacked layers; None: nothing to merge unasked
        self.token_steps_run = 0
        self.steps_ahead = 0  # steps the current pipeline call will still run (0: unknown)
        self.merges = 0  # how many sets this policy merged (for tests and reports)

    def track(self, layers: dict | None) -> None:
        """A new set is live: count from zero (None: a set this policy must leave alone)."""
        self.layers, self.token_steps_run = layers or None, 0

    @contextlib.contextmanager
    def expecting(self, steps: int):
        """The pipeline call inside runs `steps` steps: a set whose call pays for a merge merges at once."""
        self.steps_ahead = max(int(steps), 0)
        try:
            yield
        finally:
            self.steps_ahead = 0

    def take_due(self, tokens: int) -> dict | None:
        """Before a step over `tokens` tokens: the layers to merge now, or None (the step is counted)."""
        if self.layers is None:
            return None
        ahead = max(self.steps_ahead, 1) * tokens  # this step included
        self.steps_ahead = max(self.steps_ahead - 1, 0)
        if self.policy.due(self.token_steps_run, ahead):
            layers, self.layers = self.layers, None  # one attempt per set, whatever happens
            return layers
        self.token_steps_run += tokens
        return None
