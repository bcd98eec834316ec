"""Job specs: one validated, frozen description of a batch job, parsed from YAML or JSON before Ray starts.

A spec names the job (`job_id`, which keys its outputs and makes re-runs resumable), the model (checkpoint, dtype,
optional FlashU artifact per task), object-storage settings (never credentials: those come only from the standard
AWS environment) and one or more tasks (t2i | vqa), each with its input, output, parameters and resources.

    spec = load_spec("job.yaml")          # raises SpecError naming every bad field, e.g. "tasks[0].params.steps: ..."

Relative paths in a spec file resolve against the spec file's folder, so a spec and its data move together.
Past this edge the validated `JobSpec` is passed around, never the raw dict (style rule 11).
"""

import json
import os
import re
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from flashu_batch.showo2.hub import HF_SCHEME, HubError, is_hub_id, parse_ref

_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
_CREDENTIAL_WORDS = ("secret", "access_key", "password", "token", "credential", "session")
# Columns a task reads; the input's `columns` mapping may rename any of them.
T2I_COLUMNS = {"id": "row id (optional; derived from the row's content and position when absent)",
               "prompt": "the text prompt (non-empty string)",
               "seed": "noise seed (optional integer; see params.seed_policy)",
               "negative_prompt": "the row's own negative prompt (optional string; wins over params.negative_prompt)"}
VQA_COLUMNS = {"id": "row id (optional; derived from the row's content and position when absent)",
               "question": "the question (non-empty string)",
               "image": "the image: bytes, a datasets Image struct {bytes, path}, or a URI (local path or s3://)",
               "seed": "sampling seed (optional integer; used only when params.temperature > 0)"}
# Image limits (VQAParams): 8000 x 8000 pixels (192 MB decoded as RGB), 64 MiB encoded. Pillow itself refuses
# images over twice its MAX_IMAGE_PIXELS, so a larger pixel limit could not take effect.
MAX_IMAGE_PIXELS, MAX_IMAGE_BYTES, PILLOW_PIXEL_CEILING = 64_000_000, 64 * 2**20, 2 * 89_478_485


class SpecError(ValueError):
    """A job spec that cannot run; the message names every bad field and what was wrong with it."""


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _is_uri(value: str) -> bool:
    return value.startswith("s3://") or "://" not in value


def _prefix_problem(value: str) -> str | None:
    """Why an output location is refused, or None. A '..' could climb out of the prefix it seems to be under; '.'
    and empty segments are mistakes (an S3 key keeps them literally, a filesystem drops them), usually a template
    with an empty part. A leading './', a leading '/' and a trailing '/' are fine. (A relative path in a spec file
    was already resolved against the file's folder, '..' included: see _resolve_paths.)"""
    if not value or not _is_uri(value):
        return "expected a local path or an s3://bucket/prefix URI"
    path = value[len("s3://"):] if value.startswith("s3://") else value.removeprefix("./").lstrip("/")
    segments = path.rstrip("/").split("/")
    for bad, what in (("..", "a '..' segment"), (".", "a '.' segment"), ("", "an empty segment ('//')")):
        if bad in segments:
            return f"it has {what}; write the location out plainly (no '..', '.' or '//')"
    return None


def _under(location: str, prefix: str) -> bool:
    """Whether `location` is `prefix` or inside it, segment by segment (s3://b/pre does not hold s3://b/prefix)."""
    location, prefix = location.rstrip("/"), prefix.rstrip("/")
    return location == prefix or location.startswith(prefix + "/")


