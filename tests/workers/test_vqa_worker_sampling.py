"""workers/vqa.py sampling params: temperature 0 is the greedy default exactly; temperature > 0 samples with a
seed per row (its `seed` column, else a hash of job_id and id), reproducibly and whatever the batch; a one-token
nucleus is greedy."""

import json

import numpy as np
import pytest

from batch_testkit import build_worker, png_bytes, run, spec_dict
from flashu_batch.jobs.spec import SpecError, parse_spec
from flashu_batch.workers import VQAWorker
from flashu_batch.workers.common import row_seed

QUESTIONS = ["what color", "what shape is this", "how many", "where"]
IMAGES = [png_bytes(), png_bytes((0, 0, 255), (64, 64)), png_bytes((0, 255, 0), (30, 50)), png_bytes((9, 9, 9))]


def make_worker(checkpoint, **params):
    task = dict(kind="vqa", input=dict(uris="in.parquet", format="parquet"), output="out",
                params={"max_new_tokens": 6, **params})
    return build_worker(VQAWorker, parse_spec(spec_dict("job-v", checkpoint, [task])), "vqa")


def batch(rows, seeds=None) -> dict:
    """rows: indices into QUESTIONS / IMAGES (the id is the index)."""
    out = {"id": np.array([f"r{i}" for i in rows], dtype=object),
           "question": np.array([QUESTIONS[i] for i in rows], dtype=object),
           "image_bytes": np.array([IMAGES[i] for i in rows], dtype=object),
           "image_path": np.array([None] * len(rows), dtype=object),
           "image_sha256": np.array([None] * len(rows), dtype=object),
           "error": np.array([None] * len(rows), dtype=object)}
    if seeds is not None:
        out["seed"] = np.array(seeds, dtype=object)
    return out


@pytest.fixture(scope="module")
def greedy(checkpoint):
    return make_worker(checkpoint)


@pytest.fixture(scope="module")
def sampling(checkpoint):
    return make_worker(checkpoint, temperature=1.5, top_p=0.95)


def test_temperature_zero_is_the_greedy_default_exactly(checkpoint, greedy):
    explicit = make_worker(checkpoint, temperature=0.0, top_p=0.5)  # top_p is ignored without sampling
    rows = batch([0, 1, 2], seeds=[1, 2, 3])
    out, reference = run(explicit, rows), run(greedy, batch([0, 1, 2]))
    assert out["answer"] == reference["answer"] and out["num_tokens"] == reference["num_tokens"]
    assert out["seed"] == [None] * 3  # greedy answers use no seed
    assert json.loads(out["model"][0]) == json.loads(reference["model"][0])  # no sampling settings recorded


def test_sampling_is_reproducible_per_row_whatever_the_batch(sampling, greedy):
    together = run(sampling, batch([0, 1, 2, 3]))
    assert together["seed"] == [row_seed("job-v", f"r{i}") for i in range(4)]
    assert run(sampling, batch([0, 1, 2, 3]))["answer"] == together["answer"]
    assert together["answer"] != run(greedy, batch([0, 1, 2, 3]))["answer"]  # it does sample
    for rows in ([2], [3, 1], [1, 0, 3]):  # other batch-mates, other orders, other lengths
        apart = run(sampling, batch(rows))
        assert apart["answer"] == [together["answer"][i] for i in rows]
    settings = json.loads(together["model"][0])
    assert settings["temperature"] == 1.5 and settings["top_p"] == 0.95


def test_a_row_seed_pins_the_sample(sampling):
    pinned = run(sampling, batch([0, 0, 0], seeds=[7, 7, 8]))
    assert pinned["seed"] == [7, 7, 8]
    assert pinned["answer"][0] == pinned["answer"][1]  # same image, question and seed: same answer, another id
    seeds = list(range(20, 30))
    varied = run(sampling, batch([0] * len(seeds), seeds=seeds))["answer"]
    assert len(set(varied)) > 1  # other seeds, other samples
    # a null seed falls back to the hash of job_id and id
    mixed = run(sampling, batch([0, 1], seeds=[None, 7]))
    assert mixed["seed"] == [row_seed("job-v", "r0"), 7]


def test_a_one_token_nucleus_is_greedy(checkpoint, greedy):
    nucleus = make_worker(checkpoint, temperature=0.8, top_p=1e-9)
    out = run(nucleus, batch([0, 1, 2, 3]))
    reference = run(greedy, batch([0, 1, 2, 3]))
    assert out["answer"] == reference["answer"] and out["num_tokens"] == reference["num_tokens"]


def test_sampling_params_are_validated(checkpoint):
    for params, message in [(dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"),
                            (dict(top_p=1.5), "top_p"), (dict(temperature=float("nan")), "temperature")]:
        raw = spec_dict("job-v", checkpoint, [dict(kind="vqa", input=dict(uris="in.parquet", format="parquet"),
                                                   output="out", params=params)])
        with pytest.raises(SpecError, match=message):
            parse_spec(raw)
