"""FlashU knobs: a plain frozen dataclass, one field per technique, each switchable off on its own.

A dataclass rather than a pydantic model so the GPU benchmark machine (no pydantic) can import flashu; every value
is checked on construction (`__post_init__`, clear ValueErrors naming the field), and `from_dict` is the edge for
JSON/YAML input: with pydantic installed it also checks types and refuses unknown fields before construction.
"""

import dataclasses
import math
from dataclasses import dataclass
from functools import partial

# Paper defaults for Show-o2 1.5B text-to-image (FlashU Table 7; design/flashu.md 2.1-2.7).
DEFAULT_GUIDANCE_SCHEDULE = ((24, 7.5), (11, 10.0))


def invalid(config, name: str, message: str):
    """Raise the error a bad knob gets: it names the class, the field and the value."""
    raise ValueError(f"{type(config).__name__}.{name} = {getattr(config, name)!r}: {message}")


def config_from_dict(cls, raw: dict):
    """The edge for spec/JSON input: unknown fields refused; types checked by pydantic where installed."""
    if not isinstance(raw, dict):
        raise ValueError(f"A {cls.__name__} must be a mapping of knobs, got {type(raw).__name__}.")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"Unknown {cls.__name__} fields {unknown}; known fields: {sorted(known)}.")
    try:
        from pydantic import TypeAdapter
    except ImportError:  # the GPU benchmark machine: construction still checks every value
        return cls(**raw)
    return TypeAdapter(cls).validate_python(raw)


