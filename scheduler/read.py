"""Reading task inputs into canonical rows with stable ids.

Ray's own readers do not tell a row's position in its file, and a derived id must depend on it (two equal prompts
in one file are two rows). So the driver lists the input files (files, folders, glob patterns) and plans read units
(one per Parquet row group, one per JSONL/CSV file, which may be gzip or zstd compressed), and each unit is read by
one Ray task that knows where its rows sit.

Every row comes out with the same columns and types whatever the file held (so blocks always share a schema):
    t2i: id, prompt, seed, negative_prompt, error
    vqa: id, question, image_bytes, image_path, image_sha256, seed, error
then the input's other columns that the rows carry into the output (input.keep_columns: a url, a license), as
Parquet typed them, or as text from JSONL and CSV (unit_table says why).
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
import re

import pyarrow as pa

from flashu_batch.jobs.output import READ_KEY, SCHEMAS
from flashu_batch.jobs.spec import T2I_COLUMNS, VQA_COLUMNS, InputSpec
from flashu_batch.jobs.storage import Storage, is_s3, join
from flashu_batch.workers.images import PIXELS_COLUMN

GLOB_CHARS = "*?["  # an input.uris entry with one of these is a glob pattern (glob_files)
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd"}  # JSONL and CSV files, by name; decompressed on read (pyarrow codecs)
EXTENSIONS = {"parquet": (".parquet",),
              "jsonl": tuple(ext + z for ext in (".jsonl", ".json", ".ndjson") for z in ("", *COMPRESSIONS)),
              "csv": tuple(".csv" + z for z in ("", *COMPRESSIONS))}
COLUMNS = {"t2i": tuple(T2I_COLUMNS), "vqa": tuple(VQA_COLUMNS)}
ROW_SCHEMAS = {
    "t2i": pa.schema([("id", pa.string()), ("prompt", pa.string()), ("seed", pa.int64()),
                      ("negative_prompt", pa.string()), ("error", pa.string())]),
    "vqa": pa.schema([("id", pa.string()), ("question", pa.string()), ("image_bytes", pa.binary()),
                      ("image_path", pa.string()), ("image_sha256", pa.string()), ("seed", pa.int64()),
                      ("error", pa.string())]),
}
MAX_SEED = 2**63
# Input columns a row never carries under their own name: the output's columns and the stages' (image_bytes, ...,
# the CPU stage's model-ready pixels, and each row's read key)
RESERVED_COLUMNS = frozenset({PIXELS_COLUMN, READ_KEY, *(name for schema in (*SCHEMAS.values(), *ROW_SCHEMAS.values())
                                                         for name in schema.names)})
MAX_TEXT_COLUMNS = 1000  # distinct JSON keys in one file when keep_columns is None: a carried column each


class InputError(ValueError):
    """An input file that a read task cannot read as the spec says (corrupt, or lacking a keep_columns column): the
    job stops. The index pass returns it as data for the driver to raise (bookkeeping.read_ids), since Ray keeps
    only a traceback's text of an exception raised in a task."""


def plan_reads(storage: Storage, inp: InputSpec) -> list[dict]:
    """The input's read units, in a stable order: {"uri", "source", "row_group", "first_row", "rows" (a Parquet row
    group's row count, None for a JSONL / CSV file), "size" (the file's bytes)}. "source" is part of
    derived ids, so it is the file's path relative to where input.uris found it (moving a dataset keeps the ids): a
    file's name, a folder's name and the path below it, or a pattern's path below its literal folder (input_files).
    Parquet footers are read here: a file that is not Parquet, a keep_columns name a file lacks, and an extra column
    whose types in two files cannot share one output column are errors before any row is read."""
    import pyarrow.parquet as pq

    units, carried = [], {}  # carried: extra column -> (its field so far, the file it came from first)
    wanted = task_columns(dict(inp.columns))
    for uri in inp.uris:
        for file_uri, source in input_files(storage, uri, inp.format):
            fs, path = storage.arrow_fs(file_uri)
            if inp.format != "parquet":
                units.append(dict(uri=file_uri, source=source, row_group=-1, first_row=0, rows=None,
                                  size=fs.get_file_info(path).size))
                continue
            try:
                with fs.open_input_file(path) as f:
                    pf = pq.ParquetFile(f)
                    meta, schema, size = pf.metadata, pf.schema_arrow, f.size()
            except pa.ArrowInvalid as e:  # not Parquet, or cut short: no row of it can be read
                raise ValueError(f"input file {file_uri!r} is not a readable Parquet file ({e}); replace it, or "
                                 f"take it out of input.uris.") from None
            for name in extra_names(schema.names, wanted, inp.keep_columns, file_uri):
                _unify_carried(carried, schema.field(name), file_uri)
            first = 0
            for g in range(meta.num_row_groups):
                rows = meta.row_group(g).num_rows
                units.append(dict(uri=file_uri, source=source, row_group=g, first_row=first, rows=rows, size=size))
                first += rows
    return units


