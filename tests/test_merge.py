"""Merged hot adapters: `set_loras(..., merge=True)` folds the set into the bound weights in place,
runs the no-slot programs, and unmerging restores every touched weight bit for bit."""

from __future__ import annotations

import types

import pytest
import torch
from reference import rel_error

from aotpack.bench.fidelity import lora_effect_error
from aotpack.runtime.merge import (
    MERGED,
    NONE,
    SLOTS,
    LoRAModes,
    _requantize_rows_into,
    _weight_storages,
)

FIDELITY_LIMIT = 0.10  # issue 11's goal for every mode
PEFT_TOLERANCE = 1e-4  # float32 on the CPU: merged weights vs PEFT fuse_lora, same math up to rounding


def _inputs(served, seed=4):
    from aotpack.models.examples import transformer_inputs

    shapes = served.manifest.shapes
    return transformer_inputs(served.transformer.config, batch=1, image_tokens=shapes["image_tokens"][0],
                              text_tokens=shapes["text_tokens"][0] + 2, dtype=torch.float32, device="cpu",
                              generator=torch.Generator().manual_seed(seed))


def _high_precision(weight) -> torch.Tensor:
    """The float32 value of a (possibly FP8 row-wise) weight."""
    if hasattr(weight, "qdata"):
        return weight.qdata.float() * weight.scale.float()
    return weight.detach().float()


def _run(model, inputs):
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def _snapshot(compiled) -> dict[str, list[torch.Tensor]]:
    owner = compiled._weights_owner
    return {spec.name: [t.clone() for t in _weight_storages(owner.get_submodule(spec.name).base.weight)]
            for spec in compiled.manifest.slots}


def _base_then_slots(served, lora, inputs) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """From no LoRA: the touched weights' storages, the base output, then `lora` in slots and its output."""
    served.set_loras([])
    originals, base = _snapshot(served.transformer), _run(served.transformer, inputs)
    served.set_loras(lora)
    return originals, base, _run(served.transformer, inputs)


def _assert_weights_are(compiled, originals) -> None:
    """Every slotted layer's weight storages equal `originals` bit for bit."""
    for name, tensors in _snapshot(compiled).items():
        assert all(torch.equal(a, b) for a, b in zip(tensors, originals[name])), name


def _eager_peft(path, scale, inputs, fuse: bool):
    from aotpack.models.checkpoint import load_transformer, parse_model_ref

    eager = load_transformer(parse_model_ref("tiny"), torch.float32, "cpu").eval()
    base = _run(eager, inputs)
    eager.load_lora_adapter(str(path), adapter_name="x", prefix="transformer")
    eager.set_adapters(["x"], [scale])
    if fuse:
        eager.fuse_lora(lora_scale=1.0, adapter_names=["x"])
        eager.unload_lora()  # only the fused weights remain: plain linears
    return base, _run(eager, inputs)


def test_merge_matches_fused_peft_and_unmerge_is_bit_identical(served_tiny, demo_loras):
    compiled = served_tiny.transformer
    path, scale = demo_loras["tiny-style-mlp"], 0.8
    inputs = _inputs(served_tiny)
    originals, base, slots = _base_then_slots(served_tiny, [(path, scale)], inputs)
    assert compiled.last_variant == "slots" and compiled.lora_modes.mode == SLOTS

    served_tiny.set_loras([(path, scale)], merge=True)
    try:
        assert compiled.merged and compiled.lora_modes.mode == MERGED and compiled.bank.is_empty
        merged = _run(compiled, inputs)
        assert compiled.last_variant == "no_slots"
        touched = [n for n, before in _snapshot(compiled).items() if not torch.equal(before[0], originals[n][0])]
        assert touched  # in place: the very storages the programs read now hold W + scale * B A
        ref_base, ref_fused = _eager_peft(path, scale, inputs, fuse=True)
        assert rel_error(merged, ref_fused) <= PEFT_TOLERANCE
        assert rel_error(merged, slots) <= PEFT_TOLERANCE
        assert lora_effect_error(merged, base, ref_fused, ref_base) <= FIDELITY_LIMIT
        assert lora_effect_error(slots, base, ref_fused, ref_base) <= FIDELITY_LIMIT
        assert rel_error(merged, base) > 1e-2  # the LoRA is live
    finally:
        served_tiny.set_loras([])
    assert not compiled.merged and compiled.lora_modes.mode in (NONE, SLOTS)
    _assert_weights_are(compiled, originals)
    assert torch.equal(_run(compiled, inputs), base)


