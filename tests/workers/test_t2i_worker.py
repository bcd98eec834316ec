"""workers/t2i.py without Ray: a dict batch in, one result row per input row out, errors as values."""

import io
import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from PIL import Image

from batch_testkit import build_worker, count_tokenizer_calls, run, spec_dict
from flashu_batch.jobs.spec import parse_spec
from flashu_batch.workers import T2IWorker
from flashu_batch.workers.common import row_seed


def make_worker(checkpoint, params=None, resources=None, specialist=None):
    task = dict(kind="t2i", input=dict(uris="in.jsonl", format="jsonl"), output="out",
                params=params or dict(steps=2, guidance_scale=3.0))
    if resources:
        task["resources"] = resources
    raw = spec_dict("job-w", checkpoint, [task])
    if specialist:
        raw["model"]["specialization"] = dict(t2i=specialist)
    return build_worker(T2IWorker, parse_spec(raw), "t2i")


def batch(ids, prompts, seeds=None, errors=None) -> dict:
    n = len(ids)
    return {"id": np.array(ids, dtype=object), "prompt": np.array(prompts, dtype=object),
            "seed": np.array(seeds if seeds is not None else [np.nan] * n, dtype=float),
            "error": np.array(errors or [None] * n, dtype=object)}


@pytest.fixture(scope="module")
def worker(checkpoint):
    return make_worker(checkpoint)


def test_rows_in_rows_out_with_pngs_seeds_and_settings(worker):
    out = run(worker, batch(["a", "b"], ["a red circle", "a blue square"], seeds=[7, np.nan]))
    assert list(out["id"]) == ["a", "b"] and all(len(v) == 2 for v in out.values())
    assert list(out["seed"]) == [7, row_seed("job-w", "b")]
    for i in range(2):
        assert out["error"][i] is None
        image = Image.open(io.BytesIO(out["image_bytes"][i]))
        assert image.format == "PNG" and image.size == (out["width"][i], out["height"][i]) == (64, 64)
        assert out["image_path"][i] == f"{out['id'][i]}.png" and out["latency_s"][i] > 0
    settings = json.loads(out["model"][0])
    assert settings["steps"] == 2 and settings["guidance_scale"] == 3.0 and settings["specialist"] is None


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)), dtype=np.int16)


def test_reruns_reproduce_the_same_image_per_row(worker):
    first = run(worker, batch(["x", "y"], ["a fox", "a cat"]))
    assert run(worker, batch(["x", "y"], ["a fox", "a cat"]))["image_bytes"] == first["image_bytes"]
    alone = run(worker, batch(["y"], ["a cat"]))  # another batch: same seed, so the same image up to float rounding
    assert np.abs(pixels(alone["image_bytes"][0]) - pixels(first["image_bytes"][1])).max() <= 2
    assert first["image_bytes"][0] != first["image_bytes"][1]


def test_error_rows_pass_through_and_a_bad_row_fails_alone(checkpoint):
    worker = make_worker(checkpoint, params=dict(steps=2, truncate=False))
    out = run(worker, batch(["ok", "upstream", "long", "bad"], ["a red circle", "whatever", "red " * 400, 5],
                       errors=[None, "prompt is empty", None, None]))
    assert out["error"][0] is None and out["image_bytes"][0] is not None
    assert out["error"][1] == "prompt is empty" and out["image_bytes"][1] is None and out["latency_s"][1] is None
    assert out["error"][2].startswith("prompt has 800 tokens, over the limit of 256") and "truncate" in out["error"][2]
    # a value only the model call refuses fails the batch; the rows are then run one by one and it fails alone
    assert out["error"][3] == "ValueError: prompt 0 must be a non-empty string, got 5."
    assert out["image_bytes"][2] is None and out["image_bytes"][3] is None


def test_pandas_and_arrow_batches(worker):
    rows = batch(["p"], ["a red circle"], seeds=[3])
    expected = run(worker, rows)["image_bytes"][0]
    frame = pd.DataFrame({k: list(v) for k, v in rows.items()})
    assert run(worker, frame)["image_bytes"][0] == expected
    table = pa.table({"id": ["p"], "prompt": ["a red circle"], "seed": pa.array([3], pa.int64()),
                      "error": pa.array([None], pa.string())})
    assert run(worker, table)["image_bytes"][0] == expected


def test_missing_columns_are_named(worker):
    with pytest.raises(ValueError, match=r"Required input columns \['prompt', 'seed'\] not found at the input of "
                                         r"T2IWorker. Input columns: \['id', 'error'\]"):
        run(worker, {"id": np.array(["a"], dtype=object), "error": np.array([None], dtype=object)})


def test_a_batch_past_its_timeout_comes_back_as_error_rows(checkpoint):
    worker = make_worker(checkpoint, params=dict(steps=20),
                         resources=dict(gpus_per_worker=0, cpus_per_worker=0.5, batch_timeout_s=0.05))
    out = run(worker, batch(["a", "b"], ["a red circle", "a fox"]))
    assert all("batch_timeout_s=0.05" in e for e in out["error"]) and list(out["id"]) == ["a", "b"]
    worker.runner.timeout_s = 600  # the next batch waits for the abandoned call, then runs normally
    out = run(worker, batch(["c"], ["a cat"]))
    assert out["error"][0] is None and out["image_bytes"][0]


def test_other_columns_pass_through_unchanged(worker):
    meta = pa.array([{"url": "http://x/1", "license": "cc-by"}], pa.struct([("url", pa.string()),
                                                                             ("license", pa.string())]))
    table = pa.table({"id": ["p"], "prompt": ["a red circle"], "seed": pa.array([3], pa.int64()),
                      "error": pa.array([None], pa.string()), "meta": meta, "rank": pa.array([7], pa.int8())})
    out = worker(table)
    assert out.column_names[-2:] == ["meta", "rank"]
    assert out.schema.field("meta").type == meta.type and out.schema.field("rank").type == pa.int8()
    assert out.column("meta").to_pylist() == [{"url": "http://x/1", "license": "cc-by"}]
    assert out.column("image_bytes")[0].as_py() == run(worker, table.select(["id", "prompt", "seed", "error"]))[
        "image_bytes"][0]  # the extra columns change nothing about the image


def test_each_prompt_is_tokenized_once(checkpoint, monkeypatch):
    """The worker checks each prompt's length and then generates with it: one tokenizer call per distinct text
    (num_images_per_prompt copies included), and the same images as with a fresh tokenization."""
    worker = make_worker(checkpoint, params=dict(steps=2, guidance_scale=3.0, num_images_per_prompt=2))
    expected = run(worker, batch(["a", "b"], ["a red circle", "a blue square"], seeds=[1, 2]))["image_bytes"]
    worker.pipe.tokenized_memo.clear()
    texts = count_tokenizer_calls(monkeypatch, worker.pipe)
    out = run(worker, batch(["a", "b"], ["a red circle", "a blue square"], seeds=[1, 2]))
    assert out["image_bytes"] == expected
    assert sorted(texts) == ["a blue square", "a red circle"]
