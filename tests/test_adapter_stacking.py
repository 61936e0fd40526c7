"""Stacking beyond max_rank: exact concatenation while it fits, a clear error above it, and an SVD fit
whose reported retained energy matches the measured error.

The tiny model's layers are 32 wide, so no delta has rank above its max_rank 32 and a fit there is
exact; the SVD tests use the Flux-width model (3072-wide layers, max_rank 16) instead."""

from __future__ import annotations

import math

import lora_formats as formats
import pytest
import torch
from click.testing import CliRunner
from reference import REQUEST, reference_latents, rel_error
from test_adapter_flux_width import FLUX_WIDTH, flux_width_model

from aotpack.adapters import parse_adapter
from aotpack.adapters.stack import stack_adapters
from aotpack.cli import cli
from aotpack.demo import random_lora_state_dict
from aotpack.errors import AdapterRankError
from aotpack.models.tiny import make_transformer


@pytest.fixture(scope="module")
def rank24(tmp_path_factory):
    """Three rank-24 adapters on every layer: any two stack to 48 > max_rank 32."""
    directory, transformer = tmp_path_factory.mktemp("rank24"), make_transformer()
    return [formats.write(random_lora_state_dict(transformer, 24, ["*"], seed=40 + i, std=0.3),
                          directory / f"r24-{i}.safetensors") for i in range(3)]


@pytest.fixture(scope="module")
def width(tmp_path_factory):
    """The Flux-width model and two rank-12 adapters on all its linear layers (12 + 12 > max_rank 16)."""
    from diffusers import FluxTransformer2DModel

    eager, served = flux_width_model(tmp_path_factory)
    with torch.device("meta"):  # the layer table only (the eager model may carry PEFT layers by now)
        layers = FluxTransformer2DModel(**FLUX_WIDTH)
    directory = tmp_path_factory.mktemp("rank12")
    paths = [formats.write(random_lora_state_dict(layers, 12, ["*"], seed=50 + i, std=0.3),
                           directory / f"r12-{i}.safetensors") for i in range(2)]
    return eager, served, paths


def _latents(served):
    with torch.no_grad():
        return served(**REQUEST, generator=torch.Generator("cpu").manual_seed(7), output_type="latent").images


def test_stack_above_max_rank_is_a_clear_error_and_changes_nothing(rank24, served_tiny):
    served_tiny.set_loras([(rank24[0], 1.0)])
    before = _latents(served_tiny)
    with pytest.raises(AdapterRankError) as caught:
        served_tiny.set_loras([(rank24[0], 1.0), (rank24[1], 0.5)])
    message = str(caught.value)
    assert "stack to rank 48" in message and "max_rank 32" in message and "--fit svd" in message
    assert torch.equal(_latents(served_tiny), before)


def test_svd_fit_error_is_sqrt_of_lost_energy(width):
    """Per layer: ||fitted - exact||_F / ||exact||_F == sqrt(1 - retained energy) (Eckart-Young)."""
    _, served, paths = width
    entries = [(parse_adapter(p), s) for p, s in zip(paths, (1.0, -0.6))]
    manifest = served.manifest
    layers, report = stack_adapters(entries, manifest.slot_table(), manifest.max_rank, fit="svd")
    assert report.fitted_layers == len(manifest.slots) == len(report.retained_energy)
    assert report.retained_energy_min == min(report.retained_energy.values()) < report.retained_energy_mean < 1
    for layer, energy in report.retained_energy.items():
        exact = sum(adapter.layers[layer].B.double() * scale @ adapter.layers[layer].A.double()
                    for adapter, scale in entries)
        (a, b, scale), = layers[layer]
        assert scale == 1.0
        assert a.shape[0] <= manifest.max_rank
        error = float((b.double() @ a.double() - exact).norm() / exact.norm())
        assert error == pytest.approx(math.sqrt(1 - energy), rel=1e-6, abs=1e-9), layer


