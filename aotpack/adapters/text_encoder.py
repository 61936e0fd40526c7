"""Text-encoder (CLIP) LoRA parts: applied to the eager text encoder through diffusers + PEFT.

The CLIP encoder runs once per request and is not compiled, so PEFT's own adapter switching is
cheap enough; each adapter is injected once and later sets only change the active names/weights.
"""

from __future__ import annotations

from ..errors import AdapterFormatError


class TextEncoderLoRA:
    def __init__(self, pipeline):
        self.pipeline = pipeline
        self.loaded: dict[tuple, str] = {}  # (adapter name, source) -> PEFT adapter name
        self.active = False

    def _inject(self, adapter) -> str:
        from diffusers import FluxPipeline

        peft_name = f"aotpack_te_{len(self.loaded)}"
        FluxPipeline.load_lora_into_text_encoder(
            dict(adapter.text_encoder),
            network_alphas=dict(adapter.text_encoder_alphas) or None,
            text_encoder=self.pipeline.text_encoder,
            prefix="text_encoder",
            adapter_name=peft_name,
            metadata={k: v for k, v in adapter.metadata.items() if k.startswith("text_encoder.")} or None,
            _pipeline=self.pipeline,
        )
        return peft_name

    def activate(self, entries) -> None:
        """Make the CLIP parts of `entries` ((adapter, scale) pairs) the active text-encoder LoRAs."""
        from diffusers.loaders.lora_base import (disable_lora_for_text_encoder, enable_lora_for_text_encoder,
                                                 set_adapters_for_text_encoder)

        wanted = [(adapter, scale) for adapter, scale in entries if adapter.text_encoder]
        text_encoder = self.pipeline.text_encoder
        if wanted and text_encoder is None:
            raise AdapterFormatError("the adapters have text-encoder (CLIP) parts but the pipeline has no CLIP "
                                     "text encoder", "load the pipeline with its text encoder")
        injected = []
        try:
            for adapter, _ in wanted:
                key = (adapter.name, adapter.source)
                if key not in self.loaded:
                    self.loaded[key] = self._inject(adapter)
                    injected.append(key)
        except Exception as err:
            for key in injected:
                text_encoder.delete_adapter(self.loaded.pop(key))
            raise AdapterFormatError(f"the text-encoder part of an adapter could not be applied: {err}",
                                     "check that the adapter was trained for Flux.1's CLIP-L text encoder") from err
        if wanted:
            enable_lora_for_text_encoder(text_encoder)
            set_adapters_for_text_encoder([self.loaded[(a.name, a.source)] for a, _ in wanted], text_encoder,
                                          [scale for _, scale in wanted])
            self.active = True
        elif self.active:
            disable_lora_for_text_encoder(text_encoder)
            self.active = False
