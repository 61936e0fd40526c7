"""The serving process's parts without HTTP: a request refused while the package loads, a failing batch that
fails only its faulty request, and the adapter directory's names (skipped, or a clash refused)."""

from __future__ import annotations

import pytest

from aotpack.serve.errors import AdapterNotAllowedError, NotReadyError


def test_requests_are_refused_while_loading_and_after_a_failed_load(tiny_package):
    from aotpack.errors import ModelSourceError
    from aotpack.serve.service import Service

    service = Service(tiny_package, loader=lambda: None)  # never started: the package is "loading"
    body = {"prompt": "a", "size": "64x64", "steps": 2}
    with pytest.raises(NotReadyError, match="still loading"):
        service.submit(body)
    assert service.scheduler.depth == 0  # nothing queued behind the load
    service.worker.load_error = ModelSourceError("no such model 'x'", "pass --model")
    with pytest.raises(NotReadyError) as refused:
        service.submit(body)
    assert refused.value.problem == "the package failed to load: no such model 'x'"  # the reason, not its fix


def test_a_failing_batch_fails_only_its_faulty_request(monkeypatch, tiny_package):
    from aotpack.serve import worker as worker_module
    from aotpack.serve.generate import BatchOutput
    from aotpack.serve.service import Service

    calls = []

    def fake_generate(served, params, items):  # a prompt the model cannot take fails the whole batch
        calls.append([prompt for prompt, _ in items])
        if any(prompt == "bad" for prompt, _ in items):
            raise TypeError("TextEncodeInput must be Union[...]")
        return BatchOutput([f"image of {prompt} {seed}" for prompt, seed in items], 0.01, 0.0)

    class NoLoRA:  # what the worker reads of a loaded pipeline when no set is active
        live_set_known = True

        def live_adapters(self):
            return []

    monkeypatch.setattr(worker_module, "generate", fake_generate)
    service = Service(tiny_package, loader=lambda: None)
    service.worker.served = NoLoRA()  # as if loaded
    service.worker.ready.set()
    jobs = [service.submit({"prompt": prompt, "size": "64x64", "steps": 2, "seed": 5}) for prompt in
            ("good", "bad", "fine")]
    batch = service.scheduler.next_batch((), timeout=0)
    assert batch == jobs  # one key: one batch of three
    service.worker._run_batch(batch)
    assert calls == [["good", "bad", "fine"], ["good"], ["bad"], ["fine"]]
    assert jobs[0].future.result()["images"] == ["image of good 5"]
    assert jobs[2].future.result()["images"] == ["image of fine 5"]
    with pytest.raises(TypeError):
        jobs[1].future.result()
    assert jobs[0].future.result()["size"] == "64x64" and jobs[0].future.result()["notes"] == []


def test_adapter_directory_skips_unusable_names_and_refuses_a_clash(tmp_path, demo_loras, caplog):
    import shutil

    from aotpack.serve.registry import AdapterRegistry

    folder = tmp_path / "loras"
    folder.mkdir()
    shutil.copy(demo_loras["tiny-style-attn"], folder / "style.safetensors")
    shutil.copy(demo_loras["tiny-style-mlp"], folder / "my lora.safetensors")
    (folder / "two").mkdir()  # a folder of two files names no one adapter (listing it failed every GET)
    for name in ("a", "b"):
        shutil.copy(demo_loras["tiny-style-mlp"], folder / "two" / f"{name}.safetensors")
    registry = AdapterRegistry()
    with caplog.at_level("WARNING", logger="aotpack.serve"):
        assert registry.add_directory(folder) == ["style"]
    assert "my lora.safetensors" in caplog.text and "rename" in caplog.text
    assert "two is not registered" in caplog.text and "holds 2 .safetensors files" in caplog.text

    (folder / "style").mkdir()
    shutil.copy(demo_loras["tiny-style-all"], folder / "style" / "pytorch_lora_weights.safetensors")
    with pytest.raises(AdapterNotAllowedError, match="would both be the adapter 'style'"):
        AdapterRegistry().add_directory(folder)


def test_a_source_with_a_nul_byte_is_refused_as_a_path(tmp_path):
    from aotpack.serve.registry import AdapterRegistry

    registry = AdapterRegistry()
    registry._roots.append(tmp_path)
    with pytest.raises(AdapterNotAllowedError, match="not a usable path"):
        registry.resolve("x", str(tmp_path / "a\0.safetensors"))
