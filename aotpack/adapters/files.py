"""Reading adapter files safely: safetensors only, checked before any tensor is used.

Pickle-based formats (`.bin`, `.pt`, `.ckpt`, `.pth`) can execute code when loaded; they are refused
by name *and* by content without ever being unpickled. The safetensors header is parsed and
checked against the file size first, so truncated files fail with a clear message.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from ..errors import AdapterFileError

PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"}
_MAX_HEADER = 100 * 1024 * 1024
METADATA_KEY = "lora_adapter_metadata"  # diffusers' key for its LoraConfig metadata


def _looks_like_pickle(head: bytes) -> bool:
    # torch.save zip archives start with PK; raw pickles with the PROTO opcode 0x80.
    return head[:2] == b"PK" or head[:1] == b"\x80"


def read_header(path: Path) -> tuple[dict, int]:
    """(header dict, data offset) of a safetensors file, validated against the file size."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise AdapterFileError(f"adapter {path} is {size} bytes: too short to be a safetensors file",
                                   "download the file again")
        if _looks_like_pickle(head):
            raise AdapterFileError(
                f"adapter {path} is a pickle/torch.save file; it was not loaded (unpickling can run code)",
                "convert it to .safetensors in a trusted environment, or download the .safetensors version",
            )
        (header_len,) = struct.unpack("<Q", head)
        if header_len == 0 or header_len > min(_MAX_HEADER, size - 8):
            raise AdapterFileError(
                f"adapter {path} has a corrupt safetensors header (declared length {header_len}, file {size} bytes)",
                "download the file again",
            )
        raw = handle.read(header_len)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterFileError(f"adapter {path} has an unreadable safetensors header ({err})",
                               "download the file again") from err
    data_size = size - 8 - header_len
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        end = entry.get("data_offsets", [0, 0])[1] if isinstance(entry, dict) else 0
        if end > data_size:
            raise AdapterFileError(
                f"adapter {path} is truncated: tensor {name!r} ends at byte {end} of {data_size} data bytes",
                "download the file again",
            )
    return header, 8 + header_len


def load_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, diffusers LoRA metadata or {}) from a local `.safetensors` file, after checks."""
    path = Path(path)
    if not path.is_file():
        raise AdapterFileError(f"adapter file {path} does not exist",
                               "check the path, or pass a Hub adapter as repo_id/weight_name.safetensors")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise AdapterFileError(
            f"adapter {path} is a {path.suffix} (pickle) file; only .safetensors adapters are read, "
            "because unpickling can run arbitrary code",
            "convert it to .safetensors in a trusted environment, or use the .safetensors release",
        )
    header, _ = read_header(path)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, ValueError, RuntimeError) as err:
        raise AdapterFileError(f"adapter {path} could not be read: {err}", "download the file again") from err
    bad = [name for name, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise AdapterFileError(
            f"adapter {path} holds NaN/Inf values in {len(bad)} tensors (e.g. {bad[:3]})",
            "the adapter is broken (often a diverged training run); use another checkpoint",
        )
    file_meta = header.get("__metadata__") or {}
    lora_meta = json.loads(file_meta[METADATA_KEY]) if METADATA_KEY in file_meta else {}
    return tensors, lora_meta


def resolve_adapter_source(source: str, *, weight_name: str | None = None, revision: str | None = None) -> Path:
    """A local path for `source`: an existing file, or a Hub file (`owner/repo/file.safetensors`, or
    `owner/repo` with `weight_name`) fetched through the huggingface_hub cache (offline-aware)."""
    path = Path(source).expanduser()
    if weight_name is None and (path.exists() or source.count("/") < 2 or source.startswith((".", "/", "~"))):
        if not path.exists():
            raise AdapterFileError(f"adapter file {source} does not exist",
                                   "check the path, or name a Hub adapter as owner/repo/file.safetensors")
        return path
    if weight_name is None:
        owner, repo, *rest = source.split("/")
        repo_id, name = f"{owner}/{repo}", "/".join(rest)
    else:
        repo_id, name = source, weight_name
    if Path(name).suffix.lower() in PICKLE_SUFFIXES:
        raise AdapterFileError(f"adapter {repo_id}/{name} is a pickle file and will not be downloaded or loaded",
                               "use the repository's .safetensors file")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(hf_hub_download(repo_id, name, revision=revision))
    except (EntryNotFoundError, RepositoryNotFoundError, LocalEntryNotFoundError) as err:
        raise AdapterFileError(
            f"adapter {repo_id}/{name} could not be found ({type(err).__name__})",
            "check the repo id and file name; offline (HF_HUB_OFFLINE=1) only cached files are available",
        ) from err
