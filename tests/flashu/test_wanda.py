"""Wanda FFN neuron scores (flashu/wanda.py) against a hand computation from the stock layers."""

import pytest
import torch
import torch.nn.functional as F

from flashu_batch.flashu.wanda import record_ffn_inputs, wanda_scores
from flashu_testkit import DEEP
from flashu_batch.showo2.modeling import additive_mask


def causal_inputs(model, B, L, seed):
    g = torch.Generator().manual_seed(seed)
    embeds = torch.randn(B, L, model.config.hidden_size, generator=g)
    pos = torch.arange(L)
    mask = additive_mask((pos[None, :] <= pos[:, None])[None, None].expand(B, 1, L, L), embeds.dtype)
    return embeds, mask


def test_scores_equal_a_hand_computation(make_tiny_model):
    model = make_tiny_model(seed=21, llm_overrides=DEEP)
    layers = model.showo.model.layers
    # My own capture: each MLP's input x; A = SiLU(x W_gate^T) * (x W_up^T) computed by hand.
    sum_sq = [torch.zeros(l.mlp.down_proj.in_features, dtype=torch.float64) for l in layers]

    def hook_for(i):
        def hook(module, args, output):
            x = args[0].double()
            a = F.silu(x @ module.gate_proj.weight.double().T) * (x @ module.up_proj.weight.double().T)
            sum_sq[i] += a.pow(2).sum(dim=(0, 1))
        return hook

    handles = [l.mlp.register_forward_hook(hook_for(i)) for i, l in enumerate(layers)]
    try:
        with torch.no_grad(), record_ffn_inputs(model) as sums:
            for B, L, seed in ((2, 9, 0), (3, 5, 1)):  # two forwards accumulate
                model.llm_hidden(*causal_inputs(model, B, L, seed))
    finally:
        for h in handles:
            h.remove()
    assert len(sums) == len(layers) == 8
    assert all(s.dtype == torch.float32 and s.shape == (256,) for s in sums)
    for s, ref in zip(sums, sum_sq):
        torch.testing.assert_close(s.double(), ref, rtol=1e-4, atol=1e-6)
    scores = wanda_scores(model, sums)
    for score, ref, l in zip(scores, sum_sq, layers):
        expected = ref.sqrt() * l.mlp.down_proj.weight.double().abs().sum(dim=0)  # ||A_j|| * sum_i |W[i, j]|
        assert score.shape == (256,)
        torch.testing.assert_close(score.double(), expected, rtol=1e-4, atol=1e-6)


def test_scores_weigh_the_down_proj_columns():
    # One layer stand-in: zero activation or zero column gives score 0; scaling a column scales its score.
    class Mlp(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.down_proj = torch.nn.Linear(3, 2, bias=False)

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = Mlp()

    class Fake:
        class showo:
            class model:
                layers = [Layer()]

    layer = Fake.showo.model.layers[0]
    with torch.no_grad():
        layer.mlp.down_proj.weight.copy_(torch.tensor([[1.0, -2.0, 0.0], [3.0, 0.5, 0.0]]))
    scores = wanda_scores(Fake, [torch.tensor([4.0, 9.0, 16.0])])
    torch.testing.assert_close(scores[0], torch.tensor([2.0 * 4.0, 3.0 * 2.5, 0.0]))


def test_hooks_are_removed_after_the_block(make_tiny_model):
    model = make_tiny_model(seed=22, llm_overrides=DEEP)
    downs = [l.mlp.down_proj for l in model.showo.model.layers]
    with torch.no_grad(), record_ffn_inputs(model) as sums:
        assert all(len(d._forward_pre_hooks) == 1 for d in downs)
        model.llm_hidden(*causal_inputs(model, 1, 4, 0))
    assert all(len(d._forward_pre_hooks) == 0 for d in downs)
    recorded = [s.clone() for s in sums]
    with torch.no_grad():
        model.llm_hidden(*causal_inputs(model, 1, 4, 1))  # no longer recorded
    assert all(torch.equal(a, b) for a, b in zip(sums, recorded))
    with pytest.raises(RuntimeError, match="boom"), record_ffn_inputs(model):
        raise RuntimeError("boom")
    assert all(len(d._forward_pre_hooks) == 0 for d in downs)
