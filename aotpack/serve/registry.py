"""Named adapters: the only LoRAs a request can use (requests name them; they never pass a path or URL).

Sources: a directory (`--adapters DIR`: each `*.safetensors` file and each LoRA folder in it,
under its stem) and Hub files (`--adapter NAME=hf://owner/repo@rev/file.safetensors`). At run time
`POST /v1/adapters` may add a Hub file or a file inside one of the registered directories.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import threading
from pathlib import Path

from ..adapters.sources import AdapterSource, adapter_source, local_path
from ..errors import AdapterError
from .errors import AdapterNotAllowedError, UnknownAdapterError

log = logging.getLogger("aotpack.serve")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclasses.dataclass(frozen=True)
class RegisteredAdapter:
    name: str
    source: AdapterSource
    # what HTTP clients see of a local source: its path inside the --adapters folder, else its file name;
    # the server's own paths go to its log only
    shown: str | None = None

    def describe(self) -> str:
        if self.source.is_hub:
            return "hf://" + self.source.describe()
        return self.shown or Path(self.source.location).name

    def file_bytes(self) -> int | None:
        if self.source.is_hub:
            return None
        path = Path(self.source.location)
        files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
        return sum(f.stat().st_size for f in files) if files else None


def header_rank(source: AdapterSource) -> int | None:
    """The largest LoRA rank in a local file, from its safetensors header (no tensor is read)."""
    from safetensors import safe_open

    if source.is_hub:
        return None
    try:
        with safe_open(str(local_path(source)), framework="pt") as handle:
            ranks = [handle.get_slice(k).get_shape()[0] for k in handle.keys()
                     if any(t in k for t in ("lora_A", "lora_down", "lora.down"))]
    except Exception:  # unreadable files are reported when used (422), not when listed
        return None
    return max(ranks, default=None)


def check_name(name: str) -> str:
    """A registered name (letters, digits, `.`, `_`, `-`); anything path- or URL-like is refused."""
    if not isinstance(name, str) or not NAME.match(name) or ".." in name:
        raise AdapterNotAllowedError(
            f"adapter {name!r} is not a registered adapter name: requests name adapters, they never pass a path "
            "or URL", "use a name listed by GET /v1/adapters (register files with --adapters DIR or "
            "POST /v1/adapters)")
    return name


def _is_adapter_entry(path: Path) -> bool:
    return (path.is_file() and path.suffix == ".safetensors") or (
        path.is_dir() and any(path.glob("*.safetensors")))


class AdapterRegistry:
    def __init__(self):
        self._adapters: dict[str, RegisteredAdapter] = {}
        self._roots: list[Path] = []  # directories a registration may take local files from
        self._lock = threading.Lock()

    def add_directory(self, directory) -> list[str]:
        directory = Path(directory).expanduser().resolve()
        if not directory.is_dir():
            raise AdapterNotAllowedError(f"--adapters {directory} is not a directory",
                                         "pass a folder of .safetensors LoRA files")
        found: dict[str, Path] = {}
        for entry in sorted(directory.iterdir()):
            if not _is_adapter_entry(entry):
                continue
            name = entry.stem if entry.is_file() else entry.name
            if not NAME.match(name) or ".." in name:  # requests could never name it: said, not fatal
                log.warning("--adapters %s: %s is not registered: its name %r is not a request-safe name "
                            "(letters, digits, '.', '_', '-'); rename it to serve it", directory, entry.name, name)
                continue
            try:
                local_path(AdapterSource(str(entry)))  # a folder of several files names no one adapter
            except AdapterError as err:
                log.warning("--adapters %s: %s is not registered: %s; %s", directory, entry.name, err.problem,
                            err.fix)
                continue
            if name in found or name in self._adapters:
                where = found.get(name) or self._adapters[name].source.describe()
                raise AdapterNotAllowedError(f"--adapters {directory}: {entry.name} and {where} would both be "
                                             f"the adapter {name!r}", "rename one of them (names are unique)")
            found[name] = entry
        self._roots.append(directory)
        return [self.put(RegisteredAdapter(name, AdapterSource(str(entry)), self._shown(entry))).name
                for name, entry in found.items()]

    def add(self, name: str, source: str, *, trusted: bool = False) -> RegisteredAdapter:
        """Register `source` under `name` (see `resolve`)."""
        return self.put(self.resolve(name, source, trusted=trusted))

    def resolve(self, name: str, source: str, *, trusted: bool = False) -> RegisteredAdapter:
        """The entry `name` -> `source` would be, not yet registered. Untrusted (HTTP) sources must be Hub
        files or files inside a registered directory; the operator's command line (`trusted`) may name
        any local file."""
        check_name(name)
        text = str(source)
        if text.startswith("hf://"):
            where = adapter_source(text)
            if not where.is_hub or not where.weight_name:
                raise AdapterNotAllowedError(f"source {text!r} is not a Hub file",
                                             "use hf://owner/repo@revision/file.safetensors")
        elif "://" in text:
            raise AdapterNotAllowedError(f"source {text!r}: only hf:// URLs are allowed",
                                         "use hf://owner/repo@revision/file.safetensors")
        else:
            try:
                path = Path(text).expanduser()
                if not trusted:
                    path = path.resolve()
            except (ValueError, OSError, RuntimeError) as err:  # a NUL byte, an unknown ~user, a symlink loop
                raise AdapterNotAllowedError(f"source {text!r} is not a usable path ({err})",
                                             "pass the path of an existing .safetensors file") from None
            if not trusted:
                if not any(path.is_relative_to(root) for root in self._roots):
                    raise AdapterNotAllowedError(
                        f"source {text!r} is outside the adapter directories the server was started with",
                        "put the file in a directory passed with --adapters, or use an hf:// Hub file")
            if not _is_adapter_entry(path):
                raise AdapterNotAllowedError(f"source {text!r} is not a .safetensors file or LoRA folder",
                                             "pass an existing .safetensors file")
            return RegisteredAdapter(name, AdapterSource(str(path)), self._shown(path))
        return RegisteredAdapter(name, where)

    def _shown(self, path: Path) -> str:
        """`path` as clients see it: relative to the --adapters folder holding it, else its file name alone."""
        candidates = [Path(os.path.abspath(path))]  # as listed in the folder (a link inside it stays its name)
        try:
            candidates.append(path.resolve())
        except (OSError, RuntimeError):
            pass
        for candidate in candidates:
            for root in self._roots:
                if candidate.is_relative_to(root):
                    return candidate.relative_to(root).as_posix()
        return path.name

    def redact(self, text: str) -> str:
        """`text` (an error's problem or fix) with the server's paths of registered files and --adapters folders
        shown as clients see them: parse errors name the file they read."""
        with self._lock:
            files = {entry.source.location: entry.describe() for entry in self._adapters.values()
                     if not entry.source.is_hub}
        for location in sorted(files, key=len, reverse=True):  # longest first: a file before its folder
            text = text.replace(location, files[location])
        for root in sorted(self._roots, key=lambda r: len(str(r)), reverse=True):
            text = text.replace(f"{root}{os.sep}", "").replace(str(root), "--adapters folder")
        return text

    def put(self, entry: RegisteredAdapter) -> RegisteredAdapter:
        with self._lock:
            self._adapters[check_name(entry.name)] = entry
        log.info("adapter %r registered from %s", entry.name, entry.source.describe())  # the full path: log only
        return entry

    def get(self, name: str) -> RegisteredAdapter:
        check_name(name)
        try:
            return self._adapters[name]
        except KeyError:
            raise UnknownAdapterError(f"adapter {name!r} is not registered",
                                      f"use one of {sorted(self._adapters)[:20]} (GET /v1/adapters)") from None

    def entries(self) -> list[RegisteredAdapter]:
        return [self._adapters[n] for n in sorted(self._adapters)]

    def __contains__(self, name: str) -> bool:
        return name in self._adapters

    def names(self) -> list[str]:
        return sorted(self._adapters)

    def __len__(self) -> int:
        return len(self._adapters)


def parse_adapter_option(text: str) -> tuple[str, str]:
    """`NAME=SOURCE` (the --adapter option)."""
    name, sep, source = text.partition("=")
    if not sep or not name or not source:
        raise AdapterNotAllowedError(f"--adapter {text!r} is not NAME=SOURCE",
                                     "e.g. --adapter style=hf://owner/repo@main/style.safetensors")
    return name, source
