"""The FlashU VQA specialist: understanding-calibrated FFN pruning, V-norm token pruning, decode-time layer skipping.

Prefill runs the stock LLM layers one by one (so each layer can have its own FFN width, its own key length and its
own mask). Before layer K the image tokens are scored by the L2 norm of their value vectors,
v = W_v RMSNorm(h) + b_v, taken over the concatenation of all KV heads (= sqrt of the sum of the per-head squared
norms: one number per token, no head is privileged), and the fraction rho with the largest norms is dropped (large
value norm goes with little received attention, FlashU 2.8). Rows keep different tokens but the same count, so the
batch stays rectangular: kept indices come from one sort, with no per-row Python loop and no host sync. Kept
tokens keep their original RoPE positions; the omni mask is gathered to the kept rows and columns; layers >= K
cache only the kept keys.

Decode-time layer skipping: the last token's input/output cosine per layer is measured on the prefill and on every
`layer_skip_interval`-th generated token (those run every layer); the tokens in between bypass the least important
layers. What a bypassed layer writes to the KV cache: the key/value of its *input* (the residual stream that
passes through it), so later tokens attending at that layer find a key for every position and cache lengths stay
aligned; that costs one small k/v projection per skipped layer and token. With layer skipping off
(layer_skip_ratio 0) nothing is measured at all.

Decoding runs on a preallocated KV cache (showo2/kv_cache.py) with the key masks built once per batch, token ids
and stop flags on the device and one host sync per token, as `showo2.vqa.greedy_answers`. With layer skipping off
it can run on static shapes instead, as the exact path's compiled decoding (`showo2.vqa.StaticDecoder`):
`SpecialistDecoder` pads the batch to a power of two and keeps one StaticDecodeKVCache per batch bucket, and
`specialist_decode_step` (compiled by a worker's Compiler, under CUDA graphs on CUDA) runs every token of every
batch in a bucket as one graph. All layers write generation step g into slot L + g; the pruned layers' slots
[L', L) stay hidden. With layer skipping on, the skip set changes per step (and with it the graph), so decoding
stays on the growing DecodeKVCache, eager (`UnderstandingSpecialist.static_decoder` returns None). A compiling
worker's prefill runs on FlexAttention (showo2.modeling.omni_flex_mask: the omni mask, then from layer K the mask of
the kept tokens), which skips the blocks those masks hide.

Shape legend: B rows, L prompt length, L' kept length, H width, N image tokens, nkv KV heads, hd head dim.
"""

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

from flashu_batch.flashu.config import FlashUUnderstandingConfig
from flashu_batch.flashu.ffn_prune import importance_order, kept_widths, reorder_ffn_, run_layer
from flashu_batch.flashu.layer_skip import layers_to_skip
from flashu_batch.flashu.wanda import record_ffn_inputs, wanda_scores
from flashu_batch.showo2.compile import Compiler, static_cache
from flashu_batch.showo2.kv_cache import DecodeKVCache, StaticDecodeKVCache
from flashu_batch.showo2.layouts import Sequences
from flashu_batch.showo2.modeling import Showo2, additive_mask, omni_flex_mask
from flashu_batch.showo2.vqa import (StaticDecoder, batch_prompts, decode_key_mask, decode_tokens, greedy_answers,
                                     prompt_embeddings, slot_order)


def value_norms(layer, h: torch.Tensor) -> torch.Tensor:
    """(B, L, H) layer input -> (B, L) L2 norm of each token's value vector over all KV heads (fp32)."""
    return layer.self_attn.v_proj(layer.input_layernorm(h)).float().norm(dim=-1)


def kept_token_indices(norms: torch.Tensor, image: torch.Tensor, drop: int) -> torch.Tensor:
    """Indices (B, L - drop) in increasing order of the tokens kept: every non-image token, and in each row the
    image tokens without the `drop` largest value norms. norms (B, L) fp32, image (B, L) bool."""
    B, L = norms.shape
    pos = torch.arange(L, device=norms.device).expand(B, L)
    if drop == 0:
        return pos
    dropped = norms.masked_fill(~image, float("-inf")).topk(drop, dim=1).indices  # (B, drop); text never dropped
    order_key = pos.scatter(1, dropped, L)  # dropped positions sort behind every kept one
    return order_key.sort(dim=1).values[:, :L - drop]


