"""One driver per job (jobs/lease.py): the lease logic on local disk and on S3 (moto), then for real: two
`flashu-batch run` of one job at once (one finishes, the other exits 3 in seconds), and leases of crashed drivers taken
over by a run."""

import json
import os
import re
import socket
import subprocess
import sys
import time

import pytest

from app_testkit import cpu_task, job, write_prompts, write_spec
from batch_testkit import make_bucket
from flashu_batch.app.cli import main
from flashu_batch.jobs import lease as lease_module
from flashu_batch.jobs.lease import (HEARTBEAT_S, LEASE_STALE_S, JobLease, JobLeased, claim_uri, lease_uri,
                                     process_alive, process_started)
from flashu_batch.jobs.output import read_output
from flashu_batch.jobs.spec import StorageSpec
from flashu_batch.jobs.storage import Storage, join

# ---- the lease logic, on local disk and on S3 --------------------------------------------------------------------


@pytest.fixture(params=["local", "s3"])
def place(request, tmp_path):
    """(Storage, a job folder) on local disk or in a bucket of the moto server."""
    if request.param == "local":
        return Storage(), str(tmp_path / "out" / "job")
    url = request.getfixturevalue("s3_endpoint")
    bucket = make_bucket(url, "leases")
    return Storage(StorageSpec(endpoint_url=url, path_style=True)), f"{bucket}/{request.node.name}/job"


def roots_of(folder: str, *tasks: str) -> dict:
    return {t: join(folder, t) for t in tasks}


