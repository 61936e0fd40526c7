"""Activation quantization (issue 11): how fast can Inductor fuse "op + row-wise FP8 quantization"?

The kernel breakdown puts ~17 ms of a 1024² step in the fused "GELU / LayerNorm + row amax + FP8 store"
kernels, 2-3x above what their bytes need. Inductor generates them as looped reductions (two passes
over each row: amax, then quantize, recomputing the GELU) because the rows (3072..15360) exceed its
persistent-reduction limit (1024 for inner reductions). This probe times the three shapes of a
FLUX.1-dev step, each as `torch.compile` of the same torchao FP8 row-wise linear the package uses,
under several Inductor settings, and a hand-written single-pass Triton kernel as the ceiling. Each
variant also runs twice on the same inputs to check that its output repeats bit for bit.

Caches must be off, or a variant gets an earlier variant's compiled graph (the choices override
is not part of Inductor's cache key): run on the GPU machine
`TORCHINDUCTOR_FORCE_DISABLE_CACHES=1 python3 scripts/gpu/probe_quant_fusion.py $OUT/probe_quant_fusion.json` (writes
the report after each variant).
"""

import json
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, ".")
from aotpack.models.activations import gelu_tanh_via_sigmoid  # noqa: E402  x * sigmoid(2u)

FP8 = torch.float8_e4m3fn
TOKENS = 4608  # 1024²: 4096 image + 512 text tokens


def fp8_linear(in_features, out_features):
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    lin = nn.Linear(in_features, out_features, bias=False, device="cuda", dtype=torch.bfloat16)
    quantize_(lin, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
    return lin


def cases(gelu=lambda x: F.gelu(x, approximate="tanh")):
    """(name, function, inputs, count per step)."""
    single_out = fp8_linear(15360, 3072)
    ff_out = fp8_linear(12288, 3072)
    qkv = fp8_linear(3072, 9216)
    g = torch.Generator(device="cuda").manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, device="cuda", generator=g, dtype=torch.bfloat16)

    def single(attn, mlp):
        return single_out(torch.cat([attn, gelu(mlp)], dim=-1))

    def ff(h):
        return ff_out(gelu(h))

    def norm_mod(x, shift, scale):
        return qkv(F.layer_norm(x, (3072,), eps=1e-6) * (1 + scale) + shift)

    return [
        ("single_gelu_cat_quant", single, (rnd(1, TOKENS, 3072), rnd(1, TOKENS, 12288)), 38),
        ("double_ff_gelu_quant_img", ff, (rnd(1, 4096, 12288),), 19),
        ("double_ff_gelu_quant_txt", ff, (rnd(1, 512, 12288),), 19),
        ("layernorm_modulate_quant", norm_mod, (rnd(1, 4096, 3072), rnd(1, 1, 3072), rnd(1, 1, 3072)), 57 + 19),
    ]


def persistent_choices(limit):
    from torch._inductor.choices import InductorChoices
    from torch._inductor.runtime.hints import ReductionHint
    from torch._inductor.virtualized import V

    class Persistent(InductorChoices):
        @staticmethod
        def should_use_persistent_reduction(features, cooperative_reduction):
            if features.get_reduction_hint() == ReductionHint.INNER and V.graph.sizevars.statically_known_leq(
                    features.reduction_numel, limit):
                FORCED.append(str(features.reduction_numel))
                return True
            return InductorChoices.should_use_persistent_reduction(features, cooperative_reduction)

    return Persistent()


FORCED: list[str] = []  # reductions the override made persistent

VARIANTS = {
    "default": {},
    "coordinate_descent": {"coordinate_descent_tuning": True},
    "persistent_16384": {"choices": 16384},
    "persistent_16384_cdt": {"choices": 16384, "coordinate_descent_tuning": True},
    "multi_kernel": {"triton.multi_kernel": 1},
    "gelu_via_sigmoid": {"gelu": gelu_tanh_via_sigmoid},
    "gelu_via_sigmoid_persistent": {"gelu": gelu_tanh_via_sigmoid, "choices": 16384},
}


def timed(fn, args, repeats=20):
    for _ in range(3):
        fn(*args)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        fn(*args)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def triton_ms(fn, args):
    """CUDA time per call of the Triton kernels (the fused quantization), from the profiler."""
    from torch.profiler import ProfilerActivity, profile

    fn(*args)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            fn(*args)
        torch.cuda.synchronize()
    total, names = 0.0, set()
    for evt in prof.key_averages():
        if evt.key.startswith("triton"):
            total += evt.device_time_total
            names.add(evt.key[:90])
    return total / 5 / 1000, sorted(names)


