"""Images from your model, prompts and LoRAs: each package against eager diffusers + PEFT.

    aotpack bench quality --model black-forest-labs/FLUX.1-dev --package default=PKG --package fp8attn=PKG2 \\
        --lora style.safetensors:0.8 --prompt "a lighthouse at dusk" --prompt "a red fox in snow" --out OUT

Why: aotpack's speed figures come from random weights, which measure numerical error but not what it does to a
picture, and FP8 (base weights; attention with `attention = "cudnn_fp8"`; a merged set re-rounded onto the FP8
grid) is what a service checks on its own checkpoint and LoRAs before it serves them. Every contender makes each
prompt's image with no LoRA and with the set, same seeds (`torch.Generator("cpu")`, seed + prompt index): eager
diffusers first (`FluxPipeline` + PEFT `load_lora_weights` / `set_adapters`, in the first package's dtype: what
users run today), then each package as `aotpack run` runs it, its set in slots and merged (`--modes`). Against the
reference (`--reference`, default eager; `eager-upcast` below), per contender and prompt:
- latents error: relative L2 of the final latents, with no LoRA and with the set;
- PSNR (dB) of the decoded image with the set (with no LoRA when no `--lora` is given);
- LoRA fidelity error and strength (`bench/fidelity.py`): how much of the reference's LoRA effect the contender
  reproduces (0 and 1.0: all of it; a LoRA weakened to 2/3 scores 0.33 and 0.67).
Writes OUT/quality.json, OUT/quality.md, the PNGs (OUT/images/) and the latents (OUT/latents/). One pipeline is in
memory at a time; eager FLUX.1-dev in bf16 takes ~34 GB of GPU memory, so on a smaller card pass
`--reference LABEL` (a package), which skips eager.

`--reference eager-upcast` adds diffusers' pipeline upcast one step (float32 for a bf16 package, float64 for a
float32 one) and reads every contender against it, eager itself included: bf16's own rounding noise sits in eager's
LoRA effect, and a projection on a noisy effect comes out short, so against eager a weak LoRA looks weakened in
every fast path (bench/fidelity.py). The upcast pipeline starts from the noise the package's dtype draws and
conditions on the timesteps it computes (`fidelity.conditioning_as`), so it differs from eager by rounding alone.
FLUX.1-dev in float32 needs ~70 GB of GPU memory by parameter count (transformer 48 GB, T5 19).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import json
import math
import re
import time
from pathlib import Path

import torch

from ..adapters.sources import adapter_source, local_path
from ..errors import NonFiniteOutputError, RequestError
from ..models.checkpoint import load_pipeline, parse_model_ref
from ..models.examples import relative_error
from ..models.prepare import torch_dtype
from ..runtime.jobs import parse_lora_option
from ..runtime.merge_check import MIN_MERGE_STRENGTH
from ..runtime.pipeline import decode_packed_latents, load_package
from ..runtime.requests import SIZE_MULTIPLE, check_loras
from ..store.manifest import read_manifest, recorded_model
from ..store.publish import locate_package
from .checks import output_folder
from .fidelity import conditioning_as, effect_strength, lora_effect_error, upcast_dtype

EAGER = "eager"
UPCAST = "eager-upcast"
MODES = ("slots", "merged")
LABEL = re.compile(r"[A-Za-z0-9_.-]+")


@dataclasses.dataclass
class Images:
    """One contender's outputs, one entry per prompt: latents (fp32, CPU) and decoded PIL images."""

    base: list
    base_images: list
    lora: list | None = None
    lora_images: list | None = None


def _latents(call, prompt: str, seed: int, request: dict, who: str) -> torch.Tensor:
    with torch.no_grad():
        latents = call(prompt=prompt, generator=torch.Generator("cpu").manual_seed(seed), output_type="latent",
                       **request).images
    NonFiniteOutputError.refuse(latents, "latents", context=f" from {who} for prompt {prompt!r} (seed {seed})",
                                outcome="nothing was compared", fix="check the LoRA scales and the model")
    return latents.float().cpu()


