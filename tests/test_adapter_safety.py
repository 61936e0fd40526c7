"""Safe loading: only safetensors are read, hostile pickles never run, broken files get typed errors,
and a rejected adapter set leaves the active one exactly as it was (bit-identical latents)."""

from __future__ import annotations

import json
import os
import pickle
import random
import struct
import threading

import lora_formats as formats
import pytest
import torch
from click.testing import CliRunner
from reference import REQUEST

from aotpack.adapters import parse_adapter
from aotpack.adapters.text_encoder import TextEncoderLoRA
from aotpack.cli import cli
from aotpack.errors import (
    AdapterError,
    AdapterFileError,
    AdapterFormatError,
    AdapterLayerError,
    AdapterRankError,
    AdapterShapeError,
)
from aotpack.models.tiny import make_pipeline, make_transformer


class Hostile:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def hostile_files(directory, marker) -> dict[str, object]:
    payload = {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": Hostile(marker)}
    raw, raw_v0 = pickle.dumps(payload), pickle.dumps(payload, protocol=0)
    torch.save(payload, directory / "hostile.pt")  # torch.save pickles inside a zip archive
    zipped = (directory / "hostile.pt").read_bytes()
    files = {"pickle.bin": raw, "pickle.safetensors": raw, "pickle-protocol0.safetensors": raw_v0,
             "torch-save.pt": zipped, "torch-save.safetensors": zipped, "pickle.ckpt": raw}
    for name, data in files.items():
        (directory / name).write_bytes(data)
    return {name: directory / name for name in files}


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    from aotpack.demo import random_lora_state_dict

    path = tmp_path_factory.mktemp("good") / "good.safetensors"
    return formats.write(random_lora_state_dict(make_transformer(), 4, ["transformer_blocks.*"], seed=3), path)


def test_hostile_pickles_are_refused_and_never_run(tmp_path):
    marker = tmp_path / "MARKER"
    files = hostile_files(tmp_path, marker)
    control = tmp_path / "CONTROL"  # prove the payload is live: unpickling it does run the command
    pickle.loads(pickle.dumps(Hostile(control)))
    assert control.exists()
    for name, path in files.items():
        with pytest.raises(AdapterFileError, match="pickle|torch.save"):
            parse_adapter(path)
        assert not marker.exists(), f"{name} was unpickled"


def test_hostile_pickle_through_set_loras_and_cli(tmp_path, served_tiny, tiny_package, lora):
    marker = tmp_path / "MARKER"
    files = hostile_files(tmp_path, marker)
    served_tiny.set_loras([(lora, 1.0)])
    before = _latents(served_tiny)
    for path in files.values():
        with pytest.raises(AdapterFileError):
            served_tiny.set_loras([(lora, 1.0), (path, 1.0)])
    assert torch.equal(_latents(served_tiny), before) and not marker.exists()
    for name in ("pickle.bin", "pickle.safetensors"):
        result = CliRunner().invoke(cli, ["run", str(tiny_package), "--prompt", "a cat", "--steps", "1", "--height",
                                          "64", "--width", "64", "--max-sequence-length", "16", "--lora",
                                          str(files[name])])
        assert result.exit_code != 0 and "pickle" in result.output + str(result.exception)
    assert not marker.exists()


def test_hub_pickle_is_refused_before_download(monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: pytest.fail("download attempted"))
    with pytest.raises(AdapterFileError, match="pickle"):
        parse_adapter("owner/repo/adapter.bin")


def _corrupt(path, kind: str):
    data = path.read_bytes()
    if kind == "truncated":
        path.write_bytes(data[: len(data) - 100])
    elif kind == "header_garbage":
        (length,) = struct.unpack("<Q", data[:8])
        path.write_bytes(data[:8] + b"{" + b"\xff" * (length - 1) + data[8 + length:])
    elif kind == "random_bytes":  # seeded, and not starting like a pickle (that has its own message)
        path.write_bytes(b"B" + random.Random(4096).randbytes(4095))
    elif kind == "empty":
        path.write_bytes(b"")
    return path


@pytest.mark.parametrize("kind", ["truncated", "header_garbage", "random_bytes", "empty"])
def test_broken_files_get_typed_errors(kind, lora, tmp_path):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(lora.read_bytes())
    with pytest.raises(AdapterFileError, match="download the file again"):
        parse_adapter(_corrupt(path, kind))


def test_valid_file_whose_header_length_starts_like_a_pickle(tmp_path):
    """A header length whose first byte is 0x80 (pickle's PROTO opcode) is still a valid safetensors file."""
    state = {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(2, 32),
             "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(32, 2)}
    for pad in range(300):
        path = formats.write(state, tmp_path / "x.safetensors", metadata={"pad": "p" * pad})
        if path.read_bytes()[:1] == b"\x80":
            break
    assert path.read_bytes()[:2] in (b"\x80\x00", b"\x80\x01"), "no header length of the wanted form was found"
    assert set(parse_adapter(path).layers) == {"transformer_blocks.0.attn.to_q"}


def test_tensors_read_as_safetensors_reads_them_with_mixed_dtypes_and_odd_offsets(tmp_path):
    """The loader's own views of the file: same keys, dtypes and values as safetensors' load_file, also
    for a float32 tensor that starts at an odd byte (after 3 bf16 values) and a zero-element tensor."""
    from safetensors.torch import load_file, save_file

    from aotpack.adapters.files import load_safetensors

    state = {"a.bf16": torch.randn(3, dtype=torch.bfloat16), "b.f32": torch.randn(2, 5),
             "c.f16": torch.randn(4, 1, dtype=torch.float16), "d.empty": torch.zeros(0, 7),
             "e.i64": torch.arange(5), "f.fp8": torch.randn(6).to(torch.float8_e4m3fn)}
    save_file(state, str(tmp_path / "mixed.safetensors"))
    ours, _ = load_safetensors(tmp_path / "mixed.safetensors")
    theirs = load_file(str(tmp_path / "mixed.safetensors"))
    assert list(ours) == sorted(theirs)
    for key, tensor in theirs.items():
        assert ours[key].dtype == tensor.dtype and ours[key].shape == tensor.shape, key
        assert torch.equal(ours[key].view(torch.uint8), tensor.view(torch.uint8)), key
    # save_file orders tensors so they stay aligned; other writers need not: bf16 x 3, then a float32
    header = {"x": {"dtype": "BF16", "shape": [3], "data_offsets": [0, 6]},
              "y": {"dtype": "F32", "shape": [2], "data_offsets": [6, 14]}}
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    x, y = state["a.bf16"], torch.tensor([1.5, -2.25])
    (tmp_path / "odd.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + x.view(torch.uint8).numpy()
                                               .tobytes() + y.numpy().tobytes())
    odd, _ = load_safetensors(tmp_path / "odd.safetensors")
    assert torch.equal(odd["x"], x) and torch.equal(odd["y"], y)


def _rewrite_header(path, edit):
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + length:])
    return path


