"""AWS credentials from the environment never appear in anything a job writes: its stdout and stderr, Ray's session
logs, the output objects (data, commit records, _SUCCESS, metrics.json), error rows and error messages.

`flashu-batch run` runs in its own process with recognisable secrets in its environment and a dedicated Ray temp
folder, through a good job with bad rows, specs that carry a credential (a field, an endpoint URL's user:password@),
and an unreachable endpoint; then every byte written is searched."""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import urllib.parse

import pyarrow as pa
import pyarrow.parquet as pq

from batch_testkit import make_bucket, png_bytes, spec_dict
from flashu_batch.jobs.spec import StorageSpec
from flashu_batch.jobs.storage import Storage, join

SECRETS = dict(AWS_ACCESS_KEY_ID="AKIAFLASHULEAKCHECK7Q",
               AWS_SECRET_ACCESS_KEY="flashuSecret/LeakCheck+9f8e7d6c5b4a3210zyxw",
               AWS_SESSION_TOKEN="FlashuSessionToken//LeakCheck//0123456789abcdefFEDCBA")


def needles() -> list[bytes]:
    """Each secret as written, URL-quoted (a signed URL, a logged request) and, for the long ones, its halves."""
    out = set()
    for value in SECRETS.values():
        for form in (value, urllib.parse.quote(value, safe=""), urllib.parse.quote_plus(value)):
            out.add(form.encode())
        if len(value) >= 30:
            out.update({value[:len(value) // 2].encode(), value[len(value) // 2:].encode()})
    return sorted(out)


def leaks(data: bytes) -> list[str]:
    return [n.decode() for n in needles() if n in data]


def run_cli(spec_path: str, ray_tmp: str, cwd: str, timeout: int = 420) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray, not the session's
    env.update(SECRETS, RAY_TMPDIR=ray_tmp)
    return subprocess.run([sys.executable, "-m", "flashu_batch.app.cli", "run", spec_path], env=env, cwd=cwd,
                          capture_output=True, timeout=timeout)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


def write_inputs(storage: Storage, base: str) -> dict:
    """t2i: two good prompts and an empty one; vqa: an image as bytes and one at an s3:// URI that does not exist
    (an error row whose message comes from the storage client)."""
    storage.write_bytes(join(base, "prompts.jsonl"), "".join(
        json.dumps({"id": f"p{i}", "prompt": p}) + "\n" for i, p in enumerate(["a red circle", "", "a cat"])).encode())
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({"id": ["q0", "q1"], "question": ["what color", "what shape"],
                      "image": pa.array([{"bytes": png_bytes(), "path": None},
                                         {"bytes": None, "path": join(base, "missing.png")}], image_type)})
    fs, path = storage.arrow_fs(join(base, "qa.parquet"))
    pq.write_table(table, path, filesystem=fs)
    return dict(t2i=join(base, "prompts.jsonl"), vqa=join(base, "qa.parquet"))


def test_aws_credentials_appear_nowhere_a_job_writes(checkpoint, s3_endpoint, tmp_path):
    storage = Storage(StorageSpec(endpoint_url=s3_endpoint, path_style=True))
    bucket = make_bucket(s3_endpoint, "credentials")
    inputs = write_inputs(storage, join(bucket, "in"))
    tasks = [dict(kind="t2i", input=dict(uris=inputs["t2i"], format="jsonl"), output=join(bucket, "out"),
                  params=dict(steps=2)),
             dict(kind="vqa", input=dict(uris=inputs["vqa"], format="parquet"), output=join(bucket, "out"),
                  params=dict(max_new_tokens=2))]
    good = spec_dict("creds", checkpoint, tasks, s3_endpoint)
    specs, cwd = tmp_path / "specs", tmp_path / "cwd"  # the specs are the test's; cwd gets anything the job writes
    specs.mkdir()
    cwd.mkdir()
    (specs / "good.json").write_text(json.dumps(good))
    # a careless spec: the secret pasted into the storage settings (refused, never echoed)
    (specs / "careless.json").write_text(json.dumps(dict(good, storage=dict(
        endpoint_url=s3_endpoint, aws_secret_access_key=SECRETS["AWS_SECRET_ACCESS_KEY"]))))
    (specs / "careless-url.json").write_text(json.dumps(dict(good, storage=dict(endpoint_url=s3_endpoint.replace(
        "://", f"://{SECRETS['AWS_ACCESS_KEY_ID']}:{urllib.parse.quote(SECRETS['AWS_SECRET_ACCESS_KEY'], safe='')}@"))
    )))
    (specs / "unreachable.json").write_text(json.dumps(dict(good, job_id="creds-unreachable", storage=dict(
        endpoint_url=f"http://127.0.0.1:{closed_port()}", path_style=True))))

    ray_tmp = tempfile.mkdtemp(prefix="fbc", dir="/tmp")  # short: Ray's socket paths must stay under 108 bytes
    try:
        runs = {name: run_cli(str(specs / f"{name}.json"), ray_tmp, str(cwd))
                for name in ("good", "careless", "careless-url", "unreachable")}

        # 1. The runs did what they should, so every path (rows, error rows, refusals, errors) was taken
        assert runs["good"].returncode == 0, runs["good"].stderr.decode()[-3000:]
        assert b"t2i: 3 rows (1 errors)" in runs["good"].stdout and b"vqa: 2 rows (1 errors)" in runs["good"].stdout
        assert runs["careless"].returncode == 2
        assert b"aws_secret_access_key: credentials are never read from a spec" in runs["careless"].stderr
        assert runs["careless-url"].returncode == 2 and b"storage.endpoint_url" in runs["careless-url"].stderr
        assert runs["unreachable"].returncode != 0 and b"unreachable" in runs["unreachable"].stderr

        # 2. Everything written: the processes' output, Ray's session folder, the local files, every object
        written = {f"{name} {stream}": getattr(run, stream) for name, run in runs.items()
                   for stream in ("stdout", "stderr")}
        for folder in (ray_tmp, str(cwd)):
            for root, _, files in os.walk(folder):
                for name in files:
                    path = os.path.join(root, name)
                    if os.path.isfile(path) and not os.path.islink(path):
                        with open(path, "rb") as f:
                            written[path] = f.read()
        ray_logs = [p for p in written if p.startswith(ray_tmp) and "/logs/" in p]
        assert len(ray_logs) > 5, "Ray wrote no session logs where RAY_TMPDIR points"
        objects = [f["uri"] for f in storage.list(join(bucket, "out"))]
        assert any(u.endswith("_SUCCESS") for u in objects) and any(u.endswith(".flashu/metrics.json") for u in objects)
        assert any("/.flashu/commits/" in u for u in objects) and any(u.endswith(".parquet") for u in objects)
        for uri in objects:
            written[uri] = storage.read_bytes(uri)
        error_rows = [r["error"] for uri in objects if uri.endswith(".parquet")
                      for r in pq.read_table(storage.arrow_fs(uri)[1], filesystem=storage.arrow_fs(uri)[0],
                                             columns=["error"]).to_pylist() if r["error"]]
        assert any("missing.png" in e for e in error_rows)  # the storage client's message made it into the output

        for name in ("careless", "careless-url"):  # the search finds a secret where there is one
            assert leaks((specs / f"{name}.json").read_bytes())
        found = {where: leaks(data) for where, data in written.items()}
        assert {where: hits for where, hits in found.items() if hits} == {}
        print(f"searched {len(written)} files, streams and objects ({sum(map(len, written.values())) / 1e6:.1f} MB), "
              f"{len(ray_logs)} of them Ray logs: no secret")
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
