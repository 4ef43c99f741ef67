"""Registry of the supported backbones: plain metadata, importable without TensorFlow.

``preprocessing`` names the convention of the backbone's ``keras.applications`` ``preprocess_input``:
``tf`` scales pixels to [-1, 1]; ``caffe`` flips RGB to BGR and subtracts the ImageNet channel means;
``included``: the application's first layers do it (MobileNetV3, EfficientNetV2 and ConvNeXt take
0..255 pixels and their ``preprocess_input`` passes them through).

``blocks`` names, bottom to top, the layer that ends each block of the architecture (Inception
modules ``mixed0..mixed10``, ResNet residual blocks ``conv5_block3_out``...). Each is the only
tensor passed on to the rest of the network, so "the top N blocks" is everything after the end of
block ``-N-1``: a clean cut between a frozen prefix and a trainable top (``train.fine_tune.blocks``).
The top block's end is the backbone's output and never a cut; where Keras leaves the layer that
ends it unnamed (MobileNetV3, ConvNeXt: an automatic name such as ``activation_17`` changes with
what the process built before), its entry is the top block's last named layer.

``alphas`` lists the width multipliers (``model.alpha``) that ImageNet weights exist for, the
default first; an empty tuple means the architecture has no such knob.

``cpu_bfloat16`` says whether the backbone computes faster in bfloat16 than in float32 on a CPU with
bfloat16 units, so that ``model.precision: auto`` picks it there. Measured with ``bench/precision.py``
on a Xeon with AMX (bench/results.md): Inception v3 1.9x, ResNets 1.45-1.65x, EfficientNetV2
1.1-1.17x faster; the MobileNets, mostly depthwise convolutions, 0.72-0.90x (slower); ConvNeXt
1.01x, no gain, so float32, the exact one.

EfficientNet is here as V2 only: Keras's EfficientNet B0-B7 (V1) adds one of its preprocessing
layers only when built with ``weights="imagenet"``, so the same weights rebuilt from a file (as
the train stage does from the features stage's ``backbone.weights.h5``) would compute other features.
"""

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Backbone:
    name: str
    application: str  # class name in keras.applications
    native_size: int  # input size the ImageNet weights were trained at
    min_size: int  # smallest input the architecture accepts
    preprocessing: Literal["tf", "caffe", "included"]
    blocks: tuple[str, ...]  # layer ending each block, bottom to top
    alphas: tuple[float, ...] = ()  # width multipliers (model.alpha), the default first
    cpu_bfloat16: bool = True  # faster in bfloat16 than float32 on CPUs with bfloat16 units


def _resnet_blocks(stage_depths: tuple[int, int, int, int]) -> tuple[str, ...]:
    """``conv2_block1_out`` ... ``conv5_blockN_out``: ResNet v1 and v2 name their blocks alike."""
    return tuple(
        f"conv{stage}_block{i}_out" for stage, depth in enumerate(stage_depths, start=2) for i in range(1, depth + 1)
    )


def _inverted_residual_blocks(names: list[str], project_bn: str, residual: set[int], top: str) -> tuple[str, ...]:
    """MobileNetV2/V3: the blocks ``names`` in order, then the last 1x1 convolution's layer ``top``.

    A block with a residual connection (its index in ``residual``) ends at its ``add``; the others,
    which change the width or the resolution, at their projection's BatchNorm.
    """
    return (*(f"{name}_add" if i in residual else f"{name}_{project_bn}" for i, name in enumerate(names)), top)


def _efficientnet_v2_blocks(stage_repeats: tuple[int, ...]) -> tuple[str, ...]:
    """``block1a`` ... ``block6<letter>``, then ``top_activation``: a stage's first block changes the
    width and ends at its projection (stage 1's, a fused block, at the projection's activation);
    the stage's other blocks end at their residual ``add``."""
    ends = []
    for stage, repeats in enumerate(stage_repeats, start=1):
        first = f"block{stage}a_project_activation" if stage == 1 else f"block{stage}a_project_bn"
        ends += [first] + [f"block{stage}{chr(ord('a') + i)}_add" for i in range(1, repeats)]
    return (*ends, "top_activation")


