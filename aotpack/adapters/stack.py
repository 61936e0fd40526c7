"""Check adapters against a package's slot table and stack them along the rank axis.

Stacking is exact while the summed rank fits `max_rank`: `A = [A1; A2]`, `B = [s1 B1 | s2 B2]`.
Above it, `fit="svd"` compresses each overfull layer's combined delta to `max_rank` by truncated
SVD and reports the retained energy (sum of kept squared singular values over the total).
"""

from __future__ import annotations

import dataclasses

import torch

from ..errors import AdapterLayerError, AdapterRankError, AdapterShapeError
from .parse import Adapter

FITS = (None, "svd")


@dataclasses.dataclass
class StackReport:
    total_rank: dict[str, int]  # per layer, before any fit
    retained_energy: dict[str, float] = dataclasses.field(default_factory=dict)  # per SVD-fitted layer
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def fitted_layers(self) -> int:
        return len(self.retained_energy)

    @property
    def retained_energy_min(self) -> float:
        return min(self.retained_energy.values(), default=1.0)

    @property
    def retained_energy_mean(self) -> float:
        values = self.retained_energy.values()
        return sum(values) / len(values) if values else 1.0


def check_adapter(adapter: Adapter, slots: dict, max_rank: int, model_layers: set[str] | None = None) -> None:
    """Raise a typed error if `adapter` cannot go into these slots on its own."""
    missing = sorted(set(adapter.layers) - set(slots))
    if missing:
        if model_layers is not None:
            foreign = [n for n in missing if n not in model_layers]
            if foreign:
                raise AdapterLayerError(
                    f"adapter {adapter.source} targets {len(foreign)} layers this model does not have "
                    f"(e.g. {foreign[:4]})",
                    "use a LoRA trained for this Flux model (an SD/SDXL or other-architecture LoRA will not fit)",
                )
        raise AdapterLayerError(
            f"adapter {adapter.source} targets {len(missing)} layers that have no LoRA slot in this package "
            f"(e.g. {missing[:4]})",
            "rebuild the package with --slots covering them (default '*' slots every linear layer)",
        )
    for layer, delta in adapter.layers.items():
        spec = slots[layer]
        if layer == "x_embedder" and delta.A.shape[1] > spec.in_features:
            raise AdapterShapeError(
                f"adapter {adapter.source}: x_embedder takes {delta.A.shape[1]} input channels, the model "
                f"{spec.in_features}: a Control-LoRA input expansion, which a compiled package cannot take",
                "use the eager diffusers FluxControlPipeline for Control LoRAs",
            )
        if delta.B.shape[0] != spec.out_features or delta.A.shape[1] != spec.in_features:
            raise AdapterShapeError(
                f"adapter {adapter.source}: layer {layer} has A {tuple(delta.A.shape)}, B {tuple(delta.B.shape)}; "
                f"the layer is {spec.in_features} -> {spec.out_features}",
                "use a LoRA trained for this model's dimensions",
            )
        if delta.rank > max_rank:
            raise AdapterRankError(
                f"adapter {adapter.source}: layer {layer} has rank {delta.rank}, above the package's max_rank "
                f"{max_rank}",
                f"rebuild with --max-rank {delta.rank} or more, or pass --fit svd to compress it",
            )


def svd_fit(parts: list[tuple[torch.Tensor, torch.Tensor, float]], max_rank: int):
    """Best rank-`max_rank` factors of sum(s_i B_i A_i), and the retained energy fraction.

    Energy is sum(kept s^2) / sum(s^2), so the fitted delta's relative Frobenius error is exactly
    sqrt(1 - energy) (Eckart-Young). The SVD runs on the small R x R core of the QR factors.
    """
    a = torch.cat([p[0] for p in parts], dim=0).double()  # [R, in]
    b = torch.cat([p[1].double() * p[2] for p in parts], dim=1)  # [out, R]
    qb, rb = torch.linalg.qr(b)  # b = qb rb
    qa, ra = torch.linalg.qr(a.T)  # a.T = qa ra
    u, s, vh = torch.linalg.svd(rb @ ra.T, full_matrices=False)  # small (at most R x R) core
    total = float((s**2).sum())
    energy = float((s[:max_rank] ** 2).sum()) / total if total > 0 else 1.0
    root = s[:max_rank].sqrt()
    new_b = (qb @ u[:, :max_rank]) * root
    new_a = root[:, None] * (vh[:max_rank] @ qa.T)
    dtype = parts[0][0].dtype
    return new_a.to(dtype), new_b.to(dtype), energy


def stack_adapters(entries: list[tuple[Adapter, float]], slots: dict, max_rank: int, *, fit: str | None = None,
                   model_layers: set[str] | None = None):
    """Per-slot lists of (A, B, scale) parts for the bank, after checking every adapter; raises before any
    change. Exact stacks pass the cached factors themselves: the bank scales B while copying it."""
    if fit not in FITS:
        raise AdapterRankError(f"unknown fit {fit!r}", "use --fit svd or leave it unset")
    for adapter, _ in entries:
        check_adapter(adapter, slots, max_rank if fit is None else 10**9, model_layers)
    layers: dict[str, list] = {}
    for adapter, scale in entries:
        for layer, delta in adapter.layers.items():
            layers.setdefault(layer, []).append((delta.A, delta.B, scale))
    report = StackReport(total_rank={k: sum(p[0].shape[0] for p in v) for k, v in layers.items()})
    overfull = {k: r for k, r in report.total_rank.items() if r > max_rank}
    if overfull and fit is None:
        layer, rank = max(overfull.items(), key=lambda kv: kv[1])
        raise AdapterRankError(
            f"the adapters stack to rank {rank} on layer {layer} ({len(overfull)} layers above max_rank "
            f"{max_rank}); ranks: {[a.layers[layer].rank for a, _ in entries if layer in a.layers]}",
            "use fewer adapters, rebuild with a larger --max-rank, or pass --fit svd to compress the stack",
        )
    for layer in overfull:
        a, b, report.retained_energy[layer] = svd_fit(layers[layer], max_rank)
        layers[layer] = [(a, b, 1.0)]
    if overfull:
        worst = min(report.retained_energy, key=report.retained_energy.get)
        report.notes.append(
            f"SVD fit to rank {max_rank} on {len(overfull)} layers (stacked ranks up to {max(overfull.values())}): "
            f"retained energy min {report.retained_energy_min:.4f} ({worst}), mean {report.retained_energy_mean:.4f}")
    return layers, report
