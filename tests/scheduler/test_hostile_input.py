"""The hostile-input catalogue (README, "Hostile input"): every bad input has a test here.

Per-row problems run through ONE real job (local Ray, the tiny model, both tasks, one row per kind of bad input
plus good rows), shared by a module fixture; each test then checks one kind: rows out == rows in, unique ids, the
bad row's exact error, the good rows' results. Job-level problems (a spec error, a missing input, a dead S3
endpoint, a refused output prefix) fail before any model work and have their own tests.
"""

import io
import json
import socket
import struct
import time
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from batch_testkit import make_bucket, png_bytes, spec_dict
from flashu_batch.jobs.output import read_output
from flashu_batch.jobs.spec import SpecError, StorageSpec, parse_spec
from flashu_batch.jobs.storage import ObjectTooLarge, Storage, StorageUnreachable, join
from flashu_batch.scheduler.driver import run_job
from flashu_batch.scheduler.read import plan_reads, read_units
from flashu_batch.workers.images import ImageError, decode_image

MAX_IMAGE_BYTES = 100_000  # the vqa task's params.max_image_bytes: small, so a test image can exceed it


def encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height but holds 64 bytes of pixel data: decoding it would fail (truncated), so an
    error that names the size proves the limit was checked from the header, before decoding."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def noise_png(side: int) -> bytes:
    rng = np.random.default_rng(0)
    return encoded(Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)))


def palette_with_transparency() -> Image.Image:
    image = Image.new("P", (4, 4), 1)
    image.putpalette([0, 0, 255, 10, 200, 30] + [0] * 762)
    image.putpixel((0, 0), 0)
    image.info["transparency"] = 0  # palette index 0 (blue) is transparent
    return image


UNUSUAL_MODES = {  # valid images that are not RGB: each must be converted and answered
    "mode-rgba": encoded(Image.new("RGBA", (8, 8), (255, 0, 0, 128))),
    "mode-la": encoded(Image.new("LA", (8, 8), (100, 255))),
    "mode-p": encoded(palette_with_transparency()),
    "mode-l": encoded(Image.new("L", (8, 8), 77)),
    "mode-1": encoded(Image.new("1", (8, 8), 1)),
    "mode-cmyk": encoded(Image.new("CMYK", (8, 8), (128, 0, 0, 128)), "TIFF"),
    "mode-i16": encoded(Image.fromarray(np.full((8, 8), 32896, np.uint16))),
    "mode-i": encoded(Image.fromarray(np.full((8, 8), 1000, np.int32)), "TIFF"),
    "mode-f": encoded(Image.fromarray(np.full((8, 8), 0.5, np.float32)), "TIFF"),
}


def t2i_lines() -> list[bytes]:
    line = lambda **row: json.dumps(row).encode()  # noqa: E731
    return [
        b"\xef\xbb\xbf" + line(id="good-1", prompt="a red circle"),  # a UTF-8 byte order mark is no data
        line(id="good-2", prompt="two cats", seed=5),
        line(id="empty", prompt=""),
        line(id="blank", prompt=" \t "),
        line(id="long", prompt="cat " * 600),  # 1200 tokens
        b'{"id": "latin-1", "prompt": "caf\xe9 au lait"}',  # Latin-1, not UTF-8
        b'{"prompt": "\xff\xfe not text"}',  # the same, without an id: a derived id stands in
        b'{"id": "surrogate", "prompt": "\\ud800 half a character"}',  # valid JSON, not valid Unicode
        line(id="prompt-int", prompt=12),
        line(id="seed-str", prompt="a fox", seed="abc"),
        b"[1, 2]",
        b"{broken",
        line(id="deep", prompt="x", extra=[]).replace(b"[]", b"[" * 100_000 + b"]" * 100_000),
    ]


