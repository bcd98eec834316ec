"""scheduler/read.py and scheduler/validate.py without Ray: canonical rows, stable ids, errors as values."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batch_testkit import png_bytes
from flashu_batch.jobs.spec import InputSpec
from flashu_batch.jobs.storage import Storage
from flashu_batch.scheduler.read import plan_reads, read_units
from flashu_batch.scheduler.validate import validate_t2i, validate_vqa


def read_all(inp: InputSpec, kind: str) -> list[dict]:
    storage = Storage()
    units = plan_reads(storage, inp)
    return read_units(pa.Table.from_pylist(units), kind, inp.format, dict(inp.columns), storage).to_pylist()


def test_t2i_jsonl_ids_seeds_and_type_errors(tmp_path):
    lines = [json.dumps({"prompt": "a fox", "seed": 3}), json.dumps({"prompt": "a fox"}), "{broken",
             json.dumps({"prompt": 12}), json.dumps({"prompt": "x", "seed": "abc", "id": 7}), "[1, 2]",
             json.dumps({"prompt": "   "})]
    (tmp_path / "p.jsonl").write_text("\n".join(lines) + "\n")
    rows = read_all(InputSpec(uris=[str(tmp_path / "p.jsonl")], format="jsonl"), "t2i")
    assert len(rows) == 7 and len({r["id"] for r in rows}) == 7
    assert rows[0]["seed"] == 3 and rows[0]["error"] is None and rows[1]["seed"] is None
    assert rows[2]["error"].startswith("line 3 is not valid JSON")
    assert rows[3]["error"] == "prompt must be a string, got int 12"
    assert rows[4]["id"] == "7" and rows[4]["error"] == "seed must be an integer in [0, 2**63), got str 'abc'"
    assert rows[5]["error"] == "line 6 is a JSON list, not an object"
    validated = validate_t2i(pa.Table.from_pylist(rows, schema=pa.Table.from_pylist(rows).schema)).to_pylist()
    assert validated[6]["error"] == "prompt is empty" and validated[0]["error"] is None
    # ids are stable across reads, and equal prompts at different positions differ
    again = read_all(InputSpec(uris=[str(tmp_path / "p.jsonl")], format="jsonl"), "t2i")
    assert [r["id"] for r in again] == [r["id"] for r in rows]


def test_csv_with_column_mapping_and_a_folder_of_files(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.csv").write_text("key,caption,seed\nk1,a red circle,5\n,a fox,\n")
    (tmp_path / "d" / "b.csv").write_text("key,caption,seed\nk3,a cat,1\n")
    (tmp_path / "d" / "_ignored.csv").write_text("key,caption\nzz,zz\n")
    inp = InputSpec(uris=[str(tmp_path / "d")], format="csv", columns={"prompt": "caption", "id": "key"})
    rows = read_all(inp, "t2i")
    assert [r["prompt"] for r in rows] == ["a red circle", "a fox", "a cat"]
    assert rows[0]["id"] == "k1" and rows[0]["seed"] == 5 and len(rows[1]["id"]) == 32 and rows[2]["id"] == "k3"
    missing = read_all(InputSpec(uris=[str(tmp_path / "d" / "a.csv")], format="csv"), "t2i")
    assert missing[0]["error"] == "no 'prompt' column in a.csv for 'prompt' (map yours with input.columns)"
    with pytest.raises(ValueError, match="no jsonl file there"):
        plan_reads(Storage(), InputSpec(uris=[str(tmp_path / "d")], format="jsonl"))


def test_vqa_parquet_bytes_structs_uris_and_bad_images(tmp_path):
    (tmp_path / "img.png").write_bytes(png_bytes())
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({
        "q": ["bytes?", "struct?", "uri?", "missing?", "corrupt?", "gone?", "", "truncated?"],
        "img": pa.array([{"bytes": png_bytes(), "path": None}, {"bytes": png_bytes((0, 0, 255)), "path": "b.png"},
                         {"bytes": None, "path": "img.png"}, None, {"bytes": b"\x89PNG broken", "path": None},
                         {"bytes": None, "path": "nope.png"}, {"bytes": png_bytes(), "path": None},
                         {"bytes": png_bytes()[:60], "path": None}], image_type)})
    pq.write_table(table, tmp_path / "qa.parquet", row_group_size=3)  # three read units
    inp = InputSpec(uris=[str(tmp_path / "qa.parquet")], format="parquet", columns={"question": "q", "image": "img"})
    assert len(plan_reads(Storage(), inp)) == 3
    rows = read_all(inp, "vqa")
    assert len({r["id"] for r in rows}) == 8
    out = validate_vqa(pa.Table.from_pylist(rows, schema=pa.Table.from_pylist(rows).schema), Storage()).to_pylist()
    assert [r["error"] for r in out[:3]] == [None, None, None]
    assert out[1]["image_path"] == "b.png" and out[2]["image_path"] == str(tmp_path / "img.png")
    assert all(len(r["image_sha256"]) == 64 for r in out[:3])
    assert out[3]["error"] == "image is missing"
    assert out[4]["error"] == "image could not be decoded (11 bytes): not a recognized image format"
    assert out[5]["error"] == f"image {str(tmp_path / 'nope.png')!r} does not exist"
    assert out[6]["error"] == "question is empty"
    assert out[7]["error"].startswith("image could not be decoded (60 bytes)")


def test_vqa_wrong_types(tmp_path):
    (tmp_path / "qa.jsonl").write_text(json.dumps({"question": "q", "image": 5}) + "\n"
                                       + json.dumps({"question": ["q"], "image": "http://host/x.png"}) + "\n")
    rows = read_all(InputSpec(uris=[str(tmp_path / "qa.jsonl")], format="jsonl"), "vqa")
    assert rows[0]["error"] == "image must be bytes, a {bytes, path} struct or a URI string, got int 5"
    assert "question must be a string, got list ['q']" in rows[1]["error"]
    assert "image URI 'http://host/x.png' is not supported" in rows[1]["error"]
