"""scheduler/processor.py: build_processor on a user's own Ray Dataset, written with the user's own writer."""

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from batch_testkit import png_bytes
from flashu_batch import build_processor
from flashu_batch.jobs.spec import ModelSpec, SpecError, T2IParams
from flashu_batch.workers.common import row_seed

RESOURCES = dict(workers=1, gpus_per_worker=0, cpus_per_worker=0.5, batch_size=2)


def model(checkpoint) -> dict:
    return dict(checkpoint=checkpoint, dtype="float32", device="cpu")


def by_key(path, key: str) -> dict:
    return {r[key]: r for r in pq.read_table(str(path)).to_pylist()}


def test_t2i_rows_keep_their_columns_through_the_users_writer(ray_session, checkpoint, tmp_path):
    import ray

    from flashu_batch.showo2.pipeline import Showo2Pipeline

    processor = build_processor(task="t2i", model=model(checkpoint), params=dict(steps=3, guidance_scale=2.0),
                                resources=RESOURCES)
    ds = ray.data.from_items([dict(prompt="a red circle", url="http://x/1", license="cc-by", rank=1),
                              dict(prompt="", url="http://x/2", license="cc0", rank=2),
                              dict(prompt="a blue square", url="http://x/3", license="cc-by", rank=3)])
    processor(ds).write_parquet(str(tmp_path / "out"))

    rows = by_key(tmp_path / "out", "url")
    assert sorted(rows) == ["http://x/1", "http://x/2", "http://x/3"]  # one row out per row in, errors included
    assert [rows[u]["license"] for u in sorted(rows)] == ["cc-by", "cc0", "cc-by"]
    assert [rows[u]["rank"] for u in sorted(rows)] == [1, 2, 3]
    assert rows["http://x/2"]["error"] == "prompt is empty" and rows["http://x/2"]["image"] is None
    # The independent reference: the pipeline itself, with the seed the row's derived id gives.
    pipe = Showo2Pipeline.from_pretrained(checkpoint)
    for url in ("http://x/1", "http://x/3"):
        row = rows[url]
        assert row["error"] is None and row["seed"] == row_seed("", row["id"])
        expected = pipe.text_to_image([row["prompt"]], seeds=[row["seed"]], num_inference_steps=3,
                                      guidance_scale=2.0)[0]
        got = Image.open(io.BytesIO(row["image"]["bytes"]))
        assert np.abs(np.asarray(got, np.int16) - np.asarray(expected, np.int16)).max() <= 2  # float rounding


def test_vqa_with_preprocess_postprocess_and_spec_models(ray_session, checkpoint, tmp_path):
    import ray

    processor = build_processor(
        task="vqa", model=ModelSpec(**model(checkpoint)), params=dict(max_new_tokens=3), resources=RESOURCES,
        preprocess=lambda row: dict(row, question=row.pop("q")),  # the user's column name -> the task's
        postprocess=lambda row: dict(row, answered=row["error"] is None))
    ds = ray.data.from_items([dict(q="what color", image=png_bytes(), key="k1"),
                              dict(q="what shape", image=b"not an image", key="k2")])
    processor(ds).write_parquet(str(tmp_path / "out"))
    rows = by_key(tmp_path / "out", "key")
    assert rows["k1"]["answered"] and isinstance(rows["k1"]["answer"], str) and 1 <= rows["k1"]["num_tokens"] <= 3
    assert not rows["k2"]["answered"] and "could not be decoded" in rows["k2"]["error"]
    assert rows["k1"]["image"] == png_bytes()  # the input's own columns come out as they went in


def test_arguments_are_validated_before_ray_runs_and_columns_are_checked(ray_session, checkpoint):
    import ray

    with pytest.raises(SpecError, match=r"params.steps: Input should be greater than or equal to 2"):
        build_processor(task="t2i", model=model(checkpoint), params=dict(steps=1))
    with pytest.raises(SpecError, match=r"task: got 'edit'"):
        build_processor(task="edit", model=model(checkpoint))
    processor = build_processor(task="t2i", model=model(checkpoint), params=T2IParams(steps=2), resources=RESOURCES)
    with pytest.raises(Exception, match=r"Required input columns \['prompt'\] not found"):
        processor(ray.data.from_items([dict(caption="a red circle")])).take_all()