class StorageSpec(_Frozen):
    """Object-storage client settings. Credentials are never part of a spec: boto3 and pyarrow read them from the
    standard AWS environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, profiles, roles)."""

    endpoint_url: str | None = Field(None, description=(
        "Full S3 endpoint URL (scheme://host:port) of an S3-compatible store (MinIO, SeaweedFS, moto); None uses "
        "AWS_ENDPOINT_URL or AWS itself. A custom endpoint avoids egress to AWS but must be reachable from every "
        "Ray node, not just the driver."))
    region: str | None = Field(None, description=(
        "S3 region; None uses AWS_REGION / AWS_DEFAULT_REGION, else us-east-1. A wrong region costs a redirect per "
        "request on AWS; S3-compatible servers usually ignore it."))
    path_style: bool | None = Field(None, description=(
        "True: path-style addressing (endpoint/bucket/key), which most self-hosted stores need; False: virtual-host "
        "style (bucket.endpoint/key), which AWS prefers; None: each client's default."))
    conditional_put: Literal["auto", "always", "never"] = Field("auto", description=(
        "Create-only commit records use a conditional PUT (If-None-Match: *). 'auto' tries it and falls back to "
        "HEAD-then-PUT on a server that refuses it; 'always' fails instead (strict); 'never' skips the attempt (for "
        "servers that silently ignore the header). The fallback is safe: a commit record's key is derived from the "
        "ids it commits, so a lost race at worst leaves an orphan data file, never a duplicate row."))
    allowed_outputs: list[str] | None = Field(None, description=(
        "Output prefixes tasks may write under (s3://bucket/prefix/ or local folders, matched segment by segment); "
        "a task output outside all of them is refused when the spec is read. None allows any output. Set it in a "
        "shared cluster's spec template so a typo or a copied spec cannot write into someone else's bucket."))

    @model_validator(mode="before")
    @classmethod
    def _no_credentials(cls, data):
        if isinstance(data, dict):
            bad = sorted(k for k in data if isinstance(k, str) and any(w in k.lower() for w in _CREDENTIAL_WORDS))
            if bad:  # the value is never echoed: it may be a secret
                raise ValueError(f"{', '.join(bad)}: credentials are never read from a spec (they would end up in "
                                 f"logs and version control). Set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (and "
                                 f"AWS_SESSION_TOKEN) in the environment of the driver and the Ray workers instead.")
        return data

    @field_validator("allowed_outputs")
    @classmethod
    def _allowed(cls, v):
        for prefix in v or []:
            problem = _prefix_problem(prefix)
            if problem:
                raise ValueError(f"got {prefix!r}; {problem}.")
        return v

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, v):
        if v is not None and "@" in v:  # not echoed: user:password@host holds a secret
            raise ValueError("holds a user:password@ part; credentials are never read from a spec. Give the bare "
                             "URL here and the credentials in the AWS environment (AWS_ACCESS_KEY_ID, ...).")
        if v is not None and not re.match(r"^https?://[^/\s]+/?$", v):
            raise ValueError(f"got {v!r}; expected a full URL with scheme and host, such as "
                             f"'http://127.0.0.1:9000' or 'https://s3.eu-west-1.amazonaws.com' (no path).")
        return v


class SpecializationSpec(_Frozen):
    t2i: str | None = Field(None, description=(
        "FlashU generation artifact folder (from `flashu-batch specialize --task t2i`), 'on_start', or None for "
        "the exact baseline. The specialist is ~2x faster per image but approximates the baseline; its step count "
        "and guidance schedule come from the artifact. 'on_start': every worker calibrates at load (deterministic, "
        "so all actors agree) - no artifact to manage, but each actor pays the calibration; run `specialize` once "
        "for large pools."))
    vqa: str | None = Field(None, description=(
        "FlashU understanding artifact folder (`flashu-batch specialize --task vqa`), 'on_start' (each worker "
        "calibrates at load, as for t2i), or None for the exact baseline. About half the FLOPs per answer, at the "
        "cost of answers that may differ from the baseline's."))


