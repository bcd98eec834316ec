"""The FlashU text-to-image specialist (flashu/generation.py): exactness when off, each technique alone and
combined, the head cache and layer skipping following the plan, and the prefix cache following the network."""

import copy
import dataclasses

import pytest
import torch
from torch import nn

import flashu_batch.flashu.generation as generation
from flashu_batch.flashu.config import FlashUGenerationConfig
from flashu_batch.flashu.ffn_prune import kept_width
from flashu_batch.flashu.generation import (GenerationSpecialist, calibrate_generation, pruned_widths,
                                            specialize_generation)
from flashu_batch.flashu.plan import generation_plan
from flashu_testkit import DEEP, MAX_SEQ_LEN, OFF, SMALL, TOKENS, baseline_latents, random_prompts, rel_rms, \
    t2i_batch
from flashu_batch.showo2.prefix_cache import PrefixCachedVelocity
from flashu_batch.showo2.t2i import full_sequence_velocity_fn, generate_latents

GUIDANCE = 4.0
CALIBRATION_PROMPTS = random_prompts([3, 8, 12, 20], seed=7)


def deep_model(make_tiny_model, seed=31):
    return make_tiny_model(seed=seed, llm_overrides=DEEP)


def calibrated_specialist(model, config):
    scores = calibrate_generation(model, CALIBRATION_PROMPTS, TOKENS, config, max_seq_len=MAX_SEQ_LEN)
    return specialize_generation(model, scores, config)


def run(specialist, seqs, noise, use_cfg=True, guidance=GUIDANCE):
    velocity = specialist.velocity_fn(seqs, use_cfg)
    latents = generate_latents(velocity, noise, num_inference_steps=specialist.config.num_inference_steps,
                               guidance_scale=specialist.guidance_scales(guidance))
    return latents, velocity


def baseline_for(specialist, seqs, noise, use_cfg=True, guidance=GUIDANCE):
    c = specialist.config
    return baseline_latents(specialist.model, seqs, noise, c.num_inference_steps, specialist.guidance_scales(guidance),
                            use_cfg)


# ---- (a) exactness when off ------------------------------------------------------------------------------------

@pytest.mark.parametrize("use_cfg", [True, False])
def test_everything_off_is_bit_identical_to_the_exact_baseline(make_tiny_model, use_cfg):
    model = deep_model(make_tiny_model)
    _, seqs, noise = t2i_batch(model, with_uncond=use_cfg)
    config = FlashUGenerationConfig.off(11)
    specialist = GenerationSpecialist(model, pruned_widths(model, config), config)
    assert specialist.ffn_widths == (256,) * 8
    guidance = GUIDANCE if use_cfg else 0.0
    assert specialist.guidance_scales(guidance) == [guidance] * 10
    latents, velocity = run(specialist, seqs, noise, use_cfg, guidance)
    assert torch.equal(latents, baseline_for(specialist, seqs, noise, use_cfg, guidance))
    assert velocity.reuses == 0 and velocity.skip == frozenset()


def test_guidance_schedule_alone_is_bit_identical_to_the_baseline_with_those_scales(make_tiny_model):
    model = deep_model(make_tiny_model)
    _, seqs, noise = t2i_batch(model)
    config = FlashUGenerationConfig(**{**OFF, "num_inference_steps": 11, "guidance_schedule": ((6, 3.0), (4, 5.0))})
    specialist = GenerationSpecialist(model, pruned_widths(model, config), config)
    assert specialist.guidance_scales(GUIDANCE) == [3.0] * 6 + [5.0] * 4  # the request's constant is ignored
    latents, _ = run(specialist, seqs, noise)
    assert torch.equal(latents, baseline_latents(model, seqs, noise, 11, [3.0] * 6 + [5.0] * 4))
    assert not torch.allclose(latents, baseline_latents(model, seqs, noise, 11, GUIDANCE), atol=1e-4)


# ---- (b) reordering is exact ------------------------------------------------------------------------------------

def test_reordering_by_calibration_scores_changes_nothing_when_off(make_tiny_model):
    model = deep_model(make_tiny_model)
    _, seqs, noise = t2i_batch(model)
    config = FlashUGenerationConfig.off(11)
    before = baseline_latents(model, seqs, noise, 11, GUIDANCE)
    gate0 = model.showo.model.layers[0].mlp.gate_proj.weight.clone()
    specialist = calibrated_specialist(model, config)
    assert specialist.model is model
    assert not torch.equal(model.showo.model.layers[0].mlp.gate_proj.weight, gate0)  # really reordered
    latents, _ = run(specialist, seqs, noise)
    torch.testing.assert_close(latents, before, atol=1e-5, rtol=1e-5)


