"""The VQA specialist on static shapes (flashu/understanding.py `SpecialistDecoder`, `specialist_decode_step`) against
its own eager DecodeKVCache path: the same greedy tokens with FFN and token pruning on, one compiled graph per batch
bucket, one cache per bucket, and the eager path kept where layer skipping is on."""

import pytest
import torch
from torch.nn.attention.flex_attention import flex_attention

from flashu_testkit import answers, deep, specialist
from vqa_testkit import TOKENS, random_prompts
from flashu_batch.flashu.understanding import SpecialistDecoder, specialist_decode_step
from flashu_batch.showo2.compile import Compiler
from flashu_batch.showo2.kv_cache import StaticDecodeKVCache
from flashu_batch.showo2.vqa import slot_order

# FFN width 256 -> 192 in every layer; 8 of the 16 image tokens dropped from layer 2 on: two key layouts
KNOBS = dict(ffn_prune_ratio=0.2, token_prune_ratio=0.5)


def pruning_specialist(make_tiny_model, seed, **knobs):
    spec = specialist(deep(make_tiny_model, seed=seed), **{**KNOBS, **knobs})
    assert set(spec.ffn_widths) == {192}
    return spec


def test_slot_order_hides_padding_pruned_and_future_slots():
    C = 8
    real = torch.tensor([[False, True, True], [True, True, True]])  # (B, L') kept keys; the prompt has L = 5
    cache = StaticDecodeKVCache(1, 4, 1, C, 2, torch.float32, "cpu")  # a bucket of 4 rows, C slots
    assert slot_order(real, cache, L=5).tolist() == [
        [C, -1, -1, C, C, 0, 1, 2],  # a left pad, two real keys, the slots [L', L) that layer never wrote
        [-1, -1, -1, C, C, 0, 1, 2],
        [C, C, C, C, C, 0, 1, 2],  # the bucket's pad rows see their own generated keys only: no empty softmax
        [C, C, C, C, C, 0, 1, 2]]


