"""scheduler/pipeline.py stages without Ray: skip committed ids, the output table, the write stage."""

import pyarrow as pa

from jobs.output import T2I_SCHEMA, read_output
from jobs.storage import Storage
from scheduler.pipeline import skip_committed, to_output_table, write_and_commit


def t2i_rows(ids) -> pa.Table:
    n = len(ids)
    return pa.table({"id": ids, "prompt": ["p"] * n, "seed": list(range(n)), "image_bytes": [b"png"] * n,
                     "image_path": [f"{i}.png" for i in ids], "width": [64] * n, "height": [64] * n,
                     "model": ["{}"] * n, "latency_s": [0.5] * n, "error": pa.array([None] * n, pa.string())})


def test_skip_committed():
    table = pa.table({"id": ["a", "b", "c"]})
    assert skip_committed(table, frozenset({"b"})).column("id").to_pylist() == ["a", "c"]
    assert skip_committed(table, frozenset()) is table


def test_output_table_has_the_documented_schema_and_image_struct():
    table = to_output_table(t2i_rows(["a"]), "t2i")
    assert table.schema == T2I_SCHEMA
    assert table.column("image").to_pylist() == [{"bytes": b"png", "path": "a.png"}]
    failed = t2i_rows(["b"]).set_column(3, "image_bytes", pa.array([None], pa.binary()))
    assert to_output_table(failed, "t2i").column("image").to_pylist() == [None]


def test_write_stage_keeps_one_row_per_id(tmp_path):
    summary = write_and_commit(t2i_rows(["a", "b", "a"]), "t2i", str(tmp_path), Storage(), "run").to_pylist()
    assert summary == [dict(file=summary[0]["file"], rows=2, errors=0, committed=True)]
    assert read_output(Storage(), str(tmp_path)).column("id").to_pylist() == ["a", "b"]
    assert write_and_commit(t2i_rows([])[:0], "t2i", str(tmp_path), Storage(), "run").num_rows == 0


def test_vqa_blocks_are_bucketed_by_question_length():
    import pyarrow as pa

    from scheduler.pipeline import bucket_by_question_length

    table = pa.table({"id": ["a", "b", "c", "d"], "question": ["a long question here?", None, "hi?", "medium one?"]})
    out = bucket_by_question_length(table)
    assert out.column("id").to_pylist() == ["c", "d", "a", "b"]  # shortest first, the error row (no question) last
    assert out.num_rows == table.num_rows
