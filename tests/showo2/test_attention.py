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


def test_llm_kernel_equals_transformers_sdpa_on_the_prefix_cached_step(make_tiny_model):
    """The LLM's "showo2_sdpa" (grouped heads folded for one-row masks) against transformers' own "sdpa"
    (repeat_kv) on the T2I step, and on cached VQA decoding: equal within 1e-5 (bit-equal on CPU fp32 here)."""
    from flashu_batch.showo2.layouts import t2i_sequences
    from flashu_batch.showo2.prefix_cache import PrefixCachedVelocity
    from flashu_batch.showo2.tokenizer import SpecialTokens

    model = make_tiny_model(seed=3)
    c, tokens = model.config, SpecialTokens.from_layout(1000)
    assert model.showo.config._attn_implementation == "showo2_sdpa"
    assert c.llm["num_attention_heads"] > c.llm["num_key_value_heads"]  # grouped heads are exercised
    seqs = t2i_sequences([[5] * 3, [7] * 11], tokens, c.num_image_slots, c.default_max_seq_len)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, c.image_latent_dim, *c.latent_size, generator=g), torch.full((2,), 0.3)
    fused = PrefixCachedVelocity(model, seqs, use_cfg=True)(x, t)
    model.showo.config._attn_implementation = "sdpa"
    try:
        reference = PrefixCachedVelocity(model, seqs, use_cfg=True)(x, t)
    finally:
        model.showo.config._attn_implementation = "showo2_sdpa"
    torch.testing.assert_close(fused, reference, atol=1e-5, rtol=1e-5)