def _generate(call, decode, prompts: list[str], seeds: list[int], request: dict, who: str) -> tuple[list, list]:
    started = time.perf_counter()
    latents = [_latents(call, prompt, seed, request, who) for prompt, seed in zip(prompts, seeds)]
    print(f"[quality] {who}: {len(prompts)} image(s) in {time.perf_counter() - started:.1f} s", flush=True)
    return latents, [decode(x, request["height"], request["width"]) for x in latents]


def _free() -> None:
    gc.collect()  # the previous pipeline's weights go before the next loads
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def eager_images(model: str, dtype: torch.dtype, device: str, loras: list[tuple[Path, float]], prompts, seeds,
                 request: dict, upcast: bool = False) -> Images:
    """The reference: diffusers' own pipeline, the LoRAs through PEFT as users load them; with `upcast`, the same
    pipeline one dtype up, drawing its noise and conditioning its timesteps as a `dtype` pipeline does."""
    pipe = load_pipeline(parse_model_ref(model), upcast_dtype(dtype) if upcast else dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    decode = functools.partial(decode_packed_latents, pipe)
    call, who = pipe, UPCAST if upcast else EAGER
    if upcast:
        pipe.transformer.register_forward_pre_hook(functools.partial(_condition_as, dtype), with_kwargs=True)
        call = functools.partial(_from_noise_of, dtype, pipe)
    try:
        out = Images(*_generate(call, decode, prompts, seeds, request, who))
        if loras:
            names = [f"lora{i}" for i in range(len(loras))]
            for name, (path, _) in zip(names, loras):
                pipe.load_lora_weights(str(path), adapter_name=name)
            pipe.set_adapters(names, adapter_weights=[scale for _, scale in loras])
            out.lora, out.lora_images = _generate(call, decode, prompts, seeds, request, f"{who} with the LoRAs")
        return out
    finally:
        del decode, call, pipe  # the partials hold the pipeline too
        _free()


def _condition_as(low: torch.dtype, module, args, kwargs):
    """Forward pre-hook of the upcast transformer: timestep and guidance as a `low` transformer computes them."""
    for key in ("timestep", "guidance"):  # the pipeline rounds the timestep before the transformer, not guidance
        if torch.is_tensor(kwargs.get(key)):
            kwargs[key] = conditioning_as(kwargs[key], low, from_pipeline=key == "timestep")
    return args, kwargs


def _from_noise_of(low: torch.dtype, pipe, *, generator, height: int, width: int, **request):
    """`pipe(...)` from the packed noise a `low` pipeline draws with `generator` (randn draws other numbers in
    another dtype: the tiny model's float32 and float64 images parted by 57% from that alone)."""
    latents, _ = pipe.prepare_latents(1, pipe.transformer.config.in_channels // 4, height, width, low,
                                      pipe._execution_device, generator)
    return pipe(latents=latents, height=height, width=width, **request)


def package_images(package: str, model: str, label: str, loras, prompts, seeds, request: dict,
                   modes, merge_checks: dict | None = None) -> dict[str, Images]:
    """`{label/mode: Images}` for one package (`{label: ...}` without LoRAs): the set in slots and/or merged. A
    merged set's merge check (runtime/merge_check.py) goes into `merge_checks[label/merged]` (None: no FP8 weight)."""
    served = load_package(package, model, merge_policy="never")  # each mode as asked, never the policy's choice
    try:
        served.set_loras([])
        base = _generate(served, served.decode_latents, prompts, seeds, request, label)
        if not loras:
            return {label: Images(*base)}
        out = {}
        for mode in modes:
            served.set_loras(loras, merge=(mode == "merged"))
            key = f"{label}/{mode}"
            if mode == "merged" and merge_checks is not None:
                estimate = served.transformer.lora_modes.last_merge_estimate
                merge_checks[key] = dataclasses.asdict(estimate) if estimate else None
            out[key] = Images(*base, *_generate(served, served.decode_latents, prompts, seeds, request, key))
            served.set_loras([])
        return out
    finally:  # closed: a dropped package keeps its weights allocated (docs/gpu.md, known issue 7), and the next loads
        served.close()
        del served
        _free()


def psnr_db(image, reference) -> float | None:
    """Peak signal-to-noise ratio of two 8-bit images; None when they are identical."""
    import numpy as np

    a, b = (np.asarray(x, dtype=np.float64) for x in (image, reference))
    mse = float(((a - b) ** 2).mean())
    return None if mse == 0 else 10 * math.log10(255.0**2 / mse)


def compare(contenders: dict[str, Images], reference: str, prompts: list[str]) -> dict:
    """Per contender: each prompt's metrics against `reference`, and their summary (means; PSNR's minimum)."""
    ref = contenders[reference]
    if ref.lora is not None:
        for i, prompt in enumerate(prompts):
            if relative_error(ref.lora[i], ref.base[i]) == 0:  # fidelity would divide by zero: say why instead
                raise RequestError(f"the LoRA set leaves {reference}'s latents for prompt {prompt!r} unchanged, so "
                                   "no LoRA effect can be compared",
                                   "check the --lora files and scales (a scale of 0, or a LoRA for another model)")
    rows = {}
    for key, run in contenders.items():
        per_prompt = []
        for i in range(len(prompts)):
            row = {"latents_error_no_lora": relative_error(run.base[i], ref.base[i])}
            if run.lora is None:
                row["psnr_db"] = psnr_db(run.base_images[i], ref.base_images[i])
            else:
                row.update(
                    latents_error_lora=relative_error(run.lora[i], ref.lora[i]),
                    lora_fidelity_error=lora_effect_error(run.lora[i], run.base[i], ref.lora[i], ref.base[i]),
                    lora_strength=effect_strength(run.lora[i], run.base[i], ref.lora[i], ref.base[i]),
                    psnr_db=psnr_db(run.lora_images[i], ref.lora_images[i]),
                )
            per_prompt.append(row)
        summary = {name: sum(r[name] for r in per_prompt) / len(per_prompt)
                   for name in per_prompt[0] if name != "psnr_db"}
        finite = [r["psnr_db"] for r in per_prompt if r["psnr_db"] is not None]
        summary["psnr_db_min"] = min(finite) if finite else None  # None: identical to the reference
        rows[key] = {"summary": summary, "prompts": per_prompt}
    return rows


def _file_stem(key: str) -> str:
    return key.replace("/", "-")


def save_outputs(out: Path, contenders: dict[str, Images]) -> None:
    from safetensors.torch import save_file

    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "latents").mkdir(parents=True, exist_ok=True)
    for key, run in contenders.items():
        stem = _file_stem(key)
        tensors = {f"base_{i}": x.contiguous() for i, x in enumerate(run.base)}
        for i, image in enumerate(run.base_images):
            image.save(out / "images" / f"{stem}-{i}-no-lora.png")
        if run.lora is not None:
            tensors.update({f"lora_{i}": x.contiguous() for i, x in enumerate(run.lora)})
            for i, image in enumerate(run.lora_images):
                image.save(out / "images" / f"{stem}-{i}-lora.png")
        save_file(tensors, str(out / "latents" / f"{stem}.safetensors"))


