"""Tests for showo2.pipeline.Showo2Pipeline on a seeded tiny checkpoint folder (Show-o2 + Wan2.1 VAE + tokenizer):
text_to_image determinism and batch independence, answer() against the reference decoding loop, and input
validation that fails before any model work."""

import dataclasses
import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from flashu_batch.showo2 import pipeline as showo2_pipeline
from flashu_batch.showo2 import vqa as showo2_vqa
from flashu_batch.showo2.layouts import vqa_prompt_ids, vqa_sequence
from flashu_batch.showo2.loading import VAE_FILE, save_showo2
from flashu_batch.showo2.pipeline import Showo2Pipeline
from flashu_batch.showo2.tokenizer import build_tokenizer
from flashu_batch.showo2.vae import VAEConfig, WanVAE

WORDS = ["red", "fox", "blue", "house", "cat", "tree", "the", "What", "is", "this", "color", "shown", "in",
         "picture", "system", "You", "are", "helpful", "assistant", "user", "Describe", "image", "sitting", "snow"]
STEPS = 3
SEQ = 48  # max_seq_len for most calls (max_text_len 27); the default length is exercised once


@pytest.fixture(scope="module")
def folder(make_tiny_model, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("pipeline") / "tiny")
    model = make_tiny_model(seed=11)
    vocab = model.config.llm_vocab_size
    words = WORDS + [f"w{i}" for i in range(vocab - 26 - 256 - len(WORDS))]
    tokenizer = build_tokenizer(words, path=folder)
    assert len(tokenizer) == vocab
    save_showo2(model, folder)
    torch.manual_seed(12)
    vae_config = VAEConfig(dim=8)
    torch.save(WanVAE(vae_config).state_dict(), os.path.join(folder, VAE_FILE))
    with open(os.path.join(folder, "vae_config.json"), "w") as f:
        json.dump(dataclasses.asdict(vae_config), f)
    return folder


@pytest.fixture(scope="module")
def pipe(folder):
    return Showo2Pipeline.from_pretrained(folder)


def latents(pipe, prompts, seeds, **kw):
    kw = {"num_inference_steps": STEPS, "guidance_scale": 4.0, "max_seq_len": SEQ, **kw}
    return pipe.text_to_image(prompts, seeds=seeds, output_type="latent", **kw)


# ------------------------------------------------------------------------------------------------- loading


def test_from_pretrained(pipe, folder):
    assert pipe.resolution == 64 and pipe.dtype == torch.float32
    assert pipe.tokens.bos == pipe.tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert pipe.vae.config == VAEConfig.from_json(os.path.join(folder, "vae_config.json"))
    assert not pipe.model.training


# --------------------------------------------------------------------------------------------- text to image


def test_text_to_image_pil(pipe):
    images = pipe.text_to_image(["the red fox", "a blue house"], seeds=[1, 2], num_inference_steps=STEPS,
                                guidance_scale=4.0)  # default max_seq_len
    assert len(images) == 2
    for im in images:
        assert isinstance(im, Image.Image) and im.mode == "RGB" and im.size == (pipe.resolution, pipe.resolution)
    a, b = (np.asarray(im) for im in images)
    assert a.std() > 0 and not np.array_equal(a, b)


def test_output_types_agree(pipe):
    kw = dict(seeds=[3], num_inference_steps=STEPS, guidance_scale=2.0, max_seq_len=SEQ)
    lat = pipe.text_to_image(["the cat"], output_type="latent", **kw)
    pt = pipe.text_to_image(["the cat"], output_type="pt", **kw)
    pil = pipe.text_to_image(["the cat"], **kw)
    assert lat.shape == (1, 16, 8, 8) and lat.dtype == torch.float32
    assert pt.shape == (1, 3, 64, 64) and pt.min() >= -1 and pt.max() <= 1
    torch.testing.assert_close(pt, pipe.vae.decode(lat), atol=0, rtol=0)
    expected = ((pt[0] + 1) / 2).clamp(0, 1).mul(255).permute(1, 2, 0).to(torch.uint8).numpy()
    assert np.array_equal(np.asarray(pil[0]), expected)


def test_same_seed_same_pixels(pipe):
    kw = dict(num_inference_steps=STEPS, guidance_scale=3.0, max_seq_len=SEQ)
    a = pipe.text_to_image(["the red fox"], seeds=[7], **kw)[0]
    b = pipe.text_to_image(["the red fox"], seeds=[7], **kw)[0]
    c = pipe.text_to_image(["the red fox"], seeds=[8], **kw)[0]
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))