def test_switch_away_unmerges_and_rejected_set_keeps_merge(served_tiny, demo_loras, tmp_path):
    from aotpack.errors import AotpackError

    compiled = served_tiny.transformer
    inputs = _inputs(served_tiny, seed=5)
    served_tiny.set_loras([])
    originals = _snapshot(compiled)
    served_tiny.set_loras([(demo_loras["tiny-style-mlp"], 1.0)], merge=True)
    merged_weights = _snapshot(compiled)
    merged = _run(compiled, inputs)
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(AotpackError):
        served_tiny.set_loras([(bad, 1.0)])
    assert compiled.merged and all(torch.equal(a[0], b[0]) for a, b in zip(_snapshot(compiled).values(),
                                                                             merged_weights.values()))
    assert torch.equal(_run(compiled, inputs), merged)

    other = demo_loras["tiny-style-attn"] if "tiny-style-attn" in demo_loras else demo_loras["tiny-style-mlp"]
    served_tiny.set_loras([(other, 0.5)])  # slots: the merged set leaves first
    try:
        assert not compiled.merged and compiled.lora_modes.mode == SLOTS
        _assert_weights_are(compiled, originals)
        assert compiled.last_variant is not None and _run(compiled, inputs) is not None
        assert compiled.last_variant == "slots"
    finally:
        served_tiny.set_loras([])


def test_fold_failing_midway_restores_every_weight(served_tiny, demo_loras, monkeypatch):
    """A merge that fails after some layers were folded (e.g. out of memory) leaves no half-merged set: every
    weight is back bit for bit, the bank is empty, no LoRA is reported active and the error reaches the caller."""
    from aotpack.runtime import merge as merge_module

    compiled = served_tiny.transformer
    served_tiny.set_loras([])
    originals = _snapshot(compiled)
    real_fold, folded = merge_module.fold_into, []

    def fold_then_fail(weight, parts):
        if len(folded) == 2:
            raise torch.cuda.OutOfMemoryError("simulated: no memory for the third layer")
        real_fold(weight, parts)
        folded.append(weight)

    monkeypatch.setattr(merge_module, "fold_into", fold_then_fail)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        served_tiny.set_loras([(demo_loras["tiny-style-mlp"], 1.0)], merge=True)
    assert len(folded) == 2 and not compiled.merged and compiled.lora_modes.mode == NONE and compiled.bank.is_empty
    assert served_tiny.active == []
    _assert_weights_are(compiled, originals)


def test_compiled_merge_stacks_layers_of_one_shape_and_equals_the_math_per_layer():
    """The compiled merge's calls: layers grouped by shape and by their parts' ranks, cut at `call_bytes`, each
    call's A/B the parts stacked over the layers and side by side along the rank, each B scaled. Every weight ends
    up as `merged_rows` of its own originals and factors, bit for bit (the program here is the eager math)."""
    from aotpack.models.merge_rows import merged_rows
    from aotpack.runtime.merge import CompiledMerge

    generator = torch.Generator().manual_seed(0)

    def fp8_weight(rows, cols):
        value = torch.randn(rows, cols, generator=generator)
        scale = value.abs().amax(dim=1, keepdim=True) / 448
        return types.SimpleNamespace(qdata=(value / scale).to(torch.float8_e4m3fn), scale=scale)

    def part(rows, cols, rank, *scale):
        return (torch.randn(rank, cols, generator=generator), torch.randn(rows, rank, generator=generator), *scale)

    layers = [(fp8_weight(6, 5), [part(6, 5, 4, 0.5)]) for _ in range(5)]  # 5 layers of one shape: 2 calls of 3 + 2
    layers += [(fp8_weight(6, 5), [part(6, 5, 3, 0.8), part(6, 5, 2)]) for _ in range(2)]  # a stack: its own call
    layers += [(fp8_weight(7, 5), [part(7, 5, 4)])]  # another shape
    originals = [(w.qdata.clone(), w.scale.clone()) for w, _ in layers]
    calls = []
    merge = CompiledMerge(program=lambda flat: calls.append(flat) or merged_rows(*flat), dtype=torch.bfloat16,
                          call_bytes=3 * 6 * 5)
    merge(layers)
    assert [tuple(flat[0].shape) for flat in calls] == [(3, 6, 5), (2, 6, 5), (2, 6, 5), (1, 7, 5)]
    assert [tuple(flat[2].shape) for flat in calls] == [(3, 4, 5), (2, 4, 5), (2, 5, 5), (1, 4, 5)]
    assert all(flat[2].dtype == flat[3].dtype == torch.bfloat16 for flat in calls)
    for (weight, parts), (qdata, scale) in zip(layers, originals):
        a = torch.cat([a for a, *_ in parts]).bfloat16()
        b = torch.cat([torch.mul(b.bfloat16(), s[0] if s else 1.0) for _, b, *s in parts], dim=1)
        expected_qdata, expected_scale = merged_rows(qdata[None], scale[None], a[None], b[None])
        assert torch.equal(weight.qdata.view(torch.uint8), expected_qdata[0].view(torch.uint8))
        assert torch.equal(weight.scale, expected_scale[0])
        assert not torch.equal(weight.qdata.view(torch.uint8), qdata.view(torch.uint8))


