"""Build recipes: one TOML file per target, shipped beside this module in `aotpack/recipes/`."""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

from ..errors import RecipeError, UnknownTargetError
from .bases import resolve_bases
from .fields import TomlFields

QUANTIZATIONS = ("none", "fp8_rowwise")
# "cudnn_fp8": FP8 attention through cuDNN's FP8 SDPA (models/fp8_attention.py), ~25x bf16's error per call;
# the h100/h200 default from 4096 tokens (fp8_attention_min_tokens)
ATTENTION_BACKENDS = ("sdpa", "cudnn", "flash", "fa3", "cudnn_fp8")
LAYOUTS = ("regional", "whole")
PARALLEL_MODES = ("none", "ulysses")  # "ulysses": block programs split around attention (context parallel)
TEXT_ENCODER_POLICIES = ("full", "t5_nf4")
DTYPES = ("float32", "bfloat16", "float16")  # the names `prepare.DTYPES` maps to torch dtypes
TAILS_MAX_RANK = 64  # `lora_tails`: models/lora_tails.TAIL_RANK (not imported: recipes load without torch)
GELU_SCOPES = ("none", "feed_forward", "all")  # `gelu_via_sigmoid`: which GELUs `activations.use_sigmoid_gelu` swaps


@dataclasses.dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    device: str  # "cpu" or "cuda"
    gpu_arch: str  # "sm_90", or "" on the cpu target
    dtype: str  # dtype of activations and non-quantized weights
    lora_dtype: str  # dtype of the LoRA slot tensors
    quantization: str
    attention: str
    max_rank: int
    slots: tuple[str, ...]  # fnmatch patterns over the transformer's nn.Linear names
    layout: str
    text_encoder_policy: str
    batch: tuple[int, int]
    image_tokens: tuple[int, int]
    text_tokens: tuple[int, int]
    example_batch: int
    example_image_tokens: int
    example_text_tokens: int
    tolerance: float  # each compiled program vs its eager region (relative L2)
    inductor_configs: dict
    end_to_end_tolerance: float = 0.0  # whole transformer vs eager; 0 means "same as tolerance"
    group_lora_down: bool = False  # one down-projection matmul for slots sharing an input (lora_grouping.py)
    group_lora_up: bool = False  # each group's (or lone slot's) up-projections in one kernel (models/lora_up.py)
    fused_gelu_quant: bool = False  # GELU (+ concat) + FP8 quantization in one Triton kernel (models/fused_quant.py)
    fused_qk_norm_rope: bool = False  # q/k epilogue + RMSNorm + RoPE in one Triton kernel (models/qk_norm_rope.py)
    fp8_qk_in_norm_rope: bool = False  # under FP8 attention that kernel writes q/k in e4m3 (models/qk_norm_rope.py)
    fused_norm_quant: bool = False  # LayerNorm + modulation + FP8 quantization, once per norm (models/norm_quant.py)
    lora_down_from_fp8: bool = False  # LoRA down-projections after the MLP GELUs read its FP8 output (models/lora_down_fp8.py)
    lora_down_fp8_gemm: bool = False  # ... as one cuBLASLt FP8 GEMM against A in FP8 high and low parts (same module)
    lora_down_fp8_dots: bool = False  # ... by FP8 dots against A's FP8 halves, written by the runtime (same module)
    lora_down_fp8_text: bool = False  # ... the double blocks' text feed-forwards' too (same module)
    fused_gelu_lora: bool = False  # the LoRA projections around each MLP GELU inside its kernel (models/gelu_lora.py)
    lora_up_in_gemm: bool = False  # each FP8 slot's bias and LoRA up-projection in its GEMM's epilogue (models/gemm_lora.py)
    joined_qkv: bool = False  # each double-block stream's q/k/v as one FP8 GEMM over joined weights (models/joined_qkv.py)
    # a third program set for the single blocks: their q/k/v/MLP-in LoRA in the FP8 GEMM's K (models/tail_groups.py)
    lora_tails: bool = False
    # with lora_tails, the double blocks' MLP-in (each stream's ff.net.0.proj) as tails too: a fourth program (off: its
    # one measurement, 2026-12-07i, ran the tailed program's q/k/v down-projections ungrouped; docs/recipes.md)
    lora_tails_mlp_in: bool = False
    lora_tails_paired: bool = False  # a single block's tailed readers in pairs, one `[tail | q / H | tail]` row a pair
    # the blocks' AdaLN modulation linears in one program run once an image over every step (models/modulation.py)
    batched_modulation: bool = False
    gelu_via_sigmoid: str = "none"  # which GELUs run as x * sigmoid(2u): none, feed_forward, all (models/activations.py)
    parallel: str = "none"  # "ulysses": programs split around attention, served on 1..N GPUs (split_regions.py)
    # each slotted block program also compiled without slots, run while no LoRA is live or the set is merged;
    # false compiles fewer programs, and idle or merged requests pay the slot tax (11-15% on the H200)
    no_slot_programs: bool = True
    # FP8 CUDA builds also compile merge_and_save_by_address.pt2, the in-place merge (models/merge_by_address.py);
    # false leaves merges to merge_layers.pt2 (r64 on FLUX.1-dev's block linears: 92 ms instead of 31.7 on the H200)
    merge_by_address: bool = True
    # block linears (fnmatch patterns) kept in `dtype` under an FP8 quantization; the h100/h200 recipes keep the
    # AdaLN modulation linears, whose FP8 rounding reaches every token (models/quant.py, docs/design.md)
    unquantized_linears: tuple[str, ...] = ()
    # with attention = "cudnn_fp8": sequences (text + image tokens) shorter than this take bf16 attention, a branch
    # in the programs chosen per call (models/fp8_attention.py); 0 = FP8 at every length
    fp8_attention_min_tokens: int = 0

    def __post_init__(self):
        # also guards `replace` (the build's --attention and --parallel overrides never go through parse_recipe)
        if self.attention not in ATTENTION_BACKENDS:
            raise RecipeError(f"recipe {self.name!r}: attention = {self.attention!r} is not a backend",
                              f"use one of: {', '.join(ATTENTION_BACKENDS)}")
        if problem := attention_parallel_conflict(self.attention, self.parallel):
            raise RecipeError(f"recipe {self.name!r}: {problem}", _ATTENTION_PARALLEL_FIX)
        if problem := layout_parallel_conflict(self.layout, self.parallel):
            raise RecipeError(f"recipe {self.name!r}: {problem}", _LAYOUT_PARALLEL_FIX)
        if problem := modulation_conflict(self.batched_modulation, self.layout, self.parallel):
            raise RecipeError(f"recipe {self.name!r}: {problem}", _MODULATION_FIX)

    @property
    def end_to_end_limit(self) -> float:
        return self.end_to_end_tolerance or self.tolerance

    def replace(self, **changes) -> "Recipe":
        """A copy with `changes`. Switching attention to a backend other than cudnn_fp8 drops the FP8 threshold,
        which only chooses between FP8 and bf16 attention, and `fp8_qk_in_norm_rope`, which writes q/k for FP8
        attention (a recipe file with either and another backend is refused by parse_recipe)."""
        if changes.get("attention", self.attention) != "cudnn_fp8":
            changes.setdefault("fp8_attention_min_tokens", 0)
            changes.setdefault("fp8_qk_in_norm_rope", False)
        recipe = dataclasses.replace(self, **changes)
        # the build's --attention override (parse_recipe checks a file's fields, naming the file)
        if problem := attention_device_conflict(recipe.attention, recipe.device):
            raise RecipeError(f"recipe {recipe.name!r}: {problem}", _ATTENTION_DEVICE_FIX)
        return recipe

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        for key in ("slots", "batch", "image_tokens", "text_tokens", "unquantized_linears"):
            data[key] = list(data[key])
        return data


