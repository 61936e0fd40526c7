"""Three FP8 tails (`models/lora_tails.py`): a linear's `x W^T + u B^T` as one FP8 GEMM over `[q / H | tails]` rows.

On the CPU `aotpack::tailed_rows` runs its torch reference (the GPU runs a Triton kernel that
`scripts/gpu/check_tailed_rows_kernel.py` checks against it). These tests pin the numerics against PEFT's LoRA
layer and against slots' math (FP8 base GEMM + bf16 up GEMM), the bound that keeps the tails in range, and the
layout the no-slot programs will rely on (the base columns of a tailed weight read as a view give the base GEMM
bit for bit).
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from aotpack.models.examples import relative_error
from aotpack.models.fp8_attention import FP8, FP8_MAX
from aotpack.models.fused_quant import quantize_rows
from aotpack.models.lora_tails import (
    MIN_HEADROOM,
    TAIL_COLUMNS,
    TAIL_RANK,
    column_factors,
    row_headroom,
    tailed_linear,
    tailed_rows_reference,
    weight_tail,
)


def _peft_linears(in_features: int, outs: tuple[int, ...], rank: int, generator: torch.Generator):
    """n bf16 linears reading one input, each with a PEFT LoRA of `rank` (random A and B, alpha = rank)."""
    model = nn.ModuleDict({f"l{i}": nn.Linear(in_features, n, bias=True) for i, n in enumerate(outs)})
    for linear in model.values():
        nn.init.normal_(linear.weight, std=in_features ** -0.5, generator=generator)
        nn.init.normal_(linear.bias, std=0.02, generator=generator)
    model = inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(model)), model)
    for linear in model.values():
        nn.init.normal_(linear.lora_A["default"].weight, std=in_features ** -0.5, generator=generator)
        nn.init.normal_(linear.lora_B["default"].weight, std=0.3 * rank ** -0.5, generator=generator)
    return model.to(torch.bfloat16)


def _quantized_weight(linear: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    return quantize_rows(linear.base_layer.weight)


def _tailed_weight(linear: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`[W | tail]` [out, K + TAIL_COLUMNS], W's row scales and the factors c_j (one per rank component)."""
    w_q, s_w = _quantized_weight(linear)
    b = linear.lora_B["default"].weight
    c = column_factors(s_w, b)
    return torch.cat([w_q, weight_tail(b, s_w, c[None, :])], dim=-1), s_w, c


def _slots_output(linear: nn.Module, x: torch.Tensor, q: torch.Tensor, s_x: torch.Tensor) -> torch.Tensor:
    """Slots' math: the FP8 base GEMM, then bias and the bf16 `B (A x)` added."""
    w_q, s_w = _quantized_weight(linear)
    y = torch._scaled_mm(q, w_q.t(), scale_a=s_x, scale_b=s_w.reshape(1, -1), out_dtype=torch.bfloat16,
                         use_fast_accum=True)
    delta = linear.lora_B["default"](linear.lora_A["default"](x))
    return y + linear.base_layer.bias + delta


