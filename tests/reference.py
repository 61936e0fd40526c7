"""Eager diffusers references: FluxPipeline + PEFT LoRA loading, as users run it today."""

from __future__ import annotations

import torch

REQUEST = dict(prompt="a lighthouse on a cliff at dusk", height=64, width=64, num_inference_steps=3,
               max_sequence_length=16, guidance_scale=3.5)


def latents(pipe, seed: int = 7, **overrides) -> torch.Tensor:
    """What `FluxPipeline(..., output_type="latent").images` returns for the test request."""
    kwargs = {**REQUEST, **overrides}
    with torch.no_grad():
        return pipe(**kwargs, generator=torch.Generator("cpu").manual_seed(seed), output_type="latent").images


def reference_latents(pipe, loras, seed: int = 7, **overrides) -> torch.Tensor:
    """Latents of the eager pipeline with `loras` [(path, scale)] via load_lora_weights + set_adapters."""
    # adapters of every component: a CLIP-only adapter has none in the transformer
    loaded = set().union(*pipe.get_list_adapters().values()) if hasattr(pipe, "get_list_adapters") else set()
    names = []
    for path, _ in loras:
        name = f"ref_{abs(hash(str(path)))}"
        if name not in loaded:
            pipe.load_lora_weights(str(path), adapter_name=name)
            loaded.add(name)
        names.append(name)
    if names:
        pipe.enable_lora()
        pipe.set_adapters(names, adapter_weights=[float(s) for _, s in loras])
    elif loaded:
        pipe.disable_lora()
    return latents(pipe, seed, **overrides)


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def load_fp8_package(package):
    """`aotpack.load` of a CPU FP8 test package on the tiny model (torchao's hardware check lifted)."""
    import pytest
    import torchao.quantization.quant_api as quant_api

    import aotpack

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(quant_api, "_check_hardware_support", lambda granularity: None)
        return aotpack.load(package, model="tiny")


def tiny_forward_inputs(transformer) -> dict:
    """The tiny transformer's forward inputs for package tests: batch 1, 64 image + 16 text tokens, seeded."""
    from aotpack.models.examples import transformer_inputs

    return transformer_inputs(transformer.config, batch=1, image_tokens=64, text_tokens=16, dtype=torch.bfloat16,
                              device="cpu", generator=torch.Generator().manual_seed(2))


def run_float(model, inputs) -> torch.Tensor:
    """`model(**inputs)`'s output in float32, without autograd."""
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0].float()


def served_beside_fp8(package, fp8_package):
    """For a lever package's tests against the FP8 package and diffusers + PEFT: both served with no LoRA set
    (`served`, `plain`; `transformer` is `served`'s), the eager tiny model (`eager`), `inputs`, and the no-LoRA
    outputs of the eager model, `served` and `plain` (`ref_base`, `base`, `plain_base`)."""
    from types import SimpleNamespace

    from aotpack.models.checkpoint import load_transformer, parse_model_ref

    served, plain = load_fp8_package(package), load_fp8_package(fp8_package)
    inputs = tiny_forward_inputs(served.transformer)
    eager = load_transformer(parse_model_ref("tiny"), torch.bfloat16, "cpu").eval()
    served.set_loras([])
    plain.set_loras([])
    return SimpleNamespace(served=served, plain=plain, transformer=served.transformer, eager=eager, inputs=inputs,
                           ref_base=run_float(eager, inputs), base=run_float(served.transformer, inputs),
                           plain_base=run_float(plain.transformer, inputs))


def peft_outputs(eager, inputs, loras: dict):
    """Each LoRA of `loras` (name -> file) loaded into the eager model in turn as adapter `a<index>` and set alone at
    scale 1: yields (name, file, the eager output with it)."""
    for index, (name, path) in enumerate(loras.items()):
        eager.load_lora_adapter(str(path), adapter_name=f"a{index}", prefix="transformer")
        eager.set_adapters([f"a{index}"], [1.0])
        yield name, path, run_float(eager, inputs)


