"""A task's id bookkeeping as Ray work over hash partitions: nothing in the driver grows with the number of rows.

The driver plans read units and lists commit records (per file), and holds ObjectRefs, per-unit counts and a few
examples; the ids themselves never reach it:

    read units     --read_ids-->      INPUT_ROWs  (hash, read key), split by hash partition  --+
    commit records --scan_commits-->  COMMIT_ROWs (hashes, record, row, error, read key), split --+--> partition_pass
                                                                                                  (one task each)

A partition task sees every row of its ids and answers with counts, a few examples and, per group of read units,
the read keys the read stage drops (Skip): committed ids and repeats. The arithmetic is jobs/ids.py's
(index_partition, claim_losers); finalize's file work is jobs/output.py's (recover, settle).

Per-unit completion: a read unit whose every row is committed or a repeat gets a record under .flashu/units/ (one
create-only file per unit, keyed by its file, row group and size), written as soon as the driver's count of its
committed rows says it may be complete and a check of its commit records (verify_unit) confirms it, and at the
index and final passes. A later run does not read such a unit at all: its ids are committed, so any row elsewhere
with one of them is skipped as committed (or, when the committed row sat earlier in read order, as a repeat).
A --retry-errors run reads every unit (a unit record says nothing of error rows).
"""

import hashlib
import json
import random
import time
from dataclasses import dataclass, field

import numpy as np

from flashu_batch.jobs.ids import (COMMIT_ROW, INPUT_ROW, NO_KEY, claim_losers, hash_ids,
                                   index_partition, key_ordinal, key_unit, read_key, split_by_partition)
from flashu_batch.jobs.output import (UNITS, TaskOutput, claim_ranks, commit_rows, image_sources, json_name,
                                      record_meta)
from flashu_batch.jobs.storage import Storage, join
from flashu_batch.scheduler.pipeline import (READ_CPUS, RETRIED_STORAGE_ERRORS, STORAGE_MAX_RETRIES,
                                             TASK_MAX_RETRIES)
from flashu_batch.scheduler.read import COMPRESSIONS, InputError, unit_row_ids

# How the work is cut. The driver owns every object the tasks return, and its Ray keeps a few KiB for each (the data
# itself is in the object store: pipeline.MAX_INLINE_BYTES), so the counts of tasks and objects grow with the
# partitions, which grow with the rows only up to MAX_PARTITIONS:
#   read tasks x (1 + partitions) + scan tasks x (1 + partitions) + partitions x (1 + groups)
PARTITION_ROWS = 1 << 20  # input rows per partition task, about (its memory: ~100 bytes a row at most)
MAX_PARTITIONS = 128
TASKS_PER_PARTITION = 2  # read tasks (and scan tasks) per partition, at least MIN_TASKS and at most MAX_TASKS
MIN_TASKS, MAX_TASKS = 8, 256
RECORDS_PER_SCAN = 200  # commit records per scan task, at least (a task per record would cost more than its work)
# A JSONL / CSV file's rows, guessed before it is read from its size (Parquet footers say theirs): bytes per row on
# the low side (a short prompt line; a compressed one, .gz / .zst, much less), since a guess too high only makes more
# partitions and one too low makes partition tasks too big
TEXT_ROW_BYTES, COMPRESSED_ROW_BYTES = 32, 8
REPEAT_EXAMPLES = 5  # repeated ids named in metrics.json and the summary (the count covers all of them)
DROP = np.dtype([("key", np.int64), ("repeat", np.bool_)])  # a row the read stage drops: committed, or a repeat


# ---- Ray tasks --------------------------------------------------------------------------------------------------

def with_storage_retries(fn, *args):
    """fn(*args), re-run on a storage outage (pipeline.RETRIED_STORAGE_ERRORS) up to STORAGE_MAX_RETRIES times with
    exponential backoff (2, 4, 8, 16, 32 s, jittered), as Ray Data does for the pipeline's own stages."""
    for attempt in range(STORAGE_MAX_RETRIES + 1):
        try:
            return fn(*args)
        except Exception as e:  # noqa: BLE001 -- re-raised unless it is an outage
            if attempt == STORAGE_MAX_RETRIES or not any(m in str(e) for m in RETRIED_STORAGE_ERRORS):
                raise
            time.sleep(2 ** (attempt + 1) * random.uniform(0.5, 1.0))


