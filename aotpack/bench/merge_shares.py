"""The speed bench's partial merges (runtime/merge_share.py): per share, the merge and unmerge time, the step
(plain chain and from CUDA graphs), the error vs eager and the LoRA fidelity, in the process of the other modes."""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from .timing import synced_ms


def measure(served, lora, shares, device, plain_mode: Callable[[], dict], graph_step: Callable[[object], dict]) -> dict:
    """Each share in turn: merge `lora` (from no LoRA), `plain_mode()` (the speed bench's row for the current
    state: step, error and fidelity per size), then `graph_step(size)` per size from CUDA graphs (CUDA only)."""
    transformer, rows = served.transformer, {}
    modes = transformer.lora_modes
    policy = modes.auto.policy
    blocks = dict(transformer.mergeable_blocks())
    try:
        for share in shares:
            modes.auto.policy = dataclasses.replace(policy, share=share)
            served.set_loras([])
            row = {"merge_ms": synced_ms(lambda: served.set_loras(lora, merge=True), device)}
            folded = transformer.merged_blocks
            row.update(blocks_folded=len(folded) if folded else (len(blocks) if transformer.merged else 0),
                       blocks=len(blocks), layers_folded=len(modes.merged_layers),
                       layers_in_slots=sum(1 for rank in transformer.bank.used_rank.values() if rank))
            row.update(plain_mode())
            if device == "cuda":
                transformer.use_cuda_graphs(True)
                try:
                    for size, size_row in row["sizes"].items():
                        size_row["graphs"] = graph_step(size)
                finally:
                    transformer.use_cuda_graphs(False)
            row["unmerge_ms"] = synced_ms(lambda: served.set_loras([]), device)
            for size_row in row["sizes"].values():
                size_row.pop("_output", None)
            rows[str(share)] = row
    except Exception as err:  # noqa: BLE001 -- recorded, the other modes still count
        rows["error"] = f"{type(err).__name__}: {err}"[:500]
    finally:
        modes.auto.policy = policy
        served.set_loras([])
        if device == "cuda":
            torch.cuda.synchronize()
    return rows


def markdown(rows: dict | None, ours: dict, recipe_sizes: dict) -> list[str]:
    """The partial merges beside slots and the whole merge (`ours`: the speed bench's aotpack modes, same process)."""
    if not rows:
        return []
    lines = ["", "### Partial merges (merge_share: that share of the touched block weights folded, the rest in slots)",
             "", "| share | blocks folded | size | step ms | from CUDA graphs | graphs vs recipe | "
             "LoRA fidelity error | effect strength | rel. error vs eager | merge + unmerge ms |", "| --- |" + " --- |" * 9]
    graph_modes = ours.get("cuda_graphs") or {}

    def line(label, folded, size, row, graphs, extra=""):
        recipe_step = ((recipe_sizes.get(size) or recipe_sizes.get(str(size)) or {}).get("step") or {}).get("median_ms")
        graph_ms = ((graphs or {}).get("step") or {}).get("median_ms")
        numbers = [f"{row['step']['median_ms']:.2f}", f"{graph_ms:.2f}" if graph_ms else "",
                   f"{graph_ms / recipe_step:.3f}x" if graph_ms and recipe_step else ""]
        numbers += [f"{row[key]:.4f}" if key in row else "" for key in
                    ("lora_fidelity_error", "lora_effect_strength", "rel_error_vs_eager")]
        return f"| {label} | {folded} | {size} | " + " | ".join(numbers) + f" | {extra} |"

    def whole(name):
        return ours.get(name, {}).get("sizes") or {}, (graph_modes.get(name) or {}).get("sizes") or {}

    plain, graphs = whole("slots")
    lines += [line("0 (slots)", "none", size, row, graphs.get(size) or graphs.get(str(size)))
              for size, row in plain.items()]
    for share, row in rows.items():
        if share != "error":
            lines += [line(share, f"{row['blocks_folded']} / {row['blocks']}", size, size_row, size_row.get("graphs"),
                           f"{row['merge_ms']:.1f} + {row['unmerge_ms']:.1f}")
                      for size, size_row in row["sizes"].items()]
    plain, graphs = whole("merged")
    lines += [line("1 (merged)", "all", size, row, graphs.get(size) or graphs.get(str(size)))
              for size, row in plain.items()]
    if rows.get("error"):
        lines.append(f"\nPartial merges failed: {rows['error']}")
    return lines
