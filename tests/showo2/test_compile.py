"""Compiled steps (showo2/compile.py) against the eager ones, on CPU with dynamo's fast backends: equal results, and
no recompilation across a whole FlashU plan, across the tokens of an answer or across batch sizes of one bucket."""

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

from vqa_testkit import TOKENS, random_prompts
from flashu_batch.flashu.config import FlashUGenerationConfig
from flashu_batch.flashu.generation import GenerationSpecialist, pruned_widths
from flashu_batch.showo2.compile import CompiledOrEager, Compiler, compiler_for
from flashu_batch.showo2.layouts import t2i_sequences
from flashu_batch.showo2.prefix_cache import PrefixCachedVelocity
from flashu_batch.showo2.t2i import generate_latents, seeded_noise
from flashu_batch.showo2.vqa import StaticDecoder, greedy_answers, static_decode_step


def t2i_inputs(model, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 1000, (n,), generator=g).tolist() for n in lengths]
    c = model.config
    seqs = t2i_sequences(prompts, TOKENS, c.num_image_slots, 40)
    noise = seeded_noise([seed * 10 + i for i in range(len(prompts))], (c.image_latent_dim, *c.latent_size))
    return seqs, noise, torch.rand(len(prompts), generator=g)


def test_compiled_exact_t2i_step_equals_eager(make_tiny_model, graphs):
    """aot_eager (AOTAutograd's decompositions, no code generation): within fp32 rounding, 1e-5."""
    model = make_tiny_model(seed=21)
    compiler = Compiler(backend="aot_eager")
    seqs, x, t = t2i_inputs(model, [5, 11])
    with torch.no_grad():
        eager = PrefixCachedVelocity(model, seqs, use_cfg=True)(x, t)
        compiled = PrefixCachedVelocity(model, seqs, use_cfg=True, compiler=compiler)
        torch.testing.assert_close(compiled(x, t), eager, rtol=1e-5, atol=1e-5)
        assert graphs() == 1
        # a new batch of the same shape (another velocity object, other prompts, x and t) reuses the graph
        seqs2, x2, t2 = t2i_inputs(model, [3, 9], seed=1)
        again = PrefixCachedVelocity(model, seqs2, use_cfg=True, compiler=compiler)(x2, t2, 7)
        torch.testing.assert_close(again, PrefixCachedVelocity(model, seqs2, use_cfg=True)(x2, t2),
                                   rtol=1e-5, atol=1e-5)
    assert graphs() == 1


SMALL_PLAN = dict(num_inference_steps=11, guidance_schedule=((6, 3.0), (4, 5.0)), full_network_calls=3,
                  layer_skip_interval=4, head_cache_interval=2, calibration_steps=3)  # every technique on


