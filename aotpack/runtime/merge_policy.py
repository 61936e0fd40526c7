"""When a LoRA set running in slots is folded into the weights without being asked (`merge=None`).

A merge is a fixed cost, slots a cost per token and step, so the policy counts token-steps: steps x
(image + text tokens) x batch that the set has run in slots plus those its current pipeline call is
about to run. Once that reaches `after_token_steps`, the set is merged before the next step (ski
rental with a look ahead: a 4-step 1024² image merges before its first step, a stream of 2-step 1024²
images of one set in the second).

The default (`AUTO_TOKEN_STEPS`) comes from whole short requests measured on the H200 (switch in, N steps,
switch out; random weights, FLUX.1-dev size, r64 on all 494 block linears, merge by address; 2026-12-02 18:13 UTC,
`scripts/gpu/probe_short_requests.py`, benchmarks/results/2026-12-02g-h200-short-requests). Merged costs a fixed
~44 ms a request over no LoRA (merge 35 + unmerge 8 ms), slots ~3.0 us per token and step at 1024² (14.0 ms a step
over 4608 tokens) and ~5.0 us at 512² (7.65 ms over 1536). Merging first was 1.0 ms slower at 1024² x 3 steps
(13.8k token-steps) and 14.9 ms faster at x 4 (18.4k); 9.0 ms slower at 512² x 4 (6.1k) and 5.9 ms faster at x 6
(9.2k): break-even ~14.5k at 1024², ~9k at 512². 12k keeps the loss on either side under ~15 ms a request. Only
CUDA devices merge unasked (the CPU's costs were not measured), and only where the originals can stay on the GPU
(a restore from host memory costs far more; not measured either). A process's first merge costs ~30 ms more (the
allocator grows by the originals' stack: 66.5 vs 36.5 ms in the same bench process). A set due for a merge
whose merge into FP8 weights would weaken it stays in slots (`merge_check.py`, checked in `LoRAModes.before_step`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging

from ..errors import UnsupportedCallError
from .merge_share import check_share

logger = logging.getLogger(__name__)

AUTO_TOKEN_STEPS = 12_000
POLICY_NAMES = ("auto", "never", "always")


@dataclasses.dataclass(frozen=True)
class MergePolicy:
    """`after_token_steps`: merge a set once it has run or is about to run this many token-steps in
    slots (0: at its first step); None: never merge unasked. `share`: how much of a set any merge, asked or
    not, folds in (merge_share.py; 1: all of it)."""

    after_token_steps: float | None = None
    share: float = 1.0

    @classmethod
    def parse(cls, value, device, share=1.0) -> MergePolicy:
        """"auto" (the measured break-even on CUDA, never on the CPU), "never", "always", or a policy;
        `share` (checked) for the named policies."""
        if isinstance(value, cls):
            return value
        share = check_share(share)
        if value == "auto":
            import torch  # here: the CLI reads POLICY_NAMES without loading torch

            return cls(AUTO_TOKEN_STEPS if torch.device(device).type == "cuda" else None, share)
        if value == "never":
            return cls(None, share)
        if value == "always":
            return cls(0, share)
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
        self.declined = 0  # sets it left in slots because FP8 would weaken them (merge_check.py)

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
