"""Each VQA image decoded and resized once, in the CPU stage (scheduler/validate.py, workers/images.py model_pixels):
the worker answers from those pixels exactly as it answers from image_bytes alone, and never outputs them."""

import hashlib
import io

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from batch_testkit import build_worker, run, spec_dict
from flashu_batch.jobs.spec import parse_spec
from flashu_batch.jobs.storage import Storage
from flashu_batch.scheduler.read import ROW_SCHEMAS
from flashu_batch.scheduler.validate import validate_vqa
from flashu_batch.workers import VQAWorker
from flashu_batch.workers.images import PIXELS_COLUMN


def noise_png(size, mode="RGB", seed=0) -> bytes:
    """A random-noise image (every resize and crop changes its pixels), encoded as PNG."""
    channels = len(mode)
    values = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(values.squeeze(-1) if channels == 1 else values, mode).save(buf, format="PNG")
    return buf.getvalue()


# wide, tall, already square at some size, RGBA (composited on white), grayscale, and one that fails to decode
IMAGES = [noise_png((120, 45), seed=1), noise_png((30, 90), seed=2), noise_png((64, 64), seed=3),
          noise_png((50, 70), "RGBA", seed=4), noise_png((33, 47), "L", seed=5), b"not an image"]
QUESTIONS = ["what color", "what shape is this", "how many", "is it transparent", "gray?", "broken"]


@pytest.fixture(scope="module")
def worker(checkpoint):
    task = dict(kind="vqa", input=dict(uris="in.parquet", format="parquet"), output="out",
                params=dict(max_new_tokens=5))
    return build_worker(VQAWorker, parse_spec(spec_dict("job-p", checkpoint, [task])), "vqa")


def rows_table(images=IMAGES, questions=QUESTIONS) -> pa.Table:
    """Canonical VQA rows (scheduler/read.py ROW_SCHEMAS), plus a user column, as the read stage hands them on."""
    rows = [dict(id=f"r{i}", question=q, image_bytes=b, image_path=f"{i}.png", image_sha256=None, seed=None,
                 error=None) for i, (b, q) in enumerate(zip(images, questions))]
    table = pa.Table.from_pylist(rows, schema=ROW_SCHEMAS["vqa"])
    return table.append_column("license", pa.array([f"cc-{i}" for i in range(len(rows))]))


def test_answers_from_cpu_stage_pixels_equal_answers_from_image_bytes(worker, monkeypatch):
    R = worker.pipe.resolution
    validated = validate_vqa(rows_table().select(ROW_SCHEMAS["vqa"].names), Storage(), resolution=R)
    pixels = validated.column(PIXELS_COLUMN)
    assert pixels.type == pa.binary(R * R * 3) and pixels.null_count == 1  # the undecodable row has none
    assert validated.column("image_sha256").to_pylist()[:5] == [hashlib.sha256(b).hexdigest() for b in IMAGES[:5]]

    from_bytes = run(worker, validated.drop_columns([PIXELS_COLUMN]))  # what a direct caller with bytes gets
    import flashu_batch.workers.vqa as vqa_module

    def no_decode(*args, **kwargs):
        raise AssertionError("the worker decoded an image the CPU stage had made model-ready")

    with monkeypatch.context() as m:  # rows with pixels are not decoded again; the bad row failed upstream
        m.setattr(vqa_module, "decode_image", no_decode)
        from_pixels = run(worker, validated)
    assert PIXELS_COLUMN not in from_pixels
    assert from_pixels["answer"][:5] == from_bytes["answer"][:5] and None not in from_pixels["answer"][:5]
    assert from_pixels["num_tokens"] == from_bytes["num_tokens"]
    assert from_pixels["image_sha256"] == validated.column("image_sha256").to_pylist()
    assert from_pixels["error"][5] == from_bytes["error"][5] == \
        "image could not be decoded (12 bytes): not a recognized image format"


def test_pixels_are_the_pipelines_own_preprocessing(worker):
    """The worker's tensor from the CPU stage's pixels is bit-identical to preprocess_image of the decoded image."""
    import torch

    from flashu_batch.workers.images import decode_image, model_pixels, pixels_array

    R, params = worker.pipe.resolution, worker.params
    for data in IMAGES[:5]:
        image = decode_image(data, params.max_image_pixels, params.max_image_bytes)
        tensor = worker.normalize_pixels(pixels_array(model_pixels(image, R), R))
        assert torch.equal(tensor, worker.pipe.preprocess_image(image))


@pytest.mark.parametrize("form", ["dict", "pandas"])
def test_direct_callers_with_and_without_pixels(worker, form):
    R = worker.pipe.resolution
    validated = validate_vqa(rows_table().select(ROW_SCHEMAS["vqa"].names), Storage(), resolution=R)
    table = validated.slice(0, 3)
    to_batch = (lambda t: {k: np.array(v, dtype=object) for k, v in t.to_pydict().items()}) if form == "dict" else \
        (lambda t: t.to_pandas())
    with_pixels = run(worker, to_batch(table))
    without = run(worker, to_batch(table.drop_columns([PIXELS_COLUMN])))
    assert with_pixels["answer"] == without["answer"] and PIXELS_COLUMN not in with_pixels


def test_pixels_of_another_resolution_are_decoded_again(worker):
    """Pixels made for another model's resolution are not this model's input: the worker decodes image_bytes."""
    R = worker.pipe.resolution
    table = rows_table().select(ROW_SCHEMAS["vqa"].names).slice(0, 2)
    other = validate_vqa(table, Storage(), resolution=R + 8)
    same = validate_vqa(table, Storage(), resolution=R)
    assert run(worker, other)["answer"] == run(worker, same)["answer"]


def test_validate_without_a_resolution_makes_no_pixels():
    assert PIXELS_COLUMN not in validate_vqa(rows_table().select(ROW_SCHEMAS["vqa"].names), Storage()).column_names