class ModelSpec(_Frozen):
    checkpoint: str = Field(..., description=(
        "Show-o2 checkpoint: a local folder, an s3:// prefix, or a Hugging Face Hub model (org/name, "
        "org/name@revision with a branch, tag or commit, or hf://org/name[@revision]; a bare org/name is a Hub id "
        "only when no local path by that name exists). An s3:// prefix is downloaded once per node into "
        "$FLASHU_CACHE, a Hub model once per node into the Hub cache (HF_HOME; HF_HUB_OFFLINE and HF_TOKEN as in "
        "transformers; pin a commit for runs that must not change when the branch moves): startup cost once, then "
        "local reads. A shared filesystem path skips the copy but every actor reads the weights over the network."))
    dtype: Literal["float32", "bfloat16", "float16"] = Field("bfloat16", description=(
        "Weights and activations dtype. bfloat16 halves memory and is the GPU default; float32 is slower but "
        "bit-reproducible across runs and the right choice on CPU."))
    device: Literal["auto", "cuda", "cpu"] = Field("auto", description=(
        "Where workers run the model. 'auto' picks cuda when the worker was given a GPU (gpus_per_worker > 0), "
        "else cpu; 'cpu' with gpus_per_worker > 0 wastes the GPU."))
    compile: Literal["auto", "on", "off"] = Field("auto", description=(
        "torch.compile the hot steps (T2I step, FlashU layers, VQA decoding with CUDA graphs), once per worker at "
        "load, with a warm-up call: 'auto' compiles on CUDA and not on CPU; 'off' never (eager, no load cost); 'on' "
        "also on CPU, with dynamo's eager backend (tests the compiled path; no speed-up). Compiling costs load time "
        "(reported as compile_s by bench.gpu), not per-batch time; results equal eager ones up to float rounding."))
    vae_path: str | None = Field(None, description=(
        "Wan2.1 VAE file: a local file, or a file on the Hub written hf://org/name[@revision]/path/in/repo.pth (a "
        "bare a/b/c.pth is always a local path). None: <checkpoint>/Wan2.1_VAE.pth, else the official "
        "hf://Wan-AI/Wan2.1-T2V-14B/Wan2.1_VAE.pth (official releases ship without a VAE; downloaded once per node)."))
    tokenizer_path: str | None = Field(None, description=(
        "Qwen2.5 tokenizer: a local folder or a Hub model (org/name[@revision], hf://org/name[@revision]; only its "
        "tokenizer files are downloaded). None: the checkpoint's own (its folder or tokenizer/), else the Qwen2.5 "
        "instruct tokenizer of the checkpoint's size (Qwen/Qwen2.5-1.5B-Instruct, Qwen/Qwen2.5-7B-Instruct)."))
    specialization: SpecializationSpec = Field(default_factory=SpecializationSpec, description=(
        "FlashU task-specialist artifact per task; a task without one runs the exact baseline."))

    @field_validator("checkpoint", "vae_path", "tokenizer_path")
    @classmethod
    def _local_s3_or_hub(cls, v, info):
        """Local paths, hf:// references (parsed here; a bare org/name is only known to be one on the machine that
        loads it, where a local path by that name wins) and, for the checkpoint alone, s3:// prefixes."""
        if v is None:
            return v
        file, s3 = info.field_name == "vae_path", info.field_name == "checkpoint"
        if "://" in v and not v.startswith(HF_SCHEME) and not (s3 and v.startswith("s3://")):
            hub = "hf://org/name[@revision]/path/in/repo.pth" if file else "a Hub model (org/name, hf://org/name)"
            if s3:
                raise ValueError(f"got {v!r}; expected a local folder, an s3:// prefix, or {hub}.")
            raise ValueError(f"got {v!r}; this must be a local path or {hub}. For a checkpoint on S3, put the file "
                             f"inside the checkpoint prefix (Wan2.1_VAE.pth, tokenizer.json) and leave this unset.")
        if v.startswith(HF_SCHEME):
            try:
                parse_ref(v, file=file)
            except HubError as e:
                raise ValueError(str(e)) from None
        return v


