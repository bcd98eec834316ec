"""Row ids as fixed-size hashes: the driver's bookkeeping of millions of ids in a few numpy arrays.

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


def first_occurrences(hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort `hashes` IN PLACE (no second copy of them at any time) and mark each value's first occurrence.

    Returns (order (n,) int64: the sorted hashes' original positions, first (n,) bool: True at the first of each run
    of equal hashes, which is the one with the earliest original position because the argsort is stable)."""
    order = np.argsort(hashes, kind="stable")
    hashes.sort()  # equal hashes are equal bytes: any sort gives hashes[order]
    first = np.ones(len(hashes), bool)
    first[1:] = hashes[1:] != hashes[:-1]
    return order, first
