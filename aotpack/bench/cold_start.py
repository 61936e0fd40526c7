"""Cold start: a fresh process, weights at hand, until the first image is out.

    python -m aotpack.bench.cold_start --package DIR --model random:flux-dev --out OUT

Three fresh processes, one after another, each timed from spawn to exit by this parent:
1. `aotpack`: load the package, activate a LoRA, generate one image;
2. `recipe`: torchao FP8 + PEFT hotswap + `compile_repeated_blocks(fullgraph=True)` with empty
   inductor/triton caches (a true JIT cold start), then it saves the compile cache
   (`torch.compiler.save_cache_artifacts`);
3. `recipe-warm`: the same with fresh, empty cache folders, warm-started from that saved cache
   (`torch.compiler.load_cache_artifacts`): the strongest JIT competitor.
Each child also reports its own phases. Writes OUT/cold_start.json (and each child's output to
OUT/cold_start.log); a phase that fails is recorded there, and once every phase ran the command exits 1
naming it and its error.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ..errors import AotpackError
from .checks import package_and_output
from .timing import Profiles, Stopwatch, bench_device

KINDS = ("aotpack", "eager-reference", "recipe", "recipe-warm")
RESULT_PREFIX = "COLD_START_RESULT "


class PhaseFailedError(AotpackError):
    """A cold-start phase (a child process) that failed or was killed: the others still ran and were written."""


def _since_spawn() -> float:
    """Seconds since the parent spawned this process (perf_counter is one monotonic clock system-wide)."""
    return time.perf_counter() - float(os.environ["AOTPACK_SPAWNED_AT"])


def _workload(args, config: dict, dtype, device):
    from .compare import shared_workload

    return shared_workload(config, height=args.height, width=args.width, steps=args.steps,
                           text_tokens=args.text_tokens, dtype=dtype, device=device)


def _child_aotpack(args, phases: dict, loras: dict) -> None:
    from ..runtime.pipeline import load_package

    with Stopwatch(bench_device()[0]) as watch:
        served = load_package(args.package, args.model)
    phases["load_package"] = watch.seconds
    with Stopwatch(served.device) as watch:
        served.set_loras([(loras[args.lora], 1.0)])
    phases["activate_lora"] = watch.seconds
    _, request = _workload(args, dict(served.transformer.config), served.transformer.dtype, served.device)
    with Stopwatch(served.device) as watch:
        served(**request, generator=torch.Generator("cpu").manual_seed(42))
    phases["first_image"] = watch.seconds
    phases["first_image_since_spawn_seconds"] = _since_spawn()


def _child_eager_reference(args, phases: dict, loras: dict) -> None:
    """diffusers eager bf16 + PEFT output on the shared inputs, saved for the recipe's error."""
    from ..models.checkpoint import parse_model_ref
    from ..models.random_weights import make_transformer

    device, dtype = bench_device()
    model = make_transformer(parse_model_ref(args.model).location, dtype, device)
    model.load_lora_adapter(str(loras[args.lora]), adapter_name="reference", prefix="transformer")
    inputs, _ = _workload(args, dict(model.config), dtype, device)
    with torch.no_grad():
        torch.save(model(**inputs, return_dict=False)[0].float().cpu(), args.reference)


def _child_recipe(args, phases: dict, loras: dict, warm: bool) -> None:
    from ..models.checkpoint import parse_model_ref
    from ..models.examples import relative_error
    from ..models.random_weights import make_pipeline
    from .compare import recipe_measurements, recipe_transformer

    device, dtype = bench_device()
    name = parse_model_ref(args.model).location
    if warm:
        with Stopwatch(device) as watch:
            torch.compiler.load_cache_artifacts(Path(args.cache).read_bytes())
        phases["load_cache_artifacts"] = watch.seconds
    with Stopwatch(device) as watch:
        model = recipe_transformer(name, dtype, device, loras[args.lora])
        pipe = make_pipeline(name, dtype, model, device)
    phases["load_quantize_lora"] = watch.seconds
    inputs, request = _workload(args, dict(model.config), dtype, device)
    with Stopwatch(device) as watch:
        pipe(**request, generator=torch.Generator("cpu").manual_seed(42))
    phases["first_image_incl_compile"] = watch.seconds
    phases["first_image_since_spawn_seconds"] = _since_spawn()
    if not warm:
        with Stopwatch(device) as watch:
            artifacts = torch.compiler.save_cache_artifacts()
            if artifacts is None:
                raise RuntimeError("torch.compiler.save_cache_artifacts() returned nothing to save")
            Path(args.cache).write_bytes(artifacts[0])
        phases["save_cache_artifacts"] = watch.seconds
        phases["cache_bytes"] = len(artifacts[0])
    if args.details and not warm:  # after the timed part: the steady state of the same process
        print(RESULT_PREFIX + json.dumps(phases), flush=True)  # the cold start is measured even if details fail
        if Path(args.reference).exists():
            with torch.no_grad():
                output = model(**inputs, return_dict=False)[0].float().cpu()
            phases["rel_error_vs_eager"] = relative_error(output, torch.load(args.reference))
        profiles = Profiles()
        phases["details"] = recipe_measurements(model, name, dtype, device, inputs, loras, request, profiles)
        profiles.run()  # its top kernels, after its timed figures


