"""The merge through the package's `merge_by_address.pt2` (models/merge_by_address.py): in place, by address.

Per group of layers of one shape (and one list of part ranks) the originals are stacked once (`torch.stack` of
their bound storages, in wide words: one launch per group; this stack is the save the unmerge copies back), then
one program call forms each merged row from the stack and the factors and writes it, with its new scale, straight
into the bound storages through tables of their addresses. Against `merge_layers.pt2` this drops the copies of the
new rows back (16 ms of kernels for r64 on all 494 block linears of FLUX.1-dev, H200), the materialized product and
the save's per-storage plan (20 ms of host time per merge; benchmarks/results/2026-12-02e-h200-merge-policy).

The runtime takes this path on CUDA packages that carry the program, for FP8 row-wise weights of rows and columns
that are multiples of 16, while the originals can stay on the GPU; everything else merges as before (merge.py).
"""

from __future__ import annotations

import torch

from ..models.merge_by_address import ALIGN_ELEMENTS, RANK_CHUNK
from .merge import shape_groups, stacked_factors, word_dtype


def _words(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """`tensors` as flat views of the widest word that fits them all (the stack and the copies move 8x the bytes per
    element in int64; merge.word_dtype)."""
    word = word_dtype(tensors) or torch.uint8
    return [t.reshape(-1).view(word) for t in tensors]


class SavedGroup:
    """One group's originals, stacked: `qdata [L, N, K]` and `scale [L, N]`, and the bound storages they came from."""

    def __init__(self, layers: list[tuple]):
        self.layers = layers
        weights = [weight for weight, _ in layers]
        self.qdata_words = _words([w.qdata for w in weights])
        self.scales = [w.scale.view(-1) for w in weights]
        self.stacked_words = torch.stack(self.qdata_words)  # [L, words per weight]
        self.qdata = self.stacked_words.view(weights[0].qdata.dtype).view(len(weights), *weights[0].qdata.shape)
        self.scale = torch.stack(self.scales)

    def restore(self) -> None:
        """Copy the originals back into the bound storages (one plain copy per weight: on the H200 the plain copy
        kernel moved FP8 weights at 3.3 TB/s, the multi-tensor copy at 2.0; merge.CopyPlan)."""
        for bound, saved in zip(self.qdata_words, self.stacked_words.unbind(0), strict=True):
            bound.copy_(saved)
        torch._foreach_copy_(self.scales, list(self.scale.unbind(0)))


class SavedOriginals:
    """The originals of every layer an address merge touches; `run` copies them back (the unmerge)."""

    def __init__(self, groups: list[SavedGroup]):
        self.groups = groups

    def run(self) -> None:
        for group in self.groups:
            group.restore()


class AddressMerge:
    """The package's merge-by-address program with the factor dtype it was exported for."""

    def __init__(self, program, dtype: torch.dtype):
        self.program, self.dtype = program, dtype
        self._tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    @staticmethod
    def takes_shape(rows: int, cols: int) -> bool:
        """Whether the kernels take a weight of `rows` x `cols`: both multiples of 16 (FLUX's are)."""
        return rows % ALIGN_ELEMENTS == 0 and cols % ALIGN_ELEMENTS == 0

    @staticmethod
    def takes(weight) -> bool:
        """Whether the program can merge `weight`: FP8 e4m3 row-wise, contiguous, one fp32 scale per row, rows and
        columns multiples of 16, storages 16-byte aligned (what the kernels assume)."""
        qdata, scale = getattr(weight, "qdata", None), getattr(weight, "scale", None)
        return (qdata is not None and scale is not None and qdata.dtype == torch.float8_e4m3fn and qdata.dim() == 2
                and qdata.is_contiguous() and scale.is_contiguous() and scale.dtype == torch.float32
                and scale.numel() == qdata.shape[0] and qdata.data_ptr() % 16 == 0 and scale.data_ptr() % 16 == 0
                and AddressMerge.takes_shape(*qdata.shape))

    def _address_tables(self, layers: list[tuple]) -> tuple[torch.Tensor, torch.Tensor]:
        """int64 tables of the layers' qdata and scale addresses on their device. Bound storages never move (the
        CUDA graphs rely on it too), so each table is built once: a table from pageable host memory waits for the
        device's queue."""
        qdata = tuple(weight.qdata.data_ptr() for weight, _ in layers)
        tables = self._tables.get(qdata)
        if tables is None:
            device = layers[0][0].qdata.device
            scales = [weight.scale.data_ptr() for weight, _ in layers]
            tables = (torch.tensor(qdata, dtype=torch.int64, device=device),
                      torch.tensor(scales, dtype=torch.int64, device=device))
            self._tables[qdata] = tables
        return tables

    def save(self, layers: list[tuple]) -> SavedOriginals:
        """Stack the originals of `(weight, parts)` pairs (each `takes`), all before any weight is written, so a
        failure later restores everything."""
        return SavedOriginals([SavedGroup(group) for group in shape_groups(layers)])

    def fold(self, saved: SavedOriginals) -> None:
        """Write every saved layer's merged rows and scales into its bound storages."""
        for group in saved.groups:
            qdata_at, scale_at = self._address_tables(group.layers)
            device = group.qdata.device
            lora_a, lora_b = stacked_factors(group.layers, device, self.dtype, rank_multiple=RANK_CHUNK)
            self.program([qdata_at, scale_at, group.qdata, group.scale, lora_a, lora_b])

    def warm(self, device) -> None:
        """One call on scratch storages: loads the program's kernels before the first merge."""
        rows = cols = rank = ALIGN_ELEMENTS
        qdata = torch.zeros(rows, cols, device=device).to(torch.float8_e4m3fn)
        scale = torch.ones(rows, device=device)
        self.program([torch.tensor([qdata.data_ptr()], dtype=torch.int64, device=device),
                      torch.tensor([scale.data_ptr()], dtype=torch.int64, device=device),
                      qdata.clone().view(1, rows, cols), scale.clone().view(1, rows),
                      torch.zeros(1, rank, cols, dtype=self.dtype, device=device),
                      torch.zeros(1, rows, rank, dtype=self.dtype, device=device)])
        if qdata.is_cuda:
            torch.cuda.synchronize(device)  # the scratch storages must outlive the kernels that write them
