"""Layer importance and the skip list (flashu/layer_skip.py) on hand-made hidden states."""

import torch

from flashu_batch.flashu.layer_skip import layer_importance, layers_to_skip


def test_identical_states_have_zero_importance():
    h = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(0))
    imp = layer_importance([h, h.clone(), 3.0 * h])  # scaling does not change the direction
    assert imp.shape == (2,) and imp.dtype == torch.float32
    torch.testing.assert_close(imp, torch.zeros(2), atol=1e-6, rtol=0)


def test_orthogonal_and_opposite_states():
    e = torch.eye(4)
    a = e[0].expand(2, 3, 4)
    b = e[1].expand(2, 3, 4)
    imp = layer_importance([a, b, -b])
    torch.testing.assert_close(imp, torch.tensor([1.0, 2.0]))


def test_importance_is_the_mean_over_rows_and_positions():
    # position 0 unchanged (cos 1), position 1 orthogonal (cos 0): mean cosine 0.5 -> importance 0.5
    before = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    after = torch.tensor([[[2.0, 0.0], [0.0, 5.0]]])
    torch.testing.assert_close(layer_importance([before, after]), torch.tensor([0.5]))
    # bfloat16 states are measured in float32
    imp = layer_importance([before.bfloat16(), after.bfloat16()])
    assert imp.dtype == torch.float32


def test_layers_to_skip_picks_the_least_important():
    imp = torch.tensor([0.9, 0.1, 0.5, 0.05, 0.7, 0.3, 0.8, 0.2, 0.6, 0.4])
    assert layers_to_skip(imp, 0.2) == frozenset({3, 1})  # int(10 * 0.2) = 2
    assert layers_to_skip(imp, 0.35) == frozenset({3, 1, 7})
    g = torch.Generator().manual_seed(1)
    for L in (3, 8, 28):
        imp = torch.rand(L, generator=g)
        for ratio in (0.1, 0.2, 0.5, 0.9):
            n = int(L * ratio)
            expected = frozenset(sorted(range(L), key=lambda i: float(imp[i]))[:n])
            assert layers_to_skip(imp, ratio) == expected


def test_ratio_zero_or_too_few_layers_skip_nothing():
    imp = torch.rand(8)
    assert layers_to_skip(imp, 0.0) == frozenset()
    assert layers_to_skip(torch.rand(4), 0.2) == frozenset()  # int(4 * 0.2) = 0
    assert layers_to_skip(imp, 0.2) != frozenset()
