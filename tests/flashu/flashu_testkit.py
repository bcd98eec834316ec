"""Shared helpers of the FlashU tests: seeded prompts and noise, configs with few calls, error measures, VQA
specialists of a deep tiny model."""

import torch

from flashu_batch.flashu.config import FlashUUnderstandingConfig
from flashu_batch.flashu.ffn_prune import kept_widths
from flashu_batch.flashu.understanding import UnderstandingSpecialist
from flashu_batch.showo2.layouts import t2i_sequences
from flashu_batch.showo2.prefix_cache import PrefixCachedVelocity
from flashu_batch.showo2.t2i import generate_latents, seeded_noise
from flashu_batch.showo2.tokenizer import SpecialTokens

TOKENS = SpecialTokens.from_layout(1000)
# 8 LLM layers (int(8 * 0.2) = 1 layer skipped) with FFN width 256 (kept width at r_p 0.2: 192).
DEEP = {"num_hidden_layers": 8, "intermediate_size": 256}
MAX_SEQ_LEN = 40

# Every technique off (as FlashUGenerationConfig.off, without fixing the step count).
OFF = dict(guidance_schedule=None, ffn_prune_ratio=0.0, full_network_calls=0, layer_skip_ratio=0.0,
           head_cache_interval=None)
# A 10-call plan with every technique on: guidance 3 then 5, full network on calls 8-10, recalculation on calls
# 1 and 5, head-cache stores on 2, 4, 6 and reuses on 3, 5, 7.
SMALL = dict(num_inference_steps=11, guidance_schedule=((6, 3.0), (4, 5.0)), full_network_calls=3,
             layer_skip_interval=4, head_cache_interval=2, calibration_steps=3)


def random_prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 1000, (n,), generator=g).tolist() for n in lengths]


def t2i_batch(model, lengths=(5, 11), seed=0, with_uncond=True):
    """(prompt ids, sequences, noise) of a small batch: offsets 7 and 13, prefix 16, span 17."""
    prompts = random_prompts(lengths, seed)
    c = model.config
    seqs = t2i_sequences(prompts, TOKENS, c.num_image_slots, MAX_SEQ_LEN, with_uncond=with_uncond)
    noise = seeded_noise([seed * 10 + i for i in range(len(prompts))], (c.image_latent_dim, *c.latent_size))
    return prompts, seqs, noise


def baseline_latents(model, seqs, noise, steps, scales, use_cfg=True):
    return generate_latents(PrefixCachedVelocity(model, seqs, use_cfg), noise, num_inference_steps=steps,
                            guidance_scale=scales)


def rel_rms(a, b):
    return float(((a - b).pow(2).mean() / b.pow(2).mean()).sqrt())


def ffn_weights(model):
    return [(layer.mlp.gate_proj.weight.clone(), layer.mlp.up_proj.weight.clone(),
             layer.mlp.down_proj.weight.clone()) for layer in model.showo.model.layers]


def deep(make_tiny_model, seed=0):
    return make_tiny_model(seed=seed, llm_overrides=DEEP)


def specialist(model, **knobs):
    """A VQA specialist of `model` (its FFN neurons left in their order) with these FlashUUnderstandingConfig knobs."""
    knobs.setdefault("token_prune_min_kept", 0)  # the test models' 16-token grids are under the default floor
    config = FlashUUnderstandingConfig(**knobs)
    return UnderstandingSpecialist(model, kept_widths(model, config.ffn_prune_ratio, config.ffn_width_multiple),
                                   config)


def answers(spec, rows, latents, n=6, **kw):
    """The specialist's greedy answers (no eos: every row gets n tokens)."""
    return spec.greedy_answers(spec.model, rows, latents, max_new_tokens=n, eos_id=-1, pad_id=TOKENS.pad, **kw)


def config_from_dict(raw: dict):
    """A config as read from JSON at the edge (the CLI, artifacts)."""
    from flashu_batch.flashu.config import FlashUGenerationConfig

    return FlashUGenerationConfig.from_dict(raw)