# ---- (c) each technique alone and all together ------------------------------------------------------------------

TECHNIQUES = {
    "prune": {**OFF, "num_inference_steps": 11, "ffn_prune_ratio": 0.2},
    "prune+hybrid": {**OFF, "num_inference_steps": 11, "ffn_prune_ratio": 0.2, "full_network_calls": 3},
    "skip": {**OFF, "num_inference_steps": 11, "layer_skip_ratio": 0.2, "layer_skip_interval": 4},
    "cache": {**OFF, "num_inference_steps": 11, "head_cache_interval": 2},
    "all": SMALL,
}


@pytest.mark.parametrize("name", list(TECHNIQUES))
def test_each_technique_alone_and_combined_stays_close_but_not_exact(make_tiny_model, name):
    model = deep_model(make_tiny_model)
    _, seqs, noise = t2i_batch(model)
    config = FlashUGenerationConfig(**TECHNIQUES[name])
    specialist = calibrated_specialist(model, config)
    expected_width = kept_width(256, config.ffn_prune_ratio, 64)
    assert specialist.ffn_widths == (expected_width,) * 8
    assert expected_width == (192 if config.ffn_prune_ratio else 256)
    latents, velocity = run(specialist, seqs, noise)
    base = baseline_for(specialist, seqs, noise)  # same model (reordering is exact), same guidance per call
    assert latents.shape == noise.shape and torch.isfinite(latents).all()
    err = rel_rms(latents, base)
    assert 1e-6 < err < 0.5, err  # approximate, yet really changed by the technique
    plan = generation_plan(config)
    assert velocity.reuses == sum(p.head == "reuse" for p in plan)
    if config.layer_skip_ratio:
        assert len(velocity.skip) == 1  # int(8 * 0.2)


# ---- (d) the head cache ----------------------------------------------------------------------------------------

class CallRecorder:
    """Wraps a velocity function: per model call, how often the image path and the head blocks ran, and what the
    final layer received."""

    def __init__(self, model, velocity, monkeypatch):
        self.velocity, self.step = velocity, None
        self.embed = {}
        self.final_inputs = {}
        self.blocks_span_calls = {}
        embed_image, head_blocks = model.embed_image, model.head_blocks

        def counting_embed(x):
            self.embed[self.step] = self.embed.get(self.step, 0) + 1
            return embed_image(x)

        def counting_blocks(hidden, *args, **kwargs):
            if hidden.shape[1] == model.config.num_image_slots:  # the span (not a prefix refill)
                self.blocks_span_calls[self.step] = self.blocks_span_calls.get(self.step, 0) + 1
            return head_blocks(hidden, *args, **kwargs)

        monkeypatch.setattr(model, "embed_image", counting_embed)
        monkeypatch.setattr(model, "head_blocks", counting_blocks)

        def final_layer_hook(module, args):
            self.final_inputs[self.step] = (args[0].clone(), args[1].clone())

        self.handle = model.diffusion_head_b.register_forward_pre_hook(final_layer_hook)

    def __call__(self, x, t, step=0):
        self.step = step
        return self.velocity(x, t, step)


def test_head_cache_reuse_runs_nothing_upstream_on_the_default_plan(make_tiny_model, monkeypatch):
    model = deep_model(make_tiny_model)
    _, seqs, noise = t2i_batch(model)
    config = FlashUGenerationConfig()  # the paper's 34-call plan
    specialist = calibrated_specialist(model, dataclasses.replace(config, calibration_steps=3))
    specialist = GenerationSpecialist(model, specialist.ffn_widths, config)
    velocity = specialist.velocity_fn(seqs, True)
    rec = CallRecorder(model, velocity, monkeypatch)
    latents = generate_latents(rec, noise, num_inference_steps=35, guidance_scale=specialist.guidance_scales(10.0))
    rec.handle.remove()
    assert torch.isfinite(latents).all()
    plan = generation_plan(config)
    assert velocity.reuses == 16 == sum(p.head == "reuse" for p in plan)
    runs_llm = [p.call - 1 for p in plan if p.runs_llm]
    assert sorted(rec.embed) == runs_llm and set(rec.embed.values()) == {1}  # once per call, cond+uncond shared
    assert sum(rec.embed.values()) == 20
    computed = [p.call - 1 for p in plan if p.head != "reuse"]
    assert sorted(rec.blocks_span_calls) == computed
    last_store = None
    for p in plan:
        blocks, temb = rec.final_inputs[p.call - 1]
        if p.head == "store":
            last_store = (blocks, temb)
        elif p.head == "reuse":
            assert torch.equal(blocks, last_store[0])  # the stored flow-head block output ...
            assert not torch.equal(temb, last_store[1])  # ... modulated with the current time
    assert last_store is not None


