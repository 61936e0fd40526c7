"""LoRA files in every published Flux layout, written in code from a model's layer table.

Each writer emits the *original* keys of its trainer or tool, as the converters in
`diffusers/loaders/lora_conversion_utils.py` read them, so the tests exercise diffusers' conversion
exactly as a downloaded file would. Ranks and alphas vary per layer so that scaling mistakes show.

- kohya / sd-scripts: `lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight` (fused qkv),
  `lora_unet_single_blocks_0_linear1` (fused q/k/v/mlp: Flux.1 widths only), embedders, final layer,
  `.alpha` per module (folded as alpha/rank by the converter), CLIP as `lora_te1_…`.
- ComfyUI: the same modules as `diffusion_model.<bfl name>.lora_down.weight`, CLIP as
  `text_encoders.clip_l.transformer.…`, T5 as `text_encoders.t5xxl.transformer.…` (diffusers drops it).
- XLabs: `double_blocks.0.processor.qkv_lora1.down.weight` … (no alphas).
- mixture: `lora_transformer_<diffusers name>` + `.alpha` (alpha required), CLIP as `lora_te1_…`.
- ai-toolkit / PEFT: `transformer.<diffusers name>.lora_A.weight` with `.alpha` keys and mixed ranks.
- diffusers-saved: `FluxPipeline.save_lora_weights` with `lora_adapter_metadata` (rsLoRA, patterns).
"""

from __future__ import annotations

import fnmatch
from pathlib import Path

import torch
from safetensors.torch import save_file

CLIP_MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1",
                "mlp.fc2")


def bfl_layers(config) -> dict[str, tuple[int, int]]:
    """BFL / kohya module name -> (in, out) for a diffusers FluxTransformer2DModel config."""
    d = config["num_attention_heads"] * config["attention_head_dim"]
    mlp = 4 * d
    out_channels = (config.get("out_channels") or config["in_channels"]) * config["patch_size"] ** 2
    layers = {"img_in": (config["in_channels"], d), "txt_in": (config["joint_attention_dim"], d),
              "time_in.in_layer": (256, d), "time_in.out_layer": (d, d),
              "vector_in.in_layer": (config["pooled_projection_dim"], d), "vector_in.out_layer": (d, d)}
    if config["guidance_embeds"]:
        layers.update({"guidance_in.in_layer": (256, d), "guidance_in.out_layer": (d, d)})
    for i in range(config["num_layers"]):
        for stream in ("img", "txt"):
            prefix = f"double_blocks.{i}.{stream}"
            layers.update({f"{prefix}_mod.lin": (d, 6 * d), f"{prefix}_attn.qkv": (d, 3 * d),
                           f"{prefix}_attn.proj": (d, d), f"{prefix}_mlp.0": (d, mlp), f"{prefix}_mlp.2": (mlp, d)})
    for i in range(config["num_single_layers"]):
        layers.update({f"single_blocks.{i}.linear1": (d, 3 * d + mlp), f"single_blocks.{i}.linear2": (d + mlp, d),
                       f"single_blocks.{i}.modulation.lin": (d, 3 * d)})
    layers.update({"final_layer.linear": (d, out_channels), "final_layer.adaLN_modulation.1": (d, 2 * d)})
    return layers


def clip_layers(text_encoder) -> dict[str, tuple[int, int]]:
    """`text_model.encoder.layers.<i>.<module>` (the name LoRA files use) -> (in, out)."""
    modules = dict(text_encoder.named_modules())
    layers = {}
    for i in range(text_encoder.config.num_hidden_layers):
        for module in CLIP_MODULES:
            linear = modules[f"encoder.layers.{i}.{module}"] if f"encoder.layers.{i}.{module}" in modules else \
                modules[f"text_model.encoder.layers.{i}.{module}"]
            layers[f"text_model.encoder.layers.{i}.{module}"] = (linear.in_features, linear.out_features)
    return layers


