"""The augmentation policy, offline (albumentations, the augment stage) and online (Keras layers).

Policy tests measure generated images whose content encodes what a transform did: a coordinate
gradient (crop size, flips), flat colours (brightness, contrast, saturation, hue, PCA lighting).
Stage tests run `python -m pipeline.stages.augment` for real and compare every output file with the same
image rendered here, in this one process: equal bytes mean the stage is deterministic, independent
of its worker processes, and that nothing stale came from its render cache.
"""

import colorsys
import csv
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import yaml
from PIL import Image

from conftest import REPO, make_images, new_project, project_env, project_through, run, set_params, stages_run
from pipeline.cli import UserError
from pipeline.config import Config, load_config
from pipeline.data.augmentation import (
    IMAGENET_EIGVAL,
    IMAGENET_EIGVEC,
    label_mixing,
    offline_policy,
    offline_variant,
    online_augmentation,
    online_variants,
)
from pipeline.data.images import model_input
from pipeline.paths import HISTORY
from pipeline.stages.augment import decode, encode_jpeg, gallery_variants, original, variant

SIZE = 128
N = 300  # samples per statistical check: standard errors of a few percent
OFF = {
    "crop_scale": (1.0, 1.0),
    "crop_ratio": (1.0, 1.0),
    "hflip": 0.0,
    "vflip": 0.0,
    "brightness": 0.0,
    "contrast": 0.0,
    "saturation": 0.0,
    "hue": 0.0,
    "pca_std": 0.0,
}
ALL_ON = {
    "crop_scale": (0.3, 1.0),
    "crop_ratio": (0.75, 4 / 3),
    "hflip": 0.5,
    "vflip": 0.5,
    "brightness": 0.4,
    "contrast": 0.4,
    "saturation": 0.4,
    "hue": 0.1,
    "pca_std": 0.3,
}


def config(**policy) -> Config:
    """The repo's params with every augmentation off except ``policy``, at SIZE px."""
    cfg = load_config(REPO / "params.yaml")
    return cfg.model_copy(
        update={
            "augment": cfg.augment.model_copy(update={**OFF, **policy}),
            "model": cfg.model.model_copy(update={"image_size": SIZE}),
        }
    )


def augmented(path: str, image: np.ndarray, n: int = N, **policy) -> np.ndarray:
    """``n`` augmented versions of ``image`` (SIZE x SIZE uint8) by one path, as float (n, SIZE, SIZE, 3)."""
    cfg = config(**policy)
    if path == "offline":
        transform = offline_policy(SIZE, cfg.augment)
        return np.stack([offline_variant(transform, image, seed) for seed in range(n)]).astype("float32")
    batch = np.repeat(image[None].astype("float32"), n, axis=0)
    return np.asarray(online_augmentation(cfg)(batch, training=True))


def gradient() -> np.ndarray:
    """Red = 2 * column, green = 2 * row: an output pixel tells where in the input it came from."""
    x = np.arange(SIZE) * 2
    return np.stack(
        [np.tile(x, (SIZE, 1)), np.tile(x[:, None], (1, SIZE)), np.full((SIZE, SIZE), 128)], axis=-1
    ).astype("uint8")


def flat(rgb) -> np.ndarray:
    return np.tile(np.array(rgb, dtype="uint8"), (SIZE, SIZE, 1))