def test_a_worker_that_cannot_start_is_reported_as_what_it_is(ray_session, checkpoint, tmp_path):
    import time

    import ray

    from flashu_batch.workers import T2IWorker

    class BrokenT2IWorker(T2IWorker):  # defined here, so Ray ships it by value to the actor
        def __init__(self, *args, **kwargs):
            raise FileNotFoundError("No tokenizer in '/models/x': pass tokenizer_path= pointing at a Qwen2.5 folder.")

    processor = build_processor(task="t2i", model=model(checkpoint), params=dict(steps=2), resources=RESOURCES,
                                worker_cls=BrokenT2IWorker)
    from flashu_batch.scheduler.pipeline import WorkerStartError, explain_worker_deaths

    start = time.monotonic()
    with pytest.raises(WorkerStartError) as e:
        list(explain_worker_deaths(processor(ray.data.from_items([dict(prompt="a red circle")])).iter_batches(),
                                   "t2i"))
    message = str(e.value)
    assert message.startswith("task 't2i': its workers could not start: FileNotFoundError: No tokenizer in")
    assert "check model.tokenizer_path" in message and "poison" not in message and "retries" not in message
    assert time.monotonic() - start < 120


def test_vqa_workers_get_cpu_stage_pixels_and_answer_as_without_them(ray_session, checkpoint, tmp_path, monkeypatch):
    """The CPU stage decodes and resizes each image once at the checkpoint's resolution (read from its config); the
    worker answers from those pixels, and the answers equal a run where the workers decode the images themselves."""
    import ray

    import flashu_batch.scheduler.pipeline as pipeline
    from flashu_batch.showo2.config import input_resolution
    from flashu_batch.workers import VQAWorker
    from flashu_batch.workers.images import PIXELS_COLUMN

    R = input_resolution(checkpoint)
    assert R == 64  # the tiny model: 4 x 4 tokens, patch 2, VAE x8

    class PixelsSeenVQAWorker(VQAWorker):  # defined here, so Ray ships it by value to the actor
        def __call__(self, batch):
            pixels = batch.column(PIXELS_COLUMN).to_pylist() if PIXELS_COLUMN in batch.column_names else \
                [None] * batch.num_rows
            seen = [isinstance(p, bytes) and len(p) == R * R * 3 for p in pixels]
            return super().__call__(batch).append_column("pixels_seen", pa.array(seen))

    def run(name):
        processor = build_processor(task="vqa", model=model(checkpoint), params=dict(max_new_tokens=4),
                                    resources=RESOURCES, worker_cls=PixelsSeenVQAWorker)
        colors, sizes = [(255, 0, 0), (0, 90, 200), (30, 200, 40), (250, 250, 0), (9, 9, 9)], \
            [(40, 30), (25, 90), (64, 64), (120, 33), (7, 11)]
        questions = ["what color", "what shape is it, and is it wide or tall", "how many", "why", "which one is it"]
        rows = [dict(question=q, image=png_bytes(c, s), key=f"k{i}")
                for i, (q, c, s) in enumerate(zip(questions, colors, sizes))]
        rows.append(dict(question="broken", image=b"not an image", key="bad"))
        processor(ray.data.from_items(rows)).write_parquet(str(tmp_path / name))
        return by_key(tmp_path / name, "key")

    with_pixels = run("pixels")
    monkeypatch.setattr(pipeline, "input_resolution", lambda checkpoint: None)  # the driver cannot read the config
    without = run("decoded-by-workers")
    good = [f"k{i}" for i in range(5)]
    assert all(with_pixels[k]["pixels_seen"] for k in good) and not any(without[k]["pixels_seen"] for k in good)
    assert [with_pixels[k]["answer"] for k in good] == [without[k]["answer"] for k in good]
    assert all(isinstance(with_pixels[k]["answer"], str) and with_pixels[k]["error"] is None for k in good)
    assert "could not be decoded" in with_pixels["bad"]["error"] and not with_pixels["bad"]["pixels_seen"]
    assert PIXELS_COLUMN not in pq.read_table(str(tmp_path / "pixels")).column_names  # never output
