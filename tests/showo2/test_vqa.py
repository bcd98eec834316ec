"""Batched, KV-cached greedy VQA against the official recompute-everything loop (showo2/vqa.py)."""

import torch

from flashu_batch.showo2.layouts import vqa_sequence
from flashu_batch.showo2.loading import load_showo2
from flashu_batch.showo2.tokenizer import SpecialTokens
from flashu_batch.showo2.vae import load_vae
from flashu_batch.showo2.vqa import greedy_answer_recompute, greedy_answers, left_pad

TOKENS = SpecialTokens.from_layout(1000)
TEXT_A = [TOKENS.bos, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17]
ROLE_B = [20, TOKENS.bos, 21, 20]


def rows_for(model, question_lengths, seed=0, layout="demo"):
    g = torch.Generator().manual_seed(seed)
    questions = [torch.randint(0, 1000, (n,), generator=g).tolist() for n in question_lengths]
    rows = [vqa_sequence(q, TEXT_A, ROLE_B, TOKENS, model.config.num_image_slots, layout) for q in questions]
    latents = torch.randn(len(rows), model.config.image_latent_dim, *model.config.latent_size, generator=g)
    return rows, latents


def test_golden_answer_batched_with_other_prompts(golden_dir, golden_data):
    model = load_showo2(f"{golden_dir}/checkpoint")
    vae = load_vae(f"{golden_dir}/checkpoint/Wan2.1_VAE.pth")
    ids = golden_data["mmu.input_ids"][0].tolist()
    question = golden_data["mmu.question_ids"].tolist()
    S = model.config.num_image_slots
    role_len = len(ids) - 14 - S - 2 - len(question)
    golden_row = vqa_sequence(question, ids[:14], ids[len(ids) - role_len:], TOKENS, S)
    other_rows, other_latents = rows_for(model, [1, len(question) + 9])
    with torch.no_grad():
        latent = vae.encode(golden_data["mmu.image"])
    steps = golden_data["mmu.generated_ids"].shape[1]
    # the golden prompt in the middle of a batch with a shorter and a longer prompt (left padding on both sides)
    answers, logits = greedy_answers(model, [other_rows[0], golden_row, other_rows[1]],
                                     torch.cat([other_latents[:1], latent, other_latents[1:]]),
                                     max_new_tokens=steps, eos_id=TOKENS.eos, pad_id=TOKENS.pad, return_logits=True)
    assert answers[1] == golden_data["mmu.generated_ids"][0].tolist()
    torch.testing.assert_close(logits[1], golden_data["mmu.step_logits"], atol=3e-5, rtol=1e-5)


def test_batched_equals_recompute_for_mixed_lengths(make_tiny_model):
    model = make_tiny_model(seed=11)
    rows, latents = rows_for(model, [3, 17, 1, 9, 25])
    batched = greedy_answers(model, rows, latents, max_new_tokens=10, eos_id=-1, pad_id=TOKENS.pad)
    for i, row in enumerate(rows):
        single = greedy_answers(model, [row], latents[i:i + 1], max_new_tokens=10, eos_id=-1, pad_id=TOKENS.pad)
        recompute, _ = greedy_answer_recompute(model, row, latents[i:i + 1], max_new_tokens=10, eos_id=-1)
        assert batched[i] == single[0] == recompute, i
        assert len(batched[i]) == 10


def test_training_layout_also_matches_recompute(make_tiny_model):
    model = make_tiny_model(seed=12)
    rows, latents = rows_for(model, [4, 12], layout="training")
    batched = greedy_answers(model, rows, latents, max_new_tokens=6, eos_id=-1, pad_id=TOKENS.pad)
    for i, row in enumerate(rows):
        assert batched[i] == greedy_answer_recompute(model, row, latents[i:i + 1], max_new_tokens=6, eos_id=-1)[0]


def test_rows_stop_at_eos_independently(make_tiny_model):
    model = make_tiny_model(seed=13)
    rows, latents = rows_for(model, [2, 8, 14])
    free = greedy_answers(model, rows, latents, max_new_tokens=8, eos_id=-1, pad_id=TOKENS.pad)
    # declare row 1's 4th token the stop token: every row must end just before its first occurrence of it
    eos = free[1][3]
    stopped = greedy_answers(model, rows, latents, max_new_tokens=8, eos_id=eos, pad_id=TOKENS.pad)
    for i in range(3):
        expected = free[i][:free[i].index(eos)] if eos in free[i] else free[i]
        assert stopped[i] == expected
        assert stopped[i] == greedy_answer_recompute(model, rows[i], latents[i:i + 1], max_new_tokens=8, eos_id=eos)[0]


def test_left_pad_shifts_offsets_not_content():
    rows = [vqa_sequence([7] * n, TEXT_A, ROLE_B, TOKENS, 17) for n in (2, 5)]
    batch, pads = left_pad(rows, TOKENS.pad)
    assert pads.tolist() == [3, 0]
    assert batch.input_ids[0, :3].tolist() == [TOKENS.pad] * 3
    assert torch.equal(batch.input_ids[0, 3:], rows[0].input_ids[0])
    assert batch.image_offsets.tolist() == [rows[0].image_offsets.item() + 3, rows[1].image_offsets.item()]
    assert batch.modality_positions[0, 0, 0] == rows[0].modality_positions[0, 0, 0] + 3


def test_one_host_read_per_generated_token(make_tiny_model, count_host_reads):
    """Token ids and stop flags stay on the device: each extra generated token costs exactly one host read (the
    batch's `done.all()`), whatever the batch size; setup and the final answer read cost the same for any length."""
    model = make_tiny_model(seed=14)
    rows, latents = rows_for(model, [3, 9, 5])

    def reads(n):
        return count_host_reads(lambda: greedy_answers(model, rows, latents, max_new_tokens=n, eos_id=-1,
                                                       pad_id=TOKENS.pad))

    assert reads(9) - reads(3) == 6