def test_svd_fit_output_error_grows_as_retained_energy_drops(width):
    """A rank-12 adapter plus a second one at growing weight, fitted to rank 16, against diffusers'
    exact (un-fitted) stack: less energy retained, larger latents error."""
    eager, served, paths = width
    exact = served.set_loras([(paths[0], 1.0)])  # fits: no SVD, exact concatenation
    assert exact.report.fitted_layers == 0
    assert rel_error(_latents(served), reference_latents(eager, [(paths[0], 1.0)])) <= 1e-3
    results = []
    for weight in (0.05, 0.3, 1.0):
        loras = [(paths[0], 1.0), (paths[1], weight)]
        report = served.set_loras(loras, fit="svd").report
        error = rel_error(_latents(served), reference_latents(eager, loras))
        results.append((report.retained_energy_min, report.retained_energy_mean, error))
    print("energy min / mean / latents error:", results)
    energies, errors = [r[1] for r in results], [r[2] for r in results]
    assert energies == sorted(energies, reverse=True) and errors == sorted(errors)
    assert results[0][0] > 0.99 and results[-1][0] < 0.8 and errors[-1] > 10 * errors[0]
    # consistent: the latents error is proportional to the fitted deltas' error sqrt(1 - energy)
    ratios = [error / math.sqrt(1 - energy) for energy, error in zip(energies, errors)]
    assert max(ratios) < 1.5 * min(ratios), ratios


def test_cli_fit_svd_reports_retained_energy(rank24, tiny_package, tmp_path):
    args = ["run", str(tiny_package), "--prompt", "a cat", "--steps", "1", "--height", "64", "--width", "64",
            "--max-sequence-length", "16", "--lora", f"{rank24[0]}:1.0", "--lora", f"{rank24[2]}:0.5"]
    refused = CliRunner().invoke(cli, args)
    assert refused.exit_code != 0 and "--fit svd" in refused.output + str(refused.exception)
    fitted = CliRunner().invoke(cli, args + ["--fit", "svd"])
    assert fitted.exit_code == 0, fitted.output
    assert "retained energy min" in fitted.output and "mean" in fitted.output


def test_bank_warm_up_touches_every_write_path_and_leaves_the_bank_zero(monkeypatch):
    from aotpack.models.slots import SlotSpec
    from aotpack.runtime.slot_bank import SlotBank

    bank = SlotBank([SlotSpec("a", 8, 6), SlotSpec("b", 8, 4), SlotSpec("c", 5, 8)], 4, torch.float32, "cpu")
    addresses = {name: t.data_ptr() for name, t in bank.tensors.items()}
    calls = []
    for op in ("_foreach_copy_", "_foreach_zero_", "mul"):
        original = getattr(torch, op)
        monkeypatch.setattr(torch, op, lambda *a, _op=op, _f=original, **k: (calls.append(_op), _f(*a, **k))[1])
    bank.warm_up()
    assert {"_foreach_copy_", "_foreach_zero_", "mul"} <= set(calls)  # the kernels a real switch launches
    assert all(not t.any() for t in bank.tensors.values())
    assert set(bank.used_rank.values()) == {0}
    assert {name: t.data_ptr() for name, t in bank.tensors.items()} == addresses  # programs hold these


def test_bank_write_batches_copies_and_scales_b():
    """A and every unscaled B go in one batched copy (no per-layer launches at scale 1); a scaled B is
    `B * scale` rounded once, as torch.mul rounds it; ranks below max_rank fill the first rows/columns."""
    from aotpack.models.slots import SlotSpec
    from aotpack.runtime.slot_bank import SlotBank

    g = torch.Generator().manual_seed(0)
    bank = SlotBank([SlotSpec("a", 8, 6), SlotSpec("b", 8, 4)], 4, torch.bfloat16, "cpu")
    a1, b1, a2, b2 = (torch.randn(*shape, generator=g).to(torch.bfloat16) for shape in ((2, 8), (6, 2), (4, 8), (4, 4)))
    copies = []
    original = torch._foreach_copy_
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "_foreach_copy_", lambda dst, src, **k: (copies.append(len(dst)), original(dst, src, **k))[1])
        patch.setattr(torch.Tensor, "copy_", lambda *a, **k: pytest.fail("a per-tensor copy"))
        bank.write({"a": [(a1, b1, 1.0)], "b": [(a2, b2)]})
    assert copies == [4]  # both slots' A and B in one call
    a_buf, b_buf = bank.tensors["a.lora_A"], bank.tensors["a.lora_B"]
    assert torch.equal(a_buf[:2], a1) and not a_buf[2:].any() and torch.equal(b_buf[:, :2], b1) and not b_buf[:, 2:].any()
    bank.write({"a": [(a1, b1, 0.8)]})
    assert torch.equal(bank.tensors["a.lora_B"][:, :2], torch.mul(b1, 0.8)) and not bank.tensors["b.lora_A"].any()
    assert bank.used_rank == {"a": 2, "b": 0}
