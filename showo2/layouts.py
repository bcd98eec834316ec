"""Token layouts of the Show-o2 sequences, exactly as the official scripts build them.

T2I (showlab/Show-o show-o2/models/misc.py prepare_gen_input): raw caption, no chat template, every row padded to
`max_seq_len`; cond rows first, then the empty-caption uncond rows (a negative prompt, where given, is the uncond
row's caption instead, laid out exactly like a prompt):

    [bos] + prompt[:max_text_len] + [boi] + [img_pad] * S + [eoi] + [eos] + [pad] * (max_text_len - len)

VQA (inference_mmu.py): system prompt and user turn, the image, the question, the assistant turn:

    text_a + [boi] + [img_pad] * S + [eoi] + question + role_b

with S = 1 + N image slots (time token, then N image tokens). Every builder returns `Sequences`.
"""

from dataclasses import dataclass
from typing import Literal

import torch

# The MMU prompt pieces, tokenised separately as inference_mmu.py does (bos is prepended to text_a).
VQA_SYSTEM_TEXT = "system\nYou are a helpful assistant.<|im_end|>"
VQA_USER_TEXT = "\n<|im_start|>user\n"
VQA_ASSISTANT_TEXT = "\n<|im_start|>assistant\n"

VQALayout = Literal["demo", "training"]


@dataclass
class Sequences:
    input_ids: torch.Tensor  # (B, L) int64; image slots hold img_pad placeholders
    image_offsets: torch.Tensor  # (B,) index of each row's time-token slot (image tokens follow it)
    modality_positions: torch.Tensor  # (B, 1, 2) [offset, length] of the bidirectional block of the omni mask

    def to(self, device) -> "Sequences":
        return Sequences(self.input_ids.to(device), self.image_offsets.to(device), self.modality_positions.to(device))


def t2i_max_text_len(max_seq_len: int, num_image_slots: int) -> int:
    """Prompt tokens that fit: the row also holds bos, boi, eoi, eos and the image slots."""
    return max_seq_len - num_image_slots - 4


def t2i_sequences(prompt_ids: list[list[int]], tokens, num_image_slots: int, max_seq_len: int,
                  with_uncond: bool = True, negative_ids: list[list[int]] | None = None) -> Sequences:
    """CFG batch for B prompts -> 2B rows of length max_seq_len (cond rows, then uncond rows; B rows without CFG).

    negative_ids: one caption per prompt for its uncond row (a negative prompt; [] is the official empty caption),
    or None for the empty caption everywhere. Captions longer than max_text_len are cut, as upstream does;
    offset = len(caption) + 2 (the official uncond row: 2).
    """
    max_text_len = t2i_max_text_len(max_seq_len, num_image_slots)
    if max_text_len < 0:
        raise ValueError(f"max_seq_len {max_seq_len} cannot hold {num_image_slots} image slots and 4 markers.")
    if negative_ids is not None and len(negative_ids) != len(prompt_ids):
        raise ValueError(f"negative_ids has {len(negative_ids)} captions for {len(prompt_ids)} prompts.")
    captions = [p[:max_text_len] for p in prompt_ids]
    if with_uncond:
        captions += [[] for _ in prompt_ids] if negative_ids is None else [n[:max_text_len] for n in negative_ids]
    rows, offsets = [], []
    for ids in captions:
        rows.append([tokens.bos, *ids, tokens.boi, *[tokens.img_pad] * num_image_slots, tokens.eoi, tokens.eos]
                    + [tokens.pad] * (max_text_len - len(ids)))
        offsets.append(len(ids) + 2)
    offsets = torch.tensor(offsets)
    return Sequences(
        input_ids=torch.tensor(rows, dtype=torch.long),
        image_offsets=offsets,
        modality_positions=torch.stack([offsets, torch.full_like(offsets, num_image_slots)], dim=-1)[:, None],
    )


def vqa_sequence(question_ids: list[int], text_a: list[int], role_b: list[int], tokens, num_image_slots: int,
                 layout: VQALayout = "demo") -> Sequences:
    """One VQA prompt row (B = 1).

    text_a = [bos] + tok(VQA_SYSTEM_TEXT) + tok(VQA_USER_TEXT); role_b = tok(VQA_ASSISTANT_TEXT).
    layout "demo" reproduces inference_mmu.py, whose bidirectional block starts one slot after the time token
    (the N image tokens plus <|vision_end|>); "training" puts the block on the time slot and image tokens, as the
    model was trained (datasets/mmu_dataset.py). `vqa_prompt_ids` makes the matching pieces.
    """
    ids = [*text_a, tokens.boi, *[tokens.img_pad] * num_image_slots, tokens.eoi, *question_ids, *role_b]
    offset = len(text_a) + 1
    block_start = offset + 1 if layout == "demo" else offset
    return Sequences(
        input_ids=torch.tensor([ids], dtype=torch.long),
        image_offsets=torch.tensor([offset]),
        modality_positions=torch.tensor([[[block_start, num_image_slots]]]),
    )


def vqa_prompt_ids(tokenizer, tokens, question: str, layout: VQALayout = "demo") -> tuple[list, list, list]:
    """(text_a, question_ids, role_b) for `vqa_sequence`, tokenised piecewise as upstream (no special tokens added).

    The demo feeds the bare question; training data had "\n" after <|vision_end|> and <|im_end|> after the question.
    """
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    text_a = [tokens.bos, *encode(VQA_SYSTEM_TEXT), *encode(VQA_USER_TEXT)]
    question_text = question if layout == "demo" else "\n" + question + "<|im_end|>"
    return text_a, encode(question_text), encode(VQA_ASSISTANT_TEXT)
