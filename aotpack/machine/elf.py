"""Reading ELF shared objects: what a compiled `wrapper.so` links against.

A `wrapper.so` that links libstdc++ statically compiles fine and then segfaults inside
`aoti_load_package` (two copies of libstdc++'s locale/regex state in one process). Some GCC builds
(e.g. a `/opt/gcc` first on PATH) do this by default. We read the ELF dynamic section ourselves
(no readelf needed) and refuse to ship such a package.
"""

from __future__ import annotations

import struct

_SHT_DYNSYM, _SHT_DYNAMIC = 11, 6
_DT_NEEDED = 1


def _sections(data: bytes):
    if data[:4] != b"\x7fELF" or data[4] != 2:
        raise ValueError("not a 64-bit ELF file")
    endian = "<" if data[5] == 1 else ">"
    (shoff,) = struct.unpack_from(endian + "Q", data, 0x28)
    shentsize, shnum, _shstrndx = struct.unpack_from(endian + "HHH", data, 0x3A)
    sections = []
    for i in range(shnum):
        name, kind, _flags, _addr, offset, size, link, _info, _align, entsize = struct.unpack_from(
            endian + "IIQQQQIIQQ", data, shoff + i * shentsize)
        sections.append((kind, offset, size, link, entsize))
    return endian, sections


def _string(data: bytes, table_offset: int, index: int) -> str:
    end = data.index(b"\x00", table_offset + index)
    return data[table_offset + index:end].decode("utf-8", "replace")


def elf_needed_and_exports(data: bytes) -> tuple[list[str], list[str]]:
    """(DT_NEEDED libraries, defined dynamic symbols) of a 64-bit ELF shared object."""
    endian, sections = _sections(data)
    needed, exported = [], []
    for kind, offset, size, link, entsize in sections:
        strtab_offset = sections[link][1]
        if kind == _SHT_DYNAMIC:
            for pos in range(offset, offset + size, 16):
                tag, value = struct.unpack_from(endian + "qQ", data, pos)
                if tag == _DT_NEEDED:
                    needed.append(_string(data, strtab_offset, value))
        elif kind == _SHT_DYNSYM and entsize:
            for pos in range(offset, offset + size, entsize):
                name_index, _info, _other, shndx = struct.unpack_from(endian + "IBBH", data, pos)
                if shndx != 0 and name_index:
                    exported.append(_string(data, strtab_offset, name_index))
    return needed, exported


def static_libstdcxx_evidence(data: bytes) -> str | None:
    """Why this C++ object carries its own libstdc++ (None when it links libstdc++.so)."""
    needed, exported = elf_needed_and_exports(data)
    if any(lib.startswith("libstdc++") for lib in needed):
        return None
    runtime_symbols = [s for s in exported if s.startswith("__cxa_")]
    return f"no libstdc++.so among DT_NEEDED {needed}; it defines {len(runtime_symbols)} __cxa_* symbols itself"