def test_default_seeds(pipe):
    assert torch.equal(latents(pipe, ["cat", "tree"], None), latents(pipe, ["cat", "tree"], [0, 1]))


def test_batch_independence(pipe):
    """A prompt's image depends only on its prompt and seed: not on the other prompts or the batch size
    (the other prompts have other lengths, so the image sits at other offsets in their rows)."""
    alone = latents(pipe, ["a blue house"], [5])
    pair = latents(pipe, ["the red fox sitting in the snow", "a blue house"], [9, 5])
    three = latents(pipe, ["a blue house", "cat", "What is the color of this tree in the picture"], [5, 1, 2])
    torch.testing.assert_close(pair[1:], alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(three[:1], alone, atol=1e-5, rtol=0)
    assert (pair[0] - alone[0]).abs().max() > 1e-2  # another prompt and seed do change the image
    # Same seed, other prompt: the prompt matters.
    assert (latents(pipe, ["the red fox"], [5]) - alone).abs().max() > 1e-3


def test_guidance_zero_and_one(pipe, monkeypatch):
    """g = 0 runs the cond rows only; g = 1 (v_u + 1 * (v_c - v_u) = v_c) must give the same latents."""
    rows = []
    real = showo2_pipeline.PrefixCachedVelocity

    def spy(model, seqs, use_cfg):
        rows.append((seqs.input_ids.shape[0], use_cfg))
        return real(model, seqs, use_cfg)

    monkeypatch.setattr(showo2_pipeline, "PrefixCachedVelocity", spy)
    prompts = ["the red fox", "a cat in the snow"]
    g0 = latents(pipe, prompts, [4, 6], guidance_scale=0)
    g1 = latents(pipe, prompts, [4, 6], guidance_scale=1.0)
    g5 = latents(pipe, prompts, [4, 6], guidance_scale=5.0)
    assert rows == [(2, False), (4, True), (4, True)]
    assert torch.isfinite(g0).all()
    torch.testing.assert_close(g1, g0, atol=1e-5, rtol=0)
    assert (g5 - g0).abs().max() > 1e-2


def test_long_prompt_truncate(pipe):
    long_prompt = " ".join(["red"] * 20)  # 39 tokens (every space is a token in the tiny tokenizer)
    with pytest.raises(ValueError, match=r"prompt 0.*truncate"):
        latents(pipe, [long_prompt], [0])
    cut = latents(pipe, [long_prompt], [0], truncate=True)
    # Truncation keeps the first max_text_len = SEQ - 17 - 4 tokens: the same image as that prefix.
    ids = pipe.tokenizer(long_prompt, add_special_tokens=False)["input_ids"][:SEQ - 17 - 4]
    prefix = pipe.tokenizer.decode(ids)
    assert pipe.tokenizer(prefix, add_special_tokens=False)["input_ids"] == ids
    torch.testing.assert_close(cut, latents(pipe, [prefix], [0]), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------------- VQA


def test_answer_matches_reference_decoding(pipe, monkeypatch):
    g = torch.Generator().manual_seed(0)
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 90, 3), dtype=np.uint8), "RGB")
    tensor = torch.rand(3, 64, 64, generator=g) * 2 - 1
    images = [rgb, tensor, tensor]
    questions = ["What is this?", "Describe the image in the picture", "What color is shown?"]
    captured = []
    real = showo2_pipeline.greedy_answers

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        captured.append((kwargs["max_new_tokens"], out))
        return out

    monkeypatch.setattr(showo2_pipeline, "greedy_answers", spy)
    answers = pipe.answer(images, questions, max_new_tokens=5)
    assert isinstance(answers, list) and all(isinstance(a, str) for a in answers) and len(answers) == 3
    assert pipe.answer(images, questions, max_new_tokens=5) == answers
    (limit, ids), _ = captured
    assert limit == 5 and all(len(row) <= 5 for row in ids)
    assert sum(len(row) for row in ids) > 0  # the tiny model does produce tokens
    assert answers == [pipe.tokenizer.decode(row, skip_special_tokens=True) for row in ids]

    # The reference loop (whole sequence re-run per token), one question at a time, gives the same ids.
    for i, q in enumerate(questions):
        assert ids[i] == reference_ids(pipe, images[i], q, max_new_tokens=5), (i, q)
    # Batched answers equal answering each question alone.
    for i in range(3):
        assert pipe.answer([images[i]], [questions[i]], max_new_tokens=5) == [answers[i]]


