"""FP8 attention (`attention = "cudnn_fp8"`) on the CPU: the reference op `aotpack::fp8_sdpa`, the Flux
attention function built on it, and a real AOTInductor package whose compiled programs call the op at run
time through the dispatcher, loaded by the runtime and compared with eager diffusers.

The CPU op is a reference (fp32 attention on dequantized e4m3 q/k/v, e4m3 output); cuDNN's kernel
also quantizes the softmax probabilities, so the GPU error is a little larger (5.9e-2 vs fp32 on the
H200, see aotpack/models/fp8_attention.py).
"""

from __future__ import annotations

import math
import zipfile

import pytest
import torch
import torch.nn.functional as F
from reference import cpu_test_recipe, latents, rel_error

from aotpack.errors import PackageMismatchError, RecipeError, UnsupportedCallError
from aotpack.models.attention import (
    attention_context,
    check_attention_runs_here,
    kernels_in_package,
)
from aotpack.models.fp8_attention import FP8, FP8_MAX, abs_max, fp8_attention, quantize

# each program / the whole transformer vs eager fp32 attention: FP8 attention's own error (2e-2 measured)
RECIPE = cpu_test_recipe("cpu-fp8-attention", """
dtype = "float32"
attention = "cudnn_fp8"
max_rank = 8
""", tolerance=0.1, end_to_end=0.1)


def _qkv(shape, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(shape, generator=generator).to(dtype) for _ in range(3))


def _sdpa_bshd(q, k, v):
    return F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)


def test_cpu_op_is_attention_on_the_dequantized_inputs():
    """The op's e4m3 output is the e4m3 rounding (with V's scale) of exact attention on the dequantized
    q/k/v, computed here the plain way (einsum, softmax) in float64."""
    (q8, dq), (k8, dk), (v8, dv) = (quantize(t) for t in _qkv((2, 96, 4, 64)))
    out8 = torch.ops.aotpack.fp8_sdpa(q8, k8, v8, dq, dk, dv)
    assert out8.dtype == FP8 and out8.shape == (2, 96, 4, 64) and out8.is_contiguous()
    q, k, v = (t.double() * s.double() for t, s in ((q8, dq), (k8, dk), (v8, dv)))
    weights = (torch.einsum("bshd,bthd->bhst", q, k) / math.sqrt(64)).softmax(dim=-1)
    exact = torch.einsum("bhst,bthd->bshd", weights, v)
    expected8 = (exact / dv.double()).clamp(-FP8_MAX, FP8_MAX).float().to(FP8)
    ours, expected = out8.float() * dv, expected8.float() * dv
    # fp32 vs fp64 rounding moves a value across an e4m3 rounding boundary very rarely (1.5e-5 measured)
    assert (ours != expected).float().mean() < 1e-3
    assert rel_error(ours, expected) < 1e-4
    assert 0.01 < rel_error(ours, exact) < 0.04  # e4m3's 3 mantissa bits: 2.6e-2 measured


@pytest.mark.parametrize("shape", [(2, 96, 4, 64), (1, 7, 3, 5), (11,)])
def test_abs_max_by_rows_is_the_whole_tensors_amax(shape):
    """V's scale reduces row by row, then over rows (faster on the GPU): the same value as one full reduction,
    a negative extreme included."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.bfloat16)
    x.view(-1)[x.numel() // 3] = -9.5
    assert abs_max(x).item() == x.abs().amax().item() == 9.5
    assert abs_max(x).dtype == x.dtype and abs_max(x).shape == ()


def test_fake_impl_shapes_and_checks():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q8 = torch.empty(2, 40, 3, 16, dtype=FP8)
        k8 = v8 = torch.empty(2, 24, 3, 16, dtype=FP8)
        scale = torch.ones(1, 1, 1, 1)
        out = torch.ops.aotpack.fp8_sdpa(q8, k8, v8, scale, scale, scale)
        assert (out.shape, out.dtype, out.device.type, out.is_contiguous()) == ((2, 40, 3, 16), FP8, "cpu", True)
        with pytest.raises(RuntimeError, match="float8_e4m3fn"):
            torch.ops.aotpack.fp8_sdpa(q8.float(), k8, v8, scale, scale, scale)
    (q8, dq), (k8, dk), (v8, dv) = (quantize(t) for t in _qkv((1, 24, 2, 16)))
    torch.library.opcheck(torch.ops.aotpack.fp8_sdpa.default, (q8, k8, v8, dq, dk, dv),
                          test_utils="test_faketensor")  # test_schema compares fp8 outputs with a mul fp8 lacks


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_attention_error_is_fp8_sized(dtype):
    """Flux layout (B, S, H, D): 5.4e-2 off fp32 attention, ~15x bf16 attention's 3.7e-3 (CPU, measured)."""
    q, k, v = _qkv((2, 256, 4, 64), dtype)
    exact = _sdpa_bshd(q.float(), k.float(), v.float())
    out = fp8_attention(q, k, v)
    assert out.dtype == dtype and out.shape == q.shape
    error = rel_error(out, exact)
    assert 0.03 < error < 0.1
    bf16_error = rel_error(_sdpa_bshd(q.bfloat16(), k.bfloat16(), v.bfloat16()), exact)
    assert error > 5 * bf16_error


