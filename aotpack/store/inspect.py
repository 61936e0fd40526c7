"""Human-readable view of a manifest (`aotpack inspect`)."""

from __future__ import annotations

from .manifest import Manifest, read_manifest, verify_files


def inspect_package(package, verify: bool = True) -> tuple[Manifest, str]:
    """The package's manifest (schema-checked) and a line saying whether its files were verified."""
    from .publish import locate_package

    directory = locate_package(package)
    manifest = read_manifest(directory)
    if not verify:
        return manifest, "files NOT verified (--no-verify): sha256 and program metadata were not checked"
    verify_files(directory, manifest)
    return manifest, f"verified: {len(manifest.files)} files match their sha256 and the manifest"


def format_manifest(manifest: Manifest) -> str:
    v = manifest.versions
    rows = [
        ("target", f"{manifest.target} ({manifest.device}{', ' + manifest.gpu_arch if manifest.gpu_arch else ''})"),
        ("model", f"{manifest.model['id']}" + (f"@{manifest.model['revision']}" if manifest.model.get('revision')
                                               else "") + f"  fingerprint {manifest.fingerprint[:16]}"),
        ("versions", f"torch {v['torch']}, cuda {v['cuda']}, triton {v['triton']}, diffusers {v['diffusers']}, "
                     f"aotpack {v['aotpack']}"),
        ("dtype", f"{manifest.dtype} (LoRA {manifest.lora_dtype})"),
        ("quantization", _quantization(manifest.quantization)),
        ("attention", manifest.attention),
        ("max_rank", str(manifest.max_rank)),
        ("slots", f"{len(manifest.slots)} layers (patterns {manifest.slot_patterns})"),
        ("shapes", ", ".join(f"{k} {lo}-{hi}" for k, (lo, hi) in manifest.shapes.items())),
        ("layout", manifest.layout + (", modulation rows once an image (batched_modulation)"
                                      if manifest.recipe.get("batched_modulation") else "")),
        ("validation", f"max rel. error {manifest.validation.get('max_rel_error', float('nan')):.2e} "
                       f"(tolerance {manifest.validation.get('tolerance')})"),
        ("built", f"{manifest.build.get('date')} in {manifest.build.get('seconds')} s on "
                  f"{manifest.build.get('gpu') or manifest.build.get('host')}"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {val}" for k, val in rows]
    lines.append("")
    lines += _program_table(manifest)
    lines.append("")
    for name, digest in manifest.files.items():
        lines.append(f"sha256 {digest}  {name}")
    return "\n".join(lines)


def _quantization(record: dict) -> str:
    config = record.get("config")
    kept = record.get("unquantized_linears")
    kept = f"; not quantized: {', '.join(kept)}" if kept else ""
    if isinstance(config, dict):  # torchao's config_to_dict form
        return (f"{record['method']} ({config.get('_type', 'torchao config')}, torchao {record.get('torchao_version')})"
                f"{kept}")
    return str(config or record["method"]) + kept


def _program_table(manifest: Manifest) -> list[str]:
    """One row per program (a no-slot twin by its own name), then the merge programs, with each one's compile
    time as the build recorded it."""
    seconds = manifest.build.get("compile_seconds", {})
    rows = [(p.name, p.file, str(len(p.instances)), str(len(p.slots)), str(len(p.constants)))
            for p in manifest.programs]
    for file in (manifest.merge_program, manifest.merge_by_address_program):
        if file:
            rows.append((file.removesuffix(".pt2"), file, "", "", ""))
    header = ("program", "file", "instances", "slots", "constants")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(row, compile_s):
        counts = " ".join(f"{value:>{width}}" for value, width in zip(row[2:], widths[2:]))
        return f"{row[0]:<{widths[0]}} {row[1]:<{widths[1]}} {counts}  {compile_s}"

    return [line(header, "compile s")] + [line(row, seconds.get(row[0], "")) for row in rows]
