"""GPU errors in workers/common.py run_rows: a CUDA OOM splits the batch inside the actor (and the actor remembers the
size that fit); a fatal CUDA error ends the process so Ray retries the batch on a fresh one. CPU only: the errors are
raised by fakes, as torch raises them."""

import io
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from batch_testkit import build_worker, png_bytes, run, spec_dict
from flashu_batch.jobs.spec import parse_spec
from flashu_batch.workers import T2IWorker, VQAWorker
from flashu_batch.workers.common import (FATAL_CUDA_EXIT_CODE, BatchSizer, BatchTimeout, classify_error,
                                         describe_error, run_rows)

OOM = "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.10 GiB"
ILLEGAL_ACCESS = ("CUDA error: an illegal memory access was encountered\nCUDA kernel errors might be asynchronously "
                  "reported at some other API call, so the stacktrace below might be incorrect.")


class Calls:
    """A fake model call and the callbacks run_rows takes, keeping what they were given."""

    def __init__(self, error_for=lambda rows: None):
        self.error_for = error_for  # rows -> an exception to raise, or None to succeed
        self.sizes, self.recorded, self.failed, self.exits = [], [], [], []

    def run(self, rows):
        self.sizes.append(len(rows))
        error = self.error_for(rows)
        if error is not None:
            raise error
        return [f"result {i}" for i in rows]

    def record(self, rows, results, latency):
        assert results == [f"result {i}" for i in rows] and latency >= 0
        self.recorded += rows

    def fail(self, rows, error, latency):
        self.failed += [(i, describe_error(error)) for i in rows]

    def __call__(self, rows, sizer=None):
        run_rows(rows, self.run, self.record, self.fail, sizer, self.exits.append)


def oom_above(k: int, error=torch.OutOfMemoryError):
    return lambda rows: error(OOM) if len(rows) > k else None


def test_an_oom_batch_is_split_in_halves_and_every_row_is_recorded_once():
    calls, sizer = Calls(oom_above(3)), BatchSizer()
    calls(list(range(8)), sizer)
    assert calls.sizes == [8, 4, 2, 2, 2, 2]  # 8 and 4 ran out of memory; the second 4 was cut to 2 up front
    assert calls.recorded == list(range(8)) and calls.failed == [] and calls.exits == []
    assert sizer.max_rows == 2


def test_later_batches_start_in_chunks_of_the_remembered_size():
    calls, sizer = Calls(oom_above(3)), BatchSizer()
    calls(list(range(8)), sizer)
    calls.sizes, calls.recorded = [], []
    calls(list(range(10, 15)), sizer)
    assert calls.sizes == [2, 2, 1] and calls.recorded == list(range(10, 15))  # no OOM paid again


@pytest.mark.parametrize("error", [torch.OutOfMemoryError, RuntimeError])  # RuntimeError: how older torch raised it
def test_a_single_row_that_still_does_not_fit_becomes_an_error_row(error):
    calls = Calls(lambda rows: error(OOM) if 2 in rows else None)
    calls([0, 1, 2, 3])
    assert calls.sizes == [4, 2, 2, 1, 1] and calls.recorded == [0, 1, 3] and calls.exits == []
    assert calls.failed == [(2, "OutOfMemoryError: out of GPU memory even for a single row (batch_size 4 was split "
                                "down to 1); use a GPU with more memory, or give each worker a whole GPU "
                                f"(resources.gpus_per_worker: 1): {OOM}")]


def test_a_fatal_cuda_error_exits_the_process_and_makes_no_error_rows():
    error = RuntimeError(ILLEGAL_ACCESS)
    calls = Calls(lambda rows: error if 1 in rows else None)
    calls([0, 1, 2])
    assert calls.exits == [error] and calls.sizes == [3]  # no retry in this process: its CUDA context is broken
    assert calls.failed == [] and calls.recorded == []


def test_ordinary_errors_still_fail_one_row_and_timeouts_the_batch():
    calls, sizer = Calls(lambda rows: ValueError("prompt 1 is bad") if 1 in rows else None), BatchSizer()
    calls([0, 1, 2], sizer)
    assert calls.sizes == [3, 1, 1, 1] and calls.recorded == [0, 2]
    assert calls.failed == [(1, "ValueError: prompt 1 is bad")] and sizer.max_rows is None  # no OOM, no limit
    calls = Calls(lambda rows: BatchTimeout("the batch took longer than batch_timeout_s=1s"))
    calls([0, 1])
    assert calls.sizes == [2] and [i for i, _ in calls.failed] == [0, 1]


