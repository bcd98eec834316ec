"""workers/t2i.py params beyond the official ones: negative_prompt (param and per-row column),
num_images_per_prompt (ids, seeds, image_index) and image_format / image_quality. Defaults stay the official
output; each knob is checked against an independent reference (the pipeline run by hand, PIL decoding)."""

import io
import json

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from batch_testkit import build_worker, run, spec_dict
from flashu_batch.jobs.spec import SpecError, parse_spec
from flashu_batch.showo2.layouts import t2i_sequences
from flashu_batch.showo2.pipeline import Showo2Pipeline, to_pil
from flashu_batch.showo2.t2i import full_sequence_velocity_fn, generate_latents, seeded_noise
from flashu_batch.workers import T2IWorker
from flashu_batch.workers.common import row_seed

STEPS, GUIDANCE = 3, 3.0


def make_worker(checkpoint, **params):
    task = dict(kind="t2i", input=dict(uris="in.jsonl", format="jsonl"), output="out",
                params={"steps": STEPS, "guidance_scale": GUIDANCE, **params})
    return build_worker(T2IWorker, parse_spec(spec_dict("job-p", checkpoint, [task])), "t2i")


def batch(ids, prompts, seeds=None, negatives=None, errors=None) -> dict:
    n = len(ids)
    rows = {"id": np.array(ids, dtype=object), "prompt": np.array(prompts, dtype=object),
            "seed": np.array(seeds if seeds is not None else [np.nan] * n, dtype=float),
            "error": np.array(errors or [None] * n, dtype=object)}
    if negatives is not None:
        rows["negative_prompt"] = np.array(negatives, dtype=object)
    return rows


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def pipe(checkpoint):
    return Showo2Pipeline.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def plain(checkpoint):
    return make_worker(checkpoint)


# ---- negative_prompt -------------------------------------------------------------------------------------------------


def reference_png(pipe, prompt: str, negative: str, seed: int) -> bytes:
    """The image made by hand: the negative prompt's ids in the uncond row, the full-sequence reference step."""
    encode = lambda text: pipe.tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    c = pipe.model.config
    seqs = t2i_sequences([encode(prompt)], pipe.tokens, c.num_image_slots, c.default_max_seq_len,
                         negative_ids=[encode(negative)])
    assert seqs.input_ids[1, 1:1 + len(encode(negative))].tolist() == encode(negative)  # the uncond row's caption
    latents = generate_latents(full_sequence_velocity_fn(pipe.model, seqs),
                               seeded_noise([seed], (c.image_latent_dim, *c.latent_size)),
                               num_inference_steps=STEPS, guidance_scale=GUIDANCE)
    png = io.BytesIO()
    to_pil(pipe.vae.decode(latents))[0].save(png, format="PNG")
    return png.getvalue()


def test_negative_prompt_param_and_column(checkpoint, pipe, plain):
    worker = make_worker(checkpoint, negative_prompt="blurry, dark")
    rows = batch(["a", "b", "c"], ["a red circle", "a fox", "a cat"], seeds=[1, 2, 3],
                 negatives=[None, "green", ""])
    out = run(worker, rows)
    assert out["negative_prompt"] == ["blurry, dark", "green", None]  # the row's own value wins, '' included
    default = run(plain, batch(["a", "b", "c"], ["a red circle", "a fox", "a cat"], seeds=[1, 2, 3]))
    assert default["negative_prompt"] == [None, None, None]
    for i, (prompt, negative, seed) in enumerate([("a red circle", "blurry, dark", 1), ("a fox", "green", 2)]):
        expected = pixels(reference_png(pipe, prompt, negative, seed))
        assert np.abs(pixels(out["image_bytes"][i]) - expected).max() <= 2  # prefix cache vs full step: rounding
        assert not np.array_equal(pixels(out["image_bytes"][i]), pixels(default["image_bytes"][i]))
    # '' is the official empty caption: bit for bit the default in a batch of the same shape; beside rows with longer
    # negative prompts (a longer padded prefix) the BLAS may sum in another order (seen on an AMD EPYC: 1 level)
    assert np.abs(pixels(out["image_bytes"][2]) - pixels(default["image_bytes"][2])).max() <= 2
    alone = run(worker, batch(["c"], ["a cat"], seeds=[3], negatives=[""]))
    assert alone["image_bytes"][0] == run(plain, batch(["c"], ["a cat"], seeds=[3]))["image_bytes"][0]
    assert json.loads(out["model"][0])["negative_prompt"] == "blurry, dark"
    assert "negative_prompt" not in json.loads(default["model"][0])