def single_token_kv(layer, h, position_embeddings, cache):
    """A bypassed layer still writes the key/value of its input for the new token (see module docstring)."""
    attn = layer.self_attn
    x = layer.input_layernorm(h)
    shape = (*x.shape[:-1], -1, attn.head_dim)
    k = attn.k_proj(x).view(shape).transpose(1, 2)
    v = attn.v_proj(x).view(shape).transpose(1, 2)
    cos, sin = position_embeddings
    _, k = apply_rotary_pos_emb(k, k, cos, sin)
    cache.update(k, v, attn.layer_idx)


@dataclass(frozen=True)
class UnderstandingSpecialist:
    model: Showo2  # FFN neurons already reordered by understanding importance
    ffn_widths: tuple[int, ...]
    config: FlashUUnderstandingConfig

    def pipeline_kwargs(self, compiler: Compiler | None = None) -> dict:
        """Keyword arguments that make `Showo2Pipeline.answer` run this specialist: with a `compiler` (a worker's),
        on static shapes with the decode step compiled where `static_decoder` allows it, else eager. Call it once
        per worker: the static decoder keeps its caches."""
        static = self.static_decoder(compiler) if compiler is not None else None
        return dict(decode_fn=self.greedy_answers if static is None else partial(self.greedy_answers, static=static))

    def static_decoder(self, compiler: Compiler | None = None) -> "SpecialistDecoder | None":
        """A decoder on static shapes, its step compiled by `compiler` (uncompiled without one); None with layer
        skipping on: the skip set changes per step, and with it the graph, so that decoding stays eager."""
        if self.config.layer_skip_ratio > 0:
            return None
        if compiler is None:
            return SpecialistDecoder()
        return SpecialistDecoder(compiler(specialist_decode_step, decode=True), new_cache=static_cache,
                                 attend=compiler.flex_attention())

    def pruned_token_count(self) -> int:
        """Image tokens that V-norm pruning drops: the ratio's share, keeping at least `token_prune_min_kept`."""
        n = self.model.config.num_image_tokens
        return max(0, min(int(self.config.token_prune_ratio * n), n - self.config.token_prune_min_kept))

    def pruned_layers(self) -> range:
        """The layers that hold only the kept prompt keys: layer K on, none when token pruning drops nothing."""
        n = len(self.model.showo.model.layers)
        return range(self.config.token_prune_layer if self.pruned_token_count() > 0 else n, n)

    def run_layer(self, i, h, **kwargs):
        """LLM layer i at this specialist's FFN width for it."""
        return run_layer(self.model.showo.model.layers[i], h, self.ffn_widths[i], **kwargs)

    def prefill(self, embeds, position_ids, allowed, real, image, cache, score: bool = True, flex=None):
        """Prompt through every layer with token pruning at layer K -> (last hidden (B, H) final-normed,
        per-layer key masks `real` (list of (B, Lk) bool), per-layer importance of the last token (layers,), or
        None when not `score`: layer skipping off pays nothing for it). flex(kept=None) -> the omni mask as a FlexMask
        (showo2.modeling.omni_flex_mask with this batch's layout), used instead of the additive mask of `allowed`."""
        llm = self.model.showo.model
        h, layer_real, inputs = embeds, [], []
        pe = llm.rotary_emb(h, position_ids)
        mask = additive_mask(allowed, h.dtype) if flex is None else flex()
        drop, pruned = self.pruned_token_count(), self.pruned_layers()
        for i in range(len(llm.layers)):
            if i == pruned.start:  # token pruning (never reached when it drops nothing)
                kept = kept_token_indices(value_norms(llm.layers[i], h), image, drop)  # (B, L')
                h = h.gather(1, kept[..., None].expand(-1, -1, h.shape[-1]))
                position_ids, real = position_ids.gather(1, kept), real.gather(1, kept)
                pe = llm.rotary_emb(h, position_ids)
                if flex is None:
                    rows = torch.arange(h.shape[0], device=h.device)[:, None, None]
                    allowed = allowed[:, 0][rows, kept[:, :, None], kept[:, None, :]][:, None]  # (B, 1, L', L')
                    mask = additive_mask(allowed, h.dtype)
                else:
                    mask = flex(kept=kept)
            layer_real.append(real)
            inputs.append(h[:, -1])
            h = self.run_layer(i, h, attention_mask=mask, position_ids=position_ids, cache=cache,
                               position_embeddings=pe)
        out = llm.norm(h)[:, -1]
        return out, layer_real, (torch.stack(last_token_importance(inputs, out)) if score else None)

    def decode_masks(self, layer_real: list[torch.Tensor], max_new_tokens: int, dtype) -> list[torch.Tensor]:
        """Per-layer additive key masks (B, 1, 1, Lk + max_new_tokens), built once per batch: one per distinct key
        layout (before / after token pruning), shared by the layers that have it. Step s slices [..., :Lk + s + 1]."""
        built = {}
        for real in layer_real:
            if id(real) not in built:
                built[id(real)] = decode_key_mask(real, max_new_tokens, dtype)
        return [built[id(real)] for real in layer_real]

    def decode_step(self, next_ids, position, key_masks, skip, cache, score: bool = False):
        """One new token per row through the layers (bypassing `skip`) -> (final-normed hidden (B, H),
        importance (layers,) when `score`, else None). key_masks: `decode_masks`, sliced here to each layer's
        cache length."""
        llm = self.model.showo.model
        h = llm.embed_tokens(next_ids[:, None])  # (B, 1, H)
        pe = llm.rotary_emb(h, position[:, None])
        inputs = []
        for i, layer in enumerate(llm.layers):
            if score:
                inputs.append(h[:, -1])
            if i in skip:
                single_token_kv(layer, h, pe, cache)
                continue
            keys = cache.get_seq_length(i) + 1  # the prompt keys this layer kept, earlier tokens, this one
            h = self.run_layer(i, h, attention_mask=key_masks[i][..., :keys], position_ids=position[:, None],
                               cache=cache, position_embeddings=pe)
        out = llm.norm(h)[:, -1]
        return out, (torch.stack(last_token_importance(inputs, out)) if score else None)

    @torch.no_grad()
    def greedy_answers(self, model: Showo2, rows: list[Sequences], latents: torch.Tensor, *, max_new_tokens: int,
                       eos_id: int, pad_id: int, return_logits: bool = False, sampler=None,
                       static: "SpecialistDecoder | None" = None):
        """Drop-in for `showo2.vqa.greedy_answers` (same arguments and results; `sampler` draws the next tokens
        from the logits instead of argmax, as there; `static`: decode on static shapes, layer skipping off)."""
        assert model is self.model, "the specialist decodes with its own (reordered) model"
        cfg = self.config
        seqs, pads, real, position_ids, allowed = batch_prompts(rows, pad_id, latents.device)
        B, L = seqs.input_ids.shape
        col = torch.arange(L, device=latents.device)
        first = seqs.image_offsets[:, None] + 1  # image tokens follow the time slot
        image = (col[None] >= first) & (col[None] < first + model.config.num_image_tokens)  # (B, L)
        embeds = prompt_embeddings(model, seqs, latents)
        loop = dict(max_new_tokens=max_new_tokens, eos_id=eos_id, return_logits=return_logits, sampler=sampler)
        skipping = cfg.layer_skip_ratio > 0  # off: no layer scoring at all, in the prefill or in any step
        if static is not None:
            assert not skipping, "layer skipping changes the graph per step: it decodes eager"
            return decode_tokens(*static.prefill(self, seqs, pads, embeds, position_ids, allowed, real, image,
                                                 max_new_tokens), **loop)

        cache = DecodeKVCache(len(model.showo.model.layers), max_new_tokens)
        hidden, layer_real, importance = self.prefill(embeds, position_ids, allowed, real, image, cache,
                                                      score=skipping)
        skip = layers_to_skip(importance, cfg.layer_skip_ratio) if skipping else frozenset()
        key_masks = self.decode_masks(layer_real, max_new_tokens, hidden.dtype)
        next_position = L - pads  # (B,) RoPE position of the first generated token

        def decode(next_ids, step):
            nonlocal skip
            recalc = skipping and (step + 1) % cfg.layer_skip_interval == 0
            hidden, importance = self.decode_step(next_ids, next_position + step, key_masks,
                                                  frozenset() if recalc else skip, cache, score=recalc)
            if recalc:
                skip = layers_to_skip(importance, cfg.layer_skip_ratio)
            return model.showo.lm_head(hidden).float()  # (B, V)

        return decode_tokens(model.showo.lm_head(hidden).float(), decode, **loop)


