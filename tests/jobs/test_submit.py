"""`flashu-batch submit | status | logs` against a real Ray head (`ray start --head` on loopback, token
authentication on, one custom resource), started once for this module and stopped by its own session's PIDs."""

import http.server
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import pytest

from batch_testkit import spec_dict, tiny_checkpoint
from flashu_batch.app.cli import main
from flashu_batch.jobs.output import read_output
from flashu_batch.jobs.storage import Storage

AUTH_ENV = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")
HEAD_PORTS = ("port", "dashboard-port", "ray-client-server-port", "dashboard-agent-listen-port",
              "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port", "node-manager-port",
              "object-manager-port")  # every port Ray would otherwise take from a fixed default


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_session(sid: int) -> None:
    """SIGTERM the head's process group, then SIGKILL whatever of its session is left (Ray's workers get process
    groups of their own). Only processes of this session: the head was started in a new one."""
    try:
        os.killpg(sid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and session_pids(sid):
        time.sleep(0.5)
    for pid in session_pids(sid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def session_pids(sid: int) -> list[int]:
    pids = []
    for name in os.listdir("/proc"):
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # after "(comm)": state ppid pgrp session ...
        except (OSError, IndexError):
            continue
        if name.isdigit() and int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(name))
    return pids


class HeadDidNotStart(RuntimeError):
    pass


def start_head(token: str) -> tuple[subprocess.Popen, str, str]:
    """`ray start --head --block` in a session of its own -> (process, dashboard URL, temp dir)."""
    temp = tempfile.mkdtemp(prefix="fbh", dir="/tmp")  # short: Ray's socket paths live under it
    ports = {name: free_port() for name in HEAD_PORTS}
    env = {k: v for k, v in os.environ.items() if k not in AUTH_ENV}
    env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token,
               DASHBOARD_METRIC_PORT=str(free_port()),  # a fixed default otherwise, taken by any other dashboard
               # the dashboard's start limits (60 s, 30 s a module) are short for a busy 2-core machine
               RAY_DASHBOARD_STARTUP_TIMEOUT_S="240", RAY_DASHBOARD_SUBPROCESS_MODULE_WAIT_READY_TIMEOUT="180")
    cmd = ["ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
           "--include-dashboard=true", "--num-cpus=2", '--resources={"t2i": 1}', "--disable-usage-stats",
           f"--temp-dir={temp}", *(f"--{name}={port}" for name, port in ports.items())]
    with open(os.path.join(temp, "head.log"), "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, f"http://127.0.0.1:{ports['dashboard-port']}", temp


def wait_for_head(proc, url: str, token: str, temp: str, timeout_s: float = 300) -> None:
    """Until `ray start` says the runtime started (the dashboard answers earlier, and goes away again when a late
    raylet makes `ray start` give up) and the Jobs API answers with this token."""
    deadline = time.monotonic() + timeout_s
    request = urllib.request.Request(url + "/api/jobs/", headers={"Authorization": f"Bearer {token}"})
    while proc.poll() is None and time.monotonic() < deadline:
        with open(os.path.join(temp, "head.log")) as f:
            started = "Ray runtime started" in f.read()
        try:
            if started:
                urllib.request.urlopen(request, timeout=5).close()
                return
        except OSError:  # HTTPError (a subclass) while the job module loads
            pass
        time.sleep(0.5)
    with open(os.path.join(temp, "head.log")) as f:
        raise HeadDidNotStart(f"the Ray head did not start at {url} (exit code {proc.poll()}):\n{f.read()[-3000:]}")


def stop_head(proc, temp: str) -> None:
    stop_session(proc.pid)
    proc.wait(timeout=30)
    shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_head():
    """(dashboard URL, token) of a Ray head on 127.0.0.1 with RAY_AUTH_MODE=token and {"t2i": 1}."""
    token = secrets.token_hex(32)
    for attempt in range(3):  # Ray gives a raylet a fixed 30 s to register: a very busy machine can miss it
        proc, url, temp = start_head(token)
        try:
            wait_for_head(proc, url, token, temp)
            break
        except HeadDidNotStart:
            stop_head(proc, temp)
            if attempt == 2:
                raise
    try:
        yield url, token
    finally:
        stop_head(proc, temp)


@pytest.fixture
def clean_env(monkeypatch):
    """No Ray address or token settings from the outside (a local ray.init() in this process sets RAY_AUTH_MODE)."""
    for name in AUTH_ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def cli_process(env: dict, *argv) -> tuple[int, str, str]:
    """The CLI in a fresh process: Ray reads RAY_AUTH_MODE once per process, so a run without a token is checked
    where no earlier setting (or a local ray.init()) can have switched this process to token mode."""
    env = {**{k: v for k, v in os.environ.items() if k not in AUTH_ENV}, **env}
    result = subprocess.run([sys.executable, "-m", "flashu_batch.app.cli", *argv], env=env, capture_output=True, text=True,
                            timeout=120)
    return result.returncode, result.stdout, result.stderr


def test_submit_refuses_a_second_submission_resumes_a_failed_job_and_reports(ray_head, clean_env, capsys, tmp_path):
    url, token = ray_head
    clean_env.setenv("RAY_AUTH_TOKEN", token)
    prompts = tmp_path / "prompts.jsonl"  # missing at first: the first attempt fails
    spec = spec_dict("cluster-job", tiny_checkpoint(str(tmp_path)), [dict(
        kind="t2i", input=dict(uris=str(prompts), format="jsonl"), output=str(tmp_path / "out"),
        params=dict(steps=2), rows_per_file=2,
        resources=dict(workers=1, gpus_per_worker=0, cpus_per_worker=0.5, batch_size=2, custom={"t2i": 1}))])
    (tmp_path / "job.json").write_text(json.dumps(spec))
    submit = ["submit", str(tmp_path / "job.json"), "--address", url]

    rc, out, err = cli(capsys, *submit)
    assert rc == 0 and "submitted job cluster-job as cluster-job;" in out, err
    assert "local paths" in err  # the spec's paths are seen by this one-machine cluster only
    rc, _, err = cli(capsys, *submit)
    assert rc == 3 and "job 'cluster-job' was already submitted" in err  # idempotent: one job, not two

    rc, logs, err = cli(capsys, "logs", "cluster-job", "--address", url, "--follow")
    assert rc == 1 and "job cluster-job: FAILED" in err and "does not exist" in logs, err + logs
    clean_env.setenv("RAY_ADDRESS", "http://127.0.0.1:9")  # an explicit --address wins over the environment
    rc, out, _ = cli(capsys, "status", "cluster-job", "--address", url)
    assert rc == 0 and "job cluster-job: FAILED (attempt 1, submission cluster-job)" in out and "--resume" in out
    clean_env.delenv("RAY_ADDRESS")
    rc, _, err = cli(capsys, *submit)
    assert rc == 3 and "submit again with --resume" in err

    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("a red circle", "two cats", "")))
    rc, out, _ = cli(capsys, *submit, "--resume")
    assert rc == 0 and "as cluster-job-attempt-2;" in out, err
    rc, _, err = cli(capsys, *submit, "--resume")
    assert rc == 3 and "still going" in err  # an active attempt is never doubled

    clean_env.setenv("RAY_API_SERVER_ADDRESS", url)  # the address as Ray users set it
    rc, logs, err = cli(capsys, "logs", "cluster-job", "--follow")
    assert rc == 0 and "job cluster-job: SUCCEEDED" in err, logs
    assert "t2i: 3/3 rows, 1 errors" in logs and "job cluster-job: done" in logs
    rc, out, _ = cli(capsys, "status", "cluster-job")
    assert rc == 0 and "job cluster-job: SUCCEEDED (attempt 2, submission cluster-job-attempt-2)" in out
    assert "started: 20" in out and "ended: 20" in out
    rc, logs, _ = cli(capsys, "logs", "cluster-job")
    assert rc == 0 and "t2i: 3/3 rows" in logs
    rc, _, err = cli(capsys, *submit, "--resume")
    assert rc == 3 and "it finished" in err and "--retry-errors" in err

    rc, out, _ = cli(capsys, *submit, "--retry-errors")  # the finished job's error rows, once more
    assert rc == 0 and "as cluster-job-attempt-3;" in out
    rc, logs, err = cli(capsys, "logs", "cluster-job", "--follow")
    assert rc == 0 and "job cluster-job: SUCCEEDED" in err, logs
    assert "1 error rows retried" in logs and "2 done before" in logs, logs

    table = read_output(Storage(), str(tmp_path / "out" / "cluster-job" / "t2i"))
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 3
    assert sorted(e or "" for e in table.column("error").to_pylist()) == ["", "", "prompt is empty"]
    assert token not in out + err + logs


