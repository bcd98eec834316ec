"""A preallocated KV cache written in place (gpt-fast's KVCache), for cached decoding with the stock Qwen2 layers.

transformers' DynamicCache concatenates every layer's keys and values with each new token (a copy of the whole
cache per layer per token). This cache allocates each layer's buffers once, on the layer's first `update` (the
prefill), with room for `max_new_tokens` more positions, and writes new keys/values into them in place. `update`
returns views of the filled part, so attention sees exactly the keys DynamicCache would hand it (same shapes, same
values) and the callers' masks keep their shapes. Fill lengths are Python ints: no host sync.

Each layer keeps its own length, so layers whose prompt keys were pruned (flashu/understanding.py) hold fewer.
(showo2/prefix_cache.py has its own StaticKVCache: every layer the same length, rewound to the prefix each step.)
Shape legend: B rows, nkv KV heads, Lk keys, hd head dim.
"""

import torch


class DecodeKVCache:
    """Stands in for transformers' `Cache` where the model calls `cache.update(k, v, layer_idx, ...)`."""

    def __init__(self, num_layers: int, max_new_tokens: int):
        self.max_new_tokens = max_new_tokens  # room left after the first update of a layer
        self.keys: list[torch.Tensor | None] = [None] * num_layers  # (B, nkv, capacity, hd) each
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.lengths = [0] * num_layers  # filled positions per layer (host ints)

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int, *args, **kwargs):
        """k, v (B, nkv, n, hd) for the next n positions -> all keys, values so far (B, nkv, Lk, hd) (views)."""
        start = self.lengths[layer_idx]
        end = start + k.shape[2]
        if self.keys[layer_idx] is None:
            B, nkv, n, hd = k.shape
            self.keys[layer_idx] = k.new_empty(B, nkv, n + self.max_new_tokens, hd)
            self.values[layer_idx] = v.new_empty(B, nkv, n + self.max_new_tokens, v.shape[-1])
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        assert end <= keys.shape[2], f"layer {layer_idx}: {end} positions do not fit a cache of {keys.shape[2]}"
        keys[:, :, start:end] = k
        values[:, :, start:end] = v
        self.lengths[layer_idx] = end
        return keys[:, :, :end], values[:, :, :end]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.lengths[layer_idx]
