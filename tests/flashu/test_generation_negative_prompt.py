"""The FlashU T2I specialist with negative prompts: it runs the sequences the pipeline builds, so a negative caption
in the uncond rows reaches it unchanged (bit-identical to the exact baseline when every technique is off; close to
it with the techniques on, and different from the empty caption)."""

import torch

from flashu_batch.flashu.config import FlashUGenerationConfig
from flashu_batch.flashu.generation import GenerationSpecialist, pruned_widths
from flashu_batch.showo2.layouts import t2i_sequences
from flashu_batch.showo2.t2i import generate_latents, seeded_noise
from flashu_testkit import DEEP, MAX_SEQ_LEN, OFF, TOKENS, baseline_latents, random_prompts, rel_rms

GUIDANCE = 4.0


def latents(specialist, seqs, noise):
    return generate_latents(specialist.velocity_fn(seqs, True), noise,
                            num_inference_steps=specialist.config.num_inference_steps,
                            guidance_scale=specialist.guidance_scales(GUIDANCE))


def test_negative_captions_reach_the_specialist(make_tiny_model):
    model = make_tiny_model(seed=31, llm_overrides=DEEP)
    c = model.config
    prompts, negatives = random_prompts([5, 11], seed=1), random_prompts([3, 9], seed=2)
    seqs = t2i_sequences(prompts, TOKENS, c.num_image_slots, MAX_SEQ_LEN, negative_ids=negatives)
    noise = seeded_noise([1, 2], (c.image_latent_dim, *c.latent_size))
    off = FlashUGenerationConfig.off(11)
    exact = baseline_latents(model, seqs, noise, 11, [GUIDANCE] * 10)
    assert torch.equal(latents(GenerationSpecialist(model, pruned_widths(model, off), off), seqs, noise), exact)
    on = FlashUGenerationConfig(**{**OFF, "num_inference_steps": 11, "ffn_prune_ratio": 0.2,
                                   "head_cache_interval": 2})
    fast = latents(GenerationSpecialist(model, pruned_widths(model, on), on), seqs, noise)
    empty = baseline_latents(model, t2i_sequences(prompts, TOKENS, c.num_image_slots, MAX_SEQ_LEN), noise, 11,
                             [GUIDANCE] * 10)
    assert rel_rms(fast, exact) < rel_rms(empty, exact)  # the specialist follows the negative prompt
