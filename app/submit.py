"""Cluster jobs through the Ray Jobs API (the head's dashboard, http://HEAD:8265): submit, status, logs.

    flashu-batch submit job.yaml --address http://HEAD:8265     # the spec is validated here first
    flashu-batch status JOB_ID   /   flashu-batch logs JOB_ID --follow

Idempotent submission: a job's submission id is its job_id, and the cluster refuses a second submission with an id
it knows, so submitting twice (a retried CI step, two people) starts one job. Resuming: `submit --resume` submits
`<job_id>-attempt-<N>` when every earlier attempt ended without success; the spec and its job_id are unchanged, so
the new attempt skips every row the earlier ones committed (exactly-once output, jobs/output.py).

The spec travels as the validated JSON (relative paths already resolved) in a runtime_env working_dir of its own,
and the cluster runs `flashu-batch run job.json --address auto` on the head. Credentials never travel: the nodes
get S3 access from their own environment (an instance profile, a Kubernetes Secret).

Token authentication (Ray 2.60: RAY_AUTH_MODE=token on the cluster) is handled here, explicitly, rather than by
Ray's client, which sends a token only when this process is itself in token mode (a local `ray.init()` turns that
on by itself, and its own ~/.ray/auth_token would then go to every cluster):
- RAY_AUTH_MODE=disabled: no token is sent.
- RAY_AUTH_TOKEN, else the file at RAY_AUTH_TOKEN_PATH: sent as `Authorization: Bearer ...`.
- RAY_AUTH_MODE=token and neither set: ~/.ray/auth_token (where `ray get-auth-token --generate` writes it); an
  error before any request when there is none.
A cluster that answers 401 or 403 gets an error saying which of these to set. The token is never printed.
"""

import datetime
import json
import os
import re
import tempfile
from pathlib import Path

from flashu_batch.jobs.spec import JobSpec

ADDRESS_ENV = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")  # in Ray's order of precedence
SPEC_FILE = "job.json"  # the spec's name in the job's working_dir
ENTRYPOINT = f"flashu-batch run {SPEC_FILE} --address auto"
EXIT_REFUSED = 3  # submit refused: the job was submitted before (distinct from 1: failed, 2: bad input)
UNSUCCESSFUL = ("FAILED", "STOPPED")  # ended states an attempt may be resumed from
FINISHED = ("SUCCEEDED", *UNSUCCESSFUL)


class AlreadySubmitted(Exception):
    """A submission of this job exists and may not be repeated; the message says what to do instead."""


def cluster_address(address: str | None) -> str:
    address = address or next((os.environ[k] for k in ADDRESS_ENV if os.environ.get(k)), None)
    if not address:
        raise ValueError("no cluster address: pass --address http://HEAD:8265 (the head node's dashboard) or set "
                         "RAY_API_SERVER_ADDRESS (or RAY_ADDRESS).")
    return address


def auth_token() -> tuple[str | None, str]:
    """(token or None, where it came from) under the rules in the module docstring. The source names a variable or
    a file, never the token."""
    mode = os.environ.get("RAY_AUTH_MODE", "").strip().lower()
    if mode not in ("", "token", "disabled"):
        raise ValueError(f"RAY_AUTH_MODE: got {mode!r}; expected 'token', 'disabled' or unset.")
    if mode == "disabled":
        return None, "RAY_AUTH_MODE=disabled"
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip(), "RAY_AUTH_TOKEN"
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or (str(Path.home() / ".ray" / "auth_token") if mode else "")
    if not path:
        return None, "no token (RAY_AUTH_MODE, RAY_AUTH_TOKEN and RAY_AUTH_TOKEN_PATH unset)"
    try:
        token = Path(path).read_text().strip()
    except OSError as e:
        token, why = "", e.strerror or str(e)
    else:
        why = "the file is empty"
    if not token:
        raise ValueError(f"no token for the cluster: the token file {path} cannot be used ({why}). Set "
                         f"RAY_AUTH_TOKEN, or RAY_AUTH_TOKEN_PATH to a file that holds the token (`ray get-auth-token` "
                         f"on the head prints it), or RAY_AUTH_MODE=disabled for a cluster without authentication.")
    return token, f"the file {path}"


