"""Folders left by killed processes (programs, context-parallel runs) are removed by the next one; live ones never are."""

import os
import signal
import subprocess
import sys
import textwrap

from aotpack.runtime.process_folders import LOCK_NAME, ProcessFolder, prefix, remove_orphans

PREFIX = prefix("programs")

HOLD = textwrap.dedent("""
    import sys, time
    from aotpack.runtime.process_folders import ProcessFolder
    folder = ProcessFolder("programs", "held", root=sys.argv[1])
    (folder.path / "kernel.cubin").write_bytes(b"x" * 1024)
    print(folder.path, flush=True)
    time.sleep(600)
""")


def _start_holder(root):
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(root)], stdout=subprocess.PIPE, text=True)
    return process, process.stdout.readline().strip()


def _folders(root):
    return sorted(p.name for p in root.iterdir() if p.name.startswith(PREFIX))


def test_killed_owner_folder_removed_live_ones_kept(tmp_path):
    killed, killed_folder = _start_holder(tmp_path)
    alive, alive_folder = _start_holder(tmp_path)
    try:
        killed.send_signal(signal.SIGKILL)  # no finalizer runs: its folder stays behind
        killed.wait(30)
        mine = ProcessFolder("programs", "mine", root=tmp_path)  # sweeps first: the killed process's folder goes
        assert _folders(tmp_path) == sorted([os.path.basename(alive_folder), mine.path.name])
        assert not os.path.exists(killed_folder)
        assert remove_orphans("programs", tmp_path) == []  # this process's own folder is locked too (flock per open file)
        # a folder that never got its lock file (its process died while making it) goes only once it is old
        young = tmp_path / f"{PREFIX}young-x"
        young.mkdir()
        old = tmp_path / f"{PREFIX}old-x"
        old.mkdir()
        os.utime(old, (0, 0))
        assert remove_orphans("programs", tmp_path) == [old]
        assert young.exists() and os.path.exists(alive_folder) and (mine.path / LOCK_NAME).exists()
        other_kind = tmp_path / f"{prefix('parallel-run')}x"  # another kind's folders are that kind's to sweep
        other_kind.mkdir()
        os.utime(other_kind, (0, 0))
        assert remove_orphans("programs", tmp_path) == [] and other_kind.exists()
        mine.cleanup()
        assert not mine.path.exists()
    finally:
        alive.kill()
        alive.wait(30)
    assert [p.name for p in remove_orphans("programs", tmp_path)] == [os.path.basename(alive_folder)]


def test_a_load_after_a_killed_server_leaves_no_program_folders(tiny_package, tmp_path):
    """As a user sees it: a process that loaded a package is killed (a Ray replica stopped, say); the next one that
    loads a package removes what the killed one left, and exits leaving nothing either."""
    env = dict(os.environ, TMPDIR=str(tmp_path), HF_HUB_OFFLINE="1")
    load = f"import aotpack; aotpack.load({str(tiny_package)!r}, model='tiny')"
    killed = subprocess.run([sys.executable, "-c", f"{load}; import os, signal; os.kill(os.getpid(), signal.SIGKILL)"],
                            env=env, timeout=300)
    assert killed.returncode == -signal.SIGKILL
    left = _folders(tmp_path)
    assert len(left) >= 4 and all(any(p.suffix == ".so" for p in (tmp_path / f).rglob("*")) for f in left)
    clean = subprocess.run([sys.executable, "-c", load], env=env, timeout=300, capture_output=True, text=True)
    assert clean.returncode == 0, clean.stderr[-3000:]
    assert _folders(tmp_path) == []
