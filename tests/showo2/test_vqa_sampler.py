"""VQA sampling (showo2/vqa.py NucleusSampler, the `sampler` of greedy_answers): a draw per row from its own
generator, so a row's tokens do not depend on its batch-mates; a nucleus of one token is greedy decoding; no sampler
is greedy decoding exactly as before."""

import torch

from vqa_testkit import TOKENS, random_prompts
from flashu_batch.showo2.vqa import NucleusSampler, greedy_answers


def sampler(seeds, temperature=1.0, top_p=1.0):
    return NucleusSampler(temperature, top_p, [torch.Generator().manual_seed(s) for s in seeds])


def decode(model, rows, latents, **kw):
    return greedy_answers(model, rows, latents, max_new_tokens=8, eos_id=-1, pad_id=TOKENS.pad, **kw)


def test_draws_follow_the_tempered_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    draws = torch.cat([sampler([s], temperature=2.0)(logits) for s in range(4000)])
    frequencies = torch.bincount(draws, minlength=4).float() / len(draws)
    torch.testing.assert_close(frequencies, torch.softmax(logits[0] / 2.0, -1), atol=0.03, rtol=0)


def test_the_nucleus_keeps_the_most_likely_tokens_up_to_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    draws = torch.cat([sampler([s], top_p=0.7)(logits) for s in range(2000)])
    assert set(draws.tolist()) == {0, 1}  # 0.5 < 0.7 needs the second token, then 0.8 >= 0.7 stops
    frequencies = torch.bincount(draws, minlength=2).float() / len(draws)
    torch.testing.assert_close(frequencies[:2], torch.tensor([0.5, 0.3]) / 0.8, atol=0.04, rtol=0)


def test_a_tiny_nucleus_is_argmax_and_rows_draw_independently():
    logits = torch.randn(5, 1000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sampler(range(5), temperature=3.0, top_p=1e-9)(logits), logits.argmax(-1))
    together = sampler([7, 8, 9], temperature=5.0)(logits[:3])
    alone = torch.cat([sampler([s], temperature=5.0)(logits[i:i + 1]) for i, s in zip(range(3), [7, 8, 9])])
    assert torch.equal(together, alone)


def test_sampled_answers_do_not_depend_on_the_batch(make_tiny_model):
    model = make_tiny_model(seed=1)
    rows, latents = random_prompts(model, [3, 12, 7])
    together = decode(model, rows, latents, sampler=sampler([10, 11, 12], temperature=1.5))
    assert together != decode(model, rows, latents)  # it does sample (a random tiny model: far from greedy)
    for i, seed in enumerate([10, 11, 12]):
        alone = decode(model, rows[i:i + 1], latents[i:i + 1], sampler=sampler([seed], temperature=1.5))
        assert alone[0] == together[i]
    # the same seeds again: the same answers; another seed: another answer
    assert decode(model, rows, latents, sampler=sampler([10, 11, 12], temperature=1.5)) == together
    assert decode(model, rows[:1], latents[:1], sampler=sampler([99], temperature=1.5))[0] != together[0]


def test_a_one_token_nucleus_decodes_exactly_greedy(make_tiny_model):
    model = make_tiny_model(seed=2)
    rows, latents = random_prompts(model, [4, 9], seed=1)
    greedy, greedy_logits = decode(model, rows, latents, return_logits=True)
    sampled, sampled_logits = decode(model, rows, latents, return_logits=True,
                                     sampler=sampler([1, 2], temperature=0.7, top_p=1e-9))
    assert sampled == greedy
    assert torch.equal(sampled_logits, greedy_logits)


def test_the_flashu_specialist_samples_like_the_baseline_when_everything_is_off(make_tiny_model):
    from flashu_batch.flashu.config import FlashUUnderstandingConfig
    from flashu_batch.flashu.ffn_prune import kept_widths
    from flashu_batch.flashu.understanding import UnderstandingSpecialist

    model = make_tiny_model(seed=4, llm_overrides={"num_hidden_layers": 4, "intermediate_size": 128})
    rows, latents = random_prompts(model, [3, 10], seed=2)
    config = FlashUUnderstandingConfig(ffn_prune_ratio=0.0, token_prune_ratio=0.0, layer_skip_ratio=0.0,
                                       token_prune_min_kept=0)
    specialist = UnderstandingSpecialist(model, kept_widths(model, 0.0, config.ffn_width_multiple), config)
    ids = specialist.greedy_answers(model, rows, latents, max_new_tokens=8, eos_id=-1, pad_id=TOKENS.pad,
                                    sampler=sampler([5, 6], temperature=1.2))
    assert ids == decode(model, rows, latents, sampler=sampler([5, 6], temperature=1.2))
