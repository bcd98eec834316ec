"""T2IWorker: prompt rows in, image rows out (params.num_images_per_prompt out for each in, one by default;
failures come back as error rows)."""

import io
import time
from functools import partial

from flashu_batch.jobs.output import image_id
from flashu_batch.jobs.spec import ModelSpec, StorageSpec, T2IParams
from flashu_batch.jobs.storage import Storage
from flashu_batch.workers.common import (SEED_BITS, BatchSizer, DeadlineRunner, describe_error, exit_for_restart,
                                         load_pipeline, passthrough_columns, read_columns, row_seed, run_rows,
                                         settings_json, to_table, warm_up, worker_compiler)

OFFICIAL_STEPS = 50  # inference_t2i.py's default
# params.image_format -> (Pillow format, file extension of image_path)
IMAGE_FORMATS = {"png": ("PNG", "png"), "webp": ("WEBP", "webp"), "jpeg": ("JPEG", "jpg")}
# Params recorded in each row's settings only when they differ from their defaults: rows made with the defaults keep
# exactly the settings they had before these params existed.
RECORDED_WHEN_SET = {"negative_prompt", "num_images_per_prompt", "image_format", "image_quality"}


class T2IWorker:
    """A Ray Data actor for text-to-image. `__init__` loads the model once; `__call__(batch) -> pyarrow.Table`.

    Built from the model and the task's params only (a job's or a processor's). Callable without Ray on a dict of
    numpy arrays, a pandas DataFrame or a pyarrow Table:
        worker = T2IWorker(model, params); out = worker({"id": ..., "prompt": ..., "seed": ..., "error": ...})
    Columns it neither reads nor writes pass through unchanged. With num_images_per_prompt n > 1 every input row
    becomes n output rows, ids '<id>#<k>' (jobs.output.image_id), seeds <row seed> + k, its other columns repeated.
    """

    INPUT_COLUMNS = {
        "id": "row id (str)",
        "prompt": "the text prompt (str)",
        "seed": "the row's own seed (int >= 0) or null",
        "error": "null, or why the row already failed (the row is then passed through untouched)",
    }
    OPTIONAL_COLUMNS = {
        "negative_prompt": "the row's own negative prompt (str; wins over params.negative_prompt) or null",
    }
    OUTPUT_COLUMNS = ("id", "prompt", "negative_prompt", "seed", "image_index", "image_bytes", "image_path", "width",
                      "height", "model", "latency_s", "error")
    exit_process = staticmethod(exit_for_restart)  # after a fatal CUDA error (run_rows); tests replace it

    def __init__(self, model: ModelSpec, params: T2IParams, *, storage: StorageSpec | None = None,
                 gpus: float = 0.0, batch_timeout_s: float | None = None, job_id: str = ""):
        """gpus: the actor's GPU share (model.device 'auto' picks cuda when > 0); job_id: part of every derived seed
        (row_seed), so one row draws the same image in every run of a job."""
        import torch  # noqa: F401 -- heavy imports live in the actor, not in the driver that pickles this class

        self.job_id, self.params = job_id, params
        start = time.perf_counter()
        self.pipe, self.specialist = load_pipeline(model, "t2i", Storage(storage), gpus)
        self.load_seconds = time.perf_counter() - start
        self.compiler = worker_compiler(model, self.pipe.device)  # None: eager
        if self.specialist is not None:
            self.call_kwargs = self.specialist.pipeline_kwargs(guidance_scale=self.params.guidance_scale,
                                                               compiler=self.compiler)
        else:
            self.call_kwargs = dict(num_inference_steps=self.params.steps or OFFICIAL_STEPS,
                                    guidance_scale=self.params.guidance_scale)
        self.runner = DeadlineRunner(batch_timeout_s)
        self.sizer = BatchSizer()  # the batch size that fits this GPU, once an OOM has shown it
        from flashu_batch.showo2.layouts import t2i_max_text_len

        config = self.pipe.model.config
        self.max_prompt_tokens = t2i_max_text_len(config.default_max_seq_len, config.num_image_slots)
        scales = self.call_kwargs["guidance_scale"]
        self.use_cfg = any(g > 0 for g in (scales if isinstance(scales, list) else [scales]))
        self.settings = settings_json(model, str(self.pipe.device), self.specialist,
                                      steps=self.call_kwargs["num_inference_steps"],
                                      guidance_scale=self.params.guidance_scale, seed_policy=self.params.seed_policy,
                                      truncate=self.params.truncate, resolution=self.pipe.resolution,
                                      **self.params.model_dump(include=RECORDED_WHEN_SET, exclude_defaults=True))
        # Two warm-up batches of different sizes and prompt lengths: the second turns the batch and prefix dimensions
        # dynamic (dynamo's automatic dynamic shapes), so later batches run the compiled step without recompiling.
        self.compile_seconds = warm_up([partial(self.text_to_image, ["warm-up"], [0]),
                                        partial(self.text_to_image, ["warm-up", "a somewhat longer warm-up prompt"],
                                                [0, 1])]) if self.compiler else 0.0

    def __call__(self, batch):
        cols = read_columns(batch, self.INPUT_COLUMNS, type(self).__name__, self.OPTIONAL_COLUMNS)
        per_row = self.params.num_images_per_prompt
        source = [i for i in range(len(cols["id"])) for _ in range(per_row)]  # the input row of each output row
        n = len(source)
        out = {k: [None] * n for k in self.OUTPUT_COLUMNS}
        problems = {}  # input row -> why it cannot run (checked once per input row, not once per image)
        for j, i in enumerate(source):
            k = j % per_row
            negative = cols["negative_prompt"][i]
            negative = self.params.negative_prompt if negative is None else negative  # the row's own value wins
            out["prompt"][j], out["negative_prompt"][j], out["image_index"][j] = cols["prompt"][i], negative or None, k
            out["error"][j] = cols["error"][i]  # rows that failed upstream pass through
            if cols["id"][i] is not None:
                out["id"][j] = image_id(cols["id"][i], k, per_row)
                given = cols["seed"][i] if self.params.seed_policy == "row" else None
                out["seed"][j] = (row_seed(self.job_id, cols["id"][i], given) + k) % 2**SEED_BITS
            if out["error"][j] is None:
                if i not in problems:
                    problems[i] = self.row_problem(cols["prompt"][i], out["negative_prompt"][j])
                out["error"][j] = problems[i]
        todo = [j for j in range(n) if out["error"][j] is None]
        if todo:
            self.generate(todo, out)
        passthrough = passthrough_columns(batch, {*self.INPUT_COLUMNS, *self.OPTIONAL_COLUMNS, *self.OUTPUT_COLUMNS})
        if per_row > 1:
            import pyarrow as pa

            passthrough = {k: column.take(pa.array(source, pa.int64())) for k, column in passthrough.items()}
        return to_table(out, n, type(self).__name__, passthrough)

    def row_problem(self, prompt, negative_prompt) -> str | None:
        """A prompt or negative prompt over the token limit (unless params.truncate), or a negative prompt without
        guidance, as a row error (checked per row: the pipeline's own checks would fail the whole batch). Other bad
        values are left to the pipeline's own checks."""
        if negative_prompt and not self.use_cfg:
            return ("negative_prompt is set but no model call uses classifier-free guidance (guidance_scale 0), "
                    "the only way a negative prompt acts; set params.guidance_scale > 0, or drop the negative prompt")
        if self.params.truncate:
            return None
        return self.length_problem("prompt", prompt) or self.length_problem("negative_prompt", negative_prompt)

    def length_problem(self, what: str, text) -> str | None:
        if not isinstance(text, str):
            return None
        num_tokens = len(self.pipe.text_ids(text))  # memoised: text_to_image reuses these ids
        if num_tokens <= self.max_prompt_tokens:
            return None
        config = self.pipe.model.config
        return (f"{what} has {num_tokens} tokens, over the limit of {self.max_prompt_tokens} (the model's "
                f"{config.default_max_seq_len}-token sequence also holds {config.num_image_slots} image slots and 4 "
                f"markers); shorten it, or set params.truncate: true to cut it as the official code does")

    def generate(self, todo: list[int], out: dict) -> None:
        """Run the output rows `todo` (one image each) as one batch (in halves on CUDA OOM, one by one if the batch
        fails otherwise; see workers.common.run_rows)."""
        def run(rows):
            args = [[out["prompt"][j] for j in rows], [out["seed"][j] for j in rows]]
            negatives = [out["negative_prompt"][j] for j in rows]
            if any(negatives):  # else text_to_image(prompts, seeds), the call it always was
                args.append(negatives)
            return self.runner.run(self.text_to_image, *args)

        def record(rows, images, latency):
            for j, image in zip(rows, images):
                out["image_bytes"][j], out["image_path"][j] = self.encode(image), f"{out['id'][j]}.{extension}"
                out["width"][j], out["height"][j] = image.size
                out["model"][j], out["latency_s"][j] = self.settings, latency

        extension = IMAGE_FORMATS[self.params.image_format][1]
        run_rows(todo, run, record, partial(self.fail, out=out), self.sizer, self.exit_process)

    def encode(self, image) -> bytes:
        """A PIL image -> params.image_format bytes. WebP at quality 100 is lossless WebP; JPEG stays lossy."""
        fmt, quality = IMAGE_FORMATS[self.params.image_format][0], self.params.image_quality
        options = {"PNG": {}, "WEBP": dict(quality=quality, lossless=quality == 100), "JPEG": dict(quality=quality)}
        buffer = io.BytesIO()
        image.save(buffer, format=fmt, **options[fmt])
        return buffer.getvalue()

    def fail(self, rows: list[int], error: BaseException, latency: float, out: dict) -> None:
        for i in rows:
            out["error"][i], out["model"][i], out["latency_s"][i] = describe_error(error), self.settings, latency

    def text_to_image(self, prompts: list[str], seeds: list[int], negative_prompts: list[str | None] | None = None):
        from flashu_batch.showo2.prefix_cache import PrefixCachedVelocity

        kwargs = dict(self.call_kwargs)
        inner = kwargs.pop("velocity_factory", None) or partial(PrefixCachedVelocity, self.pipe.model,
                                                                  compiler=self.compiler)
        if negative_prompts is not None:  # None entries: the official empty caption
            kwargs["negative_prompt"] = list(negative_prompts)
        return self.pipe.text_to_image(prompts, seeds=seeds, truncate=self.params.truncate, output_type="pil",
                                       velocity_factory=partial(self.cancellable, inner), **kwargs)

    def cancellable(self, factory, seqs, use_cfg):
        """The step function, checking before every model call whether the batch was given up (timeout)."""
        velocity_fn = factory(seqs, use_cfg)

        def checked(x, t, step=0):
            self.runner.check()
            return velocity_fn(x, t, step)

        return checked
