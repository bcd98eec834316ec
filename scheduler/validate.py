"""The CPU validation/decoding stage: content checks that need no model, before any GPU time is spent.

Rows that fail get their `error` set and travel on (the worker passes them through, the writer commits them), so
every input id ends in the output exactly once, with a message saying what was wrong.
"""

import hashlib

import pyarrow as pa

from flashu_batch.jobs.spec import MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS
from flashu_batch.jobs.storage import NotARegularFile, ObjectTooLarge, Storage, StorageUnavailable
from flashu_batch.scheduler.read import ROW_SCHEMAS
from flashu_batch.workers.images import PIXELS_COLUMN, ImageError, decode_image, model_pixels


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


def validate_vqa(batch: pa.Table, storage: Storage, max_image_pixels: int = MAX_IMAGE_PIXELS,
                 max_image_bytes: int = MAX_IMAGE_BYTES, resolution: int | None = None) -> pa.Table:
    """Questions present; images present, fetched (URI: local path or s3://), within the limits, decodable to RGB,
    and hashed. resolution: the model's input side R; when given, the rows also get PIXELS_COLUMN, each good row's
    image decoded and resized here once (workers/images.py model_pixels; null on error rows), so the VQA worker
    does not decode it again."""
    rows = batch.to_pylist()
    pixels = [None] * len(rows)
    for i, row in enumerate(rows):
        if row["error"] is not None:
            continue
        if row["question"] is None:
            row["error"] = "question is missing"
        elif not row["question"].strip():
            row["error"] = "question is empty"
        elif row["image_bytes"] is None and row["image_path"] is None:
            row["error"] = "image is missing"
        else:
            row["error"], pixels[i] = load_image(row, storage, max_image_pixels, max_image_bytes, resolution)
    table = pa.Table.from_pylist(rows, schema=ROW_SCHEMAS["vqa"])
    if resolution is None:
        return table
    pixels_type = pa.binary(resolution * resolution * 3)  # fixed size: (R, R, 3) uint8, no offsets
    return table.append_column(pa.field(PIXELS_COLUMN, pixels_type), pa.array(pixels, pixels_type))


def load_image(row: dict, storage: Storage, max_pixels: int, max_bytes: int,
               resolution: int | None = None) -> tuple[str | None, bytes | None]:
    """Fill row["image_bytes"] (fetching its URI if needed) and row["image_sha256"] (of those original bytes) ->
    (error or None, the model-ready pixels when a resolution is given and the image is good, else None)."""
    if row["image_bytes"] is None:
        try:
            row["image_bytes"] = storage.read_bytes(row["image_path"], max_bytes=max_bytes)
        except FileNotFoundError:
            return f"image {row['image_path']!r} does not exist", None
        except NotARegularFile as e:  # a directory, FIFO, device, socket: refused before it was opened
            return f"image {row['image_path']!r} is {e.kind}, not a regular file", None
        except ObjectTooLarge as e:  # at most max_bytes + 1 bytes of it were read
            return too_large(row["image_path"], e.size, max_bytes), None
        except StorageUnavailable:  # an outage, not this row: the task fails and is retried, the row stays to do
            raise
        except Exception as e:  # noqa: BLE001 -- permissions, a bad URI: the row fails, the job goes on
            return f"image {row['image_path']!r} could not be read: {type(e).__name__}: {e}", None
    data = row["image_bytes"]
    try:
        image = decode_image(data, max_pixels, max_bytes)
    except ImageError as e:
        row["image_bytes"] = None  # nothing to pass on
        return str(e), None
    row["image_sha256"] = hashlib.sha256(data).hexdigest()
    return None, None if resolution is None else model_pixels(image, resolution)


def too_large(path: str, size: int | None, max_bytes: int) -> str:
    """The error of an image URI over params.max_image_bytes; `size` is None where only the capped read found it
    (a file that grew after its stat, a /proc file whose size reads 0)."""
    if size is None:
        return (f"image {path!r} is over the {max_bytes}-byte limit (params.max_image_bytes; its size was not "
                f"known in advance, reading stopped at {max_bytes + 1} bytes)")
    return f"image {path!r} is {size} bytes, over the {max_bytes}-byte limit (params.max_image_bytes)"
