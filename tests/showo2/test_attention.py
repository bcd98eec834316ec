"""showo2/modeling.py attention: the folded-group path against SDPA's own enable_gqa, the prefix-cached T2I step's
split attention (mask-free span + masked prefix, merged by log-sum-exp) and the VQA prefill's FlexAttention omni
mask against masked SDPA on the math kernel (the reference)."""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from flashu_batch.showo2.modeling import (CachedPrefixMask, FlexMask, additive_mask, attention_with_lse,
                                          grouped_query_attention, llm_attention, omni_attention_mask, omni_flex_mask,
                                          prefix_span_attention)

# Eager FlexAttention (the tests' reference of the compiled kernel) says it is unfused: that is the point here.
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

# Stated tolerance of the split attention against masked SDPA, CPU fp32 (observed: a few 1e-7).
SPLIT_ATOL = SPLIT_RTOL = 1e-5


def qkv(B=2, nh=8, nkv=2, L=5, Lk=9, hd=16, seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, nh, L, hd, generator=g), torch.randn(B, nkv, Lk, hd, generator=g),
               torch.randn(B, nkv, Lk, hd, generator=g))
    return q.to(device, dtype), k.to(device, dtype), v.to(device, dtype)


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


def padded_prefix_mask(real_lengths: list[int], P: int, dtype=torch.float32, device="cpu") -> CachedPrefixMask:
    """Rows whose first real_lengths[r] of P prefix keys are real and the rest padding, as PrefixCachedVelocity."""
    allowed = torch.arange(P)[None, :] < torch.tensor(real_lengths)[:, None]  # (B, P)
    return CachedPrefixMask(additive_mask(allowed[:, None, None, :], dtype).to(device))


def masked_sdpa(q, k, v, mask: CachedPrefixMask, scale=None):
    """The reference: one masked SDPA over all P + S keys on the math kernel (dense (B, nh, L, P + S) scores)."""
    dense = mask.dense(k.shape[2] - mask.prefix.shape[-1])  # (B, 1, 1, P + S)
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=dense.expand(-1, -1, q.shape[2], -1), scale=scale,
                                              enable_gqa=True)


# (nh, nkv, S span keys = queries, P prefix keys, hd, real prefix lengths per row)
SPLIT_CASES = [
    (8, 2, 5, 8, 16, [8, 3]),  # grouped-query heads, one padded row
    (6, 6, 7, 16, 8, [16, 1, 9]),  # no grouping; a row with one real prefix key
    (4, 1, 1, 8, 32, [2]),  # one KV head for all, one query
    (12, 2, 10, 24, 16, [24, 24, 5, 17]),  # the 1.5B LLM's head grouping (12 / 2), rows of mixed lengths
    (6, 2, 37, 40, 16, [1, 40]),  # the tiny flow head's grouping, a longer span
]


@pytest.mark.parametrize("nh, nkv, S, P, hd, real", SPLIT_CASES)
def test_split_attention_equals_masked_sdpa(nh, nkv, S, P, hd, real):
    q, k, v = qkv(B=len(real), nh=nh, nkv=nkv, L=S, Lk=P + S, hd=hd, seed=S + P)
    mask = padded_prefix_mask(real, P)
    reference = masked_sdpa(q, k, v, mask)
    torch.testing.assert_close(prefix_span_attention(q, k, v, mask), reference, atol=SPLIT_ATOL, rtol=SPLIT_RTOL)
    # the two dispatchers route a CachedPrefixMask there: the flow head's and the LLM's ("showo2_sdpa")
    torch.testing.assert_close(grouped_query_attention(q, k, v, mask), reference, atol=SPLIT_ATOL, rtol=SPLIT_RTOL)
    scale = 0.7 / hd ** 0.5
    out, weights = llm_attention(None, q, k, v, mask, scaling=scale)
    assert weights is None and out.shape == (len(real), S, nh, hd)
    torch.testing.assert_close(out, masked_sdpa(q, k, v, mask, scale).transpose(1, 2), atol=SPLIT_ATOL,
                               rtol=SPLIT_RTOL)


def test_attention_with_lse_returns_the_log_sum_exp_of_the_scores():
    q, k, v = qkv(B=2, nh=6, nkv=3, L=4, Lk=7, hd=8)
    mask = padded_prefix_mask([7, 2], 7).prefix
    out, lse = attention_with_lse(q, k, v, mask)
    k_all, v_all = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)  # (B, nh, Lk, hd): repeat_kv
    scores = q @ k_all.transpose(-1, -2) / 8 ** 0.5 + mask  # (B, nh, L, Lk)
    torch.testing.assert_close(lse, scores.logsumexp(-1), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out, scores.softmax(-1) @ v_all, atol=1e-6, rtol=1e-6)


