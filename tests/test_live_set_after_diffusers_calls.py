"""What `AotpackPipeline` reports as live (`active`, `live_adapters()`, the provenance of `run --report` and the HTTP
service) after diffusers' own LoRA calls on `served.pipeline` changed what runs: unknown (None, a typed refusal),
never the set that `set_loras` made live before; the next `set_loras` makes a known set live again. Writes the merge
policy makes inside a step fold the live set itself and keep it known."""

from __future__ import annotations

import lora_formats as formats
import pytest
import torch
from reference import latents

from aotpack.errors import RequestError, UnsupportedCallError
from aotpack.runtime.jobs import adapters_used
from aotpack.runtime.merge import MERGED
from aotpack.runtime.merge_policy import MergePolicy


@pytest.fixture
def pipe(served_tiny):
    """The served pipeline's diffusers `FluxPipeline`; afterwards no diffusers adapter and no set are left."""
    yield served_tiny.pipeline
    served_tiny.pipeline.unload_lora_weights()
    served_tiny.set_loras([])
    assert served_tiny.active == []


@pytest.fixture(scope="module")
def clip_only(tmp_path_factory):
    """A LoRA file with text-encoder (CLIP) parts only: diffusers loads it without writing the slot bank."""
    from aotpack.models.tiny import make_pipeline

    eager = make_pipeline()
    state = formats.peft_with_alphas(eager.transformer, formats.clip_layers(eager.text_encoder), seed=21,
                                     strength=1.5, patterns=())
    return formats.write(state, tmp_path_factory.mktemp("clip") / "clip-only.safetensors")


def _assert_unknown(served, says: str) -> None:
    assert served.active is None and not served.live_set_known
    with pytest.raises(UnsupportedCallError, match=f"live LoRA set is unknown: .*{says}") as err:
        adapters_used(served)  # what `run --report` and the HTTP service record
    assert "set_loras" in err.value.fix


DIFFUSERS_CALLS = {
    "load_lora_weights": lambda pipe, mlp: pipe.load_lora_weights(str(mlp), adapter_name="other"),
    "set_adapters": lambda pipe, mlp: pipe.set_adapters(["m"], adapter_weights=[0.5]),
    "disable_lora": lambda pipe, mlp: pipe.disable_lora(),
    "delete_adapters": lambda pipe, mlp: pipe.delete_adapters("m"),
    "unload_lora_weights": lambda pipe, mlp: pipe.unload_lora_weights(),
    "bank.write": lambda pipe, mlp: pipe.transformer.bank.write({}),  # a writer of the bank that is not diffusers
}


@pytest.mark.parametrize("call", DIFFUSERS_CALLS)
def test_a_diffusers_lora_call_makes_the_live_set_unknown_until_set_loras(served_tiny, pipe, demo_loras, call):
    attn, mlp = demo_loras["tiny-style-attn"], demo_loras["tiny-style-mlp"]
    pipe.load_lora_weights(str(mlp), adapter_name="m")  # diffusers' adapter, for the calls that need one
    served_tiny.set_loras([(attn, 0.8)])
    assert served_tiny.active == [("tiny-style-attn", 0.8)] and served_tiny.live_set_known
    assert [a["source"] for a in adapters_used(served_tiny)] == [str(attn)]
    ours = latents(served_tiny)

    DIFFUSERS_CALLS[call](pipe, mlp)
    assert not torch.equal(latents(served_tiny), ours)  # another set runs: reporting attn would be false
    _assert_unknown(served_tiny, "slot bank was written by another caller")  # the steps since did not clear it

    served_tiny.set_loras([(attn, 0.8)])  # the same set again: written again (not skipped as already live)
    assert served_tiny.active == [("tiny-style-attn", 0.8)]
    assert [a["source"] for a in adapters_used(served_tiny)] == [str(attn)]
    assert torch.equal(latents(served_tiny), ours)


def test_a_refused_diffusers_call_changes_nothing_and_keeps_the_set_known(served_tiny, pipe, demo_loras):
    served_tiny.set_loras([(demo_loras["tiny-style-attn"], 0.8)])
    with pytest.raises(UnsupportedCallError, match="fuse_lora"):
        pipe.fuse_lora()
    with pytest.raises(RequestError, match="not finite"):  # refused before the bank is written
        pipe.transformer.set_adapters(["x"], weights=[float("nan")])
    assert served_tiny.active == [("tiny-style-attn", 0.8)] and served_tiny.live_set_known


def test_a_clip_only_adapter_loaded_by_diffusers_makes_the_live_set_unknown(served_tiny, pipe, clip_only):
    served_tiny.set_loras([])
    base = latents(served_tiny)
    writes = served_tiny.transformer.bank.writes
    pipe.load_lora_weights(str(clip_only), adapter_name="c")
    assert served_tiny.transformer.bank.writes == writes  # the bank is not written: the text encoder is
    assert not torch.equal(latents(served_tiny), base)  # but what runs changed
    _assert_unknown(served_tiny, r"text encoder runs LoRA adapters \['c'\]")
    served_tiny.set_loras([])  # "no LoRA" runs none, diffusers' CLIP adapter included: known again
    assert served_tiny.active == [] and torch.equal(latents(served_tiny), base)


def test_a_merge_the_policy_makes_in_a_step_keeps_the_set_known(served_tiny, pipe, demo_loras):
    modes = served_tiny.transformer.lora_modes
    mlp = demo_loras["tiny-style-mlp"]
    modes.auto.policy = MergePolicy.parse("always", "cpu")
    try:
        served_tiny.set_loras([(mlp, 0.7)])
        writes = served_tiny.transformer.bank.writes
        latents(served_tiny)
        assert modes.mode == MERGED and served_tiny.transformer.bank.writes > writes  # the merge wrote the bank
        assert served_tiny.active == [("tiny-style-mlp", 0.7)]
        assert [a["source"] for a in adapters_used(served_tiny)] == [str(mlp)]
        pipe.load_lora_weights(str(demo_loras["tiny-style-attn"]), adapter_name="a")  # unmerges, writes attn
        assert modes.mode != MERGED
        _assert_unknown(served_tiny, "slot bank was written by another caller")
    finally:
        modes.auto.policy = MergePolicy()


def test_the_serve_worker_switches_again_once_someone_else_changed_the_live_set(served_tiny, pipe, demo_loras):
    """The HTTP worker skips `set_loras` for a batch of the set it made live last; after another writer of the bank
    it must not: the batch would run (and report) a set it did not ask for."""
    from aotpack.serve.metrics import Metrics
    from aotpack.serve.registry import AdapterRegistry
    from aotpack.serve.worker import Worker

    registry = AdapterRegistry()
    registry.add("attn", str(demo_loras["tiny-style-attn"]), trusted=True)  # as --lora NAME=PATH
    worker = Worker(lambda: served_tiny, registry, scheduler=None, metrics=Metrics(), prefetch=False)
    worker.served = served_tiny
    wanted = (("attn", 0.8),)
    assert worker._switch(wanted)["switch_copy_ms"] is not None
    ours = latents(served_tiny)
    assert worker._switch(wanted)["switch_copy_ms"] is None  # the live set: no switch
    pipe.load_lora_weights(str(demo_loras["tiny-style-mlp"]), adapter_name="m")
    assert worker._switch(wanted)["switch_copy_ms"] is not None  # switched again, not skipped
    assert served_tiny.active == [("tiny-style-attn", 0.8)] and torch.equal(latents(served_tiny), ours)
