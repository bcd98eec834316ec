"""Row ids as fixed-size hashes, and the arithmetic of the id bookkeeping over them (run in Ray tasks, one per hash
partition: scheduler/bookkeeping.py).

A Python set or list of 10M id strings costs gigabytes; the same ids as 16-byte hashes in a numpy array cost
160 MB, and sorting / searchsorted stand in for the set operations. Why 128 bits: the chance that two of n distinct
ids share a hash is about n^2 / 2^129, below 1e-20 at n = 1e9 (64 bits would give ~3% there). A shared hash would
make two ids one (one of them skipped as a repeat or as committed), so it has to be that negligible.
"""

import hashlib

import numpy as np

HASH = np.dtype("S16")  # numpy compares fixed-size bytes by value (embedded zero bytes included), sorts bytewise
SLICE = 1 << 20  # elements per searchsorted call: bounds its int64 temporaries to 8 MB


def hash_ids(ids) -> np.ndarray:
    """[id strings] -> (n,) HASH, in order. surrogatepass: a JSON id may hold a lone surrogate (not UTF-8)."""
    digests = b"".join(hashlib.blake2b(i.encode("utf-8", "surrogatepass"), digest_size=16).digest() for i in ids)
    return np.frombuffer(digests, HASH) if digests else np.empty(0, HASH)