def test_token_errors_are_clear_and_never_show_a_token(ray_head, clean_env, capsys, tmp_path):
    url, token = ray_head
    rc, out, err = cli_process({}, "status", "any-job", "--address", url)
    assert rc == 2 and f"the cluster at {url} requires a token" in err and "RAY_AUTH_TOKEN" in err

    clean_env.setenv("RAY_AUTH_TOKEN", "not-the-token-1234")
    rc, out, err = cli(capsys, "status", "any-job", "--address", url)
    assert rc == 2 and "rejected the token from RAY_AUTH_TOKEN: it is not this cluster's token" in err
    assert "not-the-token-1234" not in out + err

    clean_env.delenv("RAY_AUTH_TOKEN")
    (tmp_path / "token").write_text(token + "\n")
    clean_env.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "token"))
    rc, out, err = cli(capsys, "status", "any-job", "--address", url)
    assert rc == 2 and "no submission of job 'any-job'" in err  # authenticated: the cluster answered
    assert token not in out + err

    rc, _, err = cli_process(dict(RAY_AUTH_MODE="disabled", RAY_AUTH_TOKEN=token), "status", "any-job", "--address",
                             url)
    assert rc == 2 and "requires a token" in err  # disabled: no token is sent, whatever else is set


def test_token_mode_without_a_token_and_a_bad_spec_fail_before_any_request(clean_env, capsys, tmp_path):
    unreachable = f"http://127.0.0.1:{free_port()}"
    clean_env.setenv("RAY_AUTH_MODE", "token")
    clean_env.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing-token"))
    rc, _, err = cli(capsys, "status", "j", "--address", unreachable)
    assert rc == 2 and f"{tmp_path / 'missing-token'} cannot be used (No such file or directory)" in err

    clean_env.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token either
    clean_env.delenv("RAY_AUTH_TOKEN_PATH")
    rc, _, err = cli(capsys, "logs", "j", "--address", unreachable)
    assert rc == 2 and "auth_token cannot be used" in err

    rc, _, err = cli_process({}, "status", "j", "--address", unreachable)
    assert rc == 2 and f"cannot reach the Ray Jobs API at {unreachable}" in err

    (tmp_path / "bad.yaml").write_text("job_id: j\nmodel: {checkpoint: m}\ntasks:\n  - {kind: t2i, input: "
                                       "{uris: p.jsonl, format: jsonl}, output: out, resources: {custom: {GPU: 1}}}\n")
    rc, _, err = cli(capsys, "submit", str(tmp_path / "bad.yaml"), "--address", unreachable)
    assert rc == 2 and "tasks[0].resources.custom: " in err and "cannot reach" not in err

    clean_env.delenv("RAY_AUTH_MODE")
    rc, _, err = cli(capsys, "status", "j")
    assert rc == 2 and "no cluster address: pass --address http://HEAD:8265" in err


