"""Can a program feed its FP8 linear an activation quantized by its own op? (issue 11, the one-pass kernel)

    .venv/bin/python scripts/probe_prequantized_fp8_linear.py [OUT_DIR]

The one-pass "GELU (+ concat) + row-wise FP8 quantization" kernel planned in docs/design.md needs two
things torch must accept, checked here on the CPU (torchao's sm_89 check lifted, as the tests do):
1. a torchao FP8 row-wise linear whose activation arrives quantized: the weight's `act_quant_kwargs`
   cleared, the activation wrapped as a `Float8Tensor`. Export must reach `_scaled_mm` with the given
   data and scale, and AOTInductor must compile it;
2. a `torch.library.triton_op` with a plain-torch body (the CPU reference a CUDA kernel would sit
   beside): export keeps it as one op node, AOTInductor compiles through it.
Prints what it found. A record of what torch does, not a part of aotpack. 2026-12-01, torch 2.13.0 CPU,
torchao 0.18, 25 s: both hold. The compiled prequantized linear is within 0.004 of eager torchao. The
op's outputs differ from eager in 960 of 1024 values, by the scale only: eagerly amax / 448 is rounded
to bf16, Inductor keeps it in fp32 (both are as far from the input: 0.112 vs 0.109 at most).
"""

from __future__ import annotations

import copy
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


def quant_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torchao's row-wise FP8 recipe as its exported graph computes it: amax / 448, divide, clamp, cast."""
    scale = (x.abs().amax(-1, keepdim=True) / 448.0).float()
    return (x.float() / scale).clamp(-448, 448).to(torch.float8_e4m3fn), scale


class GeluThenLinear(nn.Module):
    """The double block's feed-forward tail: GELU, then the FP8 linear quantizing its own input."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear

    def forward(self, pre):
        return self.linear(F.gelu(pre, approximate="tanh"))


class GeluThenPrequantizedLinear(GeluThenLinear):
    """The same, with the quantization done before the linear (where the one-pass kernel would go)."""

    def __init__(self, linear: nn.Linear):
        super().__init__(linear)
        self.linear.weight.act_quant_kwargs = None  # the activation arrives quantized

    def forward(self, pre):
        from torchao.quantization.quantize_.workflows.float8.float8_tensor import Float8Tensor

        q, scale = quant_rows(F.gelu(pre, approximate="tanh"))
        weight = self.linear.weight
        activation = Float8Tensor(q, scale, block_size=[1] * (q.dim() - 1) + [q.shape[-1]],
                                  mm_config=weight.mm_config, kernel_preference=weight.kernel_preference,
                                  dtype=pre.dtype)
        return F.linear(activation, weight)


def _compiled(module: nn.Module, example: tuple, out: Path, name: str):
    from torch.export import Dim

    tokens = Dim("tokens", min=2, max=64)
    exported = torch.export.export(module, example, dynamic_shapes=tuple({1: tokens} for _ in example),
                                   strict=False)
    path = torch._inductor.aoti_compile_and_package(exported, package_path=str(out / f"{name}.pt2"))
    return exported, torch._inductor.aoti_load_package(path)


def main(out: Path) -> None:
    import torchao.quantization.quant_api as quant_api
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    quant_api._check_hardware_support = lambda granularity: None  # torchao refuses FP8 below sm_89
    torch.manual_seed(0)
    linear = nn.Linear(64, 32, bias=False, dtype=torch.bfloat16)
    quantize_(linear, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
    pre = torch.randn(1, 10, 64, dtype=torch.bfloat16)
    reference, fed = GeluThenLinear(linear), GeluThenPrequantizedLinear(copy.deepcopy(linear))
    print("1. eager, prequantized == torchao's own:", torch.equal(reference(pre), fed(pre)))
    exported, runner = _compiled(fed, (pre,), out, "prequantized")
    ops = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    print("   exported graph calls _scaled_mm:", "aten._scaled_mm.default" in ops)
    other = torch.randn(1, 20, 64, dtype=torch.bfloat16)
    print("   compiled vs eager torchao (20 tokens), max abs:", float((runner(other) - reference(other)).abs().max()))

    from torch.library import triton_op

    @triton_op("aotpack_probe::quant_rows", mutates_args=())
    def quant_rows_op(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return quant_rows(x)  # a CUDA build would launch its Triton kernel here through wrap_triton

    class Dequantized(nn.Module):
        def forward(self, x):
            q, scale = torch.ops.aotpack_probe.quant_rows(x)
            return q.float() * scale

    x = torch.randn(1, 16, 64, dtype=torch.bfloat16)
    exported, runner = _compiled(Dequantized(), (x,), out, "op")
    kept = any(str(n.target) == "aotpack_probe.quant_rows.default" for n in exported.graph.nodes)
    print("2. triton_op kept as one node by export:", kept)
    eager, compiled = Dequantized()(x), runner(x)
    print("   compiled, eager: max abs error vs input", float((compiled - x.float()).abs().max()),
          float((eager - x.float()).abs().max()), "; values that differ:", int((compiled != eager).sum()))


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as scratch:
        main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(scratch))
