"""showo2/modeling.py grouped_query_attention: the folded-group path against SDPA's own enable_gqa (the reference)."""

import torch
import torch.nn.functional as F

from flashu_batch.showo2.modeling import additive_mask, grouped_query_attention


def qkv(B=2, nh=8, nkv=2, L=5, Lk=9, hd=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, nh, L, hd, generator=g), torch.randn(B, nkv, Lk, hd, generator=g),
            torch.randn(B, nkv, Lk, hd, generator=g))


def test_one_row_mask_folds_the_groups_and_matches_enable_gqa():
    q, k, v = qkv()
    allowed = torch.ones(2, 9, dtype=torch.bool)
    allowed[0, 2:4] = False  # row 0 has two padded prefix keys, as the prefix-cached T2I step
    mask = additive_mask(allowed[:, None, None, :], q.dtype)  # (B, 1, 1, Lk): every query sees the same keys
    reference = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.expand(2, 1, 5, 9), enable_gqa=True)
    torch.testing.assert_close(grouped_query_attention(q, k, v, mask), reference, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grouped_query_attention(q, k, v, None),
                               F.scaled_dot_product_attention(q, k, v, enable_gqa=True), atol=1e-6, rtol=1e-6)


def test_full_masks_take_the_reference_path_unchanged():
    q, k, v = qkv(L=9)
    causal = torch.ones(9, 9, dtype=torch.bool).tril()
    mask = additive_mask(causal[None, None].expand(2, 1, 9, 9), q.dtype)
    reference = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    assert torch.equal(grouped_query_attention(q, k, v, mask), reference)
