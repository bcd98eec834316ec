"""Image question answering: the understanding prompt through the LLM, then greedy decoding (upstream
inference_mmu.py / mmu_generate).

Upstream re-runs the whole growing sequence for every new token. Prefill with the omni mask plus KV-cached causal
decoding is the same computation (appended tokens attend to every earlier key and change no earlier row), so it is
used here; the golden parity check compares its per-step logits against the recompute path.
"""

import torch
from transformers import DynamicCache

from showo2.layouts import Sequences
from showo2.modeling import Showo2, additive_mask, omni_attention_mask

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


@torch.no_grad()
def greedy_answer(model: Showo2, seqs: Sequences, latents: torch.Tensor, *, max_new_tokens: int,
                  eos_id: int) -> tuple[list[int], torch.Tensor]:
    """Greedy answer ids for one prompt (B = 1), stopping at eos (not included) or after max_new_tokens.

    Returns (ids, step_logits (steps, V)): the last-position logits before each generated token.
    """
    assert seqs.input_ids.shape[0] == 1, f"greedy_answer decodes one prompt, got {seqs.input_ids.shape[0]}"
    embeds = prompt_embeddings(model, seqs, latents)
    mask = additive_mask(omni_attention_mask(seqs.modality_positions, embeds.shape[1]), embeds.dtype)
    cache = DynamicCache(config=model.showo.config)
    out = model.showo(inputs_embeds=embeds, attention_mask=mask, cache=cache, use_cache=True,
                      logits_to_keep=1)
    ids, step_logits = [], []
    for _ in range(max_new_tokens):
        logits = out.logits[:, -1].float()  # (1, V)
        step_logits.append(logits[0])
        next_id = int(logits.argmax(dim=-1))
        if next_id == eos_id:
            break
        ids.append(next_id)
        out = model.showo(input_ids=torch.tensor([[next_id]], device=embeds.device), cache=cache,
                          use_cache=True)
    return ids, torch.stack(step_logits)
