"""Reading adapter files safely: safetensors only, checked before any tensor is used.

Nothing here ever unpickles. Pickle-based formats (`.bin`, `.pt`, `.ckpt`, `.pth`) are refused by
name, and a pickle or `torch.save` archive renamed `.safetensors` is refused by content: only
`safetensors.torch.load_file` reads tensors, and it cannot run code. The header is parsed and
checked against the file size first, so truncated or corrupt files fail with a clear message.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import math
import struct
from pathlib import Path

import torch

from ..errors import AdapterFileError

PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"}
METADATA_KEY = "lora_adapter_metadata"  # diffusers' key for its saved LoraConfig
_MAX_HEADER = 100 * 1024 * 1024
_REDOWNLOAD = "download the file again (or re-export it as .safetensors)"
_CONVERT = ("convert it to .safetensors in a trusted, sandboxed environment, or use the publisher's "
            ".safetensors release")


def _pickle_kind(head: bytes) -> str | None:
    """'torch.save zip archive' / 'pickle' when the first bytes say so, else None."""
    if head[:4] == b"PK\x03\x04":
        return "torch.save zip archive"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "pickle"  # PROTO opcode + protocol number
    if head[:1] in (b"c", b"(", b"}", b"]") and b"\n" in head[:64]:
        return "pickle"  # protocol 0/1 pickles start with GLOBAL / MARK / EMPTY_DICT ...
    return None


def read_header(path: Path, data: bytes | memoryview) -> dict:
    """The header dict of safetensors `data` (the bytes of `path`), validated against its size."""
    size = len(data)
    head = bytes(data[:64])
    if size < 10:
        raise AdapterFileError(f"adapter {path} is {size} bytes: too short to be a safetensors file", _REDOWNLOAD)
    (header_len,) = struct.unpack("<Q", head[:8])
    # A safetensors file is <u64 header length><JSON object>; check that shape before anything else,
    # so a valid file is never mistaken for a pickle (its length may start with 0x80).
    plausible = 2 <= header_len <= min(_MAX_HEADER, size - 8) and head[8:9] == b"{"
    if not plausible:
        kind = _pickle_kind(head)
        if kind:
            raise AdapterFileError(
                f"adapter {path} is a {kind}, not safetensors; it was not loaded (unpickling can run code)",
                _CONVERT)
        raise AdapterFileError(
            f"adapter {path} is not a readable safetensors file (declared header length {header_len}, "
            f"file {size} bytes)", _REDOWNLOAD)
    try:
        header = json.loads(bytes(data[8:8 + header_len]))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterFileError(f"adapter {path} has an unreadable safetensors header ({err})", _REDOWNLOAD) from err
    if not isinstance(header, dict):
        raise AdapterFileError(f"adapter {path} has a safetensors header that is not a JSON object", _REDOWNLOAD)
    data_size = size - 8 - header_len
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise AdapterFileError(f"adapter {path}: tensor {name!r} has no valid data_offsets in the header",
                                   _REDOWNLOAD)
        if offsets[1] > data_size:
            raise AdapterFileError(
                f"adapter {path} is truncated: tensor {name!r} ends at byte {offsets[1]} of {data_size} data bytes",
                _REDOWNLOAD)
    return header


def _lora_metadata(path: Path, header: dict) -> dict:
    file_meta = header.get("__metadata__") or {}
    if METADATA_KEY not in file_meta:
        return {}
    try:
        meta = json.loads(file_meta[METADATA_KEY])
    except (TypeError, json.JSONDecodeError) as err:
        raise AdapterFileError(f"adapter {path}: its {METADATA_KEY!r} metadata is not valid JSON ({err})",
                               "re-save the adapter with diffusers' save_lora_weights") from err
    if not isinstance(meta, dict):
        raise AdapterFileError(f"adapter {path}: its {METADATA_KEY!r} metadata is not a JSON object",
                               "re-save the adapter with diffusers' save_lora_weights")
    return meta


def max_magnitudes(tensors: dict[str, torch.Tensor]) -> dict[str, float]:
    """max |x| of each non-empty float tensor (NaN/Inf propagate), as Python floats.

    One multi-tensor reduction and one transfer per dtype instead of a few ops per tensor: every torch
    call from a Python thread waits for the GIL, and in a serving process the model thread holds it for
    milliseconds at a time (AOTInductor runners launch under it), so a parse of ~1000 tensors in the
    prefetcher took 6.5-9.6 s on the H200 with per-tensor checks (2026-11-30).
    """
    groups: dict[tuple, list[str]] = {}
    for name, t in tensors.items():
        if t.is_floating_point() and t.numel():
            groups.setdefault((t.dtype, t.device), []).append(name)
    magnitudes = {}
    for names in groups.values():
        norms = torch._foreach_norm([tensors[n] for n in names], float("inf"))
        magnitudes.update(zip(names, torch.stack(norms).double().tolist()))
    return magnitudes


def upcast_float8(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`tensors` with float8 ones (e4m3fn, e5m2, ...) as float32, which holds their values exactly. torch has no
    reductions or arithmetic for float8 (the checks and diffusers' converters would fail), and PEFT copies the
    factors into float32/bfloat16 LoRA weights anyway, so these are the values diffusers loads."""
    return {name: t.float() if t.is_floating_point() and t.element_size() == 1 else t for name, t in tensors.items()}