class FailingJobsAPI(http.server.BaseHTTPRequestHandler):
    """A head whose Jobs API answers 500 to every request (an overloaded or broken dashboard); its version check
    too unless the server's `version_ok`."""

    def do_GET(self):
        if self.path == "/api/version" and self.server.version_ok:
            self.answer(200, json.dumps({"version": "4", "ray_version": "2.60.0", "ray_commit": "x",
                                         "session_name": "s"}))
        else:
            self.answer(500, "the head is overloaded")

    do_POST = do_GET

    def answer(self, code: int, body: str) -> None:
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("version_ok", [True, False], ids=["requests-fail", "version-check-fails"])
def test_a_jobs_api_error_status_is_one_clear_line_and_exit_1(clean_env, capsys, tmp_path, version_ok):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FailingJobsAPI)
    server.version_ok = version_ok
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    (tmp_path / "job.yaml").write_text("job_id: j\nmodel: {checkpoint: s3://m/c}\ntasks:\n  - {kind: t2i, input: "
                                       "{uris: s3://d/p.jsonl, format: jsonl}, output: s3://o}\n")
    try:
        for argv in (["status", "j"], ["logs", "j"], ["logs", "j", "--follow"], ["submit", str(tmp_path / "job.yaml")]):
            rc, out, err = cli(capsys, *argv, "--address", url)
            assert rc == 1 and out == "", argv
            assert err.count("\n") == 1 and "500" in err and err.startswith(f"flashu-batch {argv[0]}: "), (argv, err)
            if not version_ok:
                assert f"the Ray Jobs API at {url} failed its version check" in err
            else:
                assert "the head is overloaded" in err  # the cluster's own words
    finally:
        server.shutdown()


