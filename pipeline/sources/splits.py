"""Drawing train/val/test splits, stratified per class and stable under added images, and checking
that every class has enough images in each split."""

import sys
from collections import Counter, defaultdict
from itertools import count

from pipeline.cli import UserError
from pipeline.config import PrepareParams, SplitParams
from pipeline.paths import RAW_DIR, SPLITS
from pipeline.sources.layouts import Found, Record, named, source_of

IMBALANCE_WARNING = 10  # warn when the largest class has more than this many times the smallest's images
HELD_OUT = ("val", "test")  # the splits drawn from train when the source does not give them
# How far a class's drawn split may be from the share prepare.split asks: a fraction of the class's
# images (at least one image), lost to near-duplicate groups that must stay whole.
SPLIT_TOLERANCE = 0.01


# --- Splitting --------------------------------------------------------------------------------


def assign_splits(groups: list[list[Record]], given: tuple[str, ...], split: SplitParams) -> None:
    """Given val and test are kept; the held-out splits not given are drawn from the other images,
    stratified by class, one split per near-duplicate group: in the order of the groups' rank keys,
    each group goes to the first drawn split with room left for all of its images (val holds
    ``round(n * prepare.split.val)`` of a class's n images, test likewise), else to train. Single
    images fill what larger groups leave, so every class gets the split sizes asked unless some
    groups are too large (check_fractions). A group of near-duplicates in two classes needs room in both.
    """
    drawn = {name: getattr(split, name) for name in HELD_OUT if name not in given}
    pools = [[image for image in group if not image.held_out] for group in groups]
    for image in (image for group in groups for image in group):
        image.split = image.held_out
    sizes = Counter(image.label for pool in pools for image in pool)
    room = {(label, name): round(n * fraction) for label, n in sizes.items() for name, fraction in drawn.items()}
    for pool in sorted(filter(None, pools), key=lambda pool: pool[0].rank):
        need = Counter(image.label for image in pool)
        chosen = next((name for name in drawn if all(n <= room[label, name] for label, n in need.items())), "train")
        for image in pool:
            image.split = chosen
        if chosen in drawn:
            room.update({(label, chosen): room[label, chosen] - n for label, n in need.items()})


def check_fractions(
    per_class: dict[str, dict[str, int]], groups: list[list[Record]], given: tuple[str, ...], params: PrepareParams
) -> None:
    """Each class's drawn splits (and train) hold the share of its images that prepare.split asks,
    within SPLIT_TOLERANCE; else stop, naming the classes and their largest near-duplicate group."""
    split = params.split
    drawn = {name: getattr(split, name) for name in HELD_OUT if name not in given}
    if not drawn:
        return
    off = {}
    for label, counts in per_class.items():
        pool = sum(counts[name] for name in ("train", *drawn))
        asked = {name: round(pool * fraction) for name, fraction in drawn.items()}
        asked["train"] = pool - sum(asked.values())
        if any(abs(counts[name] - wanted) > max(1.0, SPLIT_TOLERANCE * pool) for name, wanted in asked.items()):
            off[label] = (pool, {name: (counts[name], wanted) for name, wanted in asked.items()})
    if not off:
        return
    largest = {label: max((g for g in groups if g[0].label == label), key=len, default=[]) for label in off}

    def shown(label: str) -> str:
        pool, counts = off[label]
        got = ", ".join(f"{name} {n} of the {wanted} asked" for name, (n, wanted) in counts.items())
        group = largest[label]
        example = f", the first {group[0].source}" if group else ""
        return f"'{label}' ({got}; its largest group holds {len(group)} of its {pool} images{example})"

    raise UserError(
        f"prepare.split (val {split.val}, test {split.test}) cannot be met within {SPLIT_TOLERANCE:.0%} in {len(off)} "
        f"of {len(per_class)} classes, as each near-duplicate group (prepare.near_duplicate_distance="
        f"{params.near_duplicate_distance}) stays in one split: {named([shown(label) for label in off])}; remove "
        "the copies, or lower prepare.near_duplicate_distance (0: identical hashes only; null: no grouping, "
        "near-copies may then be in train and test)"
    )