def specialist_decode_step(specialist: UnderstandingSpecialist, cache: StaticDecodeKVCache, next_ids: torch.Tensor,
                           positions: torch.Tensor, slot_orders: tuple[torch.Tensor, ...],
                           step: torch.Tensor) -> torch.Tensor:
    """`showo2.vqa.static_decode_step` for the specialist (what torch.compile captures): one token per row through
    every layer at its own FFN width, the same shapes at every step. next_ids, positions (Bb,); slot_orders: one
    (Bb, C) `slot_order` per key layout the layers have: the prompt's keys (layers before K) and/or the kept ones
    (layers from K on, the last); step () long -> logits (Bb, V) fp32. Each layout's mask is built once per step and
    shared by its layers."""
    llm = specialist.model.showo.model
    h = llm.embed_tokens(next_ids[:, None])  # (Bb, 1, H)
    pe = llm.rotary_emb(h, positions[:, None])
    masks = [additive_mask((order <= step)[:, None, None, :], h.dtype) for order in slot_orders]  # (Bb, 1, 1, C)
    pruned = specialist.pruned_layers()
    for i in range(len(llm.layers)):
        h = specialist.run_layer(i, h, attention_mask=masks[-1 if i in pruned else 0], position_ids=positions[:, None],
                                 cache=cache, position_embeddings=pe)
    return specialist.model.showo.lm_head(llm.norm(h)[:, -1]).float()