def test_fp8_attention_refuses_what_it_cannot_honour():
    q, k, v = _qkv((1, 16, 2, 16))
    with pytest.raises(UnsupportedCallError, match="attn_mask") as caught:
        fp8_attention(q, k, v, attn_mask=torch.ones(1, 1, 16, 16, dtype=torch.bool))
    assert "cudnn" in caught.value.fix
    with pytest.raises(UnsupportedCallError, match="is_causal"):
        fp8_attention(q, k, v, is_causal=True)
    with pytest.raises(UnsupportedCallError, match="scale"):
        fp8_attention(q, k, v, scale=0.5)
    assert fp8_attention(q, k, v, scale=1 / 4.0).shape == q.shape  # 1/sqrt(16): the kernel's own scale


def test_attention_context_routes_flux_attention_and_restores_it():
    from diffusers.models.transformers import transformer_flux

    from aotpack.models.examples import transformer_inputs
    from aotpack.models.tiny import make_transformer

    original = transformer_flux.dispatch_attention_fn
    transformer = make_transformer()
    inputs = transformer_inputs(transformer.config, batch=1, image_tokens=64, text_tokens=16, dtype=torch.float32,
                                device="cpu", generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exact = transformer(**inputs, return_dict=False)[0]
        with attention_context(transformer, "cudnn_fp8"):
            assert transformer_flux.dispatch_attention_fn is fp8_attention
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
                fp8 = transformer(**inputs, return_dict=False)[0]
        assert transformer_flux.dispatch_attention_fn is original
        again = transformer(**inputs, return_dict=False)[0]
    calls = [e for e in profile.events() if e.name == "aotpack::fp8_sdpa"]
    assert len(calls) == 4  # 2 double + 2 single blocks
    assert torch.equal(again, exact)
    assert 1e-3 < rel_error(fp8, exact) < 0.05  # 1.5e-2 measured


def test_q_and_k_scales_come_from_the_norm_weights_and_bound_every_value(monkeypatch):
    """q/k take their FP8 scale from sqrt(head_dim) * max|RMSNorm weight| (no amax pass over the
    activations); with random norm weights up to 3, every q/k value lies within that bound, V still takes
    its amax, and the output stays as close to exact attention as with amax scales."""
    import aotpack.models.fp8_attention as fp8_module
    from aotpack.models.examples import transformer_inputs
    from aotpack.models.tiny import make_transformer

    transformer = make_transformer()
    generator = torch.Generator().manual_seed(3)
    for module in transformer.modules():
        if isinstance(module, torch.nn.RMSNorm):
            module.weight.data = torch.rand(module.weight.shape, generator=generator) * 3
    inputs = transformer_inputs(transformer.config, batch=1, image_tokens=64, text_tokens=16, dtype=torch.float32,
                                device="cpu", generator=torch.Generator().manual_seed(0))
    seen, original_quantize = [], fp8_module.quantize

    def spy(x, bound=None):
        seen.append((float(x.abs().amax()), None if bound is None else float(bound)))
        return original_quantize(x, bound)

    with torch.no_grad():
        exact = transformer(**inputs, return_dict=False)[0]
        with attention_context(transformer, "cudnn_fp8"):
            bounded = transformer(**inputs, return_dict=False)[0]
            monkeypatch.setattr(fp8_module, "quantize", spy)
            transformer(**inputs, return_dict=False)
            monkeypatch.setattr(fp8_module, "quantize", original_quantize)
            monkeypatch.setattr(fp8_module, "rms_norm_bound", lambda *args: None)  # amax scales for q/k too
            amax_scaled = transformer(**inputs, return_dict=False)[0]
    assert len(seen) == 12
    calls = [seen[i:i + 3] for i in range(0, 12, 3)]  # (q, k, v) per block, 4 blocks
    for (q_amax, q_bound), (k_amax, k_bound), (_, v_bound) in calls:
        assert q_bound is not None and k_bound is not None and v_bound is None
        assert q_amax <= q_bound and k_amax <= k_bound
        assert q_bound < 40 * q_amax  # a bound, not a guess: within sqrt(128) * 3 of the values
    # measured: 2.4e-2 with the norm bounds, 2.5e-2 with amax scales (loose scales cost e4m3 no precision)
    assert 1e-3 < rel_error(bounded, exact) < 1.5 * rel_error(amax_scaled, exact)


def test_check_attention_runs_here_needs_the_cudnn_frontend_on_cuda(monkeypatch):
    import sys

    check_attention_runs_here("cudnn_fp8")  # CPU: the registered reference op is all it needs
    assert torch.ops.aotpack.fp8_sdpa.default is not None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "cudnn", None)  # makes `import cudnn` raise ImportError
    with pytest.raises(PackageMismatchError, match="cudnn_fp8") as caught:
        check_attention_runs_here("cudnn_fp8")
    assert "pip install nvidia-cudnn-frontend" in caught.value.fix
    check_attention_runs_here("cudnn")  # other backends are unaffected


