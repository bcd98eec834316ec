"""T2IWorker: prompt rows in, PNG rows out (one out for each in; failures come back as error rows)."""

import io
from functools import partial

from flashu_batch.jobs.spec import JobSpec
from flashu_batch.jobs.storage import Storage
from flashu_batch.workers.common import (DeadlineRunner, describe_error, exit_on_row_hook, load_pipeline, read_columns, row_seed,
                            run_rows, settings_json, to_batch)

OFFICIAL_STEPS = 50  # inference_t2i.py's default


class T2IWorker:
    """A Ray Data actor for text-to-image. `__init__` loads the model once; `__call__(batch) -> batch`.

    Callable without Ray on a dict of numpy arrays, a pandas DataFrame or a pyarrow Table:
        worker = T2IWorker(spec, "t2i"); out = worker({"id": ..., "prompt": ..., "seed": ..., "error": ...})
    """

    INPUT_COLUMNS = {
        "id": "row id (str)",
        "prompt": "the text prompt (str)",
        "seed": "the row's own seed (int >= 0) or null",
        "error": "null, or why the row already failed (the row is then passed through untouched)",
    }
    OUTPUT_COLUMNS = ("id", "prompt", "seed", "image_bytes", "image_path", "width", "height", "model", "latency_s",
                      "error")

    def __init__(self, spec: JobSpec, task_name: str):
        import torch  # noqa: F401 -- heavy imports live in the actor, not in the driver that pickles this class

        task = spec.task(task_name)
        assert task.kind == "t2i", f"T2IWorker runs t2i tasks, got {task.kind!r} task {task_name!r}"
        self.job_id, self.params = spec.job_id, task.params
        self.pipe, self.specialist = load_pipeline(spec.model, "t2i", Storage(spec.storage),
                                                   task.resources.gpus_per_worker)
        if self.specialist is not None:
            self.call_kwargs = self.specialist.pipeline_kwargs(guidance_scale=self.params.guidance_scale)
        else:
            self.call_kwargs = dict(num_inference_steps=self.params.steps or OFFICIAL_STEPS,
                                    guidance_scale=self.params.guidance_scale)
        self.runner = DeadlineRunner(task.resources.batch_timeout_s)
        from flashu_batch.showo2.layouts import t2i_max_text_len

        config = self.pipe.model.config
        self.max_prompt_tokens = t2i_max_text_len(config.default_max_seq_len, config.num_image_slots)
        self.settings = settings_json(spec.model, str(self.pipe.device), self.specialist,
                                      steps=self.call_kwargs["num_inference_steps"],
                                      guidance_scale=self.params.guidance_scale, seed_policy=self.params.seed_policy,
                                      truncate=self.params.truncate, resolution=self.pipe.resolution)

    def __call__(self, batch):
        cols = read_columns(batch, self.INPUT_COLUMNS, type(self).__name__)
        exit_on_row_hook(cols["id"])  # tests only: inert unless FLASHU_TEST_EXIT_ON_ROW is set
        n = len(cols["id"])
        out = {k: [None] * n for k in self.OUTPUT_COLUMNS}
        out.update(id=cols["id"], prompt=cols["prompt"], error=list(cols["error"]))
        for i in range(n):
            if cols["id"][i] is not None:
                given = cols["seed"][i] if self.params.seed_policy == "row" else None
                out["seed"][i] = row_seed(self.job_id, cols["id"][i], given)
        todo = [i for i in range(n) if out["error"][i] is None]  # rows that failed upstream pass through
        if not self.params.truncate:
            for i in todo:
                out["error"][i] = self.prompt_problem(cols["prompt"][i])
            todo = [i for i in todo if out["error"][i] is None]
        if todo:
            self.generate(todo, cols["prompt"], out)
        return to_batch(out, n, type(self).__name__)

    def prompt_problem(self, prompt) -> str | None:
        """A prompt over the token limit, as a row error (checked per row: the pipeline's own check would fail the
        whole batch). Other bad values are left to the pipeline's own checks."""
        if not isinstance(prompt, str):
            return None
        num_tokens = len(self.pipe.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        if num_tokens <= self.max_prompt_tokens:
            return None
        config = self.pipe.model.config
        return (f"prompt has {num_tokens} tokens, over the limit of {self.max_prompt_tokens} (the model's "
                f"{config.default_max_seq_len}-token sequence also holds {config.num_image_slots} image slots and 4 "
                f"markers); shorten it, or set params.truncate: true to cut it as the official code does")

    def generate(self, todo: list[int], prompts: list, out: dict) -> None:
        """Run the rows `todo` as one batch (one by one if the batch fails; see workers.common.run_rows)."""
        def run(rows):
            return self.runner.run(self.text_to_image, [prompts[i] for i in rows], [out["seed"][i] for i in rows])

        def record(rows, images, latency):
            for i, image in zip(rows, images):
                png = io.BytesIO()
                image.save(png, format="PNG")
                out["image_bytes"][i], out["image_path"][i] = png.getvalue(), f"{out['id'][i]}.png"
                out["width"][i], out["height"][i] = image.size
                out["model"][i], out["latency_s"][i] = self.settings, latency

        run_rows(todo, run, record, partial(self.fail, out=out))

    def fail(self, rows: list[int], error: BaseException, latency: float, out: dict) -> None:
        for i in rows:
            out["error"][i], out["model"][i], out["latency_s"][i] = describe_error(error), self.settings, latency

    def text_to_image(self, prompts: list[str], seeds: list[int]):
        from flashu_batch.showo2.prefix_cache import PrefixCachedVelocity

        kwargs = dict(self.call_kwargs)
        inner = kwargs.pop("velocity_factory", None) or partial(PrefixCachedVelocity, self.pipe.model)
        return self.pipe.text_to_image(prompts, seeds=seeds, truncate=self.params.truncate, output_type="pil",
                                       velocity_factory=partial(self.cancellable, inner), **kwargs)

    def cancellable(self, factory, seqs, use_cfg):
        """The step function, checking before every model call whether the batch was given up (timeout)."""
        velocity_fn = factory(seqs, use_cfg)

        def checked(x, t, step=0):
            self.runner.check()
            return velocity_fn(x, t, step)

        return checked
