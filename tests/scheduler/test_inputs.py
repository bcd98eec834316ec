"""The inputs users bring (scheduler/read.py): glob patterns, compressed JSONL and CSV, input columns carried into
the output (input.keep_columns), and a pre-pass that reads only the ids where the input has them."""

import gzip
import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batch_testkit import make_bucket, png_bytes, spec_dict
from flashu_batch.jobs.ids import hash_ids
from flashu_batch.jobs.output import read_output
from flashu_batch.jobs.spec import InputSpec, SpecError, StorageSpec, parse_spec
from flashu_batch.jobs.storage import Storage, join
from flashu_batch.scheduler import read
from flashu_batch.scheduler.bookkeeping import read_ids
from flashu_batch.scheduler.pipeline import read_rows
from flashu_batch.scheduler.read import InputError, plan_reads, read_units, unit_row_ids


def read_all(inp: InputSpec, kind: str = "t2i", storage: Storage | None = None) -> list[dict]:
    storage = storage or Storage()
    units = plan_reads(storage, inp)
    return read_units(pa.Table.from_pylist(units), kind, inp.format, dict(inp.columns), storage,
                      inp.keep_columns).to_pylist()


def jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def zstd(data: bytes) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.CompressedOutputStream(sink, "zstd") as out:
        out.write(data)
    return sink.getvalue().to_pybytes()


