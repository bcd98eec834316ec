"""`flashu-batch validate`: everything `run` checks before any model work, without starting Ray.

A job that cannot run should fail in seconds with every reason at once, not minutes later in a worker: the S3
endpoint and buckets, the model folder (config.json, VAE, tokenizer) and FlashU artifacts, every input file (listed,
opened and its rows counted), and the output locations. `check_job` returns one line per problem (`run` calls it
before Ray starts); `plan_lines` describes what the job would do.

    review = review_job(spec)          # problems + per-input row counts, read once
    print("\n".join(plan_lines(spec, review)))
"""

import json
import os
from dataclasses import dataclass, field

from flashu_batch.jobs.output import TaskOutput, task_root
from flashu_batch.jobs.spec import JobSpec
from flashu_batch.jobs.storage import Storage, StorageUnreachable, is_s3, join, split_s3
from flashu_batch.workers.common import SPECIALIZE_ON_START

COUNT_CHUNK = 8 << 20  # bytes read at a time when counting JSONL lines: a big file is never held whole


@dataclass
class JobReview:
    problems: list[str] = field(default_factory=list)  # one line each, fit for stderr
    # task name -> [(input uri as written, files found, rows or None when not counted / unreadable)]
    inputs: dict[str, list[tuple[str, int, int | None]]] = field(default_factory=dict)
    unreachable: bool = False  # the S3 endpoint did not answer: nothing on S3 was looked at
    missing_buckets: set = field(default_factory=set)  # named once each, and nothing in them is looked at


def check_job(spec: JobSpec, count_rows: bool = True, local: bool = False) -> list[str]:
    """One line per reason the job cannot run ([] when it can). count_rows=False only opens each input file
    instead of counting its rows (`run` reads every row in its own pre-pass anyway). local: the job is to run on a
    local Ray started for it, which has no custom resources."""
    return review_job(spec, count_rows, local).problems


def review_job(spec: JobSpec, count_rows: bool = True, local: bool = False) -> JobReview:
    from flashu_batch.scheduler.driver import local_resources_problem

    storage, review = Storage(spec.storage), JobReview()
    problem = local_resources_problem(spec) if local else None
    if problem:
        review.problems.append(problem)
    _check_buckets(spec, storage, review)
    _check_model(spec, storage, review)
    for task in spec.tasks:
        review.inputs[task.task_name] = _check_inputs(task, storage, review, count_rows)
        _check_output(task, storage, review)
    return review


# ---- locations ---------------------------------------------------------------------------------------------------

def labelled_locations(spec: JobSpec) -> list[tuple[str, str]]:
    """(what the spec uses it for, uri) for every location of the job (the labels name the spec's fields)."""
    out = [("model.checkpoint", spec.model.checkpoint)]
    for kind in ("t2i", "vqa"):
        artifact = getattr(spec.model.specialization, kind)
        if artifact and artifact != SPECIALIZE_ON_START:
            out.append((f"model.specialization.{kind}", artifact))
    for task in spec.tasks:
        out += [(f"task {task.task_name!r} input", uri) for uri in task.input.uris]
        out.append((f"task {task.task_name!r} output", task.output))
    return out


def _check_buckets(spec: JobSpec, storage: Storage, review: JobReview) -> None:
    """One probe per bucket (Storage.check_reachable, as run_job does). When the endpoint itself does not answer,
    one line says so and no other S3 check is made (each would time out again)."""
    users: dict[str, list[str]] = {}
    for label, uri in labelled_locations(spec):
        if is_s3(uri):
            users.setdefault(split_s3(uri)[0], []).append(label)
    for bucket, labels in sorted(users.items()):
        try:
            storage.check_reachable([f"s3://{bucket}"])
        except StorageUnreachable as e:
            review.problems.append(_one_line(e))
            review.unreachable = True
            return
        except FileNotFoundError as e:
            review.problems.append(f"{', '.join(dict.fromkeys(labels))}: {_one_line(e)}")
            review.missing_buckets.add(bucket)