def check_finite(tensors: dict[str, torch.Tensor], where: str) -> None:
    bad = [name for name, value in max_magnitudes(tensors).items() if not math.isfinite(value)]
    if bad:
        raise AdapterFileError(
            f"adapter {where} holds NaN/Inf values in {len(bad)} tensors (e.g. {sorted(bad)[:3]})",
            "the adapter is broken (often a diverged training run); use another checkpoint",
        )


def check_float_dtypes(tensors: dict[str, torch.Tensor], where: str) -> None:
    """LoRA factors are real-valued matrices: integer or bool tensors (other than a scalar alpha/rank) are
    refused instead of being converted into a silently wrong delta."""
    bad = sorted(name for name, t in tensors.items()
                 if not t.is_floating_point() and not (t.numel() == 1 and name.endswith((".alpha", "alpha"))))
    if bad:
        raise AdapterFileError(
            f"adapter {where} holds {len(bad)} non-float tensors (e.g. {bad[0]!r}: {tensors[bad[0]].dtype}); LoRA "
            "factors must be float (float32, bfloat16, float16, float64, float8)",
            "re-export the adapter with float weights (quantized LoRA files are not supported)")


def load_safetensors(path: str | Path, *, device=None) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, diffusers LoRA metadata or {}) from a local `.safetensors` file (values are checked by
    `check_finite` when the adapter is parsed); `read_safetensors` also gives the bytes' sha256."""
    tensors, metadata, _ = _load(path, device, with_sha256=False)
    return tensors, metadata


def read_safetensors(path: str | Path, *,
                     device=None) -> tuple[dict[str, torch.Tensor], dict, concurrent.futures.Future]:
    """`load_safetensors`' (tensors, metadata) and a `Future` of the sha256 (hex) of the very bytes they were read
    from, hashed on a background thread (hashlib releases the GIL) while the caller parses and switches.

    The digest is taken from the one read of the file (never a second read, which could also see other bytes).
    In the foreground it cost a file switch most of its time: on the H100 machine's host (2026-12-06, the
    687 MB rank-64 benchmark LoRA from the page cache, `scripts/gpu/probe_provenance_cost.py`) the read to the
    GPU took 0.17 s without it and 0.90 s with it (sha256 alone 0.73 s, ~0.94 GB/s), a file switch 0.76-0.81 s.
    """
    return _load(path, device, with_sha256=True)


_HASHING = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="aotpack-sha256")


