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


class StaticDecodeKVCache:
    """DecodeKVCache with one fixed shape, for compiled decoding: every layer's keys/values in zero-filled buffers
    (B, nkv, capacity, hd), allocated once and reused batch after batch, so every decode step sees identical shapes
    and buffer addresses (torch.compile without recompiles, CUDA graphs).

    The prefill (`position` None) writes rows [:b] and slots [:n] and attends to that view, as DecodeKVCache. A
    decode step writes slot `position` (a (1,) device tensor: the slot changes per token, the graph does not) and
    attends to the whole buffer; its key mask hides the slots not written yet (showo2/vqa.py StaticDecoder). The
    buffers start at zero, so a hidden slot holds finite values and contributes exactly 0 through its zero weight.
    """

    def __init__(self, num_layers: int, rows: int, num_kv_heads: int, capacity: int, head_dim: int, dtype, device):
        shape = (rows, num_kv_heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.position: torch.Tensor | None = None  # (1,) long: the slot decode steps write; None: prefill

    def reset(self) -> None:
        """Ready for the next batch: zeros (no stale keys from the last batch) and prefill mode."""
        for buffer in self.keys + self.values:
            buffer.zero_()
        self.position = None

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Prefill: k, v (b, nkv, n, hd) -> the written view (b, nkv, n, hd). Decode: k, v (B, nkv, 1, hd) -> the
        whole buffers (B, nkv, capacity, hd)."""
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        if self.position is None:
            b, _, n, _ = k.shape
            keys[:b, :, :n] = k
            values[:b, :, :n] = v
            return keys[:b, :, :n], values[:b, :, :n]
        keys.index_copy_(2, self.position, k)
        values.index_copy_(2, self.position, v)
        return keys, values
