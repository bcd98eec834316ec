"""The FlashU text-to-image specialist: calibration, and the step that follows the per-call plan.

`FlashUVelocity` is a drop-in `velocity_fn` for `showo2.t2i.generate_latents`, built on the exact prefix-cached
step. Per call it picks the FFN width (pruned slice or full), the bypassed LLM layers, and whether the flow-head
blocks run, store or are reused; on reused calls nothing upstream of the final layer runs. The text prefix cache
follows the network: it is refilled whenever the FFN width or the skip list changes (the reference recomputes the
whole sequence with the current network every call, so its prefix changes with them too).

Shape legend: R rows (2B with CFG), B images, S span slots, H LLM width, Dh flow-head width.
"""

from dataclasses import dataclass
from functools import partial

import torch

from flashu_batch.flashu.config import FlashUGenerationConfig
from flashu_batch.flashu.ffn_prune import importance_order, kept_widths, reorder_ffn_, run_layer
from flashu_batch.flashu.layer_skip import layer_importance, layers_to_skip
from flashu_batch.flashu.plan import CallPlan, generation_plan
from flashu_batch.flashu.wanda import record_ffn_inputs, wanda_scores
from flashu_batch.showo2.layouts import Sequences, t2i_sequences
from flashu_batch.showo2.modeling import Showo2
from flashu_batch.showo2.prefix_cache import PrefixCachedVelocity
from flashu_batch.showo2.t2i import generate_latents, seeded_noise

# Built-in calibration prompts: varied subjects, counts, colours, layouts and styles, as in T2I benchmarks.
CALIBRATION_PROMPTS = (
    "A red fox sitting in the snow.",
    "A bowl of fruit on a wooden table, oil painting.",
    "Two cats sleeping on a blue sofa.",
    "A futuristic city skyline at night with neon lights.",
    "A lighthouse on a rocky cliff at sunset.",
    "A close-up photo of a dew drop on a green leaf.",
    "Three yellow rubber ducks floating in a bathtub.",
    "An astronaut riding a horse on the moon.",
    "A watercolor painting of a mountain lake.",
    "A black and white photo of an old train station.",
    "A plate of sushi next to a cup of green tea.",
    "A child flying a kite in a field of flowers.",
    "A medieval castle surrounded by a moat.",
    "A cozy reading nook with a lamp and a stack of books.",
    "A red sports car parked on a rainy street.",
    "A cartoon dragon breathing fire.",
    "A snowy forest with a small wooden cabin.",
    "A portrait of an elderly man with a white beard.",
    "A green apple and an orange on a white background.",
    "An underwater scene with coral and tropical fish.",
)


@dataclass(frozen=True)
class GenerationSpecialist:
    """What a worker needs besides the base weights: FFN neurons already reordered in `model`, the kept width of
    each layer, and the knobs."""

    model: Showo2
    ffn_widths: tuple[int, ...]
    config: FlashUGenerationConfig

    def velocity_fn(self, seqs: Sequences, use_cfg: bool, compiler=None) -> "FlashUVelocity":
        return FlashUVelocity(self.model, seqs, use_cfg, self.config, self.ffn_widths, compiler)

    def guidance_scales(self, guidance_scale: float) -> list[float]:
        """One guidance value per model call: the schedule's, or the request's constant."""
        return [guidance_scale if p.guidance is None else p.guidance for p in generation_plan(self.config)]

    def pipeline_kwargs(self, guidance_scale: float, compiler=None) -> dict:
        """Keyword arguments that make `Showo2Pipeline.text_to_image` run this specialist (compiled by `compiler`, a
        showo2.compile.Compiler, when given)."""
        return dict(num_inference_steps=self.config.num_inference_steps,
                    guidance_scale=self.guidance_scales(guidance_scale),
                    velocity_factory=partial(self.velocity_fn, compiler=compiler))


def image_span(model: Showo2, x, time_token, use_cfg: bool):
    """Latents x (B, C, h, w), time token (B, H) -> the span (R, S, H): time slot, then the fused image tokens."""
    span = torch.cat([time_token[:, None], model.embed_image(x)], dim=1)  # (B, S, H)
    return torch.cat([span, span]) if use_cfg else span


def head_blocks(model: Showo2, *args):
    return model.head_blocks(*args)  # a region of its own (compiled); the method is looked up per call


def head_output(model: Showo2, blocks, temb, in_span):
    """Flow-head block outputs (R, S, Dh) -> velocity (R, C, h, w): the final layer, read from the span."""
    head_out = model.diffusion_head_b(blocks, temb, in_span)
    return model.read_velocity(head_out, torch.zeros_like(blocks[:, 0, 0], dtype=torch.long))


