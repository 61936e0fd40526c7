"""GELU's tanh approximation written as `x * sigmoid(2u)`: the same function, an opt-in build lever.

Flux's MLPs use `gelu(x, approximate="tanh") = 0.5 x (1 + tanh(u))`, u = sqrt(2/pi) (x + 0.044715 x^3).
Since 1 + tanh(u) = 2 sigmoid(2u), that is `x * sigmoid(2u)`. Inductor lowers torch's tanh to
libdevice's tanh and sigmoid to an exponential.

Measured on the H200 (nvidia-h200, torch 2.11, 2026-12-01, random weights,
`benchmarks/results/2026-12-01k-h200-gelu-sigmoid/`):
- alone (`scripts/gpu/probe_quant_fusion.py`, 1024^2 shapes), the sigmoid form is faster: GELU + FP8
  quantization of a 4096 x 12288 activation 0.144 -> 0.099 ms; the single block's concat + GELU +
  quantization (4608 x 15360) 0.232 -> 0.167 ms;
- in a package (1024^2, r64 in slots, ms per step) the step did not gain. The single block's kernel,
  which there also fuses the attention output's permute, got slower:

    kernel                                      tanh (default)   sigmoid
    double blocks' feed-forward GELU + quant    4.01             3.20
    single blocks' concat + GELU + quant        8.27             10.59
    step, "all" / "feed_forward"                112.4 / 111.5    112.8 / 112.2

So the recipe field `gelu_via_sigmoid` defaults to "none"; "feed_forward" swaps the double blocks'
GELUs only, "all" every GELU. It stays for re-measuring on other toolchains.

Numerically the sigmoid form is at least as accurate: it has no cancellation in `1 + tanh(u)` for
negative x. In bfloat16, 7% of outputs (the tiny ones of the negative tail) differ from torch's by one
unit in the last place, at most 1.5e-5 in absolute value; in float32 the two agree to ~1e-7.
"""

from __future__ import annotations

import torch
from torch import nn

_TWO_SQRT_2_OVER_PI = 1.5957691216057308  # 2 * sqrt(2 / pi): sigmoid(2u) = (1 + tanh(u)) / 2


def gelu_tanh_via_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """`F.gelu(x, approximate="tanh")`, computed as `x * sigmoid(2u)` in float32 (or wider) and rounded
    once, as torch rounds its own GELU of a low-precision tensor."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    return (xf * torch.sigmoid(_TWO_SQRT_2_OVER_PI * (xf + 0.044715 * xf * xf * xf))).to(x.dtype)


class SigmoidGELU(nn.Module):
    """Stands in for `nn.GELU(approximate="tanh")` (the single blocks' `act_mlp`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gelu_tanh_via_sigmoid(x)


class SigmoidGELUProjection(nn.Module):
    """Stands in for diffusers' `GELU(approximate="tanh")` (a linear `proj`, then the GELU). It keeps
    that `proj` as its child of the same name, so weight and LoRA slot names do not change."""

    def __init__(self, gelu: nn.Module):
        super().__init__()
        self.proj = gelu.proj

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return gelu_tanh_via_sigmoid(self.proj(hidden_states))


def _replacement(module: nn.Module, scope: str) -> nn.Module | None:
    from diffusers.models.activations import GELU

    if scope == "all" and isinstance(module, nn.GELU) and module.approximate == "tanh":
        return SigmoidGELU()
    if scope in ("all", "feed_forward") and isinstance(module, GELU) and module.approximate == "tanh":
        return SigmoidGELUProjection(module)
    return None


def use_sigmoid_gelu(model: nn.Module, scope: str = "all") -> int:
    """Swap tanh-approximated GELUs of `model` for the sigmoid form, in place; returns how many.

    `scope`: "feed_forward" swaps the double blocks' feed-forward GELUs only (diffusers' `GELU` modules),
    "all" also the single blocks' `act_mlp`, "none" nothing.
    """
    swaps = [(parent, name, new) for parent in model.modules() for name, child in parent.named_children()
             if (new := _replacement(child, scope)) is not None]
    for parent, name, new in swaps:
        setattr(parent, name, new)
    return len(swaps)
