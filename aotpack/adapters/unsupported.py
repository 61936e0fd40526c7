"""Parts of a LoRA file that a LoRA slot (`y += B (A x)`) cannot hold, found by key in any layout.

The scan runs on the raw file, before diffusers' converters, because diffusers silently filters
some of them (DoRA `dora_scale`, `diff_b`, norm `diff`). Additive parts (biases and weight deltas)
that are all zero change nothing and are dropped with a note. Bias deltas and norm weight deltas,
which diffusers' `load_lora_weights` never applies, are dropped with a note even when non-zero, so
the result is diffusers'; anything else here refuses the file.
"""

from __future__ import annotations

import dataclasses
import re

import torch


@dataclasses.dataclass(frozen=True)
class Part:
    label: str
    pattern: re.Pattern
    zero_is_neutral: bool  # an all-zero tensor of this kind has no effect
    diffusers_drops: bool = False  # diffusers loads the file without it (ComfyUI's LoRA extraction writes these)


PARTS = (
    Part("DoRA magnitude vectors", re.compile(r"dora_scale|lora_magnitude_vector"), False),
    Part("LoKr (Kronecker) factors", re.compile(r"lokr_"), False),
    Part("LoHa (Hadamard) factors", re.compile(r"hada_"), False),
    Part("Tucker / LoCon mid factors (lora_mid)", re.compile(r"lora_mid"), False),
    Part("OFT rotations", re.compile(r"\.b?oft_"), False),
    Part("norm scale replacements (Control-LoRA)",
         re.compile(r"(query_norm|key_norm)\.scale$|\.(norm_q|norm_k|norm_added_q|norm_added_k)\.weight$"), False),
    Part("LoRA biases", re.compile(r"(lora_[AB]|lora_up|lora_down|\.up|\.down)\.bias$"), True),
    Part("bias deltas (diff_b)", re.compile(r"\.diff_b$"), True, diffusers_drops=True),
    # diffusers' rule: its ComfyUI converter drops `.diff` keys of `.norm` modules
    Part("norm weight deltas (diff)", re.compile(r"\.norm.*\.diff$"), True, diffusers_drops=True),
    Part("full weight deltas (diff)", re.compile(r"\.diff$"), True),
)


@dataclasses.dataclass
class Findings:
    refused: dict[str, list[str]]  # label -> keys that refuse the file
    dropped: list[str]  # keys to drop before conversion: all-zero additive parts, parts diffusers drops
    notes: list[str]  # one per dropped kind

    def refusal_text(self) -> str:
        return "; ".join(f"{label}: {len(keys)} keys, e.g. {keys[0]}" for label, keys in self.refused.items())


def _part_of(key: str) -> Part | None:
    return next((part for part in PARTS if part.pattern.search(key)), None)


def scan(state_dict: dict[str, torch.Tensor]) -> Findings:
    """Sort the file's slot-incompatible keys into refused ones and ones dropped with a note."""
    by_part: dict[Part, list[str]] = {}
    for key in state_dict:
        part = _part_of(key)
        if part is not None:
            by_part.setdefault(part, []).append(key)
    findings = Findings(refused={}, dropped=[], notes=[])
    for part, keys in by_part.items():
        keys = sorted(keys)
        nonzero = [k for k in keys if torch.any(state_dict[k])] if part.zero_is_neutral else keys
        if nonzero and not part.diffusers_drops:
            findings.refused[part.label] = keys
            continue
        findings.dropped += keys
        findings.notes.append(
            f"{len(keys)} all-zero {part.label} dropped (no effect), e.g. {keys[0]}" if not nonzero else
            f"diffusers drops {len(keys)} {part.label}, e.g. {nonzero[0]}: {len(nonzero)} non-zero tensors not "
            "applied, exactly as diffusers' load_lora_weights drops them")
    return findings
