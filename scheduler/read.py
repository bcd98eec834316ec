"""Reading task inputs into canonical rows with stable ids.

Ray's own readers do not tell a row's position in its file, and a derived id must depend on it (two equal prompts
in one file are two rows). So the driver lists the input files and plans read units (one per Parquet row group,
one per JSONL/CSV file), and each unit is read by one Ray task that knows where its rows sit.

Every row comes out with the same columns and types whatever the file held (so blocks always share a schema):
    t2i: id, prompt, seed, error              vqa: id, question, image_bytes, image_path, image_sha256, error
A value of the wrong type becomes an error row here, never a failed read.
"""

import csv
import hashlib
import io
import json
import os

import pyarrow as pa

from jobs.spec import T2I_COLUMNS, VQA_COLUMNS, InputSpec
from jobs.storage import Storage, is_s3, join

EXTENSIONS = {"parquet": (".parquet",), "jsonl": (".jsonl", ".json", ".ndjson"), "csv": (".csv",)}
COLUMNS = {"t2i": tuple(T2I_COLUMNS), "vqa": tuple(VQA_COLUMNS)}
ROW_SCHEMAS = {
    "t2i": pa.schema([("id", pa.string()), ("prompt", pa.string()), ("seed", pa.int64()), ("error", pa.string())]),
    "vqa": pa.schema([("id", pa.string()), ("question", pa.string()), ("image_bytes", pa.binary()),
                      ("image_path", pa.string()), ("image_sha256", pa.string()), ("error", pa.string())]),
}
MAX_SEED = 2**63


def plan_reads(storage: Storage, inp: InputSpec) -> list[dict]:
    """The input's read units, in a stable order: {"uri", "source", "row_group", "first_row"}; "source" is the
    file's path relative to the URI it was found under (part of derived ids, so moving a dataset keeps them)."""
    import pyarrow.parquet as pq

    units = []
    for uri in inp.uris:
        if storage.is_file(uri):
            files = [(uri, uri.rstrip("/").rsplit("/", 1)[-1])]
        else:
            top = uri.rstrip("/").rsplit("/", 1)[-1]
            files = [(f["uri"], top + "/" + f["uri"][len(uri.rstrip("/")) + 1:])
                     for f in storage.list(uri) if f["uri"].endswith(EXTENSIONS[inp.format])
                     and not f["uri"].rsplit("/", 1)[-1].startswith((".", "_"))]
        if not files:
            raise ValueError(f"input {uri!r}: no {inp.format} file there (a file, or a folder of files ending in "
                             f"{' / '.join(EXTENSIONS[inp.format])}). Check input.uris and input.format.")
        for file_uri, source in files:
            if inp.format != "parquet":
                units.append(dict(uri=file_uri, source=source, row_group=-1, first_row=0))
                continue
            fs, path = storage.arrow_fs(file_uri)
            with fs.open_input_file(path) as f:
                meta = pq.ParquetFile(f).metadata
            first = 0
            for g in range(meta.num_row_groups):
                units.append(dict(uri=file_uri, source=source, row_group=g, first_row=first))
                first += meta.row_group(g).num_rows
    return units


def read_units(batch: pa.Table, kind: str, fmt: str, columns: dict, storage: Storage) -> pa.Table:
    """Ray Data stage: a batch of read units -> canonical rows (ROW_SCHEMAS[kind])."""
    rows = [row for unit in batch.to_pylist() for _, row in unit_rows(unit, kind, fmt, columns, storage)]
    return pa.Table.from_pylist(rows, schema=ROW_SCHEMAS[kind])


def unit_rows(unit: dict, kind: str, fmt: str, columns: dict, storage: Storage):
    """Yield (row index in file, canonical row) for one read unit, in file order."""
    base = unit["uri"].rsplit("/", 1)[0] if "/" in unit["uri"] else "."
    for position, raw, problem in raw_rows(unit, fmt, columns, storage):
        yield position, canonical_row(kind, raw, problem, unit["source"], position, base)