class InputSpec(_Frozen):
    uris: list[str] = Field(..., min_length=1, description=(
        "Input files, folders or glob patterns (local paths or s3:// URIs). A folder takes every file below it with "
        "the format's extension; a pattern takes the files it matches: *, ? and [...] within a path segment, ** "
        "across any depth (s3://bucket/shards/**/*.parquet), and one that matches nothing is an error. Both sorted "
        "by path, names starting with '.' or '_' skipped. A derived id depends on a file's path below the folder or "
        "below the pattern's literal part, so a dataset moved whole keeps its ids. More, smaller files read in "
        "parallel; one huge JSONL or CSV file is read by one task."))
    format: Literal["parquet", "jsonl", "csv"] = Field(..., description=(
        "parquet (typed columns, images as bytes or {bytes, path} structs, read per row group: the scalable "
        "choice); jsonl or csv (simple to write; images as URIs; each file is read by one task, in memory). JSONL "
        "and CSV files may be gzip or zstd compressed (.jsonl.gz, .csv.zst, ...: smaller to store and move, "
        "decompressed whole by their read task); a corrupt or truncated one stops the job, naming it."))
    columns: dict[str, str] = Field(default_factory=dict, description=(
        "Rename map from the task's column names to the input's, e.g. {prompt: caption, id: key}. Unmapped "
        "names are read as themselves."))
    keep_columns: list[str] | None = Field(None, description=(
        "Input columns every output row carries unchanged, so results join back to their source (url, license, "
        "...). None: all the columns the task does not read; []: none; a list: those, each an error if a file "
        "lacks it (a JSONL file: if no line has it). Parquet columns keep their types; JSONL and CSV values are "
        "text (numbers, lists and objects as JSON text), so that any two files of an input share one column type. "
        "Columns named like an output column (id, prompt, seed, image, error, answer, ...) are not carried; "
        "listing one is an error. More columns make larger output files."))

    @field_validator("uris", mode="before")
    @classmethod
    def _one_uri(cls, v):
        return [v] if isinstance(v, str) else v

    @field_validator("uris")
    @classmethod
    def _uris(cls, v):
        for uri in v:
            if not uri or not _is_uri(uri):
                raise ValueError(f"got {uri!r}; expected a local path or an s3://bucket/prefix URI.")
        return v

    @field_validator("keep_columns")
    @classmethod
    def _keep_columns(cls, v):
        if v is not None and ("" in v or len(set(v)) < len(v)):
            raise ValueError(f"got {v!r}; expected distinct, non-empty column names (or null for all the columns "
                             f"the task does not read, [] for none).")
        return v