def input_files(storage: Storage, uri: str, fmt: str) -> list[tuple[str, str]]:
    """[(file URI, source)] of one entry of input.uris, sorted by path: a file (source: its name); a folder or s3://
    prefix, every file below it with one of the format's extensions (source: the folder's name / the path below
    it); or a glob pattern (glob_files; a local path that exists is taken as it is, wildcard characters or not).
    Below a folder or a pattern's literal folder, files and folders whose names start with '.' or '_' are skipped
    (Spark/Hive markers like _SUCCESS and _temporary/, our own .flashu/)."""
    if any(c in uri for c in GLOB_CHARS) and (is_s3(uri) or not os.path.exists(uri)):
        return glob_files(storage, uri)
    if storage.is_file(uri):
        return [(uri, uri.rstrip("/").rsplit("/", 1)[-1])]
    top, listed = uri.rstrip("/").rsplit("/", 1)[-1], storage.list(uri)
    if not listed:
        raise FileNotFoundError(f"input {uri!r} does not exist (no file there, nor any under it as a folder or s3:// "
                                f"prefix). Check input.uris (relative paths start at the spec file's folder).")
    below = [(f["uri"], f["uri"][len(uri.rstrip("/")) + 1:]) for f in listed]
    files = [(file_uri, top + "/" + rel) for file_uri, rel in below
             if rel.endswith(EXTENSIONS[fmt]) and not _hidden(rel, allowed="")]
    if not files:
        raise ValueError(f"input {uri!r}: no {fmt} file there (a file, or a folder of files ending in "
                         f"{' / '.join(EXTENSIONS[fmt])}). Check input.uris and input.format.")
    return files


def glob_files(storage: Storage, pattern: str) -> list[tuple[str, str]]:
    """[(file URI, its path below the pattern's literal folder)] of the files a glob pattern matches, sorted by path.
    The literal folder is the pattern's path up to its first segment with a wildcard (s3://bucket/shards for
    s3://bucket/shards/*/part-*.parquet): it is listed (recursively, Storage.list) and each file's path below it is
    matched (glob_regex). The path below it is the file's source, so ids do not depend on where the data sits. Names
    starting with '.' or '_' are skipped unless the pattern spells a segment that starts so. Matching no file is an
    error."""
    scheme = "s3://" if is_s3(pattern) else ""
    parts = pattern[len(scheme):].split("/")
    k = next(i for i, part in enumerate(parts) if any(c in part for c in GLOB_CHARS))
    if scheme and k == 0:
        raise ValueError(f"input {pattern!r}: the bucket name cannot be a pattern; write it out "
                         f"(s3://bucket/prefix/*.parquet).")
    folder = scheme + "/".join(parts[:k]) if scheme else "/".join(parts[:k]) or ("/" if k else ".")
    rest = parts[k:]
    matches = glob_regex("/".join(rest)).fullmatch
    allowed = "".join(sorted({part[0] for part in rest if part.startswith((".", "_"))}))
    listed = storage.list(folder)
    below = [(f["uri"], f["uri"][len(folder.rstrip("/")) + 1:]) for f in listed]
    files = [(file_uri, rel) for file_uri, rel in below if matches(rel) and not _hidden(rel, allowed)]
    if not files:
        raise FileNotFoundError(f"input {pattern!r} matches no file ({len(listed)} files below {folder!r}, none "
                                f"matching; names starting with '.' or '_' are skipped). Check input.uris.")
    return files


