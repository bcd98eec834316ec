"""Neuron reordering and sliced FFN matmuls (flashu/ffn_prune.py) against stock modules with hand-cut weights."""

import copy
import math

import pytest
import torch
from torch import nn

from flashu_batch.flashu.ffn_prune import decoder_layer, importance_order, kept_width, reorder_ffn_, sliced_mlp
from flashu_testkit import DEEP, t2i_batch
from flashu_batch.showo2.modeling import additive_mask
from flashu_batch.showo2.prefix_cache import PrefixCachedVelocity


def test_kept_width_of_the_paper():
    assert kept_width(8960, 0.2, 64) == 7168  # 1.5B: 80% kept, 1792 pruned per layer


@pytest.mark.parametrize("size, ratio, multiple, expected", [
    (4864, 0.2, 64, 3840),     # 4864 - 972 = 3892 -> 60 * 64
    (18944, 0.3, 64, 13248),   # 18944 - 5683 = 13261 -> 207 * 64
    (8960, 0.1, 64, 8064),     # 8960 - 896 = 8064 (already a multiple)
    (256, 0.2, 64, 192),       # 256 - 51 = 205 -> 3 * 64
    (160, 0.2, 64, 128),
    (1000, 0.25, 1, 750),
    (8960, 0.0, 64, 8960),     # ratio 0: unpruned, even if not a multiple
    (100, 0.0, 64, 100),
])
def test_kept_width_examples(size, ratio, multiple, expected):
    assert kept_width(size, ratio, multiple) == expected


def test_kept_width_formula_on_a_grid():
    for size in (64, 100, 160, 256, 1000, 4864, 8960, 18944):
        for ratio in (0.05, 0.1, 0.2, 0.3, 0.5, 0.75):
            for multiple in (1, 8, 64, 128):
                k = kept_width(size, ratio, multiple)
                remaining = size - math.floor(size * ratio + 1e-9)
                if remaining >= multiple:
                    assert k % multiple == 0 and k <= remaining < k + multiple, (size, ratio, multiple, k)
                else:  # never prune to nothing: at least one multiple (or everything when smaller)
                    assert k == min(multiple, size)


def test_importance_order_is_descending_and_stable():
    scores = [torch.tensor([0.5, 2.0, 0.5, 3.0, 1.0]), torch.tensor([1.0, 1.0, 1.0])]
    orders = importance_order(scores)
    assert orders[0].tolist() == [3, 1, 4, 0, 2]
    assert orders[1].tolist() == [0, 1, 2]


def test_reorder_moves_rows_and_columns_and_keeps_the_velocity(make_tiny_model):
    model = make_tiny_model(seed=11, llm_overrides=DEEP)
    _, seqs, noise = t2i_batch(model)
    t = torch.tensor([0.3, 0.8])
    before_v = PrefixCachedVelocity(model, seqs, use_cfg=True)(noise, t)
    layers = model.showo.model.layers
    before = [(l.mlp.gate_proj.weight.clone(), l.mlp.up_proj.weight.clone(), l.mlp.down_proj.weight.clone())
              for l in layers]
    g = torch.Generator().manual_seed(0)
    perms = [torch.randperm(l.mlp.down_proj.in_features, generator=g) for l in layers]
    reorder_ffn_(model, perms)
    for l, (gate, up, down), perm in zip(layers, before, perms):
        for i in (0, 1, 17, len(perm) - 1):
            assert torch.equal(l.mlp.gate_proj.weight[i], gate[perm[i]])
            assert torch.equal(l.mlp.up_proj.weight[i], up[perm[i]])
            assert torch.equal(l.mlp.down_proj.weight[:, i], down[:, perm[i]])
        assert torch.equal(l.mlp.gate_proj.weight, gate[perm])
        assert torch.equal(l.mlp.up_proj.weight, up[perm])
        assert torch.equal(l.mlp.down_proj.weight, down[:, perm])
    after_v = PrefixCachedVelocity(model, seqs, use_cfg=True)(noise, t)
    assert not torch.equal(layers[0].mlp.gate_proj.weight, before[0][0])
    torch.testing.assert_close(after_v, before_v, atol=1e-5, rtol=1e-5)


def truncated_mlp(mlp, width):
    """The stock Qwen2 MLP module with its weights cut by hand to the leading `width` neurons."""
    cut = copy.deepcopy(mlp)
    H = mlp.gate_proj.in_features
    cut.gate_proj = nn.Linear(H, width, bias=False)
    cut.up_proj = nn.Linear(H, width, bias=False)
    cut.down_proj = nn.Linear(width, H, bias=False)
    with torch.no_grad():
        cut.gate_proj.weight.copy_(mlp.gate_proj.weight[:width])
        cut.up_proj.weight.copy_(mlp.up_proj.weight[:width])
        cut.down_proj.weight.copy_(mlp.down_proj.weight[:, :width])
    return cut


@pytest.mark.parametrize("width", [256, 192, 64, 1])
def test_sliced_mlp_equals_the_stock_mlp_with_truncated_weights(make_tiny_model, width):
    model = make_tiny_model(seed=12, llm_overrides=DEEP)
    mlp = model.showo.model.layers[2].mlp
    x = torch.randn(3, 7, mlp.gate_proj.in_features, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = truncated_mlp(mlp, width)(x)
        got = sliced_mlp(mlp, x, width)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    if width == 256:
        torch.testing.assert_close(got, mlp(x), atol=1e-6, rtol=1e-5)
    else:
        assert not torch.allclose(got, mlp(x), atol=1e-4)


def layer_inputs(model, L=9, B=2, seed=2):
    llm = model.showo.model
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, L, llm.config.hidden_size, generator=g)
    position_ids = torch.arange(L)[None].expand(B, L)
    pos = torch.arange(L)
    mask = additive_mask((pos[None, :] <= pos[:, None])[None, None].expand(B, 1, L, L), h.dtype)
    kwargs = dict(attention_mask=mask, position_ids=position_ids, position_embeddings=llm.rotary_emb(h, position_ids))
    return h, kwargs


def test_decoder_layer_at_full_width_equals_the_stock_layer(make_tiny_model):
    model = make_tiny_model(seed=13, llm_overrides=DEEP)
    layer = model.showo.model.layers[3]
    h, kwargs = layer_inputs(model)
    with torch.no_grad():
        torch.testing.assert_close(decoder_layer(layer, h, 256, **kwargs), layer(h, **kwargs), atol=1e-6, rtol=1e-6)


def test_decoder_layer_at_a_cut_width_equals_a_hand_cut_stock_layer(make_tiny_model):
    model = make_tiny_model(seed=14, llm_overrides=DEEP)
    layer = model.showo.model.layers[5]
    cut = copy.deepcopy(layer)
    cut.mlp = truncated_mlp(layer.mlp, 192)
    h, kwargs = layer_inputs(model)
    with torch.no_grad():
        got = decoder_layer(layer, h, 192, **kwargs)
        torch.testing.assert_close(got, cut(h, **kwargs), atol=1e-6, rtol=1e-5)
        assert not torch.allclose(got, layer(h, **kwargs), atol=1e-4)