def test_training_dropout_falls_back_to_the_dense_mask():
    q, k, v = qkv(B=2, nh=4, nkv=2, L=3, Lk=8, hd=8)
    mask = padded_prefix_mask([5, 2], 5)
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 2, True  # what transformers' SDPA path reads of the layer
    torch.manual_seed(0)
    out, _ = llm_attention(module, q, k, v, mask, dropout=0.5, scaling=None)
    torch.manual_seed(0)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense(3), dropout_p=0.5, enable_gqa=True)
    torch.testing.assert_close(out, ref.transpose(1, 2), atol=1e-6, rtol=1e-6)


def split_and_dense(step, S: int) -> tuple[CachedPrefixMask, torch.Tensor]:
    """The step's span mask in both forms, whichever one PrefixCachedVelocity builds."""
    mask = step.span_mask
    if isinstance(mask, CachedPrefixMask):
        return mask, mask.dense(S)
    P = step.prefix_len
    assert mask.shape[-1] == P + S and not mask[..., P:].any(), "every span key visible: the split is exact"
    return CachedPrefixMask(mask[..., :P]), mask


@pytest.mark.parametrize("use_cfg", [True, False])
def test_t2i_step_with_the_split_attention_equals_the_masked_step(make_tiny_model, use_cfg):
    """The prefix-cached T2I step end to end (LLM and flow head): velocity with CachedPrefixMask against the dense
    one-row mask, rows of different prompt lengths (padded prefix keys), grouped heads in both."""
    from flashu_batch.showo2.layouts import t2i_sequences
    from flashu_batch.showo2.prefix_cache import PrefixCachedVelocity
    from flashu_batch.showo2.tokenizer import SpecialTokens

    model = make_tiny_model(seed=5)
    c = model.config
    assert c.llm["num_attention_heads"] > c.llm["num_key_value_heads"]
    assert c.head.num_attention_heads > c.head.num_key_value_heads
    seqs = t2i_sequences([[5] * 3, [7] * 11, [9] * 20], SpecialTokens.from_layout(1000), c.num_image_slots,
                         c.default_max_seq_len, with_uncond=use_cfg)
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(3, c.image_latent_dim, *c.latent_size, generator=g), torch.tensor([0.1, 0.5, 0.9])
    step = PrefixCachedVelocity(model, seqs, use_cfg=use_cfg)
    split, dense = split_and_dense(step, c.num_image_slots)
    step.span_mask = dense
    reference = step(x, t)
    step.span_mask = split
    torch.testing.assert_close(step(x, t), reference, atol=SPLIT_ATOL, rtol=SPLIT_RTOL)