def _skipped(uri: str, review: JobReview) -> bool:
    """S3 locations behind a dead endpoint or in a missing bucket: already reported, not looked at again."""
    return is_s3(uri) and (review.unreachable or split_s3(uri)[0] in review.missing_buckets)


def _exists(storage: Storage, uri: str) -> bool | str:
    """Whether `uri` exists, or why that could not be told (e.g. S3 refused the HEAD: 403)."""
    try:
        return storage.exists(uri)
    except Exception as e:  # noqa: BLE001 -- any answer but yes/no is a problem to show, not a crash
        return f"could not be checked ({type(e).__name__}: {_one_line(e)})"


def _one_line(e) -> str:
    return " ".join(str(e).split())


# ---- model -------------------------------------------------------------------------------------------------------

def _check_model(spec: JobSpec, storage: Storage, review: JobReview) -> None:
    model = spec.model
    if not _skipped(model.checkpoint, review):
        _check_checkpoint(model, storage, review.problems)
    for kind in ("t2i", "vqa"):
        artifact = getattr(model.specialization, kind)
        if artifact and artifact != SPECIALIZE_ON_START and not _skipped(artifact, review):
            _check_artifact(kind, artifact, storage, review.problems, model.checkpoint)


def _check_checkpoint(model, storage: Storage, problems: list[str]) -> None:
    """The checkpoint, VAE and tokenizer the workers will load (workers/common.py load_pipeline, showo2/hub.py
    resolve_sources): local and s3:// files where they look, Hub references available (online, or in the local
    cache with HF_HUB_OFFLINE=1), and the official VAE and tokenizer where the checkpoint brings none."""
    from flashu_batch.showo2.hub import DEFAULT_TOKENIZERS, DEFAULT_VAE, parse_ref
    from flashu_batch.showo2.loading import VAE_FILE

    ckpt = model.checkpoint
    if parse_ref(ckpt) is not None:  # the Hub: is it there; its own VAE and tokenizer are the workers' to find
        _check_hub(parse_ref(ckpt), "checkpoint", "model.checkpoint", problems)
        for name, value, what in (("model.vae_path", model.vae_path, "file"),
                                  ("model.tokenizer_path", model.tokenizer_path, "tokenizer")):
            if value and parse_ref(value, file=what == "file") is not None:
                _check_hub(parse_ref(value, file=what == "file"), what, name, problems)
        return
    if not is_s3(ckpt) and not os.path.isdir(ckpt):
        problems.append(f"model.checkpoint: {ckpt!r} is not a folder; expected a Show-o2 checkpoint folder (with "
                        f"config.json), an s3:// prefix or a Hub id (org/name, hf://org/name[@revision]). Relative "
                        f"paths start at the spec file's folder.")
        return
    found = _exists(storage, join(ckpt, "config.json"))
    if found is not True:
        problems.append(f"model.checkpoint: {ckpt!r} has no config.json{'' if found is False else ': ' + found}; "
                        f"point it at a Show-o2 checkpoint folder (config.json, llm/, siglip/, weights).")
        return
    if model.vae_path and parse_ref(model.vae_path, file=True) is not None:
        _check_hub(parse_ref(model.vae_path, file=True), "file", "model.vae_path", problems)
    elif model.vae_path or _exists(storage, join(ckpt, VAE_FILE)) is True:
        vae = model.vae_path or join(ckpt, VAE_FILE)
        found = _exists(storage, vae)
        if found is not True:
            problems.append(f"model.vae_path: no VAE at {vae!r}{'' if found is False else ': ' + found}; set "
                            f"model.vae_path to the {VAE_FILE} file (a local path or hf://org/name/file).")
    else:  # none in the checkpoint: the official one, from the Hub
        _check_hub(DEFAULT_VAE, "file", f"model.vae_path (unset, and {ckpt!r} has no {VAE_FILE}: the default)",
                   problems)
    if model.tokenizer_path and parse_ref(model.tokenizer_path) is not None:
        _check_hub(parse_ref(model.tokenizer_path), "tokenizer", "model.tokenizer_path", problems)
        return
    tokenizer_places = [model.tokenizer_path] if model.tokenizer_path else [ckpt, join(ckpt, "tokenizer")]
    candidates = [join(p, name) for p in tokenizer_places for name in ("tokenizer.json", "tokenizer_config.json")]
    if any(_exists(storage, uri) is True for uri in candidates):
        return
    default = None if model.tokenizer_path else DEFAULT_TOKENIZERS.get(_hidden_size(storage, ckpt))
    if default is not None:
        _check_hub(default, "tokenizer", "model.tokenizer_path (unset: the default for this model size)", problems)
        return
    where = "model.tokenizer_path" if model.tokenizer_path else "model.checkpoint"
    problems.append(f"{where}: no tokenizer.json or tokenizer_config.json in {tokenizer_places}; set "
                    f"model.tokenizer_path to a Qwen2.5 tokenizer folder or Hub id.")


