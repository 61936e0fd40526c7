"""`python -m aotpack.builder.compile_worker JOB.json`: compile one program saved without its weights; prints where
the time went."""

import json
import sys
import time
import warnings


def main() -> None:
    started = time.perf_counter()
    warnings.filterwarnings("ignore")
    spec = json.loads(open(sys.argv[1]).read())
    from .compile import compile_saved_program  # torch and aotpack's ops: the worker's imports, timed

    timing = compile_saved_program(spec["exported_path"], spec["package_path"], spec["inductor_configs"],
                                   spec["attention"], spec["needs_torchao"], spec["left_out"],
                                   imports_seconds=time.perf_counter() - started)
    print(timing.to_json(), flush=True)  # last line of the worker's log: read by the parent


if __name__ == "__main__":
    main()
