"""Reading task inputs into canonical rows with stable ids.

Ray's own readers do not tell a row's position in its file, and a derived id must depend on it (two equal prompts
in one file are two rows). So the driver lists the input files and plans read units (one per Parquet row group,
one per JSONL/CSV file), and each unit is read by one Ray task that knows where its rows sit.

Every row comes out with the same columns and types whatever the file held (so blocks always share a schema):
    t2i: id, prompt, seed, error              vqa: id, question, image_bytes, image_path, image_sha256, error
A value of the wrong type, a line that is not JSON or CSV, and text that is not valid UTF-8 (a JSONL or CSV line,
a Parquet string or binary value, a JSON "\ud800" escape) become error rows here, never a failed read: bytes that
do not decode are kept as surrogate escapes until the row is checked, so the rest of the line is still read (its
id too) and the derived id still depends only on the row's bytes and position.
"""

import csv
import hashlib
import io
import json
import os

import pyarrow as pa

from flashu_batch.jobs.spec import T2I_COLUMNS, VQA_COLUMNS, InputSpec
from flashu_batch.jobs.storage import Storage, is_s3, join

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
            top, listed = uri.rstrip("/").rsplit("/", 1)[-1], storage.list(uri)
            if not listed:
                raise FileNotFoundError(f"input {uri!r} does not exist (no file there, nor any under it as a folder "
                                        f"or s3:// prefix). Check input.uris (relative paths start at the spec "
                                        f"file's folder).")
            files = [(f["uri"], top + "/" + f["uri"][len(uri.rstrip("/")) + 1:])
                     for f in listed if f["uri"].endswith(EXTENSIONS[inp.format])
                     and not f["uri"].rsplit("/", 1)[-1].startswith((".", "_"))]
        if not files:
            raise ValueError(f"input {uri!r}: no {inp.format} file there (a file, or a folder of files ending in "
                             f"{' / '.join(EXTENSIONS[inp.format])}). Check input.uris and input.format.")
        for file_uri, source in files:
            if inp.format != "parquet":
                units.append(dict(uri=file_uri, source=source, row_group=-1, first_row=0))
                continue
            fs, path = storage.arrow_fs(file_uri)
            try:
                with fs.open_input_file(path) as f:
                    meta = pq.ParquetFile(f).metadata
            except pa.ArrowInvalid as e:  # not Parquet, or cut short: no row of it can be read
                raise ValueError(f"input file {file_uri!r} is not a readable Parquet file ({e}); replace it, or "
                                 f"take it out of input.uris.") from None
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
    for position, raw, missing, problem in raw_rows(unit, fmt, columns, storage):
        where = f"{unit['source']} {'line' if fmt == 'jsonl' else 'row'} {position + 1}"
        yield position, canonical_row(kind, raw, missing, problem, unit["source"], position, base, where)


def raw_rows(unit: dict, fmt: str, columns: dict, storage: Storage):
    """Yield (row index in file, {task column: raw value} or None, {task column: file column it lacks}, problem or
    None) for one read unit."""
    wanted = {name: columns.get(name, name) for name in ("id", "prompt", "seed", "question", "image")}
    if fmt == "parquet":
        import pyarrow.parquet as pq

        fs, path = storage.arrow_fs(unit["uri"])
        with fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            present = [c for c in wanted.values() if c in pf.schema_arrow.names]
            table = pf.read_row_group(unit["row_group"], columns=present)
        missing = _missing_note(pf.schema_arrow.names, wanted)
        values = {name: _column_values(table.column(name)) for name in table.column_names}
        for j in range(table.num_rows):
            yield unit["first_row"] + j, _rename({c: v[j] for c, v in values.items()}, wanted), missing, None
        return
    fs, path = storage.arrow_fs(unit["uri"])
    with fs.open_input_stream(path) as f:
        text = f.read().decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")  # a BOM is no data
    if fmt == "csv":
        yield from _csv_rows(text, wanted)
        return
    for j, line in enumerate(text.split("\n")):  # only "\n" ends a JSONL line (str.splitlines also splits at
        if not line.strip():                    # U+2028 and others, which JSON strings may hold)
            continue
        bad = _not_unicode(line)
        problem = f"line {j + 1} is not valid UTF-8 ({bad}); save the file as UTF-8" if bad else None
        try:
            record = json.loads(line)
        except (ValueError, RecursionError) as e:  # also over-long integers and too deep nesting
            reason = (f"{e.msg} at column {e.colno}" if isinstance(e, json.JSONDecodeError) else
                      "nested too deeply" if isinstance(e, RecursionError) else str(e)[:200])
            yield j, None, {}, problem or f"line {j + 1} is not valid JSON ({reason})"
            continue
        if not isinstance(record, dict):
            yield j, None, {}, problem or f"line {j + 1} is a JSON {type(record).__name__}, not an object"
            continue
        missing = _missing_note(list(record), wanted)
        yield j, _rename(record, wanted), missing, problem


