"""Exact duplicates (same decoded pixels) and near-duplicates (perceptual hashes within
``prepare.near_duplicate_distance`` bits), grouped so that a group lands in one split."""

from collections import defaultdict

import numpy as np
from scipy.sparse import coo_array
from scipy.sparse.csgraph import connected_components

from pipeline.sources.layouts import Record

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
            conflicts += [(c.source, f"label conflict: the same image is in classes {', '.join(labels)}")
                          for c in copies]
            continue
        first: dict[str, Record] = {}  # by held-out split: copies in two given splits are both kept
        for copy in copies:
            original = first.setdefault(copy.held_out, copy)
            if original is copy:
                kept.append(copy)
            else:
                duplicates.append([copy.source, copy.label, "exact", original.source])
    return kept, conflicts, duplicates


def near_duplicate_groups(images: list[Record], distance: int) -> list[list[Record]]:
    """Groups of images linked by perceptual hashes at most ``distance`` bits apart (chains join).

    Every pair is compared with numpy on the 64-bit hashes, a block of rows at a time; the groups
    are the connected components of the resulting graph.
    """
    hashes = np.array([i.phash for i in images], dtype=np.uint64)
    block = max(1, 2**22 // max(1, len(hashes)))  # ~32 MB of XORed hashes per step
    rows, cols = [np.empty(0, dtype=np.intp)], [np.empty(0, dtype=np.intp)]
    for start in range(0, len(hashes), block):
        near = np.bitwise_count(hashes[start:start + block, None] ^ hashes[None, :]) <= distance
        r, c = np.nonzero(near)
        rows.append(r + start)
        cols.append(c)
    rows, cols = np.concatenate(rows), np.concatenate(cols)
    graph = coo_array((np.ones(len(rows), dtype=np.int8), (rows, cols)), shape=(len(images), len(images)))
    _, group_of = connected_components(graph, directed=False)
    groups: dict[int, list[Record]] = defaultdict(list)
    for image, group in zip(images, group_of):
        groups[group].append(image)
    return [sorted(members, key=lambda i: i.rank) for members in groups.values()]


def near_duplicate_rows(groups: list[list[Record]]) -> list[list]:
    return [[i.source, i.label, "near" if i.split == group[0].split else "cross_split", group[0].source]
            for group in groups for i in group[1:]]


def cross_split(groups: list[list[Record]]) -> dict[str, int]:
    """Leakage the source's own split brings: near-duplicate groups (exact copies included) spanning
    splits, their images, and pictures exactly alike in two splits. Drawn splits never do this."""
    spanning = [g for g in groups if len({i.split for i in g}) > 1]
    splits_of: dict[str, set[str]] = defaultdict(set)
    for image in (i for g in spanning for i in g):
        splits_of[image.sha256].add(image.split)
    return {"groups": len(spanning), "images": sum(len(g) for g in spanning),
            "exact": sum(len(splits) > 1 for splits in splits_of.values())}


