"""The lever recipes of `bench_speed_levers.sh`: each is `base = "h200"` plus the fields it changes.

Until 2026-12-06 the script made them with `sed` over h200.toml, which did nothing, silently, where a line it looked
for had moved or changed (the lever then built the default again). A field written here that the loader does not
know is refused, and tests/test_lever_recipes.py loads every lever and checks that it differs from h200.

    python3 scripts/gpu/lever_recipes.py FOLDER [LABEL ...]
writes FOLDER/LABEL.toml for every lever, and default.toml, then loads the LABELs named (as the build will): an
unknown label or a refused recipe stops the call before any build, exit 2. LEVER_BASE=h100 bases them on h100
instead (to step them beside a carried h100 package on an H100).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# fused_norm_quant off, with joined_qkv and lora_tails, which need it (the loader refuses the one without the other)
NORM_UNFUSED = "fused_norm_quant = false\njoined_qkv = false\nlora_tails = false\n"
# lora_down_from_fp8 off, with lora_down_fp8_dots, which chooses how those down-projections run (refused without it)
NO_FP8DOWN = "lora_down_from_fp8 = false\nlora_down_fp8_dots = false\n"

# label: the TOML fields over h200's (what each measures: bench_speed_levers.sh's header)
LEVERS = {
    "rebuilt": "",  # h200 as it is, built by this checkout
    # FP8 attention at every length; validation compares with eager bf16 attention: FP8's own error needs room
    "fp8attn": "fp8_attention_min_tokens = 0\n[validation]\ntolerance = 0.15\nend_to_end_tolerance = 0.5\n",
    "bf16attn": 'attention = "cudnn"\nfp8_attention_min_tokens = 0\nfp8_qk_in_norm_rope = false\n',
    "cdt": "[inductor]\ncoordinate_descent_tuning = true\n",
    "norm_unfused": NORM_UNFUSED,
    "unfused": NORM_UNFUSED + "fused_gelu_quant = false\n" + NO_FP8DOWN,
    "gelu": NORM_UNFUSED + "fused_gelu_quant = false\n" + NO_FP8DOWN + 'gelu_via_sigmoid = "all"\n',
    "gelu_ff": NORM_UNFUSED + "fused_gelu_quant = false\n" + NO_FP8DOWN + 'gelu_via_sigmoid = "feed_forward"\n',
    "qk_unfused": NORM_UNFUSED + "fused_qk_norm_rope = false\nfp8_qk_in_norm_rope = false\n",
    "fp8_mod": "unquantized_linears = []\n",
    "no_grouped": "group_lora_down = false\n",
    "no_fp8down": NO_FP8DOWN,
    # those down-projections as one cuBLASLt FP8 GEMM against A in FP8 high and low parts (models/lora_down_fp8.py)
    "down_gemm": "lora_down_fp8_gemm = true\nlora_down_fp8_dots = false\n",
    # without the FP8 x FP8 dots against A's FP8 halves (on in h100/h200 since 2026-12-08b): the Triton kernel on bf16 A
    "no_dots": "lora_down_fp8_dots = false\n",
    # the double blocks' text feed-forwards' down-projections by the FP8 dots too (their 512 rows in bf16 until now)
    "down_dots_text": "lora_down_fp8_text = true\n",
    "no_batched": "batched_modulation = false\n",
    "up": NO_FP8DOWN + "group_lora_up = true\n",
    "gelu_lora": NO_FP8DOWN + "fused_gelu_lora = true\n",
    "gemm_lora": NO_FP8DOWN + "lora_up_in_gemm = true\n",
    "no_fp8qk": "fp8_qk_in_norm_rope = false\n",
    "no_qkdown": "fp8_qk_in_norm_rope = false\n" + NO_FP8DOWN,
    "no_joined": "joined_qkv = false\n",
    # without the single blocks' q/k/v/MLP-in LoRA as FP8 tails (on in h200 since 2026-12-07j; models/tail_groups.py)
    "no_tails": "lora_tails = false\n",
    # a single block's tailed readers in pairs, each pair's GEMMs reading one `[tail | q / H | tail]` buffer
    "tails_paired": "lora_tails_paired = true\n",
    # the double blocks' MLP-in (each stream's ff.net.0.proj) as tails too, a fourth program (double_block.tails)
    "tails_mlp": "lora_tails_mlp_in = true\n",
    # one shape: batch 1 x 1024^2 x 512 text tokens (run it with SIZES=1024 only)
    "static": "[shapes]\nbatch = [1, 1]\nimage_tokens = [4096, 4096]\ntext_tokens = [512, 512]\n",
}


def recipe_text(label: str) -> str:
    """The recipe of lever `label`; "default" is h200 itself (its package named h200, as a default build's is)."""
    base = os.environ.get("LEVER_BASE", "h200")
    if label == "default":
        return f'base = "{base}"\nname = "{base}"\n'
    return f'base = "{base}"\nname = "{label}"\n' + LEVERS[label]


def write(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for label in ["default", *LEVERS]:
        (folder / f"{label}.toml").write_text(recipe_text(label))


def main(folder: str, labels: list[str]) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this checkout's aotpack (and its recipes)
    from aotpack.errors import AotpackError
    from aotpack.recipes.recipe import load_recipe

    write(Path(folder))
    for label in labels:
        if label != "default" and label not in LEVERS:
            print(f"unknown lever {label!r}; known: {' '.join(LEVERS)}", file=sys.stderr)
            return 2
        try:
            load_recipe(Path(folder) / f"{label}.toml")
        except AotpackError as err:
            print(f"lever {label}: {err}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