def _csv_rows(text: str, wanted: dict):
    reader = csv.DictReader(io.StringIO(text))
    try:
        names = reader.fieldnames or []
    except csv.Error as e:
        yield 0, None, {}, f"the CSV header could not be parsed ({e})"
        return
    missing = _missing_note(names, wanted)
    j = 0
    while True:
        try:
            record = next(reader)
        except StopIteration:
            return
        except csv.Error as e:  # e.g. a field over csv.field_size_limit(); the reader goes on at the next line
            yield j, None, {}, f"row {j + 1} could not be parsed as CSV ({e})"
            j += 1
            continue
        record = {k: (v if v != "" else None) for k, v in record.items()}
        bad = next(((k, _not_unicode(v)) for k, v in record.items() if isinstance(v, str) and _not_unicode(v)), None)
        problem = (f"row {j + 1} (line {reader.line_num}) is not valid UTF-8 (column {bad[0]!r}, {bad[1]}); save the "
                   f"file as UTF-8") if bad else None
        yield j, _rename(record, wanted), missing, problem
        j += 1


class _NotUTF8:
    """Stands in for a Parquet value whose text does not decode (inside a struct); its repr is stable for ids."""

    def __repr__(self):
        return "<not UTF-8>"


NOT_UTF8 = _NotUTF8()


def _column_values(column: pa.ChunkedArray) -> list:
    """A Parquet column's Python values. Arrow does not check UTF-8 on read, and to_pylist fails on the first bad
    string: string columns are decoded here (bad bytes kept as surrogate escapes, for the row check to report),
    and a bad string nested in a struct makes that one value NOT_UTF8."""
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        return [None if b is None else b.decode("utf-8", errors="surrogateescape")
                for b in column.cast(pa.large_binary()).to_pylist()]
    try:
        return column.to_pylist()
    except UnicodeDecodeError:
        values = []
        for value in column:
            try:
                values.append(value.as_py())
            except UnicodeDecodeError:
                values.append(NOT_UTF8)
        return values


def _not_unicode(text: str) -> str | None:
    """Where a string is not valid Unicode text, or None: a byte that was not UTF-8 (decoded as a surrogate
    escape) or an unpaired surrogate (a JSON "\\ud800" escape). Either would fail the Parquet write."""
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError as e:
        code = ord(text[e.start])
        what = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"unpaired surrogate U+{code:04X}"
        return f"{what} at character {e.start + 1}"


def _rename(record: dict, wanted: dict) -> dict:
    return {name: record.get(col) for name, col in wanted.items()}


def _missing_note(names: list, wanted: dict) -> dict:
    """Which task columns the file lacks, to tell "no such column" from "null value" in messages."""
    return {name: col for name, col in wanted.items() if col not in names}


def derive_id(kind: str, source: str, position: int, content: list) -> str:
    """A stable id from where the row sits (file, row index) and what it holds."""
    key = json.dumps([kind, source, position, content], default=repr, ensure_ascii=False)
    return hashlib.sha256(key.encode("utf-8", errors="surrogatepass")).hexdigest()[:32]


def canonical_row(kind: str, raw: dict | None, missing: dict, problem: str | None, source: str, position: int,
                  base: str, where: str = "") -> dict:
    """One raw row -> the canonical columns; type and encoding problems become the row's `error` (`where` names
    the row's place in its file for them)."""
    errors = [problem] if problem else []  # a line that is not UTF-8 is reported once, not again per value
    raw = raw or {}

    def text(name):
        value = raw.get(name)
        if value is None:
            if name in missing:
                errors.append(f"no {missing[name]!r} column in {source} for {name!r} (map yours with input.columns)")
            return None
        value, bad = _as_text(value)
        if bad:
            errors.extend([] if problem else [f"{name} is not valid UTF-8 text ({bad}) in {where}"])
            return None
        if not isinstance(value, str):
            errors.append(f"{name} must be a string, got {type(value).__name__} {_short(value)}")
            return None
        return value

    row_id, bad_id = _as_text(raw.get("id"))
    if bad_id:
        errors.extend([] if problem else [f"id is not valid UTF-8 text ({bad_id}) in {where}; a derived id stands in"])
        row_id = None
    elif isinstance(row_id, int) and not isinstance(row_id, bool):
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
        image = raw.get("image")
        path = image.get("path") if isinstance(image, dict) else image  # a URI or a struct's path (bytes: no text)
        if isinstance(path, str) or path is NOT_UTF8:
            bad = _as_text(path)[1]
            if bad:
                errors.extend([] if problem else [f"image path is not valid UTF-8 text ({bad}) in {where}"])
                image = None
        image_bytes, image_path, ref = _image(image, base, errors)
        row = dict(question=question, image_bytes=image_bytes, image_path=image_path, image_sha256=None)
        content = [raw.get("question"), ref]
    row_id = row_id or derive_id(kind, source, position, content)
    return dict(id=row_id, **row, error="; ".join(errors) or None)


def _as_text(value):
    """(value, None), with bytes (a Parquet binary column) decoded when they are UTF-8; or (None, where the text
    is not valid) for undecodable bytes, surrogates and NOT_UTF8. Other values pass for the type checks."""
    if value is NOT_UTF8:
        return None, "a string in it does not decode"
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).decode("utf-8", errors="surrogateescape")
    if isinstance(value, str):
        bad = _not_unicode(value)
        return (None, bad) if bad else (value, None)
    return value, None


def _seed(value, errors: list) -> int | None:
    if value is None:
        return None
    digits = value.strip().lstrip("+") if isinstance(value, str) else ""
    if digits.isdecimal() and len(digits) <= 19:  # CSV cells are text; int() refuses "²" and 4301+ digits
        value = int(digits)
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
