"""scheduler/pipeline.py stages without Ray: the output table, the write stage (the read stage's skips:
test_scale.py)."""

import pyarrow as pa

from flashu_batch.jobs.ids import read_key
from flashu_batch.jobs.output import READ_KEY, T2I_SCHEMA, TaskOutput, read_output
from flashu_batch.jobs.storage import Storage
from flashu_batch.scheduler.pipeline import to_output_table, write_and_commit


def t2i_rows(ids) -> pa.Table:
    n = len(ids)
    return pa.table({"id": ids, "prompt": ["p"] * n, "seed": list(range(n)), "image_bytes": [b"png"] * n,
                     "image_path": [f"{i}.png" for i in ids], "width": [64] * n, "height": [64] * n,
                     "model": ["{}"] * n, "latency_s": [0.5] * n, "error": pa.array([None] * n, pa.string()),
                     "negative_prompt": pa.array([None] * n, pa.string()), "image_index": [0] * n})


def test_output_table_has_the_documented_schema_and_image_struct():
    table = to_output_table(t2i_rows(["a"]), "t2i")
    assert table.schema == T2I_SCHEMA
    assert table.column("image").to_pylist() == [{"bytes": b"png", "path": "a.png"}]
    failed = t2i_rows(["b"]).set_column(3, "image_bytes", pa.array([None], pa.binary()))
    assert to_output_table(failed, "t2i").column("image").to_pylist() == [None]


def test_output_table_keeps_other_columns_as_they_came_after_the_documented_ones():
    extra = pa.array([{"url": "http://x/a", "n": 1}], pa.struct([("url", pa.string()), ("n", pa.int16())]))
    table = to_output_table(t2i_rows(["a"]).append_column("source", extra), "t2i")
    assert table.schema.names == T2I_SCHEMA.names + ["source"]
    assert table.schema.field("source").type == extra.type  # the type as it came, not a re-inferred one
    assert table.column("source").to_pylist() == [{"url": "http://x/a", "n": 1}]


def test_write_stage_keeps_one_row_per_id(tmp_path):
    output = TaskOutput(Storage(), str(tmp_path))
    summary = write_and_commit(to_output_table(t2i_rows(["a", "b", "a"]), "t2i"), output, "run").to_pylist()
    assert summary == [dict(file=summary[0]["file"], rows=2, errors=0, committed=True, this_run=True,
                            record=summary[0]["record"], units=[], unit_rows=[])]  # rows without read keys
    assert read_output(Storage(), str(tmp_path)).column("id").to_pylist() == ["a", "b"]
    assert write_and_commit(to_output_table(t2i_rows([])[:0], "t2i"), output, "run").num_rows == 0


def test_vqa_blocks_are_bucketed_by_question_length():
    import pyarrow as pa

    from flashu_batch.scheduler.pipeline import bucket_by_question_length

    table = pa.table({"id": ["a", "b", "c", "d"], "question": ["a long question here?", None, "hi?", "medium one?"]})
    out = bucket_by_question_length(table)
    assert out.column("id").to_pylist() == ["c", "d", "a", "b"]  # shortest first, the error row (no question) last
    assert out.num_rows == table.num_rows


def test_write_stage_keeps_read_keys_in_the_record_and_counts_rows_per_unit(tmp_path):
    output = TaskOutput(Storage(), str(tmp_path))
    rows = to_output_table(t2i_rows(["a", "b", "c"]), "t2i")
    keys = [read_key(0, 5), read_key(2, 0), read_key(0, 6)]
    summary = write_and_commit(rows.append_column(READ_KEY, pa.array(keys, pa.int64())), output, "run").to_pylist()
    assert summary[0]["units"] == [0, 2] and summary[0]["unit_rows"] == [2, 1] and summary[0]["record"]
    record = output.commits()[0]
    assert record["keys"] == keys and record["key"] == summary[0]["record"]
    assert READ_KEY not in read_output(output.storage, output.root).column_names  # the file holds results only
