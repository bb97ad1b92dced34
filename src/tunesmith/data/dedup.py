"""Exact and near-duplicate detection for the data doctor.

Near duplicates: each text becomes a set of word 3-gram shingles; MinHash signatures (multiply-shift hashing
in numpy) are bucketed with LSH banding, and every candidate pair is confirmed with the exact Jaccard
similarity of the shingle sets, so a reported pair is never a hashing artefact. With 20 bands of 6 rows a pair
at Jaccard 0.8 becomes a candidate with probability 1 - (1 - 0.8**6)**20 ≈ 0.998.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable, Sequence

import numpy as np

NUM_PERM = 120
BANDS = 20
SHINGLE = 3
THRESHOLD = 0.8
_SMALL_BUCKET = 40  # larger LSH buckets compare each member with their first members only
_WORD = re.compile(r"\w+")
_MASK32 = np.uint64(0xFFFFFFFF)


def normalise_text(text: str) -> str:
    """Case-folded with whitespace collapsed: the key for exact duplicates."""
    return " ".join(text.casefold().split())


def shingles(text: str, size: int = SHINGLE) -> frozenset[int]:
    """Hashed word `size`-grams of `text` (a text shorter than `size` words is one shingle)."""
    words = _WORD.findall(text.casefold())
    if not words:
        return frozenset()
    grams = [" ".join(words[i:i + size]) for i in range(max(1, len(words) - size + 1))]
    return frozenset(zlib.crc32(g.encode("utf-8")) for g in grams)


def jaccard(a: frozenset[int], b: frozenset[int]) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def minhash_signatures(sets: Sequence[frozenset[int]], num_perm: int = NUM_PERM, seed: int = 0) -> np.ndarray:
    """[len(sets), num_perm] uint32 MinHash signatures; rows of empty sets are all 0xFFFFFFFF."""
    rng = np.random.default_rng(seed)
    a = rng.integers(1, 2**63, size=num_perm, dtype=np.uint64) | np.uint64(1)  # odd multipliers
    b = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64)
    out = np.full((len(sets), num_perm), 0xFFFFFFFF, dtype=np.uint32)
    filled = [i for i, s in enumerate(sets) if s]
    if not filled:
        return out
    values = np.fromiter((v for i in filled for v in sets[i]), dtype=np.uint64)
    starts = np.cumsum([0] + [len(sets[i]) for i in filled[:-1]])
    step = max(1, min(num_perm, 4_000_000 // max(1, len(values))))
    for lo in range(0, num_perm, step):
        hi = min(num_perm, lo + step)
        # (a*x + b) mod 2**64, top 32 bits: a universal multiply-shift hash; uint64 overflow is the modulus.
        hashed = ((a[lo:hi, None] * values[None, :] + b[lo:hi, None]) >> np.uint64(32)) & _MASK32
        out[filled, lo:hi] = np.minimum.reduceat(hashed, starts, axis=1).T.astype(np.uint32)
    return out


def candidate_pairs(signatures: np.ndarray, bands: int = BANDS) -> set[tuple[int, int]]:
    """Index pairs that share at least one LSH band."""
    n, num_perm = signatures.shape
    rows = num_perm // bands
    pairs: set[tuple[int, int]] = set()
    empty = np.all(signatures == 0xFFFFFFFF, axis=1)
    for band in range(bands):
        buckets: dict[bytes, list[int]] = {}
        block = np.ascontiguousarray(signatures[:, band * rows:(band + 1) * rows])
        for i in range(n):
            if not empty[i]:
                buckets.setdefault(block[i].tobytes(), []).append(i)
        for members in buckets.values():
            if len(members) > 1:
                pairs.update(_bucket_pairs(members))
    return pairs


def _bucket_pairs(members: list[int]):
    heads = members if len(members) <= _SMALL_BUCKET else members[:_SMALL_BUCKET]
    for x, i in enumerate(heads):
        for j in members[x + 1:]:
            yield (i, j)


def near_duplicate_pairs(texts: Sequence[str], threshold: float = THRESHOLD,
                         keep: Callable[[int, int], bool] | None = None) -> list[tuple[int, int, float]]:
    """(i, j, jaccard) for text pairs whose shingle-set Jaccard similarity is at least `threshold`,
    optionally restricted to pairs `keep(i, j)` accepts. Sorted by (i, j)."""
    return similar_pairs([shingles(t) for t in texts], threshold, keep)


COMMON_FRACTION = 0.9
COMMON_MIN_ROWS = 20


def drop_common(sets: Sequence[frozenset[int]], fraction: float = COMMON_FRACTION,
                min_rows: int = COMMON_MIN_ROWS) -> list[frozenset[int]]:
    """The shingle sets without the shingles that more than `fraction` of them contain: a template (a fixed
    instruction, a licence header) that (almost) every row repeats says nothing about whether two rows are
    near copies of each other, and a long one would make every row look like every other. The fraction is high
    so that a real majority of near copies is still found. Fewer than `min_rows` sets are returned as they are
    (too few to tell what is shared)."""
    if len(sets) < min_rows:
        return list(sets)
    counts: dict[int, int] = {}
    for s in sets:
        for g in s:
            counts[g] = counts.get(g, 0) + 1
    common = frozenset(g for g, c in counts.items() if c > fraction * len(sets))
    return [s - common for s in sets] if common else list(sets)


def similar_pairs(sets: Sequence[frozenset[int]], threshold: float = THRESHOLD,
                  keep: Callable[[int, int], bool] | None = None) -> list[tuple[int, int, float]]:
    """(i, j, jaccard) for shingle-set pairs with Jaccard similarity at least `threshold` (MinHash LSH
    candidates, each confirmed exactly), optionally restricted to pairs `keep(i, j)` accepts."""
    found = []
    for i, j in candidate_pairs(minhash_signatures(sets)):
        if keep is not None and not keep(i, j):
            continue
        similarity = jaccard(sets[i], sets[j])
        if similarity >= threshold:
            found.append((i, j, similarity))
    return sorted(found)


def clusters(pairs: Sequence[tuple[int, int, float]]) -> list[list[int]]:
    """Connected groups of indices linked by `pairs`, each sorted, ordered by first member."""
    parent: dict[int, int] = {}

    def root(x: int) -> int:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for i, j, _ in pairs:
        parent[root(i)] = root(j)
    groups: dict[int, list[int]] = {}
    for x in sorted(parent):
        groups.setdefault(root(x), []).append(x)
    return sorted(groups.values())
