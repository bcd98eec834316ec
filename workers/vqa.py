"""VQAWorker: image + question rows in, answer rows out (one out for each in; failures come back as error rows)."""

import time
from functools import partial

from flashu_batch.jobs.spec import ModelSpec, StorageSpec, VQAParams
from flashu_batch.jobs.storage import Storage
from flashu_batch.workers.common import (BatchSizer, DeadlineRunner, describe_error, exit_for_restart, load_pipeline,
                                         passthrough_columns, read_columns, row_seed, run_rows, settings_json,
                                         to_table, warm_up, worker_compiler)
from flashu_batch.workers.images import PIXELS_COLUMN, ImageError, decode_image, pixels_array


class VQAWorker:
    """A Ray Data actor for visual question answering. `__init__` loads the model once;
    `__call__(batch) -> pyarrow.Table`.

    Built from the model and the task's params only. Callable without Ray on a dict of numpy arrays, a pandas
    DataFrame or a pyarrow Table (see INPUT_COLUMNS); columns it neither reads nor writes pass through unchanged.
    """

    INPUT_COLUMNS = {
        "id": "row id (str)",
        "question": "the question (str)",
        "image_bytes": "the encoded image (PNG, JPEG, ... bytes)",
        "image_path": "where the image came from (str) or null; passed through",
        "image_sha256": "hash of image_bytes (str) or null; passed through",
        "error": "null, or why the row already failed (the row is then passed through untouched)",
    }
    OPTIONAL_COLUMNS = {
        "seed": "the row's own sampling seed (int >= 0) or null (a hash of job_id and id); read when temperature > 0",
        PIXELS_COLUMN: "the image already decoded and resized to the model's resolution R (R*R*3 bytes, uint8 RGB, "
                       "(R, R, 3); the CPU stage's workers.images.model_pixels) or null; rows without it, or with "
                       "pixels of another size, decode image_bytes here. Read, never passed through",
    }
    OUTPUT_COLUMNS = ("id", "question", "image_path", "image_sha256", "answer", "num_tokens", "seed", "model",
                      "latency_s", "error")
    exit_process = staticmethod(exit_for_restart)  # after a fatal CUDA error (run_rows); tests replace it

    def __init__(self, model: ModelSpec, params: VQAParams, *, storage: StorageSpec | None = None,
                 gpus: float = 0.0, batch_timeout_s: float | None = None, job_id: str = "",
                 batch_size: int | None = None):
        """gpus: the actor's GPU share (model.device 'auto' picks cuda when > 0); job_id: part of every derived
        sampling seed (row_seed; greedy decoding, the default, needs none); batch_size: the rows a batch holds
        (resources.batch_size): compiled decoding (model.compile) is warmed up at load for one row and for that
        many, so full batches and single rows find their graphs ready (None: one row only)."""
        import torch  # noqa: F401 -- heavy imports live in the actor, not in the driver that pickles this class

        from flashu_batch.showo2.pipeline import normalize_pixels
        from flashu_batch.showo2.vqa import greedy_answers

        self.job_id, self.params = job_id, params
        start = time.perf_counter()
        self.pipe, self.specialist = load_pipeline(model, "vqa", Storage(storage), gpus)
        self.load_seconds = time.perf_counter() - start
        self.compiler = worker_compiler(model, self.pipe.device)  # None: eager
        if self.specialist is not None:  # FlashU decodes its own way (flashu/understanding.py): on static shapes,
            #                              the step compiled, when compiling and not skipping layers; else eager
            self.decode_fn = self.specialist.pipeline_kwargs(self.compiler)["decode_fn"]
        elif self.compiler is not None:  # static KV cache, the decode step compiled (CUDA graphs on CUDA)
            self.decode_fn = partial(greedy_answers, static=self.compiler.static_decoder())
        else:
            self.decode_fn = greedy_answers
        self.max_positions = self.pipe.model.config.llm["max_position_embeddings"]
        self.normalize_pixels = normalize_pixels
        self.runner = DeadlineRunner(batch_timeout_s)
        self.sizer = BatchSizer()  # the batch size that fits this GPU, once an OOM has shown it
        # temperature and top_p are recorded only when sampling: greedy rows keep exactly the settings they had
        sampling = dict(temperature=params.temperature, top_p=params.top_p) if params.temperature > 0 else {}
        self.settings = settings_json(model, str(self.pipe.device), self.specialist,
                                      max_new_tokens=self.params.max_new_tokens, layout=self.params.layout,
                                      **sampling)
        if self.compiler is not None:  # the VAE encoder and SigLIP layers, in place (showo2/compile.py), with or
            #                            without a specialist; the warm-up compiles them (and the decode step)
            self.compiler.compile_image_path(self.pipe.vae, self.pipe.model)
        self.compile_seconds = warm_up([partial(self.warm_up_batch, rows) for rows in sorted({1, batch_size or 1})]
                                       ) if self.compiler is not None else 0.0

    def warm_up_batch(self, rows: int) -> None:
        """Answer `rows` copies of a grey image and a short question: compiles the image path for that batch size,
        the decode step for its bucket (showo2/vqa.py batch_bucket) and cache length, and the prefill's attention,
        at load instead of in the first batches. The question grows with `rows`: a second warm-up batch then has
        another prompt length as well as another size, so both turn symbolic here and not in a user's batch."""
        import numpy as np

        R = self.pipe.resolution
        image = self.normalize_pixels(np.full((R, R, 3), 128, dtype=np.uint8))  # (3, R, R)
        question = "What is in the image?" + " Describe it." * (rows > 1)
        self.answer_batch([image] * rows, [question] * rows, list(range(rows)))

    def __call__(self, batch):
        cols = read_columns(batch, self.INPUT_COLUMNS, type(self).__name__, self.OPTIONAL_COLUMNS)
        n = len(cols["id"])
        out = {k: [None] * n for k in self.OUTPUT_COLUMNS}
        out.update({k: cols[k] for k in ("id", "question", "image_path", "image_sha256")}, error=list(cols["error"]))
        if self.params.temperature > 0:  # greedy answers need no seed: the column stays null
            out["seed"] = [None if row_id is None else row_seed(self.job_id, row_id, given)
                           for row_id, given in zip(cols["id"], cols["seed"])]
        images = {}
        for i in range(n):
            if out["error"][i] is not None:
                continue  # failed upstream: passed through without touching the model
            out["error"][i] = self.question_problem(cols["question"][i])
            if out["error"][i] is not None:
                continue
            pixels = pixels_array(cols[PIXELS_COLUMN][i], self.pipe.resolution)
            if pixels is not None:  # decoded and resized once, by the CPU stage: the same pixels preprocess makes
                images[i] = self.normalize_pixels(pixels)  # (3, R, R) float in [-1, 1]
                continue
            try:  # a direct caller's row (the CPU stage validated with this same function)
                images[i] = decode_image(cols["image_bytes"][i], self.params.max_image_pixels,
                                         self.params.max_image_bytes)
            except ImageError as e:
                out["error"][i] = str(e)
        if images:
            self.answer(list(images), images, cols["question"], out)
        used = {*self.INPUT_COLUMNS, *self.OPTIONAL_COLUMNS, *self.OUTPUT_COLUMNS}  # the pixels are dropped here
        return to_table(out, n, type(self).__name__, passthrough_columns(batch, used))

    def question_problem(self, question) -> str | None:
        """A question too long for the model's positions, as a row error (checked per row: the model would fail
        the whole batch, or slow it to a crawl). Other bad values are left to the pipeline's own checks."""
        if not isinstance(question, str):
            return None
        # memoised: pipe.answer reuses these ids
        text_a, question_ids, role_b = self.pipe.vqa_prompt_ids(question, self.params.layout)
        # the row holds the template, <|image_start|> + image slots + <|image_end|>, the question, then the answer
        others = len(text_a) + len(role_b) + self.pipe.model.config.num_image_slots + 2 + self.params.max_new_tokens
        limit = self.max_positions - others
        if len(question_ids) <= limit:
            return None
        return (f"question has {len(question_ids)} tokens, over the limit of {limit} (the model's "
                f"{self.max_positions} positions also hold the prompt template, the image and max_new_tokens="
                f"{self.params.max_new_tokens}); shorten it")

    def answer(self, todo: list[int], images: dict, questions: list, out: dict) -> None:
        """Answer the rows `todo` as one batch (in halves on CUDA OOM, one by one if the batch fails otherwise; see
        workers.common.run_rows)."""
        def run(rows):
            args = [[images[i] for i in rows], [questions[i] for i in rows]]
            if self.params.temperature > 0:  # greedy: answer_batch(images, questions), the call it always was
                args.append([out["seed"][i] for i in rows])
            return self.runner.run(self.answer_batch, *args)

        def record(rows, results, latency):
            answers, token_ids = results
            for i, answer, ids in zip(rows, answers, token_ids):
                out["answer"][i], out["num_tokens"][i] = answer, len(ids)
                out["model"][i], out["latency_s"][i] = self.settings, latency

        run_rows(todo, run, record, partial(self.fail, out=out), self.sizer, self.exit_process)

    def fail(self, rows: list[int], error: BaseException, latency: float, out: dict) -> None:
        for i in rows:
            out["error"][i], out["model"][i], out["latency_s"][i] = describe_error(error), self.settings, latency

    def answer_batch(self, images: list, questions: list[str],
                     seeds: list[int | None] | None = None) -> tuple[list[str], list[list[int]]]:
        captured = []

        def decode(*args, **kwargs):  # keeps the token ids: num_tokens counts what the model generated
            ids = self.decode_fn(*args, **kwargs)
            captured.append(ids)
            return ids

        sampling = {}  # greedy (temperature 0): the pipeline is called exactly as before sampling existed
        if self.params.temperature > 0:
            sampling = dict(temperature=self.params.temperature, top_p=self.params.top_p, seeds=seeds)
        answers = self.pipe.answer(images, questions, max_new_tokens=self.params.max_new_tokens,
                                   layout=self.params.layout, decode_fn=decode, **sampling)
        return answers, captured[0]