def cpu_test_recipe(name: str, fields: str, *, tolerance: float, end_to_end: float, shapes=None) -> str:
    """A small CPU recipe (TOML) for test packages: `fields` are its top-level lines (dtype, attention,
    quantization, max_rank...); shapes (name -> [min, max]) default to the ranges the CPU tests share,
    the example is theirs too."""
    shapes = shapes or {"batch": [1, 4], "image_tokens": [16, 256], "text_tokens": [8, 64]}
    return f"""
name = "{name}"
device = "cpu"
{fields.strip()}
[shapes]
""" + "".join(f"{axis} = {list(bounds)}\n" for axis, bounds in shapes.items()) + f"""[example]
batch = 1
image_tokens = 64
text_tokens = 16
[validation]
tolerance = {tolerance}
end_to_end_tolerance = {end_to_end}
"""


def fp8_cpu_recipe(name: str, extra: str = "") -> str:
    """The h100/h200 recipes' mechanics as a small CPU recipe (TOML): FP8 row-wise linears, the fused GELU, q/k and
    norm kernels (their torch references on the CPU), the AdaLN modulation linears kept in bf16 as h200 keeps
    them; `extra` adds top-level lines (another lever)."""
    import json

    from aotpack.recipes.recipe import load_recipe

    return cpu_test_recipe(name, f"""
dtype = "bfloat16"
quantization = "fp8_rowwise"
max_rank = 16
fused_gelu_quant = true
fused_qk_norm_rope = true
fused_norm_quant = true
unquantized_linears = {json.dumps(list(load_recipe("h200").unquantized_linears))}
{extra.strip()}
""", tolerance=0.1, end_to_end=2.0)


def build_fp8_package(folder, extra: str = ""):
    """Build `fp8_cpu_recipe` (+ `extra` lines) under `folder` with torchao's hardware check lifted, counting what
    the build traced and ran through each fused op (their torch references on the CPU). Returns a namespace:
    `path`, and `calls` with `gelu` and `norm` (each call's `keep_input`) and `qk` (each call's image tokens)."""
    from types import SimpleNamespace

    import pytest
    import torchao.quantization.quant_api as quant_api

    from aotpack.builder.build import build_package
    from aotpack.models import fused_quant, norm_quant, qk_norm_rope

    calls = SimpleNamespace(gelu=[], qk=[], norm=[])
    recipe = folder / "cpu-fp8.toml"
    recipe.write_text(fp8_cpu_recipe("cpu-fp8", extra))

    def record(patch, module, name: str, note):  # the op's reference still computes; `note(args)` records the call
        reference = getattr(module, name)
        patch.setattr(module, name, lambda *args: note(args) or reference(*args))

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(quant_api, "_check_hardware_support", lambda granularity: None)
        record(patch, fused_quant, "gelu_quant_reference", lambda args: calls.gelu.append(args[4]))
        record(patch, qk_norm_rope, "qk_norm_rope_reference", lambda args: calls.qk.append(args[4].shape[1]))
        record(patch, norm_quant, "norm_modulate_quant_reference", lambda args: calls.norm.append(args[4]))
        path = build_package("tiny", str(recipe), out=folder / "pkg", compile_workers=2, progress=False)
    return SimpleNamespace(path=path, calls=calls)


def fp8_tiny_transformer(monkeypatch, rank: int):
    """The tiny transformer in bf16 with FP8 row-wise linears (torchao's hardware check lifted) and, with
    `rank`, random LoRA factors bound to every slot; returns it and its slot count."""
    import torchao.quantization.quant_api as quant_api

    from aotpack.models.prepare import prepare_transformer, regional_slot_names
    from aotpack.models.slots import bind_slot_tensors, random_slot_tensors, slot_modules
    from aotpack.models.tiny import make_transformer

    monkeypatch.setattr(quant_api, "_check_hardware_support", lambda granularity: None)
    torch.manual_seed(0)
    transformer = make_transformer(torch.bfloat16).eval()
    names = regional_slot_names(transformer, ["*"]) if rank else []
    specs = prepare_transformer(transformer, dtype="bfloat16", device="cpu", quantization="fp8_rowwise",
                                slot_names=names)
    if rank:
        lora = random_slot_tensors(specs, rank, torch.bfloat16, "cpu", torch.Generator().manual_seed(3), std=0.2)
        bind_slot_tensors(transformer, lora)
    return transformer, len(slot_modules(transformer))


