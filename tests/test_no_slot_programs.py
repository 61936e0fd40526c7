"""No slot tax: packages carry no-slot (rank 0) variants of the slotted programs, bound to the same
weights, and the runtime runs them whenever no LoRA is live."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from reference import rel_error

TOLERANCE = 1e-5  # float32 on the CPU: the two variants differ only by adding exact zeros


def _inputs(served, seed=3):
    from aotpack.models.examples import transformer_inputs

    shapes = served.manifest.shapes
    return transformer_inputs(served.transformer.config, batch=1, image_tokens=shapes["image_tokens"][0],
                              text_tokens=shapes["text_tokens"][0] + 1, dtype=torch.float32, device="cpu",
                              generator=torch.Generator().manual_seed(seed))


def _calls(programs) -> int:
    return sum(instance.calls for instances in programs.values() for instance in instances)


def _run(transformer, inputs):
    with torch.no_grad():
        return transformer(**inputs, return_dict=False)[0]


def test_manifest_records_no_slot_variants(tiny_package):
    from aotpack.store.manifest import read_manifest

    manifest = read_manifest(tiny_package)
    main = {p.kind: p for p in manifest.programs if p.name == p.kind}
    variants = {p.kind: p for p in manifest.programs if p.name != p.kind}
    slotted = {kind for kind, p in main.items() if p.slots}
    # every slotted block program has its variant, nothing else (prologue and epilogue run with empty slots)
    assert {"prologue", "epilogue"} <= slotted and set(variants) == slotted - {"prologue", "epilogue"}
    for kind, variant in variants.items():
        assert variant.rank == 0 and variant.slots == [] and main[kind].rank == manifest.max_rank
        assert variant.instances == main[kind].instances and variant.inputs == main[kind].inputs
        assert variant.constants == main[kind].constants  # the same weights, by the same names
        assert (tiny_package / variant.file).is_file()


def test_no_lora_runs_no_slot_programs_and_matches_eager(served_tiny, demo_loras):
    from aotpack.models.checkpoint import load_transformer, parse_model_ref

    compiled = served_tiny.transformer
    inputs = _inputs(served_tiny)
    served_tiny.set_loras([])
    slotted_blocks = {k: v for k, v in compiled._programs.items() if k in compiled._no_slot_programs}
    before_plain, slotted_before = _calls(compiled._no_slot_programs), _calls(slotted_blocks)
    plain = _run(compiled, inputs)
    assert compiled.last_variant == "no_slots"
    assert _calls(compiled._no_slot_programs) > before_plain and _calls(slotted_blocks) == slotted_before

    # the slotted programs with zero LoRA tensors: same output to float tolerance
    variants, compiled._no_slot_programs = compiled._no_slot_programs, {}
    try:
        with_zero_slots = _run(compiled, inputs)
        assert compiled.last_variant == "slots" and _calls(slotted_blocks) > slotted_before
    finally:
        compiled._no_slot_programs = variants
    assert rel_error(plain, with_zero_slots) <= TOLERANCE

    eager = load_transformer(parse_model_ref("tiny"), torch.float32, "cpu").eval()
    assert rel_error(plain, _run(eager, inputs)) <= 1e-3  # test_core's tolerance vs diffusers

    # a live LoRA runs the slotted programs (and changes the output)
    served_tiny.set_loras([(demo_loras["tiny-style-mlp"], 0.9)])
    try:
        before = _calls(compiled._no_slot_programs)
        with_lora = _run(compiled, inputs)
        assert compiled.last_variant == "slots" and _calls(compiled._no_slot_programs) == before
        assert rel_error(with_lora, plain) > 1e-2
    finally:
        served_tiny.set_loras([])
    assert torch.equal(_run(compiled, inputs), plain) and compiled.last_variant == "no_slots"


def test_package_without_variants_still_runs_slotted(tiny_package, tmp_path):
    """Packages built before the variants existed: no `rank` field, no no-slot programs."""
    import aotpack

    old = tmp_path / "old"
    shutil.copytree(tiny_package, old)
    manifest_path = old / "manifest.json"
    data = json.loads(manifest_path.read_text())
    for program in [p for p in data["programs"] if p["name"] != p["kind"]]:
        data["programs"].remove(program)
        data["files"].pop(program["file"])
        (old / program["file"]).unlink()
    for program in data["programs"]:
        program.pop("rank")
    manifest_path.write_text(json.dumps(data))
    served = aotpack.load(old, model="tiny")
    assert not served.transformer.has_no_slot_programs
    out = _run(served.transformer, _inputs(served))
    assert served.transformer.last_variant == "slots" and torch.isfinite(out).all()


@pytest.mark.parametrize("kind", ["double_block"])
def test_variant_export_keeps_constant_names(kind):
    """The shallow no-slot copy of a region has exactly the region's weight names and no LoRA inputs."""
    from aotpack.builder.build import _without_slots
    from aotpack.models.checkpoint import load_transformer, parse_model_ref
    from aotpack.models.prepare import prepare_transformer
    from aotpack.models.regions import block_prefixes, make_region

    transformer = load_transformer(parse_model_ref("tiny"), torch.float32, "cpu")
    names = [n for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear) and "blocks" in n]
    prepare_transformer(transformer, dtype="float32", device="cpu", quantization="none", slot_names=names)
    region = make_region(transformer, kind, block_prefixes(transformer)[kind][0])
    plain = _without_slots(region)
    assert region.slot_names() and plain.slot_names() == [] and plain.lora_names() == []
    assert list(plain.state_dict()) == list(region.state_dict())


