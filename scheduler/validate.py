"""The CPU validation/decoding stage: content checks that need no model, before any GPU time is spent.

Rows that fail get their `error` set and travel on (the worker passes them through, the writer commits them), so
every input id ends in the output exactly once, with a message saying what was wrong.
"""

import hashlib
import io

import pyarrow as pa

from jobs.storage import Storage
from scheduler.read import ROW_SCHEMAS

MAX_IMAGE_PIXELS = 64_000_000  # larger images are refused (decompression bombs; no model input needs them)


def validate_t2i(batch: pa.Table) -> pa.Table:
    rows = batch.to_pylist()
    for row in rows:
        if row["error"] is not None:
            continue
        if row["prompt"] is None:
            row["error"] = "prompt is missing"
        elif not row["prompt"].strip():
            row["error"] = "prompt is empty"
    return pa.Table.from_pylist(rows, schema=ROW_SCHEMAS["t2i"])


def validate_vqa(batch: pa.Table, storage: Storage) -> pa.Table:
    """Questions present; images present, fetched (URI: local path or s3://), decodable, and hashed."""
    rows = batch.to_pylist()
    for row in rows:
        if row["error"] is not None:
            continue
        if row["question"] is None:
            row["error"] = "question is missing"
        elif not row["question"].strip():
            row["error"] = "question is empty"
        elif row["image_bytes"] is None and row["image_path"] is None:
            row["error"] = "image is missing"
        else:
            row["error"] = load_image(row, storage)
    return pa.Table.from_pylist(rows, schema=ROW_SCHEMAS["vqa"])


def load_image(row: dict, storage: Storage) -> str | None:
    """Fill row["image_bytes"] (fetching its URI if needed) and row["image_sha256"]; return an error or None."""
    from PIL import Image

    if row["image_bytes"] is None:
        try:
            row["image_bytes"] = storage.read_bytes(row["image_path"])
        except FileNotFoundError:
            return f"image {row['image_path']!r} does not exist"
        except Exception as e:  # noqa: BLE001 -- permissions, network: the row fails, the job goes on
            return f"image {row['image_path']!r} could not be read: {type(e).__name__}: {e}"
    data = row["image_bytes"]
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > MAX_IMAGE_PIXELS:
                return f"image is {image.width}x{image.height}, over the {MAX_IMAGE_PIXELS}-pixel limit"
            image.load()  # decodes the whole file: catches truncated data that the header alone does not
    except Exception as e:  # noqa: BLE001
        row["image_bytes"] = None  # nothing to pass on
        reason = "not a recognized image format" if type(e).__name__ == "UnidentifiedImageError" else \
            f"{type(e).__name__}: {e}"
        return f"image could not be decoded ({len(data)} bytes): {reason}"
    row["image_sha256"] = hashlib.sha256(data).hexdigest()
    return None