def test_no_recompilation_across_a_whole_flashu_plan(make_tiny_model, graphs, monkeypatch):
    """Pruned and full FFN phases, new skip lists, head-cache reuse: the regions compile on their first calls (one
    graph per FFN width for the layer, shared by all 8 layers) and a second generation compiles nothing."""
    import flashu_batch.flashu.generation as generation

    model = make_tiny_model(seed=22, llm_overrides={"num_hidden_layers": 8, "intermediate_size": 256})
    config = FlashUGenerationConfig(**SMALL_PLAN)
    specialist = GenerationSpecialist(model, pruned_widths(model, config), config)
    assert set(specialist.ffn_widths) == {192}
    skip_lists = []
    real_layers_to_skip = generation.layers_to_skip
    monkeypatch.setattr(generation, "layers_to_skip", lambda *a: skip_lists.append(real_layers_to_skip(*a))
                        or skip_lists[-1])
    compiler = Compiler(backend="eager")

    def generate(seed, compiler):
        seqs, noise, _ = t2i_inputs(model, [5, 11], seed)
        return generate_latents(specialist.velocity_fn(seqs, True, compiler), noise,
                                num_inference_steps=config.num_inference_steps,
                                guidance_scale=specialist.guidance_scales(4.0))

    first = generate(0, compiler)
    warm = graphs()
    # the layer at two widths, the image path, the flow-head blocks, the final layer
    assert warm == 5, dict(counters["stats"])
    second = generate(1, compiler)
    assert graphs() == warm, "a new batch of the same shape recompiled"
    assert len(skip_lists) == 4 and all(len(s) == 1 for s in skip_lists), skip_lists  # int(8 * 0.2) layers
    torch.testing.assert_close(first, generate(0, None), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(second, generate(1, None), rtol=1e-5, atol=1e-5)


def test_static_cache_decoding_gives_the_same_tokens(make_tiny_model):
    model = make_tiny_model(seed=23)
    rows, latents = random_prompts(model, [3, 17, 1, 9, 25])  # 5 rows: padded to the bucket of 8
    kwargs = dict(max_new_tokens=10, eos_id=-1, pad_id=TOKENS.pad, return_logits=True)
    answers, logits = greedy_answers(model, rows, latents, **kwargs)
    static = StaticDecoder()
    static_answers, static_logits = greedy_answers(model, rows, latents, static=static, **kwargs)
    assert static_answers == answers
    torch.testing.assert_close(static_logits, logits, rtol=1e-5, atol=1e-5)
    assert [key[0] for key in static.caches] == [8]  # (batch bucket, dtype, device)
    # the cache is reused by the next batch of that shape; stale keys from the last one are gone
    eos = answers[2][4]
    stopped = greedy_answers(model, rows, latents, max_new_tokens=10, eos_id=eos, pad_id=TOKENS.pad, static=static)
    assert stopped == greedy_answers(model, rows, latents, max_new_tokens=10, eos_id=eos, pad_id=TOKENS.pad)
    assert len(static.caches) == 1
    # one cache per bucket: shorter prompts reuse the larger cache (extra slots hidden), longer ones replace it
    capacity = next(iter(static.caches.values())).keys[0].shape[2]
    for lengths in ([2, 1, 4, 3, 5], [3, 17, 1, 9, 25 + 64]):
        rows, latents = random_prompts(model, lengths, seed=1)
        kwargs = dict(max_new_tokens=10, eos_id=-1, pad_id=TOKENS.pad)
        assert greedy_answers(model, rows, latents, static=static, **kwargs) == greedy_answers(model, rows, latents,
                                                                                               **kwargs)
        assert len(static.caches) == 1
    assert next(iter(static.caches.values())).keys[0].shape[2] == capacity + 64


def test_compiled_decoding_compiles_once_per_bucket(make_tiny_model, graphs):
    model = make_tiny_model(seed=24)
    decoder = StaticDecoder(Compiler(backend="eager")(static_decode_step, decode=True))  # the step's graphs alone
    rows, latents = random_prompts(model, [3, 17, 1, 9, 25, 4, 12, 6])  # the longest first: one prompt length
    kwargs = dict(max_new_tokens=8, eos_id=-1, pad_id=TOKENS.pad)
    for n in (5, 7, 8):  # one bucket (8 rows), one cache length: one graph for every token of every batch
        compiled = greedy_answers(model, rows[:n], latents[:n], static=decoder, **kwargs)
        assert compiled == greedy_answers(model, rows[:n], latents[:n], **kwargs)
        assert all(len(a) == 8 for a in compiled)
        assert graphs() == 1, n
    greedy_answers(model, rows[:1], latents[:1], static=decoder, **kwargs)  # bucket 1: its own graph
    assert graphs() == 2 and sorted(key[0] for key in decoder.caches) == [1, 8]  # (batch bucket, dtype, device)


def test_compiled_flex_prefill_gives_the_same_answers_and_takes_new_shapes_symbolically(make_tiny_model, graphs):
    """The worker's decoder (`Compiler.static_decoder`): the prefill's attention on compiled FlexAttention, called
    once per LLM layer per batch (the block mask reaches the layers through transformers' mask mapping), the same
    greedy answers as the eager path, and new prompt lengths and batch sizes stop recompiling once they are
    symbolic."""
    model = make_tiny_model(seed=25)
    compiler = Compiler(backend="eager")
    kernel, calls = compiler.flex_attention(), []

    def attend(*args, **kwargs):
        calls.append(1)
        return kernel(*args, **kwargs)

    decoder = StaticDecoder(attend=attend)  # the decode step eager: only FlexAttention's graphs are counted
    kwargs = dict(max_new_tokens=6, eos_id=-1, pad_id=TOKENS.pad)
    shapes = [[3, 17, 1, 9, 25], [3, 4, 5, 6, 7], [30, 2, 8], list(range(1, 9)), [40, 41], [11]]
    counts = []
    for seed, lengths in enumerate(shapes):
        rows, latents = random_prompts(model, lengths, seed=seed)
        assert greedy_answers(model, rows, latents, static=decoder, **kwargs) == greedy_answers(model, rows, latents,
                                                                                                **kwargs)
        assert len(calls) == (seed + 1) * model.config.llm["num_hidden_layers"]
        counts.append(graphs())
    # the first shapes, a new length (symbolic from then on), a new batch size (the same); one row is its own graph
    # (dynamo specialises sizes of 1), which the worker's warm-up compiles at load
    assert counts == [1, 2, 3, 3, 3, 4], counts
    assert compiler.static_decoder().attend is kernel  # the worker's decoder has it too (one wrapper per function)


def test_compiled_image_path_equals_eager(make_tiny_model, graphs):
    """The VQA image path compiled in place (VAE encoder, SigLIP layers, fusion projection): latents and image tokens
    within fp32 rounding of eager; one graph per module for one row, one more once a second batch size makes the
    batch dimension dynamic, and nothing for later batches of either kind."""
    from flashu_batch.showo2.vae import VAEConfig, WanVAE

    model = make_tiny_model(seed=25)
    torch.manual_seed(25)
    vae = WanVAE(VAEConfig(dim=8)).eval().requires_grad_(False)
    R = model.config.resolution
    g = torch.Generator().manual_seed(25)
    batches = [torch.rand(n, 3, R, R, generator=g) * 2 - 1 for n in (1, 3, 3, 2)]  # (B, 3, R, R) in [-1, 1]

    def image_path(pixels):
        with torch.no_grad():
            latents = vae.encode(pixels)  # (B, C, h, w)
            return latents, model.embed_image(latents)  # (B, N, H)

    eager = [image_path(pixels) for pixels in batches]
    assert graphs() == 0
    Compiler(backend="aot_eager").compile_image_path(vae, model)
    for i, (pixels, expected) in enumerate(zip(batches, eager)):
        torch.testing.assert_close(image_path(pixels), expected, rtol=1e-5, atol=1e-5)
        assert graphs() == (3 if i == 0 else 6), i
    assert set(model.state_dict()) == set(make_tiny_model(seed=25).state_dict())  # in place: the same keys


def test_a_function_whose_compilation_fails_runs_eager_with_one_warning(make_tiny_model):
    """A backend that cannot build a kernel (as inductor's CPU FlexAttention fails for dynamic shapes in torch 2.13):
    the call runs eager, the same answers, one warning, the function named in `failures`; later calls do not retry.
    Errors of the computation itself pass through."""
    def broken_backend(gm, example_inputs):
        raise RuntimeError("no kernel for this card")

    model = make_tiny_model(seed=26)
    compiler = Compiler(backend=broken_backend)
    decoder = compiler.static_decoder()
    rows, latents = random_prompts(model, [3, 17, 1], seed=2)
    kwargs = dict(max_new_tokens=5, eos_id=-1, pad_id=TOKENS.pad)
    with pytest.warns(RuntimeWarning, match="compiling .* failed") as caught:
        for _ in range(2):
            assert greedy_answers(model, rows, latents, static=decoder, **kwargs) == greedy_answers(model, rows,
                                                                                                    latents, **kwargs)
    fallbacks = [w for w in caught if w.category is RuntimeWarning]  # (eager FlexAttention adds its own notice)
    assert len(fallbacks) == 2 and compiler.failures == ["flex_attention", "static_decode_step"]  # once each
    # the image path, compiled in place, likewise
    from flashu_batch.showo2.vae import VAEConfig, WanVAE

    vae = WanVAE(VAEConfig(dim=8)).eval().requires_grad_(False)
    pixels = torch.rand(2, 3, model.config.resolution, model.config.resolution) * 2 - 1
    with torch.no_grad():
        eager = model.embed_image(vae.encode(pixels))
        compiler.compile_image_path(vae, model)
        with pytest.warns(RuntimeWarning, match="compiling .* failed"):
            assert torch.equal(model.embed_image(vae.encode(pixels)), eager)
    assert len(compiler.failures) == 5

    # an exception without a message still gives its warning and the eager result
    def silent_failure(*args):
        raise torch._dynamo.exc.TorchDynamoException()

    failures = []
    with pytest.warns(RuntimeWarning, match=r"compiling abs failed \(TorchDynamoException: \)"):
        assert CompiledOrEager(abs, silent_failure, failures)(-3) == 3 and failures == ["abs"]

    def bad_input(x):
        raise ValueError("a real error")

    with pytest.raises(ValueError, match="a real error"):
        Compiler(backend="eager")(bad_input)(1)


def test_compile_setting():
    assert compiler_for("off", "cpu") is None and compiler_for("off", "cuda") is None
    assert compiler_for("auto", "cpu") is None  # auto: CUDA only
    assert compiler_for("auto", "cuda") == Compiler(backend="inductor", decode_mode="reduce-overhead")
    assert compiler_for("on", "cpu") == Compiler(backend="eager")


# ---- the worker: compiled and warmed up at load, or not at all ------------------------------------------------



@pytest.mark.parametrize("setting", ["off", "auto", "on"])
def test_worker_compiles_at_load_only_when_asked(tmp_path_factory, graphs, setting):
    from batch_testkit import build_worker, spec_dict, tiny_checkpoint

    from flashu_batch.jobs.spec import parse_spec
    from flashu_batch.workers import T2IWorker

    raw = spec_dict("job-c", tiny_checkpoint(str(tmp_path_factory.getbasetemp())), [dict(
        kind="t2i", input=dict(uris="in.jsonl", format="jsonl"), output="out", params=dict(steps=3))])
    raw["model"]["compile"] = setting
    worker = build_worker(T2IWorker, parse_spec(raw), "t2i")
    assert worker.load_seconds > 0
    at_load = graphs()
    out = worker({"id": np.array(["a", "b", "c"], dtype=object),
                  "prompt": np.array(["a red fox", "two cats on a sofa", "a lighthouse"], dtype=object),
                  "seed": np.array([1.0, 2.0, 3.0]), "error": np.array([None] * 3, dtype=object)})
    assert out.column("error").to_pylist() == [None] * 3
    if setting == "on":
        assert worker.compiler == Compiler(backend="eager") and worker.compile_seconds > 0 and at_load > 0
        assert graphs() == at_load, "the first batch after the warm-up recompiled"
    else:  # eager: dynamo never ran a frame
        assert worker.compiler is None and worker.compile_seconds == 0.0
        assert graphs() == 0 and counters["frames"]["total"] == 0


@pytest.mark.parametrize("setting", ["off", "on"])
def test_vqa_worker_compiles_decoding_at_load_only_when_asked(tmp_path_factory, graphs, setting):
    """model.compile 'on' (CPU: dynamo's eager backend): the worker decodes on a StaticDecoder whose step is compiled
    at load for one row and for a full batch, and so is its image path (VAE encoder, SigLIP layers); the first batch
    then compiles nothing, and its answers are the eager worker's."""
    from batch_testkit import build_worker, png_bytes, spec_dict, tiny_checkpoint

    from flashu_batch.jobs.spec import parse_spec
    from flashu_batch.workers import VQAWorker

    raw = spec_dict("job-v", tiny_checkpoint(str(tmp_path_factory.getbasetemp())), [dict(
        kind="vqa", input=dict(uris="in.parquet", format="parquet"), output="out", params=dict(max_new_tokens=6))])
    spec = parse_spec(raw)

    def build(compile_setting):
        return build_worker(VQAWorker, spec, "vqa", compile=compile_setting)

    batch = {"id": np.array(["a", "b"], dtype=object), "question": np.array(["what color", "how many"], dtype=object),
             "image_bytes": np.array([png_bytes((255, 0, 0)), png_bytes((0, 90, 200), (25, 60))], dtype=object),
             "image_path": np.array(["a.png", "b.png"], dtype=object),
             "image_sha256": np.array(["x", "y"], dtype=object), "error": np.array([None, None], dtype=object)}
    worker = build(setting)
    assert worker.load_seconds > 0
    at_load = graphs()
    out = worker(batch).to_pydict()
    assert out["error"] == [None, None]
    if setting == "on":
        assert worker.compiler == Compiler(backend="eager") and worker.compile_seconds > 0
        assert isinstance(worker.decode_fn.keywords["static"], StaticDecoder)
        # one decode graph per warmed-up bucket (1 row, 2 rows); the image path's three modules for one row, then
        # for a dynamic batch dimension; the prefill's FlexAttention for one row, then for any batch and length
        assert at_load == 2 + 3 * 2 + 2, dict(counters["stats"])
        assert graphs() == at_load, "the first batch after the warm-up recompiled"
        eager = build("off")
        assert worker(batch).to_pydict()["answer"] == out["answer"] == eager(batch).to_pydict()["answer"]
        assert out["num_tokens"] == eager(batch).to_pydict()["num_tokens"]
    else:  # eager: dynamo never ran a frame
        assert worker.compiler is None and worker.compile_seconds == 0.0 and worker.decode_fn is greedy_answers
        assert graphs() == 0 and counters["frames"]["total"] == 0
