"""Adapter references (local vs Hub vs URL), the adapter cache's keys, budget, memory and threads, and the
text-encoder (CLIP) LoRA part's bookkeeping. No package is built: these run on parsed adapters and the
eager tiny pipeline."""

from __future__ import annotations

import os
import shutil
import threading

import lora_formats as formats
import pytest
import torch

from aotpack.adapters import parse_adapter
from aotpack.adapters import cache as cache_module
from aotpack.adapters.cache import AdapterCache
from aotpack.adapters.sources import adapter_source, local_path
from aotpack.adapters.text_encoder import TextEncoderLoRA
from aotpack.demo import random_lora_state_dict
from aotpack.errors import AdapterFileError, RequestError
from aotpack.models.tiny import make_pipeline

LAYER = "transformer_blocks.0.attn.to_q"


@pytest.fixture(scope="module")
def eager():
    return make_pipeline()


@pytest.fixture(scope="module")
def two(eager, tmp_path_factory):
    """Two rank-8 adapters of the same size (a retrained LoRA of the same rank)."""
    directory = tmp_path_factory.mktemp("two")
    return [formats.write(random_lora_state_dict(eager.transformer, 8, ["*attn.to_*"], seed=70 + i),
                          directory / f"v{i}.safetensors") for i in range(2)]


@pytest.fixture(scope="module")
def clip_files(eager, tmp_path_factory):
    directory = tmp_path_factory.mktemp("clip")
    clip = formats.clip_layers(eager.text_encoder)
    state = formats.peft_with_alphas(eager.transformer, clip, seed=21, strength=1.5, patterns=())
    # a large part diffusers drops (T5): the file is much larger than what the cache keeps
    state["text_encoder_2.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight"] = torch.randn(4, 1 << 16)
    state["text_encoder_2.encoder.block.0.layer.0.SelfAttention.q.lora_B.weight"] = torch.randn(32, 4)
    other = formats.peft_with_alphas(eager.transformer, clip, seed=22, strength=1.5, patterns=())
    return (formats.write(state, directory / "clip-a.safetensors"),
            formats.write(other, directory / "clip-b.safetensors"))


# -- references -----------------------------------------------------------------------------------------------
def test_a_local_folder_with_weight_name_is_read_as_diffusers_reads_it(two, tmp_path):
    """diffusers' `load_lora_weights("my_dir", weight_name="x.safetensors")` reads the folder's file; it was taken
    as Hub repo "my_dir" ("could not be found on the Hub (HFValidationError)")."""
    folder = tmp_path / "my lora dir"
    folder.mkdir()
    shutil.copy(two[0], folder / "style.safetensors")
    shutil.copy(two[1], folder / "other.safetensors")
    where = adapter_source(str(folder), weight_name="style.safetensors")
    assert not where.is_hub and local_path(where) == folder / "style.safetensors"
    assert torch.equal(parse_adapter(str(folder), weight_name="style.safetensors").layers[LAYER].A,
                       parse_adapter(two[0]).layers[LAYER].A)