def diffusers_layers(transformer, patterns=("*",)) -> dict[str, tuple[int, int]]:
    """Linear layer name -> (in, out), also for a model PEFT has already wrapped (`x.base_layer`)."""
    layers = {}
    for name, module in transformer.named_modules():
        if not isinstance(module, torch.nn.Linear) or ".lora_" in name:
            continue
        name = name.removesuffix(".base_layer")
        if any(fnmatch.fnmatchcase(name, p) for p in patterns):
            layers[name] = (module.in_features, module.out_features)
    return layers


class Factors:
    """Deterministic random LoRA factors; `strength` sets the size of B A x relative to x."""

    def __init__(self, seed: int, strength: float):
        self.generator = torch.Generator().manual_seed(seed)
        self.strength = strength

    def __call__(self, in_features: int, out_features: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        down = torch.randn(rank, in_features, generator=self.generator) * in_features**-0.5
        up = torch.randn(out_features, rank, generator=self.generator) * self.strength * rank**-0.5
        return down, up


def _rank_and_alpha(index: int, rank: int) -> tuple[int, float]:
    """Mixed ranks and alphas != rank, cycling per layer (multiples of 4 keep fused splits exact)."""
    ranks = (rank, 2 * rank, rank)
    r = ranks[index % 3]
    return r, float(r) * (0.5, 1.5, 1.0)[index % 3]


def _sparsify(up: torch.Tensor, dims: list[int], rank: int) -> torch.Tensor:
    """Block-diagonal up weights: the 'sparse' fused layout diffusers splits by rank chunks."""
    out, chunk, row = torch.zeros_like(up), rank // len(dims), 0
    for j, dim in enumerate(dims):
        out[row:row + dim, j * chunk:(j + 1) * chunk] = up[row:row + dim, j * chunk:(j + 1) * chunk]
        row += dim
    return out


def _fused_dims(name: str, width: int) -> list[int] | None:
    if name.endswith("attn.qkv"):
        return [width] * 3
    if name.endswith("linear1"):
        return [width] * 3 + [4 * width]
    return None


def kohya_style(config, clip=None, *, rank=4, seed=0, strength=0.3, sparse_fused=False, skip=()):
    """{bfl module name: (down, up, alpha)} and {clip module name: (down, up, alpha)}; `skip`: name
    suffixes to leave out (e.g. "linear1", whose split diffusers hard-codes for Flux.1 widths)."""
    factors, width = Factors(seed, strength), config["num_attention_heads"] * config["attention_head_dim"]
    transformer = {}
    for index, (name, (fan_in, fan_out)) in enumerate(bfl_layers(config).items()):
        if name.endswith(tuple(skip)):
            continue
        r, alpha = _rank_and_alpha(index, rank)
        down, up = factors(fan_in, fan_out, r)
        dims = _fused_dims(name, width)
        if sparse_fused and dims:  # rank divisible by the number of splits, off-diagonal blocks zero
            fused_rank = len(dims) * max(1, rank // 2)
            down, up = factors(fan_in, fan_out, fused_rank)
            up, alpha = _sparsify(up, dims, fused_rank), 0.75 * fused_rank
        transformer[name] = (down, up, alpha)
    text = {}
    for index, (name, (fan_in, fan_out)) in enumerate((clip or {}).items()):
        r, alpha = _rank_and_alpha(index, rank)
        text[name] = (*factors(fan_in, fan_out, r), alpha)
    return transformer, text


def kohya(config, clip=None, *, t5_blocks=0, **kwargs) -> dict[str, torch.Tensor]:
    transformer, text = kohya_style(config, clip, **kwargs)
    state = {}
    for prefix, modules in (("lora_unet_", transformer), ("lora_te1_", text)):
        for name, (down, up, alpha) in modules.items():
            key = prefix + name.replace(".", "_")
            state.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                          f"{key}.alpha": torch.tensor(alpha)})
    for i in range(t5_blocks):  # sd-scripts' T5 LoRA (lora_te3_): diffusers drops it; no alpha (it would crash)
        down, up = Factors(99, 0.3)(16, 16, 2)
        key = f"lora_te3_encoder_block_{i}_layer_0_SelfAttention_q"
        state.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up})
    return state


