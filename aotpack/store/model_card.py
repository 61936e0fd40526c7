"""The package repo's README.md: front matter, a table of targets and a usage snippet.

Rewritten from the merged index on every push. What a person wrote around the generated block
(and any front matter keys they added) is kept, so a card edited on the Hub survives pushes.
"""

from __future__ import annotations

import re

import yaml

from ..errors import PublishError

BEGIN = "<!-- aotpack:begin (written by `aotpack push` from aotpack_index.json; edits inside are replaced) -->"
END = "<!-- aotpack:end -->"
TAGS = ["aotpack", "flux", "aotinductor", "torch-export", "lora"]
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


def _model_argument(model: dict) -> str:
    """The `--model` value that binds the weights the package was built for."""
    from ..models.tiny import TINY_MODEL_ID

    model_id = model.get("id") or "MODEL"
    if model_id == TINY_MODEL_ID:
        return "tiny"
    if model_id.startswith("/"):  # built from a local directory: the reader has their own copy
        return "/path/to/flux-model"
    return model_id


def _hub_model_ids(index: dict) -> list[str]:
    ids = {entry["model"].get("id") for entry in index["targets"].values()}
    return sorted(i for i in ids if i and _HUB_ID.fullmatch(i) and _model_argument({"id": i}) == i)


def _size(nbytes: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if nbytes < 1024 or unit == "GB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    raise AssertionError("unreachable")


def _targets_table(index: dict) -> str:
    rows = ["| target | GPU arch | torch | CUDA | model | fingerprint | max rank | quantization | attention | size "
            "| built | pushed |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, e in sorted(index["targets"].items()):
        rows.append(f"| `{name}` | {e.get('gpu_arch') or e.get('device')} | {e.get('torch')} | {e.get('cuda') or '-'} "
                    f"| {e['model'].get('id')} | `{(e['model'].get('fingerprint') or '')[:12]}` | {e.get('max_rank')} "
                    f"| {e.get('quantization')} | {e.get('attention')} | {_size(e.get('bytes', 0))} "
                    f"| {(e.get('built') or '')[:10]} | {(e.get('pushed') or '')[:10]} |")
    return "\n".join(rows)


def _install_line(index: dict) -> str:
    """`pip install aotpack`, with the fp8 extra where a target needs it (torchao for FP8 weights, the cuDNN
    frontend for FP8 attention): without it such a package is refused at load."""
    needs_fp8 = any(e.get("quantization") not in (None, "none") or e.get("attention") == "cudnn_fp8"
                    for e in index["targets"].values())
    return "pip install 'aotpack[fp8]'" if needs_fp8 else "pip install aotpack"


def _generated_block(index: dict, store_ref: str) -> str:
    models = sorted({_model_argument(e["model"]) for e in index["targets"].values()}) or ["MODEL"]
    model = models[0]
    return f"""{BEGIN}
## Targets

One folder per GPU target and torch series (`<target>/torch-<X.Y>/`), each holding a `manifest.json`
and its AOTInductor programs (`*.pt2`); `pull` and `load` pick the folder for the local torch.
The programs hold no weights: they are bound at load time from the model given with `--model`.

{_targets_table(index)}

## Usage

```bash
{_install_line(index)}
aotpack pull {store_ref} --target auto        # only the folder for this machine's GPU
aotpack run {_implicit(store_ref)} --model {model} --prompt "a photo of a cat" --out cat.png
```

```python
import aotpack

pipe = aotpack.load("{_implicit(store_ref)}", model="{model}")  # pulls the folder for this GPU
pipe.set_loras([("my_lora.safetensors", 0.8)])
image = pipe("a photo of a cat", num_inference_steps=28).images[0]
```

Every file is checked against the sha256 in its target's `manifest.json` before anything is loaded.
{END}"""


def _implicit(store_ref: str) -> str:
    return store_ref if "://" in store_ref else f"hf://{store_ref}"


# Licenses of the base models a card can name (the Hub shows them; a user's own choice is kept).
_BASE_LICENSES = {
    "black-forest-labs/FLUX.1-dev": {"license": "other", "license_name": "flux-1-dev-non-commercial-license",
                                     "license_link": "https://huggingface.co/black-forest-labs/FLUX.1-dev/blob/main/"
                                                     "LICENSE.md"},
    "black-forest-labs/FLUX.1-schnell": {"license": "apache-2.0"},
}


def _parse_card(text: str | bytes, where: str):
    """The card as huggingface_hub's `ModelCard` (front matter in `.data`, body in `.text`), from its text or the
    file's bytes (a card that is not UTF-8 is refused here, for the Hub and file stores alike).

    Line endings are normalised first so a CRLF card merges as one front-matter block.
    """
    from huggingface_hub import ModelCard

    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as err:
            raise PublishError(f"the README.md of {where} is not UTF-8 text (byte {text[err.start]:#04x} at offset "
                               f"{err.start})", "save README.md in the repo as UTF-8, or delete it, then push "
                               "again") from None
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    try:
        return ModelCard(text) if text.lstrip().startswith("---") else ModelCard("---\n{}\n---\n" + text)
    except (ValueError, yaml.YAMLError) as err:
        raise PublishError(f"the README.md front matter of {where} is not a valid YAML mapping ({err})",
                           "fix or delete README.md in the repo, then push again") from err


def _merge_card_data(data, index: dict) -> None:
    """Add aotpack's keys to the card's metadata, keeping every key a person set."""
    tags = list(data.tags or [])
    data.tags = tags + [t for t in TAGS if t not in tags]
    data.library_name = "aotpack"
    if not data.pipeline_tag:
        data.pipeline_tag = "text-to-image"
    base_models = _hub_model_ids(index)
    if not data.base_model and len(base_models) == 1:
        data.base_model = base_models[0]
    if not data.license and isinstance(data.base_model, str) and data.base_model in _BASE_LICENSES:
        for key, value in _BASE_LICENSES[data.base_model].items():
            setattr(data, key, value)


def render_model_card(index: dict, store_ref: str, existing: str | bytes | None) -> str:
    """README.md for a repo whose merged index is `index`; `existing` is the card already there (text or bytes)."""
    card = _parse_card(existing or "", store_ref)
    body = card.text
    block = _generated_block(index, store_ref)
    if BEGIN in body and END in body:
        head, rest = body.split(BEGIN, 1)
        body = head + block + rest.split(END, 1)[1]
    elif body.strip():
        body = body.rstrip("\n") + "\n\n" + block + "\n"
    else:
        title = store_ref.rstrip("/").rsplit("/", 1)[-1].split("@")[0]
        body = (f"\n# {title}\n\nFlux.1 transformer compiled ahead of time with "
                "aotpack (torch.export + AOTInductor), with LoRA slots "
                "that switch adapters per request without recompiling.\n\n" + block + "\n")
    _merge_card_data(card.data, index)
    card.text = body
    return str(card)
