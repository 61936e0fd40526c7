"""One pass for "GELU (+ concat) + row-wise FP8 quantization": the recipe lever `fused_gelu_quant`.

The linear after each Flux MLP GELU (the double blocks' `ff.net.2` and `ff_context.net.2`, the single
blocks' `proj_out` on `[attention, GELU(mlp)]`) quantizes its input row by row to FP8. Inductor fuses
GELU, concat and quantization into one looped reduction, which is 2.2-2.5x slower than a hand-written
one-pass Triton kernel (load the row once, GELU once, amax, scale, store FP8). Measured on the H200,
torch 2.11, 2026-12-01, random inputs at 1024^2 shapes (`scripts/gpu/probe_quant_fusion.py`,
`benchmarks/results/2026-12-01k-h200-gelu-sigmoid/`): 0.092 vs 0.231 ms for the single block's
4608 x 15360, 0.065 vs 0.144 ms for the double block's 4096 x 12288, about 6-7 ms of a 1024^2 step.

This module is that path, on by default in the Hopper recipes: 1024^2 step 111.12 -> 107.95 ms beside
the unfused package (H200, 2026-12-01, random weights, `benchmarks/results/2026-12-01m-h200-fused-quant/`):
- `torch.ops.aotpack.gelu_quant_fp8(prefix, pre, bias, delta, keep_input)`: a `torch.library.triton_op`.
  On CUDA its body launches the Triton kernel through `wrap_triton`, so AOTInductor compiles the kernel into
  the program (no Python at run time); elsewhere, and as the reference, it runs `gelu_quant_reference`
  in torch ops (what the CPU tests build and run).
- the op also takes the epilogue of the linear before the GELU (its bias and its LoRA delta, added to
  the FP8 GEMM's output in the kernel): Inductor fuses those adds into its own reduction, so without
  them the sum was written out and read back, 2.99 + 1.84 ms per 1024^2 step more in the first
  package measured (H200, 2026-12-01, `benchmarks/results/2026-12-01m-h200-fused-quant/`);
- the FP8 linear then takes the quantized activation directly (`fp8_linear_prequantized`; torch's
  side of this checked by `scripts/probe_prequantized_fp8_linear.py`);
- a slot's LoRA path reads the GELU output in the activation dtype, which the kernel also writes
  when that slot is bound (`keep_input`).
- nothing else changes: the weights keep their names and torchao metadata, a single block run by
  diffusers' own forward (the build's end-to-end reference) is the unfused block. A context-parallel
  package's single block hands the GELU's input from its pre program to its post program, whose
  proj_out runs through the op (split_regions.py; not measured on GPUs yet).

Numerics: those of torchao's eager quantization after torch's GELU, bit for bit on the CPU (the tests
check the whole transformer): GELU rounded to the activation dtype, the scale amax / 448 rounded to that
dtype too. Two differences: the kernel computes the tanh GELU as x * sigmoid(2u) (activations.py: at
most one last-bit flip), and the scale is floored at 1e-12 so an all-zero row quantizes to zeros, where
torchao's gives NaN.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .examples import relative_error
from .fp8_attention import FP8, FP8_MAX, MIN_SCALE
from .kernel_ops import refuse_kernel_errors, register_triton_op
from .lora_down_fp8 import lora_delta_from_fp8, mark_reads_fp8_input, reads_fp8_input
from .slots import BiasAfterLinear, LoRASlotLinear, weight_holder


def epilogue_sum(y: torch.Tensor, bias: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """`y + bias + delta` (each skipped when empty), added and rounded in the order `LoRASlotLinear` adds them."""
    if bias.numel():
        y = y + bias
    if delta.numel():
        y = y + delta
    return y


def gelu_quant_reference(prefix: torch.Tensor, pre: torch.Tensor, bias: torch.Tensor, delta: torch.Tensor,
                         keep_input: bool):
    """`(q, scale, h)`: h = [prefix, gelu_tanh(pre + bias + delta)] on the last axis (`bias` [W] and `delta`
    like `pre`, each skipped when empty, added in that order and rounded as `LoRASlotLinear` adds them),
    q its row-wise FP8 quantization, scale [..., 1] float32 with h ~ q * scale; h itself only if
    `keep_input` (else an empty tensor)."""
    pre = epilogue_sum(pre, bias, delta)
    gelu = F.gelu(pre, approximate="tanh")
    h = torch.cat([prefix, gelu], dim=-1) if prefix.shape[-1] else gelu
    q, scale = quantize_rows(h)
    return q, scale, (h if keep_input else pre.new_empty(0))


def quantize_rows(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(q, scale)`: `h`'s row-wise FP8 quantization as torchao's eager path computes it (the scale amax / 448
    rounded to h's dtype, then float32), floored so an all-zero row quantizes to zeros where torchao's gives NaN."""
    scale = (h.abs().amax(-1, keepdim=True) / FP8_MAX).float().clamp_min(MIN_SCALE)
    return (h.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


@functools.cache
def _kernel():
    """The Triton kernel, made on first use: the CPU-only install has no triton."""
    import triton
    import triton.language as tl

    @triton.jit
    def gelu_quant_fp8_kernel(prefix_ptr, pre_ptr, bias_ptr, delta_ptr, q_ptr, scale_ptr, h_ptr,
                              PREFIX: tl.constexpr, WIDTH: tl.constexpr, BLOCK: tl.constexpr,
                              HAS_BIAS: tl.constexpr, HAS_DELTA: tl.constexpr, KEEP_INPUT: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        in_prefix = cols < PREFIX
        in_pre = (cols >= PREFIX) & (cols < PREFIX + WIDTH)
        a = tl.load(prefix_ptr + row * PREFIX + cols, mask=in_prefix, other=0.0).to(tl.float32)
        x = tl.load(pre_ptr + row * WIDTH + (cols - PREFIX), mask=in_pre, other=0.0).to(tl.float32)
        # the linear's epilogue, each add rounded to the activation dtype as the eager adds round
        if HAS_BIAS:
            x += tl.load(bias_ptr + (cols - PREFIX), mask=in_pre, other=0.0).to(tl.float32)
            x = x.to(h_ptr.dtype.element_ty).to(tl.float32)
        if HAS_DELTA:
            x += tl.load(delta_ptr + row * WIDTH + (cols - PREFIX), mask=in_pre, other=0.0).to(tl.float32)
            x = x.to(h_ptr.dtype.element_ty).to(tl.float32)
        # tanh GELU as x * sigmoid(2u) (activations.gelu_tanh_via_sigmoid): an exponential, not libdevice's tanh
        g = x * tl.sigmoid(1.5957691216057308 * (x + 0.044715 * x * x * x))
        h = tl.where(in_prefix, a, g).to(h_ptr.dtype.element_ty)  # rounded (RNE) as torch rounds
        hf = h.to(tl.float32)
        # amax / 448 rounded to the activation dtype (torchao's eager scale), floored for all-zero rows
        scale = tl.maximum((tl.max(tl.abs(hf), axis=0) / 448.0).to(h_ptr.dtype.element_ty).to(tl.float32), 1e-12)
        q = tl.clamp(hf / scale, -448.0, 448.0)
        inside = cols < PREFIX + WIDTH
        tl.store(q_ptr + row * (PREFIX + WIDTH) + cols, q.to(q_ptr.dtype.element_ty), mask=inside)
        tl.store(scale_ptr + row, scale)
        if KEEP_INPUT:
            tl.store(h_ptr + row * (PREFIX + WIDTH) + cols, h, mask=inside)

    return gelu_quant_fp8_kernel


def _gelu_quant_triton(prefix: torch.Tensor, pre: torch.Tensor, bias: torch.Tensor, delta: torch.Tensor,
                       keep_input: bool, num_warps: int | None = None):
    import triton
    from torch.library import wrap_triton

    prefix, pre, bias, delta = prefix.contiguous(), pre.contiguous(), bias.contiguous(), delta.contiguous()
    lead, width, prefix_width = pre.shape[:-1], pre.shape[-1], prefix.shape[-1]
    total = prefix_width + width
    rows = pre.numel() // width
    q = torch.empty(*lead, total, dtype=FP8, device=pre.device)
    scale = torch.empty(*lead, 1, dtype=torch.float32, device=pre.device)
    # without keep_input the kernel never writes h; a one-element buffer stands in for its pointer
    h = torch.empty(*lead, total, dtype=pre.dtype, device=pre.device) if keep_input else pre.new_empty(0)
    h_target = h if keep_input else pre.new_empty(1)
    block = triton.next_power_of_2(total)
    # an empty input's pointer is never read (its flag is off): `pre` stands in for it
    wrap_triton(_kernel())[(rows,)](prefix if prefix_width else pre, pre, bias if bias.numel() else pre,
                                    delta if delta.numel() else pre, q, scale, h_target, PREFIX=prefix_width,
                                    WIDTH=width, BLOCK=block, HAS_BIAS=bias.numel() > 0,
                                    HAS_DELTA=delta.numel() > 0, KEEP_INPUT=keep_input,
                                    # 8 warps: best or near it at every 1024^2 shape (H200); 16 for the slotted
                                    # double block was faster alone but not in a package's step (docs/design.md)
                                    num_warps=num_warps or (8 if block <= 16384 else 16))
    return q, scale, h


def _gelu_quant_fp8(prefix: torch.Tensor, pre: torch.Tensor, bias: torch.Tensor, delta: torch.Tensor,
                    keep_input: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if pre.device.type == "cuda":
        return _gelu_quant_triton(prefix, pre, bias, delta, keep_input)
    return gelu_quant_reference(prefix, pre, bias, delta, keep_input)


gelu_quant_fp8 = register_triton_op("aotpack::gelu_quant_fp8", _gelu_quant_fp8)


def float8_over(qdata: torch.Tensor, scale: torch.Tensor, like, act_quant_kwargs="like") -> torch.Tensor:
    """A torchao `Float8Tensor` like `like` (row-wise, same configs) over `qdata` and `scale`, no copy; its
    `act_quant_kwargs` `like`'s unless given (None: the matmul takes an input quantized already)."""
    from torchao.quantization.quantize_.workflows.float8.float8_tensor import Float8Tensor

    kwargs = like.act_quant_kwargs if act_quant_kwargs == "like" else act_quant_kwargs
    return Float8Tensor(qdata, scale, list(like.block_size), like.mm_config, kwargs, like.kernel_preference,
                        like.dtype)


def fp8_linear_prequantized(linear: nn.Linear, q: torch.Tensor, scale: torch.Tensor, dtype) -> torch.Tensor:
    """`linear` (torchao FP8 row-wise) on the already-quantized activation `q, scale`.

    torchao quantizes a linear's input itself unless the weight's `act_quant_kwargs` is None: the matmul
    takes a view of the weight without it (same data and scale; export reads them as the weight's inner
    tensors), so the module keeps its usual behaviour everywhere else."""
    from torchao.quantization.quantize_.workflows.float8.float8_tensor import Float8Tensor

    weight = linear.weight
    weight_view = float8_over(weight.qdata, weight.scale, weight, act_quant_kwargs=None)
    activation = Float8Tensor(q, scale, [1] * (q.dim() - 1) + [q.shape[-1]], weight.mm_config, None,
                              weight.kernel_preference, dtype)
    return F.linear(activation, weight_view)


def bound_lora(layer: nn.Module) -> bool:
    """Whether `layer` is a LoRA slot with factors bound (it reads its input in the activation dtype)."""
    return isinstance(layer, LoRASlotLinear) and layer.lora_A is not None


class QuantizedActivation(NamedTuple):
    """A linear input quantized once, row-wise to FP8, for every FP8 linear that reads it (`fused_norm_quant`:
    a block's q/k/v, or q/k/v and MLP, projections). `hidden` is the input in the activation dtype, which only
    a bound LoRA slot reads; empty otherwise (it still carries the dtype)."""

    q: torch.Tensor
    scale: torch.Tensor
    hidden: torch.Tensor
    # the readers' GEMM outputs, computed once: over their joined weight (recipe lever joined_qkv, joined_qkv.py), or
    # with their LoRA as tails (lora_tails, tail_groups.py: those readers' slots are unbound, so no delta is added)
    outputs: dict | None = None

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.hidden.dtype


def no_features(x: torch.Tensor | QuantizedActivation) -> torch.Tensor:
    """`x[..., :0]` in the activation dtype: an empty concat prefix with x's leading shape."""
    return x.hidden.new_empty(*x.shape[:-1], 0) if isinstance(x, QuantizedActivation) else x[..., :0]


def no_tokens(x: torch.Tensor | QuantizedActivation) -> torch.Tensor:
    """`x[:, :0]` in the activation dtype: `[B, 0, D]`, an empty token part with x's batch and width."""
    return x.hidden.new_empty(x.shape[0], 0, x.shape[-1]) if isinstance(x, QuantizedActivation) else x[:, :0]


def lora_input(x: torch.Tensor | QuantizedActivation) -> torch.Tensor:
    """What a LoRA branch reads of a linear's input: the input itself, or a quantized one's `hidden`."""
    return x.hidden if isinstance(x, QuantizedActivation) else x


def unsummed_linear(layer: nn.Module | None, x: torch.Tensor | QuantizedActivation,
                    with_delta: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`layer(x)` as (GEMM output, bias, LoRA delta), the last two empty where the layer has none: their
    sum is what `layer(x)` returns, left to the op to add. No layer: `x` itself. A `QuantizedActivation`
    goes into the FP8 GEMM as it is (no quantization of its own) and its `hidden` into the LoRA branch.
    `with_delta` False: the delta left out (empty), for a caller that computes it itself."""
    if layer is None:
        return x, x.new_empty(0), x.new_empty(0)
    # its slice of one GEMM over joined weights (joined_qkv), which the programs read instead of the layer's own
    joined = isinstance(x, QuantizedActivation) and bool(x.outputs) and layer in x.outputs
    if with_delta and not joined and lora_up_in_gemm(layer, lora_input(x)):
        q, scale = (x.q, x.scale) if isinstance(x, QuantizedActivation) else quantize_rows(x)
        y = fp8_linear_with_lora(layer, q, scale, lora_input(x))
        return y, y.new_empty(0), y.new_empty(0)
    if joined:
        y = x.outputs[layer]
    elif isinstance(x, QuantizedActivation):
        y = fp8_linear_prequantized(weight_holder(layer), x.q, x.scale, x.dtype)
    elif not isinstance(layer, BiasAfterLinear):
        y = layer(x)
        return y, y.new_empty(0), y.new_empty(0)
    else:
        y = layer.base(x)
    bias = layer.bias if layer.bias is not None else y.new_empty(0)
    delta = with_delta and bound_lora(layer)
    return y, bias, (layer.lora_delta(lora_input(x)).to(y.dtype) if delta else y.new_empty(0))


def is_fp8_linear(linear: nn.Module) -> bool:
    """Whether `linear` holds torchao's row-wise FP8 weight (a `Float8Tensor`, one scale a row)."""
    weight = getattr(linear, "weight", None)
    return (hasattr(weight, "act_quant_kwargs") and hasattr(weight, "qdata")
            and tuple(weight.scale.shape) == (weight.shape[0], 1))


def lora_up_in_gemm(layer: nn.Module, hidden: torch.Tensor) -> bool:
    """Whether FP8 slot `layer` runs its base GEMM, bias and LoRA as one op (recipe lever `lora_up_in_gemm`,
    models/gemm_lora.py): marked by `install_lora_up_in_gemm`, factors bound, LoRA in the activation dtype."""
    return (getattr(layer, "lora_up_in_gemm", False) and bound_lora(layer)
            and layer.lora_A.dtype == hidden.dtype)


def fp8_linear_with_lora(layer: LoRASlotLinear, q: torch.Tensor, scale: torch.Tensor,
                         hidden: torch.Tensor) -> torch.Tensor:
    """`layer(x)` for an FP8 slot on its input quantized (`q, scale`) and as it is (`hidden`, the down-projection's
    input): `aotpack::fp8_linear_lora` adds the bias and `u B^T` to the GEMM's accumulator before its one store."""
    weight = layer.base.weight
    u = F.linear(hidden, layer.lora_A)
    bias = layer.bias if layer.bias is not None else u.new_empty(0)
    return torch.ops.aotpack.fp8_linear_lora(q, scale, weight.qdata, weight.scale, bias, u, layer.lora_B,
                                             bool(getattr(weight.mm_config, "use_fast_accum", False)))


def install_lora_up_in_gemm(transformer: nn.Module, min_in_features: int | None = None) -> int:
    """Mark the FP8 LoRA slots of `min_in_features` inputs or more (default `gemm_lora.MIN_IN_FEATURES`: where the
    op was measured faster than cuBLAS) for `lora_up_in_gemm`; returns how many. Importing `gemm_lora` here also
    registers the op. The weights and slots keep their names."""
    from .gemm_lora import MIN_IN_FEATURES

    floor = MIN_IN_FEATURES if min_in_features is None else min_in_features
    marked = 0
    for module in transformer.modules():
        if isinstance(module, LoRASlotLinear) and is_fp8_linear(module.base) and module.in_features >= floor:
            module.lora_up_in_gemm = True
            marked += 1
    return marked


def linear_output(layer: nn.Module, x: torch.Tensor | QuantizedActivation) -> torch.Tensor:
    """`layer(x)`, also for a `QuantizedActivation` (added and rounded as the slot's own forward adds)."""
    return epilogue_sum(*unsummed_linear(layer, x))


def linear_after_gelu(layer: BiasAfterLinear, prefix: torch.Tensor, before: nn.Module | None,
                      x: torch.Tensor | QuantizedActivation) -> torch.Tensor:
    """`layer([prefix, gelu(before(x))])` for an FP8 layer (a slot or a bias-after linear): the epilogue of
    `before`, the GELU, the concat and the quantization in one op. `before` None: `x` is the GELU's input
    (a context-parallel single block's post program gets it from the pre program)."""
    lora = bound_lora(layer)
    lora_before = before is not None and bound_lora(before)
    if getattr(layer, "gelu_lora_fused", False) and (lora or lora_before):
        return _linear_after_gelu_lora_in_kernel(layer, prefix, before, x, lora, lora_before)
    from_fp8 = lora and reads_fp8_input(layer)  # recipe lever lora_down_from_fp8: no bf16 copy of the GELU output
    pre, bias, delta = unsummed_linear(before, x)
    q, scale, h = torch.ops.aotpack.gelu_quant_fp8(prefix, pre, bias, delta, lora and not from_fp8)
    if lora and not from_fp8 and lora_up_in_gemm(layer, h):
        return fp8_linear_with_lora(layer, q, scale, h)
    y = fp8_linear_prequantized(layer.base, q, scale, pre.dtype)
    if layer.bias is not None:
        y = y + layer.bias
    if not lora:
        return y
    return y + (lora_delta_from_fp8(layer, q, scale) if from_fp8 else layer.lora_delta(h)).to(y.dtype)


def _linear_after_gelu_lora_in_kernel(layer: BiasAfterLinear, prefix: torch.Tensor, before: nn.Module | None,
                                      x: torch.Tensor | QuantizedActivation, lora: bool,
                                      lora_before: bool) -> torch.Tensor:
    """`linear_after_gelu` with `before`'s LoRA up-projection and `layer`'s down-projection inside the GELU kernel
    (recipe lever `fused_gelu_lora`, models/gelu_lora.py): the op takes `u_in = A_before x` and `B_before` and
    returns `u_out = A_layer h`, so neither wide bf16 tensor (the delta, the GELU output) is written. `lora`,
    `lora_before`: whether `layer`'s and `before`'s slots are bound."""
    pre, bias, _ = unsummed_linear(before, x, with_delta=False)
    empty = pre.new_empty(0)
    u_in = F.linear(lora_input(x).to(before.lora_A.dtype), before.lora_A) if lora_before else empty
    a_out = layer.lora_A if lora else empty
    q, scale, u_out = torch.ops.aotpack.gelu_lora_quant_fp8(prefix, pre, bias, u_in,
                                                             before.lora_B if lora_before else empty, a_out)
    y = fp8_linear_prequantized(layer.base, q, scale, pre.dtype)
    if layer.bias is not None:
        y = y + layer.bias
    return y + F.linear(u_out, layer.lora_B).to(y.dtype) if lora else y


class FusedFeedForward(nn.Module):
    """Stands in for a double block's diffusers `FeedForward` ([GELU(proj), Dropout, Linear]); keeps its
    `net` (so `net.0.proj` and `net.2` keep their names) and runs `net.2` through `linear_after_gelu`."""

    def __init__(self, feed_forward: nn.Module):
        super().__init__()
        self.net = feed_forward.net

    def forward(self, hidden_states: torch.Tensor | QuantizedActivation) -> torch.Tensor:
        return linear_after_gelu(self.net[2], no_features(hidden_states), self.net[0].proj, hidden_states)


class GeluIntoProjOut(nn.Module):
    """A single block's `act_mlp` whose GELU the block's `proj_out` runs (`fused_single_block`, from
    `JointSingleBlockRegion`). Called on its own it is the plain tanh GELU, so paths that do not fuse
    (diffusers' forward, context-parallel split programs, the whole layout) run the unfused block."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate="tanh")


def gelu_goes_into_proj_out(block: nn.Module) -> bool:
    """Whether a single block's MLP GELU runs inside its `proj_out` (`install_fused_gelu_quant` marked it)."""
    return isinstance(getattr(block, "act_mlp", None), GeluIntoProjOut)


def install_fused_gelu_quant(transformer: nn.Module, lora_down_from_fp8: bool = False,
                             fused_gelu_lora: bool = False, lora_down_fp8_gemm: bool = False,
                             lora_down_fp8_dots: bool = False, lora_down_fp8_text: bool = False) -> int:
    """Route every MLP GELU of `transformer` (FP8-quantized) into the next linear's quantization, in place;
    returns how many. Weight and slot names do not change. `lora_down_from_fp8` (the recipe lever): the next
    linears' LoRA slots take their down-projection from the quantized GELU output (`lora_down_fp8.py`), but for the
    double blocks' text feed-forwards (`ff_context`), whose few rows the bf16 path serves faster; with
    `lora_down_fp8_gemm` (the recipe lever) by one FP8 GEMM rather than the Triton kernel, with `lora_down_fp8_dots`
    (the recipe lever) by FP8 dots against A's FP8 halves, two more program inputs of those slots; with
    `lora_down_fp8_text` (the recipe lever) the text feed-forwards' too.
    `fused_gelu_lora` (the recipe lever): the LoRA projections on both sides of the GELU run inside its kernel
    (`gelu_lora.py`, which the caller imports: it registers the op, and it imports this module)."""
    from diffusers.models.activations import GELU
    from diffusers.models.attention import FeedForward

    after_gelu = []  # the linear after each routed GELU
    # of them, those whose LoRA reads the FP8 GELU output under `lora_down_from_fp8`: not the double blocks' text
    # feed-forwards, whose <= 512 rows (a batch-1 prompt) are too few for the FP8 kernel (36 us a call there against
    # 24 us for the bf16 copy + cuBLAS, H200 probe 2026-12-04f: +0.23 ms a step, any size; batch 4's 2048 text rows
    # unmeasured). `lora_down_fp8_text` marks them too, for the FP8-dot form (`lora_down_fp8_dots`): 14.2 us at 1024
    # rows in its probe against 25.7 for the Triton kernel (H100, 2026-12-08a), unmeasured at 512
    fp8_down = []
    for block in transformer.transformer_blocks:
        for name in ("ff", "ff_context"):
            feed_forward = getattr(block, name)
            if isinstance(feed_forward, FeedForward) and isinstance(feed_forward.net[0], GELU):
                _require_fp8(feed_forward.net[2])
                setattr(block, name, FusedFeedForward(feed_forward))
            elif not isinstance(feed_forward, FusedFeedForward):  # else routed by an earlier call
                continue
            after_gelu.append(feed_forward.net[2])
            if name == "ff" or lora_down_fp8_text:
                fp8_down.append(feed_forward.net[2])
    for block in transformer.single_transformer_blocks:
        _require_fp8(block.proj_out)
        block.act_mlp = GeluIntoProjOut()
        after_gelu.append(block.proj_out)
        fp8_down.append(block.proj_out)
    if lora_down_from_fp8:
        for layer in fp8_down:
            mark_reads_fp8_input(layer, gemm=lora_down_fp8_gemm, dots=lora_down_fp8_dots)
    if fused_gelu_lora:
        for layer in after_gelu:
            layer.gelu_lora_fused = True
    return len(after_gelu)


def _require_fp8(layer: nn.Module) -> None:
    from ..errors import RecipeError

    if not is_fp8_linear(getattr(layer, "base", None)):
        weight = getattr(getattr(layer, "base", None), "weight", None)
        raise RecipeError(f"fused_gelu_quant needs FP8 row-wise linears; {type(layer).__name__} holds a "
                          f"{type(weight).__name__}", "set quantization = \"fp8_rowwise\" or fused_gelu_quant = false")


def kernel_errors(device, rows: int = 257) -> dict[str, float]:
    """The op on `device` against `gelu_quant_reference`, on the single block's shapes with a LoRA slot
    (bias and delta), the double block's without (bias only) and a bare GELU (random bf16 inputs):
    relative L2 of the dequantized outputs and of the GELU outputs."""
    generator = torch.Generator().manual_seed(0)
    errors = {}
    for name, prefix_width, has_bias, has_delta in (("single_block", 3072, True, True),
                                                    ("double_block", 0, True, False), ("bare", 0, False, False)):
        prefix, pre, delta = (3 * torch.randn(rows, width, generator=generator)
                              for width in (prefix_width, 12288, 12288 if has_delta else 0))
        bias = torch.randn(12288 if has_bias else 0, generator=generator)
        prefix, pre, bias, delta = (t.to(device, torch.bfloat16) for t in (prefix, pre, bias, delta))
        q, scale, h = torch.ops.aotpack.gelu_quant_fp8(prefix, pre, bias, delta, True)
        q_ref, scale_ref, h_ref = gelu_quant_reference(prefix, pre, bias, delta, True)
        _, _, not_kept = torch.ops.aotpack.gelu_quant_fp8(prefix, pre, bias, delta, False)
        errors[name] = float("inf") if not_kept.numel() else max(
            relative_error(q.float() * scale, q_ref.float() * scale_ref), relative_error(h, h_ref))
    return errors


def check_kernel_against_reference(device) -> None:
    """`refuse_kernel_errors` for the GELU kernel (a second or two on the GPU, once per build)."""
    refuse_kernel_errors("fused GELU + FP8 quantization", "fused_gelu_quant", device, kernel_errors(device))