def glob_regex(pattern: str) -> re.Pattern:
    """A glob pattern for '/'-separated paths -> a regex. fnmatch's wildcards, kept within one path segment: `*` any
    characters, `?` one, `[abc]` / `[a-z]` / `[!abc]` one of a set; `**` any characters across segments, and a whole
    `**/` segment any number of folders, none too (`a/**/b.jsonl` matches a/b.jsonl and a/x/y/b.jsonl)."""
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**", i):
            whole = (i == 0 or pattern[i - 1] == "/") and pattern.startswith("/", i + 2)
            out.append("(?:.*/)?" if whole else ".*")
            i += 3 if whole else 2
            continue
        if c == "[":
            j = i + 1 + pattern.startswith("!", i + 1)
            j = pattern.find("]", j + pattern.startswith("]", j))  # a ']' first in the set is one of its characters
            if j > 0:
                body = pattern[i + 1:j]
                negate = body.startswith("!")
                body = re.sub(r"([\\\[\]&~|^])", r"\\\1", body[negate:])  # literal in a regex set; '-' keeps ranges
                out.append(f"(?!/)[{'^' if negate else ''}{body}]")
                i = j + 1
                continue
        out.append({"*": "[^/]*", "?": "[^/]"}.get(c, re.escape(c)))
        i += 1
    return re.compile("".join(out), re.DOTALL)


def _hidden(rel: str, allowed: str) -> bool:
    """Whether a path below a listed folder has a segment starting with '.' or '_' (not one of `allowed`)."""
    return any(part[:1] in "._" and part[:1] not in allowed for part in rel.split("/") if part)


def _unify_carried(carried: dict, field: pa.Field, uri: str) -> None:
    """Record a Parquet file's extra column in `carried`, refusing a type that cannot share one column with the same
    column of an earlier file. Ray Data concatenates blocks of different files as pyarrow's permissive unify does
    (int32 and int64 make int64, a column missing from a block is null), so the same unify is the check."""
    if field.name not in carried:
        carried[field.name] = (field, uri)
        return
    before, first_uri = carried[field.name]
    try:
        unified = pa.unify_schemas([pa.schema([before]), pa.schema([field])], promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        raise ValueError(f"input column {field.name!r} is {before.type} in {first_uri!r} but {field.type} in {uri!r}; "
                         f"output rows carry it as one column of one type. Make the types agree, or leave the "
                         f"column out with input.keep_columns.") from None
    carried[field.name] = (unified.field(0), first_uri)


def task_columns(columns: dict) -> dict:
    """{task column: the input column it is read from} for the columns of both tasks (input.columns renames)."""
    return {name: columns.get(name, name) for name in dict.fromkeys((*COLUMNS["t2i"], *COLUMNS["vqa"]))}


def _carries(wanted: dict, keep_columns):
    """name -> whether an input column rides along into the output: one of keep_columns; or, when that is None, one
    the task does not read and not named like an output column (nor a pandas index: __index_level_0__)."""
    if keep_columns is not None:
        return set(keep_columns).__contains__
    taken = RESERVED_COLUMNS | set(wanted.values())
    return lambda name: isinstance(name, str) and name not in taken and not name.startswith("__index_level_")


def extra_names(names, wanted: dict, keep_columns: list | None, uri: str) -> list[str]:
    """The columns of a file (`names`) that its rows carry into the output: keep_columns in their order, or (None)
    every column the task does not read and no output column is named like, in the file's order. Raises InputError
    for a keep_columns name that is an output column's, or that the file lacks."""
    if keep_columns is None:  # a JSON key that is not valid Unicode names no Arrow column
        carries = _carries(wanted, None)
        return [name for name in dict.fromkeys(names) if carries(name) and not _not_unicode(name)]
    reserved = [name for name in keep_columns if name in RESERVED_COLUMNS]
    if reserved:
        raise InputError(f"input.keep_columns names {reserved[0]!r}, a column the output rows have already "
                         f"({', '.join(sorted(RESERVED_COLUMNS))}); rename that column in the input, or leave it "
                         f"out of keep_columns.")
    lacking = [name for name in keep_columns if name not in set(names)]
    if lacking:
        shown = [n for n in dict.fromkeys(names) if isinstance(n, str)]
        shown = ", ".join(map(repr, shown[:20])) + (", ..." if len(shown) > 20 else "")
        raise InputError(f"input.keep_columns names {lacking[0]!r}, but {uri!r} has no such column (it has "
                         f"{shown or 'none'}). Check the name, or leave it out of keep_columns.")
    return list(keep_columns)


def read_units(batch: pa.Table, kind: str, fmt: str, columns: dict, storage: Storage,
               keep_columns: list | None = None) -> pa.Table:
    """Ray Data stage: a batch of read units -> canonical rows (ROW_SCHEMAS[kind]), then the columns they carry."""
    tables = [unit_table(unit, kind, fmt, columns, storage, keep_columns) for unit in batch.to_pylist()]
    if not tables:
        return ROW_SCHEMAS[kind].empty_table()
    return pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]


