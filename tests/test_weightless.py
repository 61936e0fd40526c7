"""Programs travel to compile workers without their weights' bytes (`aotpack/builder/weightless.py`): the saved file
holds no weight data, the worker rebuilds each weight's layout (torchao's FP8 subclass included), and the package it
compiles computes with the weights bound at load exactly what the module computes."""

import pytest
import torch

from aotpack.builder.compile import compile_program, compile_saved_program
from aotpack.builder.weightless import give_empty_weights, save_for_compile, save_without_weights, tensor_bytes


class TwoLinears(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(256, 512)
        self.down = torch.nn.Linear(512, 256)
        self.register_buffer("gain", torch.tensor([1.5]))  # tiny: keeps its value

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.up(x))) * self.gain


def test_a_saved_program_holds_no_weight_bytes_and_stays_whole(tmp_path):
    module = TwoLinears()
    exported = torch.export.export(module, (torch.randn(4, 256),))
    before = dict(exported.state_dict)
    path = tmp_path / "program.pt2"
    left_out = save_without_weights(exported, str(path), min_bytes=64 * 1024)
    assert sorted(left_out) == ["down.weight", "up.weight"] and set(left_out.values()) == {"cpu"}
    weight_data = tensor_bytes(module.up.weight) + tensor_bytes(module.down.weight)  # 1 MB
    assert path.stat().st_size < weight_data / 10
    assert all(exported.state_dict[name] is tensor for name, tensor in before.items())  # restored after the save

    loaded = torch.export.load(str(path))
    assert loaded.state_dict["up.weight"].device.type == "meta"
    give_empty_weights(loaded, left_out)
    for name, tensor in before.items():
        rebuilt = loaded.state_dict[name]
        assert (rebuilt.shape, rebuilt.stride(), rebuilt.dtype, rebuilt.device) == (
            tensor.shape, tensor.stride(), tensor.dtype, tensor.device)
        assert isinstance(rebuilt, torch.nn.Parameter) == isinstance(tensor, torch.nn.Parameter)
    assert torch.equal(loaded.state_dict["up.bias"], module.up.bias)  # below the threshold: values travel
    assert torch.equal(loaded.constants.get("gain", loaded.state_dict.get("gain")), module.gain)


def test_the_worker_package_computes_with_the_weights_bound_at_load(tmp_path):
    torch.manual_seed(0)
    module = TwoLinears().eval()
    x = torch.randn(4, 256)
    exported = torch.export.export(module, (x,))
    left_out = save_without_weights(exported, str(tmp_path / "program.pt2"), min_bytes=1024)
    assert "up.bias" in left_out  # 2 KB: every tensor but the one-element buffer is left out here
    package = tmp_path / "package.pt2"
    timing = compile_saved_program(str(tmp_path / "program.pt2"), str(package),
                                   {"aot_inductor.package_constants_in_so": False}, "sdpa", False, left_out)
    assert timing.seconds > 0
    runner = torch._inductor.aoti_load_package(str(package))
    bound = runner.get_constant_fqns()  # the one-element buffer is folded into the code (it kept its value)
    assert {"up.weight", "up.bias", "down.weight", "down.bias"} <= set(bound)
    runner.load_constants({name: t.detach() for name, t in module.state_dict().items() if name in bound},
                          check_full_update=False, user_managed=True)
    with torch.no_grad():
        expected = module(x)
    torch.testing.assert_close(runner(x), expected, rtol=1e-5, atol=1e-5)
    assert expected.abs().max() > 0.01  # the weights are live, not the stand-ins' memory


