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
and stop flags on the device and one host sync per token, as `showo2.vqa.greedy_answers`.

Shape legend: B rows, L prompt length, L' kept length, H width, N image tokens, nkv KV heads, hd head dim.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

from flashu_batch.flashu.config import FlashUUnderstandingConfig
from flashu_batch.flashu.ffn_prune import decoder_layer, importance_order, kept_widths, reorder_ffn_
from flashu_batch.flashu.layer_skip import layers_to_skip
from flashu_batch.flashu.wanda import record_ffn_inputs, wanda_scores
from flashu_batch.showo2.kv_cache import DecodeKVCache
from flashu_batch.showo2.layouts import Sequences
from flashu_batch.showo2.modeling import Showo2, additive_mask
from flashu_batch.showo2.vqa import batch_prompts, decode_key_mask, decode_tokens, greedy_answers, prompt_embeddings


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

    def pipeline_kwargs(self) -> dict:
        """Keyword arguments that make `Showo2Pipeline.answer` run this specialist."""
        return dict(decode_fn=self.greedy_answers)

    def pruned_token_count(self) -> int:
        """Image tokens that V-norm pruning drops: the ratio's share, keeping at least `token_prune_min_kept`."""
        n = self.model.config.num_image_tokens
        return max(0, min(int(self.config.token_prune_ratio * n), n - self.config.token_prune_min_kept))

    def run_layer(self, i, h, **kwargs):
        layer = self.model.showo.model.layers[i]
        if self.ffn_widths[i] == layer.mlp.down_proj.in_features:
            return layer(h, **kwargs)
        return decoder_layer(layer, h, self.ffn_widths[i], **kwargs)

    def prefill(self, embeds, position_ids, allowed, real, image, cache, score: bool = True):
        """Prompt through every layer with token pruning at layer K -> (last hidden (B, H) final-normed,
        per-layer key masks `real` (list of (B, Lk) bool), per-layer importance of the last token (layers,), or
        None when not `score`: layer skipping off pays nothing for it)."""
        llm, cfg = self.model.showo.model, self.config
        h, layer_real, inputs = embeds, [], []
        pe = llm.rotary_emb(h, position_ids)
        mask = additive_mask(allowed, h.dtype)
        drop = self.pruned_token_count()
        for i in range(len(llm.layers)):
            if i == cfg.token_prune_layer and drop > 0:
                kept = kept_token_indices(value_norms(llm.layers[i], h), image, drop)  # (B, L')
                h = h.gather(1, kept[..., None].expand(-1, -1, h.shape[-1]))
                position_ids, real = position_ids.gather(1, kept), real.gather(1, kept)
                rows = torch.arange(h.shape[0], device=h.device)[:, None, None]
                allowed = allowed[:, 0][rows, kept[:, :, None], kept[:, None, :]][:, None]  # (B, 1, L', L')
                pe, mask = llm.rotary_emb(h, position_ids), additive_mask(allowed, h.dtype)
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
                       eos_id: int, pad_id: int, return_logits: bool = False, sampler=None):
        """Drop-in for `showo2.vqa.greedy_answers` (same arguments and results; `sampler` draws the next tokens
        from the logits instead of argmax, as there)."""
        assert model is self.model, "the specialist decodes with its own (reordered) model"
        cfg = self.config
        seqs, pads, real, position_ids, allowed = batch_prompts(rows, pad_id, latents.device)
        B, L = seqs.input_ids.shape
        col = torch.arange(L, device=latents.device)
        first = seqs.image_offsets[:, None] + 1  # image tokens follow the time slot
        image = (col[None] >= first) & (col[None] < first + model.config.num_image_tokens)  # (B, L)
        cache = DecodeKVCache(len(model.showo.model.layers), max_new_tokens)
        skipping = cfg.layer_skip_ratio > 0  # off: no layer scoring at all, in the prefill or in any step
        hidden, layer_real, importance = self.prefill(prompt_embeddings(model, seqs, latents), position_ids,
                                                      allowed, real, image, cache, score=skipping)
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

        return decode_tokens(model.showo.lm_head(hidden).float(), decode, max_new_tokens=max_new_tokens,
                             eos_id=eos_id, return_logits=return_logits, sampler=sampler)


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
