"""`python -m aotpack ...` is the `aotpack` command (the GPU machine runs it this way, uninstalled)."""

from .cli.main import main

if __name__ == "__main__":
    main()