@pytest.mark.parametrize("error, kind", [
    (torch.OutOfMemoryError(OOM), "oom"),
    (RuntimeError(OOM), "oom"),
    (torch.AcceleratorError("CUDA error: out of memory"), "oom"),
    (RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"), "oom"),
    (torch.AcceleratorError(ILLEGAL_ACCESS), "fatal_cuda"),
    (RuntimeError(ILLEGAL_ACCESS), "fatal_cuda"),
    (RuntimeError("CUDA error: device-side assert triggered"), "fatal_cuda"),
    (RuntimeError("CUDA error: CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasGemmEx( ...`"), "fatal_cuda"),
    (RuntimeError("CUDA error: unspecified launch failure"), "fatal_cuda"),
    (RuntimeError("CUDA error: misaligned address"), "fatal_cuda"),
    (ValueError("prompt 0 must be a non-empty string, got 5."), "other"),
    (RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)"), "other"),
])
def test_classify_error(error, kind):
    assert classify_error(error) == kind


def test_classify_error_finds_a_wrapped_cuda_error():
    try:
        try:
            raise RuntimeError(ILLEGAL_ACCESS)
        except RuntimeError as e:
            raise ValueError("decoding failed") from e
    except ValueError as wrapped:
        assert classify_error(wrapped) == "fatal_cuda"


def test_the_default_exit_ends_the_process_with_its_code_and_one_line():
    code = ("from flashu_batch.workers.common import exit_for_restart\n"
            f"exit_for_restart(RuntimeError({ILLEGAL_ACCESS!r}))\n"
            "print('still running')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == FATAL_CUDA_EXIT_CODE and done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("flashu-batch worker (pid ")
    assert done.stderr.rstrip().endswith("exiting with code 86 so Ray restarts this actor and retries its batch: "
                                         "RuntimeError: CUDA error: an illegal memory access was encountered")


# The real workers, with a model call that fails as a GPU would.

def t2i_worker(cls, checkpoint):
    task = dict(kind="t2i", input=dict(uris="in.jsonl", format="jsonl"), output="out",
                params=dict(steps=2, guidance_scale=3.0))
    return build_worker(cls, parse_spec(spec_dict("job-w", checkpoint, [task])), "t2i")


def prompts(ids, texts) -> dict:
    n = len(ids)
    return {"id": np.array(ids, dtype=object), "prompt": np.array(texts, dtype=object),
            "seed": np.array([np.nan] * n, dtype=float), "error": np.array([None] * n, dtype=object)}


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)), dtype=np.int16)


class OneRowT2IWorker(T2IWorker):
    """A T2IWorker on a GPU that fits one prompt per call."""

    sizes: list

    def text_to_image(self, prompts, seeds):
        self.sizes.append(len(prompts))
        if len(prompts) > 1:
            raise torch.OutOfMemoryError(OOM)
        return super().text_to_image(prompts, seeds)


def test_a_t2i_batch_that_runs_out_of_memory_gives_the_images_of_rows_run_alone(checkpoint):
    worker, normal = t2i_worker(OneRowT2IWorker, checkpoint), t2i_worker(T2IWorker, checkpoint)
    worker.sizes = []
    ids, texts = ["a", "b", "c"], ["a red circle", "a blue square", "a fox"]
    out = run(worker, prompts(ids, texts))
    assert worker.sizes == [3, 2, 1, 1, 1] and worker.sizer.max_rows == 1
    assert out["error"] == [None] * 3 and list(out["id"]) == ids
    for i in range(3):
        alone = run(normal, prompts(ids[i:i + 1], texts[i:i + 1]))
        assert np.abs(pixels(out["image_bytes"][i]) - pixels(alone["image_bytes"][0])).max() <= 2
    worker.sizes = []
    assert run(worker, prompts(["d", "e"], ["a cat", "a dog"]))["error"] == [None, None]
    assert worker.sizes == [1, 1]  # the remembered size: no OOM paid again


class BrokenT2IWorker(T2IWorker):
    """A T2IWorker whose CUDA context broke; its exit is recorded instead of ending pytest."""

    exits: list

    def text_to_image(self, prompts, seeds):
        raise torch.AcceleratorError(ILLEGAL_ACCESS)

    def exit_process(self, error):
        self.exits.append(error)


def test_a_t2i_worker_exits_on_a_fatal_cuda_error(checkpoint):
    worker = t2i_worker(BrokenT2IWorker, checkpoint)
    worker.exits = []
    out = run(worker, prompts(["a", "b"], ["a red circle", "a fox"]))
    assert [str(e) for e in worker.exits] == [ILLEGAL_ACCESS]
    assert out["error"] == [None, None]  # the real exit never returns: Ray retries the batch, nothing is written


class OneRowVQAWorker(VQAWorker):
    def answer_batch(self, images, questions):
        if len(images) > 1:
            raise torch.OutOfMemoryError(OOM)
        return super().answer_batch(images, questions)


def test_a_vqa_batch_that_runs_out_of_memory_gives_the_answers_of_rows_run_alone(checkpoint):
    task = dict(kind="vqa", input=dict(uris="in.parquet", format="parquet"), output="out",
                params=dict(max_new_tokens=4))
    spec = parse_spec(spec_dict("job-v", checkpoint, [task]))
    worker, normal = build_worker(OneRowVQAWorker, spec, "vqa"), build_worker(VQAWorker, spec, "vqa")
    rows = {"id": np.array(["a", "b"], dtype=object), "question": np.array(["what color", "what shape"], dtype=object),
            "image_bytes": np.array([png_bytes(), png_bytes((0, 255, 0))], dtype=object),
            "image_path": np.array([None, None], dtype=object), "image_sha256": np.array([None, None], dtype=object),
            "error": np.array([None, None], dtype=object)}
    out = run(worker, rows)
    assert out["error"] == [None, None] and worker.sizer.max_rows == 1
    for i in range(2):
        alone = run(normal, {k: v[i:i + 1] for k, v in rows.items()})
        assert out["answer"][i] == alone["answer"][0] and out["num_tokens"][i] == alone["num_tokens"][0]