def test_urls_windows_paths_and_odd_names_get_the_right_error(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(AdapterFileError, match=r"is a URL.*\n.*fix: write hf://owner/repo@v2/sub/x\.safetensors"):
        adapter_source("https://huggingface.co/owner/repo/resolve/v2/sub/x.safetensors?download=true")
    with pytest.raises(AdapterFileError, match=r"fix: write hf://owner/repo/x\.safetensors$"):
        adapter_source("https://huggingface.co/owner/repo/blob/main/x.safetensors")
    with pytest.raises(AdapterFileError, match="is a URL; aotpack reads local files and Hub files only"):
        adapter_source("s3://bucket/loras/x.safetensors")
    # no Hub file is named so: a local path that does not exist, not "Invalid HF URI 'hf://C:/Users'"
    for text in ("C:/Users/me/loras/x.safetensors", "D:\\loras/a/x.safetensors", "my loras/sub/x.safetensors",
                 "ünï/cödé/x.safetensors"):
        where = adapter_source(text)
        assert not where.is_hub, text
        with pytest.raises(AdapterFileError, match=f"adapter file {text} does not exist".replace("\\", "\\\\")):
            local_path(where)
    assert adapter_source("owner/repo@v2/x.safetensors").revision == "v2"  # still a Hub file
    # a name leaving the repository is a typed error (it was an untyped ValueError from hf_hub_download)
    with pytest.raises(AdapterFileError, match=r"'\.\./\.\./x\.safetensors', which leaves the repository"):
        adapter_source("hf://owner/repo/../../x.safetensors")
    with pytest.raises(AdapterFileError, match="is not a valid Hub file name"):
        local_path(adapter_source("owner/repo", weight_name="../x.safetensors"))


def test_an_unavailable_hub_file_says_why(monkeypatch, tmp_path):
    from huggingface_hub import constants

    from aotpack.errors import AdapterUnavailableError

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(AdapterUnavailableError, match=r"HF_HUB_OFFLINE is set.*\n.*unset HF_HUB_OFFLINE"):
        local_path(adapter_source("owner/repo/x.safetensors"))


# -- the cache --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("replace", [False, True])
def test_a_file_rewritten_with_its_size_and_mtime_kept_is_parsed_again(two, tmp_path, replace):
    """`cp -p`, `rsync -a` and `tar x` keep a file's mtime; a retrained LoRA of the same rank has the same size.
    The cache served the old weights (its key was path, size and mtime)."""
    stamp = 1_700_000_000 * 10**9
    sources = []
    for i, path in enumerate(two):
        sources.append(tmp_path / f"src{i}.safetensors")
        shutil.copy(path, sources[-1])
        os.utime(sources[-1], ns=(stamp, stamp))  # two versions saved within one timestamp tick
    served = tmp_path / "style.safetensors"
    cache = AdapterCache("cpu", torch.float32)
    shutil.copy2(sources[0], served)
    first = cache.get(served)
    if replace:
        shutil.copy2(sources[1], tmp_path / "new.safetensors")
        os.replace(tmp_path / "new.safetensors", served)
    else:
        shutil.copy2(sources[1], served)
    assert os.stat(served).st_mtime_ns == stamp and os.path.getsize(two[0]) == os.path.getsize(two[1])
    second = cache.get(served)
    assert cache.misses == 2 and second is not first
    assert torch.equal(second.layers[LAYER].A, parse_adapter(two[1]).layers[LAYER].A)


def test_an_adapter_parsed_elsewhere_is_keyed_by_the_file_it_was_parsed_from(two, tmp_path):
    """The serve prefetcher parses outside the cache lock, then adds: keyed after the parse, bytes written during
    the parse got the old weights under the new file's key for good. `key_of` before the parse keeps them apart."""
    path = tmp_path / "style.safetensors"
    shutil.copy(two[0], path)
    cache = AdapterCache("cpu", torch.float32)
    key = cache.key_of(path)
    parsed = parse_adapter(path, device="cpu", dtype=torch.float32)
    shutil.copy(two[1], path)  # rewritten while the prefetcher parsed
    os.utime(path, ns=(1, 1))
    cache.add(path, parsed, key=key)
    fresh = cache.get(path)
    assert fresh is not parsed and torch.equal(fresh.layers[LAYER].A, parse_adapter(two[1]).layers[LAYER].A)


def test_budgets_that_are_not_byte_counts_are_refused(two):
    for bad in (float("nan"), -1, "4G", True, None):
        with pytest.raises(RequestError, match=f"budget_bytes = {bad!r} is not a number of bytes"):
            AdapterCache("cpu", torch.float32, budget_bytes=bad)
    zero = AdapterCache("cpu", torch.float32, budget_bytes=0)  # 0: only the newest entry stays
    zero.get(two[0])
    zero.get(two[1])
    assert len(zero) == 1 and two[1] in zero and zero.evictions == 1


def test_the_cache_holds_and_counts_only_what_it_keeps(clip_files):
    """A CPU parse kept the CLIP parts as views of the whole file's bytes: a 4.3 MB file stayed in memory while the
    cache counted 135 kB (the budget then bounds nothing)."""
    cache = AdapterCache("cpu", torch.float32)
    adapter = cache.get(clip_files[0])
    held = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
            for t in [*adapter.text_encoder.values(), *adapter.text_encoder_alphas.values(),
                      *(x for d in adapter.layers.values() for x in (d.A, d.B))]}
    assert adapter.text_encoder and os.path.getsize(clip_files[0]) > 1 << 20
    assert sum(held.values()) <= adapter.nbytes + 4096 and cache.nbytes == adapter.nbytes


def test_threads_getting_one_adapter_share_one_parse(two, monkeypatch):
    real, calls, gate = cache_module.parse_adapter, [], threading.Barrier(4)

    def slow_parse(*args, **kwargs):
        calls.append(args[0])
        threading.Event().wait(0.3)  # the other threads arrive while this one parses
        return real(*args, **kwargs)

    monkeypatch.setattr(cache_module, "parse_adapter", slow_parse)
    cache, results, errors = AdapterCache("cpu", torch.float32), [], []

    def worker(path):
        gate.wait()
        try:
            results.append((path, cache.get(path)))
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(two[i % 2],)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(calls) == 2 and cache.misses == 2 and cache.hits == 2
    for path in two:
        parses = {id(adapter) for p, adapter in results if p == path}
        assert len(parses) == 1, path  # one Adapter (one uid) per file: its CLIP part is injected once


# -- text-encoder (CLIP) parts ----------------------------------------------------------------------------------
def _pooled(pipe):
    ids = pipe.tokenizer(["a cat"], padding="max_length", max_length=16, return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids).pooler_output.clone()


def test_one_adapter_twice_in_a_set_adds_its_clip_scales(clip_files):
    """The transformer's stack adds the two deltas; PEFT, given one adapter name twice, ran it twice at the last
    scale: (1.0, -0.5) gave the CLIP part at -1.0, not 0.5."""
    pipe, adapter = make_pipeline(), parse_adapter(clip_files[1])
    clip = TextEncoderLoRA(pipe)
    clip.activate([(adapter, 0.5)])
    half = _pooled(pipe)
    clip.activate([(adapter, 1.0), (adapter, -0.5)])
    assert clip.active == (["aotpack_te_1"], [0.5])
    assert torch.allclose(_pooled(pipe), half, atol=1e-6)
    clip.activate([])


def test_clip_parts_removed_by_diffusers_are_injected_again(clip_files):
    """After `pipe.unload_lora_weights()` (or `delete_adapters`) the text encoder has no PEFT layers; taken as still
    injected, a set ran without its CLIP part and no error said so."""
    pipe, adapter = make_pipeline(), parse_adapter(clip_files[1])
    base = _pooled(pipe)
    clip = TextEncoderLoRA(pipe)
    clip.activate([(adapter, 1.0)])
    with_lora = _pooled(pipe)
    assert (with_lora - base).abs().max() > 0.1
    pipe.unload_lora_weights()
    assert torch.equal(_pooled(pipe), base)
    clip.activate([(adapter, 1.0)])
    assert torch.allclose(_pooled(pipe), with_lora, atol=1e-6)
    pipe.delete_adapters(clip.active[0])
    clip.activate([(adapter, 1.0)])
    assert torch.allclose(_pooled(pipe), with_lora, atol=1e-6)
    clip.activate([])
    assert torch.equal(_pooled(pipe), base)