def _check_hub(ref, what: str, field: str, problems: list[str]) -> None:
    from flashu_batch.showo2.hub import HubError, check_available

    try:
        check_available(ref, what)
    except HubError as e:
        problems.append(f"{field}: {e}")


def _hidden_size(storage: Storage, checkpoint: str) -> int | None:
    try:
        raw = json.loads(storage.read_bytes(join(checkpoint, "config.json")))
    except Exception:  # noqa: BLE001 -- no default then; the config's own problems are reported elsewhere
        return None
    return raw.get("hidden_size") if isinstance(raw, dict) else None


def _check_artifact(kind: str, artifact: str, storage: Storage, problems: list[str], checkpoint: str) -> None:
    """The artifact's meta file is there and names its format and task (flashu/artifact.py read_artifact); its
    fingerprint check against the checkpoint needs the weights and stays with the workers."""
    from flashu_batch.flashu.artifact import FORMAT

    label, meta_uri = f"model.specialization.{kind}", join(artifact, f"flashu_{kind}.json")
    make = f"make one with `flashu-batch specialize --task {kind} --checkpoint ... --out {artifact}`"
    if not is_s3(artifact) and not os.path.isdir(artifact):
        problems.append(f"{label}: artifact folder {artifact!r} does not exist; {make}, or set it to 'on_start' "
                        f"(calibrate in each worker) or null (the exact baseline).")
        return
    try:
        meta = json.loads(storage.read_bytes(meta_uri))
    except FileNotFoundError:
        problems.append(f"{label}: {artifact!r} has no flashu_{kind}.json, so it is not a {kind} artifact; {make}.")
        return
    except Exception as e:  # noqa: BLE001 -- unreadable or not JSON: say which, with the reader's words
        problems.append(f"{label}: {meta_uri!r} could not be read ({type(e).__name__}: {_one_line(e)}); {make}.")
        return
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("task") != kind:
        got = (meta.get("format"), meta.get("task")) if isinstance(meta, dict) else type(meta).__name__
        problems.append(f"{label}: {meta_uri!r} is not a {FORMAT} {kind!r} artifact (format, task: {got}); {make}.")
        return
    made_for = meta.get("checkpoint_files")  # {file: bytes}; artifacts made before it existed are left to the workers
    if isinstance(made_for, dict) and (is_s3(checkpoint) or os.path.isdir(checkpoint)):
        sizes = {f: _size(storage, join(checkpoint, f)) for f in made_for}
        differ = sorted(f for f, size in made_for.items() if sizes[f] != size)
        if differ:
            problems.append(f"{label}: the artifact {artifact!r} was made for another checkpoint than {checkpoint!r} "
                            f"(its {', '.join(differ[:3])} differ in size or are missing); {make} on this checkpoint.")