def connect(address: str | None = None):
    """A JobSubmissionClient for `address` (or RAY_API_SERVER_ADDRESS / RAY_ADDRESS), with the token if any."""
    import requests
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    address = cluster_address(address)
    token, source = auth_token()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    # Ray's client lets these variables override an explicit address; the address chosen above wins instead.
    hidden = {k: os.environ.pop(k) for k in ADDRESS_ENV if k in os.environ}
    try:
        return JobSubmissionClient(address, headers=headers)
    except AuthenticationError:  # 401: no token, 403: a wrong one
        if token is None:
            raise ValueError(f"the cluster at {address} requires a token (Ray token authentication) and none was "
                             f"given: set RAY_AUTH_TOKEN, or RAY_AUTH_TOKEN_PATH to a file that holds it, or "
                             f"RAY_AUTH_MODE=token with the token in ~/.ray/auth_token (`ray get-auth-token` on the "
                             f"head prints it).") from None
        raise ValueError(f"the cluster at {address} rejected the token from {source}: it is not this cluster's "
                         f"token. Use the one `ray get-auth-token` prints on the head.") from None
    except ConnectionError as e:
        raise ValueError(f"cannot reach the Ray Jobs API at {address}: {e}. Pass the head's dashboard address "
                         f"(http://HEAD:8265) and check that the dashboard runs (ray[default]).") from None
    except requests.HTTPError as e:  # the version check answered with an error status (Ray lets it through as is)
        raise RuntimeError(f"the Ray Jobs API at {address} failed its version check: {e}") from None
    finally:
        os.environ.update(hidden)


def attempt_id(job_id: str, attempt: int) -> str:
    return job_id if attempt == 1 else f"{job_id}-attempt-{attempt}"


def state(info) -> str:
    return str(getattr(info.status, "value", info.status))  # JobStatus is a str enum


def attempts(client, job_id: str) -> list[tuple[int, object]]:
    """The job's submissions as (attempt number, JobDetails), oldest first. A `<job_id>-attempt-N` counts only when
    it carries this job's metadata, so another job that happens to be named like that is not taken for one."""
    found = {}
    for info in client.list_jobs():
        sid, meta = info.submission_id or "", info.metadata or {}
        match = re.fullmatch(re.escape(job_id) + r"-attempt-(\d+)", sid)
        if sid == job_id:
            found[1] = info
        elif match and meta.get("flashu_job_id") == job_id:
            found[int(match.group(1))] = info
    return sorted(found.items())


def latest(client, job_id: str) -> tuple[int, object]:
    runs = attempts(client, job_id)
    if not runs:
        raise ValueError(f"no submission of job {job_id!r} on this cluster; submit it with `flashu-batch submit "
                         f"SPEC` (or check --address).")
    return runs[-1]


