"""Model sources -> local folders: a local folder as it is, an `s3://bucket/prefix` fetched once into a local cache, a
Hugging Face Hub id through huggingface_hub's own cache (showo2/hub.py: the Hub needs no storage client, so the model
package resolves it itself, and `Showo2Pipeline.from_pretrained` takes Hub ids too).

The model loaders read local files only; S3 is resolved here, at the edge.

Endpoint, region and credentials come from boto3's standard sources (AWS_* environment variables, config files,
instance roles); nothing here logs them. Several processes on one node may ask for the same prefix at once: a file
lock makes one download and the others wait, and a marker file records a finished download.
"""

import fcntl
import os
from urllib.parse import urlparse

from flashu_batch.showo2.hub import download_checkpoint, parse_ref

DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "flashu-batch")
_DONE_MARKER = ".download-complete"


def split_s3_uri(uri: str) -> tuple[str, str]:
    """'s3://bucket/a/b' -> ('bucket', 'a/b')."""
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"Expected an s3://bucket/prefix URI, got {uri!r}.")
    return parsed.netloc, parsed.path.lstrip("/")


def fetch_prefix(uri: str, cache_dir: str | None = None, s3_client=None) -> str:
    """Download every object under the prefix (keeping relative paths) and return the local folder.

    A second call, from this process or another, returns the cached folder without touching S3.
    """
    bucket, prefix = split_s3_uri(uri)
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    local = os.path.join(cache_dir or os.environ.get("FLASHU_CACHE", DEFAULT_CACHE), "s3", bucket, prefix)
    os.makedirs(local, exist_ok=True)
    if os.path.exists(os.path.join(local, _DONE_MARKER)):
        return local
    with open(os.path.join(local, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one downloader per folder; the others wait here, then find the marker
        if os.path.exists(os.path.join(local, _DONE_MARKER)):
            return local
        if s3_client is None:
            import boto3

            s3_client = boto3.client("s3")
        count = 0
        for page in s3_client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                rel = obj["Key"][len(prefix):]
                if not rel or rel.endswith("/"):
                    continue
                target = os.path.join(local, rel)
                if os.path.normpath(target) != target.rstrip("/") or ".." in rel.split("/"):
                    raise ValueError(f"Refusing object key {obj['Key']!r}: it escapes the cache folder.")
                os.makedirs(os.path.dirname(target), exist_ok=True)
                partial = target + ".partial"  # never leave a half-written weight file under its real name
                s3_client.download_file(bucket, obj["Key"], partial)
                os.replace(partial, target)
                count += 1
        if count == 0:
            raise ValueError(f"No objects under {uri!r}: check the bucket and prefix.")
        open(os.path.join(local, _DONE_MARKER), "w").close()
    return local


def model_folder(source: str, s3_client=None) -> str:
    """A local folder for a model source: a local folder as it is, an s3:// prefix through the cache (fetch_prefix), a
    Hugging Face Hub id (`org/name[@revision]`, `hf://org/name[@revision]`) through huggingface_hub's cache
    (showo2/hub.py, which also gives the commit). Raises FileNotFoundError naming the source when a local folder is
    not there, HubError (a ValueError) when a Hub model cannot be had."""
    if source.startswith("s3://"):
        return fetch_prefix(source, s3_client=s3_client)
    ref = parse_ref(source)
    if ref is not None:
        return download_checkpoint(ref)[0]
    if not os.path.isdir(source):
        raise FileNotFoundError(f"model folder {source!r} does not exist (expected a local folder, an s3:// prefix, "
                                f"or a Hugging Face Hub id such as org/name or hf://org/name@revision)")
    return source