def find(sorted_values: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where each of `values` sits in `sorted_values` (sorted, unique; hashes or integers) -> (found (n,) bool,
    index (n,) int64, meaningful where found)."""
    found, index = np.zeros(len(values), bool), np.zeros(len(values), np.int64)
    if len(sorted_values):
        for a in range(0, len(values), SLICE):
            part = values[a:a + SLICE]
            at = np.minimum(np.searchsorted(sorted_values, part), len(sorted_values) - 1)
            found[a:a + SLICE], index[a:a + SLICE] = sorted_values[at] == part, at
    return found, index


def run_starts(sorted_values: np.ndarray) -> np.ndarray:
    """(n,) bool over sorted values: True at the first of each run of equal values."""
    first = np.ones(len(sorted_values), bool)
    first[1:] = sorted_values[1:] != sorted_values[:-1]
    return first


# ---- Hash partitions: the id bookkeeping of a task as work over slices of the id space ----------------------------
#
# The driver never holds ids. Read tasks turn each read unit's rows into INPUT_ROWs, scan tasks turn commit records
# into COMMIT_ROWs, both split by partition_of(hash); one task per partition then sees every row of its ids and
# answers with counts, a few examples and what the read stage must drop (scheduler/bookkeeping.py). The functions
# below are those tasks' arithmetic: plain numpy, the same whether they run in a Ray task or in this process.

UNIT_BITS = 40  # a read key is (read unit index << UNIT_BITS) | row ordinal in the unit: read order as one int64
INPUT_ROW = np.dtype([("hash", HASH), ("key", np.int64)])
# A committed output row: the hash of its input id (for num_images_per_prompt n > 1, of '<id>' in '<id>#<k>'), of
# its own id, its image index k (-1: not an id this n makes), where it sits (record, row), whether it is an error
# row, and the read key of the input row it came from (-1 when its record predates read keys)
COMMIT_ROW = np.dtype([("hash", HASH), ("out", HASH), ("image", np.int8), ("record", np.int32), ("row", np.int32),
                       ("failed", np.bool_), ("key", np.int64)])
NO_KEY = np.iinfo(np.int64).max


def read_key(unit: int, ordinal) -> np.ndarray:
    return (np.int64(unit) << UNIT_BITS) | np.asarray(ordinal, np.int64)


def key_unit(keys) -> np.ndarray:
    return np.asarray(keys, np.int64) >> UNIT_BITS


def key_ordinal(keys) -> np.ndarray:
    return np.asarray(keys, np.int64) & ((1 << UNIT_BITS) - 1)


def partition_of(hashes: np.ndarray, partitions: int) -> np.ndarray:
    """(n,) int64: the partition of each hash (its first 8 bytes modulo the partition count)."""
    if not len(hashes):
        return np.zeros(0, np.int64)
    return (np.frombuffer(hashes.tobytes(), ">u8")[::2] % np.uint64(partitions)).astype(np.int64)


def split_by_partition(rows: np.ndarray, partitions: int) -> list[np.ndarray]:
    """Structured rows (a "hash" field) -> one array per partition, each in the rows' order."""
    part = partition_of(rows["hash"], partitions)
    order = np.argsort(part, kind="stable")
    bounds = np.searchsorted(part[order], np.arange(partitions + 1))
    return [rows[order[a:b]] for a, b in zip(bounds[:-1], bounds[1:])]


def index_partition(rows: np.ndarray, commits: np.ndarray, images_per_id: int = 1, succeeded_only: bool = False,
                    unread_units: np.ndarray | None = None, examples: int = 5) -> dict:
    """One partition's input rows (INPUT_ROW, in read order) against its committed rows (COMMIT_ROW) -> what the
    driver and the read stage need to know of them:

    - each id's first row in read order is its row; later rows of the id are repeats ("repeat_keys", with the key
      of the id's first row in "repeat_of");
    - an id is done when each of its images_per_id output rows is committed (succeeded_only: committed as a row that
      succeeded; then "retried" counts the ids that were committed only as error rows);
    - an id whose committed row came from a unit that is not read this run (unread_units: (units,) bool; a unit
      found complete by an earlier run) at an earlier read position is a repeat of that row, not a first;
    - "todo_keys": the first rows still to run, sorted; "drop_keys" (sorted) with "drop_repeat": every other row.
    """
    rows = rows[np.argsort(rows["key"], kind="stable")]
    order = np.argsort(rows["hash"], kind="stable")  # equal hashes stay in read order
    hashes, keys = rows["hash"][order], rows["key"][order]
    first = run_starts(hashes)
    of_first = keys[first][np.cumsum(first) - 1]  # each row's id's first key
    repeat_keys, repeat_of = keys[~first], of_first[~first]
    hashes, keys = hashes[first], keys[first]

    committed, succeeded, earliest = commit_state(commits, hashes, images_per_id)
    done = succeeded if succeeded_only else committed
    elsewhere = np.zeros(len(keys), bool)
    if unread_units is not None and len(unread_units):
        known = np.flatnonzero((earliest < keys) & (key_unit(earliest) < len(unread_units)))
        elsewhere[known] = unread_units[key_unit(earliest[known])]
    repeat_keys = np.concatenate([repeat_keys, keys[elsewhere]])
    repeat_of = np.concatenate([repeat_of, earliest[elsewhere]])
    shown = np.argsort(repeat_keys, kind="stable")[:examples]
    drop = np.concatenate([repeat_keys, keys[done & ~elsewhere]])
    drop_order = np.argsort(drop, kind="stable")
    return dict(distinct=int((~elsewhere).sum()), done=int((done & ~elsewhere).sum()),
                retried=int((committed & ~succeeded & ~elsewhere).sum()) if succeeded_only else 0,
                repeats=len(repeat_keys), examples=[(int(repeat_keys[i]), int(repeat_of[i])) for i in shown],
                todo_keys=np.sort(keys[~done]), repeat_keys=np.sort(repeat_keys),
                drop_keys=drop[drop_order], drop_repeat=(drop_order < len(repeat_keys)))


def commit_state(commits: np.ndarray, hashes: np.ndarray, images_per_id: int = 1):
    """Over the ids `hashes` (sorted, distinct): (committed, succeeded) (n,) bool, each true when all images_per_id
    output rows of the id are committed (as rows that succeeded), and the earliest read key of a committed row of
    the id (n,) int64 (NO_KEY where none is known)."""
    n = len(hashes)
    commits = commits[commits["image"] >= 0]
    if not len(commits):
        return np.zeros(n, bool), np.zeros(n, bool), np.full(n, NO_KEY, np.int64)
    commits = commits[np.argsort(commits["hash"], kind="stable")]
    ids, start = np.unique(commits["hash"], return_index=True)
    bits = np.left_shift(np.uint64(1), commits["image"].astype(np.uint64))
    ok = np.where(commits["failed"], np.uint64(0), bits)
    full = np.uint64((1 << images_per_id) - 1)
    keys = np.where(commits["key"] >= 0, commits["key"], NO_KEY)
    found, index = find(ids, hashes)
    committed = found & (np.bitwise_or.reduceat(bits, start)[index] == full)
    succeeded = found & (np.bitwise_or.reduceat(ok, start)[index] == full)
    earliest = np.where(found, np.minimum.reduceat(keys, start)[index], NO_KEY)
    return committed, succeeded, earliest


def claim_losers(commits: np.ndarray, rank: np.ndarray) -> np.ndarray:
    """Each output id once (finalize): among the committed rows of an id, a row that succeeded wins over an error
    row, then the row of the record ranked first (rank: (records,) int), then the earlier row in it. -> the other
    rows, as COMMIT_ROWs."""
    if not len(commits):
        return commits
    table = np.empty(len(commits), [("out", HASH), ("failed", np.bool_), ("rank", np.int64), ("row", np.int32)])
    table["out"], table["failed"], table["rank"], table["row"] = (commits["out"], commits["failed"],
                                                                    rank[commits["record"]], commits["row"])
    order = np.argsort(table, order=["out", "failed", "rank", "row"])
    out = table["out"][order]
    first = run_starts(out)
    return commits[order[~first]]