def test_explicit_fp8_attention_with_parallel_ulysses_is_refused_before_any_work(tmp_path):
    from aotpack.builder.build import build_package

    recipe = tmp_path / "fp8-attention.toml"
    recipe.write_text(RECIPE)
    with pytest.raises(RecipeError) as caught:
        build_package("tiny", str(recipe), out=tmp_path / "pkg", parallel="ulysses", attention="cudnn_fp8",
                      progress=False)
    assert "'cudnn_fp8'" in str(caught.value) and "'ulysses'" in str(caught.value)
    assert "--attention cudnn" in caught.value.fix
    assert not (tmp_path / "pkg").exists()


def test_parallel_ulysses_takes_bf16_attention_where_the_recipe_chose_fp8(caplog):
    """`build --target h200 --parallel ulysses` works: context-parallel attention runs in the runtime, in bf16
    cuDNN, so the recipe's FP8 attention (and its token threshold) gives way, with a warning that says so."""
    from aotpack.builder.build import apply_overrides
    from aotpack.recipes.recipe import load_recipe

    h200 = load_recipe("h200")
    assert (h200.attention, h200.fp8_attention_min_tokens) == ("cudnn_fp8", 4096)
    with caplog.at_level("WARNING", logger="aotpack"):
        split = apply_overrides(h200, parallel="ulysses")
    assert (split.attention, split.fp8_attention_min_tokens, split.parallel) == ("cudnn", 0, "ulysses")
    assert "'cudnn_fp8'" in caplog.text and "h200" in caplog.text and "'cudnn'" in caplog.text
    bf16 = apply_overrides(h200, attention="cudnn")  # `build --attention cudnn`: bf16 at every length
    assert (bf16.attention, bf16.fp8_attention_min_tokens, bf16.parallel) == ("cudnn", 0, "none")
    assert apply_overrides(h200, attention="cudnn_fp8").fp8_attention_min_tokens == 4096  # the recipe's threshold
    with pytest.raises(RecipeError) as caught:
        apply_overrides(h200, attention="xformers")
    assert "'xformers'" in caught.value.problem and "cudnn_fp8" in caught.value.fix


@pytest.fixture(scope="module")
def fp8_attention_package(tmp_path_factory):
    """The tiny model for the CPU with FP8 attention; base-only (max_rank 0: 4 programs, ~30 s to build)."""
    from aotpack.builder.build import build_package

    recipe = tmp_path_factory.mktemp("recipe") / "cpu-fp8-attention.toml"
    recipe.write_text(RECIPE)
    return build_package("tiny", str(recipe), out=tmp_path_factory.mktemp("pkg") / "fp8-attention", max_rank=0,
                         progress=False)


