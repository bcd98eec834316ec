"""The VQA specialist (flashu/understanding.py) against the exact baseline and a recompute reference."""

import torch

from flashu_testkit import answers, deep, specialist
from vqa_testkit import TOKENS, random_prompts
from flashu_batch.flashu.config import FlashUGenerationConfig, FlashUUnderstandingConfig
from flashu_batch.flashu.ffn_prune import kept_widths
from flashu_batch.flashu.generation import calibrate_generation
from flashu_batch.flashu.understanding import (UnderstandingSpecialist, calibrate_understanding, kept_token_indices,
                                  specialize_understanding)
from flashu_batch.showo2.layouts import Sequences
from flashu_batch.showo2.vqa import greedy_answers


def test_everything_off_equals_the_baseline_exactly(make_tiny_model):
    model = deep(make_tiny_model)
    rows, latents = random_prompts(model, [3, 12, 7])
    spec = specialist(model, ffn_prune_ratio=0.0, token_prune_ratio=0.0, layer_skip_ratio=0.0)
    ids, logits = answers(spec, rows, latents, return_logits=True)
    base_ids, base_logits = greedy_answers(model, rows, latents, max_new_tokens=6, eos_id=-1, pad_id=TOKENS.pad,
                                           return_logits=True)
    assert ids == base_ids  # the contract: tokens exactly equal
    torch.testing.assert_close(logits, base_logits, atol=1e-5, rtol=1e-5)  # same ops, other matmul shapes


def test_kept_tokens_drop_the_largest_value_norms_of_image_tokens_only():
    g = torch.Generator().manual_seed(1)
    norms = torch.rand(3, 12, generator=g)
    image = torch.zeros(3, 12, dtype=torch.bool)
    image[:, 3:9] = True  # 6 image tokens per row
    kept = kept_token_indices(norms, image, drop=4)
    assert kept.shape == (3, 8)
    for b in range(3):
        expected_dropped = set((3 + norms[b, 3:9].argsort(descending=True)[:4]).tolist())
        assert set(kept[b].tolist()) == set(range(12)) - expected_dropped  # text all kept
        assert kept[b].tolist() == sorted(kept[b].tolist())  # original order
    assert torch.equal(kept_token_indices(norms, image, drop=0), torch.arange(12).expand(3, 12))


def test_prefill_prunes_tokens_keeps_positions_and_gathers_the_mask(make_tiny_model, monkeypatch):
    model = deep(make_tiny_model)
    rows, latents = random_prompts(model, [2, 9], seed=2)
    spec = specialist(model, ffn_prune_ratio=0.0, token_prune_ratio=0.5, token_prune_layer=3)
    seen = {}
    layers = model.showo.model.layers

    def record(i):
        def hook(module, args, kwargs):
            seen[i] = (args[0].shape, kwargs["position_ids"].clone(), kwargs["attention_mask"].shape)
        return hook

    handles = [layer.register_forward_pre_hook(record(i), with_kwargs=True) for i, layer in enumerate(layers)]
    answers(spec, rows, latents, n=1)
    for h in handles:
        h.remove()
    L = max(r.input_ids.shape[1] for r in rows)
    N = model.config.num_image_tokens
    kept = L - int(0.5 * N)
    for i in range(8):
        length = L if i < 3 else kept
        assert seen[i][0] == (2, length, model.config.hidden_size)
        assert seen[i][2] == (2, 1, length, length)
    # positions after pruning are the original ones: increasing, a subset of the unpruned positions of the row
    before, after = seen[2][1], seen[3][1]
    for b in range(2):
        assert set(after[b].tolist()) <= set(before[b].tolist())
        assert after[b].tolist() == sorted(after[b].tolist())
        assert after[b, -1] == before[b, -1]  # text (the last prompt token) is never dropped


def test_rows_keep_different_tokens(make_tiny_model):
    model = deep(make_tiny_model)
    rows, latents = random_prompts(model, [5, 5], seed=3)
    spec = specialist(model, ffn_prune_ratio=0.0, token_prune_ratio=0.5)
    captured = []
    layer = model.showo.model.layers[2]
    handle = layer.register_forward_pre_hook(lambda m, a, kw: captured.append(kw["position_ids"].clone()),
                                             with_kwargs=True)
    answers(spec, rows, latents, n=1)
    handle.remove()
    assert not torch.equal(captured[0][0], captured[0][1])  # different images: different kept tokens


def test_cached_decode_with_pruning_equals_recompute_with_the_same_pruning(make_tiny_model):
    model = deep(make_tiny_model, seed=4)
    rows, latents = random_prompts(model, [4, 11], seed=4)
    spec = specialist(model, ffn_prune_ratio=0.2, token_prune_ratio=0.5)
    cached = answers(spec, rows, latents, n=5)
    for b, row in enumerate(rows):
        # recompute: the prompt plus the tokens so far, prefilled from scratch each time (image tokens never see
        # the text after them, so the kept set is the same), one new token at a time
        generated = []
        for _ in range(5):
            ids = torch.cat([row.input_ids, torch.tensor([generated], dtype=torch.long)], dim=1)
            extended = Sequences(ids, row.image_offsets, row.modality_positions)
            generated += answers(spec, [extended], latents[b:b + 1], n=1)[0]
        assert cached[b] == generated