@dataclass(frozen=True)
class FlashUGenerationConfig:
    """How a text-to-image specialist runs. Defaults reproduce the paper's 1.5B configuration (34 model calls)."""

    # Sampler grid points (model calls = steps - 1). Fewer steps are the largest single saving (35 vs the
    # official 50: 1.44x) at some loss of detail.
    num_inference_steps: int = 35
    # Piecewise-constant guidance as (model calls, scale) phases from the noise end; must cover every call. Low
    # guidance early keeps diversity, high guidance late adds detail. None (off): the request's constant guidance.
    guidance_schedule: tuple[tuple[int, float], ...] | None = DEFAULT_GUIDANCE_SCHEDULE
    # Fraction of each LLM FFN's neurons dropped, least Wanda importance first. 0 = off. Higher is faster and less
    # faithful.
    ffn_prune_ratio: float = 0.20
    # Kept FFN width is rounded down to a multiple of this (tensor-core friendly).
    ffn_width_multiple: int = 64
    # Hybrid FFN: the last this-many model calls (the low-noise end) run the full, unpruned network with no layer
    # skipping and no head cache (the paper's tau = 11 on a 35-step grid is 10 calls). 0 = pruned to the end.
    full_network_calls: int = 10
    # Fraction of LLM layers bypassed between recalculations (those whose output is most like their input). 0 = off.
    layer_skip_ratio: float = 0.20
    # Model calls between recalculations of the skip list (a recalculation call runs every layer and measures).
    layer_skip_interval: int = 10
    # Diffusion-head cache: every this-many calls the flow-head blocks run and their output is stored; the calls in
    # between reuse it with the current time embedding and skip the image path, the LLM and the blocks. None = off.
    head_cache_interval: int | None = 5
    # Wanda calibration: prompts (None: the 20 built-in ones), sampler grid points of each calibration generation
    # (activations gathered at every call, cond and uncond rows), its guidance scale and seed.
    calibration_prompts: tuple[str, ...] | None = None
    calibration_steps: int = 10
    calibration_guidance: float = 7.5
    calibration_seed: int = 0

    def __post_init__(self):
        fail = partial(invalid, self)

        for name in ("num_inference_steps", "calibration_steps"):
            if getattr(self, name) < 2:
                fail(name, "must be >= 2 (grid points; model calls = steps - 1).")
        for name in ("ffn_prune_ratio", "layer_skip_ratio"):
            if not 0 <= getattr(self, name) < 1:
                fail(name, "must be in [0, 1) (0 turns the technique off).")
        for name in ("ffn_width_multiple", "layer_skip_interval"):
            if getattr(self, name) < 1:
                fail(name, "must be >= 1.")
        if self.head_cache_interval is not None and self.head_cache_interval < 1:
            fail("head_cache_interval", "must be >= 1, or None to turn the head cache off.")
        if not 0 <= self.full_network_calls <= self.num_model_calls:
            fail("full_network_calls", f"must be in [0, {self.num_model_calls}] (the model calls of "
                                       f"num_inference_steps={self.num_inference_steps}).")
        if not math.isfinite(self.calibration_guidance) or self.calibration_guidance < 0:
            fail("calibration_guidance", "must be a finite number >= 0.")
        if self.guidance_schedule is not None:
            # JSON gives lists; keep the frozen config hashable and comparable
            object.__setattr__(self, "guidance_schedule", tuple(tuple(p) for p in self.guidance_schedule))
            for i, (calls, scale) in enumerate(self.guidance_schedule):
                if calls < 1 or not math.isfinite(scale) or scale < 0:
                    fail("guidance_schedule", f"phase {i} = ({calls}, {scale}): the call count must be >= 1 and "
                                              f"the scale a finite number >= 0.")
            covered = sum(calls for calls, _ in self.guidance_schedule)
            if covered < self.num_model_calls:
                fail("guidance_schedule", f"covers {covered} model calls but num_inference_steps="
                                          f"{self.num_inference_steps} makes {self.num_model_calls}; lengthen the "
                                          f"last phase or set it to None.")
        if self.calibration_prompts is not None:
            object.__setattr__(self, "calibration_prompts", tuple(self.calibration_prompts))
            if not self.calibration_prompts:
                fail("calibration_prompts", "must hold at least one prompt, or be None for the built-in ones.")

    @property
    def num_model_calls(self) -> int:
        return self.num_inference_steps - 1

    @classmethod
    def off(cls, num_inference_steps: int = 50) -> "FlashUGenerationConfig":
        """Every technique off: the specialist then computes exactly what the baseline computes."""
        return cls(num_inference_steps=num_inference_steps, guidance_schedule=None, ffn_prune_ratio=0.0,
                   full_network_calls=0, layer_skip_ratio=0.0, head_cache_interval=None)

    @classmethod
    def from_dict(cls, raw: dict) -> "FlashUGenerationConfig":
        return config_from_dict(cls, raw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class FlashUUnderstandingConfig:
    """How a VQA specialist runs (the paper publishes no understanding defaults; ours are measured, see README)."""

    # Fraction of each LLM FFN's neurons dropped, by Wanda importance on understanding data (its own neuron order,
    # not generation's). Single pass: no hybrid phase. 0 = off.
    ffn_prune_ratio: float = 0.20
    ffn_width_multiple: int = 64
    # V-norm token pruning: before LLM layer `token_prune_layer` (0-based), drop this fraction of the image tokens
    # with the largest value-vector norms; text tokens always stay. 0 = off.
    token_prune_ratio: float = 0.75
    token_prune_layer: int = 2
    # ...but never below this many image tokens: a small grid has no redundant tokens to spare (the 16-token
    # tiny-shapes model answers 94% -> 38% at 0.75, the objects themselves are dropped) and its prompt is mostly
    # text, so pruning it saves little. 729-token images (0.75 keeps 183) are unaffected.
    token_prune_min_kept: int = 64
    # Decode-time layer skipping: bypass this fraction of LLM layers for new tokens, re-measured (last token's
    # input/output cosine) every `layer_skip_interval` generated tokens. 0 = off.
    layer_skip_ratio: float = 0.0
    layer_skip_interval: int = 4
    # Calibration: number of (image, question) samples built in when no set is given, and their seed.
    calibration_samples: int = 20
    calibration_seed: int = 0

    def __post_init__(self):
        fail = partial(invalid, self)

        for name in ("ffn_prune_ratio", "token_prune_ratio", "layer_skip_ratio"):
            if not 0 <= getattr(self, name) < 1:
                fail(name, "must be in [0, 1) (0 turns the technique off).")
        for name in ("ffn_width_multiple", "layer_skip_interval", "calibration_samples"):
            if getattr(self, name) < 1:
                fail(name, "must be >= 1.")
        if self.token_prune_min_kept < 0:
            fail("token_prune_min_kept", "must be >= 0 (0: no floor).")
        if self.token_prune_layer < 0:
            fail("token_prune_layer", "must be >= 0 (0-based LLM layer index).")

    @classmethod
    def off(cls) -> "FlashUUnderstandingConfig":
        return cls(ffn_prune_ratio=0.0, token_prune_ratio=0.0, layer_skip_ratio=0.0)

    @classmethod
    def from_dict(cls, raw: dict) -> "FlashUUnderstandingConfig":
        return config_from_dict(cls, raw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