INCEPTION_V3_BLOCKS = tuple(f"mixed{i}" for i in range(11))
RESNET50_BLOCKS = _resnet_blocks((3, 4, 6, 3))
RESNET101_BLOCKS = _resnet_blocks((3, 4, 23, 3))
RESNET152_BLOCKS = _resnet_blocks((3, 8, 36, 3))
# MobileNetV2: inverted residual blocks 0..16, then the 1x1 convolution to 1280 channels.
MOBILENET_V2_BLOCKS = _inverted_residual_blocks(
    ["expanded_conv", *(f"block_{i}" for i in range(1, 17))],
    "project_BN",
    {2, 4, 5, 7, 8, 9, 11, 12, 14, 15},
    "out_relu",
)
# MobileNet v1: a plain chain of 13 depthwise-separable blocks, each ending at its pointwise ReLU.
MOBILENET_BLOCKS = tuple(f"conv_pw_{i}_relu" for i in range(1, 14))


# MobileNetV3: blocks 0..10 (Small) or 0..14 (Large), then conv_1 with its BatchNorm and hard-swish.
def _mobilenet_v3_names(count: int) -> list[str]:
    return ["expanded_conv", *(f"expanded_conv_{i}" for i in range(1, count))]


MOBILENET_V3_SMALL_BLOCKS = _inverted_residual_blocks(
    _mobilenet_v3_names(11), "project_bn", {2, 4, 5, 7, 9, 10}, "conv_1_bn"
)
MOBILENET_V3_LARGE_BLOCKS = _inverted_residual_blocks(
    _mobilenet_v3_names(15), "project_bn", {0, 2, 4, 5, 7, 8, 9, 11, 13, 14}, "conv_1_bn"
)
# ConvNeXt: its residual blocks end at unnamed additions, so the blocks here are the stem and the
# four stages, each stage but the last with the downsampling layer that follows it.
CONVNEXT_TINY_BLOCKS = (
    "convnext_tiny_stem",
    *(f"convnext_tiny_downsampling_block_{i}" for i in range(3)),
    "convnext_tiny_stage_3_block_2_identity",
)

BACKBONES: dict[str, Backbone] = {
    b.name: b
    for b in (
        Backbone("inception_v3", "InceptionV3", 299, 75, "tf", INCEPTION_V3_BLOCKS),
        Backbone("resnet50", "ResNet50", 224, 32, "caffe", RESNET50_BLOCKS),
        Backbone("resnet101", "ResNet101", 224, 32, "caffe", RESNET101_BLOCKS),
        Backbone("resnet152", "ResNet152", 224, 32, "caffe", RESNET152_BLOCKS),
        Backbone("resnet50_v2", "ResNet50V2", 224, 32, "tf", RESNET50_BLOCKS),
        Backbone(
            "mobilenet_v2",
            "MobileNetV2",
            224,
            32,
            "tf",
            MOBILENET_V2_BLOCKS,
            alphas=(1.0, 0.35, 0.5, 0.75, 1.3, 1.4),
            cpu_bfloat16=False,
        ),
        Backbone(
            "mobilenet", "MobileNet", 224, 32, "tf", MOBILENET_BLOCKS, alphas=(1.0, 0.25, 0.5, 0.75), cpu_bfloat16=False
        ),
        Backbone(
            "mobilenet_v3_small",
            "MobileNetV3Small",
            224,
            32,
            "included",
            MOBILENET_V3_SMALL_BLOCKS,
            alphas=(1.0, 0.75),
            cpu_bfloat16=False,
        ),
        Backbone(
            "mobilenet_v3_large",
            "MobileNetV3Large",
            224,
            32,
            "included",
            MOBILENET_V3_LARGE_BLOCKS,
            alphas=(1.0, 0.75),
            cpu_bfloat16=False,
        ),
        Backbone(
            "efficientnet_v2_b0", "EfficientNetV2B0", 224, 32, "included", _efficientnet_v2_blocks((1, 2, 2, 3, 5, 8))
        ),
        Backbone(
            "efficientnet_v2_b1", "EfficientNetV2B1", 240, 32, "included", _efficientnet_v2_blocks((2, 3, 3, 4, 6, 9))
        ),
        Backbone(
            "efficientnet_v2_b2", "EfficientNetV2B2", 260, 32, "included", _efficientnet_v2_blocks((2, 3, 3, 4, 6, 10))
        ),
        Backbone(
            "efficientnet_v2_b3", "EfficientNetV2B3", 300, 32, "included", _efficientnet_v2_blocks((2, 3, 3, 5, 7, 12))
        ),
        Backbone("convnext_tiny", "ConvNeXtTiny", 224, 32, "included", CONVNEXT_TINY_BLOCKS, cpu_bfloat16=False),
    )
}
