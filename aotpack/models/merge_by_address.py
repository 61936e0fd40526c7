"""The merge writing the bound weights in place, the layers of one shape in one launch: `merge_and_save_by_address.pt2`.

`merge_layers.pt2` (merge_rows.py) returns new stacks that the runtime copies back into the bound storages, and
materializes the bf16 product `B @ A` before a looped reduction reads it and the FP8 weight twice. On the H200 a
merge of r64 into all 494 block linears of FLUX.1-dev took 92 ms, ~63 ms of it kernels (reduction 34, copies 16,
`B @ A` 7, stacking 6; benchmarks/results/2026-12-02e-h200-merge-policy). This program forms the product tile by
tile in registers and writes the new FP8 rows and scales straight into the bound storages, found through tables
of their addresses (one launch per pass for all layers of a shape), and returns the originals it overwrote (the
runtime's copy for the unmerge). Its first form (`merge_by_address.pt2`) read a stack of the originals that the
runtime made first: 22.3 ms of kernels after a 6.5-7.4 ms stack; this one saves as it goes, 23.0 ms in all
(merge_by_address_kernels.py; scripts/gpu/probe_merge_tiles.py).

`torch.ops.aotpack.merge_and_save_fp8_rows_by_address(qdata_at, scale_at, lora_a, lora_b)`:
- `qdata_at`, `scale_at`: int64 `[L]`, the addresses of the layers' bound qdata (`[N, K]` e4m3, contiguous) and
  scale (`[N]` fp32) storages, which the op reads and overwrites (a zero address is skipped: Inductor runs the
  kernels once while compiling, on zero-filled integer inputs);
- `lora_a [L, R, K]`, `lora_b [L, N, R]`: the factors (adapter scales in B, stacked adapters side by side along R;
  R a multiple of `RANK_CHUNK`, padded with zeros: the kernels do not mask the rank; N and K multiples of
  `ALIGN_ELEMENTS`);
- returns the originals, `saved_qdata [L, N, K]` and `saved_scale [L, N]`, and the new scales `[L, N]` fp32 (the
  outputs also keep Inductor from dropping the kernels: it sees no write through a loaded address).

Math: `merged_rows`'s, with the product summed in fp32 and rounded once to the factor dtype as the matmul rounds it;
the probe found 99.9998% of the FP8 bytes equal to `merged_rows` on the H200 (the rest: summation order).

On CUDA the op launches two Triton kernels through `wrap_triton`, so AOTInductor compiles them into the program
(no JIT at run time). Elsewhere (the CPU tests of the runtime's side) it runs `merged_rows` on tensors viewed at
those addresses. The program exists only in CUDA packages: its CPU form would need Python at run time.
"""

from __future__ import annotations

import ctypes

import torch
from torch import nn

from .kernel_ops import register_triton_op
from .merge_rows import merged_rows

MERGE_BY_ADDRESS_PROGRAM = "merge_and_save_by_address"  # its name in the build and the package
# the kernels' rank step: factors are padded to a multiple of it. One dot of the whole r64 was faster than four of 16
# (tl.dot needs at least 16); a rank-16 set padded to 64 costs 2.2 ms more than a step of 16 would (H200, probe)
RANK_CHUNK = 64
# rows and columns the kernels take: multiples of 16 (FLUX's are; the runtime sends no others: the program cannot
# tell); other weights merge through merge_layers
ALIGN_ELEMENTS = 16
BLOCK_ROWS, BLOCK_COLS = 128, 128  # scripts/gpu/probe_merge_tiles.py (merge_by_address_kernels.py)


