"""Dynamic layer skipping: bypass the LLM layers whose output is most similar to their input.

Importance of layer i = 1 - mean cosine(input_i, output_i) over the rows and positions of a recalculation call.
As upstream (flashu/layer_skipping.py), the last layer's "output" is the final-RMSNorm-ed state, which biases it
towards being kept.
"""

import torch
import torch.nn.functional as F


def layer_importance(hidden_states: list[torch.Tensor]) -> torch.Tensor:
    """hidden_states: the L + 1 states (B, S, H) around L layers -> (L,) importances, fp32."""
    return torch.stack([1 - F.cosine_similarity(a.float(), b.float(), dim=-1).mean()
                        for a, b in zip(hidden_states[:-1], hidden_states[1:])])


def layers_to_skip(importance: torch.Tensor, ratio: float) -> frozenset[int]:
    """The int(L * ratio) least important layers (one host sync, on recalculation calls only)."""
    n = int(len(importance) * ratio)
    if n == 0:
        return frozenset()
    if importance.device.type == "meta":  # FLOP counting: which layers does not change the count
        return frozenset(range(n))
    return frozenset(torch.topk(importance, n, largest=False).indices.tolist())