def unit_table(unit: dict, kind: str, fmt: str, columns: dict, storage: Storage,
               keep_columns: list | None = None) -> pa.Table:
    """One read unit -> its canonical rows (ROW_SCHEMAS[kind]), then the input columns they carry into the output
    (keep_columns: None all, see extra_names). Parquet's keep the file's types; JSONL's and CSV's are text, a value
    that is no JSON string as its JSON text (1, true, {"a": 2}), so that blocks of any two files concatenate (Ray Data
    fills a column a block lacks with nulls, but cannot join an int column to a string one)."""
    if fmt == "parquet":
        raws, extras = _parquet_unit(unit, columns, storage, keep_columns)
    else:
        raws, names, values = _text_unit(unit, fmt, columns, storage, keep_columns)
        extras = pa.table({name: pa.array([_text_value(row.get(name)) for row in values], pa.string())
                           for name in names})
    rows = [row for _, row in _canonical_rows(unit, kind, fmt, raws)]
    return carry_columns(pa.Table.from_pylist(rows, schema=ROW_SCHEMAS[kind]), extras, ())


def carry_columns(table: pa.Table, batch: pa.Table, taken) -> pa.Table:
    """`table` with the columns of `batch` not named in `taken` appended as they came (their Arrow types kept): a
    stage's own columns first, then whatever else the rows carry (a user's url, license, ...)."""
    for name in batch.column_names:
        if name not in taken:
            table = table.append_column(batch.schema.field(name), batch.column(name))
    return table


def unit_rows(unit: dict, kind: str, fmt: str, columns: dict, storage: Storage):
    """Yield (row index in file, canonical row) for one read unit, in file order (no carried columns)."""
    yield from _canonical_rows(unit, kind, fmt, raw_rows(unit, fmt, columns, storage))


def unit_row_ids(unit: dict, kind: str, fmt: str, columns: dict, storage: Storage,
                 keep_columns: list | None = None) -> list[tuple[int, str]]:
    """[(row index in file, id)] of one read unit, in file order: the ids unit_table gives, read cheaply where the
    input holds ids. A Parquet unit reads its id column alone (never an image byte), unless a row there lacks a valid
    id: a derived id stands in for it, which needs the row's content, so that unit is read whole. A JSONL or CSV unit
    is parsed whole (and its keep_columns checked, as unit_table does) and only rows without a valid id are made
    canonical."""
    if fmt == "parquet":
        ids = _parquet_ids(unit, columns, storage)
        return ids if ids is not None else [(p, row["id"]) for p, row in unit_rows(unit, kind, fmt, columns, storage)]
    ids = []
    for raw in _text_unit(unit, fmt, columns, storage, keep_columns)[0]:
        row_id = given_id(raw[1].get("id")) if raw[1] else None
        ids.append((raw[0], row_id or next(_canonical_rows(unit, kind, fmt, [raw]))[1]["id"]))
    return ids


def _canonical_rows(unit: dict, kind: str, fmt: str, raws):
    base = unit["uri"].rsplit("/", 1)[0] if "/" in unit["uri"] else "."
    for position, raw, missing, problem in raws:
        where = f"{unit['source']} {'line' if fmt == 'jsonl' else 'row'} {position + 1}"
        yield position, canonical_row(kind, raw, missing, problem, unit["source"], position, base, where)


def raw_rows(unit: dict, fmt: str, columns: dict, storage: Storage):
    """Yield (row index in file, {task column: raw value} or None, {task column: file column it lacks}, problem or
    None) for one read unit."""
    yield from (_parquet_unit(unit, columns, storage, [])[0] if fmt == "parquet"
                else _text_unit(unit, fmt, columns, storage, [])[0])


