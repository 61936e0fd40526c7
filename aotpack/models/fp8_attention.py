"""FP8 (e4m3) attention: cuDNN's FP8 SDPA as a registered custom op, `aotpack::fp8_sdpa`.

The opt-in recipe value `attention = "cudnn_fp8"` traces the Flux attention through `fp8_attention`:
per-tensor amax scales (fp32), q/k/v quantized to e4m3 (fused by Inductor into the program), one
call of `torch.ops.aotpack.fp8_sdpa`, the e4m3 output dequantized to the query dtype. The op is
opaque to export and AOTInductor: the compiled program calls it at run time through the dispatcher
(as the FlashAttention-3 path calls `_diffusers_flash_attn_3::_flash_attn_forward`), so the process
that loads a package must have imported this module (`attention.check_attention_runs_here` does).

Kernels:
- CUDA: cuDNN's FP8 SDPA through the cuDNN frontend's Python API (`import cudnn`, wheel
  `nvidia-cudnn-frontend`), one graph per (shapes, strides, device). Softmax probabilities are
  quantized to e4m3 with scale 448 (they lie in [0, 1]); the output shares V's scale because every
  output row is a convex combination of V's rows (|O| <= max|V|). Hopper's cuDNN needs an FP8 output.
- CPU: a reference, not a fast kernel. q/k/v are dequantized to fp32, attended with
  `scaled_dot_product_attention` (scale 1/sqrt(D)) and the output quantized to e4m3 with V's scale,
  as on the GPU. The probabilities are NOT quantized (cuDNN quantizes them), so the CPU error is a
  little smaller than the GPU's. It lets the CPU tests run the whole path: export -> AOTInductor
  package -> runtime load -> run.

Why opt-in (measured on the H200, nvidia-h200, cuDNN 9.19, frontend 1.32, 2026-12-01,
`python3 scripts/gpu/probe_fp8_attention.py`, random inputs, batch 1, 24 heads x 128):

    tokens (image)          FP8 cuDNN   bf16 cuDNN   (kernel time)
    1536  (512^2)           0.071 ms    0.081 ms
    4608  (1024^2)          0.307 ms    0.424 ms
    16896 (2048^2)          3.38 ms     5.21 ms

Relative L2 error vs fp32 attention: 5.9e-2 for FP8 against 2.3e-3 for bf16, i.e. 25x the per-call
error of bf16 attention, for a 1.15-1.5x faster kernel. The quantization of q/k/v is extra work: done
eagerly (unfused) it made the call slower than bf16 (0.79 ms at 4608 tokens, 5.14 ms at 16896), so the
gain rests on Inductor fusing it into the programs; a cuDNN execute also costs ~20 us of host time.
(Probe: torch 2.11+cu130 on the GPU machine; raw numbers in
benchmarks/results/2026-12-01-h200-speed/probe_fp8_attention.json.)

In a package (benchmarks/results/2026-12-01c-h200-levers, 1024^2, r64 in slots, same process): 110.8 ms
per step against the default's 109.0. The FP8 kernel saved 8.5 ms, and the q/k amax reductions plus a
lost GELU fusion took it back. q/k now take their scales from the RMSNorm weights (`rms_norm_bound`),
which removes those reductions: 107.2 vs 112.6 ms at 1024^2 and 512.3 vs 621.0 ms at 2048^2 beside the
default package (benchmarks/results/2026-12-01f-h200-fp8attn-normbound). It stays opt-in: its error on
trained weights is unmeasured.
"""

from __future__ import annotations

import contextvars
import functools
import math
import threading

import torch
import torch.nn.functional as F

from ..errors import PackageMismatchError, UnsupportedCallError
from .cond_operands import unaliased

FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP8 = torch.float8_e4m3fn
MIN_SCALE = 1e-12  # an all-zero tensor still gets a usable (finite, non-zero) scale
OP_NAME = "aotpack::fp8_sdpa"
BF16_OP_NAME = "aotpack::bf16_sdpa"  # the bf16 branch below `min_tokens`