def test_package_calls_the_fp8_op(fp8_attention_package):
    from aotpack.store.manifest import read_manifest

    manifest = read_manifest(fp8_attention_package)
    assert manifest.attention == "cudnn_fp8" and manifest.recipe["attention"] == "cudnn_fp8"
    kernels = {p.name: p.attention_kernels for p in manifest.programs}
    assert kernels == {"prologue": [], "double_block": ["cudnn_fp8"], "single_block": ["cudnn_fp8"], "epilogue": []}
    assert kernels_in_package(fp8_attention_package / "double_block.pt2") == ["cudnn_fp8"]
    with zipfile.ZipFile(fp8_attention_package / "double_block.pt2") as archive:
        # AOTInductor calls a custom op through its proxy executor, which reads the op from this json
        extern = [n for n in archive.namelist() if n.endswith("wrapper.json")]
        assert len(extern) == 1 and '"target": "aotpack::fp8_sdpa"' in archive.read(extern[0]).decode()
    errors = manifest.validation["program_rel_errors"]
    assert 1e-3 < errors["double_block"] < 0.1 and 1e-3 < errors["single_block"] < 0.1  # 2.3e-2, 9.7e-3 measured
    assert errors["prologue"] < 1e-4  # no attention there


def test_runtime_runs_the_package_like_eager_fp8_and_near_diffusers(fp8_attention_package):
    import aotpack
    from aotpack.models.examples import transformer_inputs
    from aotpack.models.tiny import make_pipeline

    served = aotpack.load(fp8_attention_package, model="tiny")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        ours = latents(served, max_sequence_length=16)
    calls = [e for e in profile.events() if e.name == "aotpack::fp8_sdpa"]
    assert len(calls) == 3 * 4  # the compiled blocks call the op: 3 steps x (2 double + 2 single blocks)

    # Each program vs its eager region on identical inputs: the same op on the same quantized values
    # (~1e-7 measured), where eager fp32 attention is FP8's own error away (3e-2 to 6e-2 for a double block).
    inputs = transformer_inputs(served.transformer.config, batch=2, image_tokens=32, text_tokens=12,
                                dtype=torch.float32, device="cpu", generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        with attention_context(None, "cudnn_fp8"):
            same_op = served.transformer.program_errors(inputs)
        fp32_attention = served.transformer.program_errors(inputs)
    assert max(same_op.values()) < 1e-5, same_op
    assert 1e-2 < fp32_attention["double_block"] < 0.1 and 1e-3 < fp32_attention["single_block"] < 0.1

    eager = make_pipeline()
    diffusers_latents = latents(eager, max_sequence_length=16)
    with attention_context(eager.transformer, "cudnn_fp8"):
        eager_fp8 = latents(eager, max_sequence_length=16)
    assert ours.shape == diffusers_latents.shape == (1, 16, 16)
    # One forward of the whole compiled transformer vs eager under the FP8 context. The programs' ~1e-6
    # fp32 differences (prologue casts, fused matmuls) move a few q/k/v values across an e4m3 rounding
    # boundary, each by 1/16 of itself: 7e-5 to 1.5e-3 measured over seeds. FP8 attention's own effect is
    # 1.2e-2. Over 3 denoising steps those flips grow to ~1e-2 of the latents (8e-4 and 8.6e-3 measured
    # in two runs), so latents are only checked against diffusers below.
    forward_inputs = transformer_inputs(served.transformer.config, batch=1, image_tokens=256, text_tokens=16,
                                        dtype=torch.float32, device="cpu", generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        compiled = served.transformer(**forward_inputs, return_dict=False)[0]
        plain = eager.transformer(**forward_inputs, return_dict=False)[0]
        with attention_context(eager.transformer, "cudnn_fp8"):
            eager_forward = eager.transformer(**forward_inputs, return_dict=False)[0]
    assert rel_error(compiled, eager_forward) < 3e-3 < 1e-2 < rel_error(eager_forward, plain)
    assert rel_error(ours, eager_fp8) < rel_error(eager_fp8, diffusers_latents)
    assert 5e-3 < rel_error(ours, diffusers_latents) < 0.1


@pytest.mark.parametrize("fp8_qk", [False, True], ids=["quantize-q-k-apart", "fp8_qk_in_norm_rope"])
def test_min_tokens_takes_bf16_attention_below_it_and_fp8_from_it(tmp_path, fp8_qk):
    """`fp8_attention_min_tokens`: one package, a branch per call on the joint token count (a torch.cond that
    export keeps): bf16 (here fp32) attention below the threshold, equal to eager diffusers, and the FP8 op
    from it, equal to eager under the FP8 context. With `fp8_qk_in_norm_rope` the q/k norm + RoPE op moves into
    the branches (e4m3 q/k in the FP8 one): the same results."""
    import aotpack
    from aotpack.builder.build import build_package
    from aotpack.models.examples import transformer_inputs
    from aotpack.models.tiny import make_pipeline
    from aotpack.store.manifest import read_manifest

    recipe = tmp_path / "cpu-fp8-threshold.toml"
    lever = "\nfused_qk_norm_rope = true\nfp8_qk_in_norm_rope = true" if fp8_qk else ""
    recipe.write_text(RECIPE.replace('attention = "cudnn_fp8"',
                                     'attention = "cudnn_fp8"\nfp8_attention_min_tokens = 48' + lever))
    package = build_package("tiny", str(recipe), out=tmp_path / "pkg", max_rank=0, progress=False)
    manifest = read_manifest(package)
    assert manifest.recipe["fp8_attention_min_tokens"] == 48 and manifest.format_version == 3
    assert manifest.recipe["fp8_qk_in_norm_rope"] is fp8_qk
    kernels = {p.name: p.attention_kernels for p in manifest.programs}
    assert kernels["double_block"] == kernels["single_block"] == ["bf16_branch", "cudnn_fp8"]  # both branches

    served = aotpack.load(package, model="tiny")
    eager = make_pipeline().transformer
    for image_tokens, text_tokens, takes_fp8 in ((16, 8, False), (32, 15, False), (32, 16, True), (64, 16, True)):
        inputs = transformer_inputs(served.transformer.config, batch=1, image_tokens=image_tokens,
                                    text_tokens=text_tokens, dtype=torch.float32, device="cpu",
                                    generator=torch.Generator().manual_seed(image_tokens + text_tokens))
        with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            compiled = served.transformer(**inputs, return_dict=False)[0]
        calls = len([e for e in profile.events() if e.name == "aotpack::fp8_sdpa"])
        bf16_calls = len([e for e in profile.events() if e.name == "aotpack::bf16_sdpa"])
        assert calls + bf16_calls == 4, (calls, bf16_calls)  # 2 double + 2 single blocks, one branch each
        with torch.no_grad():
            plain = eager(**inputs, return_dict=False)[0]
            with attention_context(eager, "cudnn_fp8"):
                eager_fp8 = eager(**inputs, return_dict=False)[0]
        tokens = image_tokens + text_tokens
        if takes_fp8:
            assert calls == 4, (tokens, calls)
            assert rel_error(compiled, eager_fp8) < 3e-3 < 5e-3 < rel_error(compiled, plain), tokens  # FP8: 9.8e-3 at 80
        else:
            assert calls == 0, (tokens, calls)
            assert rel_error(compiled, plain) < 1e-4 < 1e-2 < rel_error(plain, eager_fp8), tokens  # 1.6e-5 measured


def test_min_tokens_is_checked_where_the_recipe_is_read(tmp_path):
    from aotpack.recipes.recipe import load_recipe

    for fields, problem in (('attention = "cudnn"\nfp8_attention_min_tokens = 4096', "attention = 'cudnn'"),
                            ('attention = "cudnn_fp8"\nfp8_attention_min_tokens = -1', "negative")):
        path = tmp_path / "r.toml"
        path.write_text(cpu_test_recipe("r", f'dtype = "float32"\n{fields}\nmax_rank = 8', tolerance=0.1,
                                        end_to_end=0.1))
        with pytest.raises(RecipeError, match="fp8_attention_min_tokens") as caught:
            load_recipe(path)
        assert problem in str(caught.value)