def test_negative_prompt_column_absent_or_null_is_the_default_bit_for_bit(plain):
    rows = batch(["a", "b"], ["a red circle", "a fox"], seeds=[1, 2])
    with_nulls = run(plain, dict(rows, negative_prompt=np.array([None, None], dtype=object)))
    assert with_nulls["image_bytes"] == run(plain, rows)["image_bytes"]


def test_an_over_long_negative_prompt_is_an_error_row_unless_truncate(checkpoint, plain):
    rows = batch(["ok", "long"], ["a red circle", "a fox"], seeds=[1, 2], negatives=[None, "red " * 400])
    out = run(plain, rows)
    assert out["error"][0] is None and out["image_bytes"][0] is not None
    assert out["error"][1].startswith("negative_prompt has 800 tokens, over the limit of 256")
    assert "truncate" in out["error"][1] and out["image_bytes"][1] is None
    cut = run(make_worker(checkpoint, truncate=True), rows)
    assert cut["error"] == [None, None]  # row 0 ran alone above, in a batch of two here: float rounding
    assert np.abs(pixels(cut["image_bytes"][0]) - pixels(out["image_bytes"][0])).max() <= 2


def test_a_negative_prompt_needs_guidance(checkpoint):
    raw = spec_dict("job-p", checkpoint, [dict(kind="t2i", input=dict(uris="in.jsonl", format="jsonl"),
                                               output="out", params=dict(guidance_scale=0, negative_prompt="x"))])
    with pytest.raises(SpecError, match="negative_prompt: got 'x' with guidance_scale 0"):
        parse_spec(raw)
    worker = make_worker(checkpoint, guidance_scale=0.0)
    out = run(worker, batch(["a", "b"], ["a red circle", "a fox"], negatives=["green", None]))
    assert "no model call uses classifier-free guidance" in out["error"][0]
    assert out["error"][1] is None and out["image_bytes"][1] is not None


# ---- num_images_per_prompt -------------------------------------------------------------------------------------------


def test_images_per_prompt_ids_seeds_and_images(checkpoint, plain):
    worker = make_worker(checkpoint, num_images_per_prompt=3)
    meta = pa.array(["m0", "m1", "m2"])
    table = pa.table({"id": ["a", "b", "c"], "prompt": ["a red circle", "a fox", "x"],
                      "seed": pa.array([5, None, 2**63 - 2], pa.int64()),
                      "error": pa.array([None, None, "prompt is empty"], pa.string()), "meta": meta})
    out = worker(table).to_pydict()
    assert out["id"] == ["a#0", "a#1", "a#2", "b#0", "b#1", "b#2", "c#0", "c#1", "c#2"]
    assert out["image_index"] == [0, 1, 2] * 3 and out["meta"] == ["m0"] * 3 + ["m1"] * 3 + ["m2"] * 3
    base = row_seed("job-p", "b")
    assert out["seed"] == [5, 6, 7, base, (base + 1) % 2**63, (base + 2) % 2**63, 2**63 - 2, 2**63 - 1, 0]
    assert out["error"][6:] == ["prompt is empty"] * 3 and out["image_bytes"][6:] == [None] * 3
    assert [p for p in out["image_path"][:6]] == [f"{i}.png" for i in out["id"][:6]]
    assert json.loads(out["model"][0])["num_images_per_prompt"] == 3
    # image k is the image of a one-image run with seed + k: bit for bit in the same batch layout...
    single = plain(pa.table({"id": [f"s{k}" for k in range(6)], "prompt": ["a red circle"] * 3 + ["a fox"] * 3,
                             "seed": pa.array(out["seed"][:6], pa.int64()),
                             "error": pa.array([None] * 6, pa.string())})).to_pydict()
    assert single["image_bytes"] == out["image_bytes"][:6]
    # ...and up to float rounding alone
    alone = plain(pa.table({"id": ["x"], "prompt": ["a fox"], "seed": pa.array([out["seed"][4]], pa.int64()),
                            "error": pa.array([None], pa.string())})).to_pydict()
    assert np.abs(pixels(alone["image_bytes"][0]) - pixels(out["image_bytes"][4])).max() <= 2
    assert len({bytes(b) for b in out["image_bytes"][:6]}) == 6


