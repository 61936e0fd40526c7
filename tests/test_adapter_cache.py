"""The adapter cache (LRU within a byte budget), cached switches that read no file, Hub sources through
the huggingface_hub cache (offline-aware), and switch times reported by `aotpack run --jobs`."""

from __future__ import annotations

import json
import os
import shutil

import lora_formats as formats
import pytest
import torch
from click.testing import CliRunner
from reference import REQUEST

from aotpack.adapters import AdapterSource, parse_adapter
from aotpack.adapters import cache as cache_module
from aotpack.adapters.cache import AdapterCache
from aotpack.cli import cli
from aotpack.demo import random_lora_state_dict
from aotpack.errors import AdapterFileError
from aotpack.models.tiny import make_transformer


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    """Four rank-8 adapters of equal size on the attention layers."""
    directory, transformer = tmp_path_factory.mktemp("cache"), make_transformer()
    return [formats.write(random_lora_state_dict(transformer, 8, ["*attn.to_*"], seed=60 + i),
                          directory / f"a{i}.safetensors") for i in range(4)]


def test_lru_evicts_least_recently_used_within_budget(loras):
    size = parse_adapter(loras[0]).nbytes
    cache = AdapterCache("cpu", torch.float32, budget_bytes=2 * size)
    a, b, c = (cache.get(p) for p in loras[:3])  # a is evicted when c arrives
    assert (cache.misses, cache.hits, cache.evictions, len(cache)) == (3, 0, 1, 2)
    assert loras[0] not in cache and loras[1] in cache and cache.nbytes <= 2 * size
    assert cache.get(loras[1]) is b and cache.hits == 1  # a hit: same object, now most recent
    cache.get(loras[0])  # a again: parsed anew, and c (now the oldest) goes
    assert loras[2] not in cache and loras[1] in cache and cache.misses == 4
    tiny = AdapterCache("cpu", torch.float32, budget_bytes=1)  # the newest entry stays even over budget
    assert tiny.get(loras[3]) is not None and len(tiny) == 1


def test_rewritten_file_is_parsed_again(loras, tmp_path):
    path = tmp_path / "changing.safetensors"
    shutil.copy(loras[0], path)
    cache = AdapterCache("cpu", torch.float32)
    first = cache.get(path)
    shutil.copy(loras[1], path)
    os.utime(path, ns=(1, 1))  # a different mtime even on coarse clocks
    second = cache.get(path)
    assert cache.misses == 2 and not torch.equal(first.layers["transformer_blocks.0.attn.to_q"].A,
                                                 second.layers["transformer_blocks.0.attn.to_q"].A)


def test_switching_to_cached_set_reads_no_file(loras, served_tiny, monkeypatch):
    served_tiny.set_loras([(loras[0], 1.0), (loras[1], 0.5)])
    with torch.no_grad():
        first = served_tiny(**REQUEST, generator=torch.Generator("cpu").manual_seed(7), output_type="latent").images
    served_tiny.set_loras([])

    def no_parse(*args, **kwargs):
        raise AssertionError("a cached adapter was parsed again")

    monkeypatch.setattr(cache_module, "parse_adapter", no_parse)
    for opener in ("builtins.open", "io.open"):  # Path.read_bytes goes through io.open
        monkeypatch.setattr(opener, lambda *a, **k: pytest.fail(f"file opened during a cached switch: {a}"))
    result = served_tiny.set_loras([(loras[0], 1.0), (loras[1], 0.5)])
    monkeypatch.undo()
    assert result.parsed == 0
    with torch.no_grad():
        again = served_tiny(**REQUEST, generator=torch.Generator("cpu").manual_seed(7), output_type="latent").images
    assert torch.equal(first, again)


def _populate_hub_cache(cache_dir, repo_id: str, files: dict[str, object], commit: str = "0" * 40):
    """The huggingface_hub cache layout: refs/main -> snapshots/<commit>/<file>."""
    repo = cache_dir / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    for name, source in files.items():
        target = repo / "snapshots" / commit / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, target)


def test_hub_adapter_from_offline_cache(loras, tmp_path, monkeypatch, served_tiny):
    from huggingface_hub import constants

    _populate_hub_cache(tmp_path, "someone/flux-style", {"style.safetensors": loras[2],
                                                         "sub/other.safetensors": loras[3]})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub = parse_adapter("someone/flux-style/style.safetensors")
    local = parse_adapter(loras[2])
    assert hub.source == "someone/flux-style/style.safetensors"
    assert torch.equal(hub.layers["transformer_blocks.0.attn.to_q"].B, local.layers["transformer_blocks.0.attn.to_q"].B)
    assert parse_adapter("someone/flux-style", weight_name="sub/other.safetensors").layers
    result = served_tiny.set_loras([(AdapterSource("someone/flux-style", "sub/other.safetensors"), 0.5)])
    assert result.adapters == [("other", 0.5)]
    with pytest.raises(AdapterFileError, match="not in the local Hugging Face cache") as unavailable:
        parse_adapter("someone/flux-style/missing.safetensors")
    from aotpack.serve.errors import http_status  # the server's network or cache, not the request: 503

    assert http_status(unavailable.value) == (503, "adapter_unavailable")


