"""Image question answering: the understanding prompt through the LLM, then greedy decoding (upstream
inference_mmu.py / mmu_generate), or sampling (`NucleusSampler`) where asked for.

Upstream re-runs the whole growing sequence for every new token (`greedy_answer_recompute` keeps that loop as the
reference). Prefill with the omni mask plus KV-cached causal decoding is the same computation (appended tokens
attend to every earlier key and change no earlier row), batched here over prompts of different lengths.
"""

from dataclasses import dataclass

import torch

from flashu_batch.showo2.kv_cache import DecodeKVCache, StaticDecodeKVCache
from flashu_batch.showo2.layouts import Sequences
from flashu_batch.showo2.modeling import Showo2, additive_mask, omni_attention_mask, omni_flex_mask
from flashu_batch.showo2.prefix_cache import find_multiple

UNDERSTANDING_TIME = 1.0  # images are clean data for understanding: the time token is t = 1


def prompt_embeddings(model: Showo2, seqs: Sequences, latents: torch.Tensor) -> torch.Tensor:
    """Embeddings (B, L, H) of VQA prompts with each row's image (latents (B, C, h, w)) in its slots."""
    t = torch.full((latents.shape[0],), UNDERSTANDING_TIME, device=latents.device)
    _, time_token = model.time_embedding(t)
    return model.assemble_embeddings(seqs.input_ids, seqs.image_offsets, time_token, model.embed_image(latents))


@torch.no_grad()
def prompt_logits(model: Showo2, seqs: Sequences, latents: torch.Tensor) -> torch.Tensor:
    """Language-head logits at every prompt position (B, L, V)."""
    embeds = prompt_embeddings(model, seqs, latents)
    mask = additive_mask(omni_attention_mask(seqs.modality_positions, embeds.shape[1]), embeds.dtype)
    return model.showo.lm_head(model.llm_hidden(embeds, mask))


def left_pad(rows: list[Sequences], pad_id: int) -> tuple[Sequences, torch.Tensor]:
    """Stack one-row prompts of different lengths into (B, L) by padding on the left -> (batch, pads (B,)).

    Left padding puts every row's last prompt token in the last column, so the decoded tokens of all rows are
    appended in the same column. Offsets shift by the padding; RoPE positions must not (see `position_ids`).
    """
    lengths = torch.tensor([r.input_ids.shape[1] for r in rows])
    L = int(lengths.max())
    pads = L - lengths
    input_ids = torch.stack([torch.cat([torch.full((int(p),), pad_id, dtype=torch.long), r.input_ids[0]])
                             for r, p in zip(rows, pads)])  # (B, L)
    offsets = torch.cat([r.image_offsets for r in rows]) + pads
    positions = torch.cat([r.modality_positions for r in rows]).clone()  # (B, 1, 2)
    positions[:, :, 0] += pads[:, None]
    return Sequences(input_ids, offsets, positions), pads


def batch_prompts(rows: list[Sequences], pad_id: int, device):
    """Left-pad one-row prompts into a batch on `device` -> (seqs, pads (B,), real (B, L) bool: key is a real token,
    position_ids (B, L): RoPE positions as if unpadded, allowed (B, 1, L, L) bool: the omni mask without pads)."""
    seqs, pads = left_pad(rows, pad_id)
    seqs, pads = seqs.to(device), pads.to(device)
    L = seqs.input_ids.shape[1]
    col = torch.arange(L, device=device)
    real = col[None, :] >= pads[:, None]
    position_ids = (col[None, :] - pads[:, None]).clamp(min=0)
    allowed = omni_attention_mask(seqs.modality_positions, L) & real[:, None, None, :]
    allowed |= torch.eye(L, dtype=torch.bool, device=device)  # a padding query sees itself: no empty softmax rows
    return seqs, pads, real, position_ids, allowed


def prefill_mask(seqs: Sequences, pads: torch.Tensor, allowed: torch.Tensor, dtype: torch.dtype, attend=None):
    """The prefill's attention mask (`batch_prompts`' allowed (B, 1, L, L)) as `model.showo` takes it: additive, or
    with a FlexAttention kernel `attend` (compiled: showo2/compile.py) a FlexMask that skips the masked blocks, handed
    over as transformers' ready-made mask mapping (its mask preparation would drop a mask that is not a tensor)."""
    if attend is None:
        return additive_mask(allowed, dtype)
    return {"full_attention": omni_flex_mask(seqs.modality_positions, pads, allowed.shape[-1], attend=attend)}