@pytest.mark.parametrize("lengths", [[6], [3, 14, 7], [1, 14, 6, 2, 9]])  # buckets 1, 4 (a pad row), 8 (three)
def test_static_decoding_equals_the_eager_path(make_tiny_model, lengths):
    spec = pruning_specialist(make_tiny_model, seed=40)
    assert spec.pruned_layers() == range(2, 8)
    rows, latents = random_prompts(spec.model, lengths, seed=len(lengths))
    ids, logits = answers(spec, rows, latents, n=8, return_logits=True)
    static_ids, static_logits = answers(spec, rows, latents, n=8, return_logits=True, static=spec.static_decoder())
    assert static_ids == ids
    # fp32: the same operations, attention over the whole buffer (hidden slots weigh exactly 0): rounding only
    torch.testing.assert_close(static_logits, logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("knobs", [dict(token_prune_ratio=0.0), dict(token_prune_layer=0),
                                   dict(token_prune_layer=99)])
def test_every_key_layout(make_tiny_model, knobs):
    """No token pruning (one layout), pruned from the first layer (one, the kept keys), K past the last layer."""
    spec = pruning_specialist(make_tiny_model, seed=41, **knobs)
    rows, latents = random_prompts(spec.model, [3, 14, 7], seed=41)
    assert answers(spec, rows, latents, static=spec.static_decoder()) == answers(spec, rows, latents)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")  # eager: the reference math
@pytest.mark.parametrize("knobs", [{}, dict(token_prune_layer=0), dict(token_prune_ratio=0.0)])
def test_flex_attention_prefill_equals_the_eager_path(make_tiny_model, knobs):
    """The prefill on FlexAttention (what a compiling worker's decoder uses): the omni mask as a block mask before
    token pruning and, from layer K on, the mask of the kept tokens (`omni_flex_mask(kept=...)`)."""
    spec = pruning_specialist(make_tiny_model, seed=47, **knobs)
    rows, latents = random_prompts(spec.model, [3, 14, 7, 1, 9], seed=47)
    ids, logits = answers(spec, rows, latents, n=8, return_logits=True)
    flex_ids, flex_logits = answers(spec, rows, latents, n=8, return_logits=True,
                                    static=SpecialistDecoder(attend=flex_attention))
    assert flex_ids == ids
    torch.testing.assert_close(flex_logits, logits, rtol=1e-5, atol=1e-5)


def test_compiled_decoding_compiles_once_per_bucket(make_tiny_model, graphs):
    spec = pruning_specialist(make_tiny_model, seed=42)
    decoder = SpecialistDecoder(Compiler(backend="eager")(specialist_decode_step, decode=True))  # its graphs alone
    for n, lengths in enumerate(([3, 17, 1, 9, 5], [2, 4, 8, 1, 6, 7], [12, 3, 5, 9, 11, 10, 2, 1])):
        rows, latents = random_prompts(spec.model, lengths, seed=n)  # other prompt lengths, one cache capacity
        compiled = answers(spec, rows, latents, n=8, static=decoder)
        assert compiled == answers(spec, rows, latents, n=8)
        assert graphs() == 1, lengths  # bucket 8: one graph for every token of every batch
    assert len(decoder.caches) == 1
    rows, latents = random_prompts(spec.model, [4], seed=3)
    assert answers(spec, rows, latents, n=8, static=decoder) == answers(spec, rows, latents, n=8)
    assert graphs() == 2 and sorted(key[0] for key in decoder.caches) == [1, 8]  # bucket 1: its own graph


def test_one_cache_per_bucket_reused_and_grown(make_tiny_model):
    spec = pruning_specialist(make_tiny_model, seed=43)
    decoder = spec.static_decoder()
    rows, latents = random_prompts(spec.model, [3, 17, 1], seed=43)
    assert answers(spec, rows, latents, static=decoder) == answers(spec, rows, latents)
    assert [key[0] for key in decoder.caches] == [4]  # (batch bucket, dtype, device)
    (cache,) = decoder.caches.values()
    capacity = cache.keys[0].shape[2]
    # shorter prompts reuse the cache (the last batch's keys are gone: same answers), a longer one replaces it
    for lengths, grown in (([2, 1, 4], 0), ([3, 17, 1 + 64], 64)):
        rows, latents = random_prompts(spec.model, lengths, seed=44)
        assert answers(spec, rows, latents, static=decoder) == answers(spec, rows, latents)
        (now,) = decoder.caches.values()
        assert now.keys[0].shape[2] == capacity + grown and (now is cache) == (grown == 0)


def test_one_host_read_per_generated_token(make_tiny_model, count_host_reads):
    spec = pruning_specialist(make_tiny_model, seed=45)
    rows, latents = random_prompts(spec.model, [3, 8], seed=45)
    decoder = spec.static_decoder()
    reads = [count_host_reads(lambda: answers(spec, rows, latents, n=n, static=decoder)) for n in (3, 8)]
    assert reads[1] - reads[0] == 5


def test_layer_skipping_decodes_eager_even_with_a_compiler(make_tiny_model, graphs):
    """A skip set per step would be a graph per step: the specialist keeps its DecodeKVCache path, uncompiled."""
    spec = pruning_specialist(make_tiny_model, seed=46, layer_skip_ratio=0.25, layer_skip_interval=2)
    compiler = Compiler(backend="eager")
    assert spec.static_decoder(compiler) is None
    decode_fn = spec.pipeline_kwargs(compiler)["decode_fn"]
    assert decode_fn == spec.greedy_answers == spec.pipeline_kwargs()["decode_fn"]
    rows, latents = random_prompts(spec.model, [3, 14, 7], seed=46)
    assert decode_fn(spec.model, rows, latents, max_new_tokens=6, eos_id=-1, pad_id=TOKENS.pad) == answers(
        spec, rows, latents)
    assert graphs() == 0
    # without layer skipping the same compiler gives the compiled static decoder
    plain = pruning_specialist(make_tiny_model, seed=46)
    static = plain.pipeline_kwargs(compiler)["decode_fn"].keywords["static"]
    assert isinstance(static, SpecialistDecoder) and static.attend is not None  # its prefill on FlexAttention