_ATTENTION_PARALLEL_FIX = ("use attention = 'cudnn' with parallel = 'ulysses' (build flags: --parallel ulysses "
                           "--attention cudnn), or parallel = 'none' with 'cudnn_fp8'")


def attention_parallel_conflict(attention: str, parallel: str) -> str | None:
    """Why `attention` cannot go with `parallel`, or None. Context-parallel packages run attention in the
    runtime between split programs (runtime/ulysses.py), outside the compiled programs: the FP8 op is not there."""
    if attention == "cudnn_fp8" and parallel == "ulysses":
        return ("attention = 'cudnn_fp8' cannot be combined with parallel = 'ulysses' (context-parallel "
                "packages run attention in the runtime, between the split programs, not as FP8)")
    return None


# attention backends that need a CUDA GPU: on the CPU torch has no cuDNN SDPA ("No viable backend" at the build's
# first export) and FlashAttention-3 is a CUDA kernel ("flash" has a CPU kernel; "cudnn_fp8" a CPU reference op)
CUDA_ONLY_ATTENTION = ("cudnn", "fa3")
_ATTENTION_DEVICE_FIX = "use attention = 'sdpa' (or 'flash') on a cpu target, or device = 'cuda' (build flag: --attention sdpa)"
_LAYOUT_PARALLEL_FIX = "set layout = 'regional' with parallel = 'ulysses' (build flags: --layout regional), or parallel = 'none'"
# a target's name names folders: the default --out (`<model>-<name>`) and its folder in a package repo
# (store/repo_layout.target_folder): one path segment
_TARGET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def attention_device_conflict(attention: str, device: str) -> str | None:
    """Why `attention` cannot run on `device`, or None."""
    if device != "cuda" and attention in CUDA_ONLY_ATTENTION:
        return f"attention = {attention!r} needs a CUDA GPU, but device = {device!r}"
    return None


