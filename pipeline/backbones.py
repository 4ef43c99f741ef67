"""Registry of the supported backbones: plain metadata, importable without TensorFlow.

``preprocessing`` names the convention of the backbone's ``keras.applications`` ``preprocess_input``:
``tf`` scales pixels to [-1, 1]; ``caffe`` flips RGB to BGR and subtracts the ImageNet channel means.

``blocks`` names, bottom to top, the layer that ends each block of the architecture (Inception
modules ``mixed0..mixed10``, ResNet residual blocks ``conv5_block3_out``...). Each is the only
tensor passed on to the rest of the network, so "the top N blocks" is everything after the end of
block ``-N-1``: a clean cut between a frozen prefix and a trainable top (``train.fine_tune.blocks``).
"""

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Backbone:
    name: str
    application: str  # class name in keras.applications
    native_size: int  # input size the ImageNet weights were trained at
    min_size: int  # smallest input the architecture accepts
    preprocessing: Literal["tf", "caffe"]
    blocks: tuple[str, ...]  # layer ending each block, bottom to top


def _resnet_blocks(stage_depths: tuple[int, int, int, int]) -> tuple[str, ...]:
    """``conv2_block1_out`` ... ``conv5_blockN_out``: ResNet v1 and v2 name their blocks alike."""
    return tuple(f"conv{stage}_block{i}_out" for stage, depth in enumerate(stage_depths, start=2)
                 for i in range(1, depth + 1))


INCEPTION_V3_BLOCKS = tuple(f"mixed{i}" for i in range(11))
RESNET50_BLOCKS = _resnet_blocks((3, 4, 6, 3))
RESNET101_BLOCKS = _resnet_blocks((3, 4, 23, 3))
RESNET152_BLOCKS = _resnet_blocks((3, 8, 36, 3))

BACKBONES: dict[str, Backbone] = {
    b.name: b
    for b in (
        Backbone("inception_v3", "InceptionV3", 299, 75, "tf", INCEPTION_V3_BLOCKS),
        Backbone("resnet50", "ResNet50", 224, 32, "caffe", RESNET50_BLOCKS),
        Backbone("resnet101", "ResNet101", 224, 32, "caffe", RESNET101_BLOCKS),
        Backbone("resnet152", "ResNet152", 224, 32, "caffe", RESNET152_BLOCKS),
        Backbone("resnet50_v2", "ResNet50V2", 224, 32, "tf", RESNET50_BLOCKS),
    )
}