def submit(spec: JobSpec, address: str | None = None, resume: bool = False, retry_errors: bool = False,
           allow_changed_settings: bool = False) -> str:
    """Submit a validated spec once -> the submission id. Raises AlreadySubmitted when the job was submitted
    before, unless `resume` and its latest attempt ended unsuccessfully, or `retry_errors` and it ended (the new
    attempt runs again the ids committed only as error rows). allow_changed_settings: the cluster's run goes on
    when the spec's settings differ from the ones the job's output was made with (`run --allow-changed-settings`)."""
    client = connect(address)
    runs = attempts(client, spec.job_id)
    if runs:
        check_resumable(spec.job_id, *runs[-1], resume, retry_errors)
    number = runs[-1][0] + 1 if runs else 1
    submission_id = attempt_id(spec.job_id, number)
    with tempfile.TemporaryDirectory(prefix="flashu-submit-") as folder:
        with open(os.path.join(folder, SPEC_FILE), "w", encoding="utf-8") as f:
            json.dump(spec.model_dump(mode="json", exclude_unset=True), f, indent=1)
        try:
            entrypoint = (ENTRYPOINT + (" --retry-errors" if retry_errors else "")
                          + (" --allow-changed-settings" if allow_changed_settings else ""))
            client.submit_job(entrypoint=entrypoint, submission_id=submission_id, runtime_env={"working_dir": folder},
                              metadata={"flashu_job_id": spec.job_id, "flashu_attempt": str(number)})
        except RuntimeError as e:
            if "already exists" in str(e):  # another submit of this job got there first (the server decides)
                raise AlreadySubmitted(f"job {spec.job_id!r} was just submitted as {submission_id!r} by another "
                                       f"submit; watch it with `flashu-batch status {spec.job_id}`.") from None
            raise
    return submission_id


def check_resumable(job_id: str, number: int, info, resume: bool, retry_errors: bool = False) -> None:
    """Raise AlreadySubmitted unless `resume` and the latest attempt ended without success, or `retry_errors` and
    it ended."""
    now = state(info)
    if (resume and now in UNSUCCESSFUL) or (retry_errors and now in FINISHED):
        return
    what = f"job {job_id!r} was already submitted (latest attempt {number}, {info.submission_id!r}, is {now})"
    if now not in FINISHED:
        hint = f"it is still going: watch it with `flashu-batch logs {job_id} --follow`"
    elif now == "SUCCEEDED":
        hint = ("it finished, so its output is complete; to run its error rows again, submit with --retry-errors; "
                "to run the spec again from scratch, give it a new job_id")
    else:
        hint = "to resume it (committed rows are kept and skipped), submit again with --resume"
    raise AlreadySubmitted(f"{what}; {hint}.")


def local_paths(spec: JobSpec) -> list[str]:
    """The spec's locations that are local paths: a cluster's nodes see them only on a shared filesystem."""
    from flashu_batch.showo2.hub import parse_ref

    return [p for p in spec.locations() if not p.startswith("s3://") and parse_ref(p) is None]  # Hub ids: every node


def _when(ms: int | None) -> str:
    if not ms:
        return "-"
    return datetime.datetime.fromtimestamp(ms / 1000, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def status_lines(client, job_id: str) -> list[str]:
    """The latest attempt: state, message, start and end times."""
    number, info = latest(client, job_id)
    now = state(info)
    took = f" ({(info.end_time - info.start_time) / 1000:.1f}s)" if info.end_time and info.start_time else ""
    lines = [f"job {job_id}: {now} (attempt {number}, submission {info.submission_id})",
             f"  message: {info.message or '-'}",
             f"  started: {_when(info.start_time)}, ended: {_when(info.end_time)}{took}"]
    if now in UNSUCCESSFUL:
        lines.append("  resume: flashu-batch submit SPEC --resume (committed rows are kept and skipped)")
    return lines


def print_logs(client, job_id: str, follow: bool = False) -> str:
    """Print the latest attempt's logs (with follow: as they come, until it ends) -> its state afterwards."""
    import asyncio

    _, info = latest(client, job_id)
    if follow:
        import aiohttp

        async def tail():
            async for chunk in client.tail_job_logs(info.submission_id):
                print(chunk, end="", flush=True)

        try:
            asyncio.run(tail())
        except (RuntimeError, aiohttp.ClientError) as e:  # the head, or a proxy in front of it, dropped the stream
            raise RuntimeError(f"the log stream broke ({e}); the job may still be running: `flashu-batch status "
                               f"{job_id}` shows it, `flashu-batch logs {job_id} --follow` follows it again") from None
    else:
        print(client.get_job_logs(info.submission_id), end="", flush=True)
    return state(client.get_job_info(info.submission_id))