def vqa_table(base: str, s3_bucket: str) -> pa.Table:
    good = png_bytes()
    rows = [
        ("good-rgb", b"what color", {"bytes": good, "path": None}),
        ("s3-ok", b"what color", {"bytes": None, "path": f"{s3_bucket}/ok.png"}),
        *((name, b"what color", {"bytes": data, "path": None}) for name, data in UNUSUAL_MODES.items()),
        ("no-image", b"what color", None),
        ("corrupt", b"what color", {"bytes": b"junk", "path": None}),
        ("bomb", b"what color", {"bytes": png_header_only(9000, 9000), "path": None}),
        ("too-many-bytes", b"what color", {"bytes": noise_png(200), "path": None}),
        ("too-many-bytes-uri", b"what color", {"bytes": None, "path": "big.png"}),
        ("missing-file", b"what color", {"bytes": None, "path": "nope.png"}),
        ("missing-s3-key", b"what color", {"bytes": None, "path": f"{s3_bucket}/nope.png"}),
        ("missing-s3-bucket", b"what color", {"bytes": None, "path": "s3://hostile-no-such-bucket/x.png"}),
        ("question-not-utf8", b"what \xff color", {"bytes": good, "path": None}),
        ("question-long", b"what " * 5000, {"bytes": good, "path": None}),  # 10000 tokens
        ("question-empty", b"", {"bytes": good, "path": None}),
    ]
    ids, questions, images = zip(*rows)
    return pa.table({
        "id": list(ids),
        # Arrow does not check UTF-8 when a string column is written or read: a bad value is possible in Parquet
        "question": pa.array(questions, pa.binary()).view(pa.string()),
        "image": pa.array(images, pa.struct([("bytes", pa.binary()), ("path", pa.string())]))})