class SpecialistDecoder(StaticDecoder):
    """StaticDecoder for the specialist, layer skipping off: the same batch buckets and caches (one per bucket,
    reused, grown for a longer prompt) and the same device-side decode loop, with the specialist's prefill (token
    pruning: layers >= K fill slots [:L']; on FlexAttention where `attend` is given) and step
    (`specialist_decode_step` or its compiled form). Greedy tokens equal the eager path's."""

    def __init__(self, step_fn=specialist_decode_step, capacity_multiple: int = 64, new_cache=None, attend=None):
        super().__init__(step_fn, capacity_multiple, new_cache, attend)

    def prefill(self, specialist: UnderstandingSpecialist, seqs: Sequences, pads, embeds, position_ids, allowed,
                real, image, max_new_tokens: int):
        """Prompt (embeds (B, L, H), `batch_prompts`' other results) of the B real rows into the bucket's cache ->
        (logits (B, V) fp32 of the last position, decode(next_ids, step) -> logits (B, V) fp32) for
        `decode_tokens`."""
        B, L = real.shape
        cache = self.cache_for(specialist.model, B, L, max_new_tokens, embeds.dtype, embeds.device)
        flex = None if self.attend is None else partial(omni_flex_mask, seqs.modality_positions, pads, L,
                                                        attend=self.attend)
        hidden, layer_real, _ = specialist.prefill(embeds, position_ids, allowed, real, image, cache, score=False,
                                                   flex=flex)
        pruned = specialist.pruned_layers()  # layers before it hold every prompt key, layers in it the kept ones
        layouts = ([layer_real[0]] if pruned.start > 0 else []) + ([layer_real[pruned.start]] if pruned else [])
        orders = tuple(slot_order(keys, cache, L) for keys in layouts)
        return specialist.model.showo.lm_head(hidden).float(), self.decoder(specialist, cache, position_ids, orders)


def last_token_importance(inputs: list[torch.Tensor], final: torch.Tensor) -> list[torch.Tensor]:
    """Per layer 1 - cos(input, output) of the last token, averaged over rows; the last layer's output is the
    final-normed state, as on the generation side (flashu/layer_skip.py)."""
    outputs = inputs[1:] + [final]
    return [1 - F.cosine_similarity(a.float(), b.float(), dim=-1).mean() for a, b in zip(inputs, outputs)]


@torch.no_grad()
def calibrate_understanding(model: Showo2, rows: list[Sequences], latents: torch.Tensor, pad_id: int,
                            batch_size: int = 8) -> list[torch.Tensor]:
    """Wanda scores from real VQA forwards: each (image latent, question) prompt through the exact baseline, plus
    a few greedy answer tokens (the decode-time activations count too)."""
    if not rows:
        raise ValueError("understanding calibration needs at least one (image, question) sample.")
    with record_ffn_inputs(model) as sums:
        for start in range(0, len(rows), batch_size):
            greedy_answers(model, rows[start:start + batch_size], latents[start:start + batch_size],
                           max_new_tokens=4, eos_id=-1, pad_id=pad_id)
    return wanda_scores(model, sums)


def specialize_understanding(model: Showo2, scores: list[torch.Tensor],
                             config: FlashUUnderstandingConfig) -> UnderstandingSpecialist:
    """Reorder `model`'s FFN neurons by understanding importance (in place, exact) and return the specialist."""
    reorder_ffn_(model, importance_order(scores))
    return UnderstandingSpecialist(model, understanding_widths(model, config), config)


def understanding_widths(model: Showo2, config: FlashUUnderstandingConfig) -> tuple[int, ...]:
    return kept_widths(model, config.ffn_prune_ratio, config.ffn_width_multiple)
