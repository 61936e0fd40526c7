"""The distribution as a user gets it: sdist -> wheel -> a fresh venv, used from outside the repository.

Every install in scripts and CI is editable, so a module or data file missing from the wheel would
go unnoticed there. Here the sdist is built from a copy of the source tree, the wheel from the
unpacked sdist (as `python -m build` does), and the wheel is installed into a fresh venv. To stay
offline and fast, the fresh venv sees the heavy dependencies (torch, diffusers, ...) of the test
venv through a `.pth` line; paths added that way do not run the `.pth` files found there, so the
editable install's finder stays inactive and `aotpack` can only come from the wheel (asserted).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

import aotpack

ROOT = Path(__file__).resolve().parent.parent
# what a clean clone does not have (build outputs, venvs, caches)
SOURCE_IGNORE = shutil.ignore_patterns(".git", ".venv", ".device", ".whl", "artifacts", "build", "dist",
                                       "*.egg-info", "__pycache__", ".pytest_cache", "*.pt2", "*.so",
                                       "*.safetensors")
BUILD = ("from setuptools import build_meta; import sys; "
         "print(getattr(build_meta, sys.argv[1])(sys.argv[2]))")


def _run(args, *, cwd, env=None, timeout=300) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout, check=False)
    assert result.returncode == 0, f"{args} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def dists(tmp_path_factory):
    """(sdist, wheel): the sdist from a copy of the source tree, the wheel from the unpacked sdist."""
    base = tmp_path_factory.mktemp("dist")
    source = base / "source"
    shutil.copytree(ROOT, source, ignore=SOURCE_IGNORE)
    out = base / "out"
    # no build isolation: the test venv's setuptools (declared in the test extra), nothing downloaded
    sdist = out / _run([sys.executable, "-c", BUILD, "build_sdist", out], cwd=source).stdout.split()[-1]
    with tarfile.open(sdist) as archive:
        archive.extractall(base / "unpacked", filter="data")
    (unpacked,) = (base / "unpacked").iterdir()
    wheel = out / _run([sys.executable, "-c", BUILD, "build_wheel", out], cwd=unpacked).stdout.split()[-1]
    return sdist, wheel


@pytest.fixture(scope="module")
def fresh(dists, tmp_path_factory):
    """A fresh venv with only the wheel installed; returns (bin dir, environment, work dir outside the repo)."""
    _, wheel = dists
    base = tmp_path_factory.mktemp("fresh")
    venv = base / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=base)
    python = venv / "bin" / "python"
    # Installed before the .pth below exists, so pip sees an empty venv and touches nothing else.
    _run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index",
          "--no-compile", wheel], cwd=base)
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=base)
                .stdout.strip())
    (site / "zz_test_venv_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", HF_HUB_OFFLINE="1",
               VIRTUAL_ENV=str(venv))
    work = base / "work"
    work.mkdir()
    return venv / "bin", env, work


def test_wheel_has_every_module_and_recipe(dists):
    _, wheel = dists
    names = set(zipfile.ZipFile(wheel).namelist())
    package = ROOT / "aotpack"
    expected = {p.relative_to(ROOT).as_posix() for p in package.rglob("*.py") if "__pycache__" not in p.parts}
    expected |= {p.relative_to(ROOT).as_posix() for p in (package / "recipes").glob("*.toml")}
    assert expected - names == set()
    assert any(n.startswith("aotpack/bench/") for n in names) and "aotpack/recipes/cpu.toml" in names
    dist_info = f"aotpack-{aotpack.__version__}.dist-info"
    assert f"{dist_info}/licenses/LICENSE" in names
    metadata = zipfile.ZipFile(wheel).read(f"{dist_info}/METADATA").decode()
    assert "Requires-Python: >=3.11" in metadata and "License-Expression: Apache-2.0" in metadata
    assert f"Version: {aotpack.__version__}\n" in metadata
    assert not any(n.startswith("tests/") for n in names)


def test_sdist_carries_the_tests_and_the_license(dists):
    sdist, _ = dists
    with tarfile.open(sdist) as archive:
        names = {n.split("/", 1)[1] for n in archive.getnames() if "/" in n}
    tests = {p.relative_to(ROOT).as_posix() for p in (ROOT / "tests").glob("*.py")}
    assert tests - names == set()
    for needed in ("LICENSE", "README.md", "pyproject.toml", "scripts/test.sh", "scripts/bootstrap.sh", ".ci/run",
                   ".github/workflows/publish.yml", "aotpack/recipes/cpu.toml"):
        assert needed in names, needed
    assert not any(n.endswith((".pyc", ".pt2", ".so")) for n in names)


def test_fresh_venv_imports_aotpack_from_the_wheel(fresh):
    bin_dir, env, work = fresh
    script = ("import aotpack, json, importlib.metadata as m; "
              "print(json.dumps([aotpack.__file__, m.version('aotpack'), aotpack.__version__]))")
    info = json.loads(_run([bin_dir / "python", "-c", script], cwd=work, env=env).stdout)
    assert Path(info[0]).is_relative_to(bin_dir.parent) and not Path(info[0]).is_relative_to(ROOT)
    assert info[1] == info[2] == aotpack.__version__


def _every_help(bin_dir: Path, env, work) -> list[tuple[list[str], object, str]]:
    """`aotpack PATH --help` for every command of the installed click group (subcommands of groups included), as
    (path, exit code, stdout). One process runs them all through the console script's own `main`: a bench part's
    help imports its module (torch and diffusers with it), ~5-10 s a process on 2 cores when each ran apart."""
    script = ("import contextlib, io, json, sys, click\n"
              "from aotpack.cli.main import cli, main\n"
              "def walk(cmd, path):\n"
              "    yield path\n"
              "    if isinstance(cmd, click.Group):\n"
              "        for name, sub in cmd.commands.items():\n"
              "            yield from walk(sub, path + [name])\n"
              "helps = []\n"
              "for path in walk(cli, []):\n"
              "    sys.argv, shown, code = ['aotpack', *path, '--help'], io.StringIO(), None\n"
              "    with contextlib.redirect_stdout(shown):\n"
              "        try:\n"
              "            main()\n"
              "        except SystemExit as stop:\n"
              "            code = stop.code\n"
              "    helps.append([path, code, shown.getvalue()])\n"
              "print(json.dumps(helps))")
    return json.loads(_run([bin_dir / "python", "-c", script], cwd=work, env=env, timeout=300).stdout)


def test_every_subcommand_help_from_outside_the_repository(fresh):
    bin_dir, env, work = fresh
    helps = _every_help(bin_dir, env, work)
    assert {"targets", "build", "run", "bench", "push", "pull", "inspect", "doctor"} <= {p[0] for p, _, _ in helps if p}
    assert any(path == ["bench", "speed"] for path, _, _ in helps)
    for path, code, shown in helps:
        assert code in (0, None) and "Usage:" in shown, (path, code, shown)
    # the console script itself, as a user runs it
    assert "Usage:" in _run([bin_dir / "aotpack", "bench", "report", "--help"], cwd=work, env=env).stdout
    targets = _run([bin_dir / "aotpack", "targets"], cwd=work, env=env).stdout
    assert "cpu" in targets and "h100" in targets


def test_tiny_build_and_run_from_the_wheel(fresh, demo_loras):
    from PIL import Image

    bin_dir, env, work = fresh
    # --max-rank 0: a base-only package (no LoRA inputs at all, the slot-overhead baseline), 4 programs
    # instead of 8 (CI time)
    _run([bin_dir / "aotpack", "build", "--model", "tiny", "--target", "cpu", "--max-rank", "0", "--out", "pkg"],
         cwd=work, env=env, timeout=600)
    manifest = json.loads((work / "pkg" / "manifest.json").read_text())
    assert manifest["max_rank"] == 0 and manifest["slots"] == [] and manifest["validation"]["max_rel_error"] < 1e-3
    assert not [i for p in manifest["programs"] for i in p["inputs"] if "lora" in i["name"]]
    refused = subprocess.run([str(bin_dir / "aotpack"), "run", "pkg", "--model", "tiny", "--prompt", "a red fox",
                              "--steps", "1", "--height", "64", "--width", "64",
                              "--lora", f"{demo_loras['tiny-style-attn']}:1.0", "--out", "refused.png"],
                             cwd=work, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert refused.returncode == 1 and "slot" in refused.stderr and "Traceback" not in refused.stderr, refused.stderr
    assert not (work / "refused.png").exists()
    _run([bin_dir / "aotpack", "run", "pkg", "--model", "tiny", "--prompt", "a red fox", "--steps", 2,
          "--height", 64, "--width", 64, "--seed", 1, "--out", "img.png"], cwd=work, env=env, timeout=300)
    with Image.open(work / "img.png") as image:
        assert image.size == (64, 64)
        assert len(set(image.convert("RGB").getdata())) > 1  # a generated image, not a blank
