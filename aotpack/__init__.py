"""aotpack: ahead-of-time compiled Flux.1 transformers with hot-swappable LoRA slots."""

__version__ = "0.1.0"


def build(*args, **kwargs):
    """Build a package; see `aotpack.builder.build_package`."""
    from .builder.build import build_package

    return build_package(*args, **kwargs)


def load(*args, **kwargs):
    """Load a package for serving; see `aotpack.serve.load_package`."""
    from .runtime.pipeline import load_package

    return load_package(*args, **kwargs)


__all__ = ["__version__", "build", "load"]
