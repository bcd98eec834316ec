"""The per-call schedule of a FlashU text-to-image run, decided on the host from the call index alone.

Rules (design/flashu.md 2.2-2.7; k is the 1-based model call, K the number of calls):
- hybrid FFN: calls k > K - full_network_calls run the full network, with no skipping and no head cache;
- layer skipping: a recalculation call runs every layer and yields a new skip list when (k - 1) % interval == 0;
  the other calls bypass the listed layers;
- head cache: store the flow-head block output when k % interval == 0; reuse it on the calls in between once a
  store exists. A reuse call runs neither the image path nor the LLM, unless it is a recalculation call (then the
  LLM runs, without skipping, only to measure the new skip list);
- guidance: the scale of the schedule phase that contains k.
"""

from dataclasses import dataclass
from typing import Literal

from flashu_batch.flashu.config import FlashUGenerationConfig


@dataclass(frozen=True)
class CallPlan:
    call: int  # 1-based model call
    ffn: Literal["pruned", "full"]
    layers: Literal["all", "recalc", "skip"]  # all: skipping off or full phase; recalc: all layers + new list
    head: Literal["compute", "store", "reuse"]
    guidance: float | None  # None: the request's constant guidance

    @property
    def runs_llm(self) -> bool:
        """Whether the image path and the LLM run at all on this call."""
        return self.head != "reuse" or self.layers == "recalc"


def guidance_at(config: FlashUGenerationConfig, call: int) -> float | None:
    if config.guidance_schedule is None:
        return None
    end = 0
    for calls, scale in config.guidance_schedule:
        end += calls
        if call <= end:
            return scale
    raise AssertionError(f"call {call} beyond the validated guidance schedule")


def generation_plan(config: FlashUGenerationConfig) -> list[CallPlan]:
    K = config.num_model_calls
    skipping = config.layer_skip_ratio > 0
    T_cache = config.head_cache_interval
    plan, stored = [], False
    for k in range(1, K + 1):
        full = k > K - config.full_network_calls
        if not skipping or full:
            layers = "all"
        else:
            layers = "recalc" if (k - 1) % config.layer_skip_interval == 0 else "skip"
        if T_cache is None or full:
            head, stored = "compute", False  # the full phase clears the cache
        elif k % T_cache == 0:
            head, stored = "store", True
        else:
            head = "reuse" if stored else "compute"
        ffn = "full" if full or config.ffn_prune_ratio == 0 else "pruned"
        plan.append(CallPlan(k, ffn, layers, head, guidance_at(config, k)))
    return plan


def format_plan(plan: list[CallPlan]) -> str:
    """The plan as a table: one row per run of identical calls."""
    rows, start = [], 0
    for i in range(1, len(plan) + 1):
        a = plan[start]
        if i < len(plan) and (plan[i].ffn, plan[i].layers, plan[i].head, plan[i].guidance) == \
                (a.ffn, a.layers, a.head, a.guidance):
            continue
        calls = f"{a.call}" if i - 1 == start else f"{a.call}-{plan[i - 1].call}"
        guidance = "request" if a.guidance is None else f"{a.guidance:g}"
        rows.append(f"{calls:>7}  {a.ffn:<6}  {a.layers:<6}  {a.head:<7}  {'yes' if a.runs_llm else 'no':<3}  "
                    f"{guidance}")
        start = i
    return "  calls  ffn     layers  head     llm  guidance\n" + "\n".join(rows)