def read_ids(units: list[tuple[int, dict]], kind: str, inp, storage: Storage, partitions: int) -> list:
    """Read task: some read units (index, unit) -> [{"rows": {index: row count}, "problems": {index: why it cannot
    be read}, "dense": {index: whether each row's index in its file is the unit's first_row + its ordinal (a JSONL
    file's blank lines make it not)}}, then one INPUT_ROW array per partition]. Only ids are read where the input
    has them."""
    start = time.perf_counter()
    rows, problems, dense, parts = {}, {}, {}, []
    keep = None if inp.keep_columns is None else list(inp.keep_columns)
    for index, unit in units:
        try:
            ids = with_storage_retries(unit_row_ids, unit, kind, inp.format, dict(inp.columns), storage, keep)
        except InputError as e:  # as data: the driver raises the first in read order
            problems[index], ids = str(e), []
        part = np.empty(len(ids), INPUT_ROW)
        part["hash"], part["key"] = hash_ids([i for _, i in ids]), read_key(index, np.arange(len(ids)))
        rows[index] = len(ids)
        dense[index] = all(row == unit["first_row"] + k for k, (row, _) in enumerate(ids))
        parts.append(part)
    parts = split_by_partition(np.concatenate([np.empty(0, INPUT_ROW)] + parts), partitions)
    return [dict(rows=rows, problems=problems, dense=dense, seconds=time.perf_counter() - start)] + parts


def scan_commits(uris: list[str], first_index: int, output: TaskOutput, images_per_id: int,
                 partitions: int) -> list:
    """Scan task: some commit records -> [{"seconds"}, their metas (jobs.output.record_meta, indexed from
    first_index), then one COMMIT_ROW array per partition]."""
    start = time.perf_counter()
    metas, parts = [], []
    for k, record in enumerate(with_storage_retries(output.read_records, uris)):
        parts.append(commit_rows(record, first_index + k, images_per_id, output.error_ids(record)))
        metas.append(record_meta(record, first_index + k))
    parts = split_by_partition(np.concatenate([np.empty(0, COMMIT_ROW)] + parts), partitions)
    return [dict(seconds=time.perf_counter() - start), metas] + parts