class T2IParams(_Frozen):
    steps: int | None = Field(None, ge=2, le=1000, description=(
        "Flow-matching grid points (model calls = steps - 1). None: 50 (the official setting) for the baseline, "
        "the artifact's count for a FlashU specialist. Fewer steps are proportionally faster and blurrier."))
    guidance_scale: float = Field(7.5, ge=0, le=100, description=(
        "Classifier-free guidance scale; 0 disables guidance and halves the work per step at a large cost in "
        "prompt adherence. A specialist's guidance schedule overrides it where the schedule sets a value."))
    seed_policy: Literal["row", "hash"] = Field("row", description=(
        "'row': a row's own `seed` when given, else a hash of job_id and row id; 'hash': always the hash. Both make "
        "a re-run reproduce the same image for the same row; 'row' lets callers pin seeds across jobs."))
    truncate: bool = Field(False, description=(
        "False: a prompt longer than the model's sequence holds (its token limit: max_seq_len less the image slots "
        "and 4 markers) is an error row naming its token count and the limit, so no image silently ignores the end "
        "of its prompt (or its negative prompt). True: cut it to the limit, as the official code does."))
    negative_prompt: str | None = Field(None, description=(
        "Text the image should move away from: classifier-free guidance takes its unconditional branch from this "
        "caption instead of the empty caption the official code uses (v = v_neg + g (v_cond - v_neg)). A row's own "
        "`negative_prompt` column wins over it. Costs nothing per step (the branch runs anyway) but steers the "
        "whole image, so a long list of unwanted things can also wash out what the prompt asks for. It obeys the "
        "prompt's token limit and `truncate`. None (or ''): the empty caption, exactly the official output. Needs "
        "guidance (guidance_scale > 0)."))
    num_images_per_prompt: int = Field(1, ge=1, le=64, description=(
        "Images per input row, each with its own noise: n output rows per input row, with ids '<id>#<k>' "
        "(k = 0..n-1, in the `image_index` column) and seeds <row seed> + k (mod 2**63), so image k is the one a "
        "single-image run with that seed makes. 1 keeps the row's own id. Cost grows linearly with n (the images of "
        "one row share nothing); the rows of one batch become batch_size x n images per model call, split on "
        "out-of-memory. Changing it on a re-run of the same job_id mixes id schemes: use a new job_id."))
    image_format: Literal["png", "webp", "jpeg"] = Field("png", description=(
        "Encoding of the output images (and the extension of image.path: .png, .webp, .jpg). png: lossless and "
        "the largest; webp: lossy at image_quality, several times smaller (lossless at image_quality 100); jpeg: "
        "lossy at image_quality, the most widely readable compact format. Decoding of the generated pixels is the "
        "same for all three; only the stored bytes differ."))
    image_quality: int = Field(90, ge=1, le=100, description=(
        "Encoder quality for webp and jpeg (1-100; png ignores it). Higher keeps more detail and makes larger "
        "files; 100 with webp switches to lossless WebP, with jpeg it is the best lossy quality."))

    @model_validator(mode="after")
    def _negative_needs_guidance(self):
        if self.negative_prompt and self.guidance_scale == 0:
            raise ValueError(f"negative_prompt: got {self.negative_prompt[:60]!r} with guidance_scale 0; a negative "
                             f"prompt acts only through classifier-free guidance. Set guidance_scale > 0, or drop "
                             f"negative_prompt.")
        return self


class VQAParams(_Frozen):
    max_new_tokens: int = Field(64, ge=1, le=4096, description=(
        "Answer length cap. Decoding cost grows with it and a batch runs until its longest answer ends, so a "
        "high cap on short-answer questions wastes little, but on open-ended ones sets the batch latency."))
    layout: Literal["demo", "training"] = Field("demo", description=(
        "'demo': the prompt layout of the official inference script (matches published answers); 'training': "
        "the layout the model was trained on."))
    max_image_pixels: int = Field(MAX_IMAGE_PIXELS, ge=1, le=PILLOW_PIXEL_CEILING, description=(
        "Largest image (width x height, read from the file header before decoding) a row may hold; larger ones are "
        "error rows. Guards against decompression bombs (a few KB of PNG that decode to gigabytes): decoding costs "
        "3 bytes a pixel in the CPU stage, and the model sees every image resized to its own resolution anyway. "
        "Raise it for very high resolution scans; at most Pillow's own ceiling (178956970)."))
    max_image_bytes: int = Field(MAX_IMAGE_BYTES, ge=1, le=2**31, description=(
        "Largest encoded image (bytes) a row may hold; larger ones are error rows, refused before they are opened "
        "(a URI's size comes from the file system or the S3 response headers, so it is never downloaded). Every "
        "image is held in memory in the CPU stage, so this bounds its memory per row."))
    temperature: float = Field(0.0, ge=0, le=100, allow_inf_nan=False, description=(
        "0: greedy decoding (the official behaviour: the most likely token every step, deterministic). > 0: sample "
        "from softmax(logits / temperature); higher is more varied and less accurate. Sampling is reproducible per "
        "row: each row draws from its own generator seeded by its `seed` column, else a hash of job_id and row id, "
        "so its answer does not depend on its batch-mates (on one device type)."))
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False, description=(
        "Nucleus sampling (with temperature > 0): sample only among the most likely tokens whose probabilities sum "
        "to top_p. Lower cuts the unlikely tail (fewer derailed answers, less variety); 1.0 keeps every token; a "
        "tiny value keeps only the most likely token, which is greedy decoding. Ignored when temperature is 0."))


