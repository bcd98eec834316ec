"""Model-level VQA test inputs shared by tests/showo2 and tests/flashu: one-row prompts with random question tokens
in a 1000-token layout, and random image latents of the model's shape."""

import torch

from flashu_batch.showo2.layouts import vqa_sequence
from flashu_batch.showo2.tokenizer import SpecialTokens

TOKENS = SpecialTokens.from_layout(1000)
TEXT_A = [TOKENS.bos] + list(range(5, 18))
ROLE_B = [20, TOKENS.bos, 21, 20]


def random_prompts(model, question_lengths, seed=0):
    """-> (one-row Sequences per question length, latents (B, C, h, w)), the same for the same seed."""
    g = torch.Generator().manual_seed(seed)
    rows = [vqa_sequence(torch.randint(0, 1000, (n,), generator=g).tolist(), TEXT_A, ROLE_B, TOKENS,
                         model.config.num_image_slots) for n in question_lengths]
    latents = torch.randn(len(rows), model.config.image_latent_dim, *model.config.latent_size, generator=g)
    return rows, latents
