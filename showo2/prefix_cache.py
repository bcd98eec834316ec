"""The exact fast T2I step: text prefix computed once, only the image span per step.

Under the omni mask the positions before the image (bos, prompt, boi) attend causally among themselves and never
to the image, so their keys/values in every LLM layer and every flow-head layer do not depend on x_t or t: they
are computed once per batch. Image queries never see the positions after the image (eoi, eos, pads), so those
are not run at all, and the language head is never run. Per step only the S = 1 + N image-span positions go
through the LLM and the flow head, attending to [cached prefix | span]. The image path (semantic layers + fusion)
and the time embedding are computed once for the cond and uncond rows, which share x_t and t.

The step has static shapes and no host syncs: the caches are allocated once, written in place, and the prefix
length is padded to a multiple of 8 with masked keys, so `torch.compile` can take the step whole.

Shape legend: R rows (2B with CFG), B images, P padded prefix length, S span slots (1 + N), nkv KV heads, hd head dim.
"""

import torch

from flashu_batch.showo2.layouts import Sequences
from flashu_batch.showo2.modeling import CachedPrefixMask, Showo2, additive_mask


def find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - n % k


def write_span(keys, values, start: int, k, v):
    """Write k, v (R, nkv, n, hd) into keys, values (R, nkv, max_len, hd) at `start` -> the filled views."""
    end = start + k.shape[2]
    keys[:, :, start:end] = k
    values[:, :, start:end] = v
    return keys[:, :, :end], values[:, :, :end]


