"""The CPU stage's model-ready pixels (scheduler/pipeline.py validate_rows with a resolution): made once per good
VQA row, other columns carried beside them, and never in the output rows (to_output_table)."""

import io

import numpy as np
import pyarrow as pa
from PIL import Image

from flashu_batch.jobs.output import SCHEMAS
from flashu_batch.jobs.spec import VQAParams
from flashu_batch.jobs.storage import Storage
from flashu_batch.scheduler.pipeline import (bucket_by_question_length, to_output_table, validate_in_blocks,
                                             validate_rows)
from flashu_batch.scheduler.read import ROW_SCHEMAS
from flashu_batch.showo2.image_input import resize_center_crop
from flashu_batch.workers.images import PIXELS_COLUMN


def png(size, seed=0) -> bytes:
    values = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(values).save(buf, "PNG")
    return buf.getvalue()


def read_stage_rows() -> pa.Table:
    images = [png((80, 40), 1), b"junk", None, png((20, 60), 2)]
    rows = [dict(id=f"r{i}", question="what", image_bytes=b, image_path=None, image_sha256=None, seed=None,
                 error=None) for i, b in enumerate(images)]
    rows[2]["error"] = "failed upstream"
    table = pa.Table.from_pylist(rows, schema=ROW_SCHEMAS["vqa"])
    return table.append_column("license", pa.array(["a", "b", "c", "d"]))


def test_validate_rows_makes_the_pixels_once_and_carries_the_rest():
    R = 24
    out = validate_rows(read_stage_rows(), "vqa", Storage(), VQAParams(), resolution=R)
    assert out.column_names == [*ROW_SCHEMAS["vqa"].names, PIXELS_COLUMN, "license"]
    pixels = out.column(PIXELS_COLUMN).to_pylist()
    assert [p is None for p in pixels] == [False, True, True, False]  # error rows get none
    expected = resize_center_crop(Image.open(io.BytesIO(png((80, 40), 1))).convert("RGB"), R)
    assert np.array_equal(np.frombuffer(pixels[0], np.uint8).reshape(R, R, 3), expected)
    assert out.column("license").to_pylist() == ["a", "b", "c", "d"]
    assert PIXELS_COLUMN not in validate_rows(read_stage_rows(), "vqa", Storage(), VQAParams()).column_names


def test_output_rows_never_hold_the_pixels():
    """Even from a worker that passed the column through (a user's worker_cls), the output drops it."""
    checked = validate_rows(read_stage_rows(), "vqa", Storage(), VQAParams(), resolution=16)
    n = checked.num_rows
    worker_out = {f.name: pa.nulls(n, f.type) for f in SCHEMAS["vqa"]}
    worker_out.update(id=checked.column("id"), error=checked.column("error"))
    batch = pa.table({**worker_out, PIXELS_COLUMN: checked.column(PIXELS_COLUMN), "license": checked.column("license")})
    out = to_output_table(batch, "vqa")
    assert PIXELS_COLUMN not in out.column_names and out.column_names[-1] == "license"


def test_a_read_block_is_bucketed_then_validated_a_batch_at_a_time():
    """The VQA CPU stage (scheduler/pipeline.py inference_stages): the whole read block sorted by question length, then
    pixels made and handed on in slices of one batch (a block never holds more than a batch of pixels), in that
    order, so each batch the workers get is a run of similar lengths."""
    n, batch_size, R = 7, 3, 8
    questions = ["q" * length for length in (9, 2, 30, 5, 1, 17, 4)]
    rows = [dict(id=f"r{i}", question=q, image_bytes=png((10 + i, 12), i), image_path=None, image_sha256=None,
                 seed=None, error=None) for i, q in enumerate(questions)]
    block = pa.Table.from_pylist(rows, schema=ROW_SCHEMAS["vqa"]).append_column("rank", pa.array(range(n)))
    kwargs = dict(kind="vqa", storage=Storage(), params=VQAParams(), resolution=R)
    slices = list(validate_in_blocks(bucket_by_question_length(block), rows_per_block=batch_size, **kwargs))
    assert [s.num_rows for s in slices] == [3, 3, 1]
    whole = pa.concat_tables(slices)
    assert whole.equals(validate_rows(bucket_by_question_length(block), **kwargs))
    assert [len(q) for q in whole.column("question").to_pylist()] == sorted(len(q) for q in questions)
    assert whole.column(PIXELS_COLUMN).null_count == 0 and whole.column("rank").to_pylist() == [4, 1, 6, 3, 0, 5, 2]
