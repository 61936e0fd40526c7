"""Typed errors. Every message names the offending value and says how to fix it."""

from __future__ import annotations


class AotpackError(Exception):
    """Base class: `str(err)` is the problem followed by the fix."""

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(problem if not fix else f"{problem}\n  fix: {fix}")


class UnknownTargetError(AotpackError):
    """A `--target` name that has no recipe."""


class ModelSourceError(AotpackError):
    """A model reference that cannot be loaded (bad path, not a Flux transformer, ...)."""


class ExportError(AotpackError):
    """torch.export or AOTInductor failed on a region."""


class ValidationFailedError(AotpackError):
    """The compiled programs disagree with eager beyond the recipe's tolerance."""


class ToolchainError(AotpackError):
    """The C++ toolchain produces packages that would crash at load (static libstdc++, missing compiler)."""


class EnvironmentSettingError(AotpackError):
    """Process settings read by torch that cannot work together (e.g. cuBLASLt preferred and given no workspace)."""


class ManifestError(AotpackError):
    """A package directory without a readable, supported manifest."""


class PackageIntegrityError(AotpackError):
    """A package file is missing, truncated or does not match its recorded sha256."""


class PackageMismatchError(AotpackError):
    """A package built for another model, GPU arch, torch version or device."""


class UnsupportedCallError(AotpackError):
    """A forward argument the compiled transformer cannot honour (controlnet residuals, ...)."""


class AdapterError(AotpackError):
    """Base for LoRA adapter problems; a rejected adapter never changes the active set."""


class AdapterFileError(AdapterError):
    """Unreadable, truncated, unsafe (pickle) or non-finite adapter file."""


class AdapterUnavailableError(AdapterFileError):
    """A Hub adapter that cannot be fetched now (offline, not cached, the Hub unreachable): the file may be fine."""


class AdapterFormatError(AdapterError):
    """An adapter holding parts a LoRA slot cannot represent, or an unknown layout."""


class AdapterLayerError(AdapterError):
    """An adapter targeting a layer that has no slot in the package."""


class AdapterShapeError(AdapterError):
    """An adapter whose matrices do not fit the layer's in/out features."""


class AdapterRankError(AdapterError):
    """An adapter (or stack of adapters) whose rank exceeds the package's max_rank."""


class PublishError(AotpackError):
    """Push/pull problems: missing repo, revision or target."""


class RecipeError(AotpackError):
    """A recipe file with a missing, mistyped or out-of-range field."""


class RequestError(AotpackError):
    """A generation request (CLI flags, a jobs line, an HTTP body) with a missing, mistyped or out-of-range
    field; refused before any work."""


class NonFiniteOutputError(AotpackError):
    """The generation produced NaN/Inf values; no image is written."""

    FIX = "lower the LoRA scales or use other adapters (values that large overflow the model's dtype)"

    @classmethod
    def refuse(cls, values, what: str, *, context: str = "", outcome: str = "no image was made",
               fix: str = FIX) -> None:
        """Raise when the tensor `values` (the generation's `what`: latents, pixels, ...) holds NaN/Inf: the
        one check behind the pipeline call, the VAE decode, jobs and bench quality (postprocess would turn NaN
        into a black image). One reduction and one host sync."""
        finite = values.isfinite()
        if not finite.all():
            raise cls(f"the generation produced {int((~finite).sum())} NaN/Inf {what} of {values.numel()}{context}; "
                      f"{outcome}", fix)
