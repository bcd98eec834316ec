"""What both workers share: loading the (specialized) pipeline, reading a batch's columns, per-row seeds, and
running a model call under a deadline, in smaller parts when the GPU runs out of memory."""

import gc
import hashlib
import json
import math
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from functools import partial
from typing import Literal

import numpy as np

from flashu_batch.jobs.spec import ModelSpec
from flashu_batch.jobs.storage import Storage

SEED_BITS = 63  # seeds are non-negative int64 (Parquet's int64, torch.Generator.manual_seed)


class BatchTimeout(Exception):
    """Raised inside a model call (T2I, at the next step) once its batch is past batch_timeout_s."""


def row_seed(job_id: str, row_id: str, given=None) -> int:
    """The row's own seed when given, else a hash of (job id, row id): a re-run reproduces the same image."""
    if given is not None:
        return int(given)
    digest = hashlib.sha256(f"{job_id}\0{row_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> (64 - SEED_BITS)


def _null(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def read_columns(batch, required: dict[str, str], worker: str, optional: dict[str, str] | None = None
                 ) -> dict[str, list]:
    """A batch (dict of numpy arrays, pandas DataFrame or pyarrow Table) -> {column: python list}, nulls as None.
    Raises ValueError naming the missing columns (stage inputs are declared, as Ray's LLM stages do). An `optional`
    column the batch lacks reads as all None."""
    if hasattr(batch, "column_names"):  # pyarrow.Table: exact ints (numpy would turn nullable ints into floats)
        names = list(batch.column_names)
        get = lambda k: batch.column(k).to_pylist()  # noqa: E731
    elif hasattr(batch, "to_dict") and hasattr(batch, "columns"):  # pandas.DataFrame
        names = list(batch.columns)
        get = lambda k: batch[k].tolist()  # noqa: E731
    else:
        names = list(batch)
        get = lambda k: list(batch[k])  # noqa: E731
    missing = [k for k in required if k not in names]
    if missing:
        wanted = "; ".join(f"{k}: {why}" for k, why in required.items())
        raise ValueError(f"Required input columns {missing} not found at the input of {worker}. Input columns: "
                         f"{names}. {worker} reads {wanted}.")
    columns = {}
    for k in [*required, *(k for k in optional or {} if k in names)]:
        values = [None if _null(v) else (v.item() if isinstance(v, np.generic) else v) for v in get(k)]
        columns[k] = values
    lengths = {len(v) for v in columns.values()}
    assert len(lengths) == 1, f"columns of one batch differ in length: { {k: len(v) for k, v in columns.items()} }"
    n = lengths.pop()
    for k in optional or {}:
        columns.setdefault(k, [None] * n)
    return columns


def passthrough_columns(batch, used) -> dict:
    """The batch's columns that a worker neither reads nor writes (a user's url, license, source, ...), as Arrow
    columns of their own types: they travel to the output unchanged, so results join back to their source."""
    if hasattr(batch, "column_names"):  # pyarrow.Table
        return {k: batch.column(k) for k in batch.column_names if k not in used}
    names = list(batch.columns) if hasattr(batch, "columns") else list(batch)
    return {k: _arrow_array([None if _null(v) else v for v in list(batch[k])]) for k in names if k not in used}


def _arrow_array(values: list):
    """A column of Python values as Arrow; values of mixed types (only a direct caller's batch holds those) as text."""
    import pyarrow as pa

    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.array([None if v is None else str(v) for v in values], pa.string())


def to_table(columns: dict[str, list], n: int, worker: str, passthrough: dict):
    """{column: list} + the passed-through columns -> pyarrow.Table, after checking one row out for each row in."""
    import pyarrow as pa

    for k, values in columns.items():
        assert len(values) == n, f"{worker} produced {len(values)} values of {k!r} for {n} input rows"
    arrays = {k: _arrow_array(values) for k, values in columns.items()}
    return pa.table({**arrays, **passthrough})


def describe_error(e: BaseException) -> str:
    message = str(e).strip() or repr(e)
    return f"{type(e).__name__}: {message}"[:2000]


def resolve_device(model: ModelSpec, gpus: float) -> str:
    import torch

    if model.device == "cuda" or (model.device == "auto" and gpus > 0):
        if not torch.cuda.is_available():
            raise RuntimeError(f"model.device is {model.device!r} with gpus_per_worker={gpus}, but this worker sees "
                               f"no CUDA device. Set gpus_per_worker: 0 and model.device: cpu to run on CPU.")
        return "cuda"
    return "cpu"


def local_path(uri: str, storage: Storage) -> str:
    """A local folder for a folder path or an s3:// prefix (downloaded once per node into $FLASHU_CACHE). Anything else
    comes back as it is: a checkpoint's Hub id is resolved by showo2/hub.py (load_pipeline)."""
    if not uri.startswith("s3://"):
        return uri
    from flashu_batch.jobs.fetch import fetch_prefix

    return fetch_prefix(uri, s3_client=storage.s3_client())


SPECIALIZE_ON_START = "on_start"  # model.specialization.<task>: calibrate in the worker instead of an artifact
# What load_pipeline resolved for each model spec (showo2/hub.py ModelSources), so that settings_json records the Hub
# commits this process loaded: a branch such as main may have moved on by the time anyone asks again. A worker loads
# one model, so this holds one entry per actor process.
_LOADED_SOURCES: dict = {}


def load_pipeline(model: ModelSpec, kind: str, storage: Storage, gpus: float):
    """(Showo2Pipeline, specialist or None) for a task kind ("t2i" | "vqa"): the base model, or the FlashU
    specialist's reordered model when the spec names an artifact (loaded once, never both). The checkpoint, VAE and
    tokenizer may be local, on S3 (the checkpoint) or on the Hub, with the official VAE and tokenizer as defaults
    (showo2/hub.py resolve_sources)."""
    import torch

    from flashu_batch.showo2.checkpoint import CheckpointError
    from flashu_batch.showo2.hub import HubError, resolve_sources
    from flashu_batch.showo2.pipeline import Showo2Pipeline
    from flashu_batch.showo2.tokenizer import SpecialTokens, load_tokenizer
    from flashu_batch.showo2.vae import load_vae

    device, dtype = resolve_device(model, gpus), getattr(torch, model.dtype)
    try:  # an s3:// checkpoint is a local folder once fetched; a Hub id resolves through the Hub cache
        sources = resolve_sources(local_path(model.checkpoint, storage), model.vae_path, model.tokenizer_path)
    except HubError as e:
        raise CheckpointError(str(e)) from None
    _LOADED_SOURCES[model] = sources
    folder, vae_file = sources.checkpoint.path, sources.vae.path
    tokenizer_folder = sources.tokenizer.path if sources.tokenizer else None
    artifact = getattr(model.specialization, kind)
    if artifact is None or artifact == SPECIALIZE_ON_START:
        pipe = Showo2Pipeline.from_pretrained(folder, dtype=dtype, device=device, vae_path=vae_file,
                                              tokenizer_path=tokenizer_folder)
        if artifact is None:
            return pipe, None
        from flashu_batch.flashu.calibrate import specialize_t2i, specialize_vqa

        # deterministic: every actor gets the same specialist
        if kind == "t2i":
            specialist, _ = specialize_t2i(pipe.model, pipe.tokenizer, pipe.tokens)
        else:
            specialist, _ = specialize_vqa(pipe)
        return pipe, specialist
    from flashu_batch.flashu.artifact import load_generation_specialist, load_understanding_specialist

    load = load_generation_specialist if kind == "t2i" else load_understanding_specialist
    specialist = load(folder, local_path(artifact, storage), dtype=dtype, device=device)
    if not os.path.isfile(vae_file):
        raise CheckpointError(f"No VAE at {vae_file!r}: set model.vae_path to the Wan2.1_VAE.pth file.")
    if tokenizer_folder is None:
        raise CheckpointError(f"No tokenizer in {folder!r}, and no default one for this model size: set "
                              f"model.tokenizer_path to a Qwen2.5 tokenizer folder or Hub id.")
    tokenizer = load_tokenizer(tokenizer_folder)
    pipe = Showo2Pipeline(specialist.model, load_vae(vae_file, dtype=dtype, device=device), tokenizer,
                          SpecialTokens.from_tokenizer(tokenizer))
    return pipe, specialist


def worker_compiler(model: ModelSpec, device):
    """The showo2.compile.Compiler for model.compile on `device`, or None (eager): 'auto' compiles on CUDA only."""
    from flashu_batch.showo2.compile import compiler_for

    return compiler_for(model.compile, device)


def warm_up(calls) -> float:
    """Seconds to run `calls` (no-argument functions) once each: at load, so that compiling the model's steps is
    paid there and not by the first batches."""
    start = time.perf_counter()
    for call in calls:
        call()
    return time.perf_counter() - start


def settings_json(model: ModelSpec, device: str, specialist, **task_settings) -> str:
    """The model and acceleration settings a result row was made with (JSON, stored with every row): with the VAE and
    tokenizer sources and the Hub commit of each source (checkpoint_revision, vae_revision, tokenizer_revision; null
    for a local or S3 source)."""
    sources = _LOADED_SOURCES.get(model)
    assert sources is not None, f"settings_json records what load_pipeline loaded; load {model.checkpoint!r} first"
    kind = "t2i" if "guidance_scale" in task_settings else "vqa"
    return json.dumps(dict(checkpoint=model.checkpoint, dtype=model.dtype, device=device,
                           specialist=getattr(model.specialization, kind),
                           flashu=specialist.config.to_dict() if specialist is not None else None,
                           **sources.settings(), **task_settings), sort_keys=True)


class DeadlineRunner:
    """Runs model calls on one background thread so a batch can be given up after `timeout_s`.

    Torch work cannot be killed from outside; T2I stops at its next model call (it checks `cancelled`), VQA decoding
    ends by itself within max_new_tokens. The next batch first waits for an abandoned call, so calls never overlap.
    """

    def __init__(self, timeout_s: float | None):
        self.timeout_s = timeout_s
        self.cancelled = threading.Event()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="model-call") if timeout_s else None
        self._abandoned = None

    def check(self) -> None:
        if self.cancelled.is_set():
            raise BatchTimeout()

    def run(self, fn, *args, **kwargs):
        if self._pool is None:
            return fn(*args, **kwargs)
        if self._abandoned is not None:
            try:
                self._abandoned.result()  # let the previous, timed-out call end before this one starts
            except Exception:  # noqa: BLE001 -- its rows already came back as errors
                pass
            self._abandoned = None
        self.cancelled.clear()
        future = self._pool.submit(fn, *args, **kwargs)
        try:
            return future.result(timeout=self.timeout_s)
        except FutureTimeout:
            self.cancelled.set()
            self._abandoned = future
            raise BatchTimeout(f"the batch took longer than batch_timeout_s={self.timeout_s}s") from None


# A CUDA error after which the process's CUDA context is unusable: every later kernel launch fails too, so no retry in
# this process can succeed. Matched in the message: torch raises most of them as a plain RuntimeError.
FATAL_CUDA_MARKERS = ("CUDA error: an illegal memory access", "device-side assert triggered", "CUBLAS_STATUS_",
                      "CUDNN_STATUS_", "unspecified launch failure", "CUDA error: misaligned address",
                      "CUDA error: an illegal instruction", "CUDA error: uncorrectable ECC error")
OOM_MARKERS = ("CUDA out of memory",  # the caching allocator's message (a RuntimeError in old torch or when re-raised)
               "CUDA error: out of memory",  # a raw cudaMalloc outside the allocator
               "CUBLAS_STATUS_ALLOC_FAILED")  # cuBLAS could not allocate its workspace: memory, not a broken context
FATAL_CUDA_EXIT_CODE = 86  # the worker's exit code after a fatal CUDA error (tests/scheduler's hard exits use 75)


def classify_error(e: BaseException) -> Literal["oom", "fatal_cuda", "other"]:
    """What a failed model call means for the actor: "oom" (the batch did not fit in GPU memory: run fewer rows),
    "fatal_cuda" (the CUDA context is broken: only a new process helps) or "other" (the rows' own problem). Follows
    `raise ... from` causes, so a wrapped CUDA error is still found."""
    import torch

    while e is not None:
        message = str(e)
        if isinstance(e, torch.OutOfMemoryError) or any(m in message for m in OOM_MARKERS):
            return "oom"
        if isinstance(e, getattr(torch, "AcceleratorError", ())) or any(m in message for m in FATAL_CUDA_MARKERS):
            return "fatal_cuda"  # AcceleratorError (newer torch): any CUDA runtime error but OOM
        e = e.__cause__
    return "other"


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [repr(e)])[0]