def run_variant(name, settings, all_cases):
    import torch._dynamo
    import torch._inductor.config as ic
    from torch._inductor.virtualized import V

    torch._dynamo.reset()
    patch = {k: v for k, v in settings.items() if k not in ("choices", "gelu")}
    if "gelu" in settings:
        all_cases = cases(settings["gelu"])
    if "choices" in settings:
        V.set_choices_handler(persistent_choices(settings["choices"]))
    rows = {}
    try:
        with ic.patch(patch):
            for case, fn, args, count in all_cases:
                FORCED.clear()
                compiled = torch.compile(fn, fullgraph=True)
                first = compiled(*args)
                second = compiled(*args)
                ms = timed(compiled, args)
                kernel_ms, kernels = triton_ms(compiled, args)
                rows[case] = {"forced_persistent": list(FORCED), "call_ms": round(ms, 4), "triton_ms": round(kernel_ms, 4),
                              "triton_ms_per_step": round(kernel_ms * count, 3),
                              "repeats_bit_for_bit": bool(torch.equal(first, second)), "kernels": kernels}
    finally:
        if "choices" in settings:
            from torch._inductor.choices import InductorChoices
            V.set_choices_handler(InductorChoices())
    return rows


def hand_written(all_cases):
    """Single pass per row: load, GELU once, amax, scale, store FP8; then the same `_scaled_mm`."""
    import triton
    import triton.language as tl

    @triton.jit
    def gelu_cat_quant(attn_ptr, mlp_ptr, out_ptr, scale_ptr, A: tl.constexpr, M: tl.constexpr,
                       BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        in_attn = cols < A
        in_mlp = (cols >= A) & (cols < A + M)
        a = tl.load(attn_ptr + row * A + cols, mask=in_attn, other=0.0).to(tl.float32)
        m = tl.load(mlp_ptr + row * M + (cols - A), mask=in_mlp, other=0.0).to(tl.float32)
        inner = 0.7978845608028654 * (m + 0.044715 * m * m * m)
        g = 0.5 * m * (1.0 + (2.0 * tl.sigmoid(2.0 * inner) - 1.0))
        h = tl.where(in_attn, a, g).to(tl.bfloat16).to(tl.float32)
        amax = tl.max(tl.abs(h), axis=0)
        scale = tl.maximum(amax, 1e-12) / 448.0
        q = tl.clamp(h / scale, -448.0, 448.0)
        tl.store(out_ptr + row * (A + M) + cols, q.to(tl.float8e4nv), mask=cols < A + M)
        tl.store(scale_ptr + row, scale)

    result = {}
    for case, fn, args, count in all_cases[:2]:
        attn, mlp = args if len(args) == 2 else (args[0], args[0])
        prefix = attn.shape[-1] if len(args) == 2 else 0
        rows_n = mlp.shape[1]
        out = torch.empty(rows_n, prefix + 12288, device="cuda", dtype=FP8)
        scale = torch.empty(rows_n, 1, device="cuda", dtype=torch.float32)
        for warps in (8, 16, 32):
            def quant(attn=attn, mlp=mlp, warps=warps, prefix=prefix, out=out, scale=scale, rows_n=rows_n):
                gelu_cat_quant[(rows_n,)](attn, mlp, out, scale, prefix, 12288, BLOCK=16384, num_warps=warps)
                return out

            first = quant().clone()
            ms = timed(quant, ())
            result[f"{case}_hand_written_{warps}w"] = {
                "triton_ms": round(ms, 4), "triton_ms_per_step": round(ms * count, 3),
                "repeats_bit_for_bit": bool(torch.equal(first.view(torch.uint8), quant().view(torch.uint8)))}
        result[f"{case}_bytes_mb"] = round(rows_n * (prefix + 12288) * 3 / 1e6, 1)  # bf16 read + FP8 write
    return result


def main():
    out_path = sys.argv[1]
    all_cases = cases()
    report = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(), "tokens": TOKENS}
    try:
        report["hand_written"] = hand_written(all_cases)
    except Exception as err:
        report["hand_written"] = {"error": f"{type(err).__name__}: {str(err)[:400]}"}
    chosen = os.environ.get("PROBE_VARIANTS", "").split() or list(VARIANTS)
    for name in chosen:
        settings = VARIANTS[name]
        try:
            report[name] = run_variant(name, settings, all_cases)
        except Exception as err:  # a variant that does not compile is a result too
            report[name] = {"error": f"{type(err).__name__}: {str(err)[:400]}"}
        print(name, json.dumps(report[name])[:600], file=sys.stderr, flush=True)
        with open(out_path, "w") as f:  # after each variant: a timed-out call keeps what it measured
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