def test_head_cache_alone_counts_on_a_short_plan(make_tiny_model, monkeypatch):
    model = deep_model(make_tiny_model)
    _, seqs, noise = t2i_batch(model)
    config = FlashUGenerationConfig(**TECHNIQUES["cache"])
    specialist = GenerationSpecialist(model, pruned_widths(model, config), config)
    velocity = specialist.velocity_fn(seqs, True)
    rec = CallRecorder(model, velocity, monkeypatch)
    generate_latents(rec, noise, num_inference_steps=11, guidance_scale=GUIDANCE)
    # stores at 2, 4, 6, 8, 10; reuses at 3, 5, 7, 9 (0-based steps 2, 4, 6, 8)
    assert velocity.reuses == 4
    assert sorted(rec.embed) == [0, 1, 3, 5, 7, 9]


# ---- (e) layer skipping ----------------------------------------------------------------------------------------

def test_layer_skipping_recalculates_on_planned_calls_and_bypasses_the_listed_layers(make_tiny_model, monkeypatch):
    model = deep_model(make_tiny_model)
    _, seqs, noise = t2i_batch(model)
    S = model.config.num_image_slots
    # skipping alone (stock layers run, so forward hooks see every layer call); 2 of 8 layers skipped
    config = FlashUGenerationConfig(**{**OFF, "num_inference_steps": 11, "layer_skip_ratio": 0.25,
                                       "layer_skip_interval": 4})
    specialist = GenerationSpecialist(model, pruned_widths(model, config), config)
    velocity = specialist.velocity_fn(seqs, True)
    llm = model.showo.model
    state = {"step": None}
    recalcs, layer_calls, prefix_calls, io = [], {}, {}, {}
    real_layers_to_skip = generation.layers_to_skip

    def spy(importance, ratio):
        recalcs.append(state["step"])
        return real_layers_to_skip(importance, ratio)

    monkeypatch.setattr(generation, "layers_to_skip", spy)

    def layer_hook(i):
        def hook(module, args, kwargs, output):
            h = kwargs.get("hidden_states", args[0] if args else None)
            if h.shape[1] == S:
                layer_calls.setdefault(state["step"], []).append(i)
                io.setdefault(state["step"], {})[i] = (h.clone(), output.clone())
            else:
                prefix_calls[state["step"]] = prefix_calls.get(state["step"], 0) + 1
        return hook

    handles = [layer.register_forward_hook(layer_hook(i), with_kwargs=True) for i, layer in enumerate(llm.layers)]
    norm_out = {}
    handles.append(llm.norm.register_forward_hook(
        lambda m, a, out: norm_out.__setitem__(state["step"], out.clone()) if out.shape[1] == S else None))
    skips = {}

    def step_fn(x, t, step=0):
        state["step"] = step
        v = velocity(x, t, step)
        skips[step] = velocity.skip
        return v

    try:
        latents = generate_latents(step_fn, noise, num_inference_steps=11, guidance_scale=GUIDANCE)
    finally:
        for h in handles:
            h.remove()
    assert torch.isfinite(latents).all()
    plan = generation_plan(config)
    recalc_steps = [p.call - 1 for p in plan if p.layers == "recalc"]
    assert recalc_steps == [0, 4, 8]
    assert recalcs == recalc_steps
    for p in plan:
        step = p.call - 1
        if p.layers == "recalc":
            assert layer_calls[step] == list(range(8))  # every layer runs on a recalculation call
            # the new skip list, measured independently: 1 - mean cosine(input, output) of each layer, the last
            # layer's output being the final-normed state
            states = [io[step][i][0] for i in range(8)] + [norm_out[step]]
            importance = torch.stack([1 - torch.cosine_similarity(a, b, dim=-1).mean()
                                      for a, b in zip(states[:-1], states[1:])])
            expected = frozenset(torch.argsort(importance)[:2].tolist())
            assert skips[step] == expected and len(expected) == 2
        else:
            listed = skips[step - 1]
            assert skips[step] == listed  # the list only changes on recalculation calls
            assert layer_calls[step] == [i for i in range(8) if i not in listed]  # bypassed entirely
    # The prefix is refilled exactly when the network changes: to the skip list on steps 1, 5, 9 (6 layers run)
    # and back to full depth on the recalculation steps 4, 8 (8 layers); step 0 keeps the constructor's prefix.
    assert prefix_calls == {1: 6, 4: 8, 5: 6, 8: 8, 9: 6}


