"""One driver per job: a lease in each task folder, `<output>/<job_id>/<task>/.flashu/lease.json`.

A run takes the lease of every task folder of its job before any work (scheduler/driver.py run_job, before Ray
starts), renews them from a heartbeat thread every HEARTBEAT_S seconds while it runs, and deletes them when it ends
(success, failure or Ctrl-C). A second driver of the same job finds a live lease and stops with JobLeased, whose
message names the holder (the CLI exits 3). Two drivers of one job would not break the output (commit records are
create-only, jobs/output.py), but each would pay for the other's model work and their metrics would lie.

    {"host", "pid", "pid_started", "run_id", "job_id", "task", "started_at", "heartbeat_at"}   (unix seconds)

Taking a lease is a create-only write (Storage.create: a local hard link, an S3 PUT with If-None-Match: *), so of
two drivers that start together exactly one gets it. A lease is taken over when its holder is gone:
- its heartbeat is older than LEASE_STALE_S (a driver on another machine that crashed, or lost its network), or
- its holder ran on this host and its process is gone (a crashed driver: `run` again right away is not blocked).
A takeover first creates a claim, `.flashu/lease-takeover-<old run id>.json`, create-only: of two drivers that find
the same stale lease, only the one that makes the claim deletes and re-creates the lease; the other stops with
JobLeased. Staleness compares the holder's clock with the reader's: hosts need clocks within a few seconds (NTP).

Renewal rewrites the lease after checking that it still names this run. A run whose lease was taken over (its
heartbeats stopped for LEASE_STALE_S: a suspended process, a long store outage) finds that out at its next renewal;
`lost` then says by whom, and the driver stops before its next task.
"""

import datetime
import json
import os
import socket
import sys
import threading
import time
import uuid

from flashu_batch.jobs.output import LEASE
from flashu_batch.jobs.storage import Storage, join

FORMAT = "flashu-batch-lease/1"
HEARTBEAT_S = 10.0     # renewal period: a few writes a minute per task folder
LEASE_STALE_S = 60.0   # no heartbeat for this long: the holder is taken to be dead (six missed renewals)
RELEASE_WAIT_S = 10.0  # how long the release waits for a renewal in flight (one on a dead store may take minutes)
# Run ids of the leases this process holds now. A lease naming this very process and none of these is one an
# earlier run in this process failed to delete (the store was down at its end): taken over at once.
_HELD: set[str] = set()


class JobLeased(Exception):
    """Another driver holds (or is taking over) the lease of this job; the message names it and since when."""


def lease_uri(task_root: str) -> str:
    return join(task_root, LEASE)


def claim_uri(task_root: str, run_id: str) -> str:
    return join(task_root, LEASE.rsplit("/", 1)[0], f"lease-takeover-{run_id}.json")


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks since boot) of process `pid` from /proc/<pid>/stat (fields 3 and 22), or
    None where /proc does not tell (no such process, one hidden from this user, not Linux)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return fields[0], int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def process_started(pid: int) -> int | None:
    """When process `pid` started (None where /proc cannot tell). With the pid it names one process: a pid reused
    later has another start time."""
    stat = _stat(pid)
    return stat[1] if stat else None


def process_alive(pid: int, started: int | None) -> bool:
    """Whether process `pid` (started at `started`, when known) still runs on this host."""
    stat = _stat(pid)
    if stat is not None:  # a zombie has finished: only its exit status is left for its parent
        return stat[0] != "Z" and (started is None or stat[1] == started)
    try:
        os.kill(pid, 0)  # signal 0: no signal, only the check that the pid exists
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def read_json(storage: Storage, uri: str) -> dict | None:
    try:
        return json.loads(storage.read_bytes(uri))
    except FileNotFoundError:
        return None