def _parquet_unit(unit: dict, columns: dict, storage: Storage, keep_columns: list | None):
    """A row group -> (its raw rows as raw_rows yields them, its carried columns as they are in the file)."""
    import pyarrow.parquet as pq

    wanted = task_columns(columns)
    fs, path = storage.arrow_fs(unit["uri"])
    with fs.open_input_file(path) as f:
        pf = pq.ParquetFile(f)
        names = pf.schema_arrow.names
        extras = extra_names(names, wanted, keep_columns, unit["uri"])
        present = [c for c in dict.fromkeys(wanted.values()) if c in names]
        table = pf.read_row_group(unit["row_group"], columns=list(dict.fromkeys(present + extras)))
    missing = _missing_note(names, wanted)
    values = {name: _column_values(table.column(name)) for name in present}
    raws = [(unit["first_row"] + j, _rename({c: v[j] for c, v in values.items()}, wanted), missing, None)
            for j in range(table.num_rows)]
    carried = table.select(extras)
    for i in range(len(extras)):
        carried = carried.set_column(i, carried.schema.field(i), _valid_text(carried.column(i)))
    return raws, carried


def _parquet_ids(unit: dict, columns: dict, storage: Storage) -> list[tuple[int, str]] | None:
    """[(row index in file, id)] of a row group from its id column alone; None when the file has no id column or a
    row's id is not valid (missing, blank, not text): a derived id needs the row's content."""
    import pyarrow.parquet as pq

    name = columns.get("id", "id")
    fs, path = storage.arrow_fs(unit["uri"])
    with fs.open_input_file(path) as f:
        pf = pq.ParquetFile(f)
        if name not in pf.schema_arrow.names:
            return None
        ids = [given_id(v) for v in _column_values(pf.read_row_group(unit["row_group"], columns=[name]).column(name))]
    return None if None in ids else list(enumerate(ids, unit["first_row"]))


def _text_unit(unit: dict, fmt: str, columns: dict, storage: Storage, keep_columns: list | None):
    """A JSONL or CSV file -> (its raw rows as raw_rows yields them, the names of its carried columns in first-seen
    order, each row's {carried column: value})."""
    wanted = task_columns(columns)
    text = read_file_bytes(storage, unit["uri"]).decode("utf-8", errors="surrogateescape")
    text = text.removeprefix("\ufeff")  # a BOM is no data
    carried = _carries(wanted, keep_columns)
    raws, values, seen, parsed = [], [], {}, False  # seen: every column name in first-seen order; parsed: any record
    for position, raw, missing, problem, record in (_csv_rows if fmt == "csv" else _jsonl_rows)(text, wanted):
        raws.append((position, raw, missing, problem))
        values.append({k: v for k, v in (record or {}).items() if carried(k)})
        seen.update(dict.fromkeys(record or ()))
        parsed = parsed or record is not None
        if keep_columns is None and len(seen) > MAX_TEXT_COLUMNS:
            raise InputError(f"input file {unit['uri']!r} has over {MAX_TEXT_COLUMNS} distinct column names (JSON "
                             f"keys); carrying them all would make a column each. Name the ones to carry in "
                             f"input.keep_columns (or [] for none).")
    names = extra_names(list(seen) if parsed or keep_columns is None else keep_columns, wanted, keep_columns,
                        unit["uri"])  # a file without a row lacks no column
    return raws, names, values


def read_file_bytes(storage: Storage, uri: str) -> bytes:
    """A JSONL or CSV file's bytes, decompressed when its name ends in .gz (gzip) or .zst (zstd). One that does not
    decompress (cut short, corrupt) is an InputError naming it: its rows cannot be told apart, so, as an unreadable
    Parquet file in plan_reads, it stops the job (the index pass reads every file before any model work)."""
    fs, path = storage.arrow_fs(uri)
    with fs.open_input_stream(path, compression=None) as f:  # pyarrow's default would decompress by name too
        data = f.read()  # first, whole: an outage (retried, pipeline.py) is not mistaken for a corrupt file
    codec = next((name for suffix, name in COMPRESSIONS.items() if uri.endswith(suffix)), None)
    if codec is None:
        return data
    try:
        return pa.CompressedInputStream(pa.BufferReader(data), codec).read()
    except (OSError, pa.ArrowInvalid) as e:  # "Truncated compressed stream", "zlib inflate failed: ..."
        raise InputError(f"input file {uri!r} is not a readable {codec} file ({e}); replace it, or take it out of "
                         f"input.uris.") from None