_MODULATION_FIX = "set batched_modulation = false, or build the regional layout on one GPU"


def modulation_conflict(batched_modulation: bool, layout: str, parallel: str) -> str | None:
    """Why `batched_modulation` cannot go with `layout` and `parallel`, or None."""
    if batched_modulation and (layout != "regional" or parallel != "none"):
        return (f"batched_modulation = true needs the regional layout without context parallelism "
                f"(layout = {layout!r}, parallel = {parallel!r})")
    return None


def layout_parallel_conflict(layout: str, parallel: str) -> str | None:
    """Why `layout` cannot go with `parallel`, or None (split packages run attention between block programs)."""
    if parallel != "none" and layout != "regional":
        return (f"parallel = {parallel!r} needs layout = 'regional', not {layout!r} (the runtime runs attention "
                "between the block programs)")
    return None


def _recipe_files() -> dict[str, Path]:
    folder = Path(__file__).resolve().parent  # the TOML files ship beside this module (package data)
    return {p.name[: -len(".toml")]: Path(str(p)) for p in folder.iterdir() if p.name.endswith(".toml")}


def known_targets() -> list[str]:
    return sorted(_recipe_files())


def parse_recipe(data: dict, source: str = "<recipe>") -> Recipe:
    """A checked `Recipe` from a parsed TOML table; errors name the field and `source` (the file)."""
    fields = TomlFields(data, source)
    device = fields.choice("device", ("cpu", "cuda"))
    gpu_arch = fields.value("gpu_arch", str, "")
    if device == "cuda" and not re.fullmatch(r"sm_\d{2,3}a?", gpu_arch):
        raise fields.error("gpu_arch", f"= {gpu_arch!r} should name the CUDA arch of a cuda target, e.g. 'sm_90'")
    dtype = fields.choice("dtype", DTYPES)
    attention = fields.choice("attention", ATTENTION_BACKENDS, "sdpa")
    parallel = fields.choice("parallel", PARALLEL_MODES, "none")
    if conflict := attention_parallel_conflict(attention, parallel):
        raise RecipeError(f"{fields.source}: {conflict}",
                          f"edit attention or parallel in {fields.source}: {_ATTENTION_PARALLEL_FIX}")
    layout = fields.choice("layout", LAYOUTS, "regional")
    if conflict := layout_parallel_conflict(layout, parallel):
        raise RecipeError(f"{fields.source}: {conflict}",
                          f"edit layout or parallel in {fields.source}: {_LAYOUT_PARALLEL_FIX}")
    batched_modulation = fields.value("batched_modulation", bool, False)
    if conflict := modulation_conflict(batched_modulation, layout, parallel):
        raise RecipeError(f"{fields.source}: {conflict}",
                          f"edit batched_modulation in {fields.source}: {_MODULATION_FIX}")
    name = fields.value("name", str)
    if not _TARGET_NAME.fullmatch(name):
        raise fields.error("name", f"= {name!r} cannot name a target: it names the package's default folder and its "
                                   "folder in a package repo; use letters, digits, '.', '_' and '-' (e.g. 'my-h200')")
    recipe = Recipe(
        name=name,
        description=fields.value("description", str, ""),
        device=device,
        gpu_arch=gpu_arch,
        dtype=dtype,
        lora_dtype=fields.choice("lora_dtype", DTYPES, dtype),
        quantization=fields.choice("quantization", QUANTIZATIONS, "none"),
        attention=attention,
        max_rank=fields.positive("max_rank"),
        slots=fields.strings("slots", ["*"]),
        layout=layout,
        text_encoder_policy=fields.choice("text_encoder_policy", TEXT_ENCODER_POLICIES, "full"),
        batch=fields.int_range("shapes.batch"),
        image_tokens=fields.int_range("shapes.image_tokens"),
        text_tokens=fields.int_range("shapes.text_tokens"),
        example_batch=fields.positive("example.batch"),
        example_image_tokens=fields.positive("example.image_tokens"),
        example_text_tokens=fields.positive("example.text_tokens"),
        tolerance=fields.positive("validation.tolerance", float),
        inductor_configs=_inductor_configs(fields),
        end_to_end_tolerance=float(fields.value("validation.end_to_end_tolerance", float, 0.0)),
        group_lora_down=fields.value("group_lora_down", bool, False),
        group_lora_up=fields.value("group_lora_up", bool, False),
        fused_gelu_quant=fields.value("fused_gelu_quant", bool, False),
        fused_qk_norm_rope=fields.value("fused_qk_norm_rope", bool, False),
        fp8_qk_in_norm_rope=fields.value("fp8_qk_in_norm_rope", bool, False),
        fused_norm_quant=fields.value("fused_norm_quant", bool, False),
        lora_down_from_fp8=fields.value("lora_down_from_fp8", bool, False),
        lora_down_fp8_gemm=fields.value("lora_down_fp8_gemm", bool, False),
        lora_down_fp8_dots=fields.value("lora_down_fp8_dots", bool, False),
        lora_down_fp8_text=fields.value("lora_down_fp8_text", bool, False),
        fused_gelu_lora=fields.value("fused_gelu_lora", bool, False),
        lora_up_in_gemm=fields.value("lora_up_in_gemm", bool, False),
        joined_qkv=fields.value("joined_qkv", bool, False),
        lora_tails=fields.value("lora_tails", bool, False),
        lora_tails_mlp_in=fields.value("lora_tails_mlp_in", bool, False),
        lora_tails_paired=fields.value("lora_tails_paired", bool, False),
        batched_modulation=batched_modulation,
        gelu_via_sigmoid=fields.choice("gelu_via_sigmoid", GELU_SCOPES, "none"),
        parallel=parallel,
        no_slot_programs=fields.value("no_slot_programs", bool, True),
        merge_by_address=fields.value("merge_by_address", bool, True),
        unquantized_linears=fields.strings("unquantized_linears", (), allow_empty=True),
        fp8_attention_min_tokens=fields.value("fp8_attention_min_tokens", int, 0),
    )
    fields.refuse_unknown()
    # nan passes `> 0` and fails every later comparison: such a build failed its validation after compiling it all
    for field in ("validation.tolerance", "validation.end_to_end_tolerance"):
        if not math.isfinite(value := fields.value(field, float, 0.0)):
            raise fields.error(field, f"= {value!r} is not a finite number; use a relative L2 error such as 3e-2"
                                      + ("" if field == "validation.tolerance" else ", or 0 for tolerance's"))
    if recipe.end_to_end_tolerance < 0:
        raise fields.error("validation.end_to_end_tolerance", f"= {recipe.end_to_end_tolerance!r} is negative; use "
                                                               "a relative L2 error, or 0 for tolerance's")
    if recipe.unquantized_linears and recipe.quantization == "none":
        raise fields.error("unquantized_linears", "keeps linears out of a quantization, but this recipe has "
                                                  "quantization = \"none\"; remove it or set a quantization")
    if recipe.fp8_attention_min_tokens < 0:
        raise fields.error("fp8_attention_min_tokens", f"= {recipe.fp8_attention_min_tokens} is negative; use 0 "
                                                       "for FP8 attention at every length, or a token count")
    if recipe.fp8_attention_min_tokens and recipe.attention != "cudnn_fp8":
        raise fields.error("fp8_attention_min_tokens", f"chooses between FP8 and bf16 attention, but attention = "
                                                       f"{recipe.attention!r}; set attention = \"cudnn_fp8\" or "
                                                       "remove the field")
    if recipe.fused_gelu_quant and recipe.quantization != "fp8_rowwise":
        raise fields.error("fused_gelu_quant", f"= true needs quantization = \"fp8_rowwise\" (this recipe has "
                                               f"{recipe.quantization!r}): it fuses the FP8 quantization")
    if recipe.fused_norm_quant and not (recipe.fused_gelu_quant and recipe.fused_qk_norm_rope):
        raise fields.error("fused_norm_quant", "= true needs fused_gelu_quant = true and fused_qk_norm_rope = true: "
                                               "the blocks' MLPs and attentions take its quantized norms")
    if recipe.fp8_qk_in_norm_rope and not (recipe.fused_qk_norm_rope and recipe.attention == "cudnn_fp8"):
        raise fields.error("fp8_qk_in_norm_rope", "= true needs fused_qk_norm_rope = true and attention = "
                                                  f"\"cudnn_fp8\" (this recipe has {recipe.attention!r}): it makes "
                                                  "that kernel write q/k for FP8 attention")
    if recipe.lora_down_from_fp8 and not recipe.fused_gelu_quant:
        raise fields.error("lora_down_from_fp8", "= true needs fused_gelu_quant = true: it reads the FP8 GELU output "
                                                 "that the fused kernel writes")
    if recipe.lora_down_fp8_gemm and not recipe.lora_down_from_fp8:
        raise fields.error("lora_down_fp8_gemm", "= true needs lora_down_from_fp8 = true: it chooses how those "
                                                 "down-projections from the FP8 GELU output run")
    if recipe.lora_down_fp8_dots and not recipe.lora_down_from_fp8:
        raise fields.error("lora_down_fp8_dots", "= true needs lora_down_from_fp8 = true: it chooses how those "
                                                 "down-projections from the FP8 GELU output run")
    if recipe.lora_down_fp8_text and not recipe.lora_down_fp8_dots:
        raise fields.error("lora_down_fp8_text", "= true needs lora_down_fp8_dots = true: the text feed-forwards' few "
                                                 "rows are for the FP8-dot kernel only (the bf16-A kernel was slower "
                                                 "there than the bf16 copy)")
    if recipe.lora_down_fp8_dots and recipe.lora_down_fp8_gemm:
        raise fields.error("lora_down_fp8_dots", "= true cannot go with lora_down_fp8_gemm = true: both choose how "
                                                 "the down-projections from the FP8 GELU output run; set one of them "
                                                 "to false")
    if recipe.fused_gelu_lora and not recipe.fused_gelu_quant:
        raise fields.error("fused_gelu_lora", "= true needs fused_gelu_quant = true: it extends that kernel")
    if recipe.joined_qkv and not recipe.fused_norm_quant:
        raise fields.error("joined_qkv", "= true needs fused_norm_quant = true: only then do a stream's q/k/v read "
                                         "one FP8 input, which their joined GEMM takes")
    if recipe.lora_tails and not recipe.fused_norm_quant:
        raise fields.error("lora_tails", "= true needs fused_norm_quant = true: the tails take a single block's one FP8 "
                                         "input; set lora_tails = false with fused_norm_quant = false")
    if recipe.lora_tails and not 0 < recipe.max_rank <= TAILS_MAX_RANK:
        raise fields.error("lora_tails", f"= true needs max_rank 1-{TAILS_MAX_RANK} (this recipe has "
                                         f"{recipe.max_rank}): the tails hold LoRA sets up to rank {TAILS_MAX_RANK}; "
                                         "set lora_tails = false for a larger max_rank")
    if recipe.lora_tails and (recipe.layout != "regional" or recipe.parallel != "none"):
        raise fields.error("lora_tails", f"= true needs the regional layout without context parallelism (layout = "
                                         f"{recipe.layout!r}, parallel = {recipe.parallel!r}): its tailed programs "
                                         "are regional block ones; set lora_tails = false")
    if recipe.lora_tails_paired and not recipe.lora_tails:
        raise fields.error("lora_tails_paired", "= true needs lora_tails = true: it lays out the tails' rows and "
                                                "weights")
    if recipe.lora_tails_mlp_in and not recipe.lora_tails:
        raise fields.error("lora_tails_mlp_in", "= true needs lora_tails = true: it extends the single blocks' tails "
                                                "to the double blocks' MLP-in")
    if recipe.lora_up_in_gemm and recipe.quantization != "fp8_rowwise":
        raise fields.error("lora_up_in_gemm", f"= true needs quantization = \"fp8_rowwise\" (this recipe has "
                                              f"{recipe.quantization!r}): its kernel is the FP8 GEMM")
    # levers that take the same LoRA projections out of the bf16 GEMMs (group_lora_down goes with either)
    for lever, others, what in (("fused_gelu_lora", ("lora_down_from_fp8", "group_lora_up"),
                                 "the LoRA projections around the MLP GELUs"),
                                ("lora_up_in_gemm", ("lora_down_from_fp8", "group_lora_up", "fused_gelu_lora"),
                                 "LoRA up-projections out of the bf16 GEMMs")):
        for other in others:
            if getattr(recipe, lever) and getattr(recipe, other):
                raise fields.error(lever, f"= true cannot go with {other} = true: both take {what}; set one of "
                                          "them to false")
    if recipe.fused_gelu_quant and recipe.gelu_via_sigmoid != "none":
        raise fields.error("gelu_via_sigmoid", f"= {recipe.gelu_via_sigmoid!r} cannot go with fused_gelu_quant = true, "
                                               "whose kernel computes the GELU itself; set it to \"none\"")
    if conflict := attention_device_conflict(recipe.attention, recipe.device):
        raise RecipeError(f"{fields.source}: {conflict}",
                          f"edit attention or device in {fields.source}: {_ATTENTION_DEVICE_FIX}")
    for field in ("batch", "image_tokens", "text_tokens"):
        low, high = getattr(recipe, field)
        example_value = getattr(recipe, f"example_{field}")
        if not low <= example_value <= high:  # the example traces the program: it must lie in the dynamic range
            raise fields.error(f"example.{field}", f"= {example_value} is outside shapes.{field} [{low}, {high}]")
    return recipe


