"""LoRA adapters: safe reading, every published Flux layout (via diffusers' converters), stacking,
SVD fitting, caching, and text-encoder parts. `AotpackPipeline.set_loras` is the entry point."""

from .parse import Adapter, LayerDelta, parse_adapter, parse_state_dict
from .sources import AdapterSource

__all__ = ["Adapter", "AdapterSource", "LayerDelta", "parse_adapter", "parse_state_dict"]