def _check_inputs(q8, k8, v8, descale_q, descale_k, descale_v) -> None:
    for name, tensor in (("q8", q8), ("k8", k8), ("v8", v8)):
        torch._check(tensor.dtype == FP8,
                     lambda n=name, t=tensor: f"{OP_NAME}: {n} must be float8_e4m3fn, not {t.dtype}")
        torch._check(tensor.dim() == 4, lambda n=name: f"{OP_NAME}: {n} must be (batch, tokens, heads, head_dim)")
    for name, tensor in (("descale_q", descale_q), ("descale_k", descale_k), ("descale_v", descale_v)):
        torch._check(tensor.dtype == torch.float32 and tensor.numel() == 1,
                     lambda n=name: f"{OP_NAME}: {n} must be a float32 tensor of shape (1, 1, 1, 1)")
    torch._check(k8.shape == v8.shape, lambda: f"{OP_NAME}: k8 {tuple(k8.shape)} and v8 {tuple(v8.shape)} differ")
    torch._check(q8.shape[0] == k8.shape[0] and q8.shape[2] == k8.shape[2] and q8.shape[3] == k8.shape[3],
                 lambda: f"{OP_NAME}: q8 {tuple(q8.shape)} does not match k8 {tuple(k8.shape)} in batch/heads/dim")


@torch.library.custom_op(OP_NAME, mutates_args=(), device_types="cpu")
def fp8_sdpa(q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, descale_q: torch.Tensor,
             descale_k: torch.Tensor, descale_v: torch.Tensor) -> torch.Tensor:
    """Attention of e4m3 q/k/v laid out (B, S, H, D); returns e4m3 O (B, S, H, D) whose dequantization
    scale is `descale_v`. This body is the CPU reference (see the module docstring)."""
    _check_inputs(q8, k8, v8, descale_q, descale_k, descale_v)
    q, k, v = ((t.float() * s.reshape(())).transpose(1, 2) for t, s in ((q8, descale_q), (k8, descale_k),
                                                                       (v8, descale_v)))
    out = F.scaled_dot_product_attention(q, k, v, scale=1.0 / math.sqrt(q8.shape[-1])).transpose(1, 2)
    return quantize_with(out, descale_v)


@fp8_sdpa.register_fake
def _(q8, k8, v8, descale_q, descale_k, descale_v):
    _check_inputs(q8, k8, v8, descale_q, descale_k, descale_v)
    return q8.new_empty(q8.shape)  # contiguous (B, S, H, D), like both kernels' output


def quantize_with(x: torch.Tensor, descale: torch.Tensor) -> torch.Tensor:
    """`x` as e4m3 such that `x ~= x8 * descale` (saturated at +-448: e4m3fn has no infinity)."""
    return (x.float() / descale.reshape(())).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def abs_max(x: torch.Tensor) -> torch.Tensor:
    """max |x| over the whole tensor, taken row by row over its last two axes (a token's heads) and then over the
    rows. Inductor compiles one full reduction of V as a split reduction that read it at ~0.8 TB/s on the H200 (36 us
    a 1024^2 single block, 49 us a double block, 2.3 ms a step); by rows it compiles like the norms. A maximum is
    exact in any order, so the scale is the same. Beside the full reduction in one process (H200, 2026-12-04, random
    weights, benchmarks/results/2026-12-04e-h200-row-amax/): r64 in slots from CUDA graphs 1024^2 101.01 -> 100.43 ms,
    2048^2 490.70 -> 488.72 ms; no LoRA 88.70 -> 87.87 and 452.43 -> 448.58 ms."""
    rows = x.detach().reshape(-1, x.shape[-2] * x.shape[-1]) if x.dim() >= 2 else x.detach().reshape(1, -1)
    return rows.abs().amax(dim=-1).amax()


def descale_of(amax: torch.Tensor) -> torch.Tensor:
    """The fp32 descale, shape (1, 1, 1, 1), that maps `amax` to e4m3's largest value."""
    return (amax.float() / FP8_MAX).clamp(min=MIN_SCALE).reshape(1, 1, 1, 1)