def raw_rows(unit: dict, fmt: str, columns: dict, storage: Storage):
    """Yield (row index in file, {task column: raw value} or None, problem or None) for one read unit."""
    wanted = {name: columns.get(name, name) for name in ("id", "prompt", "seed", "question", "image")}
    if fmt == "parquet":
        import pyarrow.parquet as pq

        fs, path = storage.arrow_fs(unit["uri"])
        with fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            present = [c for c in wanted.values() if c in pf.schema_arrow.names]
            table = pf.read_row_group(unit["row_group"], columns=present)
        names = pf.schema_arrow.names
        for j, record in enumerate(table.to_pylist()):
            yield unit["first_row"] + j, _rename(record, wanted), _missing_note(names, wanted)
        return
    fs, path = storage.arrow_fs(unit["uri"])
    with fs.open_input_stream(path) as f:
        text = f.read().decode("utf-8", errors="replace")
    if fmt == "csv":
        reader = csv.DictReader(io.StringIO(text))
        names = reader.fieldnames or []
        for j, record in enumerate(reader):
            yield j, _rename({k: (v if v != "" else None) for k, v in record.items()}, wanted), \
                _missing_note(names, wanted)
        return
    for j, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            yield j, None, f"line {j + 1} is not valid JSON ({e.msg} at column {e.colno})"
            continue
        if not isinstance(record, dict):
            yield j, None, f"line {j + 1} is a JSON {type(record).__name__}, not an object"
            continue
        yield j, _rename(record, wanted), _missing_note(list(record), wanted)


def _rename(record: dict, wanted: dict) -> dict:
    return {name: record.get(col) for name, col in wanted.items()}


def _missing_note(names: list, wanted: dict) -> dict:
    """Which task columns the file lacks, to tell "no such column" from "null value" in messages."""
    return {name: col for name, col in wanted.items() if col not in names}


def derive_id(kind: str, source: str, position: int, content: list) -> str:
    """A stable id from where the row sits (file, row index) and what it holds."""
    key = json.dumps([kind, source, position, content], default=repr, ensure_ascii=False)
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def canonical_row(kind: str, raw: dict | None, problem, source: str, position: int, base: str) -> dict:
    """One raw row -> the canonical columns; type problems become the row's `error`."""
    missing = problem if isinstance(problem, dict) else {}
    errors = [problem] if isinstance(problem, str) else []
    raw = raw or {}

    def text(name):
        value = raw.get(name)
        if value is None:
            if name in missing:
                errors.append(f"no {missing[name]!r} column in {source} for {name!r} (map yours with input.columns)")
            return None
        if not isinstance(value, str):
            errors.append(f"{name} must be a string, got {type(value).__name__} {_short(value)}")
            return None
        return value

    row_id = raw.get("id")
    if isinstance(row_id, int) and not isinstance(row_id, bool):
        row_id = str(row_id)
    elif row_id is not None and not (isinstance(row_id, str) and row_id.strip()):
        errors.append(f"id must be a non-empty string or an integer, got {type(row_id).__name__} {_short(row_id)}; "
                      f"a derived id stands in")
        row_id = None

    if kind == "t2i":
        prompt, seed = text("prompt"), _seed(raw.get("seed"), errors)
        row = dict(prompt=prompt, seed=seed)
        content = [raw.get("prompt"), raw.get("seed")]
    else:
        question = text("question")
        image_bytes, image_path, ref = _image(raw.get("image"), base, errors)
        row = dict(question=question, image_bytes=image_bytes, image_path=image_path, image_sha256=None)
        content = [raw.get("question"), ref]
    row_id = row_id or derive_id(kind, source, position, content)
    return dict(id=row_id, **row, error="; ".join(errors) or None)


def _seed(value, errors: list) -> int | None:
    if value is None:
        return None
    if isinstance(value, str) and value.strip().lstrip("+").isdigit():  # CSV cells are text
        value = int(value)
    elif isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < MAX_SEED:
        return value
    errors.append(f"seed must be an integer in [0, 2**63), got {type(value).__name__} {_short(value)}")
    return None


def _image(value, base: str, errors: list):
    """(bytes or None, path/URI or None, id content) from bytes, a datasets Image struct or a URI string."""
    if value is None:
        return None, None, None
    if isinstance(value, (bytes, bytearray)):
        return bytes(value), None, hashlib.sha256(value).hexdigest()
    if isinstance(value, dict) and set(value) <= {"bytes", "path"}:
        data, path = value.get("bytes"), value.get("path")
        if data is not None:
            if not isinstance(data, (bytes, bytearray)):
                errors.append(f"image.bytes must be bytes, got {type(data).__name__}")
                return None, path, None
            return bytes(data), path if isinstance(path, str) else None, hashlib.sha256(data).hexdigest()
        value = path
        if value is None:
            return None, None, None
    if isinstance(value, str) and value.strip():
        uri = value.strip()
        if not is_s3(uri) and "://" in uri:
            errors.append(f"image URI {uri!r} is not supported (use a local path or s3://bucket/key)")
            return None, uri, uri
        if not is_s3(uri) and not os.path.isabs(uri):
            uri = join(base, uri)  # relative to the input file's folder
        return None, uri, value
    errors.append(f"image must be bytes, a {{bytes, path}} struct or a URI string, got {type(value).__name__} "
                  f"{_short(value)}")
    return None, None, None


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