def _inductor_configs(fields: TomlFields) -> dict:
    """The `[inductor]` table, each key an Inductor config of this torch: a misspelled one (`max_autotun`) failed
    the build only at its first compile, after loading and exporting the model."""
    configs = dict(fields.value("inductor", dict, {}))
    if not configs:
        return configs
    import difflib

    import torch
    import torch._inductor.config as inductor_config

    known = set(inductor_config.get_config_copy())
    for key, value in configs.items():
        if key in known:
            continue
        if isinstance(value, dict):  # [inductor.triton] cudagraphs = true: the configs take dotted names
            hint = f'; write it as "{key}.{next(iter(value), "NAME")}" = ... under [inductor]'
        else:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise fields.error(f"inductor.{key}", f"is not an Inductor config of torch {torch.__version__}{hint}")
    return configs


def _load_file(path: Path) -> Recipe:
    data, source = resolve_bases(path, TomlFields.read(path).data, _recipe_files())
    return parse_recipe(data, source)


def load_recipe(target: str | Path) -> Recipe:
    """A recipe by target name (`h100`) or by path to a TOML file."""
    path = Path(target)
    if path.suffix == ".toml" and path.is_file():
        return _load_file(path)
    files = _recipe_files()
    if str(target) not in files and (path.suffix == ".toml" or len(path.parts) > 1):  # meant as a file
        what = "is not a file" if path.exists() else "does not exist"
        raise UnknownTargetError(f"the recipe file {str(target)!r} {what}",
                                 "pass the path of a recipe .toml file (e.g. base = \"h200\" and the fields you "
                                 f"change: docs/recipes.md), or a target name: {', '.join(known_targets())}")
    if str(target) not in files:
        raise UnknownTargetError(
            f"unknown target {str(target)!r}",
            f"use one of: {', '.join(known_targets())} (or a path to a recipe .toml file)",
        )
    recipe = _load_file(files[str(target)])
    if recipe.name != str(target):  # the manifest records recipe.name: it must be the name users pass
        raise RecipeError(f"{files[str(target)]}: name = {recipe.name!r} differs from the file name {target!r}",
                          f"set name = {str(target)!r} in {files[str(target)]}")
    return recipe
