"""Shared by the batch-system tests (tests/jobs, tests/workers, tests/scheduler): a real S3 server process
(moto_server on a free loopback port, one per test session, stopped by its own PID) and small spec builders."""

import atexit
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

_SERVER: dict = {}


def s3_server() -> str:
    """The endpoint URL of this session's moto_server, started on first use (127.0.0.1 only)."""
    if "url" in _SERVER:
        return _SERVER["url"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    atexit.register(_stop, proc.pid)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=2).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"moto_server did not start on {url} (exit code {proc.poll()})")
            time.sleep(0.2)
    # Fake credentials for the fake server, in the environment (never in a spec); Ray workers inherit them.
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    _SERVER.update(url=url, pid=proc.pid, proc=proc)
    return url


def stop_s3_server() -> None:
    if "pid" in _SERVER:
        _stop(_SERVER.pop("pid"))
        _SERVER.pop("proc").wait(timeout=30)
        _SERVER.clear()


def _stop(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGTERM)  # this server's own PID, nothing found by name
    except ProcessLookupError:
        pass


def make_bucket(url: str, name: str) -> str:
    from flashu_batch.jobs.spec import StorageSpec
    from flashu_batch.jobs.storage import Storage

    client = Storage(StorageSpec(endpoint_url=url, path_style=True)).s3_client()
    try:
        client.create_bucket(Bucket=name)
    except client.exceptions.BucketAlreadyOwnedByYou:
        pass
    return f"s3://{name}"


def spec_dict(job_id: str, checkpoint: str, tasks: list[dict], endpoint: str | None = None) -> dict:
    """A small CPU job spec: float32 tiny model, one worker, fractional CPUs."""
    storage = dict(endpoint_url=endpoint, path_style=True) if endpoint else {}
    for task in tasks:
        task.setdefault("resources", dict(workers=1, gpus_per_worker=0, cpus_per_worker=0.5, batch_size=2))
    return dict(job_id=job_id, model=dict(checkpoint=checkpoint, dtype="float32", device="cpu"), storage=storage,
                tasks=tasks)


_CHECKPOINT: dict = {}


def tiny_checkpoint(root: str) -> str:
    """One tiny random-weight Show-o2 checkpoint per test session (with tokenizer and VAE)."""
    if "path" not in _CHECKPOINT:
        from flashu_batch.showo2.tiny import build_tiny_checkpoint

        _CHECKPOINT["path"] = build_tiny_checkpoint(os.path.join(root, "tiny-checkpoint"))
    return _CHECKPOINT["path"]


def png_bytes(color=(255, 0, 0), size=(40, 30)) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def build_worker(worker_cls, spec, task_name: str, **model_updates):
    """A worker built as the pipeline builds it (scheduler.pipeline.worker_kwargs): from the spec's model (with
    model_updates, e.g. compile="on") and the task's params and resources."""
    from flashu_batch.scheduler.pipeline import worker_kwargs

    task = spec.task(task_name)
    model = spec.model.model_copy(update=model_updates) if model_updates else spec.model
    return worker_cls(**worker_kwargs(model, task.params, task.resources, spec.storage, spec.job_id))


def run(worker, batch) -> dict:
    """A worker's output on `batch` as {column: list}."""
    return worker(batch).to_pydict()


def hub_cache(root: str, repo_id: str, folder: str) -> tuple[str, str]:
    """Put `folder`'s files into a Hugging Face cache under `root` as the Hub repository `repo_id` at its main branch,
    in the layout huggingface_hub writes (hub/models--org--name/{blobs/<sha256>, snapshots/<commit>/<path> -> relative
    links to the blobs, refs/main}), so that HF_HOME=<hf_home> with HF_HUB_OFFLINE=1 loads it with no network.
    Returns (hf_home, commit); the commit is derived from the files, so the same folder always gets the same one.
    Several repositories may share one root."""
    import hashlib
    import shutil

    files = sorted(os.path.relpath(os.path.join(d, n), folder) for d, _, names in os.walk(folder) for n in names)
    digests = {}
    for rel in files:
        with open(os.path.join(folder, rel), "rb") as f:
            digests[rel] = hashlib.sha256(f.read()).hexdigest()
    commit = hashlib.sha1("".join(f"{rel}\0{digests[rel]}\n" for rel in files).encode()).hexdigest()
    hf_home = os.path.join(root, "hf_home")
    repo = os.path.join(hf_home, "hub", "models--" + repo_id.replace("/", "--"))
    os.makedirs(os.path.join(repo, "blobs"), exist_ok=True)
    for rel in files:
        blob = os.path.join(repo, "blobs", digests[rel])
        if not os.path.exists(blob):
            shutil.copyfile(os.path.join(folder, rel), blob)
        link = os.path.join(repo, "snapshots", commit, rel)
        os.makedirs(os.path.dirname(link), exist_ok=True)
        if not os.path.lexists(link):
            os.symlink(os.path.relpath(blob, os.path.dirname(link)), link)
    os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write(commit)  # no newline, as huggingface_hub writes it
    return hf_home, commit


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (from /proc): the local Ray a driver started."""
    children: dict[int, list[int]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def task_output(request, tmp_path, bucket: str):
    """A VQA TaskOutput under tmp_path (request.param "local") or in a bucket of the session's S3 server ("s3")."""
    from flashu_batch.jobs.output import TaskOutput
    from flashu_batch.jobs.spec import StorageSpec
    from flashu_batch.jobs.storage import Storage, join

    if request.param == "local":
        return TaskOutput(Storage(), str(tmp_path / "job" / "vqa"))
    url = request.getfixturevalue("s3_endpoint")
    storage = Storage(StorageSpec(endpoint_url=url, path_style=True))
    return TaskOutput(storage, join(make_bucket(url, bucket), tmp_path.name, "job", "vqa"))


def vqa_rows(ids, error_ids=()):
    """VQA result rows for `ids`, those in error_ids failed."""
    import pyarrow as pa

    from flashu_batch.jobs.output import VQA_SCHEMA

    return pa.Table.from_pylist([dict(id=i, question="q", answer=None if i in error_ids else f"a{i}",
                                      error="bad" if i in error_ids else None) for i in ids], schema=VQA_SCHEMA)


def count_tokenizer_calls(monkeypatch, pipe) -> list:
    """The texts `pipe`'s tokenizer is called on from now on (the list fills as it is called)."""
    tokenizer, texts = pipe.tokenizer, []

    class Counting:
        def __call__(self, text, **kwargs):
            texts.append(text)
            return tokenizer(text, **kwargs)

        def __getattr__(self, name):
            return getattr(tokenizer, name)

    monkeypatch.setattr(pipe, "tokenizer", Counting())
    return texts


def folder_snapshot(root: str) -> dict:
    """Every file under a folder, by its path below it: (bytes, mtime in ns). Equal snapshots: nothing was written."""
    found = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, root)] = (f.read(), os.stat(path).st_mtime_ns)
    return found
