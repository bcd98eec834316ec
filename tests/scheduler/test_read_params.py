"""The optional per-row columns of scheduler/read.py (t2i `negative_prompt`, vqa `seed`) and their passage through
the processor's canonical_rows: read when present, never an error when absent, type-checked, and ids of rows that
lack them unchanged."""

import pyarrow as pa

from flashu_batch.jobs.spec import T2I_COLUMNS, VQA_COLUMNS
from flashu_batch.scheduler.processor import canonical_rows
from flashu_batch.scheduler.read import ROW_SCHEMAS, canonical_row, derive_id


def row(kind, raw, missing=None):
    return canonical_row(kind, raw, missing or {}, None, source="f.jsonl", position=3, base="/data", where="line 4")


def test_negative_prompt_column():
    assert "negative_prompt" in T2I_COLUMNS and "negative_prompt" in ROW_SCHEMAS["t2i"].names
    given = row("t2i", dict(prompt="a fox", negative_prompt="blurry"))
    assert given["negative_prompt"] == "blurry" and given["error"] is None
    # a file without the column: no error, and the id it always had (rows without one are unchanged)
    absent = row("t2i", dict(prompt="a fox"), missing={"negative_prompt": "negative_prompt"})
    assert absent["negative_prompt"] is None and absent["error"] is None
    assert absent["id"] == derive_id("t2i", "f.jsonl", 3, ["a fox", None])
    assert given["id"] != absent["id"]  # the negative prompt is part of what the row asks for
    wrong = row("t2i", dict(prompt="a fox", negative_prompt=5))
    assert wrong["error"] == "negative_prompt must be a string, got int 5"


def test_vqa_seed_column():
    assert "seed" in VQA_COLUMNS and ROW_SCHEMAS["vqa"].field("seed").type == pa.int64()
    seeded = row("vqa", dict(question="what", image=b"png", seed="12"))
    assert seeded["seed"] == 12 and seeded["error"] is None
    plain = row("vqa", dict(question="what", image=b"png"), missing={"seed": "seed"})
    assert plain["seed"] is None and plain["error"] is None
    assert seeded["id"] == plain["id"]  # the seed is not part of a VQA row's derived id (ids stay as they were)
    assert row("vqa", dict(question="what", image=b"png", seed=-1))["error"].startswith("seed must be an integer")


def test_the_processor_reads_the_optional_columns():
    t2i = canonical_rows(pa.table({"prompt": ["a", "b"], "negative_prompt": ["blurry", None], "x": [1, 2]}), "t2i")
    assert t2i.column("negative_prompt").to_pylist() == ["blurry", None] and t2i.column("x").to_pylist() == [1, 2]
    assert canonical_rows(pa.table({"prompt": ["a"]}), "t2i").column("negative_prompt").to_pylist() == [None]
    vqa = canonical_rows(pa.table({"question": ["q"], "image": [b"png"], "seed": [4]}), "vqa")
    assert vqa.column("seed").to_pylist() == [4]