def child(args) -> None:
    from ..models.checkpoint import load_transformer_config, parse_model_ref
    from .loras import write_bench_loras

    phases: dict = {"imported_seconds": _since_spawn()}
    loras = write_bench_loras(load_transformer_config(parse_model_ref(args.model)), args.lora_dir,
                              names=["r16-attn", "r64-all"])
    if args.kind == "aotpack":
        _child_aotpack(args, phases, loras)
    elif args.kind == "eager-reference":
        _child_eager_reference(args, phases, loras)
    else:
        _child_recipe(args, phases, loras, warm=args.kind == "recipe-warm")
    if torch.cuda.is_available():
        phases["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 2**30
    print(RESULT_PREFIX + json.dumps(phases), flush=True)


def spawn(kind: str, args, cache: Path, log, timeout: float | None = None) -> dict:
    """Run one child in a fresh process with empty inductor/triton caches; wall time from spawn to exit."""
    with tempfile.TemporaryDirectory(prefix=f"aotpack-cold-{kind}-") as caches:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": f"{caches}/inductor", "TRITON_CACHE_DIR": f"{caches}/triton"}
        command = [sys.executable, "-m", "aotpack.bench.cold_start", "--child", kind, "--package", str(args.package),
                   "--model", args.model, "--out", str(args.out), "--cache", str(cache),
                   "--height", str(args.height), "--width", str(args.width), "--steps", str(args.steps),
                   "--text-tokens", str(args.text_tokens), "--lora-dir", str(args.lora_dir),
                   "--reference", str(args.reference), "--lora", args.lora, *(["--details"] if args.details else [])]
        started = time.perf_counter()
        env["AOTPACK_SPAWNED_AT"] = repr(started)
        try:
            process = subprocess.run(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     timeout=timeout)
            output, code = process.stdout, process.returncode
        except subprocess.TimeoutExpired as expired:
            output, code = (expired.stdout or b"").decode(errors="replace"), f"killed after {timeout:.0f} s"
        wall = time.perf_counter() - started
    log.write(f"===== {kind} (exit {code}, {wall:.1f} s)\n{output}\n")
    lines = [line for line in output.splitlines() if line.startswith(RESULT_PREFIX)]
    if not lines:
        return {"failed": f"exit {code}", "tail": output[-2000:], "wall_seconds": wall}
    result = json.loads(lines[-1][len(RESULT_PREFIX):])
    if code:  # the timed part finished (its result line is out), what came after did not
        result["failed_after_cold_start"] = f"exit {code}: {output[-800:]}"
    return {"process_to_first_image_seconds": result.get("first_image_since_spawn_seconds"),
            "process_wall_seconds": wall, **result}


def run(args) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(args.cache)
    results = {"date": time.strftime("%Y-%m-%d"), "weights": "random", "model": args.model,
               "height": args.height, "width": args.width, "steps": args.steps, "torch": torch.__version__,
               "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    with open(out / "cold_start.log", "w") as log:
        for kind in args.kinds:
            results[kind] = spawn(kind, args, cache, log, timeout=args.child_timeout)
            log.flush()
            (out / "cold_start.json").write_text(json.dumps(results, indent=2))
            print(f"[cold start] {kind}: {json.dumps(results[kind])[:300]}", flush=True)
    failures = {kind: why for kind in args.kinds if (why := _failure(results[kind]))}
    if failures:  # each phase ran and what it measured is written; the run did not succeed
        raise PhaseFailedError("cold start: " + "; ".join(f"{kind} failed ({why})" for kind, why in failures.items()),
                               f"read each phase's output in {out / 'cold_start.log'}; the phases that finished are "
                               f"in {out / 'cold_start.json'}")
    return results


def _failure(result: dict) -> str | None:
    """Why a phase failed, in one line: its exit and the last unindented line of its output (a traceback's
    exception); None when it finished."""
    if "failed" in result:
        code, output = result["failed"], result.get("tail", "")
    elif "failed_after_cold_start" in result:  # "exit N: <output>"
        code, _, output = result["failed_after_cold_start"].partition(": ")
        code += " after its cold start"
    else:
        return None
    lines = [line for line in output.splitlines() if line.strip() and not line[0].isspace()]
    return f"{code}: {lines[-1][:300]}" if lines else code


def main(argv=None) -> None:
    from .serve_demo import workload_parser

    parser = workload_parser(__doc__)
    parser.add_argument("--child", dest="kind", choices=KINDS, default=None)
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "aotpack-recipe-cache.bin"))
    parser.add_argument("--reference", default=str(Path(tempfile.gettempdir()) / "aotpack-eager-reference.pt"))
    parser.add_argument("--lora", choices=["r16-attn", "r64-all"], default="r64-all",
                        help="the LoRA every contender serves its first image with")
    parser.add_argument("--details", action="store_true",
                        help="after its cold start, the recipe child also measures step, hotswaps, recompiles, error")
    parser.add_argument("--child-timeout", type=float, default=None, help="seconds before a child is killed")
    args = parser.parse_args(argv)
    if args.kind:
        child(args)
    else:
        package_and_output(args)
        run(args)


if __name__ == "__main__":
    main()