def quantize(x: torch.Tensor, bound: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor quantization: (e4m3 tensor, fp32 descale of shape (1, 1, 1, 1)). The scale comes from
    `bound` (a proven upper bound of |x|) when given, else from the tensor's amax (a full reduction)."""
    descale = descale_of(abs_max(x) if bound is None else bound)
    return quantize_with(x, descale), descale


# The Flux attention module whose processor is running (set by attention._flux_attention_through).
current_attention_module: contextvars.ContextVar = contextvars.ContextVar("aotpack_fp8_attention", default=None)


def rms_norm_bound(attn, which: str, head_dim: int) -> torch.Tensor | None:
    """A bound of |q| (which="q") or |k| after Flux's per-head RMSNorm and RoPE, from the norm weights alone.

    RMSNorm gives x_i = u_i * w_i with sum(u_i^2) <= head_dim, so |x_i| <= sqrt(head_dim) * max|w|; RoPE
    rotates pairs, which keeps each pair's length, so the bound holds after it. The scale then needs no
    pass over the activations: the H200 run of 2026-12-01 (benchmarks/results/2026-12-01c-h200-levers)
    spent about 6 ms per 1024^2 step on the q/k amax reductions, most of what FP8 attention saved. The
    bound is loose (typical |x_i| ~ |w_i|), which costs e4m3 no precision: its 3 mantissa bits hold across
    the normal range, and the tightest values stay 2^15 above the subnormals. None when a norm is not a
    plain RMSNorm (then the caller takes the amax).
    """
    norms = [getattr(attn, f"norm_{which}", None)]
    if getattr(attn, "added_kv_proj_dim", None) is not None:  # joint attention: text tokens use norm_added_*
        norms.append(getattr(attn, f"norm_added_{which}", None))
    if not all(isinstance(norm, torch.nn.RMSNorm) for norm in norms):
        return None
    maxima = [None if norm.weight is None else norm.weight.detach().abs().amax().float() for norm in norms]
    device = next((m.device for m in maxima if m is not None), None)
    maxima = [torch.ones((), device=device) if m is None else m for m in maxima]  # no weight: |w| = 1
    return torch.stack(maxima).amax() * math.sqrt(head_dim)


# ----- CUDA: cuDNN FP8 SDPA through the cuDNN frontend -----

_lock = threading.Lock()  # guards the caches, and the handle's stream between set_stream and execute
_handles: dict[int, object] = {}  # one cuDNN handle per device
_graphs: dict[tuple, tuple] = {}  # (q, kv, out dims/strides, device) -> (graph, tensors)
_constants: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # device -> (descale_s, scale_s)


def import_cudnn():
    """The cuDNN frontend's Python module, or a PackageMismatchError saying how to install it."""
    try:
        import cudnn
    except ImportError as err:
        raise PackageMismatchError(
            f"attention 'cudnn_fp8' runs cuDNN's FP8 SDPA through the cuDNN frontend, but `import cudnn` "
            f"failed here ({err})",
            "pip install nvidia-cudnn-frontend (or 'aotpack[fp8]') on the GPU machine, or build the package "
            "with bf16 attention: aotpack build ... --attention cudnn",
        ) from err
    return cudnn


def _bhsd(tensor: torch.Tensor) -> tuple[tuple, tuple]:
    """cuDNN dims (B, H, S, D) and the strides of the (B, S, H, D) buffer viewed that way."""
    view = tensor.transpose(1, 2)
    return tuple(view.shape), tuple(view.stride())


def build_fp8_sdpa_graph(cudnn, handle, q_layout, kv_layout, out_layout, head_dim: int):
    """The FP8 SDPA graph; the API usage that ran on the H200 (scripts/gpu/probe_fp8_attention.py)."""
    e4m3, fp32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
    graph = cudnn.pygraph(io_data_type=e4m3, intermediate_data_type=fp32, compute_data_type=fp32, handle=handle)
    (q_dims, q_strides), (kv_dims, kv_strides), (out_dims, out_strides) = q_layout, kv_layout, out_layout
    q = graph.tensor(name="q", dim=q_dims, stride=q_strides, data_type=e4m3)
    k = graph.tensor(name="k", dim=kv_dims, stride=kv_strides, data_type=e4m3)
    v = graph.tensor(name="v", dim=kv_dims, stride=kv_strides, data_type=e4m3)
    scalar = {"dim": (1, 1, 1, 1), "stride": (1, 1, 1, 1), "data_type": fp32}
    dq, dk, dv, ds, ss, so = (graph.tensor(name=n, **scalar) for n in ("dq", "dk", "dv", "ds", "ss", "so"))
    out, _, amax_s, amax_o = graph.sdpa_fp8(
        q=q, k=k, v=v, descale_q=dq, descale_k=dk, descale_v=dv, descale_s=ds, scale_s=ss, scale_o=so,
        attn_scale=1.0 / math.sqrt(head_dim), use_causal_mask=False, generate_stats=False,
    )
    out.set_output(True).set_dim(out_dims).set_stride(out_strides).set_data_type(e4m3)  # Hopper: FP8 output only
    for amax in (amax_s, amax_o):
        amax.set_output(True).set_dim((1, 1, 1, 1)).set_stride((1, 1, 1, 1)).set_data_type(fp32)
    graph.validate()
    graph.build_operation_graph()
    graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    graph.check_support()
    graph.build_plans()
    return graph, (q, k, v, dq, dk, dv, ds, ss, so, out, amax_s, amax_o)


@fp8_sdpa.register_kernel("cuda")
def _fp8_sdpa_cuda(q8, k8, v8, descale_q, descale_k, descale_v):
    _check_inputs(q8, k8, v8, descale_q, descale_k, descale_v)
    cudnn = import_cudnn()
    q8, k8, v8 = q8.contiguous(), k8.contiguous(), v8.contiguous()
    device = q8.device
    index = device.index if device.index is not None else torch.cuda.current_device()
    o8 = torch.empty(q8.shape, dtype=FP8, device=device)  # contiguous (B, S, H, D)
    q_layout, kv_layout, out_layout = _bhsd(q8), _bhsd(k8), _bhsd(o8)
    key = (q_layout, kv_layout, out_layout, index)
    stream = torch.cuda.current_stream(device)
    with _lock:
        if (index not in _handles or key not in _graphs) and torch.cuda.is_current_stream_capturing():
            # building a cuDNN graph (and the one-time constants) cannot happen inside a CUDA graph capture
            raise UnsupportedCallError(
                f"{OP_NAME}: first call for q {q_layout[0]}, kv {kv_layout[0]} is inside a CUDA graph capture",
                "run the shape once outside the capture (a warm-up step) before capturing it",
            )
        if index not in _handles:
            with torch.cuda.device(index):
                _handles[index] = cudnn.create_handle()
            one = torch.ones(1, 1, 1, 1, device=device, dtype=torch.float32)
            _constants[index] = (one / FP8_MAX, one * FP8_MAX)  # probabilities lie in [0, 1]
            torch.cuda.synchronize(index)  # once: later calls read them from any stream
        handle = _handles[index]
        if key not in _graphs:
            _graphs[key] = build_fp8_sdpa_graph(cudnn, handle, q_layout, kv_layout, out_layout, q8.shape[-1])
        graph, (tq, tk, tv, dq, dk, dv, ds, ss, so, to, tas, tao) = _graphs[key]
        descale_s, scale_s = _constants[index]
        workspace = torch.empty(graph.get_workspace_size(), device=device, dtype=torch.uint8)
        amax_s, amax_o = (torch.empty(1, 1, 1, 1, device=device, dtype=torch.float32) for _ in range(2))
        scale_o = descale_v.reshape(1, 1, 1, 1).float().reciprocal()  # O shares V's scale
        pack = {tq: q8, tk: k8, tv: v8, dq: descale_q.reshape(1, 1, 1, 1), dk: descale_k.reshape(1, 1, 1, 1),
                dv: descale_v.reshape(1, 1, 1, 1), ds: descale_s, ss: scale_s, so: scale_o, to: o8,
                tas: amax_s, tao: amax_o}
        cudnn.set_stream(handle=handle, stream=stream.cuda_stream)  # torch's current stream, every call
        graph.execute(pack, workspace, handle=handle)
    return o8


# ----- the attention function diffusers' Flux processor calls -----

def fp8_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask=None,
                  dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                  enable_gqa: bool = False, attention_kwargs: dict | None = None, *, backend=None,
                  parallel_config=None, min_tokens: int = 0) -> torch.Tensor:
    """Drop-in for diffusers' `dispatch_attention_fn` (same signature) on (B, S, H, D) tensors: FP8
    attention through `aotpack::fp8_sdpa`, returned (B, S, H, D) in the query's dtype. `backend` is
    ignored (FP8 is the backend); anything the FP8 kernel cannot honour is refused, never dropped.

    `min_tokens` > 0 (recipe `fp8_attention_min_tokens`): sequences shorter than that run bf16 attention
    instead, chosen per call by a `torch.cond` on the token count, which export keeps as a branch of the
    program (decided on the host from the input's shape: no device sync, CUDA graphs capture one branch
    per shape). Why: FP8 attention at every length cost 1.5 ms of kernel time a 512^2 step (1536 tokens:
    the kernel saved nothing, the q/k/v quantization is extra) and saved 3% at 1024^2, 17% at 2048^2 (H200,
    random weights, benchmarks/results/2026-12-03m-h200-fp8-attention/). The price of the branch: Inductor
    cannot fuse the quantization into the kernels before the cond, and the bf16 branch is a Python op.
    There, below the threshold: kernel time +0.3 ms a 512^2 step over the `cudnn` package, but 24 ms more
    host time in a plain (ungraphed) chain; above it, not measured yet. Opt-in until it is."""
    unsupported = {
        "attn_mask": attn_mask is not None,
        "dropout_p": bool(dropout_p),
        "is_causal": bool(is_causal),
        "scale": scale is not None and not math.isclose(scale, 1.0 / math.sqrt(query.shape[-1])),
        "enable_gqa": bool(enable_gqa) or key.shape[2] != query.shape[2],
        "attention_kwargs": bool(attention_kwargs),
        "parallel_config": parallel_config is not None,
    }
    refused = [name for name, present in unsupported.items() if present]
    if refused:
        raise UnsupportedCallError(
            f"attention 'cudnn_fp8' cannot honour {', '.join(refused)} (the FP8 kernel attends over every "
            "token, unmasked, with scale 1/sqrt(head_dim), as Flux does)",
            "build with attention = 'cudnn' (or sdpa) for masked, causal, dropout or context-parallel attention",
        )
    attn = current_attention_module.get()
    head_dim = query.shape[-1]
    q_bound, k_bound = ((None, None) if attn is None else
                        (rms_norm_bound(attn, "q", head_dim), rms_norm_bound(attn, "k", head_dim)))
    # torch.cond takes tensors only: the bounds that exist travel as operands, their presence in the closure
    has_bounds = (q_bound is not None, k_bound is not None)
    bounds = tuple(bound for bound in (q_bound, k_bound) if bound is not None)

    def fp8_branch(q, k, v, *given):
        given = iter(given)
        q_b, k_b = (next(given) if present else None for present in has_bounds)
        return _fp8_attention(q, k, v, q_b, k_b)

    def bf16_branch(q, k, v, *given):
        return bf16_attention(q, k, v)

    return by_token_count(query.shape[1], min_tokens, fp8_branch, bf16_branch, (query, key, value, *bounds))


