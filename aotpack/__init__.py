"""aotpack: ahead-of-time compiled Flux.1 transformers with hot-swappable LoRA slots."""

__version__ = "0.1.0"


def build(*args, **kwargs):
    """Build a package; see `aotpack.builder.build_package`."""
    from .builder.build import build_package

    return build_package(*args, **kwargs)


def load(*args, **kwargs):
    """Load a package for serving; see `aotpack.runtime.pipeline.load_package`."""
    from .runtime.pipeline import load_package

    return load_package(*args, **kwargs)


def apply(pipe, package, **kwargs):
    """Swap a diffusers `FluxPipeline`'s transformer for a package's compiled one, bound to its weights;
    see `aotpack.runtime.pipeline.apply`."""
    from .runtime.pipeline import apply as apply_package

    return apply_package(pipe, package, **kwargs)


def __getattr__(name: str):
    if name == "AotpackFluxTransformer":  # imported on first use: `import aotpack` stays light
        from .runtime.pipeline import AotpackFluxTransformer

        return AotpackFluxTransformer
    raise AttributeError(f"module 'aotpack' has no attribute {name!r}")


__all__ = ["AotpackFluxTransformer", "__version__", "apply", "build", "load"]