def test_merge_estimate_finds_a_weak_lora_that_fp8_rounding_would_lose():
    """`estimate_merge` runs the merge's math on sampled rows of sampled layers: a LoRA whose product is 30% of the
    weights (RMS) survives the FP8 re-rounding nearly whole, one at 1% mostly rounds away (large error, low
    strength); the sampled estimate agrees with the whole merge's own numbers, and a merge that touches no FP8 weight
    has nothing to estimate."""
    from aotpack.models.merge_rows import merged_rows
    from aotpack.runtime.merge_check import LAYERS, ROWS_PER_LAYER, estimate_merge

    generator = torch.Generator().manual_seed(5)

    def layer(rows, cols, relative):
        value = torch.randn(rows, cols, generator=generator) / cols**0.5
        scale = value.abs().amax(dim=1, keepdim=True) / 448
        weight = types.SimpleNamespace(qdata=(value / scale).to(torch.float8_e4m3fn), scale=scale)
        a, b = torch.randn(8, cols, generator=generator), torch.randn(rows, 8, generator=generator)
        b *= relative * value.std() / (b @ a).std()
        return weight, [(a.bfloat16(), b.bfloat16(), 1.0)]

    def whole_merge_strength(layers):
        dot = norm = 0.0
        for weight, [(a, b, _)] in layers:
            qdata, scale = merged_rows(weight.qdata, weight.scale, a, b)
            change = qdata.float() * scale - weight.qdata.float() * weight.scale
            product = b.float() @ a.float()
            dot, norm = dot + float((change * product).sum()), norm + float(product.square().sum())
        return dot / norm

    for relative in (0.3, 0.01):
        layers = [layer(4 * ROWS_PER_LAYER, 384, relative) for _ in range(3)] + [layer(96, 256, relative)]
        estimate = estimate_merge(layers)
        assert estimate.rows == 4 * ROWS_PER_LAYER
        assert abs(estimate.strength - whole_merge_strength(layers)) < 0.1
        if relative == 0.3:
            assert estimate.faithful and abs(estimate.strength - 1) < 0.02 and estimate.error < 0.2
        else:
            assert not estimate.faithful and estimate.strength < 0.7 and estimate.error > 0.5
            assert f"keep only {estimate.strength:.0%}" in estimate.describe()
    many = [layer(2 * ROWS_PER_LAYER, 128, 0.3) for _ in range(LAYERS + 9)]  # layers sampled too: launches per layer
    assert estimate_merge(many).rows == LAYERS * ROWS_PER_LAYER
    assert estimate_merge([(torch.zeros(4, 4), [(torch.zeros(2, 4), torch.zeros(4, 2))])]) is None


def test_auto_merge_after_n_same_sets(served_tiny, demo_loras):
    compiled = served_tiny.transformer
    lora = [(demo_loras["tiny-style-mlp"], 0.7)]
    served_tiny.auto_merge_after = 3
    try:
        served_tiny.set_loras([])
        for _ in range(2):
            served_tiny.set_loras(lora)
            assert not compiled.merged
        served_tiny.set_loras(lora)
        assert compiled.merged
    finally:
        served_tiny.auto_merge_after = None
        served_tiny.set_loras([])
    assert not compiled.merged


