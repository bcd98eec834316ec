"""Image question answering: the understanding prompt through the LLM, then greedy decoding (upstream
inference_mmu.py / mmu_generate).

Upstream re-runs the whole growing sequence for every new token (`greedy_answer_recompute` keeps that loop as the
reference). Prefill with the omni mask plus KV-cached causal decoding is the same computation (appended tokens
attend to every earlier key and change no earlier row), batched here over prompts of different lengths.
"""

import torch
from transformers import DynamicCache

from flashu_batch.showo2.layouts import Sequences
from flashu_batch.showo2.modeling import Showo2, additive_mask, omni_attention_mask

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


@torch.no_grad()
def greedy_answers(model: Showo2, rows: list[Sequences], latents: torch.Tensor, *, max_new_tokens: int,
                   eos_id: int, pad_id: int, return_logits: bool = False):
    """Greedy answers for a batch of one-row prompts (any lengths) with one image each (latents (B, C, h, w)).

    Prefill with the omni mask (last-position logits only), then KV-cached decoding; each row stops at eos (not
    included) or after max_new_tokens. Returns the id lists, plus the per-step last-position logits
    (B, steps, V) when return_logits (rows that stopped keep receiving steps; their logits are not meaningful).
    """
    device = latents.device
    seqs, pads, real, position_ids, allowed = batch_prompts(rows, pad_id, device)
    B, L = seqs.input_ids.shape
    embeds = prompt_embeddings(model, seqs, latents)

    cache = DynamicCache(config=model.showo.config)
    out = model.showo(inputs_embeds=embeds, attention_mask=additive_mask(allowed, embeds.dtype),
                      position_ids=position_ids, cache=cache, use_cache=True, logits_to_keep=1)
    answers = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    step_logits = []
    for step in range(max_new_tokens):
        logits = out.logits[:, -1].float()  # (B, V)
        if return_logits:
            step_logits.append(logits)
        next_ids = logits.argmax(dim=-1)  # (B,)
        done |= next_ids == eos_id
        for i in (~done).nonzero().flatten().tolist():
            answers[i].append(int(next_ids[i]))
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        keys_real = torch.cat([real, torch.ones(B, step + 1, dtype=torch.bool, device=device)], dim=1)
        out = model.showo(input_ids=next_ids[:, None], position_ids=(L - pads + step)[:, None],
                          attention_mask=additive_mask(keys_real[:, None, None, :], embeds.dtype),
                          cache=cache, use_cache=True)
    if return_logits:
        return answers, torch.stack(step_logits, dim=1)
    return answers


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