def comfyui(config, clip=None, *, t5_blocks=1, diff_b=None, **kwargs) -> dict[str, torch.Tensor]:
    """ComfyUI's saved LoRA: `diffusion_model.` + BFL names; `diff_b`: None, "zero" or "nonzero"."""
    transformer, text = kohya_style(config, clip, **kwargs)
    state = {}
    for prefix, modules in (("diffusion_model.", transformer), ("text_encoders.clip_l.transformer.", text)):
        for name, (down, up, alpha) in modules.items():
            state.update({f"{prefix}{name}.lora_down.weight": down, f"{prefix}{name}.lora_up.weight": up,
                          f"{prefix}{name}.alpha": torch.tensor(alpha)})
    for i in range(t5_blocks):
        down, up = Factors(98, 0.3)(16, 16, 2)
        key = f"text_encoders.t5xxl.transformer.encoder.block.{i}.layer.0.SelfAttention.q"
        state.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up})
    if diff_b:
        width = config["num_attention_heads"] * config["attention_head_dim"]
        bias = torch.zeros(3 * width) if diff_b == "zero" else torch.full((3 * width,), 0.01)
        state["diffusion_model.double_blocks.0.img_attn.qkv.diff_b"] = bias
    return state


def xlabs(config, *, rank=4, seed=0, strength=0.3) -> dict[str, torch.Tensor]:
    """XLabs' processor LoRAs: fused qkv (equal split: width-independent) and attention projections."""
    factors, d = Factors(seed, strength), config["num_attention_heads"] * config["attention_head_dim"]
    modules = {}
    for i in range(config["num_layers"]):
        for n in ("1", "2"):
            modules[f"double_blocks.{i}.processor.qkv_lora{n}"] = (d, 3 * d)
            modules[f"double_blocks.{i}.processor.proj_lora{n}"] = (d, d)
    for i in range(config["num_single_layers"]):
        modules[f"single_blocks.{i}.processor.qkv_lora"] = (d, 3 * d)
    state = {}
    for index, (name, (fan_in, fan_out)) in enumerate(modules.items()):
        down, up = factors(fan_in, fan_out, _rank_and_alpha(index, rank)[0])
        state.update({f"{name}.down.weight": down, f"{name}.up.weight": up})
    return state


MIXTURE_BLOCK_MODULES = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj",
                         "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")
MIXTURE_TOP_MODULES = ("context_embedder", "x_embedder", "proj_out", "norm_out.linear",
                       "time_text_embed.timestep_embedder.linear_1", "time_text_embed.guidance_embedder.linear_2",
                       "time_text_embed.text_embedder.linear_1")


def mixture(transformer, clip=None, *, rank=4, seed=0, strength=0.3, unet_keys=True) -> dict[str, torch.Tensor]:
    """`lora_transformer_…` keys (what diffusers' mixture converter maps: block attention + top-level
    layers) with alphas, CLIP as `lora_te1_…`, plus `lora_unet_…` keys that the converter discards."""
    factors, layers = Factors(seed, strength), diffusers_layers(transformer)
    names = [n for n in layers if n in MIXTURE_TOP_MODULES
             or (n.startswith("transformer_blocks.") and n.split(".", 2)[2] in MIXTURE_BLOCK_MODULES)
             or (n.startswith("single_transformer_blocks.") and n.split(".", 2)[2] in MIXTURE_BLOCK_MODULES[:3])]
    state = {}
    entries = [("lora_transformer_", n, layers[n]) for n in names]
    entries += [("lora_te1_", n, shape) for n, shape in (clip or {}).items()]
    for index, (prefix, name, (fan_in, fan_out)) in enumerate(entries):
        r, alpha = _rank_and_alpha(index, rank)
        down, up = factors(fan_in, fan_out, r)
        key = prefix + name.replace(".", "_")
        state.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                      f"{key}.alpha": torch.tensor(alpha)})
    if unet_keys:
        down, up = factors(8, 8, 2)
        state.update({"lora_unet_extra_layer.lora_down.weight": down, "lora_unet_extra_layer.lora_up.weight": up})
    return state