@pytest.mark.parametrize("edit, message", [
    (lambda h: h[next(k for k in h if k.endswith("lora_A.weight"))].update(shape=[999, 32]), "needs"),
    (lambda h: h[next(k for k in h if k.endswith("lora_A.weight"))].update(dtype="Q7"), "'Q7'"),
    (lambda h: h[next(k for k in h if k.endswith("lora_A.weight"))]["data_offsets"].__setitem__(0, 1), "needs"),
])
def test_a_header_that_lies_about_its_tensors_is_refused(lora, tmp_path, edit, message):
    path = tmp_path / "lying.safetensors"
    path.write_bytes(lora.read_bytes())
    with pytest.raises(AdapterFileError, match=message) as caught:
        parse_adapter(_rewrite_header(path, edit))
    assert "download the file again" in caught.value.fix


def _bad_adapters(lora, directory) -> dict[str, tuple[object, type]]:
    from safetensors.torch import load_file

    good = load_file(str(lora))
    key_a = "transformer.transformer_blocks.0.attn.to_q.lora_A.weight"
    key_b = key_a.replace("lora_A", "lora_B")
    cases = {
        "nan": ({**good, key_a: torch.full_like(good[key_a], float("nan"))}, AdapterFileError),
        "inf": ({**good, key_b: torch.full_like(good[key_b], float("inf"))}, AdapterFileError),
        "wrong_in_features": ({**good, key_a: torch.randn(4, 33), key_b: torch.randn(32, 4)}, AdapterShapeError),
        "rank_mismatch": ({**good, key_a: torch.randn(5, 32)}, AdapterFormatError),
        "above_max_rank": ({key_a: torch.randn(40, 32), key_b: torch.randn(32, 40)}, AdapterRankError),
        "foreign_layer": ({"transformer.transformer_blocks.9.attn.to_q.lora_A.weight": torch.randn(2, 32),
                           "transformer.transformer_blocks.9.attn.to_q.lora_B.weight": torch.randn(32, 2)},
                          AdapterLayerError),
        "sd_unet_lora": ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.randn(2, 32),
                          "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.randn(32, 2)},
                         AdapterFormatError),
        "bad_metadata": (good, AdapterFileError),
    }
    paths = {}
    for name, (state, error) in cases.items():
        metadata = {"lora_adapter_metadata": "{not json"} if name == "bad_metadata" else None
        paths[name] = (formats.write(state, directory / f"{name}.safetensors", metadata=metadata), error)
    paths["missing_file"] = (directory / "missing.safetensors", AdapterFileError)
    return paths


def _latents(served):
    with torch.no_grad():
        return served(**REQUEST, generator=torch.Generator("cpu").manual_seed(7), output_type="latent").images


