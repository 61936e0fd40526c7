"""What saving a program for a compile worker costs with and without its weights' bytes, and what loading it back
costs in the worker (`aotpack/builder/weightless.py`). No GPU: a program of two bf16 linears holding GB GB.

`.venv/bin/python scripts/probe_weightless_save.py [GB]` prints one JSON object (seconds, file bytes).
"""

import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from aotpack.builder.weightless import give_empty_weights, save_without_weights


def timed(action):
    started = time.perf_counter()
    result = action()
    return result, round(time.perf_counter() - started, 2)


def main(gigabytes: float) -> None:
    features = int((gigabytes * 1e9 / 4) ** 0.5)  # two square bf16 linears
    module = torch.nn.Sequential(torch.nn.Linear(features, features, bias=False),
                                 torch.nn.Linear(features, features, bias=False)).to(torch.bfloat16)
    exported = torch.export.export(module, (torch.randn(2, features, dtype=torch.bfloat16),))
    row = {"weight_gb": round(sum(p.numel() * 2 for p in module.parameters()) / 1e9, 3), "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as folder:
        whole, weightless = Path(folder) / "whole.pt2", Path(folder) / "weightless.pt2"
        _, row["save_whole_s"] = timed(lambda: torch.export.save(exported, str(whole)))
        left_out, row["save_weightless_s"] = timed(lambda: save_without_weights(exported, str(weightless)))
        row["file_whole_bytes"], row["file_weightless_bytes"] = whole.stat().st_size, weightless.stat().st_size
        _, row["load_whole_s"] = timed(lambda: torch.export.load(str(whole)))
        _, row["load_weightless_s"] = timed(lambda: give_empty_weights(torch.export.load(str(weightless)), left_out))
    print(json.dumps(row))


if __name__ == "__main__":
    main(float(sys.argv[1]) if len(sys.argv) > 1 else 1.0)
