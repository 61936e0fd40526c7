"""`gelu_via_sigmoid`: the recipe lever that computes Flux's tanh-approximated GELU as x * sigmoid(2u)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from aotpack.models.activations import SigmoidGELU, SigmoidGELUProjection, gelu_tanh_via_sigmoid, use_sigmoid_gelu
from aotpack.models.examples import transformer_inputs
from aotpack.models.tiny import make_transformer


def test_sigmoid_form_is_torchs_tanh_gelu():
    x = torch.linspace(-12, 12, 200_001, dtype=torch.float64)
    exact = F.gelu(x, approximate="tanh")
    assert (gelu_tanh_via_sigmoid(x) - exact).abs().max() < 1e-12
    x32 = x.float()
    assert (gelu_tanh_via_sigmoid(x32) - F.gelu(x32, approximate="tanh")).abs().max() < 2e-6
    # bfloat16: computed in float32 and rounded once, like torch's. They differ only in the last bit of some
    # outputs, the largest gap (1.5e-5) in the negative tail, where torch's 1 + tanh(u) cancels (it returns
    # 0 for gelu(-10) = -1.2e-37); overall ours is no further from the float64 truth.
    x16 = x.to(torch.bfloat16)
    ours, torchs = gelu_tanh_via_sigmoid(x16), F.gelu(x16, approximate="tanh")
    assert ours.dtype == torch.bfloat16
    assert (ours.float() - torchs.float()).abs().max() <= 2e-5
    truth = F.gelu(x16.double(), approximate="tanh")
    assert (ours.double() - truth).abs().mean() <= (torchs.double() - truth).abs().mean()
    assert ours[x16 == -10].double().abs().min() > 0 and (torchs[x16 == -10] == 0).all()

def test_swap_keeps_names_and_output_of_the_flux_transformer():
    torch.manual_seed(0)
    transformer = make_transformer().eval()
    names = [name for name, _ in transformer.named_parameters()]
    inputs = transformer_inputs(transformer.config, batch=1, image_tokens=64, text_tokens=16, dtype=torch.float32,
                                device="cpu", generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = transformer(**inputs, return_dict=False)[0]
        assert use_sigmoid_gelu(transformer, "none") == 0
        assert use_sigmoid_gelu(transformer, "feed_forward") == 2 * len(transformer.transformer_blocks)
        assert isinstance(transformer.single_transformer_blocks[0].act_mlp, torch.nn.GELU)  # left alone
        swapped = use_sigmoid_gelu(transformer, "all")
        after = transformer(**inputs, return_dict=False)[0]
    doubles, singles = len(transformer.transformer_blocks), len(transformer.single_transformer_blocks)
    assert swapped == singles  # act_mlp per single block; ff and ff_context of the double blocks went first
    assert isinstance(transformer.single_transformer_blocks[0].act_mlp, SigmoidGELU)
    assert isinstance(transformer.transformer_blocks[0].ff.net[0], SigmoidGELUProjection)
    assert [name for name, _ in transformer.named_parameters()] == names  # weights and slots bind as before
    assert not any(isinstance(m, torch.nn.GELU) for m in transformer.modules())
    assert (after - before).abs().max() <= 1e-5 * before.abs().max()
    assert use_sigmoid_gelu(transformer, "all") == 0  # nothing left to swap