def partition_pass(n_inputs: int, images_per_id: int, succeeded_only: bool, unread: np.ndarray, limit_key: int,
                   unit_group: np.ndarray | None, groups: int, rank: np.ndarray | None,
                   standing: np.ndarray | None, *parts) -> list:
    """Partition task: its input rows (the first n_inputs parts) and committed rows (the rest) -> [summary, then
    (when unit_group is given) one drop array per group of read units: (key, repeat) sorted by key]. The summary:
    index_partition's counts and examples, per-unit counts ("todo", "unit_repeats": (units,) int64), the first few keys
    still to do, and (when rank is given: finalize) the committed rows that lose their id's claim."""
    start = time.perf_counter()
    rows = np.concatenate([np.empty(0, INPUT_ROW)] + list(parts[:n_inputs]))
    rows = rows[rows["key"] < limit_key]
    commits = np.concatenate([np.empty(0, COMMIT_ROW)] + list(parts[n_inputs:]))
    if standing is not None:  # finalize: only the records that stand (recover)
        commits = commits[standing[commits["record"]]]
    found = index_partition(rows, commits, images_per_id, succeeded_only, unread, REPEAT_EXAMPLES)
    units = len(unread)
    summary = dict(distinct=found["distinct"], done=found["done"], retried=found["retried"],
                   repeats=found["repeats"], examples=found["examples"], todo_examples=found["todo_keys"][:3].tolist(),
                   todo=np.bincount(key_unit(found["todo_keys"]), minlength=units),
                   unit_repeats=np.bincount(key_unit(found["repeat_keys"]), minlength=units),
                   losers=claim_losers(commits, rank) if rank is not None else None)
    summary["seconds"] = time.perf_counter() - start
    if unit_group is None:
        return [summary]
    drops = np.empty(len(found["drop_keys"]), DROP)
    drops["key"], drops["repeat"] = found["drop_keys"], found["drop_repeat"]
    group = unit_group[key_unit(drops["key"])]
    bounds = np.searchsorted(group, np.arange(groups + 1))  # drop keys are sorted, and so are units' groups
    return [summary] + [drops[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def verify_unit(index: int, unit: dict, rows: int, dense: bool, skip, record_uris: list[str], output: TaskOutput,
                images_per_id: int, examples: list[dict]) -> bool:
    """Check task: whether every row of read unit `index` that this run had to do is committed (each of its
    images_per_id output rows), by the records `record_uris` (the ones this run's writes of its rows made); if so,
    write the unit's completion record. The driver's count of committed rows only says when to look: a write that
    Ray re-ran may have committed some rows twice. skip: the task's Skip (Ray passes the value of its ObjectRef)."""
    drops = skip.drops(index)
    limit = skip.rows_in(index, rows)
    todo = np.setdiff1d(np.arange(limit), key_ordinal(drops["key"]), assume_unique=True)
    seen = np.zeros((limit, images_per_id), bool)
    for data in with_storage_retries(output.storage.read_many, record_uris):
        record = json.loads(data)
        keys = np.asarray(record.get("keys", []), np.int64)
        _, image = image_sources(record["ids"], images_per_id)
        mine = (key_unit(keys) == index) & (key_ordinal(keys) < limit) & (image[:len(keys)] >= 0)
        seen[key_ordinal(keys[mine]), image[:len(keys)][mine]] = True
    if not seen[todo].all():
        return False
    write_unit_records(output, [(unit, rows, int(drops["repeat"].sum()), dense, examples)])
    return True


def write_unit_records(output: TaskOutput, done: list[tuple[dict, int, int, bool, list]]) -> None:
    """Completion records of read units: [(unit, its rows, its repeated rows, whether its rows' file indices are
    dense (read_ids), the repeat examples of the task's report that sit in it)]; create-only, so a unit recorded
    twice keeps its first record."""
    for unit, rows, repeats, dense, examples in done:
        record = dict(uri=unit["uri"], source=unit["source"], row_group=unit["row_group"], size=unit["size"],
                      rows=rows, repeats=repeats, dense=dense, examples=examples, created_unix=time.time())
        with_storage_retries(output.storage.create, join(output.root, UNITS, f"{unit_id(unit)}.json"),
                             json.dumps(record).encode())


def unit_id(unit: dict) -> str:
    """A read unit's name in .flashu/units/: its file, row group and the file's size (a file rewritten since has
    another). Stable across runs over the same input."""
    text = f"{unit['uri']}\0{unit['row_group']}\0{unit['size']}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


# ---- What the read stage drops ---------------------------------------------------------------------------------

@dataclass
class Skip:
    """The rows the read stage drops, before any other work: rows of ids committed by an earlier run, and every row
    whose id came earlier in read order (the repeated-id policy, README), as read keys spread over the partition
    tasks' objects (`parts`: group -> one drop array per partition); and every row at or past `limit_key`
    (`run --limit`). The driver ray.puts it (a few refs) once per task."""
    unit_group: np.ndarray  # (units,) int64: each read unit's group
    parts: dict            # group -> [ObjectRef of a (key, repeat) array, one per partition]
    limit_key: int = NO_KEY

    def drops(self, unit: int) -> np.ndarray:
        """The (key, repeat) drops of read unit `unit`, sorted by key."""
        import ray

        refs = self.parts.get(int(self.unit_group[unit]), []) if unit < len(self.unit_group) else []
        found = [d[key_unit(d["key"]) == unit] for d in ray.get(refs)] if refs else []
        drops = np.concatenate([np.empty(0, DROP)] + found)
        return drops[np.argsort(drops["key"])]

    def rows_in(self, unit: int, rows: int) -> int:
        return rows_inside(self.limit_key, unit, rows)

    def keep(self, unit: int, rows: int) -> np.ndarray:
        """(rows,) bool over the rows of read unit `unit`, in file order."""
        keep = np.zeros(rows, bool)
        keep[:self.rows_in(unit, rows)] = True
        keep[key_ordinal(self.drops(unit)["key"])] = False
        return keep


# ---- The driver's passes -------------------------------------------------------------------------------------------

@dataclass
class Index:
    """What the index pass found of a task's input, per read unit and in total (never per row)."""
    units: list[dict]
    unread: np.ndarray        # (units,) bool: complete by an earlier run, not read
    rows: np.ndarray          # (units,) int64: rows of each unit
    dense: np.ndarray         # (units,) bool: a row's index in its file is the unit's first_row + its ordinal
    todo: np.ndarray          # (units,) int64: rows this run has to do
    unit_repeats: np.ndarray  # (units,) int64: rows skipped as a repeated id
    distinct: int             # distinct ids of the input (those of unread units counted from their records)
    done: int                 # of them, committed before this run
    retried: int              # of them, committed before only as error rows (--retry-errors)
    repeats: int              # repeated-id rows in all units
    examples: list            # [(read key of a repeat, of its id's first row)], the earliest few of the units read
    limit_key: int
    before: dict = field(default_factory=dict)  # unit index -> its completion record, for the units not read
    complete: list = field(default_factory=list)  # units found complete now, to record (record_units)
    input_parts: list = field(default_factory=list)  # [partition][ObjectRef]: the units' INPUT_ROWs, kept for the check
    task_seconds: dict = field(default_factory=dict)  # seconds the Ray tasks of each step ran, summed (cluster time)
    skip: object = None       # ObjectRef of a Skip, or None when the read stage drops nothing

    def recordable(self, unit: int) -> bool:
        """Whether read unit `unit` can get a completion record from this run: read by it, and wholly inside the
        limit (`run --limit` never records the unit it cuts)."""
        return not self.unread[unit] and key_unit(self.limit_key) > unit

    @property
    def input_rows(self) -> int:
        """Rows of the input (inside the limit)."""
        return sum(rows_inside(self.limit_key, u, int(r)) for u, r in enumerate(self.rows))


def rows_inside(limit_key: int, unit: int, rows: int) -> int:
    """How many of read unit `unit`'s first rows come before the read key `limit_key` (`run --limit`)."""
    if key_unit(limit_key) != unit:
        return rows if key_unit(limit_key) > unit else 0
    return min(rows, int(key_ordinal(limit_key)))


def partition_count(units: list[dict], unread: np.ndarray) -> int:
    rows = sum(unit_rows_guess(u) for u, skip in zip(units, unread) if not skip)
    return int(min(MAX_PARTITIONS, max(1, -(-rows // PARTITION_ROWS))))


def unit_rows_guess(unit: dict) -> int:
    if unit["rows"] is not None:
        return unit["rows"]
    compressed = unit["uri"].endswith(tuple(COMPRESSIONS))
    return (unit["size"] or 0) // (COMPRESSED_ROW_BYTES if compressed else TEXT_ROW_BYTES) + 1


def task_count(items: int, partitions: int, per_task: int = 1) -> int:
    """How many read or scan tasks share `items` read units or commit records (at least per_task each)."""
    return min(MAX_TASKS, max(TASKS_PER_PARTITION * partitions, MIN_TASKS), -(-items // per_task))


def chunks(items: list, most: int) -> list[list]:
    """`items` in at most `most` consecutive chunks of near-equal length."""
    count = min(most, len(items))
    bounds = [len(items) * k // count for k in range(count + 1)] if count else [0]
    return [items[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def remote(fn, returns: int = 1):
    import ray

    return ray.remote(fn).options(num_cpus=READ_CPUS, max_retries=TASK_MAX_RETRIES, num_returns=returns)


def completed_units(output: TaskOutput, units: list[dict]) -> dict[int, dict]:
    """{unit index: its completion record} of the planned units an earlier run recorded complete."""
    listed = {json_name(f["uri"]): f["uri"]
              for f in output.storage.list(join(output.root, UNITS)) if f["uri"].endswith(".json")}
    wanted = {i: listed[unit_id(u)] for i, u in enumerate(units) if unit_id(u) in listed}
    found = output.storage.read_many(list(wanted.values()))
    return {i: json.loads(data) for i, data in zip(wanted, found)}


def scan(output: TaskOutput, images_per_id: int, partitions: int) -> tuple[list, int]:
    """Every commit record, scanned by Ray tasks -> (refs per scan task: [{"seconds"}, metas, part per partition],
    how many records were listed)."""
    listing = [f["uri"] for f in output.record_listing()]
    refs, at = [], 0
    for part in chunks(listing, task_count(len(listing), partitions, RECORDS_PER_SCAN)):
        refs.append(remote(scan_commits, 2 + partitions).remote(part, at, output, images_per_id, partitions))
        at += len(part)
    return refs, at


def index_input(units: list[dict], task, storage: Storage, output: TaskOutput, *, limit: int | None = None,
                retry_errors: bool = False, images_per_id: int = 1) -> Index:
    """The index pass (run_task step 1): which rows this run does, per read unit, and the Skip for the read stage.
    Raises InputError for the first unit in read order that cannot be read."""
    import ray

    done_before = {} if retry_errors else completed_units(output, units)
    unread = np.array([i in done_before for i in range(len(units))], bool)
    partitions = partition_count(units, unread)
    reading = [(i, u) for i, u in enumerate(units) if not unread[i]]
    if not reading:  # every unit complete (a finished job run again): nothing to read, scan or partition
        return finished_index(units, done_before)
    read_refs = [remote(read_ids, 1 + partitions).remote(part, task.kind, task.input, storage, partitions)
                 for part in chunks(reading, task_count(len(reading), partitions))]
    scan_refs, _ = scan(output, images_per_id, partitions)

    rows, dense = np.zeros(len(units), np.int64), np.zeros(len(units), bool)
    for i, record in done_before.items():
        rows[i], dense[i] = record["rows"], record.get("dense", False)
    problems, read_metas = {}, ray.get([refs[0] for refs in read_refs])
    for meta in read_metas:
        for i, n in meta["rows"].items():
            rows[i], dense[i] = n, meta["dense"][i]
        problems.update(meta["problems"])
    if problems:  # the first in read order, whichever task ended first
        more = f" ({len(problems) - 1} more read units cannot be read either)" if len(problems) > 1 else ""
        raise InputError(f"task {task.task_name!r}: {problems[min(problems)]}{more}")
    limit_key = cut_key(rows, limit)

    # Groups of read units in the skip set, one per partition: a read task fetches its group's drops from each
    # partition, about 9 bytes x PARTITION_ROWS in all (the drops of 1/partitions of the input)
    groups = max(1, min(partitions, len(units)))
    unit_group = np.arange(len(units), dtype=np.int64) * groups // max(1, len(units))
    passes = [remote(partition_pass, 1 + groups).remote(
        len(read_refs), images_per_id, retry_errors, unread, limit_key, unit_group, groups, None, None,
        *[refs[1 + p] for refs in read_refs], *[refs[2 + p] for refs in scan_refs]) for p in range(partitions)]
    summaries = ray.get([refs[0] for refs in passes])
    firsts_before = sum(r["rows"] - r["repeats"] for r in done_before.values())  # ids of the units not read
    index = Index(units=units, unread=unread, rows=rows, dense=dense, limit_key=limit_key, examples=[],
                  before=done_before,
                  todo=sum(s["todo"] for s in summaries), unit_repeats=sum(s["unit_repeats"] for s in summaries),
                  distinct=sum(s["distinct"] for s in summaries) + firsts_before,
                  done=sum(s["done"] for s in summaries) + firsts_before,
                  retried=sum(s["retried"] for s in summaries),
                  repeats=sum(s["repeats"] for s in summaries) + sum(r["repeats"] for r in done_before.values()),
                  input_parts=[[refs[1 + p] for refs in read_refs] for p in range(partitions)])
    index.examples = sorted(e for s in summaries for e in s["examples"])[:REPEAT_EXAMPLES]
    index.task_seconds = dict(read=sum(m["seconds"] for m in read_metas),
                              scan=sum(m["seconds"] for m in ray.get([refs[0] for refs in scan_refs])),
                              partition=sum(s["seconds"] for s in summaries))
    if index.todo.sum() and (index.done or index.repeats or limit_key != NO_KEY):
        index.skip = ray.put(Skip(unit_group, {g: [refs[1 + g] for refs in passes] for g in range(groups)},
                                  limit_key))
    # Units complete already (every row committed or a repeat): recorded once the report is made (record_units)
    if not retry_errors:
        index.complete = [i for i in range(len(units)) if index.recordable(i) and index.todo[i] == 0]
    return index


def record_units(index: Index, output: TaskOutput, units: list[int], report: dict) -> None:
    """Write the completion records of read units `units`, each with the report's examples that sit in it."""
    import ray

    if units:
        done = [(index.units[i], int(index.rows[i]), int(index.unit_repeats[i]), bool(index.dense[i]),
                 examples_in(report, i)) for i in units]
        ray.get(remote(write_unit_records).remote(output, done))


def examples_in(report: dict, unit: int) -> list[dict]:
    return [e for e in report["examples"] if key_unit(e["key"]) == unit]


def finished_index(units: list[dict], before: dict) -> Index:
    """The Index of a task whose every unit an earlier run recorded complete, from the records alone."""
    records = [before[i] for i in range(len(units))]
    firsts = sum(r["rows"] - r["repeats"] for r in records)
    return Index(units=units, unread=np.ones(len(units), bool), rows=np.array([r["rows"] for r in records], np.int64),
                 dense=np.array([r.get("dense", False) for r in records], bool), todo=np.zeros(len(units), np.int64),
                 unit_repeats=np.zeros(len(units), np.int64), distinct=firsts, done=firsts, retried=0,
                 repeats=sum(r["repeats"] for r in records), examples=[], limit_key=NO_KEY, before=before)


def cut_key(rows: np.ndarray, limit: int | None) -> int:
    """The read key of row `limit` in read order (`run --limit`: rows from it on are not input), or NO_KEY."""
    if limit is None or limit >= rows.sum():
        return NO_KEY
    starts = np.cumsum(rows) - rows
    unit = int(np.searchsorted(starts, limit, side="right")) - 1
    while unit > 0 and starts[unit] == limit and rows[unit - 1] == 0:
        unit -= 1  # empty units at the cut: the cut sits at the first of them
    return int(read_key(unit, limit - starts[unit]))


def final_pass(index: Index, output: TaskOutput, images_per_id: int,
               report: dict) -> tuple[list[dict], np.ndarray, int, dict]:
    """Finalize's distributed part and the exactly-once check, in one pass over every commit record: -> (the
    records that stand, the committed rows that lose their id's claim, how many records lost their file, the check:
    {"lacking": ids with no committed row, "examples": read keys of a few of them})."""
    import ray

    partitions = len(index.input_parts) or 1
    scan_refs, scanned = scan(output, images_per_id, partitions)
    metas = [m for found in ray.get([refs[1] for refs in scan_refs]) for m in found]
    records, missing = output.recover(metas)
    standing = np.zeros(scanned, bool)
    standing[[r["index"] for r in records]] = True
    rank = claim_ranks(records, scanned)
    passes = [remote(partition_pass).remote(
        len(index.input_parts[p]) if index.input_parts else 0, images_per_id, False, index.unread, index.limit_key,
        None, 0, rank, standing, *(index.input_parts[p] if index.input_parts else []),
        *[refs[2 + p] for refs in scan_refs]) for p in range(partitions)]
    summaries = [found[0] for found in ray.get(passes)]
    losers = np.concatenate([np.empty(0, COMMIT_ROW)] + [s["losers"] for s in summaries])
    lacking = sum(s["todo"] for s in summaries)
    record_units(index, output, [i for i in range(len(index.units)) if index.recordable(i) and lacking[i] == 0], report)
    check = dict(lacking=int(lacking.sum()), examples=sorted(k for s in summaries for k in s["todo_examples"])[:3],
                 task_seconds=dict(scan=sum(m["seconds"] for m in ray.get([refs[0] for refs in scan_refs])),
                                   partition=sum(s["seconds"] for s in summaries)))
    return records, losers, missing, check


def forget_units(output: TaskOutput) -> None:
    """Remove every completion record (a committed file went missing: its units must be read again)."""
    for f in output.storage.list(join(output.root, UNITS)):
        output.storage.delete(f["uri"])


class UnitTracker:
    """Per read unit, this run's committed rows as the write stage reports them; when a unit's count reaches what it
    had to do, a verify_unit task checks it and records it complete (so a resume after a crash skips it)."""

    def __init__(self, index: Index, output: TaskOutput, images_per_id: int, report: dict):
        self.index, self.output, self.per_id, self.report = index, output, images_per_id, report
        self.committed = np.zeros(len(index.units), np.int64)
        self.records: dict[int, list[str]] = {}  # unit -> record URIs holding its rows (units in flight only)
        self.pending = []
        self.skip = index.skip

    def add(self, units: list[int], counts: list[int], record: str | None) -> None:
        import ray

        if record is None:
            return
        for unit, count in zip(units, counts):
            self.committed[unit] += count
            self.records.setdefault(unit, []).append(self.output.record_uri(record))
            todo = self.index.todo[unit] * self.per_id
            if self.index.recordable(unit) and todo and self.committed[unit] >= todo:
                uris = self.records.pop(unit)
                self.pending.append(remote(verify_unit).remote(
                    unit, self.index.units[unit], int(self.index.rows[unit]), bool(self.index.dense[unit]),
                    self.skip_ref(), uris, self.output, self.per_id, examples_in(self.report, unit)))
        if self.pending:  # collect the checks that ended (their records are written by them)
            _, self.pending = ray.wait(self.pending, num_returns=len(self.pending), timeout=0)

    def skip_ref(self):
        import ray

        if self.skip is None:  # the read stage drops nothing: a Skip that says so
            self.skip = ray.put(Skip(np.zeros(0, np.int64), {}, self.index.limit_key))
        return self.skip
