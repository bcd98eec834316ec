"""Negative prompts (showo2/layouts.py t2i_sequences negative_ids): the uncond CFG row holds the negative caption
instead of the official empty one. Checked against uncond rows built by hand and run through the full-sequence
reference step; with no negative prompt the sequences and latents are bit-identical to the official layout."""

import torch

from flashu_batch.showo2.layouts import Sequences, t2i_max_text_len, t2i_sequences
from flashu_batch.showo2.prefix_cache import PrefixCachedVelocity
from flashu_batch.showo2.t2i import full_sequence_velocity_fn, generate_latents, seeded_noise
from flashu_batch.showo2.tokenizer import SpecialTokens

TOKENS = SpecialTokens.from_layout(1000)
MAX_SEQ_LEN = 40
PROMPTS = [[11, 12, 13, 14, 15], [21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31]]
NEGATIVES = [[41, 42, 43], [51, 52, 53, 54, 55, 56, 57]]


def hand_built_row(caption: list[int], num_image_slots: int) -> list[int]:
    """One T2I row as misc.py prepare_gen_input lays a caption out (what a negative prompt's row must look like)."""
    max_text_len = t2i_max_text_len(MAX_SEQ_LEN, num_image_slots)
    return ([TOKENS.bos, *caption, TOKENS.boi, *[TOKENS.img_pad] * num_image_slots, TOKENS.eoi, TOKENS.eos]
            + [TOKENS.pad] * (max_text_len - len(caption)))


def hand_built_sequences(prompts, negatives, num_image_slots) -> Sequences:
    rows = [hand_built_row(c, num_image_slots) for c in [*prompts, *negatives]]
    offsets = torch.tensor([len(c) + 2 for c in [*prompts, *negatives]])
    return Sequences(torch.tensor(rows), offsets,
                     torch.stack([offsets, torch.full_like(offsets, num_image_slots)], dim=-1)[:, None])


def test_no_negative_prompt_is_the_official_layout_bit_for_bit():
    S = 17
    official = t2i_sequences(PROMPTS, TOKENS, S, MAX_SEQ_LEN)
    for negative_ids in (None, [[], []]):
        seqs = t2i_sequences(PROMPTS, TOKENS, S, MAX_SEQ_LEN, negative_ids=negative_ids)
        for a, b in zip((seqs.input_ids, seqs.image_offsets, seqs.modality_positions),
                        (official.input_ids, official.image_offsets, official.modality_positions)):
            assert torch.equal(a, b)
    assert torch.equal(official.input_ids, hand_built_sequences(PROMPTS, [[], []], S).input_ids)


def test_negative_captions_fill_the_uncond_rows_as_prompts_do():
    S = 17
    seqs = t2i_sequences(PROMPTS, TOKENS, S, MAX_SEQ_LEN, negative_ids=NEGATIVES)
    reference = hand_built_sequences(PROMPTS, NEGATIVES, S)
    assert torch.equal(seqs.input_ids, reference.input_ids)
    assert seqs.image_offsets.tolist() == [7, 13, 5, 9]
    assert torch.equal(seqs.modality_positions, reference.modality_positions)
    # without guidance there is no uncond row for them to go to
    no_cfg = t2i_sequences(PROMPTS, TOKENS, S, MAX_SEQ_LEN, with_uncond=False, negative_ids=NEGATIVES)
    assert no_cfg.input_ids.shape[0] == 2


def test_an_over_long_negative_caption_is_cut_like_a_prompt():
    S = 17
    limit = t2i_max_text_len(MAX_SEQ_LEN, S)
    long = list(range(100, 100 + limit + 5))
    seqs = t2i_sequences([[11]], TOKENS, S, MAX_SEQ_LEN, negative_ids=[long])
    assert seqs.input_ids[1].tolist() == hand_built_row(long[:limit], S)
    assert seqs.image_offsets.tolist() == [3, limit + 2]


def test_latents_with_a_negative_prompt_match_the_full_sequence_reference(make_tiny_model):
    """The fast prefix-cached loop with negative captions equals the official full-sequence step on uncond rows
    built by hand; and the negative prompt does change the image."""
    model = make_tiny_model(seed=3)
    c = model.config
    S = c.num_image_slots
    noise = seeded_noise([5, 6], (c.image_latent_dim, *c.latent_size))
    kw = dict(num_inference_steps=4, guidance_scale=5.0)
    fast = generate_latents(PrefixCachedVelocity(model, t2i_sequences(PROMPTS, TOKENS, S, MAX_SEQ_LEN,
                                                                      negative_ids=NEGATIVES), True), noise, **kw)
    reference = generate_latents(full_sequence_velocity_fn(model, hand_built_sequences(PROMPTS, NEGATIVES, S)),
                                 noise, **kw)
    torch.testing.assert_close(fast, reference, atol=1e-4, rtol=1e-4)
    empty = generate_latents(PrefixCachedVelocity(model, t2i_sequences(PROMPTS, TOKENS, S, MAX_SEQ_LEN), True),
                             noise, **kw)
    assert (fast - empty).abs().max() > 1e-3
    # a batch where only one row has a negative prompt: the other row is the official one, up to float rounding
    mixed = generate_latents(PrefixCachedVelocity(model, t2i_sequences(PROMPTS, TOKENS, S, MAX_SEQ_LEN,
                                                                       negative_ids=[NEGATIVES[0], []]), True),
                             noise, **kw)
    torch.testing.assert_close(mixed[1], empty[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[0], fast[0], atol=1e-5, rtol=1e-5)