class ResourcesSpec(_Frozen):
    workers: int = Field(1, ge=1, le=4096, description=(
        "Actors in the task's pool, all started up front (each loads the model once: startup cost and memory "
        "grow with it, throughput too while the input keeps them busy)."))
    gpus_per_worker: float = Field(1.0, ge=0, le=16, description=(
        "GPUs per actor. 1 is the usual; a fraction packs several actors on one GPU (more throughput for small "
        "models, shared memory); 0 runs on CPU (tests, demos)."))
    cpus_per_worker: float = Field(1.0, gt=0, le=256, description=(
        "Logical CPUs per actor, fractional allowed. Keep the pool's total below the cluster's CPUs: the read, "
        "validation and write stages need CPUs too, or the job stalls."))
    batch_size: int = Field(8, ge=1, le=4096, description=(
        "Rows per model call. Larger batches raise GPU throughput until memory runs out; smaller ones lose "
        "less work to a failure or timeout and stream results sooner."))
    batch_timeout_s: float | None = Field(None, gt=0, description=(
        "Wall-clock limit per batch; rows of a batch past it come back as error rows (T2I stops at the next "
        "step, VQA finishes in the background). None: no limit. Too tight a limit turns slow batches into errors."))
    custom: dict[str, float] = Field(default_factory=dict, description=(
        "Custom Ray resources per actor, e.g. {t2i: 1}: the pool then runs only on nodes that advertise them "
        "(ray_cluster.yaml gives each GPU node type its task's resource), so an autoscaling cluster starts the "
        "node type the task needs and a t2i pool never holds a vqa node. Empty (the default): any node with the "
        "GPUs and CPUs. A local Ray has no custom resources: a spec that asks for them runs only on a cluster."))

    @field_validator("custom")
    @classmethod
    def _custom(cls, v):
        for name, amount in v.items():
            if name in ("CPU", "GPU", "memory", "object_store_memory") or not re.match(r"^[A-Za-z0-9_.:/-]+$", name):
                raise ValueError(f"got resource name {name!r}; expected a custom resource name (letters, digits, "
                                 f"'_.:/-') other than CPU, GPU, memory (use cpus_per_worker / gpus_per_worker).")
            if not (0 < amount <= 1 or (amount > 1 and amount == int(amount))):  # Ray's rule for quantities
                raise ValueError(f"{name}: got {amount:g}; expected a fraction in (0, 1] or a whole number.")
        return v


class _TaskBase(_Frozen):
    name: str | None = Field(None, pattern=_ID_PATTERN, description=(
        "Output folder name under <output>/<job_id>/; defaults to the kind. Needed only when two tasks share a "
        "kind. Changing it later starts the task over (ids are tracked per folder)."))
    input: InputSpec = Field(..., description="Where the rows come from.")
    output: str = Field(..., description=(
        "Output root (local path or s3:// prefix); results go to <output>/<job_id>/<name>/. Keep it stable across "
        "re-runs: committed rows are found there and skipped."))
    rows_per_file: int = Field(64, ge=1, le=100_000, description=(
        "Rows per committed Parquet file. More rows make fewer, larger objects (cheaper listing and reading); "
        "fewer rows commit sooner, so a crash loses less finished work."))
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec, description="The task's actor pool.")

    @field_validator("output")
    @classmethod
    def _output(cls, v):
        problem = _prefix_problem(v)
        if problem:
            raise ValueError(f"got {v!r}; {problem}.")
        return v

    @property
    def task_name(self) -> str:
        return self.name or self.kind

    def _check_columns(self, known: dict):
        unknown = sorted(set(self.input.columns) - set(known))
        if unknown:
            raise ValueError(f"input.columns maps {unknown}, which a {self.kind} task does not read; "
                             f"it reads {sorted(known)}.")


