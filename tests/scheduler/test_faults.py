"""Hard faults, with the invariant every one of them must keep: rows out == rows in, each id once.

- a worker process killed mid-batch (os._exit, as an OOM kill would): the actor restarts, the batch is retried, the
  same run finishes with no error rows;
- a row that kills every worker that touches it (a poison row): bounded retries, then a clear job error, not a loop;
- the driver killed between a data file and its commit record: the re-run finishes, the orphan is never read;
- the S3 server (SeaweedFS, disk-backed) killed and restarted mid-job: the job finishes, by itself or on a re-run.
- VQA images fetched from a store that hangs up for longer than the S3 client's retries: retried, no error rows.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
import yaml

from batch_testkit import descendants, spec_dict
from flashu_batch.jobs.output import read_output
from flashu_batch.jobs.spec import parse_spec
from flashu_batch.jobs.storage import Storage, join
from flashu_batch.scheduler.driver import run_job
from flashu_batch.scheduler.pipeline import ACTOR_MAX_TASK_RETRIES, RETRIED_STORAGE_ERRORS

N = 12


def write_prompts(storage: Storage, base: str, n: int = N) -> str:
    uri = join(base, "prompts.jsonl")
    storage.write_bytes(uri, "".join(json.dumps({"id": f"r{i:02d}", "prompt": f"a red circle {i}"}) + "\n"
                                     for i in range(n)).encode())
    return uri


def t2i_spec(job_id: str, checkpoint: str, prompts: str, output: str, endpoint: str | None = None) -> dict:
    task = dict(kind="t2i", input=dict(uris=prompts, format="jsonl"), output=output, params=dict(steps=2),
                rows_per_file=2)
    return spec_dict(job_id, checkpoint, [task], endpoint)


def check_every_id_once(storage: Storage, root: str, n: int = N) -> list[dict]:
    rows = read_output(storage, root).to_pylist()
    ids = [r["id"] for r in rows]
    assert len(ids) == n and sorted(set(ids)) == [f"r{i:02d}" for i in range(n)], sorted(ids)
    assert [r["id"] for r in rows if r["error"] is not None] == []
    listed = {f["file"] for f in json.loads(storage.read_bytes(join(root, "_SUCCESS")))["files"]}
    assert sum(pq_rows(storage, join(root, f)) for f in listed) == n  # the manifest's files hold each id once
    return rows


def pq_rows(storage: Storage, uri: str) -> int:
    import pyarrow.parquet as pq

    fs, path = storage.arrow_fs(uri)
    return pq.ParquetFile(fs.open_input_file(path)).metadata.num_rows


def exiting_worker(row: str, marker: str | None = None):
    """The real T2IWorker, hard-exiting its process (as an OOM kill or a segfault would: no exception, no cleanup)
    when a batch holds `row`: once when `marker` is given (the restarted actor goes on), else every time (a poison
    row)."""
    from flashu_batch.workers import T2IWorker

    def first_time() -> bool:  # across processes: the first caller creates the marker file
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return True
        except FileExistsError:
            return False

    class ExitingT2IWorker(T2IWorker):  # defined here, so Ray ships it (and first_time) by value to the actor
        def __call__(self, batch):
            if row in batch.column("id").to_pylist() and (marker is None or first_time()):
                os._exit(75)
            return super().__call__(batch)

    return ExitingT2IWorker


def test_a_worker_killed_mid_batch_restarts_and_the_same_run_finishes(ray_session, checkpoint, tmp_path):
    storage = Storage()
    spec = parse_spec(t2i_spec("killed-worker", checkpoint, write_prompts(storage, str(tmp_path)),
                               str(tmp_path / "out")))
    marker = tmp_path / "exited"
    results = run_job(spec, worker_classes={"t2i": exiting_worker("r05", str(marker))})
    assert marker.exists()  # the worker process did exit on r05's batch
    assert results["t2i"]["rows"] == N and results["t2i"]["errors"] == 0
    assert results["t2i"]["metrics"]["rows_this_run"] == N  # one run: the killed batch was retried, not lost
    check_every_id_once(storage, results["t2i"]["output"])


def test_a_poison_row_fails_the_job_after_bounded_retries_and_keeps_the_rest(ray_session, checkpoint, tmp_path):
    storage = Storage()
    spec = parse_spec(t2i_spec("poison", checkpoint, write_prompts(storage, str(tmp_path)), str(tmp_path / "out")))
    deaths = tmp_path / "deaths"
    deaths.mkdir()

    class CountingT2IWorker(exiting_worker("r03")):  # every actor start leaves a file: restarts are counted
        def __init__(self, *args, **kwargs):
            open(os.path.join(str(deaths), f"start-{time.time_ns()}"), "w").close()
            super().__init__(*args, **kwargs)

    start = time.monotonic()
    with pytest.raises(RuntimeError, match="task 't2i': a worker process died and its retries are used up") as e:
        run_job(spec, worker_classes={"t2i": CountingT2IWorker})
    assert "run the job again" in str(e.value) and "actor" in str(e.value.__cause__)
    print(f"poison row: the job failed after {time.monotonic() - start:.1f}s")
    starts = len(os.listdir(deaths))
    assert 1 + ACTOR_MAX_TASK_RETRIES <= starts <= 2 + ACTOR_MAX_TASK_RETRIES  # tried, bounded (+1: a restart
    #                                                                            may begin before the job stops)
    root = join(str(tmp_path / "out"), "poison", "t2i")
    kept = read_output(storage, root).column("id").to_pylist()
    assert "r03" not in kept and len(kept) == len(set(kept))  # what committed before stays, once each
    results = run_job(spec)  # without the fault, the re-run finishes the rest
    assert results["t2i"]["metrics"]["skipped"] == len(kept)
    check_every_id_once(storage, root)


def kill_pids(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)  # processes this test started (its driver's Ray), by PID
        except ProcessLookupError:
            pass


def test_a_driver_killed_between_a_data_file_and_its_commit_then_rerun(ray_session, checkpoint, tmp_path):
    """A job driver in its own process with its own local Ray; the first write stops after its data file, the
    test kills the driver there (SIGKILL: no cleanup), and a re-run finishes. The orphan data file is never read."""
    storage = Storage()
    raw = t2i_spec("driver-killed", checkpoint, write_prompts(storage, str(tmp_path), n=6), str(tmp_path / "out"))
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(raw))
    marker = tmp_path / "held"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray, not the session's
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "held_commit_driver.py")
    with open(tmp_path / "driver.log", "wb") as log:
        driver = subprocess.Popen([sys.executable, script, str(tmp_path / "job.yaml"), str(marker)],
                                  env=env, stdout=log, stderr=subprocess.STDOUT)
    family = []
    try:
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no write reached the commit point"
            time.sleep(0.1)
        family = descendants(driver.pid)
        os.kill(driver.pid, signal.SIGKILL)
        assert driver.wait(timeout=60) == -signal.SIGKILL
    finally:
        kill_pids([driver.pid] + family)  # Ray's processes die with their driver; this covers any that did not
        driver.wait(timeout=60)

    root = join(str(tmp_path / "out"), "driver-killed", "t2i")
    committed_files = {r["file"] for r in
                       (json.loads(storage.read_bytes(f["uri"])) for f in storage.list(join(root, ".flashu/commits")))}
    published = {f["uri"].split(root + "/", 1)[1] for f in storage.list(join(root, "data"))}
    assert published == committed_files  # what a glob over data/ sees: committed files only
    orphans = [f["uri"] for f in storage.list(join(root, ".flashu/staging"))]
    assert len(orphans) == 1 and pq_rows(storage, orphans[0]) == 2  # the held write: staged, no commit record
    assert not storage.exists(join(root, "_SUCCESS"))
    before = read_output(storage, root).column("id").to_pylist()
    assert len(before) == len(set(before)) < 6  # readers see committed rows only
    if published:  # a plain Parquet reader sees the same (there is no folder to read before a first commit)
        assert sorted(pq.read_table(root).column("id").to_pylist()) == sorted(before)

    results = run_job(parse_spec(raw))  # the re-run (here, on the session's Ray)
    assert results["t2i"]["metrics"]["skipped"] == len(before)
    check_every_id_once(storage, root, n=6)
    listed = {f["file"] for f in json.loads(storage.read_bytes(join(root, "_SUCCESS")))["files"]}
    assert {f["uri"].split(root + "/", 1)[1] for f in storage.list(join(root, "data"))} == listed
    assert sorted(pq.read_table(root).column("id").to_pylist()) == [f"r{i:02d}" for i in range(6)]


@pytest.fixture
def seaweed(tmp_path):
    from seaweed_testkit import SeaweedServer, SeaweedUnavailable

    server = SeaweedServer(str(tmp_path / "seaweed"))
    try:
        server.start()
    except SeaweedUnavailable as e:
        pytest.skip(f"SeaweedFS cannot run here: {e}")
    try:
        yield server
    finally:
        server.stop()


def test_the_s3_server_killed_and_restarted_mid_job_loses_and_repeats_nothing(ray_session, checkpoint, seaweed,
                                                                              tmp_path):
    from flashu_batch.jobs.spec import StorageSpec
    from flashu_batch.workers import T2IWorker

    done_at = str(tmp_path / "batches")

    class SlowT2IWorker(T2IWorker):  # a steady pace, so that writes are due while the server is down
        def __call__(self, batch):
            time.sleep(0.5)
            out = super().__call__(batch)
            with open(done_at, "a") as f:
                f.write(f"{time.time()}\n")
            return out

    storage = Storage(StorageSpec(endpoint_url=seaweed.url, path_style=True))
    storage.s3_client().create_bucket(Bucket="jobs")
    spec = parse_spec(t2i_spec("restart", checkpoint, write_prompts(storage, "s3://jobs/in"), "s3://jobs/out",
                               seaweed.url))
    outage = {}

    def batches_done_after(t: float) -> list[float]:
        with open(done_at) as f:
            return [done for done in map(float, f) if done > t]

    def crash_the_server_after_the_first_commit(progress):
        if progress.done > 0 and not outage:
            outage["at_rows"], outage["down"] = progress.done, time.time()
            seaweed.kill()
            deadline = time.time() + 120
            while not batches_done_after(outage["down"]) and time.time() < deadline:
                time.sleep(0.2)  # down until a batch is ready to write...
            time.sleep(2.0)  # ...and its write has met the dead server
            seaweed.start()  # same ports, same data directory
            outage["up"] = time.time()

    try:
        results = run_job(spec, on_progress=crash_the_server_after_the_first_commit,
                          worker_classes={"t2i": SlowT2IWorker})
        outcome = "finished by itself"
    except Exception as e:  # noqa: BLE001 -- allowed outcome: a clear error, then a re-run finishes
        print(f"the run failed: {type(e).__name__}: {str(e)[:500]}")
        assert any(p in str(e) for p in RETRIED_STORAGE_ERRORS + ["unreachable"]), str(e)[-2000:]
        results, outcome = run_job(spec), "finished on a re-run"
    during = [t for t in batches_done_after(outage["down"]) if t < outage["up"] - 1.0]
    print(f"S3 server down for {outage['up'] - outage['down']:.1f}s after {outage['at_rows']} committed rows, "
          f"{len(during)} batches done meanwhile: the job {outcome}")
    # Mid-job, and writes met the dead server: batches were ready to write while it was down, or (on a loaded
    # machine, where the next batch can come after the retries of the one in flight are spent) the run failed on
    # a storage error, asserted above.
    assert outage["at_rows"] < N and (during or outcome == "finished on a re-run")
    root = results["t2i"]["output"]
    assert results["t2i"]["rows"] == N and results["t2i"]["errors"] == 0
    rows = check_every_id_once(storage, root)  # read back from the restarted server: nothing lost on its disk
    assert all(r["image"]["bytes"][:4] == b"\x89PNG" for r in rows)


class FlakyProxy:
    """A TCP proxy in front of an S3 server that hangs up on its first `failures` connections (accepted, then
    closed before any answer: what a restarting server or a load balancer losing its backend looks like), then
    forwards every byte both ways."""

    def __init__(self, target_url: str, failures: int):
        import socket
        import threading

        host, port = target_url.split("//", 1)[1].split(":")
        self.target, self.failures, self.refused = (host, int(port)), failures, 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self) -> None:
        import socket
        import threading

        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:  # closed: the test is over
                return
            if self.refused < self.failures:
                self.refused += 1
                client.close()
                continue
            upstream = socket.create_connection(self.target)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self.pump, args=(a, b), daemon=True).start()

    @staticmethod
    def pump(src, dst) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(2)
                except OSError:
                    pass

    def close(self) -> None:
        self.listener.close()


def test_an_image_fetch_that_meets_an_outage_is_retried_not_an_error_row(ray_session, checkpoint, s3_endpoint,
                                                                          tmp_path):
    """VQA images by s3:// URI, through a store that hangs up on the first fetches for longer than the S3 client's
    own retries: the validate task fails on the outage and Ray Data runs it again, so every row is answered in the
    same run. (An error row here would be final: a re-run does not retry error rows.)"""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from batch_testkit import make_bucket, png_bytes
    from flashu_batch.jobs.spec import StorageSpec
    from flashu_batch.jobs.storage import ATTEMPTS

    bucket = make_bucket(s3_endpoint, "flaky-img")
    direct = Storage(StorageSpec(endpoint_url=s3_endpoint, path_style=True))
    for i in range(4):
        direct.write_bytes(join(bucket, f"img{i}.png"), png_bytes((60 * i, 0, 255)))
    images = [{"bytes": None, "path": join(bucket, f"img{i}.png")} for i in range(4)]
    pq.write_table(pa.table({"id": [f"q{i}" for i in range(4)], "question": ["what color?"] * 4,
                             "image": pa.array(images, pa.struct([("bytes", pa.binary()), ("path", pa.string())]))}),
                   tmp_path / "qa.parquet")
    proxy = FlakyProxy(s3_endpoint, failures=ATTEMPTS + 1)  # one fetch's every attempt, and one more
    task = dict(kind="vqa", input=dict(uris=str(tmp_path / "qa.parquet"), format="parquet"),
                output=str(tmp_path / "out"), params=dict(max_new_tokens=2))
    try:
        results = run_job(parse_spec(spec_dict("flaky-images", checkpoint, [task], proxy.url)))
    finally:
        proxy.close()
    assert proxy.refused == ATTEMPTS + 1  # the outage happened, and outlasted the client's own retries
    rows = read_output(Storage(), results["vqa"]["output"]).to_pylist()
    assert sorted(r["id"] for r in rows) == ["q0", "q1", "q2", "q3"]
    assert [(r["id"], r["error"]) for r in rows if r["error"] is not None] == []
    assert all(len(r["image_sha256"]) == 64 for r in rows)