def test_fp8_merge_requantizes_and_restores_bit_identical(monkeypatch):
    """FP8 row-wise weights (torchao Float8Tensor on the CPU): merge re-quantizes W + delta into the
    existing qdata/scale storages; unmerge restores them exactly."""
    from torchao.quantization import quant_api

    from aotpack.models.checkpoint import load_transformer, parse_model_ref
    from aotpack.models.prepare import prepare_transformer
    from aotpack.runtime.slot_bank import SlotBank

    monkeypatch.setattr(quant_api, "_check_hardware_support", lambda granularity: None)
    model = load_transformer(parse_model_ref("tiny"), torch.bfloat16, "cpu")
    names = ["transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.proj_out"]
    specs = prepare_transformer(model, dtype="bfloat16", device="cpu", quantization="fp8_rowwise", slot_names=names)
    holder = types.SimpleNamespace(_weights_owner=model, bank=SlotBank(specs, 8, torch.bfloat16, "cpu"),
                                   merged=False)
    modes = LoRAModes(holder)
    weights = {n: model.get_submodule(n).base.weight for n in names}
    assert all(hasattr(w, "qdata") for w in weights.values())
    before = {n: [t.clone() for t in _weight_storages(w)] for n, w in weights.items()}
    addresses = {n: [t.data_ptr() for t in _weight_storages(w)] for n, w in weights.items()}
    generator = torch.Generator().manual_seed(0)
    layers = {s.name: [(torch.randn(4, s.in_features, generator=generator) * 0.1,
                        torch.randn(s.out_features, 4, generator=generator) * 0.1, 0.9)] for s in specs}
    hp_before = {n: _high_precision(w) for n, w in weights.items()}
    modes.enter(layers, merge=True)
    assert holder.merged and holder.bank.is_empty
    for spec in specs:
        weight = weights[spec.name]
        assert [t.data_ptr() for t in _weight_storages(weight)] == addresses[spec.name]  # same storages
        (a, b, s), = layers[spec.name]
        expected = hp_before[spec.name] + s * (b @ a)
        assert not torch.equal(weight.qdata, before[spec.name][0])
        assert rel_error(_high_precision(weight), expected) <= 0.05  # FP8 rounding of the merged weight
    modes.enter({}, merge=False)
    assert not holder.merged and modes.mode == NONE
    for n, w in weights.items():
        assert all(torch.equal(a, b) for a, b in zip(_weight_storages(w), before[n])), n
    # through a compiled merge (here the eager math) whose second call fails: the first call's layers come back too
    from aotpack.models.merge_rows import merged_rows
    from aotpack.runtime.merge import CompiledMerge

    calls = []

    def fail_second(flat):
        calls.append(flat)
        if len(calls) == 2:
            raise torch.cuda.OutOfMemoryError("simulated: no memory for the second call")
        return merged_rows(*flat)

    holder.compiled_merge = CompiledMerge(fail_second, torch.bfloat16)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        modes.enter(layers, merge=True)
    assert len(calls) == 2 and not holder.merged and modes.mode == NONE and holder.bank.is_empty
    for n, w in weights.items():
        assert all(torch.equal(a, b) for a, b in zip(_weight_storages(w), before[n])), n


def test_row_requantization_is_torchaos_from_hp_bit_for_bit(monkeypatch):
    """The merge's own per-row FP8 re-quantization (fewer memory passes than torchao's from_hp) gives
    torchao's qdata and scale exactly, rows at the FP8 limit included."""
    from torchao.quantization import PerRow
    from torchao.quantization.quantize_.workflows.float8.float8_tensor import Float8Tensor

    generator = torch.Generator().manual_seed(3)
    value = (torch.randn(64, 96, generator=generator) * torch.logspace(-3, 3, 64)[:, None]).to(torch.bfloat16)
    value[5] = 0.5  # constant row: every element at the row's amax
    value[7, 3] = -1e4  # one outlier
    reference = Float8Tensor.from_hp(value, float8_dtype=torch.float8_e4m3fn, granularity=PerRow())
    qdata = torch.empty_like(reference.qdata)
    scale = torch.empty_like(reference.scale)
    _requantize_rows_into(value, qdata, scale)
    assert torch.equal(scale, reference.scale)
    assert torch.equal(qdata.view(torch.uint8), reference.qdata.view(torch.uint8))


