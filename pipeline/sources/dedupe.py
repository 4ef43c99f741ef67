"""Exact duplicates (same decoded pixels) and near-duplicates, grouped so that a group lands in one split.

Two images are near-duplicates when their perceptual hashes (64-bit pHash) differ in at most
``prepare.near_duplicate_distance`` bits and their 32x32 grey thumbnails correlate at least
NEAR_CORRELATION. The hashes find candidates; the thumbnails verify each pair: hashes of low-detail
images (digits, documents, products on white, X-rays) agree for thousands of pictures that are not
copies of one another, and linking those chained 1,552 of 2,000 digit images into one group. Images
without detail (a flat thumbnail: the hash is noise) or whose hash is crowded (it matches far more
hashes than a spread-out one would: it tells too little about the picture) are not searched. The
groups are the connected components of the verified pairs; one larger than MAX_CHAIN is a chain of
look-alikes, split into stars around its first images (split_chains).

Candidates come from multi-index hashing (Norouzi, Punjani and Fleet, "Fast search in Hamming space
with multi-index hashing", CVPR 2012), not from every pair: the 64 bits are cut into ``m`` chunks;
two hashes at most ``d`` bits apart differ in at most ``d // m`` bits on one chunk at least (the
pigeonhole principle), so each chunk's sorted values are searched for the values within that many
bits of each hash's, and only those pairs are compared.
"""

import math
from collections import defaultdict
from collections.abc import Iterator
from itertools import combinations

import imagehash
import numpy as np
from PIL import Image
from scipy.sparse import coo_array, csr_array
from scipy.sparse.csgraph import connected_components

from pipeline.sources.layouts import Record

HASH_BITS = 64
THUMBNAIL_SIDE = 32  # the verifying thumbnail: 32x32 grey levels, 1 KiB per image
# Re-encoded (JPEG quality 30), resized (1/4), brightened (x1.3), recoloured and blurred copies of the
# flowers correlate 0.94 or more with their originals, 95 % of them 0.98 (a copy cropped by 5 % may
# not); of 2,000 generated digits (tests/conftest.py make_digits), 1 pair in 70 of those whose hashes
# are within 6 bits does (at 16x16, 1 in 23: groups of 14, a 6 among 0s).
NEAR_CORRELATION = 0.95
FLAT = 2.0  # grey levels: a thumbnail whose standard deviation is below this has no detail to compare
# A hash matching more than CROWDED times the hashes that spread-out ones would, plus CROWD (copies of
# one picture: up to ~250 of them match each other's chunks), is left out of the search: 53,170 of
# 70,000 generated digits (73 times on average), 6 of 10,000; none of the 3,670 flowers nor of 1,000,000
# random hashes (at most 1.6 times). Each searched hash then finds a bounded number of candidates.
CROWDED, CROWD = 20, 1000
TABLE_BITS = 24  # chunks this narrow are looked up in a table of 2**bits run starts (128 MiB at most)
# A group of more alike images than this is taken for a chain of look-alikes (each alike to the next,
# not to one picture) and split into stars (split_chains): at 32x32, generated digits chain by the
# thousand (3,130 of 16,830 searched), as a whole class of them has look-alikes of look-alikes.
MAX_CHAIN = 32
PAIRS_PER_STEP = 4_000_000  # candidate pairs held at once (index arrays of ~100 MB)
THUMBNAIL_PAIRS_PER_STEP = 16_384  # thumbnail pairs compared at once (2 x 64 MiB of float32)

# --- Duplicates -------------------------------------------------------------------------------


def drop_exact_duplicates(images: list[Record]) -> tuple[list[Record], list[tuple], list[list]]:
    """One copy of identical images per given split; images found under two classes are label
    conflicts, all excluded."""
    by_hash: dict[str, list[Record]] = defaultdict(list)
    for image in images:
        by_hash[image.sha256].append(image)
    kept, conflicts, duplicates = [], [], []
    for copies in by_hash.values():
        copies.sort(key=lambda c: c.source)
        labels = sorted({c.label for c in copies})
        if len(labels) > 1:
            conflicts += [
                (c.source, f"label conflict: the same image is in classes {', '.join(labels)}") for c in copies
            ]
            continue
        first: dict[str, Record] = {}  # by held-out split: copies in two given splits are both kept
        for copy in copies:
            original = first.setdefault(copy.held_out, copy)
            if original is copy:
                kept.append(copy)
            else:
                duplicates.append([copy.source, copy.label, "exact", original.source])
    return kept, conflicts, duplicates