def check_enough_classes(found: Found) -> None:
    if len(found.classes) >= 2:
        return
    if found.layout != "labels_csv":
        raise UserError(
            f"{RAW_DIR} has {len(found.classes)} class folder(s) {found.classes}; need at least 2 "
            "(one sub-folder of images per class)"
        )
    first_bad = f"; {len(found.bad_rows)} bad rows, the first: {found.bad_rows[0][1]}" if found.bad_rows else ""
    raise UserError(
        f"data.labels names {len(found.classes)} class(es) {found.classes} on usable rows; need at least 2{first_bad}"
    )


def count_per_class(classes: list[str], images: list[Record]) -> dict[str, dict[str, int]]:
    counts = Counter((i.label, i.split) for i in images)
    return {label: {split: counts[label, split] for split in SPLITS} for label in classes}


def unused_files(found: Found, quarantine: list[tuple[str, str]]) -> dict[str, list[tuple[str, str]]]:
    """The files ignored or quarantined in each class folder (or on each label's table rows):
    label -> [(source, why)], sorted."""
    label_at = {source_of(path): label for label, path, _ in found.candidates}
    unused = defaultdict(list)
    for source, why, label in found.ignored:
        unused[label].append((source, why))
    for source, why in quarantine:
        unused[label_at.get(source, "")].append((source, why))
    return {label: sorted(files) for label, files in unused.items()}


def check_classes(
    per_class: dict[str, dict[str, int]],
    given: tuple[str, ...],
    split: SplitParams,
    unused: dict[str, list[tuple[str, str]]],
) -> None:
    """Every split needs an image of every class; the refusal says for each class too small what
    was left out of it (nothing is written then, so ignored.csv and quarantine.csv cannot)."""
    small = [label for label, counts in per_class.items() if min(counts.values()) == 0]
    if small:
        fractions = [getattr(split, name) for name in HELD_OUT if name not in given]
        pool = " in train" if given else ""
        need = f"; each class needs at least {smallest_class(fractions)}{pool}" if fractions else ""

        def left_out(label: str) -> str:
            files = unused.get(label, [])
            return f"; {len(files)} files not used, the first: {files[0][0]}: {files[0][1]}" if files else ""

        shown = named(
            [
                f"'{label}' ({', '.join(f'{s} {n}' for s, n in per_class[label].items())}{left_out(label)})"
                for label in small
            ]
        )
        raise UserError(
            f"too few usable images to put one in each of train, val and test in {len(small)} of {len(per_class)} "
            f"classes (prepare.split val {split.val}, test {split.test}; near-duplicates count as one{need}): "
            f"{shown}: add images or remove those classes"
        )
    sizes = {label: sum(counts.values()) for label, counts in per_class.items()}
    largest, smallest = max(sizes, key=sizes.__getitem__), min(sizes, key=sizes.__getitem__)
    if sizes[largest] > IMBALANCE_WARNING * sizes[smallest]:
        print(
            f"warning: classes are heavily imbalanced: '{largest}' has {sizes[largest]} images, "
            f"'{smallest}' only {sizes[smallest]}",
            file=sys.stderr,
        )


def smallest_class(fractions: list[float]) -> int:
    """The fewest images from which each drawn split gets one and train keeps at least one."""
    return next(
        n for n in count(1) if all(round(n * f) >= 1 for f in fractions) and n > sum(round(n * f) for f in fractions)
    )


def cap_per_class(images: list[Record], cap: int | None) -> list[Record]:
    """At most ``cap`` images per class and given split (``data.max_per_class``), the first by rank."""
    if cap is None:
        return images
    by_class: dict[tuple[str, str], list[Record]] = defaultdict(list)
    for image in sorted(images, key=lambda i: i.rank):
        by_class[image.label, image.held_out].append(image)
    return [image for members in by_class.values() for image in members[:cap]]
