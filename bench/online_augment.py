"""The online-only layers with real weights: the online policy alone, then with RandAugment, MixUp, CutMix.

One scratch project, made as ``bench/quality.py`` makes its (the real weights, the slice, the
project's training defaults) and ``--seed``, with ``augment.mode: online`` and fine-tuning of the top
``--fine-tune-blocks`` blocks on the images: online layers run only there, the head phase trains
on the cached features of the resized originals. The data stages and the features run once; then
train + evaluate once per setting. For each: test accuracy, macro F1 and ECE
(``eval/metrics.json``), the epochs run and the train stage's wall time.

    python bench/online_augment.py --archive flower_photos.tgz --weights mobilenet_v2_1.0_224_imagenet_no_top.h5
"""

import argparse
import tempfile
from pathlib import Path
from typing import Any

from quality import epochs_run, new_project, test_report

from common import load_average, machine, run_stage, section
from pipeline.config import override_params

SETTINGS: dict[str, dict[str, Any]] = {  # name: augment.online keys set, on top of the online policy of params.yaml
    "online policy only": {},
    "+ RandAugment (2 ops, factor 0.5)": {"rand_augment_ops": 2, "rand_augment_factor": 0.5},
    "+ MixUp (alpha 0.2)": {"mix": "mixup", "mix_alpha": 0.2},
    "+ CutMix (alpha 1.0)": {"mix": "cutmix", "mix_alpha": 1.0},
}
OFF: dict[str, Any] = {"rand_augment_ops": 0, "mix": "none"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archive", type=Path, required=True, help="the flowers archive (.tgz)")
    parser.add_argument("--weights", type=Path, required=True, help="an ImageNet weights file (no top) for --backbone")
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--per-class", type=int, default=120, help="data.max_per_class")
    parser.add_argument("--image-size", type=int, default=160)
    parser.add_argument("--epochs", type=int, default=10, help="head epochs (at most: early stopping is on)")
    parser.add_argument("--fine-tune-blocks", type=int, default=4)
    parser.add_argument("--fine-tune-epochs", type=int, default=5)
    parser.add_argument(
        "--seed", type=int, default=42, help="params.yaml's seed: the split, the head's init, the draws"
    )
    parser.add_argument("--workdir", type=Path, help="scratch folder (default: a new temporary one)")
    args = parser.parse_args()
    info = machine()
    workdir = new_project(
        args.workdir or Path(tempfile.mkdtemp(prefix="online-augment-")),
        args.archive,
        args.weights,
        args.backbone,
        args.per_class,
        args.image_size,
        args.epochs,
    )
    override_params(
        workdir / "params.yaml",
        {
            "seed": args.seed,
            "augment.mode": "online",
            "train.fine_tune.blocks": args.fine_tune_blocks,
            "train.fine_tune.epochs": args.fine_tune_epochs,
        },
    )
    for stage in ("download", "prepare", "augment", "features"):
        run_stage(stage, workdir)
    rows = []
    for name, online in SETTINGS.items():
        override_params(workdir / "params.yaml", {f"augment.online.{k}": v for k, v in {**OFF, **online}.items()})
        seconds = run_stage("train", workdir).seconds
        run_stage("evaluate", workdir)
        report = test_report(workdir)
        rows.append(
            (
                name,
                epochs_run(workdir),
                f"{report['accuracy']:.3f}",
                f"{report['macro_f1']:.3f}",
                f"{report['ece']:.3f}",
                f"{seconds:.0f} s",
            )
        )
        print(rows[-1], flush=True)  # what a long run has measured, should it be cut short
    rows.append(("load average (1 min) after", load_average(), "", "", "", ""))
    command = (
        f"python bench/online_augment.py --archive {args.archive} --weights {args.weights} --backbone "
        f"{args.backbone} --per-class {args.per_class} --image-size {args.image_size} --epochs {args.epochs} "
        f"--fine-tune-blocks {args.fine_tune_blocks} --fine-tune-epochs {args.fine_tune_epochs} "
        f"--seed {args.seed} --workdir {workdir}"
    )
    title = (
        f"Online-only augmentation with real weights: {args.backbone}, {args.image_size} px, at most "
        f"{args.per_class} images per class, fine-tuning the top {args.fine_tune_blocks} blocks"
    )
    header = ("augment.online", "epochs run", "test accuracy", "macro F1", "ECE", "train stage")
    print("\n".join(f"| {k} | {v} |" for k, v in info.items()))
    print("\n" + section(title, rows, command, header))


if __name__ == "__main__":
    main()