def test_mixed_length_batch_equals_rows_alone(make_tiny_model):
    model = deep(make_tiny_model, seed=5)
    rows, latents = random_prompts(model, [1, 14, 6], seed=5)
    spec = specialist(model, token_prune_ratio=0.75)
    together = answers(spec, rows, latents, n=6)
    assert together == [answers(spec, [row], latents[i:i + 1], n=6)[0] for i, row in enumerate(rows)]
    # with layer skipping the skip list is measured on the batch (shared by its rows), so only the lengths hold
    skipping = specialist(model, token_prune_ratio=0.75, layer_skip_ratio=0.25, layer_skip_interval=2)
    assert [len(a) for a in answers(skipping, rows, latents, n=6)] == [6, 6, 6]


def test_skipped_layers_still_write_their_cache(make_tiny_model, monkeypatch):
    model = deep(make_tiny_model, seed=6)
    rows, latents = random_prompts(model, [3, 8], seed=6)
    spec = specialist(model, ffn_prune_ratio=0.0, token_prune_ratio=0.0, layer_skip_ratio=0.25,
                      layer_skip_interval=3)
    calls = {i: 0 for i in range(8)}
    handles = [layer.register_forward_pre_hook(lambda m, a, i=i: calls.__setitem__(i, calls[i] + 1))
               for i, layer in enumerate(model.showo.model.layers)]
    lengths = {}
    import flashu_batch.flashu.understanding as understanding
    real_cache = understanding.DecodeKVCache

    class Spy(real_cache):
        def update(self, k, v, layer_idx, *args, **kwargs):
            out = super().update(k, v, layer_idx, *args, **kwargs)
            lengths[layer_idx] = out[0].shape[2]
            return out

    monkeypatch.setattr(understanding, "DecodeKVCache", Spy)
    ids = answers(spec, rows, latents, n=7)
    for h in handles:
        h.remove()
    assert all(len(a) == 7 for a in ids)
    assert len(set(calls.values())) > 1  # some layers were bypassed for some tokens
    assert len(set(lengths.values())) == 1  # every layer's cache holds every position


def test_understanding_calibration_is_its_own(make_tiny_model):
    model = deep(make_tiny_model, seed=7)
    rows, latents = random_prompts(model, [4, 9, 2], seed=7)
    und = calibrate_understanding(model, rows, latents, TOKENS.pad)
    gen = calibrate_generation(model, [[5] * 6, [9] * 3], TOKENS,
                               FlashUGenerationConfig(calibration_steps=3),
                               max_seq_len=40)
    assert len(und) == 8 and all(u.shape == (256,) for u in und)
    assert any(not torch.equal(u.argsort(), g.argsort()) for u, g in zip(und, gen))
    spec = specialize_understanding(model, und, FlashUUnderstandingConfig())
    assert spec.ffn_widths == (192,) * 8


def test_token_pruning_keeps_at_least_the_floor(make_tiny_model):
    model = deep(make_tiny_model, seed=8)  # 16 image tokens
    rows, latents = random_prompts(model, [5, 9], seed=8)
    assert specialist(model, token_prune_ratio=0.75).pruned_token_count() == 12
    assert specialist(model, token_prune_ratio=0.75, token_prune_min_kept=10).pruned_token_count() == 6
    floored = FlashUUnderstandingConfig(ffn_prune_ratio=0.0)  # defaults: rho 0.75, at least 64 tokens kept
    spec = UnderstandingSpecialist(model, kept_widths(model, 0.0, 64), floored)
    assert spec.pruned_token_count() == 0
    exact = specialist(model, ffn_prune_ratio=0.0, token_prune_ratio=0.0)
    assert answers(spec, rows, latents) == answers(exact, rows, latents)


def test_token_pruning_floor_leaves_full_size_grids_alone():
    config = FlashUUnderstandingConfig()
    n = 729  # 27 x 27 tokens of the 432-px release
    assert config.token_prune_min_kept < n - int(config.token_prune_ratio * n)


def test_one_host_read_per_generated_token(make_tiny_model, count_host_reads, monkeypatch):
    """With layer skipping off the specialist decodes like the baseline: one host read (`done.all()`) per token,
    and no layer scoring; with token pruning on, the key masks are built once per batch (one per key layout:
    before and after pruning), not per step."""
    model = deep(make_tiny_model, seed=9)
    rows, latents = random_prompts(model, [3, 8], seed=9)
    spec = specialist(model, ffn_prune_ratio=0.25, token_prune_ratio=0.5)
    import flashu_batch.flashu.understanding as understanding
    calls = {"importance": 0, "masks": 0}

    def counting(name, fn):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(understanding, "last_token_importance",
                        counting("importance", understanding.last_token_importance))
    monkeypatch.setattr(understanding, "decode_key_mask", counting("masks", understanding.decode_key_mask))
    reads = [count_host_reads(lambda: answers(spec, rows, latents, n=n)) for n in (3, 8)]
    assert reads[1] - reads[0] == 5
    assert calls == {"importance": 0, "masks": 4}  # two batches, two key layouts each