def peft_with_alphas(transformer, clip=None, *, rank=4, seed=0, strength=0.3, patterns=("*",),
                     lora_bias=False) -> dict[str, torch.Tensor]:
    """ai-toolkit / PEFT layout (`transformer.<name>.lora_A.weight`) with `.alpha` keys and mixed ranks."""
    factors, state = Factors(seed, strength), {}
    entries = [("transformer.", n, s) for n, s in diffusers_layers(transformer, patterns).items()]
    entries += [("text_encoder.", n, s) for n, s in (clip or {}).items()]
    for index, (prefix, name, (fan_in, fan_out)) in enumerate(entries):
        r, alpha = _rank_and_alpha(index, rank)
        down, up = factors(fan_in, fan_out, r)
        state.update({f"{prefix}{name}.lora_A.weight": down, f"{prefix}{name}.lora_B.weight": up,
                      f"{prefix}{name}.alpha": torch.tensor(alpha)})
        if lora_bias:
            state[f"{prefix}{name}.lora_B.bias"] = torch.zeros(fan_out) if lora_bias == "zero" else \
                torch.full((fan_out,), 0.01)
    return state


def diffusers_saved(transformer, clip, directory, *, rank=4, seed=0, strength=0.3) -> Path:
    """`FluxPipeline.save_lora_weights` output with `lora_adapter_metadata` (rsLoRA, rank/alpha patterns)."""
    from diffusers import FluxPipeline
    from peft import LoraConfig

    factors = Factors(seed, strength)
    t_config = LoraConfig(r=rank, lora_alpha=3 * rank, use_rslora=True, target_modules=["to_q", "to_k", "to_v",
                          "proj_mlp", "net.2"], rank_pattern={"net.2": 2 * rank}, alpha_pattern={"to_v": rank})
    transformer_layers = {}
    for name, (fan_in, fan_out) in diffusers_layers(transformer, ["*.to_q", "*.to_k", "*.to_v", "*.proj_mlp",
                                                                  "*.ff.net.2", "*.ff_context.net.2"]).items():
        down, up = factors(fan_in, fan_out, 2 * rank if name.endswith("net.2") else rank)
        transformer_layers.update({f"{name}.lora_A.weight": down, f"{name}.lora_B.weight": up})
    c_config = LoraConfig(r=rank, lora_alpha=rank / 2, target_modules=["q_proj", "v_proj"])
    text_layers = {}
    for name, (fan_in, fan_out) in clip.items():
        if name.endswith(("q_proj", "v_proj")):
            down, up = factors(fan_in, fan_out, rank)
            text_layers.update({f"{name}.lora_A.weight": down, f"{name}.lora_B.weight": up})
    FluxPipeline.save_lora_weights(directory, transformer_lora_layers=transformer_layers,
                                   text_encoder_lora_layers=text_layers,
                                   transformer_lora_adapter_metadata=t_config.to_dict(),
                                   text_encoder_lora_adapter_metadata=c_config.to_dict())
    return Path(directory) / "pytorch_lora_weights.safetensors"


def write(state_dict: dict[str, torch.Tensor], path, metadata: dict[str, str] | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path), metadata=metadata)
    return path


def peft_deltas(pipe, path) -> dict[str, torch.Tensor]:
    """The reference for a parse: each transformer layer's `scaling * B @ A` after diffusers' `load_lora_weights`
    (PEFT) of the file `path` into `pipe`. The adapter is deleted again."""
    from peft.tuners.lora import LoraLayer

    name = f"deltas_{abs(hash(str(path)))}"
    pipe.load_lora_weights(str(path), adapter_name=name)
    try:
        return {layer: (module.lora_B[name].weight @ module.lora_A[name].weight).detach() * module.scaling[name]
                for layer, module in pipe.transformer.named_modules()
                if isinstance(module, LoraLayer) and name in module.lora_A}
    finally:
        pipe.delete_adapters(name)


def delta_error(adapter, reference: dict[str, torch.Tensor]) -> float:
    """Largest relative error of a parsed adapter's per-layer deltas against `peft_deltas` (inf if the two hold
    other layers, or none)."""
    ours = {layer: delta.B.double() @ delta.A.double() for layer, delta in adapter.layers.items()}
    if not reference or set(ours) != set(reference):
        return float("inf")
    return max(float((ours[k] - reference[k].double()).norm() / reference[k].double().norm()) for k in reference)