@pytest.mark.parametrize("outs", [(96,), (64, 64, 64, 256)])
def test_tailed_gemm_matches_peft_as_closely_as_slots(outs):
    generator = torch.Generator().manual_seed(0)
    in_features, rank = 128, 16
    model = _peft_linears(in_features, outs, rank, generator)
    x = torch.randn(40, in_features, generator=generator).to(torch.bfloat16)
    q, s_x = quantize_rows(x)
    linears = list(model.values())
    tailed = [_tailed_weight(m) for m in linears]
    # as the runtime passes it: each A_j divided by its c_j (exact, a power of two), zero-padded to TAIL_RANK
    scaled_a = [(m.lora_A["default"].weight / c[:, None]).to(x.dtype) for m, (*_, c) in zip(linears, tailed)]
    u = torch.cat([torch.nn.functional.pad(x @ a.t(), (0, TAIL_RANK - rank)) for a in scaled_a], -1)
    rows, row_scale = torch.ops.aotpack.tailed_rows(q, s_x, u, torch.ones(len(outs)), MIN_HEADROOM)
    assert rows.shape == (len(outs), 40, in_features + TAIL_COLUMNS) and rows.dtype == FP8
    assert row_scale.shape == (40, 1)  # one row scale for every reader (its headroom chosen for all of them)
    for i, m in enumerate(linears):
        w_rows, s_w, c = tailed[i]
        tails = tailed_linear(rows[i], row_scale, w_rows, s_w) + m.base_layer.bias
        with torch.no_grad():
            peft = m(x).double()
            slots = _slots_output(m, x, q, s_x).double()
        exact = x.double() @ m.base_layer.weight.double().t() + m.base_layer.bias.double() + (
            x.double() @ m.lora_A["default"].weight.double().t() @ m.lora_B["default"].weight.double().t())
        tails_error, slots_error = relative_error(tails.double(), exact), relative_error(slots, exact)
        # the FP8 base GEMM dominates both; the tails add no error of their own beyond bf16's
        assert tails_error < 1.02 * slots_error + 1e-3, (tails_error, slots_error)
        assert relative_error(tails.double(), peft) < 0.06  # FP8's ~3.6% against PEFT's bf16 layer
        # the LoRA's own effect survives: (tails - the tailed rows' base) against PEFT's delta
        base_rows = rows[i].clone()
        base_rows.view(torch.uint8)[:, in_features:] = 0
        tails_delta = tails.double() - (tailed_linear(base_rows, row_scale, w_rows, s_w).double()
                                        + m.base_layer.bias.double())
        with torch.no_grad():
            peft_delta = peft - m.base_layer(x).double()
        assert relative_error(tails_delta, peft_delta) < 0.02


def test_rows_hold_the_input_over_each_rows_headroom_then_the_split_delta():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(8, 128, generator=generator).to(torch.bfloat16)
    q, s_x = quantize_rows(x)
    u = torch.randn(8, 2 * TAIL_RANK, generator=generator) * 1e-3
    u[3, TAIL_RANK:] *= 1e6  # one row whose second reader's u needs headroom
    u = u.to(torch.bfloat16)
    factors = torch.tensor([0.5, 0.25])
    rows, row_scale = tailed_rows_reference(q, s_x, u, factors, MIN_HEADROOM)
    headroom = row_scale / s_x
    assert headroom[3] > 1 and torch.equal(headroom[[0, 1, 2, 4, 5, 6, 7]], torch.ones(7, 1))
    for i in range(2):
        head, hi, lo, hi_again, pad = rows[i].split([128, TAIL_RANK, TAIL_RANK, TAIL_RANK,
                                                     TAIL_COLUMNS - 3 * TAIL_RANK], dim=-1)
        # q / H is exact where it stays a normal FP8 number (H a power of two)
        normal = (q.float() / headroom).abs() >= 2.0 ** -6
        assert torch.equal(head.float()[normal], (q.float() / headroom)[normal])
        assert torch.equal(hi.view(torch.uint8), hi_again.view(torch.uint8))
        assert not pad.float().any()
        t = u[:, TAIL_RANK * i:TAIL_RANK * (i + 1)].float() / (row_scale * factors[i])
        assert t.abs().max() <= FP8_MAX
        assert relative_error((hi.float() + lo.float()).double(), t.double()) < 2e-3  # two FP8 parts: ~8 bits
    assert (u[3, TAIL_RANK:].float() / (row_scale[3] * factors[1])).abs().max() > FP8_MAX / 2  # H no larger than needed


def test_no_factors_given_means_every_reader_at_one():
    """The programs pass an empty factors tensor (no fill kernel a call): one 1.0 a reader of u, bit for bit."""
    generator = torch.Generator().manual_seed(2)
    q, s_x = quantize_rows(torch.randn(6, 128, generator=generator).to(torch.bfloat16))
    u = (torch.randn(6, 3 * TAIL_RANK, generator=generator) * 10).to(torch.bfloat16)
    given = tailed_rows_reference(q, s_x, u, torch.ones(3), MIN_HEADROOM)
    empty = torch.ops.aotpack.tailed_rows(q, s_x, u, torch.empty(0), MIN_HEADROOM)
    assert empty[0].shape == (3, 6, 128 + TAIL_COLUMNS)
    assert torch.equal(empty[0].view(torch.uint8), given[0].view(torch.uint8)) and torch.equal(empty[1], given[1])
    halves = tailed_rows_reference(q, s_x, u, torch.full([3], 0.5), MIN_HEADROOM)
    assert not torch.equal(halves[0].view(torch.uint8), given[0].view(torch.uint8))  # factors do count when given