def test_build_validation_refuses_outputs_that_do_not_repeat(tiny_package, monkeypatch):
    """The build runs each variant twice, the other in between, and wants the same bits: exact unmerge and
    graph replay rely on it (an H200 build with coordinate-descent tuning broke it for the no-slot
    programs). Programs whose outputs drift from run to run must fail the build, named."""
    from aotpack.builder.validate import validate_package
    from aotpack.errors import ValidationFailedError
    from aotpack.models.checkpoint import load_transformer, parse_model_ref
    from aotpack.models.prepare import prepare_transformer
    from aotpack.progress import Progress
    from aotpack.recipes.recipe import load_recipe
    from aotpack.runtime.transformer import _Instance
    from aotpack.store.manifest import read_manifest

    def validate():
        manifest = read_manifest(tiny_package)
        transformer = load_transformer(parse_model_ref("tiny"), torch.float32, "cpu")
        prepare_transformer(transformer, dtype=manifest.dtype, device="cpu",
                            quantization=manifest.quantization["method"], slot_names=[s.name for s in manifest.slots])
        return validate_package(tiny_package, manifest, transformer, recipe, "cpu", Progress(False))

    recipe = load_recipe("cpu")

    assert read_manifest(tiny_package).validation["repeatable"] is True  # what the real build recorded
    assert validate()["repeatable"] is True
    run = _Instance.__call__

    def drifting(self, *activations):  # every program's second, fourth, ... run gives other bits
        output = run(self, *activations)
        if self.calls % 2 == 0:
            (output[0] if isinstance(output, (tuple, list)) else output).add_(1e-3)
        return output

    monkeypatch.setattr(_Instance, "__call__", drifting)
    with pytest.raises(ValidationFailedError, match=r"not deterministic.*no LoRA, batch 1: [0-9.e-]+") as failure:
        validate()
    assert "epilogue (0.001)" in str(failure.value) and "double_block.noslot" in str(failure.value)
    assert "[inductor]" not in failure.value.fix  # the cpu recipe has no Inductor settings to blame
    # a recipe with some (h100 turns coordinate descent on): the fix builds on it without them
    recipe = recipe.replace(inductor_configs={"coordinate_descent_tuning": True})
    with pytest.raises(ValidationFailedError) as failure:
        validate()
    assert 'base = "cpu"' in failure.value.fix and "coordinate_descent_tuning = false" in failure.value.fix