class StaticKVCache:
    """Preallocated keys/values per layer, (R, nkv, max_len, hd) each; `update` writes at `start` in place.

    Duck-types the transformers cache interface the stock Qwen2 attention calls (`update(k, v, layer_idx)`),
    so stock decoder layers run unchanged on top of it.
    """

    def __init__(self, num_layers, rows, num_kv_heads, max_len, head_dim, dtype, device):
        shape = (rows, num_kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.start = 0  # where the next update writes; everything before it is attended

    def update(self, k, v, layer_idx, *args, **kwargs):
        return write_span(self.keys[layer_idx], self.values[layer_idx], self.start, k, v)

    def layer(self, layer_idx: int) -> "LayerKV":
        return LayerKV(self, layer_idx)


class LayerKV:
    """One layer's part of a StaticKVCache. It writes its own buffers whatever `layer_idx` the layer passes, so a
    decoder layer compiled once runs every layer without a graph per layer index (showo2/compile.py)."""

    def __init__(self, cache: StaticKVCache, layer_idx: int):
        self.cache, self.keys, self.values = cache, cache.keys[layer_idx], cache.values[layer_idx]

    def update(self, k, v, *args, **kwargs):
        return write_span(self.keys, self.values, self.cache.start, k, v)


class PrefixCachedVelocity:
    """`velocity_fn(x (B, C, h, w), t (B,), step) -> v (R, C, h, w)` for `t2i.generate_latents`, equal to the
    full-sequence step up to float rounding.

    seqs: the T2I rows (cond rows then uncond rows when `use_cfg`), all with one image of S slots. compiler: a
    showo2.compile.Compiler to run the step compiled whole (None: eager).
    """

    def __init__(self, model: Showo2, seqs: Sequences, use_cfg: bool, compiler=None):
        device = model.showo.model.embed_tokens.weight.device
        dtype = model.showo.model.embed_tokens.weight.dtype
        P = find_multiple(int(seqs.image_offsets.max()), 8)  # read on the host before the move: no device sync
        seqs = seqs.to(device)
        self.model, self.use_cfg, self.prefix_len = model, use_cfg, P
        R = seqs.input_ids.shape[0]
        S = model.config.num_image_slots
        offsets = seqs.image_offsets  # (R,)

        llm_cfg, head_cfg = model.showo.config, model.config.head
        self.llm_cache = StaticKVCache(llm_cfg.num_hidden_layers, R, llm_cfg.num_key_value_heads, P + S,
                                       llm_cfg.hidden_size // llm_cfg.num_attention_heads, dtype, device)
        self.head_cache = StaticKVCache(model.config.num_diffusion_layers, R, head_cfg.num_key_value_heads, P + S,
                                        head_cfg.head_dim, dtype, device)

        # Span queries see the row's real prefix (keys < offset) and the whole span; padded prefix keys are masked.
        # Only the prefix part needs a mask: the span is seen whole, so in half precision (the GPU dtypes, where
        # flash-class kernels run) the LLM and the flow head attend to it mask-free and merge the prefix part by
        # log-sum-exp (modeling.prefix_span_attention). In float32 the one dense mask row (R, 1, 1, P+S) stays: its
        # results do not depend on how much padding a batch holds, bit for bit (a row's image is the same in any
        # batch), which the merged form's rounding does not promise.
        allowed = torch.arange(P, device=device)[None, :] < offsets[:, None]  # (R, P)
        self.span_mask = CachedPrefixMask(additive_mask(allowed[:, None, None, :], dtype))  # prefix (R, 1, 1, P)
        if dtype not in (torch.bfloat16, torch.float16):
            self.span_mask = self.span_mask.dense(S)
        self.span_positions = offsets[:, None] + torch.arange(S, device=device)  # (R, S) absolute positions
        self.span_rope = model.head_rope(self.span_positions, dtype)  # cos, sin (R, 1, S, hd): the same every step
        self.in_span = torch.ones(R, S, 1, dtype=torch.bool, device=device)  # every span slot is modulated
        self.prefix_ids = seqs.input_ids[:, :P]
        self.fill_prefix(self.prefix_ids)
        self.step_fn = compiler(PrefixCachedVelocity.velocity) if compiler else PrefixCachedVelocity.velocity

    @torch.no_grad()
    def fill_prefix(self, prefix_ids: torch.Tensor) -> None:
        """Run the prefix (R, P) through the LLM and the flow head once, filling both caches."""
        model, (R, P) = self.model, prefix_ids.shape
        pos = torch.arange(P, device=prefix_ids.device)
        causal = additive_mask((pos[None, :] <= pos[:, None])[None, None].expand(R, 1, P, P), self.span_mask.dtype)
        position_ids = pos[None].expand(R, P)
        self.llm_cache.start = self.head_cache.start = 0
        hidden = self.run_llm(model.showo.model.embed_tokens(prefix_ids), position_ids, causal)
        # Prefix positions are outside the image span: the head blocks are plain pre-norm blocks there (temb unused).
        temb = torch.zeros(R, model.config.head.hidden_size, dtype=hidden.dtype, device=hidden.device)
        no_span = torch.zeros(R, P, 1, dtype=torch.bool, device=hidden.device)
        model.head_blocks(hidden, temb, no_span, position_ids, causal, self.head_cache)
        self.llm_cache.start = self.head_cache.start = P  # from now on every update writes the span

    def run_llm(self, embeds, position_ids, mask):
        """Stock Qwen2 decoder layers over embeds (R, L, H) with the static cache -> final-normed hidden."""
        llm = self.model.showo.model
        position_embeddings = llm.rotary_emb(embeds, position_ids)
        h = embeds
        for layer in llm.layers:
            h = layer(h, attention_mask=mask, position_ids=position_ids, cache=self.llm_cache,
                      position_embeddings=position_embeddings)
        return llm.norm(h)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: torch.Tensor, step: int = 0) -> torch.Tensor:
        return self.step_fn(self, x, t)

    def velocity(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The step itself: x (B, C, h, w), t (B,) -> v (R, C, h, w). Plain tensor code, compiled whole where asked."""
        model = self.model
        temb, time_token = model.time_embedding(t)  # (B, Dh), (B, H)
        span = torch.cat([time_token[:, None], model.embed_image(x)], dim=1)  # (B, S, H)
        if self.use_cfg:  # cond and uncond rows share x_t and t: the image path runs once
            span, temb = torch.cat([span, span]), torch.cat([temb, temb])  # (R, S, H), (R, Dh)
        hidden = self.run_llm(span, self.span_positions, self.span_mask)  # (R, S, H)
        head_out = model.flow_head(hidden, temb, self.in_span, self.span_positions, self.span_mask, self.head_cache,
                                   self.span_rope)
        return model.read_velocity(head_out, torch.zeros_like(self.span_positions[:, 0]))