def by_token_count(tokens, min_tokens: int, fp8_branch, bf16_branch, operands: tuple) -> torch.Tensor:
    """`fp8_branch(*operands)` from `min_tokens` joint tokens on (always when it is 0 or less), `bf16_branch`
    below: a `torch.cond` that export keeps in the program, decided per call on the host from the shapes."""
    if min_tokens <= 0:
        return fp8_branch(*operands)
    flat, rebuild = unaliased(operands)  # cond refuses operands that alias (joined_qkv's q/k column slices)
    return torch.cond(tokens >= min_tokens, lambda *inputs: fp8_branch(*rebuild(*inputs)),
                      lambda *inputs: bf16_branch(*rebuild(*inputs)), flat)


def min_tokens_of(attention_fn) -> int | None:
    """The `min_tokens` that `attention_fn` (what Flux's processor calls as `dispatch_attention_fn`) runs FP8
    attention from (0: every length), or None when it is not `fp8_attention` (`attention.attention_context`
    installs it, with `min_tokens` bound by `functools.partial` when the recipe sets one)."""
    if attention_fn is fp8_attention:
        return 0
    if (isinstance(attention_fn, functools.partial) and attention_fn.func is fp8_attention and not attention_fn.args
            and set(attention_fn.keywords) <= {"min_tokens"}):
        return attention_fn.keywords.get("min_tokens", 0)
    return None