def _load(path: str | Path, device, *, with_sha256: bool):
    """The tensors of `path` (on `device`), its diffusers LoRA metadata, and (`with_sha256`) a Future of its bytes'
    sha256 (else None).

    `device`: the tensors are views of one copy of the file's bytes on that device. For a GPU the file
    is read into pinned memory and sent in one asynchronous copy (on the current stream), so that the
    checks and the parse run as GPU kernels instead of thousands of small multi-threaded CPU ops: on
    the H200 host (16 cores, 2026-11-30) a 687 MB rank-64 parse took 0.25 s alone but 0.9-9.6 s on
    the CPU while another thread kept the GPU busy (OpenMP teams contending with spinning threads).
    """
    path = Path(path)
    if not path.is_file():
        raise AdapterFileError(f"adapter file {path} does not exist",
                               "check the path, or name a Hub adapter as owner/repo/file.safetensors")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise AdapterFileError(
            f"adapter {path} is a {path.suffix} (pickle) file; only .safetensors adapters are read, "
            "because unpickling can run arbitrary code", _CONVERT)
    # One read into memory this process owns: the checks and the tensors see the same bytes, and a
    # file rewritten or truncated later cannot change or crash a cached adapter (as a mmap could).
    pinned = device is not None and torch.device(device).type == "cuda"
    # not zero-filled: the read fills it
    buffer = torch.empty(path.stat().st_size, dtype=torch.uint8, pin_memory=pinned)
    data = memoryview(buffer.numpy())
    with open(path, "rb") as file:
        if file.readinto(data) != len(data):
            raise AdapterFileError(f"adapter {path} changed size while being read", _REDOWNLOAD)
    header = read_header(path, data)
    lora_meta = _lora_metadata(path, header)
    base = 8 + struct.unpack("<Q", bytes(data[:8]))[0]
    if device is not None:
        buffer = buffer.to(device, non_blocking=pinned)
    # from the host bytes, which the hashing thread keeps alive (`data` views them) until it is done
    sha256 = _HASHING.submit(lambda: hashlib.sha256(data).hexdigest()) if with_sha256 else None
    tensors = _tensors_in(path, buffer, header, base)
    # Key order as safetensors' load_file (and so diffusers) gives it: diffusers' choice of a default
    # alpha depends on it (its "most common alpha" counts tensors by identity, so the first one wins).
    return {key: tensors[key] for key in sorted(tensors)}, lora_meta, sha256


def _tensors_in(path: Path, raw: torch.Tensor, header: dict, base: int) -> dict[str, torch.Tensor]:
    """The header's tensors as views of the file's bytes `raw` (no second copy; data from byte `base`),
    checked as safetensors' own loader checks them: known dtypes, byte sizes that match the shapes,
    no gaps or overlaps."""
    entries = sorted(((entry["data_offsets"], name, entry) for name, entry in header.items()
                      if name != "__metadata__"), key=lambda item: item[0])
    tensors, end_of_previous, typed = {}, 0, {}
    for (start, end), name, entry in entries:
        dtype, shape = _SAFETENSORS_DTYPES.get(entry.get("dtype")), entry.get("shape")
        if dtype is None or not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise AdapterFileError(f"adapter {path}: tensor {name!r} has dtype {entry.get('dtype')!r} and shape "
                                   f"{shape!r}, which safetensors cannot hold", _REDOWNLOAD)
        size = dtype.itemsize * math.prod(shape)
        if start != end_of_previous or end - start != size:
            raise AdapterFileError(f"adapter {path}: tensor {name!r} occupies bytes {start}-{end}, but its shape "
                                   f"{shape} x {entry['dtype']} needs {size} bytes from byte {end_of_previous}",
                                   _REDOWNLOAD)
        if (base + start) % dtype.itemsize:  # a view needs aligned elements: copy the odd one out
            tensors[name] = raw[base + start:base + end].clone().view(dtype).reshape(shape)
        else:  # one strided view of the buffer read as `dtype` (one op per tensor: each op waits for the GIL)
            if dtype not in typed:
                typed[dtype] = raw[:raw.numel() - raw.numel() % dtype.itemsize].view(dtype)
            tensors[name] = typed[dtype].as_strided(shape, _contiguous_strides(shape),
                                                    (base + start) // dtype.itemsize)
        end_of_previous = end
    if base + end_of_previous != raw.numel():
        raise AdapterFileError(f"adapter {path}: {raw.numel() - base - end_of_previous} bytes after the last tensor "
                               "belong to none", _REDOWNLOAD)
    return tensors


def _contiguous_strides(shape: list[int]) -> list[int]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return strides[::-1]


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
                       "F8_E5M2": torch.float8_e5m2}
