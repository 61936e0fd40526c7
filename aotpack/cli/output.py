"""What the CLI shows: aotpack's log on stderr at the chosen verbosity, known library chatter filtered
narrowly (by category and module), errors as one message unless AOTPACK_DEBUG is set."""

from __future__ import annotations

import logging
import os
import sys

DEBUG = os.environ.get("AOTPACK_DEBUG", "") not in ("", "0")
LEVELS = {"quiet": logging.WARNING, "normal": logging.INFO, "verbose": logging.DEBUG}
# Libraries whose deprecation/future notices are about their own internals, not the user's call.
_CHATTY_MODULES = r"(diffusers|transformers|torchao|torch|peft|huggingface_hub|accelerate)(\.|$)"
_cli_handler: logging.Handler | None = None


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        return message if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {message}"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at emit time (click's test runner swaps it per invocation)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):  # StreamHandler.__init__ assigns one; the property always follows sys.stderr
        pass


def configure_logging(verbosity: str = "normal") -> None:
    """Send the "aotpack" loggers to stderr at `verbosity` (quiet | normal | verbose)."""
    global _cli_handler
    logger = logging.getLogger("aotpack")
    if _cli_handler is None:
        _cli_handler = _StderrHandler()
        _cli_handler.setFormatter(_Formatter("%(message)s"))
        logger.addHandler(_cli_handler)
    logger.setLevel(logging.DEBUG if DEBUG else LEVELS[verbosity])
    if verbosity == "quiet":
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def quiet_libraries() -> None:
    """Keep known library chatter (deprecations inside diffusers/transformers, torchao kernel probes) off the
    user's terminal; warnings from other code (and aotpack's own) still show."""
    if DEBUG:
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    import warnings

    for category in (FutureWarning, DeprecationWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category, module=_CHATTY_MODULES)
    for name in ("torchao", "diffusers", "transformers", "torch._inductor", "torch._export", "torch.export",
                 "torch.utils._pytree"):  # torchao registers enums the deprecated way at import
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.set_verbosity_error()
        diffusers_logging.disable_progress_bar()
    except ImportError:
        pass