class T2ITask(_TaskBase):
    kind: Literal["t2i"] = Field(..., description="Text to image: prompt rows in, PNG rows out.")
    params: T2IParams = Field(default_factory=T2IParams, description="Generation parameters.")

    @model_validator(mode="after")
    def _columns(self):
        self._check_columns(T2I_COLUMNS)
        return self


class VQATask(_TaskBase):
    kind: Literal["vqa"] = Field(..., description="Visual question answering: image + question rows in, answers out.")
    params: VQAParams = Field(default_factory=VQAParams, description="Decoding parameters.")

    @model_validator(mode="after")
    def _columns(self):
        self._check_columns(VQA_COLUMNS)
        return self


Task = Annotated[Union[T2ITask, VQATask], Field(discriminator="kind")]


class JobSpec(_Frozen):
    job_id: str = Field(..., pattern=_ID_PATTERN, description=(
        "Names the job's outputs (<output>/<job_id>/...) and its identity for re-runs: the same id resumes and "
        "skips committed rows; a new id starts over. Letters, digits, '.', '_', '-'."))
    model: ModelSpec = Field(..., description="The Show-o2 checkpoint and its task specialists.")
    storage: StorageSpec = Field(default_factory=StorageSpec, description="S3 client settings (no credentials).")
    tasks: list[Task] = Field(..., min_length=1, description=(
        "The tasks, run one after another in this order, each with the whole cluster for its actor pool."))

    @model_validator(mode="after")
    def _cross_checks(self):
        names = [t.task_name for t in self.tasks]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"tasks: output names {dupes} repeat; give tasks of the same kind distinct `name`s "
                             f"(each writes <output>/<job_id>/<name>/).")
        allowed = self.storage.allowed_outputs
        for i, task in enumerate(self.tasks):
            if allowed is not None and not any(_under(task.output, prefix) for prefix in allowed):
                raise ValueError(f"tasks[{i}].output: got {task.output!r}, which is outside storage.allowed_outputs "
                                 f"{allowed}; write under one of those prefixes, or add this one to the list.")
            if task.kind == "t2i" and self.model.specialization.t2i and task.params.steps is not None:
                raise ValueError(f"tasks[{i}].params.steps: got {task.params.steps} with a FlashU t2i specialist, "
                                 f"whose plan fixes the step count; remove steps (the artifact's is used) or drop "
                                 f"model.specialization.t2i.")
        return self

    def locations(self) -> list[str]:
        """Every file, folder or prefix the job reads or writes (the checkpoint, artifacts, inputs, outputs)."""
        artifacts = [a for a in (self.model.specialization.t2i, self.model.specialization.vqa)
                     if a and a != "on_start"]
        return [self.model.checkpoint, *artifacts, *(u for t in self.tasks for u in t.input.uris),
                *(t.output for t in self.tasks)]

    def task(self, name: str):
        for task in self.tasks:
            if task.task_name == name:
                return task
        raise KeyError(f"no task named {name!r}; tasks: {[t.task_name for t in self.tasks]}")


# ---- the edge: files and dicts in, JobSpec or one SpecError out ------------------------------------------------------

def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("t2i", "vqa") and out.endswith("]"):
            continue  # the discriminated union's branch name adds nothing: tasks[0].t2i.params -> tasks[0].params
        else:
            out += ("." if out else "") + str(part)
    return out or "spec"


