"""The merge through the package's `merge_and_save_by_address.pt2` (models/merge_by_address.py): in place, by address.

Per group of layers of one shape (and one list of part ranks) one program call forms each merged row from the bound
originals and the factors and writes it, with its new scale, straight into the bound storages through tables of
their addresses, and returns the originals it overwrote: the save the unmerge copies back. Against
`merge_layers.pt2` this drops the copies of the new rows back (16 ms of kernels for r64 on all 494 block linears of
FLUX.1-dev, H200), the materialized product and the save's per-storage plan (20 ms of host time per merge;
benchmarks/results/2026-12-02e-h200-merge-policy); against the program's first form (`merge_by_address.pt2`, which
read a stack of the originals made first) it drops that stack (6.5-7.4 ms; benchmarks/results/2026-12-02h-h200-merge-tiles).

A group's originals exist once its call has run: a failure in a later call restores the groups before it and leaves
the rest as they were (untouched).

The runtime takes this path on CUDA packages that carry the program, for FP8 row-wise weights of rows and columns
that are multiples of 16, while the originals can stay on the GPU; everything else merges as before (merge.py).
"""

from __future__ import annotations

import torch

from ..models.merge_by_address import ALIGN_ELEMENTS, RANK_CHUNK
from .merge import word_dtype
from .merge_stacks import shape_groups, stacked_factors


def _words(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """`tensors` as flat views of the widest word that fits them all (the stack and the copies move 8x the bytes per
    element in int64; merge.word_dtype)."""
    word = word_dtype(tensors) or torch.uint8
    return [t.reshape(-1).view(word) for t in tensors]


class SavedGroup:
    """One group's layers (one shape and one list of part ranks) and, once the program has merged them, the
    originals it returned: `qdata [L, N, K]` and `scale [L, N]`."""

    def __init__(self, layers: list[tuple], key: tuple, bound_views: tuple[list[torch.Tensor], list[torch.Tensor]]):
        self.layers, self.key = layers, key  # key: the bound qdata addresses, which name the group's caches
        self.qdata_words, self.scales = bound_views  # the bound storages as the restore copies into them
        self.saved_words: list[torch.Tensor] = []
        self.saved_scales: list[torch.Tensor] = []

    def keep(self, qdata: torch.Tensor, scale: torch.Tensor) -> None:
        """The originals the program returned for this group."""
        self.saved_words = _words(list(qdata.unbind(0)))
        self.saved_scales = list(scale.unbind(0))

    def restore(self) -> None:
        """Copy the originals back into the bound storages (one plain copy per weight: on the H200 the plain copy
        kernel moved FP8 weights at 3.3 TB/s, the multi-tensor copy at 2.0; merge.CopyPlan). A group the program
        never merged has nothing to restore."""
        for bound, saved in zip(self.qdata_words, self.saved_words):
            bound.copy_(saved)
        if self.saved_scales:
            torch._foreach_copy_(self.scales, self.saved_scales)


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
        self._views: dict[tuple, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}

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

    def _address_tables(self, layers: list[tuple], key: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        """int64 tables of the layers' qdata and scale addresses on their device (`key`: the qdata addresses). Bound
        storages never move (the CUDA graphs rely on it too), so each table is built once: a table from pageable
        host memory waits for the device's queue."""
        tables = self._tables.get(key)
        if tables is None:
            device = layers[0][0].qdata.device
            scales = [weight.scale.data_ptr() for weight, _ in layers]
            tables = (torch.tensor(key, dtype=torch.int64, device=device),
                      torch.tensor(scales, dtype=torch.int64, device=device))
            self._tables[key] = tables
        return tables

    def _bound_views(self, layers: list[tuple], key: tuple) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The layers' bound qdata as wide words and their scales flat, made once per group (`key` as for the
        tables): making the views of r64-all's 494 layers took 3.1 ms of host time before the merge's first launch
        (H200 host, 2026-12-03, scripts/gpu/probe_short_requests.py)."""
        views = self._views.get(key)
        if views is None:
            weights = [weight for weight, _ in layers]
            views = self._views[key] = (_words([w.qdata for w in weights]), [w.scale.view(-1) for w in weights])
        return views

    def save(self, layers: list[tuple]) -> SavedOriginals:
        """The groups of `(weight, parts)` pairs (each `takes`), whose originals `fold` keeps as it merges them:
        `run` on the result restores whatever has been merged, after a failure too."""
        groups = []
        for layers_of_group in shape_groups(layers):
            key = tuple(weight.qdata.data_ptr() for weight, _ in layers_of_group)  # bound storages never move
            groups.append(SavedGroup(layers_of_group, key, self._bound_views(layers_of_group, key)))
        return SavedOriginals(groups)

    def fold(self, saved: SavedOriginals) -> None:
        """Write every layer's merged rows and scales into its bound storages, keeping the originals."""
        for group in saved.groups:
            qdata_at, scale_at = self._address_tables(group.layers, group.key)
            device = group.layers[0][0].qdata.device
            lora_a, lora_b = stacked_factors(group.layers, device, self.dtype, rank_multiple=RANK_CHUNK)
            saved_qdata, saved_scale, _ = self.program([qdata_at, scale_at, lora_a, lora_b])
            group.keep(saved_qdata, saved_scale)

    def warm(self, device) -> None:
        """One call on scratch storages: loads the program's kernels before the first merge."""
        rows = cols = ALIGN_ELEMENTS
        qdata = torch.zeros(rows, cols, device=device).to(torch.float8_e4m3fn)
        scale = torch.ones(rows, device=device)
        self.program([torch.tensor([qdata.data_ptr()], dtype=torch.int64, device=device),
                      torch.tensor([scale.data_ptr()], dtype=torch.int64, device=device),
                      torch.zeros(1, RANK_CHUNK, cols, dtype=self.dtype, device=device),
                      torch.zeros(1, rows, RANK_CHUNK, dtype=self.dtype, device=device)])
        if qdata.is_cuda:
            torch.cuda.synchronize(device)  # the scratch storages must outlive the kernels that write them
