"""The merge by address (runtime/address_merge.py + models/merge_by_address.py) on the CPU: the runtime's side,
with the op's reference body as the program (its CUDA kernels are checked against the same math by every GPU build,
`check_program`). Each weight ends up as `merged_rows` of its own originals and factors, bit for bit, in the very
same storages; the originals it returns are exact and the unmerge restores them bit for bit; a failure midway
restores every weight."""

from __future__ import annotations

import types

import pytest
import torch

from aotpack.models.merge_by_address import MergeByAddress, merge_by_address_reference, program_errors
from aotpack.models.merge_rows import merged_rows
from aotpack.runtime.address_merge import AddressMerge
from aotpack.runtime.merge import MERGED, NONE, LoRAModes, _weight_storages


def _eager_program(calls=None, fail_on=None):
    """The exported module run eagerly (the op's CPU body): what the compiled program computes on a GPU."""
    module = MergeByAddress()

    def program(flat):
        if calls is not None:
            calls.append([t.shape for t in flat])
        if fail_on is not None and calls is not None and len(calls) == fail_on:
            raise torch.cuda.OutOfMemoryError("simulated: no memory for this call")
        return module(*flat, {})
    return program


def _fp8_weight(rows, cols, generator):
    value = torch.randn(rows, cols, generator=generator)
    scale = value.abs().amax(dim=1, keepdim=True) / 448
    return types.SimpleNamespace(qdata=(value / scale).to(torch.float8_e4m3fn).contiguous(),
                                 scale=scale.float().contiguous())


def _part(rows, cols, rank, generator, *scale):
    return (torch.randn(rank, cols, generator=generator), torch.randn(rows, rank, generator=generator), *scale)


def _expected(weight_originals, parts):
    qdata, scale = weight_originals
    a = torch.cat([a for a, *_ in parts]).bfloat16()
    b = torch.cat([torch.mul(b.bfloat16(), s[0] if s else 1.0) for _, b, *s in parts], dim=1)
    return merged_rows(qdata, scale, a, b)


def test_program_reference_writes_merged_rows_at_the_tabled_addresses():
    errors = program_errors(_eager_program(), torch.bfloat16, "cpu", layers=2, rows=32, cols=48, rank=16)
    assert errors == {"scale_max_rel_diff": 0.0, "value_rel_error": 0.0, "fp8_bytes_differing": 0.0,
                      "saved_differing": 0.0}
    # it reads and writes the tabled storages only, and returns what it overwrote
    generator = torch.Generator().manual_seed(1)
    weight = _fp8_weight(16, 32, generator)
    before = weight.qdata.clone()
    other = _fp8_weight(16, 32, generator)
    other_before = (other.qdata.clone(), other.scale.clone())
    a = torch.randn(1, 16, 32, generator=generator).bfloat16()
    b = torch.randn(1, 16, 16, generator=generator).bfloat16()
    tables = torch.tensor([other.qdata.data_ptr()]), torch.tensor([other.scale.data_ptr()])
    saved_qdata, saved_scale, new_scale = merge_by_address_reference(*tables, a, b)
    assert torch.equal(weight.qdata.view(torch.uint8), before.view(torch.uint8))
    expected_qdata, expected_scale = merged_rows(*other_before, a[0], b[0])
    assert torch.equal(other.qdata.view(torch.uint8), expected_qdata.view(torch.uint8))
    assert torch.equal(other.scale, expected_scale) and torch.equal(new_scale[0], expected_scale.view(16))
    assert torch.equal(saved_qdata[0].view(torch.uint8), other_before[0].view(torch.uint8))
    assert torch.equal(saved_scale[0], other_before[1].view(16))