def dead_pid() -> int:
    """The pid of a process that ran here and is gone (reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def holder(host: str, pid: int, heartbeat_ago: float, run_id: str = "oldrun000000", pid_started=None) -> bytes:
    now = time.time()
    return json.dumps(dict(format="flashu-batch-lease/1", job_id="job", task="t2i", host=host, pid=pid,
                           pid_started=pid_started, run_id=run_id, started_at=now - heartbeat_ago - 100,
                           heartbeat_at=now - heartbeat_ago)).encode()


def test_a_held_lease_refuses_a_second_driver_naming_the_holder_and_is_released(place):
    storage, folder = place
    roots = roots_of(folder, "t2i", "vqa")
    with JobLease(storage, "job", roots) as first:
        for task in roots:
            held = json.loads(storage.read_bytes(lease_uri(roots[task])))
            assert (held["host"], held["pid"], held["run_id"]) == (socket.gethostname(), os.getpid(), first.run_id)
        with pytest.raises(JobLeased) as refused:
            JobLease(storage, "job", roots).acquire()
        message = str(refused.value)
        assert message.startswith(f"job 'job' is already running (host {socket.gethostname()}, pid {os.getpid()}, "
                                  f"run {first.run_id}, since 20")
        # the holder's heartbeat is fresh: written at acquire, seconds ago at most on a loaded machine (an S3 round
        # trip under CI load took over half a second), and renewed every HEARTBEAT_S
        age = re.search(r" UTC, last heartbeat (\d+) s ago\); wait for it, or stop it", message)
        assert age is not None and int(age.group(1)) <= HEARTBEAT_S, message
    assert not any(storage.exists(lease_uri(r)) for r in roots.values())  # released
    with JobLease(storage, "job", roots) as again:  # and free to take
        assert again.held == ["t2i", "vqa"]


def test_leases_are_all_or_none(place):
    storage, folder = place
    storage.write_bytes(lease_uri(join(folder, "vqa")), holder("elsewhere", 1, heartbeat_ago=1))
    lease = JobLease(storage, "job", roots_of(folder, "t2i", "vqa"))
    with pytest.raises(JobLeased, match="host elsewhere, pid 1, run oldrun000000"):
        lease.acquire()
    assert not storage.exists(lease_uri(join(folder, "t2i")))  # the one it had taken is given back
    assert storage.exists(lease_uri(join(folder, "vqa")))      # the other driver's is left alone


def test_the_heartbeat_renews_and_a_lease_taken_over_is_lost_not_deleted(place):
    storage, folder = place
    roots = roots_of(folder, "t2i")
    with JobLease(storage, "job", roots, heartbeat_s=0.2) as lease:
        first = lease.read("t2i")["heartbeat_at"]
        deadline = time.monotonic() + 20
        while lease.read("t2i")["heartbeat_at"] == first:
            assert time.monotonic() < deadline, "no renewal"
            time.sleep(0.1)
        assert lease.read("t2i")["started_at"] == lease.started_at  # "since": unchanged
        # another driver takes it over (as one does after LEASE_STALE_S without a heartbeat)
        storage.write_bytes(lease_uri(roots["t2i"]), holder("elsewhere", 7, heartbeat_ago=0, run_id="taker0000000"))
        deadline = time.monotonic() + 20
        while lease.lost is None:
            assert time.monotonic() < deadline, "the renewal did not notice"
            time.sleep(0.1)
        assert "lost its lease to host elsewhere, pid 7, run taker0000000" in lease.lost
    assert json.loads(storage.read_bytes(lease_uri(roots["t2i"])))["run_id"] == "taker0000000"  # not deleted


def test_a_stale_lease_of_another_host_is_taken_over(place, capsys):
    storage, folder = place
    roots = roots_of(folder, "t2i")
    storage.write_bytes(lease_uri(roots["t2i"]),
                        holder("crashed-host", dead_pid(), heartbeat_ago=LEASE_STALE_S + 5))
    with JobLease(storage, "job", roots) as lease:
        assert lease.read("t2i")["run_id"] == lease.run_id
    err = capsys.readouterr().err
    assert "taking over the lease of host crashed-host" in err and "no heartbeat for over 60 s" in err
    assert not storage.exists(lease_uri(roots["t2i"]))
    assert not storage.exists(claim_uri(roots["t2i"], "oldrun000000"))  # the claim goes with the lease


def test_a_fresh_lease_of_another_host_is_respected_whatever_its_pid(place):
    storage, folder = place
    storage.write_bytes(lease_uri(join(folder, "t2i")),
                        holder("other-host", dead_pid(), heartbeat_ago=LEASE_STALE_S - 5))
    with pytest.raises(JobLeased, match=r"last heartbeat 5\d s ago"):  # its pid means nothing here
        JobLease(storage, "job", roots_of(folder, "t2i")).acquire()


def test_a_lease_of_this_host_is_taken_at_once_when_its_process_is_gone(place, capsys):
    storage, folder = place
    roots, host = roots_of(folder, "t2i"), socket.gethostname()
    storage.write_bytes(lease_uri(roots["t2i"]), holder(host, dead_pid(), heartbeat_ago=0))
    with JobLease(storage, "job", roots) as lease:
        assert lease.held == ["t2i"]
    assert "its process on this host is gone" in capsys.readouterr().err
    # a live process of this host holds it: refused (the parent of this test process is alive)
    parent = os.getppid()
    storage.write_bytes(lease_uri(roots["t2i"]), holder(host, parent, heartbeat_ago=0,
                                                        pid_started=process_started(parent)))
    with pytest.raises(JobLeased, match=f"pid {parent}"):
        JobLease(storage, "job", roots).acquire()
    # the same pid, started at another time: a reused pid, so the holder is gone
    storage.write_bytes(lease_uri(roots["t2i"]), holder(host, parent, heartbeat_ago=0,
                                                        pid_started=process_started(parent) - 1))
    with JobLease(storage, "job", roots) as lease:
        assert lease.held == ["t2i"]


def test_a_lease_left_by_an_earlier_run_of_this_process_is_taken_at_once(place):
    storage, folder = place
    roots = roots_of(folder, "t2i")
    left = JobLease(storage, "job", roots)
    left.acquire()
    lease_module._HELD.discard(left.run_id)  # the run ended, and the store failed the lease's deletion
    with JobLease(storage, "job", roots) as lease:
        assert lease.held == ["t2i"]


def test_two_takers_of_one_stale_lease_the_claim_decides(place, capsys):
    storage, folder = place
    roots = roots_of(folder, "t2i")
    storage.write_bytes(lease_uri(roots["t2i"]), holder("crashed-host", 1, heartbeat_ago=LEASE_STALE_S + 5))
    # a live driver on another host has claimed the takeover and is about to re-create the lease
    claim = claim_uri(roots["t2i"], "oldrun000000")
    storage.create(claim, holder("taker-host", 42, heartbeat_ago=0, run_id="taker0000000"))
    with pytest.raises(JobLeased, match="is being taken over by host taker-host, pid 42, run taker0000000"):
        JobLease(storage, "job", roots).acquire()
    assert json.loads(storage.read_bytes(lease_uri(roots["t2i"])))["run_id"] == "oldrun000000"  # untouched
    # a claim whose taker died before it re-created the lease is void: taken over all the same
    storage.write_bytes(claim, holder("taker-host", 42, heartbeat_ago=LEASE_STALE_S + 5, run_id="taker0000000"))
    with JobLease(storage, "job", roots) as lease:
        assert lease.held == ["t2i"]
    assert not storage.exists(claim)


def test_process_alive_tells_reused_and_finished_pids():
    me = os.getpid()
    assert process_alive(me, process_started(me)) and process_alive(me, None)
    assert not process_alive(me, process_started(me) + 1)
    assert not process_alive(dead_pid(), None)


# ---- for real: `flashu-batch run` ---------------------------------------------------------------------------------

def start_run(path: str, log) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray, not a running one
    return subprocess.Popen([sys.executable, "-m", "flashu_batch.app.cli", "run", path, "--quiet"], env=env,
                            stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)


def test_two_runs_of_one_job_at_once_one_finishes_the_other_exits_3_in_seconds(tmp_path):
    n = 40  # 50-step images: the job runs for tens of seconds, long after the second run has looked
    task = cpu_task("t2i", write_prompts(tmp_path / "prompts.jsonl", n), str(tmp_path / "out"),
                    params=dict(steps=50, guidance_scale=1.5))
    path = write_spec(tmp_path / "job.json", job("race", [task]))
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    runs, started, ended = [], time.monotonic(), {}
    try:
        for log in logs:
            with open(log, "w") as f:
                runs.append(start_run(path, f))
        deadline = started + 600
        while len(ended) < 2:
            assert time.monotonic() < deadline, "the runs did not end in 600 s"
            for i, run in enumerate(runs):
                if i not in ended and run.poll() is not None:
                    ended[i] = time.monotonic() - started
            time.sleep(0.1)
    finally:
        for run in runs:  # processes this test started, by PID (their own session: their local Ray too)
            if run.poll() is None:
                os.killpg(run.pid, 9)
            run.wait(timeout=60)
    codes = sorted(run.returncode for run in runs)
    texts = [log.read_text() for log in logs]
    assert codes == [0, 3], texts
    winner, loser = (0, 1) if runs[0].returncode == 0 else (1, 0)
    print(f"the second run exited 3 after {ended[loser]:.1f}s; the job took {ended[winner]:.1f}s")
    assert ended[loser] < 30 and ended[loser] < ended[winner]
    said = texts[loser].strip().splitlines()
    assert len(said) == 1, texts[loser]  # one line, no traceback, no Ray log: Ray never started
    assert said[0].startswith(f"flashu-batch run: job 'race' is already running (host {socket.gethostname()}, "
                              f"pid {runs[winner].pid}, run "), said[0]
    assert "last heartbeat" in said[0] and said[0].endswith("is taken over)")
    root = tmp_path / "out" / "race" / "t2i"
    ids = read_output(Storage(), str(root)).column("id").to_pylist()
    assert sorted(ids) == [f"r{i:03d}" for i in range(n)]  # every id once
    assert not os.path.exists(root / ".flashu" / "lease.json")  # released at the end


def test_a_live_lease_stops_run_before_ray_with_exit_3(tmp_path, monkeypatch, capsys):
    from flashu_batch.scheduler import driver

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(driver, "init_ray", no_ray)
    raw = job("busy", [cpu_task("t2i", write_prompts(tmp_path / "prompts.jsonl", 3), str(tmp_path / "out"))])
    path = write_spec(tmp_path / "job.json", raw)
    root = str(tmp_path / "out" / "busy" / "t2i")
    with JobLease(Storage(), "busy", {"t2i": root}) as held:
        start = time.monotonic()
        assert main(["run", path]) == 3
        assert time.monotonic() - start < 10
    err = capsys.readouterr().err
    assert err.startswith(f"flashu-batch run: job 'busy' is already running (host {socket.gethostname()}, pid "
                          f"{os.getpid()}, run {held.run_id}, since ") and err.count("\n") == 1, err
    assert not os.path.exists(os.path.join(root, ".flashu", "settings.json"))  # refused before anything


def test_run_takes_over_the_leases_of_crashed_drivers(ray_module, tmp_path, capsys):
    raw = job("crashed", [cpu_task("t2i", write_prompts(tmp_path / "prompts.jsonl", 3), str(tmp_path / "out"))])
    path = write_spec(tmp_path / "job.json", raw)
    uri = str(tmp_path / "out" / "crashed" / "t2i" / ".flashu" / "lease.json")
    storage = Storage()
    # a driver on another host that stopped heart-beating long ago
    storage.write_bytes(uri, holder("gone-host", dead_pid(), heartbeat_ago=3600))
    assert main(["run", path, "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert "taking over the lease of host gone-host" in err and "t2i: 3 rows (0 errors)" in out
    assert not os.path.exists(uri)
    # a driver of this host that crashed a moment ago (fresh heartbeat, process gone): taken over at once
    storage.write_bytes(uri, holder(socket.gethostname(), dead_pid(), heartbeat_ago=0))
    start = time.monotonic()
    assert main(["run", path, "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert "its process on this host is gone" in err and "this run 0 rows" in out
    assert time.monotonic() - start < LEASE_STALE_S  # no wait for the heartbeat to go stale
    assert not os.path.exists(uri)
    assert sorted(read_output(storage, os.path.dirname(os.path.dirname(uri))).column("id").to_pylist()) == \
        ["r000", "r001", "r002"]
