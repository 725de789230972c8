"""Classification networks for the tools; `pretrained` is always False (nothing is downloaded).

The trainer passes the dataset's `num_classes` and `in_channels` unless the section sets them.
"""

import paddle
from paddle import nn

from ..config import register
from .. import _compat
from ..config.registry import Limit

_COUNT = Limit(1, 512)  # caps keep a typo (width: 40960) from allocating gigabytes
_CLASSES = Limit(1, 10_000)
_CHANNELS = Limit(1, 1024)

__all__ = ["LeNet", "ResNet18", "MobileNetV3Small"]


@register("architecture", limits={"num_classes": _CLASSES, "in_channels": _CHANNELS, "width": _COUNT,
                                  "hidden": Limit(1, 8192), "image_size": Limit(4, 4096)})
class LeNet(nn.Layer):
    """A LeNet-style CNN sized for 8x8 digits: two conv-BN-ReLU stages and a 2-layer classifier.

    8x8 -> conv 3x3 (width) -> pool -> 4x4 -> conv 3x3 (2*width) -> pool -> 2x2 -> fc hidden -> fc.
    Works for any square input whose side is divisible by 4 (28x28 MNIST: 7x7 after pooling).
    """

    def __init__(self, num_classes=10, in_channels=1, width=16, hidden=64, image_size=8):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2D(in_channels, width, 3, padding=1, bias_attr=False),
            nn.BatchNorm2D(width),
            nn.ReLU(),
            nn.MaxPool2D(2),
            nn.Conv2D(width, 2 * width, 3, padding=1, bias_attr=False),
            nn.BatchNorm2D(2 * width),
            nn.ReLU(),
            nn.MaxPool2D(2),
        )
        side = image_size // 4
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(2 * width * side * side, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
        )

    def forward(self, x):
        return self.classifier(self.features(x))


def _first_conv(in_channels, conv, stride):
    out_channels, kernel_size, padding = _compat.conv_geometry(conv)
    return nn.Conv2D(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias_attr=False)


@register("architecture", limits={"num_classes": _CLASSES, "in_channels": _CHANNELS})
def ResNet18(num_classes=10, in_channels=3, small_input=True):
    """paddle.vision resnet18; `small_input` (for 8..32 pixel images) uses a 3x3 stride-1 stem, no max-pool."""
    from paddle.vision.models import resnet18

    model = resnet18(pretrained=False, num_classes=num_classes)
    if small_input or in_channels != 3:
        model.conv1 = nn.Conv2D(in_channels, 64, 3 if small_input else 7, stride=1 if small_input else 2,
                                padding=1 if small_input else 3, bias_attr=False)
    if small_input:
        model.maxpool = nn.Identity()
    return model


@register("architecture", limits={"num_classes": _CLASSES, "in_channels": _CHANNELS,
                                  "scale": Limit(0, 8, low_open=True)})
def MobileNetV3Small(num_classes=10, in_channels=3, small_input=True, scale=1.0):
    """paddle.vision mobilenet_v3_small; `small_input` makes the stem stride 1."""
    from paddle.vision.models import mobilenet_v3_small

    model = mobilenet_v3_small(pretrained=False, scale=scale, num_classes=num_classes)
    stem = model.conv[0]
    if small_input or in_channels != 3:
        model.conv.add_sublayer("0", _first_conv(in_channels, stem, 1 if small_input else 2))
    return model


def parameter_count(model):
    return sum(int(paddle.numel(p)) for p in model.parameters())