def _size(storage: Storage, uri: str) -> int | None:
    if is_s3(uri):
        listed = [f for f in storage.list(uri) if f["uri"] == uri]
        return listed[0]["size"] if listed else None
    return os.path.getsize(uri) if os.path.isfile(uri) else None


# ---- inputs and outputs ------------------------------------------------------------------------------------------

def _check_inputs(task, storage: Storage, review: JobReview, count_rows: bool) -> list:
    """[(uri, files, rows)] per input uri, each planned on its own so one bad uri does not hide the others."""
    out = []
    for uri in task.input.uris:
        files = [] if _skipped(uri, review) else _input_files(task, uri, storage, review.problems)
        rows = _input_rows(task, files, storage, review.problems) if files and count_rows else None
        if files and not count_rows:
            _open_all(task, files, storage, review.problems)
        out.append((uri, len(files), rows))
    return out


def _input_files(task, uri: str, storage: Storage, problems: list[str]) -> list[str]:
    """The files scheduler/read.py plan_reads finds for one input uri ([] and a problem line if it refuses it)."""
    from flashu_batch.scheduler.read import plan_reads

    try:
        units = plan_reads(storage, task.input.model_copy(update={"uris": [uri]}))
    except Exception as e:  # noqa: BLE001 -- missing, empty, not Parquet, refused: each is one line
        said = _one_line(e)  # plan_reads' own errors name the uri; others (pyarrow's) may not
        problems.append(f"task {task.task_name!r}: {said if uri in said else f'input {uri!r}: {said}'}")
        return []
    return list(dict.fromkeys(unit["uri"] for unit in units))


def _input_rows(task, files: list[str], storage: Storage, problems: list[str]) -> int | None:
    """The rows of the files (None, and a problem line, when one cannot be read)."""
    rows = 0
    for uri in files:
        try:
            rows += file_rows(storage, uri, task.input.format)
        except Exception as e:  # noqa: BLE001 -- listed but unreadable (permissions, vanished, ...)
            problems.append(_unreadable(task, uri, e))
            return None
    return rows


def _open_all(task, files: list[str], storage: Storage, problems: list[str]) -> None:
    """Each file opens and yields a byte (a listed file may still refuse reads); cheaper than counting."""
    for uri in files:
        fs, path = storage.arrow_fs(uri)
        try:
            with fs.open_input_stream(path) as f:
                f.read(1)
        except Exception as e:  # noqa: BLE001 -- as in _input_rows
            problems.append(_unreadable(task, uri, e))
            return


def _unreadable(task, uri: str, e: Exception) -> str:
    return f"task {task.task_name!r}: input file {uri!r} could not be read ({type(e).__name__}: {_one_line(e)})"


def file_rows(storage: Storage, uri: str, fmt: str) -> int:
    """Rows the reader will yield for one input file, read cheaply: Parquet from its footer, JSONL as non-blank
    lines (scheduler/read.py skips blank ones), CSV through the same parser the reader uses."""
    fs, path = storage.arrow_fs(uri)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        with fs.open_input_file(path) as f:
            return pq.ParquetFile(f).metadata.num_rows
    if fmt == "csv":  # quoted fields may hold newlines: only the parser knows where a row ends
        from flashu_batch.scheduler.read import raw_rows

        return sum(1 for _ in raw_rows(dict(uri=uri), "csv", {}, storage))
    return _jsonl_rows(fs, path)


def _jsonl_rows(fs, path: str) -> int:
    rows, tail, first = 0, b"", True
    with fs.open_input_stream(path) as f:
        while chunk := f.read(COUNT_CHUNK):
            if first:  # a BOM is no data (read.py drops it too)
                chunk, first = chunk.removeprefix(b"\xef\xbb\xbf"), False
            lines = (tail + chunk).split(b"\n")
            tail = lines.pop()
            rows += sum(1 for line in lines if _has_text(line))
    return rows + _has_text(tail)