@pytest.fixture(scope="module")
def job(ray_session, checkpoint, s3_endpoint, tmp_path_factory):
    """Both tasks on the catalogue's rows, once; {"t2i"/"vqa": {id: row}, "results", "inputs", "rows_in"}."""
    base = tmp_path_factory.mktemp("hostile")
    s3 = Storage(StorageSpec(endpoint_url=s3_endpoint, path_style=True))
    bucket = make_bucket(s3_endpoint, "hostile-img")
    s3.write_bytes(join(bucket, "ok.png"), png_bytes((0, 0, 255)))
    lines = t2i_lines()
    (base / "prompts.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (base / "big.png").write_bytes(noise_png(200))
    table = vqa_table(str(base), bucket)
    pq.write_table(table, base / "qa.parquet", row_group_size=8)
    tasks = [dict(kind="t2i", input=dict(uris=str(base / "prompts.jsonl"), format="jsonl"), output=str(base / "out"),
                  params=dict(steps=2)),
             dict(kind="vqa", input=dict(uris=str(base / "qa.parquet"), format="parquet"), output=str(base / "out"),
                  params=dict(max_new_tokens=2, max_image_bytes=MAX_IMAGE_BYTES))]
    for task in tasks:
        task["resources"] = dict(workers=1, gpus_per_worker=0, cpus_per_worker=0.5, batch_size=8)
    spec = parse_spec(spec_dict("hostile", checkpoint, tasks, s3_endpoint))
    results = run_job(spec)
    out = {kind: read_output(Storage(), results[kind]["output"]).to_pylist() for kind in ("t2i", "vqa")}
    return dict(results=results, rows_in=dict(t2i=len(lines), vqa=table.num_rows), base=base,
                outputs=out, **{kind: {r["id"]: r for r in rows} for kind, rows in out.items()})


# ---- the invariants, over the whole job ------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["t2i", "vqa"])
def test_rows_out_equal_rows_in_with_unique_ids(job, kind):
    ids = [r["id"] for r in job["outputs"][kind]]
    assert len(ids) == len(set(ids)) == job["rows_in"][kind]
    assert job["results"][kind]["rows"] == job["rows_in"][kind]


def test_good_rows_have_results(job):
    for row_id in ("good-1", "good-2"):
        row = job["t2i"][row_id]
        assert row["error"] is None and row["image"]["bytes"][:4] == b"\x89PNG", row
    assert job["t2i"]["good-1"]["prompt"] == "a red circle"  # the byte order mark is not part of the prompt
    for row_id in ("good-rgb", "s3-ok"):
        row = job["vqa"][row_id]
        assert row["error"] is None and isinstance(row["answer"], str) and len(row["image_sha256"]) == 64, row


# ---- text ------------------------------------------------------------------------------------------------------

def test_empty_prompt(job):
    assert job["t2i"]["empty"]["error"] == "prompt is empty" and job["t2i"]["empty"]["image"] is None


def test_whitespace_only_prompt(job):
    assert job["t2i"]["blank"]["error"] == "prompt is empty"


def test_empty_question(job):
    assert job["vqa"]["question-empty"]["error"] == "question is empty"


def test_prompt_over_the_token_limit(job):
    assert job["t2i"]["long"]["error"] == (
        "prompt has 1200 tokens, over the limit of 256 (the model's 277-token sequence also holds 17 image slots "
        "and 4 markers); shorten it, or set params.truncate: true to cut it as the official code does")
    assert job["t2i"]["long"]["image"] is None


def test_question_over_the_token_limit(job):
    error = job["vqa"]["question-long"]["error"]
    assert error.startswith("question has 10000 tokens, over the limit of ")
    limit = int(error.split("over the limit of ")[1].split()[0])
    assert 4096 - 100 < limit < 4096 - 17 - 2  # the model's positions less the template, 17 image slots, 2 tokens
    assert "the model's 4096 positions also hold the prompt template, the image and max_new_tokens=2" in error


def test_non_utf8_jsonl_line_keeps_its_id(job):
    row = job["t2i"]["latin-1"]
    assert row["error"] == "line 6 is not valid UTF-8 (byte 0xe9 at character 33); save the file as UTF-8"
    assert row["prompt"] is None and row["image"] is None


def test_non_utf8_jsonl_line_without_id_gets_a_stable_derived_id(job):
    errors = {r["error"]: r["id"] for r in job["outputs"]["t2i"]}
    derived = errors["line 7 is not valid UTF-8 (byte 0xff at character 13); save the file as UTF-8"]
    inp = parse_spec(spec_dict("j", "ckpt", [dict(kind="t2i", input=dict(uris=str(job["base"] / "prompts.jsonl"),
                                                                         format="jsonl"), output="o")])).tasks[0].input
    units = plan_reads(Storage(), inp)
    again = read_units(pa.Table.from_pylist(units), "t2i", "jsonl", {}, Storage()).to_pylist()
    assert len(derived) == 32 and again[6]["id"] == derived  # read again: the same id


def test_unpaired_surrogate_escape(job):
    assert job["t2i"]["surrogate"]["error"] == (
        "prompt is not valid UTF-8 text (unpaired surrogate U+D800 at character 1) in prompts.jsonl line 8")


def test_non_utf8_parquet_string(job):
    assert job["vqa"]["question-not-utf8"]["error"] == (
        "question is not valid UTF-8 text (byte 0xff at character 6) in qa.parquet row 20")
    assert job["vqa"]["question-not-utf8"]["question"] is None


def test_wrong_column_types(job):
    assert job["t2i"]["prompt-int"]["error"] == "prompt must be a string, got int 12"
    assert job["t2i"]["seed-str"]["error"] == "seed must be an integer in [0, 2**63), got str 'abc'"
    errors = [r["error"] for r in job["outputs"]["t2i"]]
    assert "line 11 is a JSON list, not an object" in errors
    assert "line 12 is not valid JSON (Expecting property name enclosed in double quotes at column 2)" in errors
    assert "line 13 is not valid JSON (nested too deeply)" in errors  # an error row, not a failed read


# ---- images ----------------------------------------------------------------------------------------------------

def test_missing_image(job):
    assert job["vqa"]["no-image"]["error"] == "image is missing"


def test_corrupt_image_bytes(job):
    assert job["vqa"]["corrupt"]["error"] == "image could not be decoded (4 bytes): not a recognized image format"


def test_decompression_bomb_is_refused_from_its_header(job):
    assert job["vqa"]["bomb"]["error"] == (
        "image is 9000x9000 = 81000000 pixels, over the 64000000-pixel limit (params.max_image_pixels); downscale it "
        "or raise the limit")


def test_image_over_the_byte_limit(job):
    size = len(noise_png(200))
    assert size > MAX_IMAGE_BYTES
    assert job["vqa"]["too-many-bytes"]["error"] == (
        f"image is {size} bytes, over the {MAX_IMAGE_BYTES}-byte limit (params.max_image_bytes)")
    assert job["vqa"]["too-many-bytes-uri"]["error"] == (
        f"image {str(job['base'] / 'big.png')!r} is {size} bytes, over the {MAX_IMAGE_BYTES}-byte limit "
        f"(params.max_image_bytes)")


def test_image_uri_that_does_not_exist(job):
    assert job["vqa"]["missing-file"]["error"] == f"image {str(job['base'] / 'nope.png')!r} does not exist"
    assert job["vqa"]["missing-s3-key"]["error"] == "image 's3://hostile-img/nope.png' does not exist"
    assert job["vqa"]["missing-s3-bucket"]["error"] == "image 's3://hostile-no-such-bucket/x.png' does not exist"


def test_unusual_image_modes_are_answered(job):
    for row_id in UNUSUAL_MODES:
        row = job["vqa"][row_id]
        assert row["error"] is None and isinstance(row["answer"], str) and row["num_tokens"] >= 0, row


@pytest.mark.parametrize("name, expected", [
    ("mode-rgba", (255, 127, 127)),  # red at half alpha over white
    ("mode-la", (100, 100, 100)),
    ("mode-l", (77, 77, 77)),
    ("mode-1", (255, 255, 255)),
    ("mode-cmyk", (63, 127, 127)),  # R = (255 - C)(255 - K) / 255
    ("mode-i16", (128, 128, 128)),  # 32896 / 257; convert("RGB") alone would clip it to 255
    ("mode-i", (4, 4, 4)),  # 1000 in a 16-bit range
    ("mode-f", (128, 128, 128)),  # 0.5 in [0, 1]
])
def test_unusual_image_modes_convert_correctly(name, expected):
    image = decode_image(UNUSUAL_MODES[name], max_pixels=10**6, max_bytes=10**6)
    assert image.mode == "RGB" and image.getpixel((3, 3)) == expected


def test_palette_transparency_and_high_bit_depth_edges():
    image = decode_image(UNUSUAL_MODES["mode-p"], 10**6, 10**6)
    assert image.getpixel((0, 0)) == (255, 255, 255) and image.getpixel((1, 1)) == (10, 200, 30)
    ramp = Image.fromarray(np.array([[0, 257, 32896, 65535]], np.uint16))
    pixels = decode_image(encoded(ramp), 10**6, 10**6)
    assert [pixels.getpixel((x, 0)) for x in range(4)] == [(0,) * 3, (1,) * 3, (128,) * 3, (255,) * 3]
    eight_bit = Image.fromarray(np.array([[0, 200]], np.int32))  # an I image whose values fit 8 bits
    pixels = decode_image(encoded(eight_bit, "TIFF"), 10**6, 10**6)
    assert [pixels.getpixel((x, 0)) for x in range(2)] == [(0,) * 3, (200,) * 3]


def test_absurd_sizes_are_refused_before_opening(s3_endpoint, tmp_path):
    with pytest.raises(ImageError, match=r"^image is 1000001 bytes, over the 1000000-byte limit"):
        decode_image(b"\0" * 1_000_001, max_pixels=10**6, max_bytes=10**6)
    with pytest.raises(ImageError, match=r"^image is 2000x1000 = 2000000 pixels, over the 1000000-pixel limit"):
        decode_image(png_header_only(2000, 1000), max_pixels=10**6, max_bytes=10**6)
    with pytest.raises(ImageError, match=r"^image could not be decoded \(69 bytes\): OSError: image file is trunc"):
        decode_image(png_header_only(2000, 1000), max_pixels=10**7, max_bytes=10**6)  # the header was checked first
    # over Pillow's own ceiling (which no max_image_pixels exceeds): Pillow refuses it while reading the header
    with pytest.raises(ImageError, match=r"^image is over the 1000000-pixel limit \(params.max_image_pixels\): "
                                         r"Image size \(10000000000 pixels\) exceeds"):
        decode_image(png_header_only(100_000, 100_000), max_pixels=10**6, max_bytes=10**6)
    (tmp_path / "big.bin").write_bytes(b"\0" * 5000)
    s3 = Storage(StorageSpec(endpoint_url=s3_endpoint, path_style=True))
    s3.write_bytes(join(make_bucket(s3_endpoint, "hostile-img"), "big.bin"), b"\0" * 5000)
    for storage, uri in ((Storage(), str(tmp_path / "big.bin")), (s3, "s3://hostile-img/big.bin")):
        with pytest.raises(ObjectTooLarge, match="is 5000 bytes, over the 4999-byte limit") as info:
            storage.read_bytes(uri, max_bytes=4999)
        assert info.value.size == 5000
        assert storage.read_bytes(uri, max_bytes=5000) == b"\0" * 5000


# ---- the same problems in the other formats (read stage only, no Ray) ------------------------------------------

def read(path, fmt, kind="t2i", columns=None) -> list[dict]:
    inp = parse_spec(spec_dict("j", "ckpt", [dict(kind=kind, input=dict(uris=str(path), format=fmt,
                                                                       columns=columns or {}), output="o")]))
    inp = inp.tasks[0].input
    units = plan_reads(Storage(), inp)
    return read_units(pa.Table.from_pylist(units), kind, fmt, dict(inp.columns), Storage()).to_pylist()


def test_non_utf8_csv_rows(tmp_path):
    (tmp_path / "p.csv").write_bytes(b"\xef\xbb\xbfid,prompt\na,a fox\nb,caf\xe9\n,\xff\nc,\"two\nlines\"\nd,ok\n")
    rows = read(tmp_path / "p.csv", "csv")
    assert [r["id"] for r in rows][:2] == ["a", "b"] and rows[0]["error"] is None
    assert rows[1]["error"] == ("row 2 (line 3) is not valid UTF-8 (column 'prompt', byte 0xe9 at character 4); "
                                "save the file as UTF-8")
    assert rows[2]["error"].startswith("row 3 (line 4) is not valid UTF-8") and len(rows[2]["id"]) == 32
    assert rows[3]["prompt"] == "two\nlines" and rows[4]["prompt"] == "ok" and rows[4]["error"] is None
    assert [r["id"] for r in read(tmp_path / "p.csv", "csv")] == [r["id"] for r in rows]  # stable


def test_a_csv_field_over_the_parser_limit_is_one_error_row(tmp_path):
    (tmp_path / "p.csv").write_text("id,prompt\na,ok\nb," + "x" * 200_000 + "\nc,fine\n")
    rows = read(tmp_path / "p.csv", "csv")
    assert [r["error"] for r in rows] == [None, "row 2 could not be parsed as CSV (field larger than field limit "
                                                "(131072))", None]
    assert rows[2]["prompt"] == "fine"


def test_parquet_binary_columns_and_bad_nested_strings(tmp_path):
    path_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    bad_path = pa.array([b"a.png", b"b\xff.png"], pa.binary()).view(pa.string())
    images = pa.StructArray.from_arrays([pa.array([None, None], pa.binary()), bad_path], fields=list(path_type))
    pq.write_table(pa.table({"question": pa.array([b"what color", b"what \xfe"], pa.binary()), "image": images,
                             "id": pa.array([b"r1", b"r\xff2"], pa.binary())}), tmp_path / "qa.parquet")
    rows = read(tmp_path / "qa.parquet", "parquet", "vqa")
    assert rows[0]["question"] == "what color" and rows[0]["id"] == "r1" and rows[0]["error"] is None  # UTF-8 bytes
    assert rows[1]["error"] == (
        "id is not valid UTF-8 text (byte 0xff at character 2) in qa.parquet row 2; a derived id stands in; "
        "question is not valid UTF-8 text (byte 0xfe at character 6) in qa.parquet row 2; "
        "image path is not valid UTF-8 text (a string in it does not decode) in qa.parquet row 2")
    assert len(rows[1]["id"]) == 32 and read(tmp_path / "qa.parquet", "parquet", "vqa")[1]["id"] == rows[1]["id"]


def test_wrong_parquet_column_types(tmp_path):
    pq.write_table(pa.table({"prompt": [1, 2], "seed": ["7", "x"]}), tmp_path / "p.parquet")
    rows = read(tmp_path / "p.parquet", "parquet")
    assert rows[0]["error"] == "prompt must be a string, got int 1"
    assert rows[1]["error"] == "prompt must be a string, got int 2; seed must be an integer in [0, 2**63), got str 'x'"
    assert rows[0]["seed"] == 7  # digits as text are accepted (CSV cells are text)


# ---- job-level problems: refused before any model work ---------------------------------------------------------

def test_unknown_task_kind_is_a_spec_error():
    raw = spec_dict("j", "ckpt", [dict(kind="video", input=dict(uris="in.jsonl", format="jsonl"), output="out")])
    with pytest.raises(SpecError, match=r"tasks\[0\]\.kind: got 'video'; expected 't2i' or 'vqa'"):
        parse_spec(raw, "/base")


def test_an_input_that_does_not_exist_fails_the_job_before_model_work(ray_session, checkpoint, tmp_path):
    spec = parse_spec(spec_dict("no-input", checkpoint, [
        dict(kind="t2i", input=dict(uris=str(tmp_path / "nope.jsonl"), format="jsonl"), output=str(tmp_path))]))
    with pytest.raises(FileNotFoundError, match=f"input '{tmp_path / 'nope.jsonl'}' does not exist"):
        run_job(spec)
    assert not (tmp_path / "no-input").exists()  # nothing written


def test_a_corrupt_parquet_input_is_a_job_error_naming_the_file(tmp_path):
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(ValueError, match=r"input file '.*bad\.parquet' is not a readable Parquet file"):
        read(tmp_path / "bad.parquet", "parquet")


def test_an_unreachable_s3_endpoint_fails_fast_and_commits_nothing(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "hostile-secret-value")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{s.getsockname()[1]}"
    spec = parse_spec(spec_dict("dead-endpoint", checkpoint, [
        dict(kind="t2i", input=dict(uris="s3://inputs/p.jsonl", format="jsonl"), output=str(tmp_path))], endpoint))
    start = time.monotonic()
    with pytest.raises(StorageUnreachable) as info:
        run_job(spec)
    assert time.monotonic() - start < 15
    message = str(info.value)
    assert message.startswith(f"S3 endpoint {endpoint} is unreachable (bucket 'inputs': EndpointConnectionError")
    assert "hostile-secret-value" not in message and "nothing was read or written" in message
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("output, problem", [
    ("s3://results/team-a/../team-b", "a '..' segment"),
    ("/data/results/../../elsewhere", "a '..' segment"),
    ("s3://results/./team-a", "a '.' segment"),
    ("s3://results//team-a", "an empty segment ('//')"),
    ("/data/out//x", "an empty segment ('//')"),
])
def test_output_prefix_with_dot_or_empty_segments_is_refused(output, problem):
    raw = spec_dict("j", "ckpt", [dict(kind="t2i", input=dict(uris="in.jsonl", format="jsonl"), output=output)])
    with pytest.raises(SpecError) as info:
        parse_spec(raw, "/base")
    assert f"tasks[0].output: got {output!r}; it has {problem}; write the location out plainly" in str(info.value)


@pytest.mark.parametrize("output, allowed", [
    ("s3://other-bucket/out", ["s3://results/team-a/"]),
    ("s3://results/team-ab/out", ["s3://results/team-a"]),  # a name that merely starts like the prefix
    ("/data/other", ["/data/out"]),
    ("out", ["/elsewhere"]),  # relative: resolved against the spec's folder (/base/sub) first
    ("../../data/other", ["/data/out"]),  # '..' in a relative path resolves first, then it is checked
])
def test_output_outside_the_allowed_prefixes_is_refused(output, allowed):
    raw = spec_dict("j", "ckpt", [dict(kind="t2i", input=dict(uris="in.jsonl", format="jsonl"), output=output)])
    raw["storage"] = dict(allowed_outputs=allowed)
    with pytest.raises(SpecError, match=r"tasks\[0\]\.output: got '.*', which is outside storage\.allowed_outputs"):
        parse_spec(raw, "/base/sub")


def test_outputs_inside_the_allowed_prefixes_pass():
    raw = spec_dict("j", "ckpt", [dict(kind="t2i", input=dict(uris="in.jsonl", format="jsonl"),
                                       output="s3://results/team-a/run-1"),
                                  dict(kind="vqa", input=dict(uris="in.parquet", format="parquet"), output="out")])
    raw["tasks"][1]["output"] = "../shared/out"  # relative to the spec file's folder, as every path in a spec
    raw["storage"] = dict(allowed_outputs=["s3://results/team-a/", "../shared"])
    spec = parse_spec(raw, "/base/sub")
    assert spec.tasks[1].output == "/base/shared/out"
    assert spec.storage.allowed_outputs == ["s3://results/team-a/", "/base/shared"]