def test_one_image_per_prompt_keeps_the_row_ids(plain):
    out = run(plain, batch(["a"], ["a red circle"], seeds=[5]))
    assert out["id"] == ["a"] and out["image_index"] == [0] and out["seed"] == [5]


# ---- image_format / image_quality ------------------------------------------------------------------------------------


def test_webp_and_jpeg_outputs(checkpoint, plain):
    rows = batch(["a", "b"], ["a red circle", "a fox"], seeds=[1, 2])
    png = run(plain, rows)
    for fmt, quality, pil_name, extension, tolerance in [("webp", 90, "WEBP", "webp", 60),
                                                          ("webp", 100, "WEBP", "webp", 0),
                                                          ("jpeg", 95, "JPEG", "jpg", 60)]:
        out = run(make_worker(checkpoint, image_format=fmt, image_quality=quality), rows)
        for i in range(2):
            image = Image.open(io.BytesIO(out["image_bytes"][i]))
            assert image.format == pil_name and image.size == (64, 64) and image.mode == "RGB"
            assert out["image_path"][i] == f"{out['id'][i]}.{extension}"
            difference = np.abs(pixels(out["image_bytes"][i]) - pixels(png["image_bytes"][i]))
            assert difference.max() <= tolerance, (fmt, quality, difference.max())  # 100 with webp: lossless
        settings = json.loads(out["model"][0])  # params at their defaults are left out (90: the default quality)
        assert settings["image_format"] == fmt and settings.get("image_quality", 90) == quality
    smaller = run(make_worker(checkpoint, image_format="jpeg", image_quality=10), rows)["image_bytes"][0]
    assert len(smaller) < len(run(make_worker(checkpoint, image_format="jpeg", image_quality=95), rows)
                              ["image_bytes"][0])
    assert Image.open(io.BytesIO(png["image_bytes"][0])).format == "PNG"


def test_pipeline_negative_prompt_argument_checks(pipe):
    kw = dict(seeds=[1], num_inference_steps=2, output_type="latent")
    with pytest.raises(ValueError, match="negative_prompt must be None, a string, or one string"):
        pipe.text_to_image(["a fox"], negative_prompt=["a", "b"], **kw)
    with pytest.raises(ValueError, match="negative prompt 0 has 800 tokens"):
        pipe.text_to_image(["a fox"], negative_prompt="red " * 400, **kw)
    with pytest.raises(ValueError, match="negative_prompt was given with guidance_scale 0"):
        pipe.text_to_image(["a fox"], negative_prompt="red", guidance_scale=0, **kw)
    plain = pipe.text_to_image(["a fox"], **kw)
    assert torch.equal(pipe.text_to_image(["a fox"], negative_prompt="", **kw), plain)
    assert torch.equal(pipe.text_to_image(["a fox"], negative_prompt=[None], **kw), plain)