def test_head_rope_passed_in_is_the_rope_built_per_call(make_tiny_model):
    model = make_tiny_model(seed=2)
    c = model.config
    g = torch.Generator().manual_seed(0)
    hidden, temb = torch.randn(2, 6, c.hidden_size, generator=g), torch.randn(2, c.head.hidden_size, generator=g)
    in_span = torch.tensor([[0, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]], dtype=torch.bool)[..., None]
    pos = torch.arange(6)[None].expand(2, 6) + torch.tensor([[0], [3]])
    mask = additive_mask(torch.ones(2, 1, 6, 6, dtype=torch.bool).tril(), torch.float32)
    rope = model.head_rope(pos, torch.float32)
    assert torch.equal(model.flow_head(hidden, temb, in_span, pos, mask, rope=rope),
                       model.flow_head(hidden, temb, in_span, pos, mask))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_split_attention_in_half_precision(dtype):
    """The production shapes (1.5B head: 32 query heads on 8 K/V heads, a 730-slot span) in half precision, against
    masked SDPA in fp32 on the same inputs, so a half-precision tolerance. On a GPU the span part runs on the flash
    kernel (grouped K/V as they are, its own LSE); on a CPU on the explicit path."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v = qkv(B=3, nh=32, nkv=8, L=730, Lk=64 + 730, hd=64, dtype=dtype, device=device)
    mask = padded_prefix_mask([64, 17, 40], 64, dtype, device)
    reference = masked_sdpa(q.float(), k.float(), v.float(), CachedPrefixMask(mask.prefix.float()))
    torch.testing.assert_close(prefix_span_attention(q, k, v, mask).float(), reference, atol=2e-2, rtol=2e-2)


def omni_prompts(lengths: list[int], image: int, seed: int = 0):
    """Left-padded prompts of `lengths` tokens, each with an `image`-token block at a random place, as
    showo2.vqa.batch_prompts lays them out -> (modality_positions (B, 1, 2), pads (B,), allowed (B, 1, L, L) bool:
    the dense mask batch_prompts builds)."""
    g = torch.Generator().manual_seed(seed)
    L = max(lengths)
    pads = L - torch.tensor(lengths)
    starts = torch.tensor([int(torch.randint(0, n - image + 1, (1,), generator=g)) for n in lengths]) + pads
    positions = torch.stack([starts, torch.full_like(starts, image)], dim=1)[:, None]  # (B, 1, 2)
    real = torch.arange(L)[None, :] >= pads[:, None]  # (B, L)
    allowed = omni_attention_mask(positions, L) & real[:, None, None, :] | torch.eye(L, dtype=torch.bool)
    return positions, pads, allowed


def masked_reference(q, k, v, allowed, scale=None):
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=additive_mask(allowed, q.dtype), scale=scale,
                                              enable_gqa=True)


# Stated tolerance of the FlexAttention prefill against masked SDPA, CPU fp32 (observed: below 1e-6).
FLEX_ATOL = FLEX_RTOL = 1e-5


@pytest.mark.parametrize("nh, nkv, lengths, image", [
    (12, 2, [300, 517, 260, 517], 256),  # the 1.5B's head grouping; several 128-blocks; short rows padded
    (4, 4, [19, 40], 17),  # no grouping, one block (the tiny model's prompts)
    (8, 1, [260], 130),  # one row, the image block straddling block edges
])
def test_flex_omni_mask_equals_the_dense_mask(nh, nkv, lengths, image):
    """The VQA prefill's attention on FlexAttention (eager here: the same math the compiled kernel fuses) against
    masked SDPA with batch_prompts' dense mask; on long prompts it skips blocks (the causal upper half, padding)."""
    positions, pads, allowed = omni_prompts(lengths, image, seed=len(lengths))
    L = allowed.shape[-1]
    q, k, v = qkv(B=len(lengths), nh=nh, nkv=nkv, L=L, Lk=L, hd=16, seed=L)
    mask = omni_flex_mask(positions, pads, L)
    scale = 0.8 / 16 ** 0.5
    out, weights = llm_attention(None, q, k, v, mask, scaling=scale)  # the route the LLM layers take
    assert weights is None and out.shape == (len(lengths), L, nh, 16)
    torch.testing.assert_close(out.transpose(1, 2), masked_reference(q, k, v, allowed, scale), atol=FLEX_ATOL,
                               rtol=FLEX_RTOL)
    if L > 256:  # of the (query block, key block) tiles, those the kernel computes (whole or masked): not all
        bm = mask.block_mask
        computed = int((bm.kv_num_blocks + bm.full_kv_num_blocks).sum())
        assert computed < bm.kv_indices.numel(), (computed, bm.kv_indices.numel())


def test_flex_omni_mask_of_kept_tokens_is_the_gathered_mask():
    """FlashU's token pruning keeps a subset of each row's positions: the mask of the kept rows and columns."""
    positions, pads, allowed = omni_prompts([400, 290], 200, seed=3)
    g = torch.Generator().manual_seed(4)
    kept = torch.stack([torch.randperm(400, generator=g)[:333].sort().values for _ in range(2)])  # (B, L')
    rows = torch.arange(2)[:, None, None]
    gathered = allowed[:, 0][rows, kept[:, :, None], kept[:, None, :]][:, None]  # (B, 1, L', L')
    q, k, v = qkv(B=2, nh=6, nkv=2, L=333, Lk=333, hd=8, seed=5)
    out = omni_flex_mask(positions, pads, 400, kept=kept)(q, k, v)
    torch.testing.assert_close(out, masked_reference(q, k, v, gathered), atol=FLEX_ATOL, rtol=FLEX_RTOL)


def test_flex_mask_calls_the_kernel_it_was_given():
    """attend is the kernel (the compiled one in production); the block mask, scale and grouped heads reach it."""
    positions, pads, allowed = omni_prompts([20, 12], 5)
    q, k, v = qkv(B=2, nh=4, nkv=2, L=20, Lk=20, hd=8)
    calls = []

    def attend(*args, **kwargs):
        calls.append(kwargs)
        return torch.zeros_like(args[0])

    mask = omni_flex_mask(positions, pads, 20, attend=attend)
    assert isinstance(mask, FlexMask) and torch.equal(mask(q, k, v, 0.5), torch.zeros_like(q))
    assert calls == [dict(block_mask=mask.block_mask, scale=0.5, enable_gqa=True)]