def tiny_block_inputs(transformer, batch: int = 1):
    """Inputs for the tiny transformer's tests: its forward's keyword inputs (64 image + 16 text tokens), and a
    single block region's `(joint, temb, rotary)` on an 80-token joint sequence, seeded."""
    from aotpack.models.examples import transformer_inputs

    inputs = transformer_inputs(transformer.config, batch=1, image_tokens=64, text_tokens=16,
                                dtype=torch.bfloat16, device="cpu", generator=torch.Generator().manual_seed(1))
    generator = torch.Generator().manual_seed(2)
    joint = torch.randn(batch, 80, transformer.inner_dim, generator=generator).to(torch.bfloat16)
    temb = torch.randn(batch, transformer.inner_dim, generator=generator).to(torch.bfloat16)
    return inputs, joint, temb, transformer.pos_embed(torch.zeros(80, 3))



def tiny_lever_run(monkeypatch, rank: int, module, function: str):
    """For a lever's tests: `(transformer, outputs, calls)`, the FP8 tiny transformer with r-`rank` slots bound,
    `outputs(model)` (the whole model's output on `tiny_block_inputs` and its second single block region's, in
    float32, slots kept bound) and the list of the argument tuples `module.function` gets called with."""
    from aotpack.models.regions import SINGLE_BLOCK, make_region

    transformer, _ = fp8_tiny_transformer(monkeypatch, rank)
    inputs, joint, temb, rotary = tiny_block_inputs(transformer)
    calls, original = [], getattr(module, function)
    monkeypatch.setattr(module, function, lambda *args: calls.append(args) or original(*args))

    def outputs(model):
        single = make_region(model, SINGLE_BLOCK, "single_transformer_blocks.1")
        single.bind_lora = lambda lora: None  # keep the slots bound
        return model(**inputs, return_dict=False)[0].float(), single(joint, temb, *rotary, None)[0].float()

    return transformer, outputs, calls


class SingleBlockProgram:
    """A lever's single block as the build exports it (CPU): the FP8 tiny transformer with r16 slots, the GELUs routed
    by `install_fused_gelu_quant(**lever)` (then `install(transformer)`, if given), block 0's region, a bound random
    LoRA and batch-2 activations (a size-1 example would specialise the batch axis). `program` is the exported
    program; `run(path)` compiles it with AOTInductor and returns (eager region, compiled program, eager region
    without the LoRA) outputs."""

    def __init__(self, monkeypatch, install=None, **lever):
        from aotpack.builder.export import export_region
        from aotpack.models.fused_quant import install_fused_gelu_quant
        from aotpack.models.lora_down_fp8 import program_lora_inputs
        from aotpack.models.regions import SINGLE_BLOCK, make_region
        from aotpack.models.slots import SlotSpec, random_slot_tensors

        transformer, _ = fp8_tiny_transformer(monkeypatch, 16)
        install_fused_gelu_quant(transformer, **lever)
        if install is not None:  # a lever beyond the GELU's, e.g. `install_lora_up_in_gemm`
            install(transformer)
        self.region = make_region(transformer, SINGLE_BLOCK, "single_transformer_blocks.0")
        specs = [SlotSpec(name, slot.in_features, slot.out_features) for name, slot in self.region.slots().items()]
        lora = random_slot_tensors(specs, 16, torch.bfloat16, "cpu", torch.Generator().manual_seed(5), std=0.2)
        self.lora = program_lora_inputs(lora, self.region.lora_names())  # A's FP8 halves where slots read them
        _, joint, temb, rotary = tiny_block_inputs(transformer, batch=2)
        self.activations = (joint, temb, *rotary)
        shapes = {"batch": [1, 2], "image_tokens": [16, 256], "text_tokens": [8, 64]}
        self.program = export_region(self.region, self.activations, self.lora, shapes)

    def targets(self) -> list[str]:
        return [str(n.target) for n in self.program.graph.nodes]

    def run(self, path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        compiled = torch._inductor.aoti_load_package(
            torch._inductor.aoti_compile_and_package(self.program, package_path=str(path)))
        with torch.no_grad():
            (expected,) = self.region(*self.activations, self.lora)
            (actual,) = compiled(*self.activations, self.lora)
            self.region.bind_lora(None)
            (no_lora,) = self.region(*self.activations, None)
        return expected, actual, no_lora