def _number(value, digits: int = 4) -> str:
    return "identical" if value is None else f"{value:.{digits}g}"


def markdown(results: dict) -> str:
    r = results
    lines = [f"# Image quality against {r['reference']}: {r['model']}", "",
             f"{r['date']}, {r['device']}, torch {r['torch']}; {len(r['prompts'])} prompt(s), {r['request']['height']}x"
             f"{r['request']['width']}, {r['request']['num_inference_steps']} steps, guidance "
             f"{r['request']['guidance_scale']}, seeds from {r['seed']}; LoRAs: "
             + (", ".join(f"`{p}`:{s:g}" for p, s in r["loras"]) or "none") + ".", ""]
    with_lora = bool(r["loras"])
    header = ["contender", "latents error, no LoRA"]
    if with_lora:
        header += ["latents error, LoRA", "LoRA fidelity error", "LoRA strength"]
    header += ["PSNR (dB), worst prompt"]
    lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for key, row in r["contenders"].items():
        s = row["summary"]
        cells = [f"`{key}`", _number(s["latents_error_no_lora"])]
        if with_lora:
            cells += [_number(s["latents_error_lora"]), _number(s["lora_fidelity_error"]),
                      _number(s["lora_strength"])]
        cells += [_number(s["psnr_db_min"], 3)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Means over the prompts (PSNR: the worst prompt). Images: `images/`, latents: `latents/`."]
    if r["reference"] == UPCAST:
        lines += ["", f"`{UPCAST}` is diffusers' pipeline one dtype up, from the same noise and timesteps: the `{EAGER}` "
                  "row is the package dtype's own rounding, the floor under every other row."]
    if r.get("merge_checks"):
        lines += ["", "Merge check (what re-rounding into the FP8 weights keeps of the set's weight change, estimated "
                  f"on sampled rows before merging; the merge policy merges unasked from a strength of "
                  f"{MIN_MERGE_STRENGTH}):", ""]
        lines += [f"- `{key}`: " + (f"strength {c['strength']:.3f}, error {c['error']:.3f} ({c['rows']} rows)" if c
                                    else "no FP8 weight touched: the merge adds the set at the weights' precision")
                  for key, c in r["merge_checks"].items()]
    return "\n".join(lines) + "\n"


def _packages(specs: list[str], parser: argparse.ArgumentParser) -> dict[str, str]:
    packages = {}
    for spec in specs:
        label, sep, path = spec.partition("=")
        if not sep or not path or not LABEL.fullmatch(label) or label in (EAGER, UPCAST):
            parser.error(f"--package {spec!r}: write LABEL=PACKAGE with a label of letters, digits, '_', '.' "
                         f"or '-' (not {EAGER!r} or {UPCAST!r}), e.g. fp8=artifacts/packages/flux-fp8")
        if label in packages:
            parser.error(f"--package {spec!r}: the label {label!r} is given twice; give each package its own")
        packages[label] = path
    return packages


def _prompts(args, parser: argparse.ArgumentParser) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts:
        try:
            prompts += [line.strip() for line in Path(args.prompts).read_text().splitlines() if line.strip()]
        except OSError as err:
            parser.error(f"--prompts {args.prompts!r}: {err.strerror or err}")
    if not prompts:
        parser.error("give at least one --prompt TEXT (or --prompts FILE, one prompt per line)")
    return prompts


def run(packages: dict[str, str], model: str | None, out: Path, *, prompts: list[str], loras=(), seed: int = 0,
        reference: str = EAGER, modes=MODES, height: int = 1024, width: int = 1024, steps: int = 28,
        guidance: float = 3.5, max_sequence_length: int = 512) -> dict:
    if reference not in (EAGER, UPCAST) and reference not in packages:
        raise RequestError(f"--reference {reference!r} is neither {EAGER!r}, {UPCAST!r} nor a --package label "
                           f"({', '.join(packages) or 'none given'})", f"pass --reference {EAGER} or one of the labels")
    loras = [(local_path(adapter_source(source)), scale)  # checked and resolved before any pipeline loads
             for source, scale in check_loras(list(loras), "--lora")]
    dirs = {label: locate_package(path) for label, path in packages.items()}
    first = read_manifest(next(iter(dirs.values())))
    model = model or recorded_model(first)[0]
    if parse_model_ref(model).kind == "random":  # no text encoders to read prompts, and nothing worth looking at
        raise RequestError(f"--model {model!r} has random weights and no text encoders: its images say nothing about "
                           "quality", "pass your trained checkpoint (a diffusers directory or a Hub id), or `tiny` "
                           "to try the tool")
    request = dict(height=height, width=width, num_inference_steps=steps, guidance_scale=guidance,
                   max_sequence_length=max_sequence_length)
    seeds = [seed + i for i in range(len(prompts))]
    contenders: dict[str, Images] = {}
    if reference in (EAGER, UPCAST):
        contenders[EAGER] = eager_images(model, torch_dtype(first.dtype), first.run_device(None), loras, prompts,
                                         seeds, request)
    if reference == UPCAST:
        contenders[UPCAST] = eager_images(model, torch_dtype(first.dtype), first.run_device(None), loras, prompts,
                                          seeds, request, upcast=True)
    merge_checks: dict = {}
    for label, directory in dirs.items():
        contenders.update(package_images(str(directory), model, label, loras, prompts, seeds, request, modes,
                                         merge_checks))
    reference_key = reference if reference in (EAGER, UPCAST) or not loras else f"{reference}/{modes[0]}"
    rows = compare(contenders, reference_key, prompts)  # before anything is written: it may refuse the set
    out.mkdir(parents=True, exist_ok=True)
    save_outputs(out, contenders)
    results = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "model": model,
        "device": torch.cuda.get_device_name() if first.run_device(None) == "cuda" else "cpu",
        "torch": torch.__version__, "reference": reference_key, "prompts": prompts, "seed": seed,
        "request": request, "loras": [[str(p), s] for p, s in loras],
        "packages": {label: str(path) for label, path in dirs.items()},
        "contenders": rows, "merge_checks": merge_checks,
    }
    (out / "quality.json").write_text(json.dumps(results, indent=2))
    (out / "quality.md").write_text(markdown(results))
    return results


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="aotpack bench quality", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--package", action="append", default=[], required=True, metavar="LABEL=PACKAGE",
                        help="a package directory, file:// or hf:// reference, under a label (repeatable)")
    parser.add_argument("--model", default=None, help="the checkpoint (default: the first package's model)")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    parser.add_argument("--prompts", default=None, metavar="FILE", help="a file of prompts, one per line")
    parser.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                        help="an adapter of the set every contender applies (repeatable: stacked)")
    parser.add_argument("--reference", default=EAGER,
                        help=f"{EAGER} (diffusers + PEFT, default), {UPCAST} (the same one dtype up, eager beside "
                             "it: for weak LoRAs, whose effect nears bf16's own noise) or a package's LABEL (then "
                             "eager is not run)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                        help="how each package runs the set: in slots, merged into the weights, or both")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first prompt (the next get +1, +2, ...)")
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--guidance", type=float, default=3.5)
    parser.add_argument("--max-sequence-length", type=int, default=512)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    for name in ("height", "width"):
        if getattr(args, name) <= 0 or getattr(args, name) % SIZE_MULTIPLE:
            parser.error(f"--{name} {getattr(args, name)}: give a positive multiple of {SIZE_MULTIPLE} (Flux packs "
                         "2x2 latent patches of an 8x VAE), so every contender makes the same size")
    if args.steps < 1:
        parser.error(f"--steps {args.steps}: give at least 1")
    packages = _packages(args.package, parser)
    prompts = _prompts(args, parser)
    loras = [parse_lora_option(text) for text in args.lora]
    output_folder(args.out)  # before any pipeline loads: run() writes it last
    results = run(packages, args.model, args.out, prompts=prompts, loras=loras, seed=args.seed,
                  reference=args.reference, modes=tuple(args.modes), height=args.height, width=args.width,
                  steps=args.steps, guidance=args.guidance, max_sequence_length=args.max_sequence_length)
    print(markdown(results))
    return results


if __name__ == "__main__":
    main()
