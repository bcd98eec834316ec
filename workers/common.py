"""What both workers share: loading the (specialized) pipeline, reading a batch's columns, per-row seeds, and
running a model call under a deadline."""

import hashlib
import json
import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

import numpy as np

from flashu_batch.jobs.spec import ModelSpec
from flashu_batch.jobs.storage import Storage

SEED_BITS = 63  # seeds are non-negative int64 (Parquet's int64, torch.Generator.manual_seed)
EXIT_ON_ROW_ENV = "FLASHU_TEST_EXIT_ON_ROW"  # test hook: a row id (see exit_on_row_hook)
EXIT_MARKER_ENV = "FLASHU_TEST_EXIT_MARKER"  # test hook: a file path that makes the exit happen once


class BatchTimeout(Exception):
    """Raised inside a model call (T2I, at the next step) once its batch is past batch_timeout_s."""


def row_seed(job_id: str, row_id: str, given=None) -> int:
    """The row's own seed when given, else a hash of (job id, row id): a re-run reproduces the same image."""
    if given is not None:
        return int(given)
    digest = hashlib.sha256(f"{job_id}\0{row_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> (64 - SEED_BITS)


def exit_on_row_hook(ids: list) -> None:
    """Fault injection for tests, inert unless FLASHU_TEST_EXIT_ON_ROW is set: hard-exit this worker process (as an
    OOM kill or a segfault would, with no exception and no cleanup) when a batch holds that row id. With
    FLASHU_TEST_EXIT_MARKER set it fires once (it creates the marker file first, so the restarted actor goes on);
    without it, every time (a poison row)."""
    row = os.environ.get(EXIT_ON_ROW_ENV)
    if not row or row not in ids:
        return
    marker = os.environ.get(EXIT_MARKER_ENV)
    if marker:
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
    os._exit(75)


def _null(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def read_columns(batch, required: dict[str, str], worker: str) -> dict[str, list]:
    """A batch (dict of numpy arrays, pandas DataFrame or pyarrow Table) -> {column: python list}, nulls as None.
    Raises ValueError naming the missing columns (stage inputs are declared, as Ray's LLM stages do)."""
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
    for k in required:
        values = [None if _null(v) else (v.item() if isinstance(v, np.generic) else v) for v in get(k)]
        columns[k] = values
    lengths = {len(v) for v in columns.values()}
    assert len(lengths) == 1, f"columns of one batch differ in length: { {k: len(v) for k, v in columns.items()} }"
    return columns


def to_batch(columns: dict[str, list], n: int, worker: str) -> dict[str, np.ndarray]:
    """{column: list} -> dict of numpy object arrays, after checking one row out for each row in."""
    for k, values in columns.items():
        assert len(values) == n, f"{worker} produced {len(values)} values of {k!r} for {n} input rows"
    return {k: np.array(values, dtype=object) for k, values in columns.items()}


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
    """A local folder for a folder path or an s3:// prefix (downloaded once per node into $FLASHU_CACHE)."""
    if not uri.startswith("s3://"):
        return uri
    from flashu_batch.jobs.fetch import fetch_prefix

    return fetch_prefix(uri, s3_client=storage.s3_client())


SPECIALIZE_ON_START = "on_start"  # model.specialization.<task>: calibrate in the worker instead of an artifact


def load_pipeline(model: ModelSpec, kind: str, storage: Storage, gpus: float):
    """(Showo2Pipeline, specialist or None) for a task kind ("t2i" | "vqa"): the base model, or the FlashU
    specialist's reordered model when the spec names an artifact (loaded once, never both)."""
    import os

    import torch

    from flashu_batch.showo2.checkpoint import CheckpointError
    from flashu_batch.showo2.loading import VAE_FILE
    from flashu_batch.showo2.pipeline import Showo2Pipeline
    from flashu_batch.showo2.tokenizer import SpecialTokens, load_tokenizer
    from flashu_batch.showo2.vae import load_vae

    device, dtype = resolve_device(model, gpus), getattr(torch, model.dtype)
    folder = local_path(model.checkpoint, storage)
    artifact = getattr(model.specialization, kind)
    if artifact is None or artifact == SPECIALIZE_ON_START:
        pipe = Showo2Pipeline.from_pretrained(folder, dtype=dtype, device=device, vae_path=model.vae_path,
                                              tokenizer_path=model.tokenizer_path)
        if artifact is None:
            return pipe, None
        from flashu_batch.flashu.calibrate import specialize_t2i, specialize_vqa

        # deterministic: every actor gets the same specialist
        specialist, _ = specialize_t2i(pipe.model, pipe.tokenizer, pipe.tokens) if kind == "t2i" else specialize_vqa(pipe)
        return pipe, specialist
    from flashu_batch.flashu.artifact import load_generation_specialist, load_understanding_specialist

    load = load_generation_specialist if kind == "t2i" else load_understanding_specialist
    specialist = load(folder, local_path(artifact, storage), dtype=dtype, device=device)
    vae_file = model.vae_path or os.path.join(folder, VAE_FILE)
    if not os.path.isfile(vae_file):
        raise CheckpointError(f"No VAE at {vae_file!r}: set model.vae_path to the {VAE_FILE} file.")
    tokenizer = load_tokenizer(model.tokenizer_path or next(  # where from_pretrained looks
        (p for p in (folder, os.path.join(folder, "tokenizer")) if os.path.isfile(os.path.join(p, "tokenizer.json"))
         or os.path.isfile(os.path.join(p, "tokenizer_config.json"))), folder))
    pipe = Showo2Pipeline(specialist.model, load_vae(vae_file, dtype=dtype, device=device), tokenizer,
                          SpecialTokens.from_tokenizer(tokenizer))
    return pipe, specialist


def settings_json(model: ModelSpec, device: str, specialist, **task_settings) -> str:
    """The model and acceleration settings a result row was made with (JSON, stored with every row)."""
    kind = "t2i" if "guidance_scale" in task_settings else "vqa"
    return json.dumps(dict(checkpoint=model.checkpoint, dtype=model.dtype, device=device,
                           specialist=getattr(model.specialization, kind),
                           flashu=specialist.config.to_dict() if specialist is not None else None,
                           **task_settings), sort_keys=True)


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


def run_rows(rows: list[int], run, record, fail) -> None:
    """Run `rows` as one batch: `record(rows, run(rows), latency)`. If the batch fails (not by timeout), run the
    rows one by one so a single bad row does not take the others down; a row that still fails, or a timed-out
    batch, goes to `fail(rows, error, latency)`: it becomes the rows' error, never a crashed actor."""
    start = time.perf_counter()
    try:
        results = run(rows)
    except BatchTimeout as e:
        return fail(rows, e, time.perf_counter() - start)
    except Exception as e:  # noqa: BLE001
        if len(rows) == 1:
            return fail(rows, e, time.perf_counter() - start)
        for i in rows:
            run_rows([i], run, record, fail)
        return
    record(rows, results, time.perf_counter() - start)