def _when(unix: float) -> str:
    return datetime.datetime.fromtimestamp(unix, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def describe(holder: dict, now: float | None = None) -> str:
    """'host h, pid 123, run abc, since 2026-12-06 18:01:02 UTC, last heartbeat 4 s ago'."""
    ago = max(0.0, (now or time.time()) - holder["heartbeat_at"])
    return (f"host {holder['host']}, pid {holder['pid']}, run {holder['run_id']}, since {_when(holder['started_at'])}, "
            f"last heartbeat {ago:.0f} s ago")


def gone(holder: dict, now: float | None = None, stale_s: float = LEASE_STALE_S) -> str | None:
    """Why the lease's holder is taken to be gone (a phrase for the takeover notice), or None while it is live."""
    ago = (now or time.time()) - holder["heartbeat_at"]
    if ago > stale_s:
        return f"no heartbeat for over {stale_s:g} s"
    if holder["host"] == socket.gethostname():
        if holder["pid"] == os.getpid() and holder.get("pid_started") == process_started(os.getpid()):
            return None if holder["run_id"] in _HELD else "an earlier run of this process that ended"
        if not process_alive(holder["pid"], holder.get("pid_started")):
            return "its process on this host is gone"
    return None


class JobLease:
    """The leases of one run of a job, one per task folder (`roots`). A context manager: taken on entry (raises
    JobLeased when another driver holds one; the ones taken are deleted again), renewed by a daemon thread, deleted
    on exit."""

    def __init__(self, storage: Storage, job_id: str, roots: dict[str, str], *, heartbeat_s: float = HEARTBEAT_S,
                 stale_s: float = LEASE_STALE_S, run_id: str | None = None):
        self.storage, self.job_id, self.roots = storage, job_id, roots  # roots: task name -> task folder
        self.heartbeat_s, self.stale_s = heartbeat_s, stale_s
        self.run_id = run_id or uuid.uuid4().hex[:12]
        self.started_at = time.time()
        self.held: list[str] = []    # task names whose lease this run holds
        self.claims: list[str] = []  # takeover claims this run made (deleted with the leases)
        self.lost: str | None = None  # set by a renewal that found the lease taken over: what happened
        self._stop = threading.Event()
        self._lock = threading.Lock()  # a renewal and the release never interleave (a renewal would re-create it)
        self._thread: threading.Thread | None = None

    def record(self, task: str) -> bytes:
        pid = os.getpid()
        return json.dumps(dict(format=FORMAT, job_id=self.job_id, task=task, host=socket.gethostname(), pid=pid,
                               pid_started=process_started(pid), run_id=self.run_id, started_at=self.started_at,
                               heartbeat_at=time.time()), indent=1).encode()

    def read(self, task: str) -> dict | None:
        """The lease of a task folder as it is now (whoever holds it), or None."""
        return read_json(self.storage, lease_uri(self.roots[task]))

    # ---- take, renew, release ------------------------------------------------------------------------------------

    def __enter__(self):
        self.acquire()
        self._thread = threading.Thread(target=self._beat, name="flashu-lease-heartbeat", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> bool:
        self._stop.set()
        locked = self._lock.acquire(timeout=RELEASE_WAIT_S)  # a renewal in flight finishes first
        try:
            self.release()
        finally:
            if locked:
                self._lock.release()
        return False

    def acquire(self) -> None:
        """Take every task folder's lease, in order; none is kept when one cannot be had."""
        _HELD.add(self.run_id)
        try:
            for task in self.roots:
                self._take(task)
                self.held.append(task)
        except BaseException:
            self.release()
            raise

    def _take(self, task: str) -> None:
        uri, root = lease_uri(self.roots[task]), self.roots[task]
        for _ in range(3):  # each pass ends taken, refused, or with the lease changed under it (try again)
            if self.storage.create(uri, self.record(task)):
                return
            holder = self.read(task)
            if holder is None:
                continue
            why = gone(holder, stale_s=self.stale_s)
            if why is None:
                raise JobLeased(f"job {self.job_id!r} is already running ({describe(holder)}); wait for it, or stop "
                                f"it (a lease without a heartbeat for {self.stale_s:g} s is taken over)")
            claim = claim_uri(root, holder["run_id"])
            if not self.storage.create(claim, self.record(task)):  # another driver is taking this lease over
                other = read_json(self.storage, claim)
                if other is not None and gone(other, stale_s=self.stale_s) is None:
                    raise JobLeased(f"job {self.job_id!r} is already running: its stale lease ({describe(holder)}) "
                                    f"is being taken over by {describe(other)}; wait for it, or stop it")
                self.storage.delete(claim)  # its taker died between claim and lease: the claim is void
                continue
            self.claims.append(claim)
            if self.read(task) != holder:  # changed since it was read: a taker that finished before our claim
                continue
            self.storage.delete(uri)
            print(f"flashu-batch: job {self.job_id!r} task {task!r}: taking over the lease of {describe(holder)}: "
                  f"{why}", file=sys.stderr, flush=True)
            if self.storage.create(uri, self.record(task)):
                return
        holder = self.read(task) or {}
        shown = describe(holder) if holder else "a driver that keeps replacing it"
        raise JobLeased(f"job {self.job_id!r} is already running ({shown}); wait for it, or stop it")

    def renew(self) -> None:
        """Rewrite each held lease with a new heartbeat, after checking it still names this run; a lease taken over
        sets `lost` and is no longer held. A store error is left to the next renewal."""
        with self._lock:
            if not self._stop.is_set():  # released, or being released: nothing to renew
                self._renew()

    def _renew(self) -> None:
        for task in list(self.held):
            holder = self.read(task)
            if holder is None or holder["run_id"] != self.run_id:
                self.held.remove(task)
                by = describe(holder) if holder else "nobody: it was deleted"
                self.lost = (f"job {self.job_id!r} task {task!r}: this run ({self.run_id}) lost its lease to {by}; "
                             f"another driver runs the job now")
                print(f"flashu-batch: warning: {self.lost}", file=sys.stderr, flush=True)
                continue
            self.storage.write_bytes(lease_uri(self.roots[task]), self.record(task))

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.renew()
            except Exception as e:  # noqa: BLE001 -- a store outage: the lease goes stale only after LEASE_STALE_S
                print(f"flashu-batch: warning: lease heartbeat of job {self.job_id!r} failed ({type(e).__name__}: "
                      f"{str(e)[:200]}); retrying in {self.heartbeat_s:g} s", file=sys.stderr, flush=True)

    def release(self) -> None:
        """Delete the leases this run still holds and its takeover claims. Never raises: a lease left behind by a
        store error is taken over once stale (or at once by a run on this host)."""
        for task in list(self.held):
            try:
                holder = self.read(task)
                if holder is not None and holder["run_id"] == self.run_id:
                    self.storage.delete(lease_uri(self.roots[task]))
            except Exception as e:  # noqa: BLE001 -- at the end of a run, often one that failed for this reason
                print(f"flashu-batch: warning: could not delete the lease of job {self.job_id!r} task {task!r} "
                      f"({type(e).__name__}); the next run takes it over", file=sys.stderr, flush=True)
            self.held.remove(task)
        for claim in self.claims:
            try:
                self.storage.delete(claim)
            except Exception:  # noqa: BLE001 -- a claim left behind only blocks a takeover of a lease that is gone
                pass
        self.claims = []
        _HELD.discard(self.run_id)
