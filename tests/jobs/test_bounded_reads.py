"""Bounded reads (jobs/storage.py read_bytes, scheduler/validate.py load_image): an image read takes at most
max_bytes + 1 bytes, whatever a size query said, and a path that is no regular file is refused before it is opened.

Real files of each kind (directory, FIFO with no writer, symlink to a FIFO, socket, /dev/zero, a /proc file whose
size reads 0), a real S3 server (moto_server), and a real HTTP server that lies about the object (ignores the Range,
states no length or a wrong one, and streams without end).
"""

import os
import socket
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pytest

from batch_testkit import make_bucket, png_bytes
from flashu_batch.jobs.spec import StorageSpec
from flashu_batch.jobs.storage import NotARegularFile, ObjectTooLarge, Storage, join
from flashu_batch.scheduler.read import ROW_SCHEMAS
from flashu_batch.scheduler.validate import validate_vqa

CAP = 100
HANG_S = 10.0  # a read that takes longer than this is taken as blocked forever


def read_or_hang(storage: Storage, uri: str, max_bytes: int | None = CAP):
    """storage.read_bytes in a thread joined with a timeout: a read that blocks (a FIFO with no writer) fails the
    test instead of hanging it. -> the bytes read, or the exception raised."""
    out = {}

    def target():
        try:
            out["value"] = storage.read_bytes(uri, max_bytes=max_bytes)
        except Exception as e:  # noqa: BLE001 -- handed to the test
            out["value"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(HANG_S)
    if thread.is_alive():
        pytest.fail(f"read_bytes({uri!r}) still blocked after {HANG_S:g}s")
    return out["value"]


@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "fifo"
    os.mkfifo(path)
    yield path
    try:  # a test that failed with a reader blocked in open(): a writer end lets it return
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        pass


@pytest.fixture
def unix_socket():
    folder = tempfile.mkdtemp(dir="/tmp")  # a short path: AF_UNIX names are at most 107 bytes
    path = os.path.join(folder, "s")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(path)
        yield path
    os.unlink(path)
    os.rmdir(folder)


# ---- local paths ---------------------------------------------------------------------------------------------

def test_paths_that_are_no_regular_file_are_refused_before_opening(tmp_path, fifo, unix_socket):
    (tmp_path / "link-to-fifo").symlink_to(fifo)
    (tmp_path / "folder").mkdir()
    (tmp_path / "link-to-folder").symlink_to(tmp_path / "folder")
    expected = {
        str(tmp_path / "folder"): "a directory",
        str(tmp_path / "link-to-folder"): "a symbolic link to a directory",
        str(fifo): "a named pipe (FIFO)",
        str(tmp_path / "link-to-fifo"): "a symbolic link to a named pipe (FIFO)",
        unix_socket: "a socket",
        "/dev/zero": "a character device",
    }
    for path, kind in expected.items():
        for max_bytes in (CAP, None):  # uncapped reads (commit records, manifests) are refused the same way
            error = read_or_hang(Storage(), path, max_bytes)
            assert isinstance(error, NotARegularFile), (path, error)
            assert error.kind == kind and str(error) == f"{path!r} is {kind}, not a regular file"


def test_a_file_whose_stat_says_zero_is_read_with_the_cap():
    path = "/proc/self/status"  # a regular file per stat, of size 0, with some 1.4 kB to read
    assert os.stat(path).st_size == 0
    data = read_or_hang(Storage(), path, max_bytes=1 << 20)
    assert isinstance(data, bytes) and data.startswith(b"Name:") and len(data) > CAP
    error = read_or_hang(Storage(), path, max_bytes=CAP)
    assert isinstance(error, ObjectTooLarge) and error.size is None  # only the capped read knew it
    assert str(error) == (f"{path} is over the {CAP}-byte limit (its size was not known in advance; reading stopped "
                          f"at {CAP + 1} bytes)")


def test_a_regular_file_at_and_over_the_cap(tmp_path):
    (tmp_path / "at").write_bytes(b"a" * CAP)
    (tmp_path / "over").write_bytes(b"o" * (CAP + 1))
    assert read_or_hang(Storage(), str(tmp_path / "at")) == b"a" * CAP
    error = read_or_hang(Storage(), str(tmp_path / "over"))
    assert isinstance(error, ObjectTooLarge) and error.size == CAP + 1
    assert str(error) == f"{tmp_path / 'over'} is {CAP + 1} bytes, over the {CAP}-byte limit"
    assert isinstance(read_or_hang(Storage(), str(tmp_path / "nope")), FileNotFoundError)
    (tmp_path / "dangling").symlink_to(tmp_path / "nope")
    assert isinstance(read_or_hang(Storage(), str(tmp_path / "dangling")), FileNotFoundError)


def vqa_rows(paths: list[str]) -> pa.Table:
    return pa.Table.from_pylist([dict(id=str(i), question="what?", image_bytes=None, image_path=p, image_sha256=None,
                                      error=None) for i, p in enumerate(paths)], schema=ROW_SCHEMAS["vqa"])


def test_validate_turns_each_refused_path_into_an_error_row(tmp_path, fifo, unix_socket):
    (tmp_path / "link-to-fifo").symlink_to(fifo)
    (tmp_path / "ok.png").write_bytes(png_bytes())
    paths = [str(tmp_path), str(fifo), str(tmp_path / "link-to-fifo"), unix_socket, "/dev/zero", "/proc/self/status",
             str(tmp_path / "ok.png")]
    result = {}
    thread = threading.Thread(target=lambda: result.update(
        rows=validate_vqa(vqa_rows(paths), Storage(), max_image_bytes=1000).to_pylist()), daemon=True)
    thread.start()
    thread.join(HANG_S)
    assert not thread.is_alive(), f"validate_vqa still blocked after {HANG_S:g}s"
    errors = [r["error"] for r in result["rows"]]
    assert errors == [
        f"image {str(tmp_path)!r} is a directory, not a regular file",
        f"image {str(fifo)!r} is a named pipe (FIFO), not a regular file",
        f"image {str(tmp_path / 'link-to-fifo')!r} is a symbolic link to a named pipe (FIFO), not a regular file",
        f"image {unix_socket!r} is a socket, not a regular file",
        "image '/dev/zero' is a character device, not a regular file",
        "image '/proc/self/status' is over the 1000-byte limit (params.max_image_bytes; its size was not known in "
        "advance, reading stopped at 1001 bytes)",
        None,
    ]
    assert [r["image_bytes"] is None for r in result["rows"]] == [True] * 6 + [False]


# ---- S3 ------------------------------------------------------------------------------------------------------

def test_s3_objects_at_and_over_the_cap(s3_endpoint):
    storage = Storage(StorageSpec(endpoint_url=s3_endpoint, path_style=True))
    bucket = make_bucket(s3_endpoint, "bounded-reads")
    objects = {"empty": b"", "at": b"a" * CAP, "over": b"o" * (CAP + 1), "big": os.urandom(5 << 20)}
    for name, data in objects.items():
        storage.write_bytes(join(bucket, name), data)
    assert storage.read_bytes(join(bucket, "empty"), max_bytes=CAP) == b""  # no byte 0 for a Range: still read
    assert storage.read_bytes(join(bucket, "at"), max_bytes=CAP) == b"a" * CAP
    for name in ("over", "big"):
        with pytest.raises(ObjectTooLarge) as info:
            storage.read_bytes(join(bucket, name), max_bytes=CAP)
        assert info.value.size == len(objects[name])  # the total from Content-Range: bytes 0-100/<size>
        assert str(info.value) == f"{bucket}/{name} is {len(objects[name])} bytes, over the {CAP}-byte limit"
    assert storage.read_bytes(join(bucket, "big")) == objects["big"]  # uncapped reads are whole


class LyingS3(BaseHTTPRequestHandler):
    """Answers every GET with 200, ignoring its Range, and a body that never ends: chunked (no length at all) or
    under a Content-Length of 1 TB. Counts what it managed to send before the client hung up."""

    sent: dict = {}

    def do_GET(self):  # noqa: N802 -- http.server's name
        chunked = "chunked" in self.path
        self.send_response(200)
        self.send_header("Content-Type", "binary/octet-stream")
        self.send_header(*(("Transfer-Encoding", "chunked") if chunked else ("Content-Length", str(1 << 40))))
        self.end_headers()
        block, sent = b"\0" * 65536, 0
        try:
            while sent < 1 << 30:  # 1 GiB: far past what a capped read may take
                self.wfile.write(b"%x\r\n%s\r\n" % (len(block), block) if chunked else block)
                sent += len(block)
        except OSError:  # the client closed the connection: the point of the test
            pass
        LyingS3.sent[self.path] = sent

    def log_message(self, *args):
        pass


def test_a_server_that_ignores_the_range_cannot_make_the_read_take_more(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    server = ThreadingHTTPServer(("127.0.0.1", 0), LyingS3)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        storage = Storage(StorageSpec(endpoint_url=url, path_style=True, region="us-east-1"))
        for key, size in (("chunked", None), ("long", 1 << 40)):  # no stated size; a stated size of 1 TB
            start = time.monotonic()
            error = read_or_hang(storage, f"s3://lying/{key}", CAP)
            assert isinstance(error, ObjectTooLarge) and error.size == size, error
            assert time.monotonic() - start < HANG_S
        deadline = time.monotonic() + HANG_S
        while len(LyingS3.sent) < 2 and time.monotonic() < deadline:  # the handlers end once the client hung up
            time.sleep(0.05)
        assert all(sent < 1 << 30 for sent in LyingS3.sent.values()), LyingS3.sent  # it stopped reading
    finally:
        server.shutdown()
        server.server_close()
