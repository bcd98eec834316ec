"""FlashU knobs, validated once at the edge (pydantic): every technique can be switched off on its own."""

import math

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Paper defaults for Show-o2 1.5B text-to-image (FlashU Table 7; design/flashu.md 2.1-2.7).
DEFAULT_GUIDANCE_SCHEDULE = ((24, 7.5), (11, 10.0))


class FlashUGenerationConfig(BaseModel):
    """How a text-to-image specialist runs. Defaults reproduce the paper's 1.5B configuration (34 model calls)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_inference_steps: int = Field(
        35, ge=2, description="Grid points of the flow sampler (model calls = steps - 1). Fewer steps are the "
                              "largest single saving (35 vs the official 50: 1.44x) at some loss of detail.")
    guidance_schedule: tuple[tuple[int, float], ...] | None = Field(
        DEFAULT_GUIDANCE_SCHEDULE,
        description="Piecewise-constant guidance as (model calls, scale) phases, in order from the noise end; "
                    "must cover every model call. Low guidance early keeps diversity, high guidance late adds "
                    "detail. None: the request's own constant guidance scale.")
    ffn_prune_ratio: float = Field(
        0.20, ge=0.0, lt=1.0, description="Fraction of each LLM FFN's neurons dropped (least Wanda importance "
                                           "first). 0 turns pruning off. Higher is faster and less faithful.")
    ffn_width_multiple: int = Field(
        64, ge=1, description="Kept FFN width is rounded down to a multiple of this (tensor-core friendly).")
    full_network_calls: int = Field(
        10, ge=0, description="Hybrid FFN: the last this-many model calls (the low-noise end) run the full, unpruned "
                              "network with no layer skipping and no head cache. The paper's tau = 11 on a 35-step "
                              "grid is 10 calls. 0: pruned to the end.")
    layer_skip_ratio: float = Field(
        0.20, ge=0.0, lt=1.0, description="Fraction of LLM layers bypassed between recalculations (those whose "
                                           "output is most similar to their input). 0 turns skipping off.")
    layer_skip_interval: int = Field(
        10, ge=1, description="Model calls between recalculations of the skip list (a recalculation call runs "
                              "every layer and measures input/output similarity).")
    head_cache_interval: int | None = Field(
        5, ge=1, description="Diffusion-head cache: every this-many model calls the flow-head blocks run and their "
                             "output is stored; the calls in between reuse it with the current time embedding and "
                             "skip the image path, the LLM and the head blocks. None turns it off.")
    calibration_prompts: tuple[str, ...] | None = Field(
        None, description="Prompts for the Wanda calibration; None uses the 20 built-in prompts.")
    calibration_steps: int = Field(
        10, ge=2, description="Sampler grid points of each calibration generation (activations are gathered at "
                              "every model call, cond and uncond rows).")
    calibration_guidance: float = Field(7.5, ge=0.0, description="Guidance scale of the calibration generations.")
    calibration_seed: int = Field(0, description="Seed of the calibration noise.")

    @property
    def num_model_calls(self) -> int:
        return self.num_inference_steps - 1

    @model_validator(mode="after")
    def _check(self) -> "FlashUGenerationConfig":
        if self.guidance_schedule is not None:
            for i, (calls, scale) in enumerate(self.guidance_schedule):
                if calls < 1 or not math.isfinite(scale) or scale < 0:
                    raise ValueError(f"guidance_schedule phase {i} = ({calls}, {scale}): the call count must be "
                                     f">= 1 and the scale a finite number >= 0.")
            covered = sum(calls for calls, _ in self.guidance_schedule)
            if covered < self.num_model_calls:
                raise ValueError(f"guidance_schedule covers {covered} model calls but num_inference_steps="
                                 f"{self.num_inference_steps} makes {self.num_model_calls}; lengthen the last "
                                 f"phase or set guidance_schedule=None.")
        if self.full_network_calls > self.num_model_calls:
            raise ValueError(f"full_network_calls={self.full_network_calls} exceeds the {self.num_model_calls} "
                             f"model calls of num_inference_steps={self.num_inference_steps}.")
        return self

    @classmethod
    def off(cls, num_inference_steps: int = 50) -> "FlashUGenerationConfig":
        """Every technique off: the specialist then computes exactly what the baseline computes."""
        return cls(num_inference_steps=num_inference_steps, guidance_schedule=None, ffn_prune_ratio=0.0,
                   full_network_calls=0, layer_skip_ratio=0.0, head_cache_interval=None)