def write(path, data: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


# ---- glob patterns -------------------------------------------------------------------------------------------------

def test_glob_patterns_across_nested_folders(tmp_path):
    data = tmp_path / "data"
    for rel in ("a/x1.jsonl", "a/b/x2.jsonl", "c/x3.jsonl", "a/_tmp/x4.jsonl", ".cache/x5.jsonl", "a/_x6.jsonl",
                "a/b/x7.csv"):
        write(data / rel, jsonl([{"prompt": rel}]))

    def sources(pattern: str, fmt: str = "jsonl") -> list[str]:
        return [u["source"] for u in plan_reads(Storage(), InputSpec(uris=[str(data / pattern)], format=fmt))]

    # ** crosses folders (none too), * and ? and [...] stay in one segment; sorted; '.' and '_' names skipped
    assert sources("**/*.jsonl") == ["a/b/x2.jsonl", "a/x1.jsonl", "c/x3.jsonl"]
    assert sources("*/x?.jsonl") == ["a/x1.jsonl", "c/x3.jsonl"]
    assert sources("[ab]/**/x*") == ["a/b/x2.jsonl", "a/b/x7.csv", "a/x1.jsonl"]  # a pattern is its own filter
    assert sources("[!a]/*.jsonl") == ["c/x3.jsonl"]
    assert sources("a/**") == ["b/x2.jsonl", "b/x7.csv", "x1.jsonl"]  # below the literal folder, data/a
    assert sources("*/_tmp/*.jsonl") == ["a/_tmp/x4.jsonl"]  # a pattern that spells a '_' name takes it
    assert sources("a/_*.jsonl") == ["_x6.jsonl"]
    # a folder: the format's files below it, '_' and '.' folders skipped too (Spark's _temporary/, .flashu/)
    assert [u["source"] for u in plan_reads(Storage(), InputSpec(uris=[str(data)], format="jsonl"))] == [
        "data/a/b/x2.jsonl", "data/a/x1.jsonl", "data/c/x3.jsonl"]

    # a local path that exists is itself, wildcard characters or not
    write(tmp_path / "odd [1]" / "x*.jsonl", jsonl([{"prompt": "odd"}]))
    assert [u["source"] for u in plan_reads(Storage(), InputSpec(uris=[str(tmp_path / "odd [1]")], format="jsonl"))] \
        == ["odd [1]/x*.jsonl"]
    assert sources("../odd [1]/x*.jsonl") == ["x*.jsonl"]

    with pytest.raises(FileNotFoundError, match=r"input '.*/data/\*\.jsonl' matches no file \(7 files below"):
        sources("*.jsonl")
    with pytest.raises(FileNotFoundError, match="matches no file"):
        sources("nowhere/**/*.jsonl")

    # ids derive from the path below the pattern's literal folder: the dataset moved whole keeps them
    rows = read_all(InputSpec(uris=[str(data / "**" / "*.jsonl")], format="jsonl"))
    shutil.copytree(data, tmp_path / "elsewhere" / "moved")
    moved = read_all(InputSpec(uris=[str(tmp_path / "elsewhere" / "moved" / "**" / "*.jsonl")], format="jsonl"))
    assert [r["id"] for r in moved] == [r["id"] for r in rows] and len({r["id"] for r in rows}) == 3


def test_glob_pattern_on_s3(s3_endpoint):
    storage = Storage(StorageSpec(endpoint_url=s3_endpoint, path_style=True))
    bucket = make_bucket(s3_endpoint, "globs")
    for rel in ("shards/p1/a.parquet", "shards/p1/b.parquet", "shards/p2/deep/c.parquet", "shards/p2/_SUCCESS",
                "shards/q1/d.parquet", "other/e.parquet"):
        fs, path = storage.arrow_fs(join(bucket, rel))
        pq.write_table(pa.table({"prompt": [rel]}), path, filesystem=fs)

    def files(pattern: str) -> list[tuple[str, str]]:
        return [(u["uri"], u["source"]) for u in plan_reads(storage, InputSpec(uris=[pattern], format="parquet"))]

    assert files(f"{bucket}/shards/p*/*.parquet") == [(f"{bucket}/shards/p1/a.parquet", "p1/a.parquet"),
                                                      (f"{bucket}/shards/p1/b.parquet", "p1/b.parquet")]
    assert [s for _, s in files(f"{bucket}/shards/**/*.parquet")] == [
        "p1/a.parquet", "p1/b.parquet", "p2/deep/c.parquet", "q1/d.parquet"]
    assert [s for _, s in files(f"{bucket}/*/[pq]1/?.parquet")] == ["shards/p1/a.parquet", "shards/p1/b.parquet",
                                                                      "shards/q1/d.parquet"]
    rows = read_all(InputSpec(uris=[f"{bucket}/shards/**/*.parquet"], format="parquet"), storage=storage)
    assert [r["prompt"] for r in rows] == ["shards/p1/a.parquet", "shards/p1/b.parquet", "shards/p2/deep/c.parquet",
                                           "shards/q1/d.parquet"]
    with pytest.raises(FileNotFoundError, match=r"input 's3://globs/shards/\*\*/\*\.jsonl' matches no file"):
        files(f"{bucket}/shards/**/*.jsonl")
    with pytest.raises(ValueError, match="the bucket name cannot be a pattern"):
        files("s3://glob*/x.parquet")


# ---- compressed JSONL and CSV --------------------------------------------------------------------------------------

def test_gzip_and_zstd_inputs_read_like_plain_ones(tmp_path):
    rows = [{"prompt": f"a fox {i}", "seed": i} for i in range(50)]
    text = jsonl(rows)
    csv_text = ("prompt,seed\n" + "".join(f"{r['prompt']},{r['seed']}\n" for r in rows)).encode()
    write(tmp_path / "j" / "a.jsonl.gz", gzip.compress(text))
    write(tmp_path / "j" / "b.ndjson.zst", zstd(text))
    write(tmp_path / "j" / "c.json.gz", gzip.compress(text))
    write(tmp_path / "j" / "d.jsonl", text)
    write(tmp_path / "j" / "e.txt.gz", gzip.compress(text))  # not a JSONL name: a folder does not take it
    write(tmp_path / "c" / "a.csv.gz", gzip.compress(csv_text))
    write(tmp_path / "c" / "b.csv.zst", zstd(csv_text))

    got = read_all(InputSpec(uris=[str(tmp_path / "j")], format="jsonl"))
    assert len(got) == 4 * 50 and all(r["error"] is None for r in got)
    assert [(r["prompt"], r["seed"]) for r in got] == [(r["prompt"], r["seed"]) for r in rows] * 4
    got = read_all(InputSpec(uris=[str(tmp_path / "c")], format="csv"))
    assert [(r["prompt"], r["seed"]) for r in got] == [(r["prompt"], r["seed"]) for r in rows] * 2
    # a file named outright and a pattern decompress too
    one = read_all(InputSpec(uris=[str(tmp_path / "j" / "b.ndjson.zst")], format="jsonl"))
    assert [r["prompt"] for r in one] == [r["prompt"] for r in rows]
    assert len(read_all(InputSpec(uris=[str(tmp_path / "*" / "*.json*.gz")], format="jsonl"))) == 2 * 50


@pytest.mark.parametrize("name,damage", [("cut.jsonl.gz", lambda b: b[: len(b) // 2]),
                                         ("tail.jsonl.gz", lambda b: b[:-4]),
                                         ("flipped.csv.gz", lambda b: b[:100] + bytes([b[100] ^ 0xFF]) + b[101:]),
                                         ("cut.jsonl.zst", lambda b: b[:-3]),
                                         ("junk.csv.zst", lambda b: b"not zstd at all")])
def test_a_corrupt_compressed_file_is_an_error_naming_it(tmp_path, name, damage):
    text = jsonl([{"prompt": f"row {i} " + "x" * (i % 17)} for i in range(400)])
    packed = gzip.compress(text) if name.endswith(".gz") else zstd(text)
    write(tmp_path / name, damage(packed))
    codec = "gzip" if name.endswith(".gz") else "zstd"
    with pytest.raises(ValueError, match=rf"input file '.*{name}' is not a readable {codec} file \("):
        read_all(InputSpec(uris=[str(tmp_path / name)], format="csv" if ".csv" in name else "jsonl"))


# ---- carried columns -----------------------------------------------------------------------------------------------

def test_keep_columns_all_some_none_jsonl(tmp_path):
    write(tmp_path / "p.jsonl", jsonl([
        {"prompt": "a", "url": "https://x/1", "n": 1, "meta": {"k": [1, "é"]}, "seed": 3, "width": 5, "ok": True},
        {"prompt": "b", "url": "https://x/2", "caption": "B"},
    ]) + b"{broken\n")

    def read_with(keep, columns=None):
        return read_all(InputSpec(uris=[str(tmp_path / "p.jsonl")], format="jsonl", keep_columns=keep,
                                  columns=columns or {}))

    rows = read_with(None)  # all: the columns the task does not read, as text (JSON text where not a string)
    assert list(rows[0])[-5:] == ["url", "n", "meta", "ok", "caption"]  # in the order first seen
    assert (rows[0]["url"], rows[0]["n"], rows[0]["meta"], rows[0]["ok"]) == ("https://x/1", "1", '{"k": [1, "é"]}',
                                                                              "true")
    assert rows[1]["n"] is None and rows[1]["caption"] == "B" and rows[0]["caption"] is None and rows[2]["url"] is None
    assert rows[0]["seed"] == 3 and rows[0].get("width") is None  # width is an output column: not carried
    assert rows[2]["error"].startswith("line 3 is not valid JSON")
    assert [list(r)[-1] for r in read_with(["url"])] == ["url"] * 3
    assert [r["url"] for r in read_with(["url"])] == ["https://x/1", "https://x/2", None]
    assert list(read_with([])[0]) == list(read_with([])[2]) == read.ROW_SCHEMAS["t2i"].names
    # a column the task reads (mapped) is not carried unless named
    assert "caption" not in read_with(None, {"prompt": "caption"})[1]
    assert read_with(["caption", "url"], {"prompt": "caption"})[1]["caption"] == "B"
    with pytest.raises(ValueError, match=r"keep_columns names 'license', but '.*p\.jsonl' has no such column"):
        read_with(["url", "license"])
    with pytest.raises(ValueError, match=r"keep_columns names 'width', a column the output rows have already"):
        read_with(["width"])
    with pytest.raises(SpecError, match="keep_columns: .*expected distinct, non-empty column names"):
        parse_spec(spec_dict("j", "ckpt", [dict(kind="t2i", output="o", input=dict(
            uris="x.jsonl", format="jsonl", keep_columns=["url", "url"]))]))


def test_keep_columns_csv_and_parquet(tmp_path):
    (tmp_path / "p.csv").write_text("id,prompt,url,license\nk1,a fox,https://x/1,cc-by\nk2,a cat,,mit\n")
    rows = read_all(InputSpec(uris=[str(tmp_path / "p.csv")], format="csv"))
    assert [(r["id"], r["url"], r["license"]) for r in rows] == [("k1", "https://x/1", "cc-by"), ("k2", None, "mit")]
    with pytest.raises(ValueError, match=r"keep_columns names 'source', but '.*p\.csv' has no such column \(it has "
                                         r"'id', 'prompt', 'url', 'license'\)"):
        read_all(InputSpec(uris=[str(tmp_path / "p.csv")], format="csv", keep_columns=["source"]))

    # Parquet: the file's own types, text that is not UTF-8 made valid
    table = pa.table({"prompt": ["a", "b"], "url": ["https://x/1", None], "score": pa.array([1, 2], pa.int32()),
                      "tags": pa.array([["x"], []], pa.list_(pa.string())),
                      "note": pa.array([b"caf\xe9", b"ok"], pa.binary()).cast(pa.string(), safe=False),
                      "image_bytes": [b"x", b"y"]})
    pq.write_table(table, tmp_path / "p.parquet", row_group_size=1)
    inp = InputSpec(uris=[str(tmp_path / "p.parquet")], format="parquet")
    units = plan_reads(Storage(), inp)
    out = read_units(pa.Table.from_pylist(units), "t2i", "parquet", {}, Storage())
    assert out.schema.names[-4:] == ["url", "score", "tags", "note"]  # image_bytes: a stage's own column
    assert out.schema.field("score").type == pa.int32() and out.schema.field("tags").type == pa.list_(pa.string())
    assert out.column("note").to_pylist() == ["caf\ufffd", "ok"] and out.column("tags").to_pylist() == [["x"], []]
    kept = read_all(InputSpec(uris=[str(tmp_path / "p.parquet")], format="parquet", keep_columns=["score"]))
    assert [list(r)[-1] for r in kept] == ["score", "score"]
    assert list(read_all(InputSpec(uris=[str(tmp_path / "p.parquet")], format="parquet", keep_columns=[]))[0]) == \
        read.ROW_SCHEMAS["t2i"].names
    with pytest.raises(ValueError, match=r"keep_columns names 'license', but '.*p\.parquet' has no such column"):
        plan_reads(Storage(), InputSpec(uris=[str(tmp_path / "p.parquet")], format="parquet", keep_columns=["license"]))


def test_carried_columns_of_different_files_concatenate(ray_session, tmp_path):
    # Parquet: an int column in one file, missing in the other -> nulls of its type; JSONL: text, or missing
    pq.write_table(pa.table({"prompt": ["a", "b"], "n": pa.array([1, 2], pa.int64())}), tmp_path / "1.parquet")
    pq.write_table(pa.table({"prompt": ["c"], "m": ["x"]}), tmp_path / "2.parquet")
    write(tmp_path / "j" / "1.jsonl", jsonl([{"prompt": "a", "n": 1}, {"prompt": "b", "n": 2}]))
    write(tmp_path / "j" / "2.jsonl", jsonl([{"prompt": "c", "n": "x"}, {"prompt": "d"}]))
    for inp, n_type, n_values in (
            (InputSpec(uris=[str(tmp_path / "*.parquet")], format="parquet"), pa.int64(), [1, 2, None]),
            (InputSpec(uris=[str(tmp_path / "j")], format="jsonl"), pa.string(), ["1", "2", "x", None])):
        units = plan_reads(Storage(), inp)
        ds = read_rows(units, "t2i", inp, Storage()).map_batches(lambda b: b, batch_size=100, batch_format="pyarrow")
        batches = list(ds.iter_batches(batch_size=None, batch_format="pyarrow"))
        table = pa.concat_tables(batches, promote_options="permissive")  # Ray's blocks, each one unit or more
        rows = sorted(table.to_pylist(), key=lambda r: r["prompt"])
        assert table.schema.field("n").type == n_type and [r["n"] for r in rows] == n_values
        assert max(b.num_rows for b in batches) == len(rows)  # the map_batches above concatenated them all

    # types that cannot share a column are refused on the footers, naming both files
    pq.write_table(pa.table({"prompt": ["e"], "n": ["text"]}), tmp_path / "3.parquet")
    with pytest.raises(ValueError, match=r"input column 'n' is int64 in '.*1\.parquet' but string in '.*3\.parquet'"):
        plan_reads(Storage(), InputSpec(uris=[str(tmp_path / "*.parquet")], format="parquet"))
    assert len(plan_reads(Storage(), InputSpec(uris=[str(tmp_path / "*.parquet")], format="parquet",
                                               keep_columns=[]))) == 3  # nothing carried, nothing to agree on


# ---- the pre-pass reads only the ids -------------------------------------------------------------------------------

def test_prepass_reads_only_the_id_column(tmp_path, monkeypatch):
    ids = [f"q{i}" for i in range(6)]
    pq.write_table(pa.table({"id": ids, "question": ["what"] * 6, "image": [png_bytes()] * 6,
                             "url": [f"u{i}" for i in range(6)]}), tmp_path / "qa.parquet", row_group_size=4)
    storage, inp = Storage(), InputSpec(uris=[str(tmp_path / "qa.parquet")], format="parquet")
    units = plan_reads(storage, inp)
    full = [r["id"] for r in read_all(inp, "vqa")]
    assert full == ids

    columns_read = []
    real = pq.ParquetFile.read_row_group

    def spy(self, i, columns=None, **kwargs):
        columns_read.append(columns)
        return real(self, i, columns=columns, **kwargs)

    def no_rows(*args, **kwargs):
        raise AssertionError("the pre-pass built a whole row (and hashed its image) where the id column sufficed")

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", spy)
    monkeypatch.setattr(read, "canonical_row", no_rows)
    meta, rows = read_ids(list(enumerate(units)), "vqa", inp, storage, partitions=1)  # the index pass's read task
    assert meta["rows"] == {0: 4, 1: 2} and meta["problems"] == {} and columns_read == [["id"], ["id"]]
    assert rows["hash"].tobytes() == hash_ids(ids).tobytes()


def test_prepass_ids_equal_the_full_read_where_ids_are_missing_or_invalid(tmp_path, monkeypatch):
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    pq.write_table(pa.table({"key": pa.array(["a", None, "c", "  "]), "question": ["q1", "q2", "q3", "q4"],
                             "image": pa.array([{"bytes": png_bytes(), "path": None}] * 4, image_type)}),
                   tmp_path / "qa.parquet", row_group_size=2)
    write(tmp_path / "p.jsonl", jsonl([{"id": "a", "prompt": "x"}, {"id": 7, "prompt": "y"}, {"prompt": "z"},
                                       {"id": True, "prompt": "w"}, {"id": "", "prompt": "v"}]) + b"[1]\n\n")
    (tmp_path / "p.csv").write_text("id,prompt\nk1,a\n,b\nk3,c\n")
    made = []
    real = read.canonical_row

    def counted(*args, **kwargs):
        made.append(args[4:6])  # (source, position)
        return real(*args, **kwargs)

    for kind, inp, derived in (
            ("vqa", InputSpec(uris=[str(tmp_path / "qa.parquet")], format="parquet", columns={"id": "key"}), 4),
            ("t2i", InputSpec(uris=[str(tmp_path / "p.jsonl")], format="jsonl"), 4),
            ("t2i", InputSpec(uris=[str(tmp_path / "p.csv")], format="csv"), 1)):
        storage = Storage()
        units = plan_reads(storage, inp)
        full = [r["id"] for r in read_all(inp, kind)]
        monkeypatch.setattr(read, "canonical_row", counted)
        made.clear()
        pre = [i for u in units for _, i in unit_row_ids(u, kind, inp.format, dict(inp.columns), storage)]
        monkeypatch.setattr(read, "canonical_row", real)
        assert pre == full
        # canonical rows only for what needs one: each Parquet row group holding a missing id (2 of 2 here), the
        # JSONL and CSV rows without a valid id
        assert len(made) == derived, (inp.format, made)


# ---- a job carries the input's columns into its output -------------------------------------------------------------

def test_job_output_rows_carry_url_and_join_back_to_the_input(ray_session, checkpoint, tmp_path):
    prompts = [{"prompt": f"a red circle {i}", "url": f"https://example.com/p/{i}", "license": "cc-by"}
               for i in range(3)]
    write(tmp_path / "in" / "t2i" / "part-0.jsonl.gz", gzip.compress(jsonl(prompts[:2])))
    write(tmp_path / "in" / "t2i" / "sub" / "part-1.jsonl.gz", gzip.compress(jsonl(prompts[2:])))
    pq.write_table(pa.table({"id": ["q1", "q2"], "question": ["what color", "what shape"],
                             "image": [png_bytes(), png_bytes((0, 0, 255))],
                             "url": ["https://example.com/i/1", "https://example.com/i/2"],
                             "width_px": pa.array([40, 40], pa.int32())}), tmp_path / "in" / "qa.parquet")
    tasks = [dict(kind="t2i", input=dict(uris=str(tmp_path / "in" / "t2i" / "**" / "*.jsonl.gz"), format="jsonl",
                                         keep_columns=["url"]),
                  output=str(tmp_path / "out"), params=dict(steps=2), rows_per_file=2),
             dict(kind="vqa", input=dict(uris=str(tmp_path / "in" / "qa.parquet"), format="parquet"),
                  output=str(tmp_path / "out"), params=dict(max_new_tokens=2), rows_per_file=2)]
    spec = parse_spec(spec_dict("carry", checkpoint, tasks))
    from flashu_batch.scheduler.driver import run_job

    results = run_job(spec)
    storage = Storage()
    for task in spec.tasks:
        out = read_output(storage, results[task.task_name]["output"]).to_pylist()
        given = {r["id"]: r for r in read_all(task.input, task.kind)}  # the input, with the ids the job gave it
        assert len(out) == len(given) and all(r["error"] is None for r in out)
        assert {r["id"]: r["url"] for r in out} == {i: r["url"] for i, r in given.items()}
    t2i = read_output(storage, results["t2i"]["output"])
    assert t2i.schema.names[-1] == "url" and "license" not in t2i.schema.names  # keep_columns: url only
    vqa = read_output(storage, results["vqa"]["output"])
    assert vqa.schema.names[-2:] == ["url", "width_px"] and vqa.schema.field("width_px").type == pa.int32()


def test_an_unreadable_input_fails_the_job_before_model_work_naming_the_file(ray_session, checkpoint, tmp_path):
    from flashu_batch.scheduler.driver import run_job

    write(tmp_path / "in" / "a.jsonl.gz", gzip.compress(jsonl([{"prompt": "a fox", "url": "u"}])))
    write(tmp_path / "in" / "b.jsonl.gz", gzip.compress(jsonl([{"prompt": "a cat"}] * 50))[:-6])
    write(tmp_path / "in" / "c.jsonl", jsonl([{"prompt": "a cow"}]))

    def job(uris: str, keep_columns=None):
        return parse_spec(spec_dict("bad-input", checkpoint, [dict(
            kind="t2i", input=dict(uris=uris, format="jsonl", keep_columns=keep_columns),
            output=str(tmp_path / "out"), params=dict(steps=2))]))

    with pytest.raises(InputError, match=r"^task 't2i': input file '.*/b\.jsonl\.gz' is not a readable gzip file "
                                         r"\(Truncated compressed stream\); replace it"):
        run_job(job(str(tmp_path / "in")))
    with pytest.raises(InputError, match=r"^task 't2i': input.keep_columns names 'url', but '.*/c\.jsonl' has no such "
                                         r"column \(it has 'prompt'\)"):
        run_job(job(str(tmp_path / "in" / "[ac].jsonl*"), ["url"]))
    assert not (tmp_path / "out" / "bad-input" / "t2i" / "data").exists()  # stopped before any model work
