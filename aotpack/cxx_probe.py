"""Does the C++ compiler build shared objects that link libstdc++ dynamically?

AOTInductor compiles each program's `wrapper.so` with `$CXX -shared -fPIC ...`. A compiler that
links libstdc++ statically (some GCC builds do by default) produces packages that segfault inside
`aoti_load_package`. Compiling a tiny C++ shared object the same way shows it in well under a
second, before a build spends minutes exporting and compiling.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
import tempfile
from pathlib import Path

from .errors import ToolchainError
from .toolchain import static_libstdcxx_evidence

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