def test_hub_names_and_revisions_reach_hf_hub_download(loras, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_download(repo_id, filename, revision=None, dry_run=False, **kwargs):
        if dry_run:  # the commit lookup after a download (local files only), not a download
            raise FileNotFoundError(filename)
        calls.append((repo_id, filename, revision))
        return str(loras[0])

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    parse_adapter("owner/repo/folder/lora.safetensors")
    parse_adapter("owner/repo", weight_name="lora.safetensors", revision="v2")
    parse_adapter(AdapterSource("owner/repo", "x.safetensors", "abc123"))
    parse_adapter("hf://owner/repo@v3/sub/y.safetensors")
    assert calls == [("owner/repo", "folder/lora.safetensors", None), ("owner/repo", "lora.safetensors", "v2"),
                     ("owner/repo", "x.safetensors", "abc123"), ("owner/repo", "sub/y.safetensors", "v3")]
    cache = AdapterCache("cpu", torch.float32)
    cache.get("owner/repo/a.safetensors")
    cache.get("owner/repo/a.safetensors")  # a cached Hub adapter makes no call, not even a metadata check
    assert len(calls) == 5 and cache.hits == 1


def test_jobs_report_switch_times_and_notes(loras, tiny_package, tmp_path):
    """`aotpack run --jobs`: every request reports its LoRA switch time, file vs cache, and adapter notes."""
    from aotpack.models.tiny import make_pipeline

    eager = make_pipeline()
    mixture = formats.write(formats.mixture(eager.transformer, formats.clip_layers(eager.text_encoder)),
                            tmp_path / "mixture.safetensors")
    common = {"prompt": "a cat", "seed": 1, "steps": 1, "height": 64, "width": 64, "max_sequence_length": 16}
    jobs = [{"loras": [[str(loras[0]), 1.0]]}, {"loras": [[str(mixture), 0.8]]}, {"loras": [[str(loras[0]), 1.0]]},
            {"loras": []}]
    path = tmp_path / "jobs.jsonl"
    path.write_text("".join(json.dumps({**common, **job}) + "\n" for job in jobs))
    result = CliRunner().invoke(cli, ["run", str(tiny_package), "--jobs", str(path)])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("request ")]
    assert len(lines) == 4 and all("LoRA switch" in line and " ms " in line for line in lines)
    assert "from file" in lines[0] and "from file" in lines[1] and "cached" in lines[2]
    assert "diffusers drops" in lines[1] and "lora_unet_extra_layer" in lines[1]


def test_parsing_on_the_serving_device_gives_the_host_parse(tmp_path):
    """The cache parses on its device (the file's bytes sent there in one copy): same factors, CLIP parts
    and alphas as the host parse, in the cache's dtype, compact (not views of the file's bytes)."""
    from aotpack.models.tiny import make_pipeline

    pipe = make_pipeline()
    state = formats.peft_with_alphas(pipe.transformer, formats.clip_layers(pipe.text_encoder), seed=5)
    path = formats.write(state, tmp_path / "alphas.safetensors")
    host = parse_adapter(path)
    device = parse_adapter(path, device="cpu", dtype=torch.bfloat16)
    assert host.layers.keys() == device.layers.keys() and host.text_encoder
    for name, delta in host.layers.items():
        for ours, theirs in ((device.layers[name].A, delta.A), (device.layers[name].B, delta.B)):
            assert ours.dtype == torch.bfloat16 and torch.equal(ours, theirs.to(torch.bfloat16))
            assert ours.untyped_storage().nbytes() == ours.numel() * ours.element_size()  # its own memory
    assert host.text_encoder.keys() == device.text_encoder.keys()
    assert all(torch.equal(device.text_encoder[k], v) for k, v in host.text_encoder.items())
    assert host.text_encoder_alphas.keys() == device.text_encoder_alphas.keys()


def test_a_conversion_that_fails_on_the_device_falls_back_to_the_host_parse(tmp_path, monkeypatch):
    """diffusers' converters are written for host tensors: if one fails on the serving device (or the
    device has no room for the file), the adapter is parsed on the host instead (same result); a file
    that is really broken still gets its error."""
    from aotpack.adapters import parse as parse_module
    from aotpack.errors import AdapterFormatError
    from aotpack.models.tiny import make_transformer

    path = formats.write(random_lora_state_dict(make_transformer(), 4, ["*attn.to_*"], seed=9),
                         tmp_path / "style.safetensors")
    real_convert, calls = parse_module.convert, []

    def convert_failing_once(state_dict, source):
        calls.append(source)
        if len(calls) == 1:
            raise AdapterFormatError("a converter failed on this device", "fix")
        return real_convert(state_dict, source)

    monkeypatch.setattr(parse_module, "convert", convert_failing_once)
    adapter = parse_adapter(path, device="cpu", dtype=torch.bfloat16)
    expected = parse_adapter(path)
    assert len(calls) == 3  # the device try, its host retry, and the reference parse
    for name, delta in expected.layers.items():
        assert adapter.layers[name].A.dtype == torch.bfloat16
        assert torch.equal(adapter.layers[name].B, delta.B.to(torch.bfloat16))
    def out_of_memory(*_):
        raise torch.OutOfMemoryError("no room for the file's bytes on the device")

    monkeypatch.setattr(parse_module, "convert", real_convert)
    monkeypatch.setattr(parse_module, "_compact", out_of_memory)  # a full device: parsed on the host
    assert torch.equal(parse_adapter(path, device="cpu", dtype=torch.bfloat16).layers[name].A,
                       expected.layers[name].A.to(torch.bfloat16))
    monkeypatch.setattr(parse_module, "convert", lambda *_: (_ for _ in ()).throw(AdapterFormatError("bad", "fix")))
    with pytest.raises(AdapterFormatError, match="bad"):
        parse_adapter(path, device="cpu", dtype=torch.bfloat16)
