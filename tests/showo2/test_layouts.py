"""Tests for showo2.layouts (T2I / VQA sequence builders, VQA prompt pieces) and the omni-attention mask builder
(showo2.modeling.omni_attention_mask), against the golden set and against naive re-statements."""

import pytest
import torch

from flashu_batch.showo2.layouts import (
    VQA_ASSISTANT_TEXT, t2i_max_text_len, t2i_sequences, vqa_prompt_ids, vqa_sequence,
)
from flashu_batch.showo2.modeling import omni_attention_mask
from flashu_batch.showo2.tokenizer import SpecialTokens, build_tokenizer


@pytest.fixture(scope="module")
def golden_tokens(golden_meta) -> SpecialTokens:
    """Role ids of the golden set, read from cases.json (never hard-coded)."""
    tk = golden_meta["tokenizer"]
    ids = tk["showo_token_ids"]
    tokens = SpecialTokens(bos=ids["bos_id"], eos=ids["eos_id"], boi=ids["boi_id"], eoi=ids["eoi_id"],
                           img_pad=ids["img_pad_id"], vid_pad=ids["vid_pad_id"], pad=tk["pad_id"], img=ids["img_id"],
                           bov=ids["bov_id"], eov=ids["eov_id"])
    assert tokens == SpecialTokens.from_layout(tk["n_regular"])
    return tokens


# ------------------------------------------------------------------------------------------------------ T2I


def test_t2i_against_golden(golden_data, golden_meta, golden_tokens):
    s = golden_meta["settings"]
    prompts = [golden_data[f"t2i_velocity.prompt_ids.{i}"].tolist() for i in range(2)]
    assert len(prompts[1]) > s["max_text_len"]  # the long prompt is cut
    assert t2i_max_text_len(s["max_seq_len"], s["num_image_slots"]) == s["max_text_len"]
    seqs = t2i_sequences(prompts, golden_tokens, s["num_image_slots"], s["max_seq_len"])
    assert seqs.input_ids.dtype == torch.long
    assert torch.equal(seqs.input_ids, golden_data["t2i_velocity.input_ids"])
    assert torch.equal(seqs.modality_positions, golden_data["t2i_velocity.modality_positions"])
    assert torch.equal(seqs.image_offsets, golden_data["t2i_velocity.modality_positions"][:, 0, 0])
    # t2i_sample uses the same prompts.
    assert torch.equal(seqs.input_ids, golden_data["t2i_sample.input_ids"])
    assert torch.equal(seqs.modality_positions, golden_data["t2i_sample.modality_positions"])


def expected_t2i_row(prompt, tokens, S, max_seq_len):
    """The README's row formula, written out independently."""
    m = max_seq_len - S - 4
    p = prompt[:m]
    return [tokens.bos] + p + [tokens.boi] + [tokens.img_pad] * S + [tokens.eoi, tokens.eos] + [tokens.pad] * (m - len(p))


@pytest.mark.parametrize("with_uncond", [True, False])
def test_t2i_rows(with_uncond):
    tokens = SpecialTokens.from_layout(500)
    g = torch.Generator().manual_seed(0)
    S, max_seq_len = 5, 20  # max_text_len 11
    prompts = [torch.randint(0, 500, (n,), generator=g).tolist() for n in (0, 3, 11, 12, 30)]
    seqs = t2i_sequences(prompts, tokens, S, max_seq_len, with_uncond=with_uncond)
    B = len(prompts)
    rows = B * 2 if with_uncond else B
    assert seqs.input_ids.shape == (rows, max_seq_len)
    assert seqs.modality_positions.shape == (rows, 1, 2) and seqs.image_offsets.shape == (rows,)
    expected = [expected_t2i_row(p, tokens, S, max_seq_len) for p in prompts]
    expected_offsets = [min(len(p), 11) + 2 for p in prompts]
    if with_uncond:
        expected += [expected_t2i_row([], tokens, S, max_seq_len)] * B
        expected_offsets += [2] * B
    assert seqs.input_ids.tolist() == expected
    assert seqs.image_offsets.tolist() == expected_offsets
    assert seqs.modality_positions[:, 0, 0].tolist() == expected_offsets
    assert (seqs.modality_positions[:, 0, 1] == S).all()
    for row, off in zip(seqs.input_ids.tolist(), expected_offsets):  # the slots really are the image span
        assert row[off - 1] == tokens.boi and row[off:off + S] == [tokens.img_pad] * S and row[off + S] == tokens.eoi


def test_t2i_without_uncond_is_the_cond_half():
    tokens = SpecialTokens.from_layout(100)
    prompts = [[1, 2, 3], [4] * 9]
    both = t2i_sequences(prompts, tokens, 4, 16)
    cond = t2i_sequences(prompts, tokens, 4, 16, with_uncond=False)
    assert torch.equal(cond.input_ids, both.input_ids[:2])
    assert torch.equal(cond.modality_positions, both.modality_positions[:2])


def test_t2i_too_short_max_seq_len():
    with pytest.raises(ValueError, match=r"max_seq_len"):
        t2i_sequences([[1]], SpecialTokens.from_layout(100), 17, 20)


# ------------------------------------------------------------------------------------------------------ VQA


def golden_vqa_pieces(golden_data, golden_meta, S):
    ids = golden_data["mmu.input_ids"][0].tolist()
    question = golden_data["mmu.question_ids"].tolist()
    n_a = golden_meta["cases"]["mmu"]["settings"]["text_a_length"]
    n_b = len(ids) - n_a - (S + 2) - len(question)
    return ids[:n_a], question, ids[len(ids) - n_b:]


