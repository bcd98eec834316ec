"""jobs/fetch.py: model sources to local folders (a local folder as it is; an s3:// prefix fetched once into a cache).
The model package itself reads local folders only."""

import os

import pytest
import torch

from flashu_batch.jobs.fetch import model_folder
from flashu_batch.showo2.checkpoint import CheckpointError
from flashu_batch.showo2.loading import load_showo2, save_showo2


def assert_same_state(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def tiny(make_tiny_model):
    return make_tiny_model(seed=3)


@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("saved"))
    save_showo2(tiny, folder)
    return folder


def test_local_folder_as_is_and_missing_named(saved, tmp_path):
    assert model_folder(saved) == saved
    with pytest.raises(FileNotFoundError, match="nowhere"):
        model_folder(str(tmp_path / "nowhere"))


def test_model_package_refuses_remote_sources():
    with pytest.raises(CheckpointError, match="not a local folder"):
        load_showo2("s3://models/showo2/tiny")


def test_s3_load_and_cache(saved, tiny, tmp_path, monkeypatch):
    moto = pytest.importorskip("moto")
    import boto3

    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        monkeypatch.setenv(var, "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    cache = tmp_path / "cache"
    monkeypatch.setenv("FLASHU_CACHE", str(cache))

    with moto.mock_aws():
        s3 = boto3.client("s3", region_name="us-east-1")
        s3.create_bucket(Bucket="models")
        uploaded = []
        for root, _, files in os.walk(saved):
            for name in files:
                rel = os.path.relpath(os.path.join(root, name), saved)
                s3.upload_file(os.path.join(root, name), "models", f"showo2/tiny/{rel}")
                uploaded.append(rel)
        assert "model.safetensors" in uploaded and os.path.join("llm", "config.json") in uploaded
        # A sibling prefix that must not be fetched.
        s3.put_object(Bucket="models", Key="showo2/tiny-other/model.safetensors", Body=b"junk")

        first = load_showo2(model_folder("s3://models/showo2/tiny"))
        assert_same_state(first.state_dict(), tiny.state_dict())
        local = cache / "s3" / "models" / "showo2" / "tiny"
        for rel in uploaded:
            assert (local / rel).is_file(), rel
        assert not (cache / "s3" / "models" / "showo2" / "tiny-other").exists()

        # Empty the bucket and delete it: a second load must come from the cache without calling S3.
        for obj in s3.list_objects_v2(Bucket="models")["Contents"]:
            s3.delete_object(Bucket="models", Key=obj["Key"])
        s3.delete_bucket(Bucket="models")
        second = load_showo2(model_folder("s3://models/showo2/tiny/"))
        assert_same_state(second.state_dict(), tiny.state_dict())

        # Without a cache copy the same call does go to S3 and fails: the second load above did not.
        from botocore.exceptions import ClientError

        with pytest.raises(ClientError, match=r"NoSuchBucket"):
            model_folder("s3://models/showo2/elsewhere")