# ---- (f) the prefix cache follows the network ------------------------------------------------------------------

class Bypass(nn.Module):
    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def hand_made_network(model, width, skipped=frozenset()):
    """A deep copy whose FFNs are physically cut to the leading `width` neurons and whose listed layers are
    replaced by the identity (built without flashu code)."""
    net = copy.deepcopy(model)
    layers = net.showo.model.layers
    for i, layer in enumerate(layers):
        mlp = layer.mlp
        H = mlp.gate_proj.in_features
        gate, up, down = nn.Linear(H, width, bias=False), nn.Linear(H, width, bias=False), nn.Linear(width, H, bias=False)
        with torch.no_grad():
            gate.weight.copy_(mlp.gate_proj.weight[:width])
            up.weight.copy_(mlp.up_proj.weight[:width])
            down.weight.copy_(mlp.down_proj.weight[:, :width])
        mlp.gate_proj, mlp.up_proj, mlp.down_proj = gate, up, down
        if i in skipped:
            layers[i] = Bypass()
    return net


def test_pruned_calls_equal_a_from_scratch_pruned_model(make_tiny_model):
    model = deep_model(make_tiny_model)
    _, seqs, noise = t2i_batch(model)
    config = FlashUGenerationConfig(**TECHNIQUES["prune+hybrid"])  # calls 1-7 pruned, 8-10 full
    specialist = calibrated_specialist(model, config)
    pruned = hand_made_network(model, 192)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(noise.shape, generator=g)
    t = torch.tensor([0.9, 0.4])
    with torch.no_grad():
        ref_pruned = full_sequence_velocity_fn(pruned, seqs)(x, t)
        ref_full = full_sequence_velocity_fn(model, seqs)(x, t)
        velocity = specialist.velocity_fn(seqs, True)
        first = velocity(x, t, 0)  # pruned call: the prefix built at construction (full network) must be redone
        full = velocity(x, t, 9)  # full call
        again = velocity(x, t, 1)  # pruned again
    assert rel_rms(ref_pruned, ref_full) > 1e-3  # the check below can tell the two networks apart
    torch.testing.assert_close(first, ref_pruned, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(full, ref_full, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(again, ref_pruned, atol=2e-5, rtol=1e-5)


def test_skip_calls_equal_a_from_scratch_network_without_those_layers(make_tiny_model):
    model = deep_model(make_tiny_model)
    _, seqs, noise = t2i_batch(model)
    config = FlashUGenerationConfig(**{**OFF, "num_inference_steps": 11, "ffn_prune_ratio": 0.2,
                                       "layer_skip_ratio": 0.25, "layer_skip_interval": 4})
    specialist = calibrated_specialist(model, config)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(noise.shape, generator=g)
    t = torch.tensor([0.7, 0.2])
    with torch.no_grad():
        velocity = specialist.velocity_fn(seqs, True)
        recalc = velocity(x, t, 0)  # recalculation call: pruned, every layer
        skipped = velocity.skip
        skip_call = velocity(x, t, 1)
        ref_recalc = full_sequence_velocity_fn(hand_made_network(model, 192), seqs)(x, t)
        ref_skip = full_sequence_velocity_fn(hand_made_network(model, 192, skipped), seqs)(x, t)
    assert len(skipped) == 2
    assert rel_rms(ref_skip, ref_recalc) > 1e-3
    torch.testing.assert_close(recalc, ref_recalc, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(skip_call, ref_skip, atol=2e-5, rtol=1e-5)


# ---- (g) calibration --------------------------------------------------------------------------------------------

def test_calibration_scores_shape_determinism_and_rows(make_tiny_model):
    model = deep_model(make_tiny_model)
    config = FlashUGenerationConfig(calibration_steps=3)
    rows = []
    handle = model.showo.model.layers[0].mlp.down_proj.register_forward_pre_hook(
        lambda m, args: rows.append(args[0].shape[0]))
    try:
        scores = calibrate_generation(model, CALIBRATION_PROMPTS[:3], TOKENS, config, max_seq_len=MAX_SEQ_LEN,
                                      batch_size=2)
    finally:
        handle.remove()
    assert len(scores) == 8
    assert all(s.shape == (256,) and s.dtype == torch.float32 and torch.isfinite(s).all() and (s >= 0).all()
               and (s > 0).any() for s in scores)
    # batches of 2 then 1 prompts: cond + uncond rows = 4 then 2 (prefix fill once, then 2 model calls each)
    assert rows == [4, 4, 4, 2, 2, 2]
    assert all(len(d.mlp.down_proj._forward_pre_hooks) == 0 for d in model.showo.model.layers)
    again = calibrate_generation(model, CALIBRATION_PROMPTS[:3], TOKENS, config, max_seq_len=MAX_SEQ_LEN,
                                 batch_size=2)
    assert all(torch.equal(a, b) for a, b in zip(scores, again))
    other_seed = calibrate_generation(model, CALIBRATION_PROMPTS[:3], TOKENS,
                                      dataclasses.replace(config, calibration_seed=5), max_seq_len=MAX_SEQ_LEN,
                                      batch_size=2)
    assert not any(torch.allclose(a, b) for a, b in zip(scores, other_seed))  # the noise feeds the statistics


def test_calibration_needs_a_prompt(make_tiny_model):
    model = deep_model(make_tiny_model)
    with pytest.raises(ValueError, match="prompt"):
        calibrate_generation(model, [], TOKENS, FlashUGenerationConfig())


def test_calibration_does_not_depend_on_the_batch_size(make_tiny_model):
    model = deep_model(make_tiny_model)
    config = FlashUGenerationConfig(calibration_steps=3)
    one = calibrate_generation(model, CALIBRATION_PROMPTS, TOKENS, config, max_seq_len=MAX_SEQ_LEN, batch_size=1)
    four = calibrate_generation(model, CALIBRATION_PROMPTS, TOKENS, config, max_seq_len=MAX_SEQ_LEN, batch_size=4)
    for a, b in zip(one, four):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_calibration_statistics_come_from_the_baseline_trajectories(make_tiny_model):
    """The padding-free part of the statistics: the span of every model call, cond and uncond rows, along the
    exact baseline's own trajectory from seeds calibration_seed + i, equals a hand recording of those calls."""
    model = deep_model(make_tiny_model)
    config = FlashUGenerationConfig(calibration_steps=4, calibration_guidance=2.0, calibration_seed=3)
    prompts = CALIBRATION_PROMPTS[:2]
    c = model.config
    S = c.num_image_slots
    span_sq = [torch.zeros(256) for _ in range(8)]
    all_sq = [torch.zeros(256) for _ in range(8)]

    def hook_for(i):
        def hook(module, args):
            a = args[0].float()
            all_sq[i] += a.pow(2).sum(dim=(0, 1))
            if a.shape[1] == S:
                span_sq[i] += a.pow(2).sum(dim=(0, 1))
        return hook

    layers = model.showo.model.layers
    handles = [l.mlp.down_proj.register_forward_pre_hook(hook_for(i)) for i, l in enumerate(layers)]
    try:
        scores = calibrate_generation(model, prompts, TOKENS, config, max_seq_len=MAX_SEQ_LEN, batch_size=2)
    finally:
        for h in handles:
            h.remove()
    # the function records exactly the per-call image spans (not the once-per-batch prefix fill, whose padded
    # placeholder positions never occur in a real sequence)
    assert all((a > s).all() for a, s in zip(all_sq, span_sq))  # the prefix fill did run, unrecorded
    for s, sq, l in zip(scores, span_sq, layers):
        torch.testing.assert_close(s, sq.sqrt() * l.mlp.down_proj.weight.abs().sum(0), rtol=1e-5, atol=1e-6)
    # and the span part is the baseline's calls from the seeded noise (replayed by hand)
    from flashu_batch.showo2.layouts import t2i_sequences
    from flashu_batch.showo2.t2i import seeded_noise

    replay = [torch.zeros(256) for _ in range(8)]

    def replay_hook(i):
        def hook(module, args):
            if args[0].shape[1] == S:
                replay[i] += args[0].float().pow(2).sum(dim=(0, 1))
        return hook

    handles = [l.mlp.down_proj.register_forward_pre_hook(replay_hook(i)) for i, l in enumerate(layers)]
    try:
        seqs = t2i_sequences(prompts, TOKENS, S, MAX_SEQ_LEN)
        noise = seeded_noise([3, 4], (c.image_latent_dim, *c.latent_size))
        generate_latents(PrefixCachedVelocity(model, seqs, True), noise, num_inference_steps=4, guidance_scale=2.0)
    finally:
        for h in handles:
            h.remove()
    for a, b in zip(span_sq, replay):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