@dataclass
class NucleusSampler:
    """Next tokens (B,) from last-position logits (B, V) fp32: a draw from softmax(logits / temperature), kept to
    the nucleus (the most likely tokens until their probabilities reach top_p; the most likely one always stays).

    Each row draws from its own generator (one per row, on the logits' device), a fixed V numbers per step whether
    or not the row has stopped: a row's tokens depend on its own logits and seed only, never on its batch-mates.
    """

    temperature: float  # > 0 (0 is greedy decoding: pass no sampler)
    top_p: float  # in (0, 1]; 1.0 keeps every token
    generators: list[torch.Generator]  # (B,)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(logits / self.temperature, dim=-1)  # (B, V)
        if self.top_p < 1.0:
            sorted_probs, order = probs.sort(dim=-1, descending=True)  # (B, V) each
            before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the more likely tokens
            probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs.masked_fill(before >= self.top_p, 0.0))
        # The exponential race (gpt-fast's multinomial_sample_one_no_sync): argmax p / E, E ~ Exp(1), is a draw from
        # p with no host sync; one generator per row keeps the draws batch-independent.
        race = torch.stack([torch.empty_like(p).exponential_(1, generator=g) for p, g in zip(probs, self.generators)])
        return (probs / race).argmax(dim=-1)