def test_paired_rows_hold_q_once_a_pair_and_each_reader_gemms_as_with_its_own_buffer():
    """Recipe lever `lora_tails_paired`: readers 2p and 2p + 1 read one `[tail_a | q / H | tail_b]` buffer; the first
    one's weight is `[tail | W]`. Each reader's GEMM gives what the one-buffer layout gives, to its summation order."""
    from aotpack.models.lora_tails import base_columns, reader_rows, tail_columns

    generator = torch.Generator().manual_seed(3)
    in_features, outs = 128, (64, 32, 48, 96)
    q, s_x = quantize_rows(torch.randn(9, in_features, generator=generator).to(torch.bfloat16))
    u = (torch.randn(9, len(outs) * TAIL_RANK, generator=generator) * 3).to(torch.bfloat16)
    single = torch.ops.aotpack.tailed_rows(q, s_x, u, torch.empty(0), MIN_HEADROOM)
    pairs = torch.ops.aotpack.tailed_rows(q, s_x, u, torch.empty(0), MIN_HEADROOM, True)
    assert pairs[0].shape == (2, 9, in_features + 2 * TAIL_COLUMNS) and torch.equal(pairs[1], single[1])
    for i, out in enumerate(outs):
        rows = reader_rows(pairs[0], i, True)
        assert rows.shape == single[0][i].shape
        assert rows.data_ptr() == pairs[0][i // 2].data_ptr() + (i % 2) * TAIL_COLUMNS
        # the same bytes, the tail on the other side of q / H for the first of a pair
        own = single[0][i].view(torch.uint8)
        assert torch.equal(base_columns(rows, i, True).view(torch.uint8), own[:, :in_features])
        assert torch.equal(tail_columns(rows, i, True).view(torch.uint8), own[:, in_features:])
        w, s_w = quantize_rows(torch.randn(out, in_features, generator=generator).to(torch.bfloat16))
        tail = weight_tail(torch.randn(out, TAIL_RANK, generator=generator), s_w, torch.ones(1, TAIL_RANK))
        one_buffer = tailed_linear(single[0][i], single[1], torch.cat([w, tail], -1), s_w)
        paired = torch.cat([tail, w], -1) if i % 2 == 0 else torch.cat([w, tail], -1)
        assert torch.equal(base_columns(paired, i, True).view(torch.uint8), w.view(torch.uint8))
        assert relative_error(tailed_linear(rows, pairs[1], paired, s_w).double(), one_buffer.double()) < 4e-3
    with pytest.raises(ValueError, match="even number of readers, not 3"):
        tailed_rows_reference(q, s_x, u[:, :3 * TAIL_RANK], torch.empty(0), MIN_HEADROOM, True)
    # the build's GPU check of the kernel (paired with the lever), here the op's CPU path against the reference
    from aotpack.models.lora_tails import kernel_errors

    assert kernel_errors("cpu") == {"single_block": 0.0, "double_block": 0.0}
    assert kernel_errors("cpu", paired=True) == {"single_block": 0.0, "double_block": 0.0, "single_block_paired": 0.0}


def test_row_headroom_is_the_least_power_of_two_that_keeps_every_readers_tails_in_range():
    generator = torch.Generator().manual_seed(6)
    u = (torch.randn(64, 2 * TAIL_RANK, generator=generator) * torch.logspace(-6, 6, 64)[:, None]).to(torch.bfloat16)
    scale = torch.rand(64, 1, generator=generator) * 1e-3 + 1e-4
    factors = torch.tensor([0.25, 2.0])
    for least in (1.0, 16.0):
        headroom, inverse = row_headroom(u, scale, factors, least)
        mantissa, _ = torch.frexp(headroom)
        assert torch.all(mantissa == 0.5) and torch.equal(headroom * inverse, torch.ones_like(headroom))
        need = torch.maximum(*(u[:, TAIL_RANK * i:TAIL_RANK * (i + 1)].float().abs().amax(-1, keepdim=True)
                               / (scale * factors[i] * FP8_MAX) for i in range(2)))
        assert torch.all(need <= headroom) and torch.all(headroom >= least)
        assert torch.all((headroom == least) | (need > headroom / 2))
        assert (headroom > least).any() and (headroom == least).any()


def test_a_weight_tail_is_b_in_two_parts_at_the_weight_row_scales():
    generator = torch.Generator().manual_seed(2)
    w = (torch.randn(32, 128, generator=generator) * 0.05).to(torch.bfloat16)
    _, s_w = quantize_rows(w)
    b = (torch.randn(32, 8, generator=generator) * 0.02).to(torch.bfloat16)
    c = column_factors(s_w, b)
    assert c.shape == (8,) and torch.all(torch.frexp(c)[0] == 0.5)  # powers of two
    tail = weight_tail(b, s_w, c[None, :])
    assert tail.shape == (32, TAIL_COLUMNS)
    b_hi, b_hi_again, b_lo, pad = tail.split([TAIL_RANK, TAIL_RANK, TAIL_RANK, TAIL_COLUMNS - 3 * TAIL_RANK], -1)
    scaled = b.float() * c / s_w
    # each column within FP8's range and above half of it: its c_j the largest power of two that fits
    assert torch.all(scaled.abs().amax(0) <= FP8_MAX) and torch.all(scaled.abs().amax(0) > FP8_MAX / 2)
    assert relative_error((b_hi.float() + b_lo.float())[:, :8].double(), scaled.double()) < 2e-3
    assert torch.equal(b_hi.view(torch.uint8), b_hi_again.view(torch.uint8))
    assert not b_hi[:, 8:].float().any() and not b_lo[:, 8:].float().any() and not pad.float().any()
    with pytest.raises(ValueError, match="rank-80"):
        weight_tail(torch.zeros(32, 80), s_w, c)


def test_the_base_columns_of_a_tailed_weight_give_the_base_gemm_bit_for_bit():
    """What the no-slot programs rely on: the weight stored [out, K + 256], read as a view of its first K columns."""
    generator = torch.Generator().manual_seed(4)
    w = torch.randn(48, 128, generator=generator).to(torch.bfloat16)
    x = torch.randn(24, 128, generator=generator).to(torch.bfloat16)
    w_q, s_w = quantize_rows(w)
    q, s_x = quantize_rows(x)
    stored = torch.cat([w_q, weight_tail(torch.randn(48, TAIL_RANK, generator=generator), s_w,
                                         torch.tensor(1.0))], dim=-1)
    view = stored[:, :128]
    assert not view.is_contiguous()
    base = torch._scaled_mm(q, w_q.t(), scale_a=s_x, scale_b=s_w.reshape(1, -1), out_dtype=torch.bfloat16)
    from_view = torch._scaled_mm(q, view.t(), scale_a=s_x, scale_b=s_w.reshape(1, -1), out_dtype=torch.bfloat16)
    assert torch.equal(base, from_view)


def test_the_op_exports_with_its_outputs():
    """`torch.export` keeps `aotpack::tailed_rows` as one node (what a tailed program will call)."""

    class Reader(nn.Module):
        def forward(self, q, s_x, u, factors):
            rows, row_scale = torch.ops.aotpack.tailed_rows(q, s_x, u, factors, MIN_HEADROOM)
            return rows.view(torch.uint8).sum(), row_scale

    generator = torch.Generator().manual_seed(5)
    q, s_x = quantize_rows(torch.randn(8, 128, generator=generator))
    u = torch.randn(8, 2 * TAIL_RANK, generator=generator).to(torch.bfloat16)
    factors = torch.tensor([0.5, 0.25])
    exported = torch.export.export(Reader(), (q, s_x, u, factors))
    targets = [str(node.target) for node in exported.graph.nodes if node.op == "call_function"]
    assert any("tailed_rows" in t for t in targets), targets
    total, scale = exported.module()(q, s_x, u, factors)
    expected_rows, expected_scale = tailed_rows_reference(q, s_x, u, factors, MIN_HEADROOM)
    assert torch.equal(total, expected_rows.view(torch.uint8).sum()) and torch.equal(scale, expected_scale)


def test_a_headroom_that_is_not_a_power_of_two_is_refused():
    q, s_x = quantize_rows(torch.ones(2, 128))
    with pytest.raises(ValueError, match="least headroom 12.0 is not a power of two"):
        torch.ops.aotpack.tailed_rows(q, s_x, torch.zeros(2, TAIL_RANK), torch.tensor([1.0]), 12.0)