def test_rejected_sets_leave_the_active_set_bit_identical(lora, tmp_path, served_tiny):
    served_tiny.set_loras([(lora, 0.7)])
    before, bank = _latents(served_tiny), {k: v.clone() for k, v in served_tiny.transformer.bank.tensors.items()}
    for name, (path, error) in _bad_adapters(lora, tmp_path).items():
        with pytest.raises(error) as caught:
            served_tiny.set_loras([(lora, 1.0), (path, 1.0)])
        assert isinstance(caught.value, AdapterError) and "fix:" in str(caught.value), name
        assert served_tiny.active == [("good", 0.7)], name
        assert all(torch.equal(bank[k], v) for k, v in served_tiny.transformer.bank.tensors.items()), name
    assert torch.equal(_latents(served_tiny), before)


def test_text_encoder_failure_mid_set_restores_clip(tmp_path, served_tiny, monkeypatch):
    """A CLIP part that fails inside PEFT after another was injected: both removed, previous CLIP set back."""
    eager = make_pipeline()
    clip = formats.clip_layers(eager.text_encoder)
    first = formats.write(formats.peft_with_alphas(eager.transformer, clip, seed=31, patterns=("proj_out",)),
                          tmp_path / "first.safetensors")
    second = formats.write(formats.peft_with_alphas(eager.transformer, clip, seed=32, patterns=("proj_out",)),
                           tmp_path / "second.safetensors")
    third = formats.write(formats.peft_with_alphas(eager.transformer, clip, seed=33, patterns=("proj_out",)),
                          tmp_path / "third.safetensors")
    served_tiny.set_loras([(first, 1.0)])
    before = _latents(served_tiny)
    inject = TextEncoderLoRA._inject

    def failing_inject(self, adapter):
        if adapter.name == "third":
            raise RuntimeError("simulated PEFT failure")
        return inject(self, adapter)

    monkeypatch.setattr(TextEncoderLoRA, "_inject", failing_inject)
    with pytest.raises(AdapterFormatError, match="simulated PEFT failure"):
        served_tiny.set_loras([(second, 1.0), (third, 1.0)])
    assert torch.equal(_latents(served_tiny), before)
    assert served_tiny.active == [("first", 1.0)]


def _parse_within(path, seconds: float):
    """The error `parse_adapter(path)` raises; fails the test if parsing is still running after `seconds`."""
    outcome = {}

    def parse():
        try:
            parse_adapter(path)
        except Exception as err:  # noqa: BLE001 - handed to the test
            outcome["error"] = err

    thread = threading.Thread(target=parse, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"parsing {path.name} did not end within {seconds} s"
    return outcome.get("error")


@pytest.mark.parametrize("alpha", [-4.0, 0.0])
@pytest.mark.parametrize("layout", ["kohya", "mixture"])
def test_non_positive_alpha_is_refused(layout, alpha, tmp_path):
    """diffusers' kohya and mixture converters split alpha / rank in a loop that never ends for alpha < 0 (and
    alpha 0 silently zeroes the layer): refused before conversion, at once."""
    transformer = make_transformer()
    state = formats.kohya(dict(transformer.config), skip=("linear1",)) if layout == "kohya" else \
        formats.mixture(transformer, unet_keys=False)
    key = sorted(k for k in state if k.endswith(".alpha"))[3]
    state[key] = torch.tensor(alpha)
    error = _parse_within(formats.write(state, tmp_path / f"{layout}.safetensors"), 120)
    assert isinstance(error, AdapterFormatError), error
    assert key in str(error) and f"= {alpha:g}" in str(error) and error.fix


def test_rank_zero_text_alphas_and_lone_factors_get_typed_errors_that_say_so(lora, tmp_path):
    """A review found these as a ZeroDivisionError, a ValueError and "holds no Flux LoRA layers"."""
    from safetensors.torch import load_file

    good = load_file(str(lora))
    key_a = "transformer.transformer_blocks.0.attn.to_q.lora_A.weight"
    key_b = key_a.replace("lora_A", "lora_B")
    cases = {
        "rank0": ({key_a: torch.randn(0, 32), key_b: torch.randn(32, 0)}, None, "rank 0"),
        "only_a": ({key_a: good[key_a]}, None, "have lora_A but no lora_B"),
        "text_alpha": (good, {"transformer.lora_alpha": "abc"}, "LoRA alpha 'abc', not a finite number"),
        "nan_alpha": (good, {"transformer.lora_alpha": float("nan")}, "not a finite number"),
    }
    for name, (state, meta, says) in cases.items():
        metadata = {"lora_adapter_metadata": json.dumps(meta)} if meta else None
        path = formats.write(state, tmp_path / f"{name}.safetensors", metadata=metadata)
        with pytest.raises(AdapterFormatError, match=says):
            parse_adapter(path)
