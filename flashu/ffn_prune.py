"""Physical FFN pruning without a second copy of any weight.

Each layer's FFN neurons are reordered by importance, most important first: rows of gate_proj and up_proj and
columns of down_proj move together, which leaves the layer's function unchanged. The pruned network is then the
leading `width` neurons (contiguous row slices, really smaller matmuls) and the full network is the whole
matrix, so the hybrid schedule switches between them for free.
"""

import torch
import torch.nn.functional as F

from flashu_batch.showo2.modeling import Showo2


def kept_width(intermediate_size: int, ratio: float, multiple: int) -> int:
    """Neurons kept: floor((I - floor(I * ratio)) / multiple) * multiple (at least `multiple`); I when ratio = 0."""
    if ratio == 0:
        return intermediate_size
    kept = (intermediate_size - int(intermediate_size * ratio)) // multiple * multiple
    return max(kept, min(multiple, intermediate_size))


def kept_widths(model: Showo2, ratio: float, multiple: int) -> tuple[int, ...]:
    """`kept_width` of every LLM layer's FFN."""
    return tuple(kept_width(layer.mlp.down_proj.in_features, ratio, multiple) for layer in model.showo.model.layers)


def importance_order(scores: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per layer, neuron indices from most to least important (stable for ties)."""
    return [torch.sort(s.float(), descending=True, stable=True).indices for s in scores]


@torch.no_grad()
def reorder_ffn_(model: Showo2, orders: list[torch.Tensor]) -> None:
    """Permute every LLM layer's FFN neurons in place (an exact transformation of the network)."""
    for layer, order in zip(model.showo.model.layers, orders):
        mlp = layer.mlp
        order = order.to(mlp.gate_proj.weight.device)
        mlp.gate_proj.weight.copy_(mlp.gate_proj.weight[order])
        mlp.up_proj.weight.copy_(mlp.up_proj.weight[order])
        mlp.down_proj.weight.copy_(mlp.down_proj.weight[:, order])


def sliced_mlp(mlp, x: torch.Tensor, width: int) -> torch.Tensor:
    """The stock Qwen2 MLP restricted to its leading `width` neurons: x (..., H) -> (..., H)."""
    gate = F.linear(x, mlp.gate_proj.weight[:width])
    up = F.linear(x, mlp.up_proj.weight[:width])
    return F.linear(mlp.act_fn(gate) * up, mlp.down_proj.weight[:, :width])


def decoder_layer(layer, h, width, **attention_kwargs):
    """A stock Qwen2 decoder layer with its FFN cut to `width` neurons (same order of operations)."""
    residual = h
    h, _ = layer.self_attn(hidden_states=layer.input_layernorm(h), **attention_kwargs)
    h = residual + h
    return h + sliced_mlp(layer.mlp, layer.post_attention_layernorm(h), width)


def run_layer(layer, h, width, **kwargs):
    """LLM layer `layer` with its FFN cut to `width` neurons: the stock layer at full width (bit-identical to the
    baseline), else `decoder_layer`. Both specialists run their layers through it; FlashU T2I compiles it as one
    unit (one graph per width, shared by all layers)."""
    if width == layer.mlp.down_proj.in_features:
        return layer(h, **kwargs)
    return decoder_layer(layer, h, width, **kwargs)
