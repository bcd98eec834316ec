"""The prefix-cached T2I step against the full-sequence reference step (showo2/prefix_cache.py)."""

import torch

from flashu_batch.showo2.layouts import t2i_sequences
from flashu_batch.showo2.loading import load_showo2
from flashu_batch.showo2.prefix_cache import PrefixCachedVelocity
from flashu_batch.showo2.t2i import full_sequence_velocity_fn, generate_latents
from flashu_batch.showo2.tokenizer import SpecialTokens

TOKENS = SpecialTokens.from_layout(1000)
# Float32 rounding differs between a 40-token and a prefix+span attention; the golden noise floor is ~4e-6.
ATOL = 2e-5


def tiny_batch(model, prompt_lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 1000, (n,), generator=g).tolist() for n in prompt_lengths]
    c = model.config
    x = torch.randn(len(prompts), c.image_latent_dim, *c.latent_size, generator=g)
    t = torch.rand(len(prompts), generator=g)
    return prompts, x, t


def test_cached_step_equals_full_sequence_on_golden_model(golden_dir, golden_data):
    model = load_showo2(f"{golden_dir}/checkpoint")
    prompts = [golden_data[f"t2i_velocity.prompt_ids.{i}"].tolist() for i in range(2)]
    seqs = t2i_sequences(prompts, TOKENS, model.config.num_image_slots, golden_data["t2i_velocity.input_ids"].shape[1])
    x, t = golden_data["t2i_velocity.x_t"][:2], golden_data["t2i_velocity.t"][:2]
    with torch.no_grad():
        full = full_sequence_velocity_fn(model, seqs)(x, t)
        fast = PrefixCachedVelocity(model, seqs, use_cfg=True)(x, t)
    torch.testing.assert_close(fast, full, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(fast[:2], golden_data["t2i_velocity.v_cond"], atol=5e-5, rtol=2e-5)


def test_cached_step_equals_full_sequence_for_mixed_prompt_lengths(make_tiny_model):
    model = make_tiny_model(seed=3)
    # lengths 0..max: empty prompt (offset 2 like uncond), a prefix length that is a multiple of 8, truncation
    prompts, x, t = tiny_batch(model, [0, 6, 13, 40])
    seqs = t2i_sequences(prompts, TOKENS, model.config.num_image_slots, 48)
    with torch.no_grad():
        full = full_sequence_velocity_fn(model, seqs)(x, t)
        step = PrefixCachedVelocity(model, seqs, use_cfg=True)
        fast = step(x, t)
        again = step(x * 0.5, t.flip(0))  # the span cache is overwritten in place, the prefix cache is reused
        full_again = full_sequence_velocity_fn(model, seqs)(x * 0.5, t.flip(0))
    assert fast.shape == (8, *x.shape[1:])
    torch.testing.assert_close(fast, full, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(again, full_again, atol=ATOL, rtol=1e-5)


def test_cached_step_without_guidance(make_tiny_model):
    model = make_tiny_model(seed=4)
    prompts, x, t = tiny_batch(model, [3, 9])
    seqs = t2i_sequences(prompts, TOKENS, model.config.num_image_slots, 40, with_uncond=False)
    with torch.no_grad():
        full = full_sequence_velocity_fn(model, seqs)(x, t)
        fast = PrefixCachedVelocity(model, seqs, use_cfg=False)(x, t)
    assert fast.shape == x.shape
    torch.testing.assert_close(fast, full, atol=ATOL, rtol=1e-5)


def test_cached_sampling_equals_full_sampling(make_tiny_model):
    model = make_tiny_model(seed=5)
    prompts, noise, _ = tiny_batch(model, [4, 17])
    seqs = t2i_sequences(prompts, TOKENS, model.config.num_image_slots, 40)
    kwargs = dict(num_inference_steps=5, guidance_scale=4.0)
    full = generate_latents(full_sequence_velocity_fn(model, seqs), noise, **kwargs)
    fast = generate_latents(PrefixCachedVelocity(model, seqs, use_cfg=True), noise, **kwargs)
    torch.testing.assert_close(fast, full, atol=2e-4, rtol=1e-4)


def test_cached_step_in_bfloat16_tracks_float32(make_tiny_model):
    model = make_tiny_model(seed=6)
    prompts, x, t = tiny_batch(model, [5, 11])
    seqs = t2i_sequences(prompts, TOKENS, model.config.num_image_slots, 40)
    with torch.no_grad():
        ref = PrefixCachedVelocity(model, seqs, use_cfg=True)(x, t)
        model_bf16 = model.to(torch.bfloat16)
        model_bf16.init_buffers("cpu")
        low = PrefixCachedVelocity(model_bf16, seqs, use_cfg=True)(x, t).float()
    rel_rms = ((low - ref).pow(2).mean() / ref.pow(2).mean()).sqrt()
    assert low.dtype == torch.float32 and rel_rms < 0.05, rel_rms


def test_step_compiles_whole_and_matches(make_tiny_model):
    # The hot path must stay one graph (no host syncs, static shapes): fullgraph=True fails on any graph break.
    model = make_tiny_model(seed=7)
    prompts, x, t = tiny_batch(model, [5, 12])
    step = PrefixCachedVelocity(model, t2i_sequences(prompts, TOKENS, model.config.num_image_slots, 40), True)
    compiled = torch.compile(step.__call__, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, t), step(x, t), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(compiled(x * 0.3, t.flip(0)), step(x * 0.3, t.flip(0)), atol=1e-5, rtol=1e-5)