def decode_key_mask(real: torch.Tensor, max_new_tokens: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive key mask (B, 1, 1, Lk + max_new_tokens) for cached decoding, built once per batch: the prompt's
    real keys (B, Lk) bool, then every generated position. Step s uses the view [..., :Lk + s + 1]."""
    generated = torch.ones(real.shape[0], max_new_tokens, dtype=torch.bool, device=real.device)
    return additive_mask(torch.cat([real, generated], dim=1)[:, None, None, :], dtype)


def all_done(done: torch.Tensor) -> bool:
    """The one host sync per generated token: have all rows stopped? done (B,) bool on the device."""
    return bool(done.all())


class TokenBuffer:
    """Generated ids kept on the device until decoding ends (no per-token, per-row host reads).

    tokens (B, max_new_tokens) is written in place; lengths (B,) counts the tokens each row keeps, i.e. those
    before its first eos (eos not included), as the row's answer.
    """

    def __init__(self, B: int, max_new_tokens: int, eos_id: int, device):
        self.tokens = torch.zeros(B, max_new_tokens, dtype=torch.long, device=device)
        self.lengths = torch.zeros(B, dtype=torch.long, device=device)
        self.done = torch.zeros(B, dtype=torch.bool, device=device)
        self.eos_id = eos_id

    def append(self, step: int, next_ids: torch.Tensor) -> None:
        """next_ids (B,): the tokens of generation step `step`."""
        self.tokens[:, step] = next_ids
        self.done |= next_ids == self.eos_id
        self.lengths += ~self.done

    def answers(self) -> list[list[int]]:
        """Id lists per row (two host reads for the whole answer)."""
        return [row[:n] for row, n in zip(self.tokens.tolist(), self.lengths.tolist())]


def decode_tokens(logits: torch.Tensor, decode, *, max_new_tokens: int, eos_id: int, return_logits: bool,
                  sampler: "NucleusSampler | None"):
    """The token loop every decoding path shares. logits (B, V) fp32: the prefill's last position;
    decode(next_ids (B,), step) -> the logits (B, V) fp32 after appending generation step `step`'s tokens. Returns the
    id lists (each row up to its first eos), plus the per-step logits (B, steps, V) when return_logits."""
    generated, step_logits = TokenBuffer(logits.shape[0], max_new_tokens, eos_id, logits.device), []
    for step in range(max_new_tokens):
        if return_logits:
            step_logits.append(logits)
        next_ids = logits.argmax(dim=-1) if sampler is None else sampler(logits)  # (B,)
        generated.append(step, next_ids)
        if step == max_new_tokens - 1 or all_done(generated.done):
            break
        logits = decode(next_ids, step)
    answers = generated.answers()
    if return_logits:
        return answers, torch.stack(step_logits, dim=1)
    return answers


def batch_bucket(rows: int) -> int:
    """The padded batch size of compiled decoding: the next power of two, so a few graphs serve every batch."""
    return 1 << (rows - 1).bit_length()


def static_decode_step(model: Showo2, cache: StaticDecodeKVCache, next_ids: torch.Tensor, positions: torch.Tensor,
                       order: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """One token per row on a StaticDecodeKVCache, the same shapes at every step (what torch.compile captures).

    next_ids, positions (B,) the tokens and their RoPE positions; order (B, capacity) long (`slot_order`): -1 for a
    real prompt key, g for the slot generation step g writes, capacity for pads and unused slots; step () long ->
    logits (B, V) fp32. Slot s is visible when order <= step: the mask grows on the device, not in the shapes."""
    dtype = model.showo.model.embed_tokens.weight.dtype
    mask = additive_mask((order <= step)[:, None, None, :], dtype)  # (B, 1, 1, capacity)
    out = model.showo(input_ids=next_ids[:, None], position_ids=positions[:, None], attention_mask=mask, cache=cache,
                      use_cache=True)
    return out.logits[:, -1].float()


class StaticDecoder:
    """Decoding on static shapes: the batch padded to `batch_bucket` rows, the cache to a multiple of
    `capacity_multiple` slots, every decode step the same graph. One per worker: one cache per batch bucket, reused
    (their buffers must not move under CUDA graphs). step_fn: `static_decode_step` or its compiled form
    (showo2/compile.py); new_cache(model, shape args) -> a StaticDecodeKVCache (compile.py marks its buffers static);
    attend: the prefill's FlexAttention kernel (`prefill_mask`; None: the additive mask).
    Greedy tokens equal `greedy_answers`' (the hidden slots weigh exactly 0); float rounding may differ."""

    def __init__(self, step_fn=static_decode_step, capacity_multiple: int = 64, new_cache=None, attend=None):
        self.step_fn, self.capacity_multiple, self.attend = step_fn, capacity_multiple, attend
        self.new_cache = new_cache or (lambda *shape: StaticDecodeKVCache(*shape))
        self.caches: dict[tuple, StaticDecodeKVCache] = {}  # (batch bucket, dtype, device) -> its cache

    def cache_for(self, model: Showo2, rows: int, prompt_len: int, max_new_tokens: int, dtype,
                  device) -> StaticDecodeKVCache:
        """The cache for a batch of `rows` prompts of `prompt_len` tokens: its batch bucket's, with room for the
        prompt and the answer at least. One per bucket, replaced by a larger one when a batch needs more (a cache per
        capacity would hold a whole model's KV buffers for every prompt length ever seen; a larger cache serves
        shorter prompts, its extra slots hidden)."""
        cfg = model.showo.config
        key = (batch_bucket(rows), dtype, device)
        capacity = find_multiple(prompt_len + max_new_tokens, self.capacity_multiple)
        cache = self.caches.get(key)
        if cache is None or cache.keys[0].shape[2] < capacity:
            cache = self.caches[key] = self.new_cache(cfg.num_hidden_layers, key[0], cfg.num_key_value_heads,
                                                      capacity, cfg.hidden_size // cfg.num_attention_heads, dtype,
                                                      device)
        cache.reset()
        return cache

    def prefill(self, model: Showo2, seqs: Sequences, pads, embeds, allowed, real, position_ids,
                max_new_tokens: int):
        """Prompt (embeds (B, L, H), `batch_prompts`' other results) into the cache -> (logits (B, V) fp32 of the
        last position, decode(next_ids, step) -> logits (B, V) fp32) for `decode_tokens`."""
        B, L = real.shape
        cache = self.cache_for(model, B, L, max_new_tokens, embeds.dtype, embeds.device)
        out = model.showo(inputs_embeds=embeds, attention_mask=prefill_mask(seqs, pads, allowed, embeds.dtype,
                                                                            self.attend),
                          position_ids=position_ids, cache=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].float(), self.decoder(model, cache, position_ids, slot_order(real, cache, L))

    def decoder(self, owner, cache: StaticDecodeKVCache, position_ids: torch.Tensor, order):
        """decode(next_ids (B,), step) -> logits (B, V) fp32, on a cache a prefill of B rows of L tokens filled
        (position_ids (B, L)): step_fn(owner, cache, ids, positions, order, step) on the bucket's rows. The next
        token's slot, RoPE positions and visible keys advance on the device (no host values: one graph)."""
        (B, L), device = position_ids.shape, position_ids.device
        ids, positions = (torch.zeros(cache.keys[0].shape[0], dtype=torch.long, device=device) for _ in range(2))
        positions[:B] = position_ids[:, -1] + 1  # RoPE position of the first generated token
        step_t = torch.zeros((), dtype=torch.long, device=device)
        cache.position = torch.full((1,), L, dtype=torch.long, device=device)  # generation step g writes slot L + g

        def decode(next_ids, step):
            ids[:B] = next_ids
            logits = self.step_fn(owner, cache, ids, positions, order, step_t)[:B].clone()  # (B, V)
            for counter in (cache.position, positions, step_t):
                counter.add_(1)
            return logits

        return decode


def slot_order(real: torch.Tensor, cache: StaticDecodeKVCache, L: int) -> torch.Tensor:
    """A key layout's visibility order (Bb, C) long over the cache's Bb rows and C slots, as `static_decode_step`
    reads it (slot s is visible at step g when order <= g): -1 for the real prompt keys (real (B, Lk) bool, Lk <= L:
    fewer where tokens were pruned), g for slot L + g (generation step g writes it), C for the rest: padding, slots
    [Lk, L) never written, unused slots, and the bucket's pad rows, which so see their own generated keys only (no
    empty softmax row, no NaN)."""
    (B, Lk), (Bb, _, C, _) = real.shape, cache.keys[0].shape
    slot = torch.arange(C, device=real.device)
    order = torch.where(slot >= L, slot - L, C).repeat(Bb, 1)
    order[:B, :Lk] = torch.where(real, -1, C)
    return order


@torch.no_grad()
def greedy_answers(model: Showo2, rows: list[Sequences], latents: torch.Tensor, *, max_new_tokens: int,
                   eos_id: int, pad_id: int, return_logits: bool = False, sampler: NucleusSampler | None = None,
                   static: StaticDecoder | None = None):
    """Greedy answers for a batch of one-row prompts (any lengths) with one image each (latents (B, C, h, w)).

    Prefill with the omni mask (last-position logits only), then KV-cached decoding into a preallocated cache
    (showo2/kv_cache.py); each row stops at eos (not included) or after max_new_tokens. Token ids and stop flags
    stay on the device: one host sync per step (`all_done`). Returns the id lists, plus the per-step last-position
    logits (B, steps, V) when return_logits (rows that stopped keep receiving steps; their logits are not
    meaningful). sampler: picks the next tokens from the logits instead of argmax (sampling; None: greedy).
    static: decode on static shapes (`StaticDecoder`, the compiled path) instead of the growing cache.
    """
    device = latents.device
    seqs, pads, real, position_ids, allowed = batch_prompts(rows, pad_id, device)
    B, L = seqs.input_ids.shape
    embeds = prompt_embeddings(model, seqs, latents)
    loop = dict(max_new_tokens=max_new_tokens, eos_id=eos_id, return_logits=return_logits, sampler=sampler)
    if static is not None:
        return decode_tokens(*static.prefill(model, seqs, pads, embeds, allowed, real, position_ids, max_new_tokens),
                             **loop)

    cache = DecodeKVCache(model.showo.config.num_hidden_layers, max_new_tokens)
    out = model.showo(inputs_embeds=embeds, attention_mask=additive_mask(allowed, embeds.dtype),
                      position_ids=position_ids, cache=cache, use_cache=True, logits_to_keep=1)
    key_mask = decode_key_mask(real, max_new_tokens, embeds.dtype)  # (B, 1, 1, L + max_new_tokens)
    next_position = L - pads  # (B,) RoPE position of the first generated token

    def decode(next_ids, step):
        return model.showo(input_ids=next_ids[:, None], position_ids=(next_position + step)[:, None],
                           attention_mask=key_mask[..., :L + step + 1], cache=cache,
                           use_cache=True).logits[:, -1].float()

    return decode_tokens(out.logits[:, -1].float(), decode, **loop)


@torch.no_grad()
def greedy_answer_recompute(model: Showo2, seqs: Sequences, latents: torch.Tensor, *, max_new_tokens: int,
                            eos_id: int) -> tuple[list[int], torch.Tensor]:
    """The official decoding loop (mmu_generate), for reference: one prompt, the whole sequence re-run for every
    new token with a grown mask (new row = previous last row + itself). Returns (ids, step_logits (steps, V))."""
    embeds = prompt_embeddings(model, seqs, latents)  # (1, L, H)
    allowed = omni_attention_mask(seqs.modality_positions, embeds.shape[1])  # (1, 1, L, L)
    ids, step_logits = [], []
    for _ in range(max_new_tokens):
        hidden = model.llm_hidden(embeds, additive_mask(allowed, embeds.dtype))
        logits = model.showo.lm_head(hidden)[:, -1].float()  # upstream computes logits at every position
        step_logits.append(logits[0])
        next_id = int(logits.argmax(dim=-1))
        if next_id == eos_id:
            break
        ids.append(next_id)
        embeds = torch.cat([embeds, model.showo.model.embed_tokens(torch.tensor([[next_id]], device=embeds.device))],
                           dim=1)
        L = allowed.shape[-1]
        grown = torch.zeros(1, 1, L + 1, L + 1, dtype=torch.bool, device=allowed.device)
        grown[:, :, :L, :L] = allowed
        grown[:, :, L, :L] = allowed[:, :, L - 1, :L]
        grown[:, :, L, L] = True
        allowed = grown
    return ids, torch.stack(step_logits)
