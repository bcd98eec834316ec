"""Text-to-image: classifier-free guidance around the flow sampler (upstream inference_t2i.py).

The loop is split at the velocity function, the seam faster step implementations replace:
`velocity_fn(x, t, step)` takes the B image latents x (B, C, h, w), their times t (B,) and the 0-based model-call
index `step` (for host-side per-step decisions), and returns the raw velocities of all R sequence rows
(R, C, h, w): with guidance R = 2B, the cond rows then the uncond rows (which share their image's x and t).
"""

from typing import Callable, Sequence

import torch

from flashu_batch.showo2.layouts import Sequences
from flashu_batch.showo2.modeling import Showo2, additive_mask, omni_attention_mask
from flashu_batch.showo2.sampler import FlowEulerSampler

VelocityFn = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


def full_sequence_velocity_fn(model: Showo2, seqs: Sequences) -> VelocityFn:
    """The reference step: the whole sequence through LLM and flow head, every call (upstream t2i_generate)."""
    dtype = model.showo.model.embed_tokens.weight.dtype
    device = model.showo.model.embed_tokens.weight.device
    seqs = seqs.to(device)
    mask = additive_mask(omni_attention_mask(seqs.modality_positions, seqs.input_ids.shape[1]), dtype)  # once

    def velocity(x: torch.Tensor, t: torch.Tensor, step: int = 0) -> torch.Tensor:
        reps = seqs.input_ids.shape[0] // x.shape[0]  # 2 with guidance: the uncond rows repeat the images
        return model.velocity(seqs.input_ids, seqs.image_offsets, seqs.modality_positions, mask,
                              x.repeat(reps, 1, 1, 1), t.repeat(reps))

    return velocity


@torch.no_grad()
def generate_latents(velocity_fn: VelocityFn, noise: torch.Tensor, *, num_inference_steps: int,
                     guidance_scale: float | Sequence[float], time_shift: float = 3.0,
                     model_dtype=torch.float32) -> torch.Tensor:
    """Sample latents (B, C, h, w) float32 from noise (B, C, h, w).

    guidance_scale: one value, or one per model call (a guidance schedule). With guidance (any value > 0) the
    velocity function returns 2B rows (cond rows, then uncond rows, as the sequences were built) and
    v = v_uncond + g * (v_cond - v_uncond), computed in the model dtype as upstream; without, B rows.
    """
    sampler = FlowEulerSampler(num_inference_steps, time_shift)
    scales = list(guidance_scale) if isinstance(guidance_scale, Sequence) else \
        [guidance_scale] * sampler.num_model_calls
    if len(scales) != sampler.num_model_calls:
        raise ValueError(f"guidance_scale has {len(scales)} values for {sampler.num_model_calls} model calls.")
    use_cfg = any(g > 0 for g in scales)
    # Upstream draws float32 noise and rounds it to the model dtype before sampling in float32.
    x = noise.to(model_dtype).float()
    for i in range(sampler.num_model_calls):
        t = sampler.timesteps[i].expand(x.shape[0]).to(x.device)
        v = velocity_fn(x, t, i)
        if use_cfg:
            v_cond, v_uncond = v.chunk(2)
            v = v_uncond + scales[i] * (v_cond - v_uncond)
        x = sampler.step(x, v, i)
    return x


def seeded_noise(seeds: list[int], shape: tuple[int, int, int]) -> torch.Tensor:
    """Initial latents (B, C, h, w), one CPU generator per row: a row's noise depends only on its seed."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
