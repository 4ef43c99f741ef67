"""Registry of the supported backbones: plain metadata, importable without TensorFlow.

``preprocessing`` names the convention of the backbone's ``keras.applications`` ``preprocess_input``:
``tf`` scales pixels to [-1, 1]; ``caffe`` flips RGB to BGR and subtracts the ImageNet channel means.
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


BACKBONES: dict[str, Backbone] = {
    b.name: b
    for b in (
        Backbone("inception_v3", "InceptionV3", 299, 75, "tf"),
        Backbone("resnet50", "ResNet50", 224, 32, "caffe"),
        Backbone("resnet101", "ResNet101", 224, 32, "caffe"),
        Backbone("resnet152", "ResNet152", 224, 32, "caffe"),
        Backbone("resnet50_v2", "ResNet50V2", 224, 32, "tf"),
    )
}