def tensor_at(address: int, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    """A CPU tensor over the memory at `address` (which a live CPU tensor owns): the reference's view of a table."""
    count = 1
    for size in shape:
        count *= size
    nbytes = count * dtype.itemsize
    buffer = (ctypes.c_char * nbytes).from_address(address)
    return torch.frombuffer(buffer, dtype=torch.uint8, count=nbytes).view(dtype).view(shape)


def merge_by_address_reference(qdata_at, scale_at, lora_a, lora_b) -> tuple[torch.Tensor, ...]:
    """The op on CPU tensors: per layer the originals at the tabled addresses (which must be those of live tensors
    of the factors' shapes: the op is the runtime's, not an API) are saved, then overwritten by `merged_rows`."""
    layers, _, cols = lora_a.shape
    rows = lora_b.shape[1]
    saved_qdata = torch.zeros(layers, rows, cols, dtype=torch.float8_e4m3fn)
    saved_scale = torch.zeros(layers, rows, dtype=torch.float32)
    new_scales = torch.zeros(layers, rows, dtype=torch.float32)
    for layer in range(layers):
        if not int(qdata_at[layer]) or not int(scale_at[layer]):
            continue
        qdata = tensor_at(int(qdata_at[layer]), (rows, cols), torch.float8_e4m3fn)
        scale = tensor_at(int(scale_at[layer]), (rows,), torch.float32)
        saved_qdata[layer].copy_(qdata)
        saved_scale[layer].copy_(scale)
        new_qdata, new_scale = merged_rows(saved_qdata[layer], saved_scale[layer].view(rows, 1),
                                           lora_a[layer], lora_b[layer])
        qdata.copy_(new_qdata)
        scale.copy_(new_scale.view(rows))
        new_scales[layer] = new_scale.view(rows)
    return saved_qdata, saved_scale, new_scales


def _merge_by_address_triton(qdata_at, scale_at, lora_a, lora_b) -> tuple[torch.Tensor, ...]:
    import triton
    from torch.library import wrap_triton

    from .merge_by_address_kernels import quantize_kernel as quantize
    from .merge_by_address_kernels import row_amax_kernel as row_amax

    layers, rank, cols = lora_a.shape
    rows = lora_b.shape[1]
    lora_a, lora_b = lora_a.contiguous(), lora_b.contiguous()
    device = lora_a.device
    saved_qdata = torch.empty(layers, rows, cols, dtype=torch.float8_e4m3fn, device=device)
    saved_scale = torch.empty(layers, rows, dtype=torch.float32, device=device)
    amax = torch.zeros(layers, rows, dtype=torch.float32, device=device)
    new_scale = torch.empty(layers, rows, dtype=torch.float32, device=device)
    grid = (triton.cdiv(cols, BLOCK_COLS), triton.cdiv(rows, BLOCK_ROWS), layers)
    tiles = {"BN": BLOCK_ROWS, "BK": BLOCK_COLS, "RC": RANK_CHUNK, "num_warps": 4, "num_stages": 2}
    sixteenths = (rows // ALIGN_ELEMENTS, cols // ALIGN_ELEMENTS, rank // ALIGN_ELEMENTS)  # the kernels' sizes
    wrap_triton(row_amax)[grid](qdata_at, scale_at, lora_a, lora_b, amax, saved_scale, *sixteenths, **tiles)
    wrap_triton(quantize)[grid](qdata_at, scale_at, lora_a, lora_b, amax, saved_qdata, saved_scale, new_scale,
                                *sixteenths, **tiles)
    return saved_qdata, saved_scale, new_scale


def _merge_and_save_fp8_rows_by_address(qdata_at: torch.Tensor, scale_at: torch.Tensor, lora_a: torch.Tensor,
                                        lora_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if lora_a.device.type == "cuda":
        return _merge_by_address_triton(qdata_at, scale_at, lora_a, lora_b)
    return merge_by_address_reference(qdata_at, scale_at, lora_a, lora_b)


merge_and_save_fp8_rows_by_address = register_triton_op("aotpack::merge_and_save_fp8_rows_by_address",
                                                        _merge_and_save_fp8_rows_by_address)


class MergeByAddress(nn.Module):
    """The op as a program: positional tensors, then the (empty) LoRA-input dict every aotpack program ends with."""

    def forward(self, qdata_at, scale_at, lora_a, lora_b, lora: dict):
        return merge_and_save_fp8_rows_by_address(qdata_at, scale_at, lora_a, lora_b)


def export_merge_by_address(lora_dtype: torch.dtype, device):
    """`MergeByAddress` exported with the layer count, rows, columns and rank dynamic; example sizes are multiples
    of 16 (what the runtime sends it) and distinct, so export keeps them symbolic and apart."""
    # (as sizes 16 * s, export's derived dims, the program compiled in-process but not in a build's compile worker:
    # the saved program lost the sizes' hints; the kernels take sixteenths instead)
    dim = torch.export.Dim
    layers, rank = dim("layers", min=1, max=1 << 12), dim("rank", min=ALIGN_ELEMENTS, max=1 << 14)
    rows, cols = dim("rows", min=ALIGN_ELEMENTS, max=1 << 17), dim("cols", min=ALIGN_ELEMENTS, max=1 << 17)
    count, n, k, r = 3, 48, 80, 64
    table = torch.zeros(count, dtype=torch.int64, device=device)
    example = (table, table.clone(), torch.zeros(count, r, k, dtype=lora_dtype, device=device),
               torch.zeros(count, n, r, dtype=lora_dtype, device=device), {})
    dynamic = ({0: layers}, {0: layers}, {0: layers, 1: rank, 2: cols}, {0: layers, 1: rows, 2: rank}, {})
    return torch.export.export(MergeByAddress(), example, dynamic_shapes=dynamic, strict=False)


def program_errors(program, lora_dtype: torch.dtype, device, layers: int = 3, rows: int = 192, cols: int = 320,
                   rank: int = RANK_CHUNK) -> dict[str, float]:
    """The compiled program (`program([...])`) against `merged_rows` on random layers written in place: the scales'
    largest relative difference, the dequantized weights' relative error, the share of FP8 bytes that differ, and
    the share of the returned originals' bytes that differ from the originals (which must be none)."""
    generator = torch.Generator(device).manual_seed(0)
    qdata = [(torch.randn(rows, cols, device=device, generator=generator) * 100).clamp(-448, 448)
             .to(torch.float8_e4m3fn) for _ in range(layers)]
    scale = [torch.rand(rows, device=device, generator=generator) * 1e-3 + 1e-5 for _ in range(layers)]
    lora_a = (torch.randn(layers, rank, cols, device=device, generator=generator) * 0.1).to(lora_dtype)
    lora_b = (torch.randn(layers, rows, rank, device=device, generator=generator) * 0.1).to(lora_dtype)
    originals_qdata, originals_scale = torch.stack(qdata), torch.stack(scale)
    expected_qdata, expected_scale = merged_rows(originals_qdata, originals_scale.unsqueeze(-1), lora_a, lora_b)
    saved_qdata, saved_scale, _ = program([torch.tensor([q.data_ptr() for q in qdata], dtype=torch.int64, device=device),
                                           torch.tensor([s.data_ptr() for s in scale], dtype=torch.int64, device=device),
                                           lora_a, lora_b])
    new_qdata, new_scale = torch.stack(qdata), torch.stack(scale).unsqueeze(-1)
    value, expected = new_qdata.float() * new_scale, expected_qdata.float() * expected_scale
    saved_differing = ((saved_qdata.view(torch.uint8) != originals_qdata.view(torch.uint8)).float().sum()
                       + (saved_scale != originals_scale).float().sum()) / (saved_qdata.numel() + saved_scale.numel())
    return {"scale_max_rel_diff": float(((new_scale - expected_scale).abs() / expected_scale).max()),
            "value_rel_error": float((value - expected).norm() / expected.norm()),
            "fp8_bytes_differing": float((new_qdata.view(torch.uint8) != expected_qdata.view(torch.uint8))
                                         .float().mean()),
            "saved_differing": float(saved_differing)}


# the probe's kernels against merged_rows on the H200: scales within 2.1e-7, values within 1.7e-4, 0.0002% of the
# bytes differing (summation order); these limits leave room for other GPUs' summation orders, not for a wrong kernel
# the originals it returns must be exact: the unmerge copies them back
PROGRAM_LIMITS = {"scale_max_rel_diff": 1e-4, "value_rel_error": 2e-3, "fp8_bytes_differing": 1e-2,
                  "saved_differing": 0.0}


def check_program(program, lora_dtype: torch.dtype, device) -> dict[str, float]:
    """Refuse a build whose merge-by-address program parts from `merged_rows` (limits above); its errors otherwise."""
    from ..errors import ValidationFailedError

    errors = program_errors(program, lora_dtype, device)
    over = {name: value for name, value in errors.items() if not value <= PROGRAM_LIMITS[name]}
    if over:
        raise ValidationFailedError(
            f"the compiled {MERGE_BY_ADDRESS_PROGRAM} program disagrees with the merge's math on {device}: "
            + ", ".join(f"{k} {v:.3g} (limit {PROGRAM_LIMITS[k]})" for k, v in over.items()),
            "set merge_by_address = false in the recipe (merges then take merge_layers.pt2, slower) and report it "
            "with `aotpack doctor` output")
    return errors
