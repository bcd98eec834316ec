"""jobs/storage.py on local paths and on a real S3 server process (moto_server): the same behaviour for both."""

import pytest

from batch_testkit import make_bucket
from flashu_batch.jobs.spec import StorageSpec
from flashu_batch.jobs.storage import Storage, join


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return Storage(), str(tmp_path)
    url = request.getfixturevalue("s3_endpoint")
    return Storage(StorageSpec(endpoint_url=url, path_style=True)), join(make_bucket(url, "storage-test"),
                                                                           tmp_path.name)


def test_bytes_round_trip_list_delete(root):
    storage, base = root
    a, b = join(base, "x", "a.json"), join(base, "x", "sub", "b.bin")
    storage.write_bytes(a, b"1")
    storage.write_bytes(a, b"22")  # replace
    storage.write_bytes(b, b"333")
    assert storage.read_bytes(a) == b"22" and storage.read_many([a, b]) == [b"22", b"333"]
    assert storage.exists(a) and storage.is_file(a) and not storage.is_file(join(base, "x"))
    assert [(f["uri"], f["size"]) for f in storage.list(join(base, "x"))] == [(a, 2), (b, 3)]
    assert storage.list(join(base, "nothing-here")) == []
    storage.delete(a)
    assert not storage.exists(a)
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(a)


def test_create_only(root):
    storage, base = root
    uri = join(base, "_commits", "k.json")
    assert storage.create(uri, b"first") is True
    assert storage.create(uri, b"second") is False
    assert storage.read_bytes(uri) == b"first"


def test_s3_conditional_put_modes(s3_endpoint):
    bucket = make_bucket(s3_endpoint, "modes")
    for mode in ("auto", "always", "never"):
        storage = Storage(StorageSpec(endpoint_url=s3_endpoint, path_style=True, conditional_put=mode))
        uri = join(bucket, mode)
        assert storage.create(uri, b"1") and not storage.create(uri, b"2") and storage.read_bytes(uri) == b"1"


def test_arrow_fs_takes_host_port_and_scheme(s3_endpoint):
    import pyarrow as pa
    import pyarrow.parquet as pq

    storage = Storage(StorageSpec(endpoint_url=s3_endpoint, path_style=True, region="us-east-1"))
    uri = join(make_bucket(s3_endpoint, "arrow"), "t.parquet")
    fs, path = storage.arrow_fs(uri)
    assert path == "arrow/t.parquet"
    pq.write_table(pa.table({"a": [1, 2]}), path, filesystem=fs)
    assert pq.read_table(path, filesystem=fs).column("a").to_pylist() == [1, 2]


def test_storage_pickles_without_clients(s3_endpoint):
    import pickle

    storage = Storage(StorageSpec(endpoint_url=s3_endpoint, path_style=True))
    storage.s3_client()
    copy = pickle.loads(pickle.dumps(storage))
    assert copy._s3 is None and copy.settings == storage.settings


class RefusingClient:
    """An S3 client whose server does not implement conditional writes (501 NotImplemented on If-None-Match)."""

    def __init__(self):
        self.objects = {}

    def put_object(self, Bucket, Key, Body, **kwargs):
        from botocore.exceptions import ClientError

        if "IfNoneMatch" in kwargs:
            raise ClientError({"Error": {"Code": "NotImplemented", "Message": "no conditional writes"},
                               "ResponseMetadata": {"HTTPStatusCode": 501}}, "PutObject")
        self.objects[(Bucket, Key)] = Body

    def head_object(self, Bucket, Key):
        from botocore.exceptions import ClientError

        if (Bucket, Key) not in self.objects:
            raise ClientError({"Error": {"Code": "404", "Message": "Not Found"}}, "HeadObject")


def test_create_only_falls_back_where_the_server_refuses_conditional_puts(capsys):
    storage = Storage(StorageSpec(conditional_put="auto"))
    storage._s3 = RefusingClient()
    assert storage.create("s3://b/k", b"1") is True and storage.create("s3://b/k", b"2") is False
    assert storage._s3.objects[("b", "k")] == b"1" and "using HEAD-then-PUT" in capsys.readouterr().err
    strict = Storage(StorageSpec(conditional_put="always"))
    strict._s3 = RefusingClient()
    with pytest.raises(Exception, match="NotImplemented"):
        strict.create("s3://b/k", b"1")


class FailingS3:
    """An S3 client whose get_object raises `error`."""

    def __init__(self, error: Exception):
        self.error = error

    def get_object(self, **kwargs):
        raise self.error


def client_error(code: str, status: int):
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}},
                       "GetObject")


def outages():
    from botocore.exceptions import ConnectionClosedError, EndpointConnectionError, ReadTimeoutError

    return [EndpointConnectionError(endpoint_url="http://s3"), ConnectionClosedError(endpoint_url="http://s3"),
            ReadTimeoutError(endpoint_url="http://s3"), client_error("SlowDown", 503),
            client_error("InternalError", 500), client_error("TooManyRequests", 429)]


def test_a_read_that_meets_an_outage_is_storage_unavailable_and_answers_about_the_object_are_not(monkeypatch):
    from flashu_batch.jobs.storage import StorageUnavailable

    storage = Storage(StorageSpec(endpoint_url="http://s3", path_style=True))
    for error in outages():
        monkeypatch.setattr(storage, "s3_client", lambda error=error: FailingS3(error))
        with pytest.raises(StorageUnavailable, match=r"^storage unavailable reading s3://b/k\.png: ") as caught:
            storage.read_bytes("s3://b/k.png")
        assert caught.value.__cause__ is error
    for error, expected in [(client_error("NoSuchKey", 404), FileNotFoundError),
                            (client_error("AccessDenied", 403), Exception),
                            (client_error("InvalidObjectState", 403), Exception)]:
        monkeypatch.setattr(storage, "s3_client", lambda error=error: FailingS3(error))
        with pytest.raises(expected) as caught:
            storage.read_bytes("s3://b/k.png")
        assert not isinstance(caught.value, StorageUnavailable), error
