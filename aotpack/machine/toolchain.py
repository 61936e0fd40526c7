"""The C++ toolchain inductor compiles with, and the shared objects it produces.

AOTInductor compiles each program's `wrapper.so` with `$CXX -shared -fPIC ...`. A compiler that
links libstdc++ statically (some GCC builds do by default) produces packages that segfault inside
`aoti_load_package`. Compiling a tiny C++ shared object the same way shows it in well under a
second, before a build spends minutes exporting and compiling; built packages are checked again.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from ..errors import ToolchainError
from .elf import static_libstdcxx_evidence

# Uses std::string, streams and locales: the parts of libstdc++ whose second copy crashes the loader.
PROBE_SOURCE = r"""
#include <locale>
#include <sstream>
#include <string>

extern "C" int aotpack_probe(const char* text) {
  std::ostringstream out;
  out.imbue(std::locale::classic());
  out << std::string(text) << 42;
  return static_cast<int>(out.str().size());
}
"""

# Compilers worth suggesting when the configured one links libstdc++ statically, distribution's first.
CANDIDATE_COMPILERS = ("/usr/bin/g++", "/usr/bin/c++", "/usr/bin/clang++", "g++", "c++", "clang++")


def compiler_version(cxx: str) -> str:
    """First line of `cxx --version` (empty when it does not answer)."""
    try:
        result = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return ""
    return result.stdout.strip().splitlines()[0] if result.returncode == 0 and result.stdout.strip() else ""


def build_probe_library(cxx: str, directory: Path) -> Path:
    """Compile the probe like inductor compiles a wrapper (`-shared -fPIC`); raise if that fails."""
    source, library = directory / "probe.cpp", directory / "probe.so"
    source.write_text(PROBE_SOURCE)
    command = [cxx, "-shared", "-fPIC", "-O2", "-std=c++17", str(source), "-o", str(library)]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as err:
        result = subprocess.CompletedProcess(command, 1, "", str(err))
    if result.returncode != 0:
        raise ToolchainError(
            f"the C++ compiler {cxx} cannot build a shared object (`{' '.join(command)}` failed: "
            f"{result.stderr.strip()[-400:]})",
            "install a working g++ (e.g. `apt install g++`) and point CXX at it",
        )
    return library


@functools.lru_cache(maxsize=None)  # one compile per compiler and process: builds call this every time
def static_linkage_evidence(cxx: str) -> str | None:
    """Why `cxx` links libstdc++ statically into shared objects; None when it links libstdc++.so."""
    with tempfile.TemporaryDirectory(prefix="aotpack-cxx-probe-") as directory:
        library = build_probe_library(cxx, Path(directory))
        return static_libstdcxx_evidence(library.read_bytes())


def dynamic_alternative(exclude: str) -> str | None:
    """A compiler on this machine, other than `exclude`, that links libstdc++ dynamically."""
    seen = {str(Path(exclude).resolve())}
    for candidate in CANDIDATE_COMPILERS:
        path = shutil.which(candidate)
        if not path or str(Path(path).resolve()) in seen:
            continue
        seen.add(str(Path(path).resolve()))
        try:
            if static_linkage_evidence(path) is None:
                return path
        except ToolchainError:
            continue
    return None


def static_linkage_fix(cxx: str) -> str:
    """The fix for a compiler that links libstdc++ statically, naming a checked alternative if any."""
    alternative = dynamic_alternative(cxx)
    if alternative:
        return f"export CXX={alternative} (checked here: it links libstdc++ dynamically), then build again"
    return ("export CXX=<a g++ that links libstdc++ dynamically, e.g. /usr/bin/g++ from the distribution's g++ "
            f"package; none was found here besides {cxx}>, then build again")


def compiler() -> str | None:
    """The C++ compiler inductor will invoke, as a path on PATH; None when there is none.

    Inductor reads CXX once, when `torch._inductor.config` is imported (default `g++`): once that
    module is loaded, its recorded value wins over a later change of the environment variable.
    """
    config = sys.modules.get("torch._inductor.config")
    if config is None:
        candidates = [os.environ.get("CXX", "g++")]
    else:
        cxx = config.cpp.cxx
        candidates = [c for c in (cxx if isinstance(cxx, (list, tuple)) else (cxx,)) if c]
    for candidate in candidates:
        path = shutil.which(candidate)
        if path:
            return path
    return None


def no_compiler_error() -> ToolchainError:
    cxx = os.environ.get("CXX")
    where = f"CXX={cxx} is not an executable" if cxx else "CXX is unset and there is no g++ on PATH"
    return ToolchainError(f"no C++ compiler found ({where}); inductor compiles every program with it",
                          "install g++ (e.g. `apt install g++`) or `export CXX=/path/to/g++`")


def require_working_toolchain() -> str:
    """The compiler inductor will use, after checking it links libstdc++ dynamically.

    Raises `ToolchainError` (with the fix) otherwise. Compiles a probe once per compiler and
    process (~0.3 s), so a build can call it first thing.
    """
    cxx = compiler()
    if cxx is None:
        raise no_compiler_error()
    evidence = static_linkage_evidence(cxx)
    if evidence:
        raise ToolchainError(
            f"the C++ compiler {cxx} links libstdc++ statically into shared objects ({evidence}); every "
            "AOTInductor package it builds segfaults inside aoti_load_package",
            static_linkage_fix(cxx),
        )
    return cxx


def check_package_shared_objects(package: Path) -> None:
    """Refuse a `.pt2` whose compiled wrapper would crash at load (static libstdc++)."""
    with zipfile.ZipFile(package) as archive:
        for name in archive.namelist():
            if not name.endswith(".so"):
                continue
            evidence = static_libstdcxx_evidence(archive.read(name))
            if evidence:
                cxx = compiler()
                raise ToolchainError(
                    f"{package.name}: {Path(name).name} links libstdc++ statically ({evidence}); such a package "
                    f"segfaults inside aoti_load_package (compiled with {cxx})",
                    (static_linkage_fix(cxx) if cxx else "export CXX=/usr/bin/g++ (or another g++ that links "
                     "libstdc++ dynamically), then build again") + "; `aotpack doctor` checks this",
                )