def _jsonl_rows(text: str, wanted: dict):
    """Yield (line index, raw, missing, problem, the parsed object or None) per non-blank line."""
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
            yield j, None, {}, problem or f"line {j + 1} is not valid JSON ({reason})", None
            continue
        if not isinstance(record, dict):
            yield j, None, {}, problem or f"line {j + 1} is a JSON {type(record).__name__}, not an object", None
            continue
        yield j, _rename(record, wanted), _missing_note(list(record), wanted), problem, record


def _csv_rows(text: str, wanted: dict):
    """Yield (row index, raw, missing, problem, the row's {header name: cell} or None) per CSV row."""
    reader = csv.DictReader(io.StringIO(text))
    try:
        names = reader.fieldnames or []
    except csv.Error as e:
        yield 0, None, {}, f"the CSV header could not be parsed ({e})", None
        return
    missing = _missing_note(names, wanted)
    j = 0
    while True:
        try:
            record = next(reader)
        except StopIteration:
            return
        except csv.Error as e:  # e.g. a field over csv.field_size_limit(); the reader goes on at the next line
            yield j, None, {}, f"row {j + 1} could not be parsed as CSV ({e})", None
            j += 1
            continue
        record = {k: (v if v != "" else None) for k, v in record.items()}
        bad = next(((k, _not_unicode(v)) for k, v in record.items() if isinstance(v, str) and _not_unicode(v)), None)
        problem = (f"row {j + 1} (line {reader.line_num}) is not valid UTF-8 (column {bad[0]!r}, {bad[1]}); save the "
                   f"file as UTF-8") if bad else None
        yield j, _rename(record, wanted), missing, problem, record
        j += 1


def _text_value(value) -> str | None:
    """A carried JSONL or CSV value as text: a string as it is, anything else as its JSON text. Bytes that were not
    UTF-8 (kept as surrogate escapes) and unpaired surrogates become U+FFFD, which the Parquet output can hold (the
    row says so in its error already)."""
    if value is None:
        return None
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return re.sub("[\ud800-\udfff]", "\ufffd", text) if _not_unicode(text) else text


def _valid_text(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """A carried Parquet string column as it is, or, where some value is not UTF-8 (Arrow does not check on read,
    the output's readers would fail on it), with such bytes as U+FFFD."""
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        return column
    try:
        column.validate(full=True)
        return column
    except pa.ArrowInvalid:
        values = column.cast(pa.large_binary()).to_pylist()
        return pa.chunked_array([pa.array([None if b is None else b.decode("utf-8", "replace") for b in values],
                                          column.type)])


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

    def text(name, optional=False):
        value = raw.get(name)
        if value is None:
            if name in missing and not optional:
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

    row_id = given_id(raw.get("id"))
    if row_id is None and raw.get("id") is not None:  # an id that is not one: say why
        value, bad_id = _as_text(raw.get("id"))
        if bad_id:
            errors.extend([] if problem else [f"id is not valid UTF-8 text ({bad_id}) in {where}; a derived id "
                                              f"stands in"])
        else:
            errors.append(f"id must be a non-empty string or an integer, got {type(value).__name__} {_short(value)}; "
                          f"a derived id stands in")

    if kind == "t2i":
        prompt, seed = text("prompt"), _seed(raw.get("seed"), errors)
        row = dict(prompt=prompt, seed=seed, negative_prompt=text("negative_prompt", optional=True))
        content = [raw.get("prompt"), raw.get("seed")]
        if raw.get("negative_prompt") is not None:  # rows without one keep the ids they always had
            content.append(raw.get("negative_prompt"))
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
        row = dict(question=question, image_bytes=image_bytes, image_path=image_path, image_sha256=None,
                   seed=_seed(raw.get("seed"), errors))
        content = [raw.get("question"), ref]  # not the seed: inputs that held one before it was read keep their ids
    row_id = row_id or derive_id(kind, source, position, content)
    return dict(id=row_id, **row, error="; ".join(errors) or None)


def given_id(value) -> str | None:
    """A row's own id as its output row keeps it (an integer as its digits), or None where it has none or one that is
    no id (not a string or an integer, blank, not UTF-8): a derived id stands in then (canonical_row)."""
    value, bad = _as_text(value)
    if bad:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value if isinstance(value, str) and value.strip() else None


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