def test_address_merge_groups_pads_and_writes_in_place_then_restores_bit_for_bit():
    generator = torch.Generator().manual_seed(0)
    layers = [(_fp8_weight(32, 48, generator), [_part(32, 48, 48, generator, 0.5)]) for _ in range(3)]
    # a stack of ranks 4 + 8 (padded to 16 with zeros: exact) and another shape
    layers += [(_fp8_weight(32, 48, generator), [_part(32, 48, 4, generator, 0.8), _part(32, 48, 8, generator)])]
    layers += [(_fp8_weight(64, 32, generator), [_part(64, 32, 20, generator)])]
    originals = [(w.qdata.clone(), w.scale.clone()) for w, _ in layers]
    addresses = [[t.data_ptr() for t in _weight_storages(w)] for w, _ in layers]
    calls = []
    merge = AddressMerge(_eager_program(calls), torch.bfloat16)
    assert all(merge.takes(w) for w, _ in layers)
    saved = merge.save(layers)
    merge.fold(saved)
    # one call per (shape, part ranks) group (its layers' A [L, R, K] then B [L, N, R]); ranks padded with zeros to
    # multiples of 64, the kernels' rank step
    assert [tuple(shapes[2]) for shapes in calls] == [(3, 64, 48), (1, 64, 48), (1, 64, 32)]
    assert [tuple(shapes[3]) for shapes in calls] == [(3, 32, 64), (1, 32, 64), (1, 64, 64)]
    for (weight, parts), original, address in zip(layers, originals, addresses):
        expected_qdata, expected_scale = _expected(original, parts)
        assert [t.data_ptr() for t in _weight_storages(weight)] == address  # same storages
        assert torch.equal(weight.qdata.view(torch.uint8), expected_qdata.view(torch.uint8))
        assert torch.equal(weight.scale, expected_scale)
        assert not torch.equal(weight.qdata.view(torch.uint8), original[0].view(torch.uint8))
    saved.run()
    for (weight, _), (qdata, scale) in zip(layers, originals):
        assert torch.equal(weight.qdata.view(torch.uint8), qdata.view(torch.uint8)) and torch.equal(weight.scale, scale)
    # the address tables and the bound views are made once per group
    merge.fold(merge.save(layers))
    assert len(merge._tables) == 3 and len(merge._views) == 3


def test_address_merge_refuses_weights_it_cannot_take():
    generator = torch.Generator().manual_seed(0)
    assert not AddressMerge.takes(_fp8_weight(24, 48, generator))  # rows not a multiple of 16
    assert not AddressMerge.takes(_fp8_weight(32, 40, generator))  # columns
    assert not AddressMerge.takes(torch.zeros(32, 32))  # not FP8
    strided = _fp8_weight(32, 64, generator)
    strided.qdata = strided.qdata[:, :32]
    assert not AddressMerge.takes(strided)


def test_lora_modes_merge_by_address_matches_compiled_merge_and_restores(monkeypatch):
    """Through LoRAModes on FP8 row-wise weights (torchao, CPU): the merge by address gives the same bytes as the
    package's merge_layers program (same math), unmerges bit for bit, and a failure in its second call leaves every
    weight as it was and the mode NONE."""
    from torchao.quantization import quant_api

    from aotpack.models.checkpoint import load_transformer, parse_model_ref
    from aotpack.models.prepare import prepare_transformer
    from aotpack.runtime.merge import CompiledMerge
    from aotpack.runtime.slot_bank import SlotBank

    monkeypatch.setattr(quant_api, "_check_hardware_support", lambda granularity: None)
    model = load_transformer(parse_model_ref("tiny"), torch.bfloat16, "cpu")
    names = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.0.ff.net.2",
             "single_transformer_blocks.0.proj_out"]
    specs = prepare_transformer(model, dtype="bfloat16", device="cpu", quantization="fp8_rowwise", slot_names=names)
    holder = types.SimpleNamespace(_weights_owner=model, bank=SlotBank(specs, 8, torch.bfloat16, "cpu"), merged=False,
                                   compiled_merge=CompiledMerge(lambda flat: merged_rows(*flat), torch.bfloat16))
    modes = LoRAModes(holder)
    weights = {n: model.get_submodule(n).base.weight for n in names}
    before = {n: [t.clone() for t in _weight_storages(w)] for n, w in weights.items()}
    generator = torch.Generator().manual_seed(0)
    layers = {s.name: [(torch.randn(4, s.in_features, generator=generator) * 0.1,
                        torch.randn(s.out_features, 4, generator=generator) * 0.1, 0.9)] for s in specs}
    modes.enter(layers, merge=True)  # merge_layers (no address merge on the holder)
    by_program = {n: [t.clone() for t in _weight_storages(w)] for n, w in weights.items()}
    modes.enter({}, merge=False)
    calls = []
    holder.address_merge = AddressMerge(_eager_program(calls), torch.bfloat16)
    modes.enter(layers, merge=True)
    assert modes.mode == MERGED and holder.merged and len(calls) == 3  # to_q + to_k share a call
    for n, w in weights.items():
        assert all(torch.equal(a.view(torch.uint8), b.view(torch.uint8))
                   for a, b in zip(_weight_storages(w), by_program[n])), n
    modes.enter({}, merge=False)
    for n, w in weights.items():
        assert all(torch.equal(a, b) for a, b in zip(_weight_storages(w), before[n])), n
    calls.clear()
    holder.address_merge = AddressMerge(_eager_program(calls, fail_on=2), torch.bfloat16)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        modes.enter(layers, merge=True)
    assert len(calls) == 2 and modes.mode == NONE and not holder.merged
    for n, w in weights.items():
        assert all(torch.equal(a, b) for a, b in zip(_weight_storages(w), before[n])), n