def test_fp8_weights_keep_their_subclass_and_compile_to_the_same_program(tmp_path, monkeypatch):
    """torchao's row-wise FP8 weights (a tensor subclass: FP8 data + row scales) through a weightless save: the
    worker's rebuilt weight has the subclass and its inner layout, and its package, bound to the real FP8 data and
    scales, gives the same output bit for bit as the package compiled from the program in memory."""
    import torchao.quantization.quant_api as quant_api
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    monkeypatch.setattr(quant_api, "_check_hardware_support", lambda granularity: None)  # row-wise FP8 runs on CPU
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 256))
    module = module.to(torch.bfloat16)
    quantize_(module, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
    x = torch.randn(8, 256, dtype=torch.bfloat16)
    exported = torch.export.export(module, (x,))
    weight = exported.state_dict["0.weight"]
    left_out = save_without_weights(exported, str(tmp_path / "program.pt2"), min_bytes=64 * 1024)
    assert sorted(left_out) == ["0.weight", "2.weight"]
    loaded = torch.export.load(str(tmp_path / "program.pt2"))
    give_empty_weights(loaded, left_out)
    rebuilt = loaded.state_dict["0.weight"]
    assert type(rebuilt) is type(weight) and rebuilt.block_size == weight.block_size
    for inner in ("qdata", "scale"):
        ours, theirs = getattr(rebuilt, inner), getattr(weight, inner)
        assert (ours.shape, ours.stride(), ours.dtype, ours.device) == (
            theirs.shape, theirs.stride(), theirs.dtype, theirs.device)

    configs = {"aot_inductor.package_constants_in_so": False}
    monkeypatch.setenv("AOTPACK_PROFILE_COMPILE", str(tmp_path / "profiles"))  # and each compile leaves its profile
    compile_saved_program(str(tmp_path / "program.pt2"), str(tmp_path / "worker.pt2"), configs, "sdpa", True,
                          left_out)
    compile_program(exported, tmp_path / "here.pt2", configs)
    outputs = []
    for package in ("worker.pt2", "here.pt2"):
        runner = torch._inductor.aoti_load_package(str(tmp_path / package))
        constants = {}
        for name in runner.get_constant_fqns():  # an FP8 weight flattens to `...parametrizations.weight.original0/1`
            layer, marker, part = name.partition(".parametrizations.weight.original")
            if marker:
                fp8_weight = exported.state_dict[layer + ".weight"]
                inner_names, _ = fp8_weight.__tensor_flatten__()
                constants[name] = getattr(fp8_weight, inner_names[int(part)])
            else:
                constants[name] = exported.state_dict[name].detach()
        runner.load_constants(constants, check_full_update=True, user_managed=True)
        outputs.append(runner(x))
    assert torch.equal(outputs[0], outputs[1]) and outputs[0].abs().max() > 0.01
    for program in ("worker", "here"):
        profile = (tmp_path / "profiles" / f"{program}.profile.txt").read_text()
        assert "aoti_compile_and_package" in profile and "run_compile_cmd" in profile  # the g++ calls, named


@pytest.mark.parametrize("min_bytes", [1, 1 << 40])
def test_the_threshold_decides_what_travels(tmp_path, min_bytes):
    exported = torch.export.export(TwoLinears(), (torch.randn(4, 256),))
    left_out = save_without_weights(exported, str(tmp_path / "p.pt2"), min_bytes=min_bytes)
    assert (len(left_out) == 5) if min_bytes == 1 else (left_out == {})


def test_a_compile_that_folds_weights_gets_them_whole(tmp_path):
    """Inductor's freezing (or runtime constant folding) computes new constants from the weights' values: a
    recipe that sets it must not get stand-ins."""
    exported = torch.export.export(TwoLinears(), (torch.randn(4, 256),))
    assert len(save_for_compile(exported, str(tmp_path / "a.pt2"), {"max_autotune": False})) == 2
    assert save_for_compile(exported, str(tmp_path / "b.pt2"), {"freezing": True}) == {}
    folding = {"aot_inductor.use_runtime_constant_folding": True}
    assert save_for_compile(exported, str(tmp_path / "c.pt2"), folding) == {}
    assert (tmp_path / "b.pt2").stat().st_size > 1_000_000 > (tmp_path / "a.pt2").stat().st_size