def crop_sides(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Width and height of each crop as fractions of the input, read off the gradient."""
    span = SIZE / (SIZE - 1) / (2 * SIZE)  # output end-to-end span -> fraction of the input
    width = (images[:, :, -1, 0] - images[:, :, 0, 0]).mean(axis=1) * span
    height = (images[:, -1, :, 1] - images[:, 0, :, 1]).mean(axis=1) * span
    return np.abs(width), np.abs(height)


def pca_alpha(images: np.ndarray) -> np.ndarray:
    """The weight of ImageNet's first RGB principal component in each image's shift from grey 128."""
    shift = images.mean(axis=(1, 2)) - 128
    return shift @ IMAGENET_EIGVEC[:, 0] / (255 * IMAGENET_EIGVAL[0])


PATHS = ["offline", "online"]


@pytest.mark.parametrize("path", PATHS)
def test_outputs_have_the_input_size_and_pixel_range(path):
    images = augmented(path, gradient(), n=8, **ALL_ON)
    assert images.shape == (8, SIZE, SIZE, 3)
    assert images.min() >= 0 and images.max() <= 255 + 1e-3
    assert len({im.tobytes() for im in images}) == 8  # every sample differs


@pytest.mark.parametrize("path", PATHS)
def test_flips_actually_flip(path):
    image = gradient()
    assert np.allclose(augmented(path, image, n=2, hflip=1.0), image[:, ::-1], atol=1e-3)
    assert np.allclose(augmented(path, image, n=2, vflip=1.0), image[::-1], atol=1e-3)
    assert np.allclose(augmented(path, image, n=2, hflip=0.0, vflip=0.0), image, atol=1e-3)


@pytest.mark.parametrize("path", PATHS)
def test_crops_stay_within_the_area_and_ratio_bounds(path):
    width, height = crop_sides(augmented(path, gradient(), crop_scale=(0.3, 0.6), crop_ratio=(0.75, 4 / 3)))
    area = width * height
    assert area.min() >= 0.3 - 0.02 and area.max() <= 0.6 + 0.02
    assert area.max() - area.min() > 0.2  # the range is used, not a fixed crop
    assert (width / height).min() >= 0.75 - 0.03 and (width / height).max() <= 4 / 3 + 0.03


@pytest.mark.parametrize("path", PATHS)
def test_lighting_stays_within_bounds(path):
    shift = augmented(path, flat([128] * 3), brightness=0.2).mean(axis=(1, 2, 3)) - 128
    assert np.abs(shift).max() <= 0.2 * 255 + 1

    halves = np.concatenate([flat([64] * 3)[:, : SIZE // 2], flat([192] * 3)[:, SIZE // 2 :]], axis=1)
    out = augmented(path, halves, contrast=0.3)
    factor = (out[:, :, -1] - out[:, :, 0]).mean(axis=(1, 2)) / 128
    assert factor.min() >= 0.7 - 0.02 and factor.max() <= 1.3 + 0.02 and factor.std() > 0.1

    colour = [160, 120, 100]
    out = augmented(path, flat(colour), saturation=0.3).mean(axis=(1, 2))
    chroma = (out.max(axis=1) - out.min(axis=1)) / 60  # max - min of the colour, 60 before
    assert chroma.min() >= 0.7 - 0.03 and chroma.max() <= 1.3 + 0.03 and chroma.std() > 0.1

    green = [80, 200, 80]
    out = augmented(path, flat(green), hue=0.05).mean(axis=(1, 2)) / 255
    turn = np.array([colorsys.rgb_to_hsv(*rgb)[0] for rgb in out]) - 1 / 3
    assert np.abs(turn).max() <= 0.05 + 0.01 and turn.std() > 0.02


@pytest.mark.parametrize("path", PATHS)
def test_pca_lighting_shifts_every_pixel_alike_along_imagenet_components(path):
    out = augmented(path, flat([128] * 3), pca_std=0.5)
    assert out.std(axis=(1, 2)).max() < 0.6  # one RGB offset per image, not noise
    assert pca_alpha(out).std() == pytest.approx(0.5, rel=0.15)


def test_offline_and_online_policies_agree_statistically():
    flips = {
        p: (lambda im: im[:, :, 0, 0] > im[:, :, -1, 0])(augmented(p, gradient(), n=400, hflip=0.3)).mean()
        for p in PATHS
    }
    assert flips["offline"] == pytest.approx(0.3, abs=0.07) and flips["online"] == pytest.approx(0.3, abs=0.07)

    shifts = {p: augmented(p, flat([128] * 3), brightness=0.2).mean(axis=(1, 2, 3)) - 128 for p in PATHS}
    for shift in shifts.values():  # uniform in [-51, 51]: mean 0, standard deviation 51 / sqrt(3)
        assert shift.mean() == pytest.approx(0, abs=5)
        assert shift.std() == pytest.approx(0.2 * 255 / 3**0.5, rel=0.15)

    # Both redraw crops that do not fit, which pulls the mean area below the middle of crop_scale.
    areas = {
        p: np.prod(crop_sides(augmented(p, gradient(), crop_scale=(0.6, 1.0), crop_ratio=(0.75, 4 / 3))), axis=0)
        for p in PATHS
    }
    assert areas["offline"].mean() == pytest.approx(0.744, abs=0.02)
    assert areas["online"].mean() == pytest.approx(areas["offline"].mean(), abs=0.02)

    alphas = {p: pca_alpha(augmented(p, flat([128] * 3), pca_std=0.5)) for p in PATHS}
    assert alphas["online"].std() == pytest.approx(alphas["offline"].std(), rel=0.2)


def test_offline_variant_depends_only_on_its_seed(tmp_path):
    transform = offline_policy(SIZE, config(**ALL_ON).augment)
    image = np.asarray(Image.open(next(make_images(tmp_path, {"x": 1}, size=(160, 120)).rglob("*.jpg"))))
    first = offline_variant(transform, image, 7)
    offline_variant(transform, image, 8)
    assert offline_variant(transform, image, 7).tobytes() == first.tobytes()
    assert offline_variant(transform, image, 8).tobytes() != first.tobytes()


def test_online_layers_do_nothing_at_inference():
    cfg = config(**ALL_ON)
    batch = np.repeat(gradient()[None].astype("float32"), 4, axis=0)
    assert np.allclose(online_augmentation(cfg)(batch, training=False), batch, atol=1e-3)


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("augment.crop_ratio", [1.3, 0.7], "augment: crop_ratio must be [min, max] with min <= max"),
        ("augment.mode", "sometimes", "augment.mode: Input should be 'offline', 'online' or 'both'"),
        ("augment.hue", 0.6, "augment.hue: Input should be less than or equal to 0.5"),
        (
            "augment.online.mix",
            "cutmix",
            "augment: online.mix=cutmix runs only in the training graph, which mode offline leaves out",
        ),
        ("augment.online.rand_augment_ops", 2, "augment: online.rand_augment_ops=2 runs only in the training graph"),
        ("augment.online.mix", "augmix", "augment.online.mix: Input should be 'none', 'mixup' or 'cutmix'"),
        (
            "augment.online.rand_augment_ops",
            12,
            "augment.online.rand_augment_ops: Input should be less than or equal to 11",
        ),
        (
            "model.image_size",
            2000,
            "model: image_size 2000 is above the largest size, 1024 (ImageNet backbones are "
            "trained at 224-300 px; memory grows with the square of the side): lower it",
        ),
    ],
)
def test_bad_policy_fails_naming_the_key(tmp_path, key, value, expected):
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    set_params(tmp_path, **{key: value})
    with pytest.raises(UserError, match=re.escape(expected)):
        load_config(tmp_path / "params.yaml")


@pytest.mark.parametrize("mode", ["online", "both"])
def test_online_only_layers_load_with_an_online_mode(tmp_path, mode):
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    set_params(
        tmp_path,
        **{
            "augment.mode": mode,
            "augment.online.mix": "mixup",
            "augment.online.rand_augment_ops": 1,
            "train.fine_tune.blocks": 1,
        },
    )  # the online layers run in fine-tuning
    online = load_config(tmp_path / "params.yaml").augment.online
    assert (online.mix, online.rand_augment_ops) == ("mixup", 1)


# ---- online only: RandAugment, MixUp, CutMix (core Keras 3) -------------------------------------


def online_config(**online) -> Config:
    """config() with augment.mode online and ``online`` (augment.online) set: every other step off."""
    cfg = config()
    augment = cfg.augment.model_copy(update={"mode": "online", "online": cfg.augment.online.model_copy(update=online)})
    return cfg.model_copy(update={"augment": augment})


def test_rand_augment_changes_images_in_training_only_and_the_same_way_every_run():
    cfg = online_config(rand_augment_ops=2)
    batch = np.repeat(gradient()[None].astype("float32"), 4, axis=0)
    layers = online_augmentation(cfg)
    assert layers.layers[-1].name == "rand_augment"
    out = [np.asarray(layers(batch, training=True)) for _ in range(6)]
    assert all(o.min() >= 0 and o.max() <= 255 + 1e-3 for o in out)
    assert sum(np.abs(o - batch).mean() > 2 for o in out) >= 5  # two ops drawn per batch: rarely both near no-ops
    assert np.allclose(layers(batch, training=False), batch, atol=1e-3)
    np.testing.assert_array_equal(np.asarray(online_augmentation(cfg)(batch, training=True)), out[0])  # seeded


VALUES = 10.0 * np.arange(1, 17)  # image i: every pixel VALUES[i]; its label: class i of 16


def flat_batches(indices: tf.data.Dataset, batch_size: int) -> tf.data.Dataset:
    """Batches of (image, one-hot label) as train's Examples.batches makes them, from row indices."""

    def example(i):
        return tf.fill((SIZE, SIZE, 3), tf.gather(VALUES.astype("float32"), i)), tf.one_hot(i, len(VALUES))

    return indices.map(example).batch(batch_size)


def mixed_arrays(batches, rows: range) -> tuple[np.ndarray, np.ndarray]:
    pairs = list(batches(tf.data.Dataset.range(rows.start, rows.stop), 8).as_numpy_iterator())
    return np.concatenate([images for images, _ in pairs]), np.concatenate([labels for _, labels in pairs])


@pytest.mark.parametrize("mix", ["mixup", "cutmix"])
def test_label_mixing_mixes_the_labels_as_it_mixes_the_pixels(mix):
    cfg = online_config(mix=mix, mix_alpha=1.0)
    images, labels = mixed_arrays(label_mixing(cfg, flat_batches), range(16))
    assert np.allclose(labels.sum(axis=1), 1, atol=1e-5) and labels.min() >= 0
    assert (labels.max(axis=1) < 0.95).sum() >= 6  # most of the 16 are mixed (Beta(1, 1) weights)
    # Each label weight is the share of that image in the pixels: exact for MixUp's blend, for
    # CutMix's box up to the pixels its edges cut.
    np.testing.assert_allclose(images.mean(axis=(1, 2, 3)), labels @ VALUES, atol=1e-3 if mix == "mixup" else 3)
    pasted = np.isin(images, VALUES).mean()
    assert (pasted == 1) if mix == "cutmix" else (pasted < 0.5)  # CutMix moves pixels, MixUp blends them

    # Seeded by the batch's rows alone: a run resumed at the second batch mixes it the same way.
    again_images, again_labels = mixed_arrays(label_mixing(cfg, flat_batches), range(8, 16))
    np.testing.assert_array_equal(again_images, images[8:])
    np.testing.assert_array_equal(again_labels, labels[8:])


def test_no_mixing_leaves_the_batches_alone_and_the_gallery_shows_mixing():
    assert label_mixing(online_config(), flat_batches) is flat_batches
    images = np.stack([flat([v] * 3) for v in VALUES[:6]]).astype("float32")
    assert np.allclose(online_variants(online_config(), images, SIZE), images, atol=1e-3)
    mixed = online_variants(online_config(mix="mixup", mix_alpha=1.0), images, SIZE)
    assert np.isin(mixed.round(3), VALUES).mean() < 0.5


@pytest.fixture(scope="module")
def online_template(tmp_path_factory) -> Path:
    """A project through features with augment.mode online, fine-tuning 1 block: ResNet50 at 32 px."""
    params = {
        "model.backbone": "resnet50",
        "model.image_size": 32,
        "augment.mode": "online",
        "train.epochs": 1,
        "train.fine_tune.blocks": 1,
        "train.fine_tune.epochs": 2,
        "train.early_stopping_patience": None,
    }
    return project_through("features", tmp_path_factory.mktemp("online"), {"red": 8, "green": 8, "blue": 8}, params)


@pytest.mark.slow
@pytest.mark.parametrize("online", [{"rand_augment_ops": 2, "mix": "cutmix", "mix_alpha": 1.0}, {"mix": "mixup"}])
def test_train_stage_fine_tunes_through_the_online_only_layers(online_template, tmp_path, online):
    project = Path(shutil.copytree(online_template, tmp_path / "project", symlinks=True))
    set_params(project, **{f"augment.online.{key}": value for key, value in online.items()})
    # The augment stage writes the same files (only its gallery changes), so features are reused.
    assert stages_run(run(["dvc", "repro", "train"], project).stdout) == ["augment", "train"]
    with open(project / HISTORY, newline="") as fh:
        history = list(csv.DictReader(fh))
    assert [row["phase"] for row in history if row["phase"] != "head"] == ["fine_tune", "fine_tune"]
    assert all(np.isfinite(float(row["loss"])) for row in history)


# ---- the stage --------------------------------------------------------------------------------


def run_augment(project: Path, cache: Path) -> tuple[list[dict[str, str]], int]:
    """Run the stage with render cache ``cache``; its manifest and how many files it rendered."""
    result = run(
        [sys.executable, "-m", "pipeline.stages.augment"],
        project,
        env={**project_env(project), "PIPELINE_CACHE_DIR": str(cache)},
    )
    with open(project / "data" / "augmented" / "manifest.csv", newline="") as fh:
        return list(csv.DictReader(fh)), int(re.search(r"\((\d+) rendered", result.stdout).group(1))  # type: ignore[union-attr]


def prepare(project: Path) -> None:
    for stage in ("download", "prepare"):
        run([sys.executable, "-m", f"pipeline.stages.{stage}"], project)


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_matches_a_fresh_render(project: Path, manifest: list[dict[str, str]]) -> None:
    """Every output file has the bytes this process renders for it from the prepared image."""
    cfg = load_config(project / "params.yaml")
    with open(project / "data" / "prepared" / "manifest.csv", newline="") as fh:
        sha256 = {r["path"]: r["sha256"] for r in csv.DictReader(fh)}
    for row in manifest:
        data, copy = (project / "data" / "prepared" / row["source"]).read_bytes(), int(row["copy"])
        pixels = original(data, cfg) if copy == 0 else variant(decode(data), copy, sha256[row["source"]], cfg)
        assert (project / "data" / "augmented" / row["path"]).read_bytes() == encode_jpeg(pixels), row


@pytest.mark.slow
def test_stage_writes_the_manifest_contract_deterministically(project, tmp_path):
    prepare(project)
    manifest, rendered = run_augment(project, tmp_path / "cache1")
    assert list(manifest[0]) == ["path", "label", "split", "copy", "source"]
    copies = {(r["split"], r["copy"]) for r in manifest}
    assert copies == {("train", "0"), ("train", "1"), ("val", "0"), ("test", "0")}  # val/test: resized only
    assert rendered == len(manifest)
    for row in manifest[:: len(manifest) // 7]:
        assert Image.open(project / "data" / "augmented" / row["path"]).size == (75, 75)
    assert_matches_a_fresh_render(project, manifest)
    gallery = project / "reports" / "augment_gallery.png"
    assert Image.open(gallery).format == "PNG"

    first = tree(project / "data" / "augmented"), gallery.read_bytes()
    run_augment(project, tmp_path / "cache2")  # from scratch again: byte-identical
    assert (tree(project / "data" / "augmented"), gallery.read_bytes()) == first


@pytest.mark.slow
def test_stage_renders_only_what_is_new_and_never_reuses_stale_files(project, tmp_path):
    prepare(project)
    cache = tmp_path / "cache"
    before, _ = run_augment(project, cache)

    extra = make_images(tmp_path / "extra", {"red": 4}, seed=99)
    for i, path in enumerate(sorted((extra / "red").glob("*.jpg"))):
        shutil.copy(path, tmp_path / "images" / "red" / f"extra_{i}.jpg")
    prepare(project)
    after, rendered = run_augment(project, cache)
    new = {(r["source"], r["copy"]) for r in after} - {(r["source"], r["copy"]) for r in before}
    assert len(after) > len(before) and rendered == len(new) > 0
    assert_matches_a_fresh_render(project, after)

    set_params(project, **{"augment.brightness": 0.35})
    changed, rendered = run_augment(project, cache)
    assert rendered == sum(r["copy"] != "0" for r in changed)  # originals reused, every variant redone
    assert_matches_a_fresh_render(project, changed)

    set_params(project, **{"augment.mode": "online", "train.fine_tune.blocks": 1})
    online, rendered = run_augment(project, cache)
    assert rendered == 0 and {r["copy"] for r in online} == {"0"}

    blocked = tmp_path / "not-a-folder"
    blocked.write_text("")
    result = run(
        [sys.executable, "-m", "pipeline.stages.augment"],
        project,
        check=False,
        env={**project_env(project), "PIPELINE_CACHE_DIR": str(blocked)},
    )
    # One line from us, after whatever TensorFlow logs when it loads; no traceback.
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert re.fullmatch(
        r"error: cannot create the render cache .* set PIPELINE_CACHE_DIR to a writable folder",
        result.stderr.strip().splitlines()[-1],
    )
    assert len(list((project / "data" / "augmented").rglob("*.jpg"))) == len(online)  # last output kept


def textured(seed: int, size: tuple[int, int]) -> Image.Image:
    """A photo-like picture: smooth random shapes with grain, so that resampling and JPEG both
    leave a trace."""
    rng = np.random.default_rng(seed)
    smooth = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(size, Image.Resampling.BICUBIC)
    grain = rng.normal(0, 12, (size[1], size[0], 3))
    return Image.fromarray(np.clip(np.asarray(smooth) + grain, 0, 255).astype(np.uint8))


def test_copy_0_is_the_served_input_of_the_original_within_jpeg_rounding(tmp_path):
    """Copy 0, made from prepare's re-encoded copy, against model_input of the original file (what
    the model server makes of it): no further apart than two JPEG encodings, prepare's and augment's,
    would take the served input (measured: 1.0-1.25 times one encoding's mean difference, 1.75 for
    photos smaller than the input size, where prepare's is upscaled). Large photos (prepare shrinks
    them first), EXIF rotations, CMYK and alpha included."""
    images = tmp_path / "images"
    for c, label in enumerate(("red", "green", "blue")):
        (images / label).mkdir(parents=True)
        for i, size in enumerate([(64, 48), (48, 64), (120, 90), (512, 384), (2400, 1800), (700, 260)]):
            textured(10 * c + i, size).save(images / label / f"{i}.jpg", quality=92)
    exif = Image.Exif()
    for orientation in (6, 8):
        exif[0x0112] = orientation
        textured(100 + orientation, (900, 600)).save(images / "red" / f"rotated_{orientation}.jpg", exif=exif)
    textured(200, (800, 600)).convert("CMYK").save(images / "green" / "cmyk.jpg", quality=95)
    rgba = textured(201, (300, 400)).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize((300, 400)))
    rgba.save(images / "blue" / "alpha.png")
    project = new_project(tmp_path / "project", images)
    set_params(project, **{"model.image_size": 96})
    run(["dvc", "repro", "augment"], project)

    with open(project / "data" / "prepared" / "manifest.csv", newline="") as fh:
        raw_of = {r["path"]: r["source"] for r in csv.DictReader(fh)}
    with open(project / "data" / "augmented" / "manifest.csv", newline="") as fh:
        originals = [r for r in csv.DictReader(fh) if r["copy"] == "0"]
    assert len(originals) == 22
    for row in originals:
        served = model_input(project / "data" / "raw" / raw_of[row["source"]], 96).astype(int)
        copy_0 = np.asarray(Image.open(project / "data" / "augmented" / row["path"])).astype(int)
        once = decode(encode_jpeg(served.astype(np.uint8))).astype(int)  # the served input through one JPEG
        assert np.abs(copy_0 - served).mean() <= 2 * np.abs(once - served).mean(), raw_of[row["source"]]
        assert np.abs(copy_0 - served).max() <= 3 * np.abs(once - served).max(), raw_of[row["source"]]


GALLERY_MEMORY = """
import re
from pathlib import Path
from pipeline.stages.augment import write_gallery
from pipeline.config import load_config
from pipeline.paths import PREPARED_MANIFEST
from pipeline.data.manifests import PreparedImage, read_rows

def megabytes(key):
    return int(re.search(key + r":\\s+(\\d+)", Path("/proc/self/status").read_text()).group(1)) // 1024

cfg, manifest = load_config(), read_rows(PREPARED_MANIFEST, PreparedImage)
before = megabytes("VmRSS")
write_gallery(manifest, cfg)
print(megabytes("VmHWM") - before)
"""


@pytest.mark.slow
def test_gallery_memory_stays_bounded_at_the_largest_image_size(project):
    prepare(project)
    # The largest size allowed, offline and online variants; the online batch alone was 0.5 GB.
    set_params(project, **{"model.image_size": 1024, "augment.mode": "both"})
    grown = int(run([sys.executable, "-c", GALLERY_MEMORY], project).stdout.split()[-1])
    assert grown < 700, f"the gallery took {grown} MB more"  # 2,300 MB when drawn at the image size, 220 now
    assert Image.open(project / "reports" / "augment_gallery.png").size[1] < 600  # 3 classes: 3 small rows


@pytest.mark.parametrize(
    "mode, copies, drawn", [("offline", 2, (2, 0)), ("offline", 9, (4, 0)), ("online", 2, (0, 4)), ("both", 1, (1, 4))]
)
def test_gallery_draws_only_the_variants_training_sees(mode, copies, drawn):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["augment"] |= {"mode": mode, "copies": copies}
    params["train"]["fine_tune"]["blocks"] = 1  # online augmentation needs images to train on
    assert gallery_variants(Config.model_validate(params)) == drawn
