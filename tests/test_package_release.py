"""`AotpackPipeline.close()`: a loaded package's weights freed now, not at process exit.

torch's AOTInductor keeps a reference to every constant bound user-managed (the runtime's zero-copy binding) and
never releases it (pytorch/pytorch#194480): on an H100 each load + drop of the default FLUX.1-dev package left 14.2 GiB
allocated (2026-12-06, benchmarks/results/2026-12-06f-h100-package-release/). The same reference shows on the CPU
as the storage's use count, which is what these tests read.
"""

from __future__ import annotations

import gc

import pytest
import torch

import aotpack
from aotpack.errors import UnsupportedCallError


def _bound(served) -> list[torch.Tensor]:
    transformer = served.transformer
    return [tensor for programs in (transformer._programs, transformer._no_slot_programs)
            for instances in programs.values() for instance in instances for tensor in instance.program.bound]


def _use_count(tensor: torch.Tensor) -> int:
    return torch._C._storage_Use_Count(tensor.untyped_storage()._cdata)


def test_a_dropped_pipeline_leaves_its_weights_referenced_and_close_frees_them(tiny_package, demo_loras):
    served = aotpack.load(tiny_package, model="tiny")
    kept = _bound(served)[0]  # one weight tensor held here: its storage's other references are what is left
    del served
    gc.collect()
    assert _use_count(kept) > 1  # AOTInductor's reference outlived the pipeline: the storage is never freed

    served = aotpack.load(tiny_package, model="tiny")
    served.set_loras([(demo_loras["tiny-style-all"], 0.8)])
    bound = _bound(served)
    unique = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in bound}
    assert len(unique) > 50 and sum(unique.values()) > 100_000  # every block weight of the tiny model
    with served:  # `with aotpack.load(...) as served:` closes on leaving
        image = served(prompt="a red fox", num_inference_steps=2, height=64, width=64, output_type="pt").images
    assert torch.isfinite(image).all()
    assert all(t.untyped_storage().nbytes() == 0 for t in bound)  # freed whatever still references them
    assert served.close() == 0  # a second close frees nothing more
    with pytest.raises(UnsupportedCallError, match="closed") as caught:
        served(prompt="a red fox", num_inference_steps=2, height=64, width=64, output_type="pt")
    assert "load the package again" in caught.value.fix
    with pytest.raises(UnsupportedCallError, match="closed"):  # no half-run switch on freed weights
        served.set_loras([(demo_loras["tiny-style-all"], 0.5)])


def test_close_leaves_another_load_of_the_package_intact(tiny_package):
    first = aotpack.load(tiny_package, model="tiny")
    second = aotpack.load(tiny_package, model="tiny")
    kwargs = dict(prompt="a red fox", num_inference_steps=2, height=64, width=64, output_type="pt",
                  generator=torch.Generator().manual_seed(0))
    before = second(**kwargs).images
    freed = first.close()
    assert freed == sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in _bound(second)}.values())
    after = second(**{**kwargs, "generator": torch.Generator().manual_seed(0)}).images
    assert torch.equal(before, after)  # the other load's weights are its own


def test_a_service_frees_the_package_it_loaded_when_it_stops(tiny_package):
    """The HTTP service's worker closes the pipeline it loaded itself once its threads have ended; a pipeline handed
    in by a loader (shared, e.g. by the serve-load bench across policies) stays open."""
    from aotpack.serve.service import Service

    own = Service(tiny_package, "tiny").start()
    assert own.worker.ready.wait(120) and own.worker.load_error is None
    served = own.worker.served
    assert own.worker.stop() is True
    assert served.transformer.closed and all(t.untyped_storage().nbytes() == 0 for t in _bound(served))

    shared = aotpack.load(tiny_package, model="tiny")
    lent = Service(tiny_package, "tiny", loader=lambda: shared).start()
    assert lent.worker.ready.wait(120) and lent.worker.load_error is None
    assert lent.worker.stop() is True
    assert not shared.transformer.closed
    image = shared(prompt="a red fox", num_inference_steps=2, height=64, width=64, output_type="pt").images
    assert torch.isfinite(image).all()


def test_a_service_whose_thread_outlives_stop_keeps_its_package_and_says_so(tiny_package, caplog):
    """A thread still running after `stop`'s timeout could be stepping the weights: they stay loaded, `stop` returns
    False and a warning names the thread; once it ends, a second `stop` frees them."""
    import threading

    from aotpack.serve.service import Service

    own = Service(tiny_package, "tiny").start()
    assert own.worker.ready.wait(120) and own.worker.load_error is None
    release = threading.Event()
    busy = threading.Thread(target=release.wait, name="busy-step", daemon=True)  # stands in for a long step
    busy.start()
    own.worker._threads.append(busy)
    with caplog.at_level("WARNING", logger="aotpack.serve"):
        assert own.worker.stop(timeout=0.2) is False
    assert "busy-step still running" in caplog.text and "stays loaded" in caplog.text
    served = own.worker.served
    assert not served.transformer.closed
    release.set()
    assert own.worker.stop() is True
    assert served.transformer.closed