def fingerprints(image: Image.Image) -> dict:
    """What near-duplicate search needs of an image (a Record's ``phash`` and ``thumbnail``)."""
    thumbnail = image.convert("L").resize((THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.Resampling.BOX)
    return {"phash": int(str(imagehash.phash(image)), 16), "thumbnail": thumbnail.tobytes()}


def near_duplicate_groups(images: list[Record], distance: int | None) -> tuple[list[list[Record]], int]:
    """Every image in one group, each group sorted by rank: near-duplicates (see the module docstring)
    together, every other image alone (all of them with ``distance`` None); and how many images were
    left out of the search (no detail, or a crowded hash)."""
    if distance is None:
        return [[image] for image in images], 0
    thumbnails = np.frombuffer(b"".join(i.thumbnail for i in images), dtype=np.uint8).reshape(len(images), -1)
    means, norms = centred_norms(thumbnails)
    detailed = np.flatnonzero(norms >= FLAT * np.sqrt(thumbnails.shape[1]))  # standard deviation >= FLAT
    hashes = np.array([images[i].phash for i in detailed], dtype=np.uint64)
    first, second, searched = near_pairs(hashes, distance)
    first, second = detailed[first], detailed[second]
    alike = correlations(thumbnails, means, norms, first, second) >= NEAR_CORRELATION
    graph = coo_array(
        (
            np.ones(2 * alike.sum(), dtype=np.int8),
            (np.concatenate([first[alike], second[alike]]), np.concatenate([second[alike], first[alike]])),
        ),
        shape=(len(images), len(images)),
    ).tocsr()
    _, group_of = connected_components(graph, directed=False)
    order = sorted(range(len(images)), key=lambda i: images[i].rank)
    group_of = split_chains(graph, group_of, order)
    groups: dict[int, list[Record]] = defaultdict(list)
    for index in order:
        groups[group_of[index]].append(images[index])
    return list(groups.values()), len(images) - searched


def split_chains(alike: csr_array, group_of: np.ndarray, order: list[int]) -> np.ndarray:
    """``group_of`` with each group of more than MAX_CHAIN images split into stars: in ``order``, an
    image joins the first image of a star it is alike to, or starts one. Copies of one picture are
    all alike to its first, so they stay one star; look-alikes linked one to the next do not."""
    sizes, position = np.bincount(group_of), np.empty(len(order), dtype=np.intp)
    position[order] = np.arange(len(order))
    split = group_of.copy()  # a star's id: -1 - its first image's index, apart from the groups' ids
    for index in (i for i in order if sizes[group_of[i]] > MAX_CHAIN):
        leaders = [j for j in alike.indices[alike.indptr[index] : alike.indptr[index + 1]] if split[j] == -1 - j]
        split[index] = split[min(leaders, key=position.__getitem__)] if leaders else -1 - index
    return split


def near_pairs(hashes: np.ndarray, distance: int) -> tuple[np.ndarray, np.ndarray, int]:
    """The index pairs (i < j) of the 64-bit ``hashes`` at most ``distance`` bits apart, by
    multi-index hashing (module docstring), and how many hashes were searched: a hash whose chunks
    match CROWDED times more hashes than spread-out ones would (digits: 73 times, nearly all of them)
    tells too little about its picture, and would make the search quadratic; it is left out."""
    chunks = chunking(distance, len(hashes))
    matches = sum((count for _, count, _ in probes(hashes, chunks)), np.zeros(len(hashes), dtype=np.int64))
    spread = max(len(hashes) - 1, 0) * sum(probe_count(bits, radius) / 2**bits for _, bits, radius in chunks)
    searched = np.flatnonzero(matches <= CROWDED * spread + CROWD)
    kept = hashes[searched]
    found = [np.empty(0, dtype=np.int64)]
    n = len(searched)
    for start, count, order in probes(kept, chunks):
        for queries in in_steps(count):
            i, j = expanded(queries, start[queries], count[queries], order)
            near = (i < j) & (np.bitwise_count(kept[i] ^ kept[j]) <= distance)
            found.append(i[near] * n + j[near])
    pairs = np.unique(np.concatenate(found))
    return searched[pairs // max(n, 1)], searched[pairs % max(n, 1)], n


def probes(hashes: np.ndarray, chunks: list[tuple[int, int, int]]) -> Iterator[tuple]:
    """For each chunk and flip mask, where the hashes whose chunk equals each hash's own with those
    bits flipped sit in ``order``: from ``start``, ``count`` of them."""
    for shift, bits, radius in chunks:
        values = (hashes >> np.uint64(shift)) & np.uint64(2**bits - 1)
        order = np.argsort(values, kind="stable")
        if bits <= TABLE_BITS:  # a table of where each value's run starts: a lookup, no binary search
            sizes = np.bincount(values.astype(np.intp), minlength=2**bits)
            starts = np.cumsum(sizes) - sizes
        else:
            ordered = values[order]
        for flips in flip_masks(bits, radius):
            wanted = values ^ np.uint64(flips)
            if bits <= TABLE_BITS:
                indices = wanted.astype(np.intp)
                yield starts[indices], sizes[indices], order
            else:
                start = np.searchsorted(ordered, wanted, side="left")
                yield start, np.searchsorted(ordered, wanted, side="right") - start, order


def chunking(distance: int, n: int) -> list[tuple[int, int, int]]:
    """(shift, bits, search radius) of each chunk, for the number of chunks that costs least: for
    ``n`` spread-out hashes, the searches (one per hash and flip mask) plus the pairs they find."""

    def chunks(m: int) -> list[tuple[int, int, int]]:
        widths = [HASH_BITS // m + (k < HASH_BITS % m) for k in range(m)]
        return [(sum(widths[:k]), width, distance // m) for k, width in enumerate(widths)]

    def cost(m: int) -> float:
        return sum(probe_count(bits, radius) * (1 + n / 2**bits) for _, bits, radius in chunks(m))

    return chunks(min(range(1, min(distance, HASH_BITS - 1) + 2), key=cost))


def probe_count(bits: int, radius: int) -> int:
    """How many values lie within ``radius`` bits of a ``bits``-bit value (flip_masks)."""
    return sum(math.comb(bits, r) for r in range(radius + 1))


def flip_masks(bits: int, radius: int) -> Iterator[int]:
    """Every ``bits``-bit mask with at most ``radius`` bits set."""
    for flipped in range(radius + 1):
        for positions in combinations(range(bits), flipped):
            yield sum(1 << p for p in positions)


def in_steps(count: np.ndarray) -> Iterator[np.ndarray]:
    """The query indices in consecutive runs finding at most PAIRS_PER_STEP candidates each (or one
    query alone, whatever it finds)."""
    ends = np.cumsum(count)
    begin = 0
    while begin < len(count):
        before = ends[begin - 1] if begin else 0
        end = max(int(np.searchsorted(ends, before + PAIRS_PER_STEP, side="right")), begin + 1)
        yield np.arange(begin, end)
        begin = end


def expanded(
    queries: np.ndarray, start: np.ndarray, count: np.ndarray, order: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Each query against each of its ``count`` matches, which sit at ``order[start:start + count]``."""
    total = int(count.sum())
    offsets = np.arange(total) - np.repeat(np.cumsum(count) - count, count)
    return np.repeat(queries, count), order[np.repeat(start, count) + offsets]


def centred_norms(thumbnails: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each thumbnail's mean and the norm of its pixels less that mean (a few thousand rows at a time)."""
    means, norms = np.empty(len(thumbnails), dtype=np.float32), np.empty(len(thumbnails), dtype=np.float32)
    for k in range(0, len(thumbnails), THUMBNAIL_PAIRS_PER_STEP):
        rows = thumbnails[k : k + THUMBNAIL_PAIRS_PER_STEP].astype(np.float32)
        means[k : k + len(rows)] = rows.mean(axis=1)
        norms[k : k + len(rows)] = np.linalg.norm(rows - means[k : k + len(rows), None], axis=1)
    return means, norms


def correlations(
    thumbnails: np.ndarray, means: np.ndarray, norms: np.ndarray, first: np.ndarray, second: np.ndarray
) -> np.ndarray:
    """The Pearson correlation of the thumbnails of each pair (first[k], second[k]), given their
    centred_norms."""
    steps = [np.empty(0, dtype=np.float32)]
    for k in range(0, len(first), THUMBNAIL_PAIRS_PER_STEP):
        a, b = first[k : k + THUMBNAIL_PAIRS_PER_STEP], second[k : k + THUMBNAIL_PAIRS_PER_STEP]
        centred_a = thumbnails[a].astype(np.float32) - means[a, None]
        centred_b = thumbnails[b].astype(np.float32) - means[b, None]
        steps.append(np.einsum("ij,ij->i", centred_a, centred_b) / np.maximum(norms[a] * norms[b], 1e-6))
    return np.concatenate(steps)


def near_duplicate_rows(groups: list[list[Record]]) -> list[list]:
    return [
        [i.source, i.label, "near" if i.split == group[0].split else "cross_split", group[0].source]
        for group in groups
        for i in group[1:]
    ]


def cross_split(groups: list[list[Record]]) -> dict[str, int]:
    """Leakage the source's own split brings: near-duplicate groups (exact copies included) spanning
    splits, their images, and pictures exactly alike in two splits. Drawn splits never do this."""
    spanning = [g for g in groups if len({i.split for i in g}) > 1]
    splits_of: dict[str, set[str]] = defaultdict(set)
    for image in (i for g in spanning for i in g):
        splits_of[image.sha256].add(image.split)
    return {
        "groups": len(spanning),
        "images": sum(len(g) for g in spanning),
        "exact": sum(len(splits) > 1 for splits in splits_of.values()),
    }
