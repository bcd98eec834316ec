"""Wanda importance of every LLM FFN neuron: ||A_j||_2 * sum_i |W_down[i, j]|.

A = SiLU(gate_proj(x)) * up_proj(x) is the input of down_proj, so neuron j's contribution to the layer output is
A_j times column j of W_down; the score weighs the column's magnitude by how large the activation really gets on
the task's own data (Wanda, Sun et al. 2023, structured over whole neurons as FlashU does).
"""

from contextlib import contextmanager

import torch

from flashu_batch.showo2.modeling import Showo2


@contextmanager
def record_ffn_inputs(model: Showo2):
    """Accumulate sum of squares (fp32) of every LLM layer's down_proj input per neuron while the block runs.

    Yields a list with one (I,) tensor per layer, filled in place by forward pre-hooks on the stock modules.
    """
    layers = model.showo.model.layers
    sums = [torch.zeros(layer.mlp.down_proj.in_features, dtype=torch.float32,
                        device=layer.mlp.down_proj.weight.device) for layer in layers]

    def hook_for(i):
        def hook(module, args):
            sums[i] += args[0].float().pow(2).reshape(-1, args[0].shape[-1]).sum(dim=0)
        return hook

    handles = [layer.mlp.down_proj.register_forward_pre_hook(hook_for(i)) for i, layer in enumerate(layers)]
    try:
        yield sums
    finally:
        for handle in handles:
            handle.remove()


def wanda_scores(model: Showo2, sum_squares: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per layer, the (I,) neuron scores from recorded sums of squares."""
    return [sq.sqrt() * layer.mlp.down_proj.weight.detach().float().abs().sum(dim=0)
            for sq, layer in zip(sum_squares, model.showo.model.layers)]