def attend_quantized(q8: torch.Tensor, descale_q: torch.Tensor, k8: torch.Tensor, descale_k: torch.Tensor,
                     value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """FP8 attention of quantized q/k and `value` (quantized here at its amax), returned (B, S, H, D) in `dtype`."""
    v8, descale_v = quantize(value.contiguous())  # no norm before V: its amax, a pass over V (abs_max)
    out8 = torch.ops.aotpack.fp8_sdpa(q8.contiguous(), k8.contiguous(), v8.contiguous(), descale_q, descale_k,
                                      descale_v)
    return (out8.float() * descale_v).to(dtype)


def _fp8_attention(query, key, value, q_bound, k_bound) -> torch.Tensor:
    (q8, descale_q), (k8, descale_k) = quantize(query.contiguous(), q_bound), quantize(key.contiguous(), k_bound)
    return attend_quantized(q8, descale_q, k8, descale_k, value, query.dtype)


def bf16_attention(query, key, value) -> torch.Tensor:
    return torch.ops.aotpack.bf16_sdpa(query.contiguous(), key.contiguous(), value.contiguous())


# The bf16 branch as an op of its own: aten's cuDNN attention, named in the branch, returns SymInt outputs
# (max_q, max_k) that `torch.export.save` cannot serialize inside a torch.cond branch ("Unhandled output type
# SymInt", H200 build, 2026-12-03; the build saves exported programs for its compile workers). Same kernel as
# the `cudnn` recipes (the SDPA backend is picked in the op, at run time).
@torch.library.custom_op(BF16_OP_NAME, mutates_args=(), device_types="cpu")
def bf16_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention of (B, S, H, D) q/k/v in their dtype, scale 1/sqrt(D); returns (B, S, H, D), contiguous."""
    return F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2).contiguous()


@bf16_sdpa.register_fake
def _(q, k, v):
    return q.new_empty(q.shape)


@bf16_sdpa.register_kernel("cuda")
def _bf16_sdpa_cuda(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)))
    return out.transpose(1, 2).contiguous()
