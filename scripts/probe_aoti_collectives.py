"""Do AOTInductor programs with functional collectives inside compile, load and run? (issue 12, item 1)

    .venv/bin/python scripts/probe_aoti_collectives.py [OUT_DIR]

Two gloo ranks on the CPU each export a module whose forward holds a functional all-to-all
(`torch.distributed._functional_collectives.all_to_all_single`, the op a one-program-per-block
context-parallel design would compile in). Each rank compiles it with AOTInductor, loads the package and
runs it, and compares the result with what the exchange must give and with the eager module. Prints one
line per rank: the stage reached and the outcome. This is a record of what torch does, not a part of
aotpack. 2026-12-01, torch 2.13.0 CPU, 2 cores: both ranks compiled, loaded and ran it right (31 s).
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import traceback


def _rank(rank: int, world_size: int, port: int, out: str) -> None:
    import torch
    import torch.distributed as dist
    import torch.distributed._functional_collectives as fc

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)

    class Exchange(torch.nn.Module):
        def forward(self, x):
            y = fc.all_to_all_single(x, None, None, group=dist.group.WORLD)  # equal splits along dim 0
            return torch.sin(y) * 2

    x = torch.arange(8.0).reshape(4, 2) + 10 * rank
    stage = "export"
    try:
        program = torch.export.export(Exchange(), (x,))
        stage = "compile"
        path = torch._inductor.aoti_compile_and_package(program, package_path=os.path.join(out, f"rank{rank}.pt2"))
        stage = "load"
        runner = torch._inductor.aoti_load_package(path)
        stage = "run"
        compiled = runner(x)
        eager = Exchange()(x)
        # what the exchange must give: row block j of every rank's x, from rank j (x is 4 x 2, 2 rows each)
        expected = torch.sin(torch.cat([torch.arange(8.0).reshape(4, 2)[2 * rank:2 * rank + 2] + 10 * j
                                        for j in range(world_size)])) * 2
        # allclose, not equal: the compiled sin is vectorised differently from eager's
        print(f"rank {rank}: compiled, loaded and ran; compiled right: {torch.allclose(compiled, expected)}; "
              f"eager right: {torch.allclose(eager, expected)}; max |compiled - eager| "
              f"{float((compiled - eager).abs().max()):.1e}", flush=True)
    except Exception as err:  # noqa: BLE001 -- the probe reports whatever torch raises
        last = traceback.format_exc().strip().splitlines()[-1]
        print(f"rank {rank}: failed at {stage}: {type(err).__name__}: {str(err)[:300]} ({last[:200]})", flush=True)
    finally:
        dist.destroy_process_group()


def main() -> None:
    import torch.multiprocessing as mp

    out = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="aoti-collectives-")
    os.makedirs(out, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_rank, args=(2, port, out), nprocs=2, join=True, start_method="spawn")


if __name__ == "__main__":
    main()
