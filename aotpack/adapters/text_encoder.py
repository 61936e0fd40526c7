"""Text-encoder (CLIP) LoRA parts: applied to the eager text encoder through diffusers + PEFT.

The CLIP encoder runs once per request and is not compiled, so PEFT's own adapter switching is
cheap: each adapter's CLIP part is injected once (as diffusers' `load_lora_weights` would) and a
later set only changes the active adapters and their weights (as `set_adapters` would).
"""

from __future__ import annotations

import collections

from ..errors import AdapterFormatError, AdapterLayerError

KEEP_INACTIVE = 8  # injected CLIP adapters kept for quick switching back; older ones are deleted


class TextEncoderLoRA:
    def __init__(self, pipeline):
        self.pipeline = pipeline
        self.loaded: collections.OrderedDict[int, str] = collections.OrderedDict()  # adapter uid -> PEFT name
        self.active: tuple[list[str], list[float]] | None = None  # what set_adapters got last
        self._counter = 0

    def _inject(self, adapter) -> str:
        from diffusers import FluxPipeline

        self._counter += 1
        peft_name = f"aotpack_te_{self._counter}"
        metadata = {k: v for k, v in adapter.metadata.items() if k.startswith("text_encoder.")} or None
        FluxPipeline.load_lora_into_text_encoder(
            dict(adapter.text_encoder),
            network_alphas=None if metadata else dict(adapter.text_encoder_alphas) or None,
            text_encoder=self.pipeline.text_encoder,
            prefix="text_encoder",
            adapter_name=peft_name,
            metadata=metadata,
            _pipeline=self.pipeline,
        )
        return peft_name

    def _check_targets(self, adapter) -> None:
        """Refuse CLIP parts for layers this text encoder lacks: PEFT would skip them silently."""
        from diffusers.utils import (
            convert_state_dict_to_diffusers,
            convert_state_dict_to_peft,
        )

        text_encoder = self.pipeline.text_encoder
        state = {k.removeprefix("text_encoder."): v for k, v in adapter.text_encoder.items()}
        state = convert_state_dict_to_peft(convert_state_dict_to_diffusers(state))  # as diffusers loads it
        if not hasattr(text_encoder, "text_model"):  # recent transformers flatten CLIPTextModel
            state = {k.removeprefix("text_model."): v for k, v in state.items()}
        modules = dict(text_encoder.named_modules())
        missing = sorted({k.split(".lora_")[0] for k in state} - set(modules))
        if missing:
            raise AdapterLayerError(
                f"adapter {adapter.source} has CLIP LoRA parts for {len(missing)} layers this text encoder does not "
                f"have (e.g. {missing[:3]})", "use a LoRA trained for this model's CLIP-L text encoder")

    def _apply(self, state) -> None:
        from diffusers.loaders.lora_base import (
            disable_lora_for_text_encoder,
            enable_lora_for_text_encoder,
            set_adapters_for_text_encoder,
        )

        text_encoder = self.pipeline.text_encoder
        if state is None:
            # also adapters diffusers' own load_lora_weights put there: "no LoRA" must run none
            if self.loaded or getattr(text_encoder, "peft_config", None):
                disable_lora_for_text_encoder(text_encoder)
        else:
            enable_lora_for_text_encoder(text_encoder)
            set_adapters_for_text_encoder(state[0], text_encoder, state[1])
        self.active = state

    def _delete(self, uid: int) -> None:
        # diffusers' helper, not transformers' delete_adapter (which demands a newer PEFT)
        from diffusers.utils.peft_utils import delete_adapter_layers

        delete_adapter_layers(self.pipeline.text_encoder, self.loaded.pop(uid))

    def _prune(self, keep: set[int]) -> None:
        inactive = [uid for uid in self.loaded if uid not in keep]
        for uid in inactive[: max(0, len(inactive) - KEEP_INACTIVE)]:
            self._delete(uid)

    def forget_removed(self) -> None:
        """Forget the adapters no longer in the text encoder: diffusers' own calls on the pipeline
        (`unload_lora_weights`, `delete_adapters`) or a new text encoder removed their PEFT layers. Taken as still
        there, a set holding them ran without its CLIP part and no error said so; forgotten, it injects them again."""
        text_encoder = self.pipeline.text_encoder
        if not self.loaded:
            return
        present = set(getattr(text_encoder, "peft_config", None) or {}) if text_encoder is not None else set()
        gone = [uid for uid, name in self.loaded.items() if name not in present]
        for uid in gone:
            del self.loaded[uid]
        if gone:
            self.active = None

    def activate(self, entries) -> None:
        """Make the CLIP parts of `entries` ((adapter, scale) pairs) the active text-encoder LoRAs.

        On failure the injected adapters are removed and the previous active set is restored.
        """
        self.forget_removed()
        # one adapter twice in a set (scales s1, s2) is one PEFT adapter at s1 + s2, as the transformer's stack
        # adds both deltas: given twice, PEFT ran it twice at the last scale (1.0 and -0.5 gave -1.0, not 0.5)
        summed: dict[int, list] = {}
        for adapter, scale in entries:
            if adapter.text_encoder:
                if adapter.uid in summed:
                    summed[adapter.uid][1] += float(scale)
                else:
                    summed[adapter.uid] = [adapter, float(scale)]
        wanted = [(adapter, scale) for adapter, scale in summed.values()]
        if wanted and self.pipeline.text_encoder is None:
            raise AdapterFormatError("the adapters have text-encoder (CLIP) parts but the pipeline has no CLIP "
                                     "text encoder", "load the pipeline with its text encoder")
        for adapter, _ in wanted:
            if adapter.uid not in self.loaded:
                self._check_targets(adapter)
        injected = []
        try:
            for adapter, _ in wanted:
                if adapter.uid not in self.loaded:
                    self.loaded[adapter.uid] = self._inject(adapter)
                    injected.append(adapter.uid)
                self.loaded.move_to_end(adapter.uid)
        except Exception as err:
            for uid in injected:
                self._delete(uid)
            self._apply(self.active)
            raise AdapterFormatError(f"the text-encoder part of an adapter could not be applied: {err}",
                                     "check that the adapter was trained for Flux.1's CLIP-L text encoder") from err
        state = ([self.loaded[a.uid] for a, _ in wanted], [float(s) for _, s in wanted]) if wanted else None
        self._apply(state)
        self._prune(keep={a.uid for a, _ in wanted})