def exit_for_restart(error: BaseException) -> None:
    """End this process now, after a fatal CUDA error: Ray restarts the actor (a new process, a new CUDA context) and
    retries its batch there (max_restarts, max_task_retries: scheduler/pipeline.py). os._exit, as a crash would: a
    SystemExit is how Ray actors end on purpose (ray.actor.exit_actor), and cleanup would only touch the broken
    context."""
    print(f"flashu-batch worker (pid {os.getpid()}): fatal CUDA error, the CUDA context is unusable; exiting with code "
          f"{FATAL_CUDA_EXIT_CODE} so Ray restarts this actor and retries its batch: {type(error).__name__}: "
          f"{_first_line(error)}", file=sys.stderr, flush=True)
    os._exit(FATAL_CUDA_EXIT_CODE)


def free_gpu_memory() -> None:
    """Hand the failed call's memory back before a retry. gc first: the OOM's traceback, which holds the failed call's
    frames and so its tensors, sits in a reference cycle (DeadlineRunner.run's frame holds the future that holds it)."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass
class BatchSizer:
    """The most rows one model call of this actor may take, learnt from CUDA out-of-memory errors. One per actor,
    passed to every run_rows call: after an OOM, later batches are cut to this size up front instead of paying the
    OOM again."""

    max_rows: int | None = None  # None: no OOM yet, batches run whole


def run_rows(rows: list[int], run, record, fail, sizer: BatchSizer | None = None, exit_process=exit_for_restart, *,
             batch_size: int | None = None) -> None:
    """Run `rows` as one model call: `record(rows, run(rows), latency)`. A failed call (classify_error) becomes:
    - a timeout (BatchTimeout): the rows' error, `fail(rows, error, latency)`;
    - CUDA out of memory: the rows run again in halves, down to one row (which, if it still does not fit, becomes an
      error row saying so); `sizer` keeps the size that fit, so later calls are cut to it up front;
    - a fatal CUDA error: `exit_process(error)` (exit_for_restart: the batch is retried in a fresh process);
    - anything else: the rows run again one by one, so a single bad row fails alone.
    Every row is recorded or failed exactly once, and a bad row never crashes the actor. batch_size: the size of the
    batch that `rows` are part of (for the error message); the recursive calls pass it on."""
    sizer = sizer if sizer is not None else BatchSizer()
    batch_size = batch_size or len(rows)
    again = partial(run_rows, run=run, record=record, fail=fail, sizer=sizer, exit_process=exit_process,
                    batch_size=batch_size)
    if sizer.max_rows is not None and len(rows) > sizer.max_rows:  # an earlier call ran out of memory at this size
        for k in range(0, len(rows), sizer.max_rows):
            again(rows[k:k + sizer.max_rows])
        return
    start = time.perf_counter()
    try:
        results = run(rows)
    except BatchTimeout as e:
        return fail(rows, e, time.perf_counter() - start)
    except Exception as e:  # noqa: BLE001
        kind = classify_error(e)
        # an OOM is replaced by a new exception: `e` (its traceback holds the failed call's frames, so its
        # tensors) is dropped at the end of this block, before the retries need that memory
        error = single_row_oom(e, batch_size) if kind == "oom" else e
    else:
        return record(rows, results, time.perf_counter() - start)
    latency = time.perf_counter() - start
    if kind == "fatal_cuda":
        return exit_process(error)
    if kind == "oom":
        free_gpu_memory()
    if len(rows) == 1:
        return fail(rows, error, latency)
    if kind == "oom":
        half = (len(rows) + 1) // 2
        sizer.max_rows = min(half, sizer.max_rows or half)
        parts = [rows[:half], rows[half:]]
    else:
        parts = [[i] for i in rows]
    for part in parts:
        again(part)


def single_row_oom(e: BaseException, batch_size: int) -> Exception:
    """The error row for one row that does not fit in GPU memory even alone."""
    import torch

    return torch.OutOfMemoryError(
        f"out of GPU memory even for a single row (batch_size {batch_size} was split down to 1); use a GPU with more "
        f"memory, or give each worker a whole GPU (resources.gpus_per_worker: 1): {_first_line(e)}")
