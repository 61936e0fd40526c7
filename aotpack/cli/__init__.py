"""The command line: thin click shells over the library (torch is imported only inside commands)."""

from .main import cli, main

__all__ = ["cli", "main"]