def test_preprocess_image(pipe):
    """PIL path: shorter side to the model resolution, centre crop, [0, 255] -> [-1, 1] (no resampling needed here,
    so the expected pixels are exact)."""
    R = pipe.resolution
    rng = np.random.default_rng(3)
    wide = rng.integers(0, 256, (R, 2 * R, 3), dtype=np.uint8)  # (H, W, 3): W = 2R, already R tall
    out = pipe.preprocess_image(Image.fromarray(wide, "RGB"))
    assert out.shape == (3, R, R) and out.dtype == torch.float32
    expected = torch.from_numpy(wide[:, R // 2:R // 2 + R].astype(np.float32)).permute(2, 0, 1) / 127.5 - 1
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    tall = rng.integers(0, 256, (3 * R, 3 * R, 3), dtype=np.uint8)
    out = pipe.preprocess_image(Image.fromarray(tall, "RGB"))
    assert out.shape == (3, R, R) and out.min() >= -1 and out.max() <= 1
    t = torch.rand(3, R, R, dtype=torch.float64)
    assert torch.equal(pipe.preprocess_image(t), t.float())


def reference_ids(pipe, image, question, max_new_tokens, layout="demo"):
    """Greedy ids from the official decoding loop (showo2_vqa.greedy_answer_recompute) for one question."""
    latent = pipe.vae.encode(pipe.preprocess_image(image)[None])
    text_a, q_ids, role_b = vqa_prompt_ids(pipe.tokenizer, pipe.tokens, question, layout)
    seqs = vqa_sequence(q_ids, text_a, role_b, pipe.tokens, pipe.model.config.num_image_slots, layout)
    ids, _ = showo2_vqa.greedy_answer_recompute(pipe.model, seqs, latent, max_new_tokens=max_new_tokens,
                                                eos_id=pipe.tokens.eos)
    return ids


def test_answer_max_new_tokens(pipe, monkeypatch):
    captured = []
    real = showo2_pipeline.greedy_answers
    monkeypatch.setattr(showo2_pipeline, "greedy_answers",
                        lambda *a, **k: captured.append(real(*a, **k)) or captured[-1])
    image = torch.zeros(3, 64, 64)
    for limit in (1, 3):
        pipe.answer([image, image], ["What is this?", "this"], max_new_tokens=limit)
        assert all(len(row) <= limit for row in captured[-1]), captured[-1]
    pipe.answer([image], ["What is this?"], max_new_tokens=8)
    pipe.answer([image], ["What is this?"], max_new_tokens=3)
    long_ids, short_ids = captured[-2][0], captured[-1][0]
    assert len(long_ids) > 3  # (the tiny model does not stop early here, so the budget is what cuts)
    assert short_ids == long_ids[:3]  # greedy: a smaller budget gives a prefix of the longer answer


def test_answer_training_layout(pipe, monkeypatch):
    captured = []
    real = showo2_pipeline.greedy_answers
    monkeypatch.setattr(showo2_pipeline, "greedy_answers",
                        lambda *a, **k: captured.append(real(*a, **k)) or captured[-1])
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 64, 64, generator=g) * 2 - 1 for _ in range(2)]
    questions = ["What is this?", "Describe the picture"]
    answers = pipe.answer(images, questions, max_new_tokens=4, layout="training")
    for i, q in enumerate(questions):
        ref = reference_ids(pipe, images[i], q, max_new_tokens=4, layout="training")
        assert captured[-1][i] == ref
        assert answers[i] == pipe.tokenizer.decode(ref, skip_special_tokens=True)


# ------------------------------------------------------------------------------------------------ validation