def test_vqa_demo_against_golden(golden_data, golden_meta, golden_tokens):
    settings = golden_meta["cases"]["mmu"]["settings"]
    S = golden_meta["settings"]["num_image_slots"]
    text_a, question, role_b = golden_vqa_pieces(golden_data, golden_meta, S)
    assert text_a[0] == golden_tokens.bos
    seqs = vqa_sequence(question, text_a, role_b, golden_tokens, S)  # "demo" is the default
    assert torch.equal(seqs.input_ids, golden_data["mmu.input_ids"])
    assert torch.equal(seqs.modality_positions, golden_data["mmu.modality_positions"])
    assert torch.equal(seqs.modality_positions, golden_data["masks.mmu_modality_positions"])
    assert seqs.input_ids.shape[1] == settings["prompt_length"]
    assert seqs.image_offsets.tolist() == [settings["time_slot_index"]]
    assert seqs.input_ids[0, settings["boi_index"]] == golden_tokens.boi
    assert seqs.input_ids[0, settings["eoi_index"]] == golden_tokens.eoi
    start, end = settings["mask_block"]  # demo quirk: image tokens plus <|vision_end|>, not the time slot
    assert seqs.modality_positions.tolist() == [[[start, end - start]]]


def test_vqa_training_layout(golden_data, golden_meta, golden_tokens):
    S = golden_meta["settings"]["num_image_slots"]
    text_a, question, role_b = golden_vqa_pieces(golden_data, golden_meta, S)
    demo = vqa_sequence(question, text_a, role_b, golden_tokens, S, layout="demo")
    training = vqa_sequence(question, text_a, role_b, golden_tokens, S, layout="training")
    assert torch.equal(training.input_ids, demo.input_ids)
    assert torch.equal(training.image_offsets, demo.image_offsets)
    time_slot = golden_meta["cases"]["mmu"]["settings"]["time_slot_index"]
    assert training.modality_positions.tolist() == [[[time_slot, S]]]  # block = time slot + image tokens
    assert training.input_ids[0, time_slot - 1] == golden_tokens.boi
    assert training.input_ids[0, time_slot + S] == golden_tokens.eoi


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(["system", "You", "are", "a", "helpful", "assistant", "user", "What", "is", "this"])


def test_vqa_prompt_ids(tok):
    tokens = SpecialTokens.from_tokenizer(tok)
    enc = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    nl = tok.convert_tokens_to_ids("\u010a")  # byte-level "\n"
    text_a, question, role_b = vqa_prompt_ids(tok, tokens, "What is this?")
    assert text_a[0] == tokens.bos and text_a.count(tokens.bos) == 2  # bos, then <|im_start|>user
    assert tokens.eos in text_a
    assert tok.decode(text_a) == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    assert role_b == [nl, tokens.bos, tok.convert_tokens_to_ids("assistant"), nl]
    assert role_b == enc(VQA_ASSISTANT_TEXT)
    assert question == enc("What is this?") and tok.decode(question) == "What is this?"
    # Training layout: "\n" + question + <|im_end|>.
    t_a, t_q, t_b = vqa_prompt_ids(tok, tokens, "What is this?", layout="training")
    assert (t_a, t_b) == (text_a, role_b)
    assert t_q == [nl, *question, tokens.eos]
    # The pieces drop into vqa_sequence.
    seqs = vqa_sequence(question, text_a, role_b, tokens, 5)
    assert seqs.input_ids[0].tolist() == [*text_a, tokens.boi, *[tokens.img_pad] * 5, tokens.eoi, *question, *role_b]


# ----------------------------------------------------------------------------------------------------- masks


def naive_mask(positions: torch.Tensor, L: int) -> torch.Tensor:
    B, M, _ = positions.shape
    out = torch.zeros(B, 1, L, L, dtype=torch.bool)
    for b in range(B):
        for q in range(L):
            for k in range(L):
                allowed = k <= q
                for m in range(M):
                    off, n = positions[b, m].tolist()
                    if off <= q < off + n and off <= k < off + n:
                        allowed = True
                out[b, 0, q, k] = allowed
    return out


def test_mask_against_golden(golden_data):
    for key in ("t2i", "mmu"):
        expected = golden_data[f"masks.{key}"]
        actual = omni_attention_mask(golden_data[f"masks.{key}_modality_positions"], expected.shape[-1])
        assert actual.dtype == torch.bool and actual.shape == expected.shape
        assert torch.equal(actual, expected), key
        assert torch.equal(naive_mask(golden_data[f"masks.{key}_modality_positions"], expected.shape[-1]), expected)


def test_mask_against_naive_loop():
    g = torch.Generator().manual_seed(0)
    B, M, L = 4, 3, 18
    offsets = torch.randint(0, L - 2, (B, M), generator=g)
    lengths = torch.randint(0, 7, (B, M), generator=g)
    lengths[0, 1] = 0
    lengths[1, :] = 0  # a row with only empty blocks is plain causal
    offsets[2, 1] = offsets[2, 0] + 1  # overlapping blocks
    positions = torch.stack([offsets, torch.minimum(lengths, L - offsets)], -1)
    expected = naive_mask(positions, L)
    assert torch.equal(omni_attention_mask(positions, L), expected)
    assert torch.equal(expected[1, 0], torch.ones(L, L, dtype=torch.bool).tril())
    assert not torch.equal(expected[0, 0], expected[1, 0])  # the blocks do something