class FlashUVelocity(PrefixCachedVelocity):
    """compiler (showo2.compile.Compiler, None: eager) compiles the step per region: one LLM layer (`run_layer`),
    the image path, the flow-head blocks and the final layer; the plan only changes which of them run."""

    def __init__(self, model: Showo2, seqs: Sequences, use_cfg: bool, config: FlashUGenerationConfig,
                 ffn_widths: tuple[int, ...], compiler=None):
        layers = model.showo.model.layers
        self.full_widths = tuple(layer.mlp.down_proj.in_features for layer in layers)
        self.pruned_widths = tuple(ffn_widths)
        self.plan: list[CallPlan] = generation_plan(config)
        self.config = config
        self.skip: frozenset[int] = frozenset()  # the current skip list, set by recalculation calls
        self.network = (self.full_widths, frozenset())  # (widths, skipped layers) the LLM runs with now
        self.capture: list[torch.Tensor] | None = None  # hidden states recorded on recalculation calls
        self.head_state: torch.Tensor | None = None  # stored flow-head block output (R, S, Dh)
        super().__init__(model, seqs, use_cfg)  # fills the prefix with the full network (eager: once per network)
        self.prefix_network = self.network
        self.reuses = 0  # calls that reused the head cache (for tests and reports)
        compiled = compiler or (lambda fn: fn)
        self.layer_fn, self.image_span = compiled(run_layer), compiled(image_span)
        self.head_blocks, self.head_output = compiled(head_blocks), compiled(head_output)

    def run_llm(self, embeds, position_ids, mask, layer_fn=run_layer):
        """The LLM with the current network: pruned widths run sliced layers, listed layers are bypassed."""
        llm, (widths, skipped) = self.model.showo.model, self.network
        position_embeddings = llm.rotary_emb(embeds, position_ids)
        h = embeds
        for i, layer in enumerate(llm.layers):
            if i in skipped:
                continue  # the residual stream passes through unchanged
            if self.capture is not None:
                self.capture.append(h)
            h = layer_fn(layer, h, widths[i], attention_mask=mask, position_ids=position_ids,
                         cache=self.llm_cache.layer(i), position_embeddings=position_embeddings)
        h = llm.norm(h)
        if self.capture is not None:
            self.capture.append(h)  # upstream scores the last layer against the final-normed state
        return h

    def use_network(self, plan: CallPlan) -> None:
        widths = self.full_widths if plan.ffn == "full" else self.pruned_widths
        self.network = (widths, self.skip if plan.layers == "skip" else frozenset())
        if self.network != self.prefix_network:  # the prefix keys/values depend on the network
            self.fill_prefix(self.prefix_ids)
            self.prefix_network = self.network

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: torch.Tensor, step: int = 0) -> torch.Tensor:
        model, plan = self.model, self.plan[step]
        temb, time_token = model.time_embedding(t)  # (B, Dh), (B, H)
        if self.use_cfg:
            temb = torch.cat([temb, temb])  # (R, Dh)
        if plan.runs_llm:
            self.use_network(plan)
            span = self.image_span(model, x, time_token, self.use_cfg)  # (R, S, H)
            self.capture = [] if plan.layers == "recalc" else None
            hidden = self.run_llm(span, self.span_positions, self.span_mask, self.layer_fn)  # (R, S, H)
            if plan.layers == "recalc":
                self.skip = layers_to_skip(layer_importance(self.capture), self.config.layer_skip_ratio)
                self.capture = None
        if plan.head == "reuse":
            blocks = self.head_state
            self.reuses += 1
        else:
            blocks = self.head_blocks(model, hidden, temb, self.in_span, self.span_positions, self.span_mask,
                                      self.head_cache, self.span_rope)  # (R, S, Dh)
            self.head_state = blocks if plan.head == "store" else None
        return self.head_output(model, blocks, temb, self.in_span)


@torch.no_grad()
def calibrate_generation(model: Showo2, prompt_ids: list[list[int]], tokens, config: FlashUGenerationConfig,
                         max_seq_len: int | None = None, batch_size: int = 4) -> list[torch.Tensor]:
    """Wanda scores (one (I,) tensor per LLM layer) from real T2I runs of the unaccelerated model.

    Each prompt is generated with the exact baseline for `config.calibration_steps` grid points; every model call
    (noisy latents along the model's own trajectory at every t, fusion and time tokens, cond and uncond rows)
    feeds the down_proj input statistics, accumulated in fp32. The result does not depend on the batch size.
    """
    if not prompt_ids:
        raise ValueError("calibration needs at least one prompt.")
    c = model.config
    max_seq_len = max_seq_len or c.default_max_seq_len
    device = model.showo.model.embed_tokens.weight.device
    sums = None
    for start in range(0, len(prompt_ids), batch_size):
        batch = prompt_ids[start:start + batch_size]
        seqs = t2i_sequences(batch, tokens, c.num_image_slots, max_seq_len)
        seeds = [config.calibration_seed + start + i for i in range(len(batch))]
        noise = seeded_noise(seeds, (c.image_latent_dim, *c.latent_size)).to(device)
        # Built outside the recording: the prefix fill pads rows to the batch's longest prompt with placeholder
        # tokens that never occur in a real sequence; only the per-call image-span activations are recorded.
        velocity_fn = PrefixCachedVelocity(model, seqs, use_cfg=True)
        with record_ffn_inputs(model) as batch_sums:
            generate_latents(velocity_fn, noise, num_inference_steps=config.calibration_steps,
                             guidance_scale=config.calibration_guidance,
                             model_dtype=model.showo.model.embed_tokens.weight.dtype)
        sums = batch_sums if sums is None else [a + b for a, b in zip(sums, batch_sums)]
    return wanda_scores(model, sums)


def pruned_widths(model: Showo2, config: FlashUGenerationConfig) -> tuple[int, ...]:
    """Kept FFN width of every LLM layer under the config's pruning ratio."""
    return kept_widths(model, config.ffn_prune_ratio, config.ffn_width_multiple)


def specialize_generation(model: Showo2, scores: list[torch.Tensor],
                          config: FlashUGenerationConfig) -> GenerationSpecialist:
    """Reorder `model`'s FFN neurons by the scores (in place, exact) and return the specialist."""
    reorder_ffn_(model, importance_order(scores))
    return GenerationSpecialist(model, pruned_widths(model, config), config)