@pytest.fixture
def no_model_work(pipe, monkeypatch):
    """Make every model entry point raise: validation errors must come first."""

    def boom(*args, **kwargs):
        raise AssertionError("model work started before input validation")

    monkeypatch.setattr(pipe.model, "velocity", boom)
    monkeypatch.setattr(pipe.model, "embed_image", boom)
    monkeypatch.setattr(pipe.model, "time_embedding", boom)
    monkeypatch.setattr(pipe.vae, "encode", boom)
    monkeypatch.setattr(pipe.vae, "decode", boom)
    monkeypatch.setattr(showo2_pipeline, "PrefixCachedVelocity", boom)
    monkeypatch.setattr(showo2_pipeline, "generate_latents", boom)
    monkeypatch.setattr(showo2_pipeline, "greedy_answers", boom)
    monkeypatch.setattr(showo2_vqa, "greedy_answers", boom)
    monkeypatch.setattr(showo2_vqa, "greedy_answer_recompute", boom)
    return pipe


@pytest.mark.parametrize("kwargs,param", [
    (dict(prompts=[]), "prompts"),
    (dict(prompts="the cat"), "prompts"),
    (dict(prompts=[""]), "prompt 0"),
    (dict(prompts=["cat", "   "]), "prompt 1"),
    (dict(num_inference_steps=0), "num_inference_steps"),
    (dict(num_inference_steps=1), "num_inference_steps"),
    (dict(num_inference_steps=2.5), "num_inference_steps"),
    (dict(guidance_scale=-1.0), "guidance_scale"),
    (dict(guidance_scale=math.nan), "guidance_scale"),
    (dict(guidance_scale=math.inf), "guidance_scale"),
    (dict(prompts=[" ".join(["cat"] * 20)], max_seq_len=SEQ), "prompt 0"),
    (dict(prompts=["cat", "tree"], seeds=[1]), "seeds"),
    (dict(prompts=["cat"], seeds=[1, 2]), "seeds"),
    (dict(prompts=["cat"], seeds=[1.5]), "seeds"),
    (dict(output_type="numpy"), "output_type"),
])
def test_text_to_image_validation(no_model_work, kwargs, param):
    kwargs = {"prompts": ["the cat"], **kwargs}
    prompts = kwargs.pop("prompts")
    with pytest.raises(ValueError, match=param) as e:
        no_model_work.text_to_image(prompts, **kwargs)
    if param == "prompt 0" and "max_seq_len" in kwargs:
        assert "truncate" in str(e.value)


@pytest.mark.parametrize("time_shift", [0.0, -1.0, math.nan, math.inf])
def test_time_shift_validation(no_model_work, time_shift):
    with pytest.raises(ValueError, match="time_shift"):
        no_model_work.text_to_image(["the cat"], num_inference_steps=STEPS, time_shift=time_shift)


def test_long_prompt_truncate_passes_validation(no_model_work):
    # truncate=True gets past validation (into the patched model work).
    with pytest.raises(AssertionError, match="model work"):
        no_model_work.text_to_image([" ".join(["cat"] * 20)], max_seq_len=SEQ, truncate=True)


def rgb(size=(64, 64)):
    return Image.new("RGB", size, (10, 20, 30))


@pytest.mark.parametrize("images,questions,kwargs,param", [
    ([], [], {}, "images"),
    ([rgb()], ["What is this?", "this"], {}, "questions"),
    ([rgb(), rgb()], ["What is this?"], {}, "questions"),
    ([rgb()], "What is this?", {}, "questions"),
    ([rgb()], [""], {}, "question 0"),
    ([rgb(), rgb()], ["What?", " \n"], {}, "question 1"),
    ([rgb()], ["What is this?"], dict(max_new_tokens=0), "max_new_tokens"),
    ([rgb()], ["What is this?"], dict(max_new_tokens=-2), "max_new_tokens"),
    ([rgb()], ["What is this?"], dict(layout="chat"), "layout"),
    ([Image.new("L", (64, 64))], ["What is this?"], {}, "image 0"),
    ([rgb(), Image.new("RGBA", (64, 64))], ["What?", "this"], {}, "image 1"),
    ([torch.zeros(3, 32, 32)], ["What is this?"], {}, "image 0"),
    ([torch.zeros(64, 64, 3)], ["What is this?"], {}, "image 0"),
    ([torch.zeros(3, 64, 64, dtype=torch.uint8)], ["What is this?"], {}, "image 0"),
    ([np.zeros((64, 64, 3), dtype=np.uint8)], ["What is this?"], {}, "image 0"),
    (["photo.png"], ["What is this?"], {}, "image 0"),
])
def test_answer_validation(no_model_work, images, questions, kwargs, param):
    with pytest.raises(ValueError, match=param):
        no_model_work.answer(images, questions, **kwargs)
