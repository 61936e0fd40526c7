"""What the CLI shows: library chatter kept off the terminal unless AOTPACK_DEBUG is set."""

from __future__ import annotations

import os

DEBUG = os.environ.get("AOTPACK_DEBUG", "") not in ("", "0")


def quiet_libraries() -> None:
    """Keep library chatter (deprecations, torchao kernel probes) off the user's terminal."""
    if DEBUG:
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    for name in ("torchao", "diffusers", "transformers", "torch._inductor", "torch._export", "torch.export"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.set_verbosity_error()
        diffusers_logging.disable_progress_bar()
    except ImportError:
        pass
