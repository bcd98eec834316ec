"""VQAWorker: image + question rows in, answer rows out (one out for each in; failures come back as error rows)."""

from functools import partial

from flashu_batch.jobs.spec import JobSpec
from flashu_batch.jobs.storage import Storage
from flashu_batch.workers.common import (DeadlineRunner, describe_error, exit_on_row_hook, load_pipeline, read_columns, run_rows,
                            settings_json, to_batch)
from flashu_batch.workers.images import ImageError, decode_image


class VQAWorker:
    """A Ray Data actor for visual question answering. `__init__` loads the model once; `__call__(batch) -> batch`.

    Callable without Ray on a dict of numpy arrays, a pandas DataFrame or a pyarrow Table (see INPUT_COLUMNS).
    """

    INPUT_COLUMNS = {
        "id": "row id (str)",
        "question": "the question (str)",
        "image_bytes": "the encoded image (PNG, JPEG, ... bytes)",
        "image_path": "where the image came from (str) or null; passed through",
        "image_sha256": "hash of image_bytes (str) or null; passed through",
        "error": "null, or why the row already failed (the row is then passed through untouched)",
    }
    OUTPUT_COLUMNS = ("id", "question", "image_path", "image_sha256", "answer", "num_tokens", "model", "latency_s",
                      "error")

    def __init__(self, spec: JobSpec, task_name: str):
        import torch  # noqa: F401 -- heavy imports live in the actor, not in the driver that pickles this class

        from flashu_batch.showo2.vqa import greedy_answers

        task = spec.task(task_name)
        assert task.kind == "vqa", f"VQAWorker runs vqa tasks, got {task.kind!r} task {task_name!r}"
        self.params = task.params
        self.pipe, self.specialist = load_pipeline(spec.model, "vqa", Storage(spec.storage),
                                                   task.resources.gpus_per_worker)
        self.decode_fn = self.specialist.pipeline_kwargs()["decode_fn"] if self.specialist else greedy_answers
        self.max_positions = self.pipe.model.config.llm["max_position_embeddings"]
        self.runner = DeadlineRunner(task.resources.batch_timeout_s)
        self.settings = settings_json(spec.model, str(self.pipe.device), self.specialist,
                                      max_new_tokens=self.params.max_new_tokens, layout=self.params.layout)

    def __call__(self, batch):
        cols = read_columns(batch, self.INPUT_COLUMNS, type(self).__name__)
        exit_on_row_hook(cols["id"])  # tests only: inert unless FLASHU_TEST_EXIT_ON_ROW is set
        n = len(cols["id"])
        out = {k: [None] * n for k in self.OUTPUT_COLUMNS}
        out.update({k: cols[k] for k in ("id", "question", "image_path", "image_sha256")}, error=list(cols["error"]))
        images = {}
        for i in range(n):
            if out["error"][i] is not None:
                continue  # failed upstream: passed through without touching the model
            out["error"][i] = self.question_problem(cols["question"][i])
            if out["error"][i] is not None:
                continue
            try:  # the validation stage decoded it already, with the same function: this guards direct callers
                images[i] = decode_image(cols["image_bytes"][i], self.params.max_image_pixels,
                                         self.params.max_image_bytes)
            except ImageError as e:
                out["error"][i] = str(e)
        if images:
            self.answer(list(images), images, cols["question"], out)
        return to_batch(out, n, type(self).__name__)

    def question_problem(self, question) -> str | None:
        """A question too long for the model's positions, as a row error (checked per row: the model would fail
        the whole batch, or slow it to a crawl). Other bad values are left to the pipeline's own checks."""
        from flashu_batch.showo2.layouts import vqa_prompt_ids

        if not isinstance(question, str):
            return None
        text_a, question_ids, role_b = vqa_prompt_ids(self.pipe.tokenizer, self.pipe.tokens, question,
                                                      self.params.layout)
        # the row holds the template, <|image_start|> + image slots + <|image_end|>, the question, then the answer
        others = len(text_a) + len(role_b) + self.pipe.model.config.num_image_slots + 2 + self.params.max_new_tokens
        limit = self.max_positions - others
        if len(question_ids) <= limit:
            return None
        return (f"question has {len(question_ids)} tokens, over the limit of {limit} (the model's "
                f"{self.max_positions} positions also hold the prompt template, the image and max_new_tokens="
                f"{self.params.max_new_tokens}); shorten it")

    def answer(self, todo: list[int], images: dict, questions: list, out: dict) -> None:
        """Answer the rows `todo` as one batch (one by one if the batch fails; see workers.common.run_rows)."""
        def run(rows):
            return self.runner.run(self.answer_batch, [images[i] for i in rows], [questions[i] for i in rows])

        def record(rows, results, latency):
            answers, token_ids = results
            for i, answer, ids in zip(rows, answers, token_ids):
                out["answer"][i], out["num_tokens"][i] = answer, len(ids)
                out["model"][i], out["latency_s"][i] = self.settings, latency

        run_rows(todo, run, record, partial(self.fail, out=out))

    def fail(self, rows: list[int], error: BaseException, latency: float, out: dict) -> None:
        for i in rows:
            out["error"][i], out["model"][i], out["latency_s"][i] = describe_error(error), self.settings, latency

    def answer_batch(self, images: list, questions: list[str]) -> tuple[list[str], list[list[int]]]:
        captured = []

        def decode(*args, **kwargs):  # keeps the token ids: num_tokens counts what the model generated
            ids = self.decode_fn(*args, **kwargs)
            captured.append(ids)
            return ids

        answers = self.pipe.answer(images, questions, max_new_tokens=self.params.max_new_tokens,
                                   layout=self.params.layout, decode_fn=decode)
        return answers, captured[0]