def test_copy_by_dtype_sends_wide_words_in_one_batched_copy_per_dtype(monkeypatch):
    """Saving and restoring ~1000 storages (FP8 qdata, fp32 scales): same-dtype pairs go as 8-byte words (the
    multi-tensor copy moves a few elements per thread: bytes were slow), so qdata and scales share one list; what
    no word views (odd byte counts, strided views) and mixed-dtype pairs go in one list per dtype pair; a large pair
    goes as its own copy (the plain copy kernel is faster). Every copy lands exactly."""
    from aotpack.runtime.merge import COPY_ALONE_BYTES, copy_by_dtype

    generator = torch.Generator().manual_seed(1)
    srcs = [t for _ in range(3) for t in (torch.randn(4, 6, generator=generator).to(torch.float8_e4m3fn),
                                          torch.rand(4, 1, generator=generator))]
    dsts = [torch.zeros_like(t) for t in srcs]
    odd = torch.randn(3, 3, generator=generator).to(torch.float8_e4m3fn)  # 9 bytes: no word fits
    strided = torch.randn(4, 8, generator=generator)[:, ::2]
    mixed = torch.rand(4, 4, generator=generator)
    large = torch.randn(COPY_ALONE_BYTES // 64, 64, generator=generator).to(torch.float8_e4m3fn)
    srcs += [odd, strided, mixed, large]
    dsts += [torch.zeros_like(odd), torch.zeros(4, 4), torch.zeros(4, 4, dtype=torch.bfloat16), torch.zeros_like(large)]
    lists = []
    real = torch._foreach_copy_
    monkeypatch.setattr(torch, "_foreach_copy_",
                        lambda d, s: lists.append([(a.dtype, b.dtype) for a, b in zip(d, s)]) or real(d, s))
    copy_by_dtype(dsts, srcs)
    assert sorted(lists, key=str) == sorted([[(torch.int64, torch.int64)] * 6,
                                             [(torch.float8_e4m3fn, torch.float8_e4m3fn)],
                                             [(torch.float32, torch.float32)],
                                             [(torch.bfloat16, torch.float32)]], key=str)
    for d, s in zip(dsts, srcs):
        if d.dtype == torch.float8_e4m3fn:
            d, s = d.view(torch.uint8), s.view(torch.uint8)
        assert torch.equal(d, s.to(d.dtype))


def test_copy_plan_runs_again_and_in_reverse_from_the_same_views():
    """The merge saves the originals with a CopyPlan and the unmerge runs its reverse: prepared once, each run
    copies the current values (no stale snapshot), and the reverse lands every pair exactly where it came from."""
    from aotpack.runtime.merge import COPY_ALONE_BYTES, CopyPlan

    generator = torch.Generator().manual_seed(2)
    srcs = [torch.randn(COPY_ALONE_BYTES // 64, 64, generator=generator).to(torch.float8_e4m3fn),
            torch.rand(64, 1, generator=generator), torch.randn(3, 3, generator=generator).to(torch.float8_e4m3fn)]
    dsts = [torch.zeros_like(t) for t in srcs]
    plan = CopyPlan(dsts, srcs)
    plan.run()
    originals = [t.clone() for t in srcs]
    for t in srcs:  # what a merge does to the bound storages
        t.view(torch.uint8).fill_(7) if t.dtype == torch.float8_e4m3fn else t.fill_(7.0)
    plan.reversed().run()
    for restored, original in zip(srcs, originals):
        assert torch.equal(restored.view(torch.uint8), original.view(torch.uint8))
    srcs[1].fill_(3.0)
    plan.run()
    assert torch.equal(dsts[1], srcs[1])


def test_merge_calls_shrink_to_the_free_gpu_memory(monkeypatch):
    """A call stacks `call_bytes` of FP8 weight, fewer layers where the GPU's free memory would not hold the call's
    temporaries (a 24 GB card), and always at least one."""
    from aotpack.runtime import merge as merge_module

    merge = merge_module.CompiledMerge(program=None, dtype=torch.bfloat16, call_bytes=1000)
    assert merge.layers_per_call(100, "cpu") == 10 and merge.layers_per_call(3000, "cpu") == 1
    free = merge_module.TEMPORARIES_PER_WEIGHT_BYTE * 300
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 10 * free))
    assert merge.layers_per_call(100, "cuda:0") == 3
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (0, 10 * free))
    assert merge.layers_per_call(100, "cuda:0") == 1
