"""Generation requests (one from CLI flags, or many from a JSONL file) and running them.

Every request is checked (`requests.validate_request`) before the first one runs; at run time a failing
job is recorded with its reason and the others still run (`run_jobs`).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import math
import os
import time
from pathlib import Path

import torch

from ..errors import AotpackError, NonFiniteOutputError, RequestError
from .requests import ANY_PACKAGE, PackageLimits, check_output_path, validate_request

logger = logging.getLogger(__name__)

# FluxPipeline's own defaults (Flux.1-dev), so a request without options behaves like diffusers.
DEFAULTS = {"steps": 28, "height": 1024, "width": 1024, "guidance": 3.5, "max_sequence_length": 512, "seed": 0}
FIELDS = {"prompt", "loras", "seed", "steps", "height", "width", "guidance", "max_sequence_length", "out",
          "save_latents", "fit", "merge"}
# diffusers' FluxPipeline argument names, accepted in jobs lines with the same meaning as the short ones
# (`height`, `width`, `max_sequence_length`, `prompt` are already the same).
DIFFUSERS_NAMES = {"num_inference_steps": "steps", "guidance_scale": "guidance"}
MAX_ERRORS_SHOWN = 20


@dataclasses.dataclass
class Request:
    prompt: str
    loras: list[tuple[str, float]] = dataclasses.field(default_factory=list)
    seed: int = DEFAULTS["seed"]
    steps: int = DEFAULTS["steps"]
    height: int = DEFAULTS["height"]
    width: int = DEFAULTS["width"]
    guidance: float = DEFAULTS["guidance"]
    max_sequence_length: int = DEFAULTS["max_sequence_length"]
    out: str | None = None
    save_latents: str | None = None
    fit: str | None = None
    merge: bool | None = None  # True: fold the LoRAs in now; False: keep them in slots; None: the merge policy
    notes: list[str] = dataclasses.field(default_factory=list)  # e.g. the size as produced


@dataclasses.dataclass
class RequestResult:
    index: int
    seconds: float
    switch_seconds: float
    adapters_parsed: int
    image_path: str | None
    latents_path: str | None
    notes: list[str]
    lora_mode: str = "none"  # how the set ran at the last step: "none", "slots" or "merged" (the merge policy's doing)
    adapters: list[dict] = dataclasses.field(default_factory=list)  # the set as used, with provenance (adapters_used)


@dataclasses.dataclass
class JobOutcome:
    """One job's end: `result` when it ran, else the error's problem and fix."""

    index: int
    request: Request
    result: RequestResult | None = None
    error: str | None = None
    fix: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_json(self) -> dict:
        data = {"index": self.index, "ok": self.ok, "prompt": self.request.prompt,
                "size": [self.request.width, self.request.height], "loras": [list(x) for x in self.request.loras],
                "notes": list(self.request.notes)}
        if self.result:
            data.update(seconds=self.result.seconds, switch_seconds=self.result.switch_seconds,
                        lora_mode=self.result.lora_mode, adapters=self.result.adapters, image=self.result.image_path,
                        latents=self.result.latents_path, notes=data["notes"] + self.result.notes)
        else:
            data.update(error=self.error, fix=self.fix)
        return data


def parse_lora_option(text: str, where: str = "--lora") -> tuple[str, float]:
    """`FILE[:SCALE]` -> (file, scale). A colon-suffix without a slash is a scale and must be a number
    (so `f:abc` is refused as a scale, not looked up as a file named `f:abc`); an existing file whose name
    holds a colon is taken whole. `where` names the option or jobs line in a refusal."""
    head, sep, tail = text.rpartition(":")
    try:
        exists = Path(text).expanduser().exists()
    except (OSError, ValueError):
        exists = False
    if not sep or "/" in tail or "\\" in tail or exists:
        return text, 1.0  # no scale, or the colon belongs to a URI (hf://...) or a path
    try:
        scale = float(tail)
    except ValueError:
        raise RequestError(f"{where} {text!r}: the scale {tail!r} is not a number",
                           f"write FILE[:SCALE] with a number, e.g. {head}:0.8 (a file name with a colon: "
                           f"add ':1')") from None
    return head, scale


def _did_you_mean(key: str, choices) -> str:
    close = difflib.get_close_matches(key, sorted(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _lora_entries(value, where: str) -> list:
    if value is None:
        return []
    if not isinstance(value, list):
        raise RequestError(f"{where}: loras = {value!r} is a {type(value).__name__}, not a list",
                           'give a list of [path, scale] pairs or "path[:scale]" strings, e.g. '
                           '"loras": [["style.safetensors", 0.8]]')
    entries = []
    for item in value:
        if isinstance(item, str):
            entries.append(parse_lora_option(item, f"{where}: loras entry"))
        elif isinstance(item, list) and len(item) == 2 and isinstance(item[0], str):
            entries.append((item[0], item[1]))  # the scale is checked by validate_request
        else:
            raise RequestError(f"{where}: bad LoRA entry {item!r}", 'use [["path.safetensors", 0.8], ...]')
    return entries


def request_from_json(data, where: str, limits: PackageLimits = ANY_PACKAGE) -> Request:
    """A validated request from one parsed jobs line (short or diffusers field names)."""
    if not isinstance(data, dict):
        raise RequestError(f"{where}: a job must be a JSON object, got {type(data).__name__}",
                           'write one object per line, e.g. {"prompt": "a cat", "loras": [["style.safetensors", 0.8]]}')
    names = FIELDS | set(DIFFUSERS_NAMES)
    unknown = sorted(set(data) - names)
    if unknown:
        raise RequestError(f"{where}: unknown field {unknown[0]!r}{_did_you_mean(unknown[0], names)}"
                           + (f" (and {unknown[1:]})" if unknown[1:] else ""), f"use only {sorted(names)}")
    fields = dict(data)
    for long, short in DIFFUSERS_NAMES.items():
        if long in fields:
            if short in fields:
                raise RequestError(f"{where}: both {long!r} and {short!r} are given",
                                   f"give one of them ({long!r} is diffusers' name for {short!r})")
            fields[short] = fields.pop(long)
    if not isinstance(fields.get("prompt"), str):
        raise RequestError(f"{where}: 'prompt' (a string) is required", 'add "prompt": "..."')
    for name in ("out", "save_latents", "fit"):
        if fields.get(name) is not None and not isinstance(fields[name], str):
            raise RequestError(f"{where}: {name} = {fields[name]!r} is not a string", f"give {name} as a string")
    fields["loras"] = _lora_entries(fields.get("loras"), where)
    return validate_request(Request(**fields), limits, where)


def _decode_lines(path: Path) -> list[str]:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig").splitlines()  # a BOM (Windows editors write one) is not part of line 1
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        raise RequestError(f"{path}:{line}: not UTF-8 text (byte {raw[err.start]:#04x} at offset {err.start})",
                           "save the jobs file as UTF-8") from err


def read_jobs(path: str | Path, limits: PackageLimits = ANY_PACKAGE) -> list[Request]:
    """Every line parsed and validated; all bad lines are reported together, before anything runs."""
    path = Path(path)
    if not path.is_file():
        state = "is a directory" if path.is_dir() else "does not exist"
        raise RequestError(f"jobs file {path} {state}", "pass a JSONL file: one request object per line")
    requests, errors, outputs = [], [], {}
    for number, line in enumerate(_decode_lines(path), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            try:
                data = json.loads(line)
            except (json.JSONDecodeError, RecursionError) as err:
                raise RequestError(f"{where}: not valid JSON ({getattr(err, 'msg', type(err).__name__)})",
                                   "one JSON object per line") from err
            request = request_from_json(data, where, limits)
            for target in (request.out, request.save_latents):
                if target is None:
                    continue
                key = os.path.abspath(os.path.expanduser(target))
                if key in outputs:
                    raise RequestError(f"{where}: writes {target}, which line {outputs[key]} writes too",
                                       "give every job its own output file")
                outputs[key] = number
            requests.append(request)
        except AotpackError as err:
            errors.append(err)
    if errors:
        shown = "\n  ".join(e.problem for e in errors[:MAX_ERRORS_SHOWN])
        more = f"\n  ... and {len(errors) - MAX_ERRORS_SHOWN} more" if len(errors) > MAX_ERRORS_SHOWN else ""
        raise RequestError(f"{len(errors)} of the jobs in {path} are invalid; none was run:\n  {shown}{more}",
                           errors[0].fix if len(errors) == 1 else "fix the lines above")
    if not requests:
        raise RequestError(f"jobs file {path} holds no requests", "add one JSON object per line")
    return requests


def check_outputs_apart(requests: list[Request], package_dir, *, report=None, jobs_file=None) -> None:
    """Before anything loads: no output may land inside the package (a file there makes it fail verification)
    or overwrite an input of this run (the jobs file, a local LoRA file, or a file in a LoRA folder)."""
    package = Path(package_dir).resolve()
    inputs = {Path(jobs_file).resolve(): "the jobs file"} if jobs_file else {}
    for request in requests:
        for source, _ in request.loras:
            if isinstance(source, (str, os.PathLike)) and Path(source).expanduser().exists():
                inputs[Path(source).expanduser().resolve()] = f"the LoRA {os.fspath(source)}"
    outputs = [("--report", report)] if report else []
    outputs += [(f"request {i}: {field}", path) for i, r in enumerate(requests, start=1)
                for field, path in (("out", r.out), ("save_latents", r.save_latents)) if path]
    for label, path in outputs:
        target = Path(path).expanduser().resolve()
        if target == package or package in target.parents:
            raise RequestError(f"{label} = {path} is inside the package {package_dir}",
                               "write outputs outside the package folder (a package holds only the files its "
                               "manifest lists; another file there makes it fail verification)")
        for source, what in inputs.items():
            if target == source or source in target.parents:
                raise RequestError(f"{label} = {path} would overwrite or add to {what}",
                                   "write outputs to another file; inputs are never written")


def check_local_loras(requests: list[Request]) -> None:
    """Each local LoRA path names one file (a missing file or an ambiguous folder is refused before the package
    loads, not after); Hub files are fetched when their request runs."""
    from ..adapters.sources import adapter_source, local_path

    for source in dict.fromkeys(s for r in requests for s, _ in r.loras if isinstance(s, (str, os.PathLike))):
        where = adapter_source(source)
        if not where.is_hub:
            local_path(where)


def warn_if_nothing_is_written(requests: list[Request]) -> None:
    silent = [i for i, r in enumerate(requests, start=1) if not r.out and not r.save_latents]
    if silent:
        logger.warning("%s write nothing (no out or save_latents): they run and are timed only; pass --out "
                       "image.png (or \"out\" in a jobs line) to keep the image",
                       "the request" if len(requests) == 1 else f"requests {silent[:10]}")


def _written(path: str, write) -> str:
    """`write(path)` after making its folder; a file system refusal (a read-only or virtual folder) is a
    RequestError naming the path, not an OSError."""
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write(path)
    except (OSError, ValueError) as err:
        raise RequestError(f"could not write {path}: {err}", "write to a folder where you can create files") from err
    return path


def _save_latents(path: str, latents: torch.Tensor) -> str:
    from safetensors.torch import save_file

    return _written(path, lambda p: save_file({"latents": latents.detach().to("cpu").contiguous()}, p))


def run_request(served, request: Request, index: int = 0) -> RequestResult:
    """Switch to the request's LoRA set, generate, check the latents are finite, then write the
    image/latents; time both parts. Nothing is written for a non-finite output."""
    if served.pipeline.text_encoder_2 is None:
        raise AotpackError(
            "this model has no text encoders (random:* presets are for benchmarks), so prompts cannot be encoded",
            "pass a model with text encoders (a diffusers pipeline directory or Hub id), or call the Python API "
            "with prompt_embeds= and pooled_prompt_embeds=",
        )
    switch = served.set_loras(request.loras, fit=request.fit, merge=request.merge)
    live = served.live_adapters()  # what this job runs; its provenance is read after the image (the sha256 hashes)
    started = time.perf_counter()
    generator = torch.Generator("cpu").manual_seed(request.seed)
    # The latents are what FluxPipeline(..., output_type="latent").images returns; decoding them gives
    # exactly the image of the same call with output_type="pil" (and lets us refuse NaN before writing).
    latents = served(prompt=request.prompt, height=request.height, width=request.width,
                     num_inference_steps=request.steps, guidance_scale=request.guidance,
                     max_sequence_length=request.max_sequence_length, generator=generator,
                     output_type="latent").images
    lora_mode = served.transformer.lora_modes.mode
    NonFiniteOutputError.refuse(latents, "values", outcome="no image was written",  # what reaches the files
                                context=f" (loras {request.loras}, guidance {request.guidance:g})")
    image = served.decode_latents(latents, request.height, request.width) if request.out else None
    latents_path = _save_latents(request.save_latents, latents) if request.save_latents else None
    image_path = _save_image(request.out, image) if request.out else None
    if served.device.type == "cuda":
        torch.cuda.synchronize()
    return RequestResult(index=index, seconds=time.perf_counter() - started, switch_seconds=switch.seconds,
                         adapters_parsed=switch.parsed, image_path=image_path, latents_path=latents_path,
                         notes=list(request.notes) + switch.notes, lora_mode=lora_mode, adapters=adapter_records(live))


def adapters_used(served) -> list[dict]:
    """The active LoRA set of `served` (an `AotpackPipeline`) as it runs, as `adapter_records` gives it."""
    return adapter_records(served.live_adapters())


def adapter_records(live) -> list[dict]:
    """Per (adapter, scale) of `live` (`AotpackPipeline.live_adapters()`) its name, scale and provenance
    (`Adapter.provenance()`: source, sha256 of the bytes parsed, revision, commit_hash). Waits for a sha256 still
    being hashed: take `live` at the switch and call this after the image."""
    return [{"name": adapter.name, "scale": scale, **adapter.provenance()} for adapter, scale in live]


def run_jobs(served, requests: list[Request], *, on_outcome=None, progress: bool = False,
             debug: bool = False) -> list[JobOutcome]:
    """Run every request; a failing one is recorded (problem + fix) and the next still runs.

    `on_outcome(outcome)` is called after each job. With `debug`, unexpected exceptions propagate.
    """
    from huggingface_hub.utils import tqdm

    outcomes = []
    for index, request in enumerate(tqdm(requests, desc="jobs", unit="job", disable=not progress), start=1):
        outcome = JobOutcome(index, request)
        try:
            outcome.result = run_request(served, request, index)
        except AotpackError as err:
            outcome.error, outcome.fix = err.problem, err.fix
        except Exception as err:  # one broken job must not end the others
            if debug:
                raise
            logger.debug("job %d failed", index, exc_info=True)
            outcome.error = f"{type(err).__name__}: {err}"
            outcome.fix = "set AOTPACK_DEBUG=1 for the traceback, and report it if the request looks valid"
        outcomes.append(outcome)
        if on_outcome:
            on_outcome(outcome)
    return outcomes


def check_report_path(path: str) -> str:
    return check_output_path(path, "--report", (".json",))


def write_report(path: str | Path, outcomes: list[JobOutcome]) -> Path:
    """`{"ok": n, "failed": n, "adapters": [...], "jobs": [...]}` as JSON (non-finite numbers written as null).
    `adapters`: each adapter file the jobs ran with, once (source, sha256, revision, commit_hash) with the jobs'
    indices; each job's entry lists its own with name and scale."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    failed = sum(not o.ok for o in outcomes)
    data = {"ok": len(outcomes) - failed, "failed": failed, "adapters": adapters_summary(outcomes),
            "jobs": [o.to_json() for o in outcomes]}
    path.write_text(json.dumps(_finite(data), indent=2) + "\n")
    return path


def adapters_summary(outcomes: list[JobOutcome]) -> list[dict]:
    """Each distinct adapter (by provenance) the jobs that ran used, with those jobs' indices."""
    summary: dict[tuple, dict] = {}
    for outcome in outcomes:
        for used in outcome.result.adapters if outcome.result else ():
            provenance = {k: used.get(k) for k in ("source", "sha256", "revision", "commit_hash")}
            entry = summary.setdefault(tuple(provenance.values()), {**provenance, "jobs": []})
            if outcome.index not in entry["jobs"]:
                entry["jobs"].append(outcome.index)
    return list(summary.values())


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _save_image(path: str, image) -> str:
    return _written(path, image.save)