def _has_text(line: bytes) -> bool:
    # decoded as read.py decodes it: str.strip() also strips non-ASCII spaces, which bytes.strip() keeps
    return bool(line.strip()) and bool(line.decode("utf-8", errors="surrogateescape").strip())


def _check_output(task, storage: Storage, review: JobReview) -> None:
    """S3 outputs were probed with their bucket; a local output's nearest existing folder must be writable."""
    if is_s3(task.output):
        return
    at = os.path.abspath(task.output)
    while not os.path.exists(at):
        at = os.path.dirname(at)
    if not os.path.isdir(at):
        review.problems.append(f"task {task.task_name!r}: output {task.output!r} cannot be created: {at!r} is a "
                               f"file. Choose another output folder.")
    elif not os.access(at, os.W_OK | os.X_OK):
        review.problems.append(f"task {task.task_name!r}: output {task.output!r} is not writable (no write "
                               f"permission on {at!r}). Choose another output folder or fix its permissions.")


# ---- the plan ----------------------------------------------------------------------------------------------------

def plan_lines(spec: JobSpec, review: JobReview | None = None) -> list[str]:
    """What the job would do: per task its kind, inputs and row counts, output folder, params, resources, and the
    rows committed by earlier runs. `review` (from review_job) saves reading the inputs again."""
    review = review or review_job(spec)
    model, storage = spec.model, Storage(spec.storage)
    special = {k: getattr(model.specialization, k) for k in ("t2i", "vqa") if getattr(model.specialization, k)}
    lines = [f"job {spec.job_id}: {len(spec.tasks)} task(s), run in this order",
             f"  model: {model.checkpoint} ({model.dtype}, device {model.device}); FlashU: "
             + (", ".join(f"{k} {v}" for k, v in special.items()) or "none (the exact baseline)")]
    for task in spec.tasks:
        lines += _task_lines(spec, task, review, storage)
    return lines


def _task_lines(spec: JobSpec, task, review: JobReview, storage: Storage) -> list[str]:
    res = task.resources
    lines = [f"  task {task.task_name} ({task.kind}):"]
    for uri, files, rows in review.inputs.get(task.task_name, []):
        shown = "rows not counted" if rows is None else f"{rows} rows"
        lines.append(f"    input {uri} ({task.input.format}, {files} file{'' if files == 1 else 's'}): {shown}")
    root = task_root(task.output, spec.job_id, task.task_name)
    lines.append(f"    output {root}: {_committed(storage, root, review)}; {task.rows_per_file} rows per file")
    lines.append("    params: " + ", ".join(f"{k}={v}" for k, v in task.params.model_dump().items()))
    extra = "".join([f", batch timeout {res.batch_timeout_s:g}s" if res.batch_timeout_s else "",
                     f", custom resources {res.custom} per worker (a cluster's node types)" if res.custom else ""])
    lines.append(f"    resources: {res.workers} worker{'' if res.workers == 1 else 's'} x batch {res.batch_size}, "
                 f"{res.gpus_per_worker:g} GPUs and {res.cpus_per_worker:g} CPUs per worker{extra}")
    return lines


def _committed(storage: Storage, root: str, review: JobReview) -> str:
    if _skipped(root, review):
        return "committed rows unknown (its S3 bucket is missing or unreachable)"
    try:
        rows = committed_rows(TaskOutput(storage, root))
    except Exception as e:  # noqa: BLE001 -- the plan still prints; the problem lines say what is wrong
        return f"committed rows unknown ({type(e).__name__})"
    return f"{rows} rows committed by earlier runs (skipped)" if rows else "nothing committed yet"


def committed_rows(output: TaskOutput) -> int:
    """Rows committed in a task folder, without holding its ids (a task may have billions): the manifest's count when
    the last finalize saw every commit record there is, else the records' counts summed record by record (a row
    committed twice, which finalize would remove, counts twice)."""
    manifest = output.current_manifest()
    return manifest["rows"] if manifest else sum(record["rows"] for record in output.iter_commits())
