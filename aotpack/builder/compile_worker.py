"""`python -m aotpack.builder.compile_worker JOB.json`: compile one program saved without its weights; prints where
the time went."""

import json
import sys
import warnings


def main() -> None:
    warnings.filterwarnings("ignore")
    spec = json.loads(open(sys.argv[1]).read())
    from .compile import compile_saved_program

    timing = compile_saved_program(spec["exported_path"], spec["package_path"], spec["inductor_configs"],
                                   spec["attention"], spec["needs_torchao"], spec["left_out"])
    print(timing.to_json(), flush=True)  # last line of the worker's log: read by the parent


if __name__ == "__main__":
    main()