def running_job(submission_id: str) -> dict:
    return {"type": "SUBMISSION", "job_id": None, "submission_id": submission_id, "driver_info": None,
            "status": "RUNNING", "entrypoint": "python -m jobs.driver", "message": "running", "error_type": None,
            "start_time": 1, "end_time": None, "metadata": {}, "runtime_env": {},
            "driver_agent_http_address": None, "driver_node_id": None, "driver_exit_code": None}


class FlakyHead:
    """A Jobs API head (aiohttp, on its own thread) with one running job whose failure is `mode`:
    "reset": the log stream sends a line, then the connection is reset (no close frame);
    "proxy": a proxy in front of the head answers the log stream's websocket upgrade with 502;
    "gone": the log stream sends a line and closes, then the head is gone: every later request is reset;
    "gone-after-connect": only the version check answers, every other request is reset."""

    def __init__(self, mode: str):
        import asyncio

        from aiohttp import web

        self.mode, self.gone = mode, mode == "gone-after-connect"
        app = web.Application()
        app.add_routes([web.get("/api/version", self.version), web.get("/api/jobs/", self.jobs),
                        web.get("/api/jobs/{id}", self.job), web.get("/api/jobs/{id}/logs/tail", self.tail),
                        web.post("/api/jobs/", self.jobs)])
        self.loop = asyncio.new_event_loop()
        self.runner = web.AppRunner(app)
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

    def stop(self) -> None:
        import asyncio

        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)

    def reset_if_gone(self, request) -> None:
        from aiohttp import web

        if self.gone:
            request.transport.abort()
            raise web.HTTPServiceUnavailable()  # never sent: the connection is already reset

    async def version(self, request):
        from aiohttp import web

        return web.json_response({"version": "4", "ray_version": "2.60.0", "ray_commit": "x", "session_name": "s"})

    async def jobs(self, request):
        from aiohttp import web

        self.reset_if_gone(request)
        return web.json_response([running_job("j")])

    async def job(self, request):
        from aiohttp import web

        self.reset_if_gone(request)
        return web.json_response(running_job(request.match_info["id"]))

    async def tail(self, request):
        from aiohttp import web

        self.reset_if_gone(request)
        if self.mode == "proxy":
            return web.Response(status=502, text="bad gateway")
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_str("line 1\n")
        if self.mode == "reset":
            request.transport.abort()
            return ws
        await ws.close()
        self.gone = True
        return ws


@pytest.mark.parametrize("mode", ["reset", "proxy", "gone", "gone-after-connect"])
def test_a_head_that_goes_away_is_one_clear_line_and_exit_1(clean_env, tmp_path, mode):
    head = FlakyHead(mode)
    (tmp_path / "job.yaml").write_text("job_id: j\nmodel: {checkpoint: s3://m/c}\ntasks:\n  - {kind: t2i, input: "
                                       "{uris: s3://d/p.jsonl, format: jsonl}, output: s3://o}\n")
    commands = [["logs", "j", "--follow"]]
    if mode == "gone-after-connect":
        commands += [["status", "j"], ["logs", "j"], ["submit", str(tmp_path / "job.yaml")]]
    try:
        for argv in commands:
            rc, out, err = cli_process({}, *argv, "--address", head.url)  # a real run: Ray logs to its stderr
            last = err.strip().splitlines()[-1]
            assert rc == 1 and "Traceback" not in err, (argv, err)
            assert last.startswith(f"flashu-batch {argv[0]}: "), (argv, err)
            if mode in ("reset", "proxy"):
                assert out == "line 1\n" or mode == "proxy"
                assert "the log stream broke" in last and "`flashu-batch status j` shows it" in last, last
                assert ("502" in last) == (mode == "proxy"), last
            else:
                assert f"the Ray Jobs API stopped answering ({head.url}/api/jobs/" in last, last
    finally:
        head.stop()