def format_errors(err: ValidationError, prefix: str = "", what: str = "job spec") -> str:
    """One line per bad field, `<field path>: <what was wrong>`; `prefix` names where the validated value sits (for a
    part validated on its own, such as build_processor's `params`)."""
    lines = []
    for e in err.errors(include_url=False):
        loc, msg = _loc(((prefix,) if prefix else ()) + tuple(e["loc"])), e["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        if e["type"] in ("union_tag_invalid", "union_tag_not_found"):
            got = e.get("ctx", {}).get("tag")
            loc, msg = f"{loc}.kind", (f"got {got!r}; " if got is not None else "missing; ") + "expected 't2i' or 'vqa'"
        elif e["type"] == "extra_forbidden":  # the value is not echoed: a misplaced key may hold a secret
            msg = "unknown field (not part of the spec; check the spelling and nesting)"
        elif e["type"] not in ("value_error", "missing") and "input" in e:
            shown = repr(e["input"])
            msg += f" (got {shown[:80] + '...' if len(shown) > 80 else shown})"
        lines.append(msg if loc == "spec" and e["type"] == "value_error" else f"{loc}: {msg}")
    return f"invalid {what}:\n  " + "\n  ".join(lines)


def _resolve(path: str | None, base: str) -> str | None:
    if path is None or "://" in path or os.path.isabs(path):
        return path  # URIs and absolute paths are left for the validators to judge
    return os.path.normpath(os.path.join(base, os.path.expanduser(path)))


def _resolve_paths(raw: dict, base: str) -> dict:
    """Relative local paths in a raw spec -> absolute, against `base` (the spec file's folder); Hub ids of the model
    (org/name[@revision], hf://...) are kept as they are."""
    raw = json.loads(json.dumps(raw))  # a deep copy of plain data
    model = raw.get("model")
    if isinstance(model, dict):
        for key in ("checkpoint", "vae_path", "tokenizer_path"):
            value = model.get(key)
            if isinstance(value, str):  # hf:// references hold "://": _resolve leaves them as they are
                model[key] = _resolve(value, base)
                # A Hub id (org/name[@revision]) stays as it is when no local path by that name exists under base (an
                # existing local path wins). Not for the VAE: a bare a/b.pth is always a local file.
                if key != "vae_path" and not os.path.exists(model[key]) and is_hub_id(value):
                    model[key] = value
        spec = model.get("specialization")
        if isinstance(spec, dict):
            for key, value in spec.items():
                if isinstance(value, str) and value != "on_start":  # the keyword, not a path
                    spec[key] = _resolve(value, base)
    storage = raw.get("storage")
    if isinstance(storage, dict) and isinstance(storage.get("allowed_outputs"), list):
        storage["allowed_outputs"] = [_resolve(p, base) if isinstance(p, str) and p else p
                                      for p in storage["allowed_outputs"]]
    for task in raw.get("tasks") or []:
        if not isinstance(task, dict):
            continue
        if isinstance(task.get("output"), str) and task["output"]:
            task["output"] = _resolve(task["output"], base)
        inp = task.get("input")
        if isinstance(inp, dict):
            uris = inp.get("uris")
            if isinstance(uris, str) and uris:
                inp["uris"] = _resolve(uris, base)
            elif isinstance(uris, list):
                inp["uris"] = [_resolve(u, base) if isinstance(u, str) and u else u for u in uris]
    return raw


def parse_spec(raw, base_dir: str | None = None) -> JobSpec:
    """A raw dict (from YAML/JSON) -> JobSpec; relative paths resolve against base_dir (default: the cwd)."""
    if not isinstance(raw, dict):
        raise SpecError(f"invalid job spec: expected a mapping at the top level, got {type(raw).__name__}.")
    try:
        return JobSpec.model_validate(_resolve_paths(raw, base_dir or os.getcwd()))
    except ValidationError as e:
        raise SpecError(format_errors(e)) from None


def load_spec(path: str) -> JobSpec:
    """Read a YAML (.yaml/.yml) or JSON spec file and validate it; relative paths resolve against its folder."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise SpecError(f"cannot read job spec {path!r}: {e.strerror or e}") from None
    try:
        if path.endswith((".yaml", ".yml")):
            import yaml

            raw = yaml.safe_load(text)
        else:
            raw = json.loads(text)
    except Exception as e:  # yaml.YAMLError / json.JSONDecodeError: the parser's message has the line and column
        raise SpecError(f"cannot parse job spec {path!r}: {e}") from None
    return parse_spec(raw, os.path.dirname(os.path.abspath(path)))
